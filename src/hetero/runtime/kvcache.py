"""KV memory as a pool: fixed-size blocks for every layer from one budget in bytes.

A sequence is given all the blocks it can ever need (prompt + max new tokens, capped at the
context) when it is admitted, so a running sequence never fails to allocate mid-stream; a caller
asks `fits` first and queues what does not fit. Blocks go back on `free`. The tensors themselves
are model/paged.PagedKV (the layers read and write them); this file is only the bookkeeping.
"""
from __future__ import annotations

from hetero.dtypes import check_kv_dtype
from hetero.errors import HeteroError
from hetero.model.decoder import Decoder
from hetero.model.paged import PagedKV
from hetero.runtime.memory import resident_in

BLOCK = 16  # tokens per block


class KVPool:
    """Blocks of `block` tokens from `budget_bytes` (or exactly `n_blocks`), with a block table
    per sequence id."""

    def __init__(self, model: Decoder, budget_bytes: int | None = None, n_blocks: int | None = None,
                 block: int = BLOCK, kv_dtype: str | None = None):
        if block < 1:
            raise HeteroError(f"a KV block holds at least 1 token, got {block}")
        # how blocks hold K/V (dtypes.KV_DTYPES; default the model's): int8 ~2x the blocks of bf16
        self.kv_dtype = check_kv_dtype(model.kv_dtype if kv_dtype is None else kv_dtype)
        self.block = block
        self.block_bytes = PagedKV.block_bytes(model.spec, block, [layer.dtype for layer in model.layers],
                                               self.kv_dtype)
        if n_blocks is None:
            if budget_bytes is None:
                raise HeteroError("a KV pool needs a budget in bytes or a number of blocks")
            n_blocks = int(budget_bytes) // self.block_bytes
        if n_blocks < 1:
            raise HeteroError(f"a KV budget of {budget_bytes} bytes holds no block of {block} tokens "
                              f"({self.block_bytes} bytes)")
        self.kv = model.new_paged(n_blocks, block, self.kv_dtype)
        self.n_blocks = n_blocks
        self._free = list(range(n_blocks - 1, -1, -1))  # popped from the end: low ids first
        self.tables: dict[int, tuple[int, ...]] = {}

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.n_blocks - len(self._free)

    def fits(self, n_tokens: int) -> bool:
        """Whether a sequence of n_tokens can be given its blocks now."""
        return self.blocks_for(n_tokens) <= len(self._free)

    def ever_fits(self, n_tokens: int) -> bool:
        """Whether it could be, once every other sequence has finished."""
        return self.blocks_for(n_tokens) <= self.n_blocks

    def allocate(self, seq: int, n_tokens: int) -> tuple[int, ...]:
        """The block table of a new sequence holding up to n_tokens."""
        if seq in self.tables:
            raise HeteroError(f"sequence {seq} already holds KV blocks")
        need = self.blocks_for(n_tokens)
        if need > len(self._free):
            raise HeteroError(f"{n_tokens} tokens need {need} KV blocks; {len(self._free)} free")
        table = tuple(self._free.pop() for _ in range(need))
        self.tables[seq] = table
        return table

    def free(self, seq: int) -> None:
        self._free.extend(reversed(self.tables.pop(seq)))

    def nbytes(self) -> int:
        return self.kv.nbytes()

    def resident_bytes(self) -> int:
        """Bytes of the pool's tensors in memory now (pages written so far), measured by the kernel."""
        total = 0
        for t in _tensors(self.kv.k + self.kv.v):
            if t.device.type == "cpu":
                total += resident_in(t.data_ptr(), t.numel() * t.element_size())
            else:
                total += t.numel() * t.element_size()
        return total


def _tensors(stores) -> list:
    """The plain tensors behind K/V stores (a tensor, a CastKV's data, an Int8KV's codes and scales)."""
    out = []
    for s in stores:
        out += [s] if hasattr(s, "data_ptr") else [getattr(s, n) for n in ("data", "codes", "scale") if hasattr(s, n)]
    return out
