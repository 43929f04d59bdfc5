"""hetero.dist: a model split into pipeline stages over several processes and hosts (torch.distributed).

    load_hosts("hosts.yaml") / local_hosts(2) / catalog_hosts(["desktop", "desktop"], "10gbe") -> Hosts
    split_model(spec, hosts, rank_speeds(hosts), precision, ...) -> Split     the cost-model stage split
    generate(model, hosts, prompts, max_new_tokens=...) -> dict               run it (ranks on this machine)
    python -m hetero.dist MODEL --hosts hosts.yaml ...                        one rank, under torchrun
"""
from __future__ import annotations

from hetero.dist.hosts import Host, Hosts, catalog_hosts, load_hosts, local_hosts, parse_hosts


def generate(model: str | None, hosts: "Hosts | str", prompts: list, max_new_tokens: int = 32,
             timeout: float = 30.0, threads: int | None = None, stream_stdout: bool = False, **job) -> dict:
    """Generate with MODEL split over `hosts` (a Hosts or a hosts-file path): what `hetero run --hosts`
    calls. Every rank runs on this machine; hosts elsewhere are started with torchrun instead
    (hetero.dist.launch.torchrun_commands). Returns rank 0's result: sequences (token ids, text),
    tok/s, per-rank weight bytes and RSS, and the split with its predicted tok/s."""
    from hetero.dist.launch import spawn_local
    from hetero.dist.pipeline import Job

    h = load_hosts(hosts) if isinstance(hosts, str) else hosts
    return spawn_local(model, h, Job(prompts=list(prompts), max_new_tokens=max_new_tokens, **job),
                       timeout=timeout, threads=threads, stream_stdout=stream_stdout)


def split_model(*args, **kwargs):
    from hetero.dist.split import split_model as _split

    return _split(*args, **kwargs)


def rank_speeds(*args, **kwargs):
    from hetero.dist.split import rank_speeds as _speeds

    return _speeds(*args, **kwargs)


__all__ = ["Host", "Hosts", "load_hosts", "local_hosts", "catalog_hosts", "parse_hosts", "generate",
           "split_model", "rank_speeds"]
