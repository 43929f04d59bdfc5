"""Token-level perplexity with a fixed context and stride: one evaluator for every model variant.

Windows of `context` tokens end every `stride` tokens; each window scores the tokens that are new
to it, so every token after the first is scored exactly once, with at least context - stride tokens
of history (the sliding-window method of the transformers perplexity guide). stride == context gives
(nearly) disjoint windows, the fastest; a smaller stride gives every scored token more history.
The result is exp(mean NLL over scored tokens).

decode=True scores each token through the decode step instead (one token a call, the path a
generation runs, with its kernels and their activation rounding): a window's unscored history is
prefilled, then every scored position is one step.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from hetero.errors import HeteroError
from hetero.progress import progress_bar


@dataclass
class PplResult:
    perplexity: float
    nll: float              # mean negative log-likelihood per scored token (nats)
    tokens: int             # tokens scored
    windows: int
    context: int
    stride: int
    seconds: float
    kl: float | None = None  # mean KL(reference || model) per scored token, when a reference was given

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def windows(n: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first_target): window ids[begin:end] scores targets first_target..end-1.

    The first window scores all but its first token; each later one ends `stride` tokens further
    on (at most context - 1, so the first new target still has history) and scores those tokens.
    """
    step = max(1, min(stride, context - 1))
    end = min(context, n)
    yield 0, end, 1
    while end < n:
        new_end = min(end + step, n)
        yield max(0, new_end - context), new_end, end
        end = new_end


def check_settings(n: int, context: int, stride: int, max_context: int | None = None) -> None:
    if context < 2:
        raise HeteroError(f"--context must be at least 2 (got {context})")
    if max_context is not None and context > max_context:
        raise HeteroError(f"--context {context} exceeds the model's context of {max_context}")
    if not 1 <= stride <= context:
        raise HeteroError(f"--stride must be between 1 and the context {context} (got {stride})")
    if n < 2:
        raise HeteroError(f"the text has {n} token(s); at least 2 are needed to score one")


def perplexity(net, ids: list[int] | torch.Tensor, context: int = 512, stride: int = 256,
               progress: bool = True, reference: list[torch.Tensor] | None = None,
               keep: list[torch.Tensor] | None = None, decode: bool = False) -> PplResult:
    """Perplexity of `net` (a Decoder or anything with `new_cache` and the same call) on `ids`.

    `keep`, when a list, receives each window's log-probabilities of the scored positions
    ([t, V] fp32); passing such a list back as `reference` adds the mean KL(reference || net).
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = ids.numel()
    check_settings(n, context, stride, getattr(getattr(net, "spec", None), "max_context", None))
    spans = list(windows(n, context, stride))
    if reference is not None and len(reference) != len(spans):
        raise ValueError("reference log-probs come from different windows")
    cache = net.new_cache(1, min(context, n))
    nll_sum, kl_sum, count = 0.0, 0.0, 0
    t0 = time.perf_counter()
    with progress_bar("perplexity", len(spans), enabled=progress) as advance, torch.inference_mode():
        for w, (b, e, first) in enumerate(spans):
            if decode:
                pred = _decoded(net, ids, b, e, first, cache)
            else:
                logits = net(ids[b:e].unsqueeze(0), 0, cache, last_only=False)[0]   # [e-b, V]
                pred = logits[first - b - 1:e - b - 1].float()                        # predicts ids[first:e]
            logp = torch.log_softmax(pred, dim=-1)
            target = ids[first:e]
            nll_sum += float(-logp.gather(1, target[:, None]).sum())
            count += target.numel()
            if reference is not None:
                ref = reference[w]
                kl_sum += float((ref.exp() * (ref - logp)).sum())
            if keep is not None:
                keep.append(logp)
            advance()
    nll = nll_sum / count
    return PplResult(perplexity=math.exp(nll), nll=nll, tokens=count, windows=len(spans), context=context,
                     stride=stride, seconds=time.perf_counter() - t0,
                     kl=None if reference is None else kl_sum / count)


def _decoded(net, ids: torch.Tensor, b: int, e: int, first: int, cache) -> torch.Tensor:
    """Logits predicting ids[first:e], one decode step per position after prefilling ids[b:first-1]."""
    if first - 1 > b:
        net(ids[b:first - 1].unsqueeze(0), 0, cache, last_only=True)
    rows = []
    for t in range(first - 1, e - 1):
        out = net(ids[t:t + 1].unsqueeze(0), t - b, cache, last_only=True)
        rows.append(out.reshape(-1, out.shape[-1])[-1].float())
    return torch.stack(rows)
