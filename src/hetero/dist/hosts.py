"""The hosts file: which machines take part in a pipeline, how many ranks each runs, and the links.

    hosts:
      - address: 10.0.0.1          # where rank 0's host listens (the first host is the master)
        ranks: 1                   # processes on this host (default 1), one pipeline stage each
        hardware: catalog:desktop  # optional: "this" (default; measured here) or a catalog machine
        devices: [cpu]             # optional: the compute device its stages run on (default: first GPU, else cpu)
        memory: 8GB                # optional: bytes a rank may hold (weights + KV cache)
      - address: 10.0.0.2
    links:                         # optional; bandwidth: bytes/s, "1.25GB/s", "10Gbit/s" or a catalog link (10gbe)
      default: {bandwidth: 10gbe, latency: 50us}
      between:
        - {hosts: [10.0.0.1, 10.0.0.2], bandwidth: 100gbe, latency: 20us}
    port: 29500                    # optional rendezvous port on the first host

Ranks are numbered in file order: the first host's ranks come first. Ranks on the same host talk over
loopback (the `local` link, default 5 GB/s and 30 µs unless `links: local:` says otherwise).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hetero.errors import HeteroError

LOCAL_ADDRESSES = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
DEFAULT_PORT = 29500
_RATE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]?)(b|bit|byte|bytes)?(?:/s|ps)?\s*$", re.I)
_TIME = re.compile(r"^\s*([0-9.]+)\s*(s|ms|us|µs|ns)?\s*$", re.I)
_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_TIME_SCALE = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


@dataclass(frozen=True)
class LinkInfo:
    bandwidth: float               # bytes/s, one direction
    latency_s: float
    kind: str = ""                 # 10gbe, 100gbe, loopback ...


@dataclass(frozen=True)
class Host:
    address: str
    ranks: int = 1
    hardware: str = "this"         # "this" or "catalog:SPEC" (what-if)
    devices: tuple[str, ...] = ()
    memory: int = 0                # bytes per rank; 0 = the device's own capacity

    @property
    def local(self) -> bool:
        return self.address in LOCAL_ADDRESSES


@dataclass(frozen=True)
class Hosts:
    hosts: tuple[Host, ...]
    default_link: LinkInfo = LinkInfo(1.25e9, 50e-6, "10gbe")
    local_link: LinkInfo = LinkInfo(5e9, 30e-6, "loopback")
    pair_links: dict[frozenset, LinkInfo] = field(default_factory=dict)
    port: int = DEFAULT_PORT

    @property
    def world_size(self) -> int:
        return sum(h.ranks for h in self.hosts)

    @property
    def master(self) -> str:
        return self.hosts[0].address

    def rank_hosts(self) -> list[Host]:
        """The host of every rank, in rank order."""
        return [h for h in self.hosts for _ in range(h.ranks)]

    def link(self, a: Host, b: Host) -> LinkInfo:
        """The link between two ranks' hosts (the local one when they share a host entry)."""
        if a is b or a.address == b.address:
            return self.local_link
        return self.pair_links.get(frozenset((a.address, b.address)), self.default_link)

    def all_local(self) -> bool:
        return all(h.local for h in self.hosts)


def _number(s: str) -> float | None:
    """A plain number written as text (YAML 1.1 reads 5e-05 as a string)."""
    try:
        return float(s)
    except ValueError:
        return None


def parse_rate(v) -> float:
    """Bytes/s from a number, "1.25GB/s", "10Gbit/s" / "10Gbps" (bits), or a catalog link name."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
        return float(v)
    s = str(v).strip().lower()
    if _number(s) is not None and _number(s) > 0:
        return _number(s)
    from hetero.hardware.catalog import entries

    part = entries().get(s)
    if part is not None and part.kind == "link":
        return part.bandwidth
    m = _RATE.match(s)
    if m and float(m.group(1)) > 0:
        n = float(m.group(1)) * _SCALE[m.group(2).lower()]
        bits = (m.group(3) or "b") in ("bit",) or s.endswith("bps")
        return n / 8 if bits else n
    raise HeteroError(f"bad bandwidth {v!r}: use bytes/s, e.g. 1.25GB/s, 10Gbit/s, or a link name like 10gbe")


def parse_latency(v) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
        return float(v)
    if _number(str(v)) is not None and _number(str(v)) >= 0:
        return _number(str(v))
    m = _TIME.match(str(v))
    if not m:
        raise HeteroError(f"bad latency {v!r}: use seconds or a unit, e.g. 50us, 0.2ms")
    return float(m.group(1)) * _TIME_SCALE[(m.group(2) or "s").lower()]


def _link(d, where: str, base: LinkInfo) -> LinkInfo:
    if isinstance(d, str):  # a bare link name: "10gbe"
        d = {"bandwidth": d}
    if not isinstance(d, dict):
        raise HeteroError(f"{where}: a link is a mapping with bandwidth and latency")
    kind = str(d.get("bandwidth", base.kind)) if isinstance(d.get("bandwidth"), str) else base.kind
    bw = parse_rate(d["bandwidth"]) if "bandwidth" in d else base.bandwidth
    if "latency" in d:
        lat = parse_latency(d["latency"])
    else:
        lat = {"1gbe": 50e-6, "10gbe": 50e-6, "100gbe": 20e-6}.get(kind.lower(), base.latency_s)
    return LinkInfo(bw, lat, kind.lower())


def parse_hosts(data, where: str = "hosts file") -> Hosts:
    """A Hosts from the parsed YAML mapping; every mistake is one clear line."""
    from hetero.plan.units import parse_bytes

    if not isinstance(data, dict) or not isinstance(data.get("hosts"), list) or not data["hosts"]:
        raise HeteroError(f"{where}: needs `hosts:` with at least one host")
    hosts = []
    for i, h in enumerate(data["hosts"]):
        if isinstance(h, str):
            h = {"address": h}
        if not isinstance(h, dict) or not h.get("address"):
            raise HeteroError(f"{where}: host {i + 1} needs an `address`")
        ranks = h.get("ranks", 1)
        if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
            raise HeteroError(f"{where}: host {h['address']}: ranks must be a positive integer, got {ranks!r}")
        devices = h.get("devices") or ()
        if isinstance(devices, str):
            devices = [devices]
        mem = 0
        if h.get("memory") is not None:
            try:
                mem = int(parse_bytes(str(h["memory"])))
            except (HeteroError, ValueError) as e:
                raise HeteroError(f"{where}: host {h['address']}: bad memory {h['memory']!r} ({e})") from None
        hw = str(h.get("hardware", "this"))
        if hw != "this" and not hw.startswith("catalog:"):
            hw = f"catalog:{hw}"
        hosts.append(Host(str(h["address"]), ranks, hw, tuple(str(d) for d in devices), mem))
    addresses = [h.address for h in hosts]
    if len(set(addresses)) != len(addresses) and not all(a in LOCAL_ADDRESSES for a in addresses):
        raise HeteroError(f"{where}: a host is listed twice; give it more `ranks` instead")
    links = data.get("links") or {}
    if not isinstance(links, dict):
        raise HeteroError(f"{where}: `links:` must be a mapping (default, local, between)")
    default = _link(links["default"], f"{where}: links.default", Hosts.default_link) \
        if "default" in links else Hosts.default_link
    local = _link(links["local"], f"{where}: links.local", Hosts.local_link) if "local" in links else Hosts.local_link
    pairs = {}
    for j, p in enumerate(links.get("between") or []):
        if not isinstance(p, dict) or not isinstance(p.get("hosts"), list) or len(p["hosts"]) != 2:
            raise HeteroError(f"{where}: links.between[{j}] needs `hosts: [A, B]`")
        for a in p["hosts"]:
            if a not in addresses:
                raise HeteroError(f"{where}: links.between[{j}] names {a!r}, which is not a host")
        pairs[frozenset(map(str, p["hosts"]))] = _link(p, f"{where}: links.between[{j}]", default)
    port = data.get("port", DEFAULT_PORT)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise HeteroError(f"{where}: port must be 1..65535, got {port!r}")
    return Hosts(tuple(hosts), default, local, pairs, port)


def load_hosts(path: str | Path) -> Hosts:
    import yaml

    from hetero.paths import read_user_text

    text = read_user_text(path, "hosts file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise HeteroError(f"hosts file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_hosts(data, str(path))


def local_hosts(ranks: int, port: int = DEFAULT_PORT) -> Hosts:
    """`ranks` processes on this machine (loopback), one stage each."""
    return Hosts((Host("127.0.0.1", ranks),), port=port)


def catalog_hosts(specs: list[str], link: str, latency: float | None = None) -> Hosts:
    """What-if hosts: one rank on each catalog machine, all joined by one kind of link."""
    base = _link({"bandwidth": link} if latency is None else {"bandwidth": link, "latency": latency},
                 "link", Hosts.default_link)
    hosts = tuple(Host(f"host{i}", 1, s if s.startswith("catalog:") else f"catalog:{s}") for i, s in enumerate(specs))
    return Hosts(hosts, default_link=base)


def hosts_to_dict(h: Hosts) -> dict:
    """The inverse of parse_hosts (what spawned ranks read back)."""
    def ln(x: LinkInfo) -> dict:
        return {"bandwidth": x.bandwidth, "latency": x.latency_s}

    return {"hosts": [{"address": x.address, "ranks": x.ranks, "hardware": x.hardware,
                       "devices": list(x.devices), **({"memory": x.memory} if x.memory else {})} for x in h.hosts],
            "links": {"default": ln(h.default_link), "local": ln(h.local_link),
                      "between": [{"hosts": sorted(k), **ln(v)} for k, v in h.pair_links.items()]},
            "port": h.port}
