"""KV memory as a pool: fixed-size blocks for every layer from one budget in bytes.

A sequence is given all the blocks it can ever need (prompt + max new tokens, capped at the
context) when it is admitted, so a running sequence never fails to allocate mid-stream; a caller
asks `fits` first and queues what does not fit. Blocks go back on `free`. The tensors themselves
are model/paged.PagedKV (the layers read and write them); this file is only the bookkeeping.

With `prefix_cache`, a block that holds 16 prompt tokens is kept after its sequence leaves, indexed
by its whole prefix (a hash chain over every token up to its end, as vLLM's automatic prefix cache
keys blocks), and a later prompt that starts with the same tokens shares it instead of prefilling
them again: a chat template's system prompt, or a client sending the same prompt again. Shared
blocks are only read (a sequence writes at positions past its cached prefix, in its own blocks).
Cached blocks that no sequence holds count as free: the least recently used goes first when a
sequence needs blocks.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

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
                 block: int = BLOCK, kv_dtype: str | None = None, prefix_cache: bool = False):
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
        self.prefix_cache = prefix_cache
        self._index: dict[bytes, int] = {}      # prefix key -> the cached block holding its last 16 tokens
        self._key_of: dict[int, bytes] = {}
        self._refs: dict[int, int] = {}         # cached block -> sequences holding it
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, least recent first
        self.cached: dict[int, int] = {}        # sequence -> prompt tokens it took from the cache

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block)

    @property
    def free_blocks(self) -> int:
        return len(self._free) + len(self._idle)

    @property
    def cached_blocks(self) -> int:
        """Blocks the prefix cache indexes (held by a sequence or idle)."""
        return len(self._key_of)

    def prefix_keys(self, prompt: list[int]) -> list[bytes]:
        """The key of each whole block of `prompt`: a hash of every token up to that block's end."""
        keys, h = [], b""
        for i in range(len(prompt) // self.block):
            h = hashlib.blake2b(h + repr(prompt[i * self.block:(i + 1) * self.block]).encode(), digest_size=16).digest()
            keys.append(h)
        return keys

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        b, _ = self._idle.popitem(last=False)   # the least recently used cached block
        del self._index[self._key_of.pop(b)]
        self._refs.pop(b, None)
        return b

    @property
    def used_blocks(self) -> int:
        """Blocks sequences hold now (idle cached blocks are free)."""
        return self.n_blocks - self.free_blocks

    def fits(self, n_tokens: int) -> bool:
        """Whether a sequence of n_tokens can be given its blocks now."""
        return self.blocks_for(n_tokens) <= self.free_blocks

    def ever_fits(self, n_tokens: int) -> bool:
        """Whether it could be, once every other sequence has finished."""
        return self.blocks_for(n_tokens) <= self.n_blocks

    def allocate(self, seq: int, n_tokens: int, keys: list[bytes] | None = None, prompt_len: int = 0) -> tuple[int, ...]:
        """The block table of a new sequence holding up to n_tokens. With the prompt's `keys`
        (prefix_keys) its first blocks are the cached ones of the longest cached prefix, never
        the whole prompt (its last token is run to sample from); `cached[seq]` says how many tokens."""
        if seq in self.tables:
            raise HeteroError(f"sequence {seq} already holds KV blocks")
        need = self.blocks_for(n_tokens)
        if need > self.free_blocks:
            raise HeteroError(f"{n_tokens} tokens need {need} KV blocks; {self.free_blocks} free")
        shared = []
        if self.prefix_cache and keys:
            for key in keys[:max(0, prompt_len - 1) // self.block]:
                b = self._index.get(key)
                if b is None:
                    break
                shared.append(b)
        for b in shared:   # held before any block is taken: _take must not evict them
            self._refs[b] += 1
            self._idle.pop(b, None)
        table = tuple(shared) + tuple(self._take() for _ in range(need - len(shared)))
        self.tables[seq] = table
        self.cached[seq] = len(shared) * self.block
        return table

    def publish(self, seq: int, i: int, key: bytes) -> None:
        """Block i of seq now holds 16 prompt tokens whose prefix key is `key`: later prompts may share it."""
        b = self.tables[seq][i]
        if not self.prefix_cache or key in self._index or b in self._key_of:
            return
        self._index[key], self._key_of[b], self._refs[b] = b, key, 1

    def free(self, seq: int) -> None:
        self.cached.pop(seq, None)
        back = []
        for b in self.tables.pop(seq):
            if b in self._key_of:   # cached: idle once nobody holds it
                self._refs[b] -= 1
                if self._refs[b] == 0:
                    self._idle[b] = None
            else:
                back.append(b)
        self._free.extend(reversed(back))

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
