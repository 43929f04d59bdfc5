// How the decode stacks read one linear layer: its input prepared in the layouts its kernels read,
// a thread's share of its rows, and those rows' products (one token: decode_stack.cpp; a few rows
// at once: decode_rows.cpp). Same kernels, hence the same bits, in both.
#pragma once
#include "kernels.h"
#include "rows.h"
#include "blocks.h"
#include "blocks_i8.h"

using stack::Layer;
using stack::Lin;

namespace {

// A GEMV input as the row kernels read it: x (fp32, zero beyond the layer's input width) and, for
// int4 and the GGUF block kinds, its per-group sums (xs) and its BF16 dot-product layouts: xb, xs8
// (int4_prep_bf16's order: int4, Q4_0, Q4_1) and xp (plain bf16: the other block kinds); with int8
// activations on, i8[f] holds x in int8 family f's layout (blocks_i8.h; bound by bind_i8).
struct Input {
  const float* x;
  float* xs;
  uint16_t* xb;
  float* xs8;
  uint16_t* xp;
  XI8 i8[I8_FAMILIES];
};

inline void bind_i8(Input& in, XI8Buf& b) { for (int f = 0; f < I8_FAMILIES; ++f) in.i8[f] = b.view(f); }

// Which int8 layouts L's parts read (none when int8 activations are off), into need[]; true if
// some part reads another layout.
inline bool i8_needs(const Lin& L, bool* need) {
  bool other = false;
  for (int f = 0; f < I8_FAMILIES; ++f) need[f] = false;
  for (const auto& p : L.parts) {
    const int f = i8_kind(p.kind, L.K);
    if (f == I8_NONE) other = true; else need[f] = true;
  }
  return other;
}

inline void prepare_i8(const Lin& L, const float* x, Input& in, const bool* need) {
  for (int f = 0; f < I8_FAMILIES; ++f) if (need[f]) i8_prep(f, x, L.K, in.i8[f]);
}

inline bool int4_order(int64_t kind) { return kind == KIND_Q4_0 || kind == KIND_Q4_1; }

void prepare(const Lin& L, const float* x, Input& in) {
  in.x = x;
  if (!L.parts.empty()) {  // block kinds: the layouts its parts read (a mixed linear may need both)
    bool need[I8_FAMILIES];
    const bool other = i8_needs(L, need);
    prepare_i8(L, x, in, need);
    if (!other) return;
    bool i4 = false, plain = false;
    for (const auto& p : L.parts)
      if (i8_kind(p.kind, L.K) == I8_NONE && bf16_kind(p.kind, L.K)) (int4_order(p.kind) ? i4 : plain) = true;
    if (i4) int4_prep_bf16(x, L.K, in.xb, in.xs8, in.xs);
    else group_sums(x, L.K / 32, in.xs);
    if (plain) bf16_bits(x, L.K, in.xp);
    return;
  }
  if (L.kind != KIND_INT4) return;
  if (cpu_has_bf16()) int4_prep_bf16(x, L.K, in.xb, in.xs8, in.xs);
  else group_sums(x, L.K / 32, in.xs);
}

// Rows [n0, n1) of a block linear into y[0 .. n1-n0): each part's rows by its own kernel.
void block_rows(const Lin& L, const Input& in, int64_t n0, int64_t n1, float* y) {
  for (const auto& p : L.parts) {
    const int64_t a = std::max(n0, p.n0), b = std::min(n1, p.n1);
    if (a >= b) continue;
    const uint8_t* wp = static_cast<const uint8_t*>(p.w) + (a - p.n0) * block_row_bytes(p.kind, L.K);
    const int64_t N = b - a, blocks = (N + ROWS - 1) / ROWS;
    if (const int f = i8_kind(p.kind, L.K); f != I8_NONE) {
      float* ys[1] = {y + (a - n0)};
      i8_rows(p.kind, &in.i8[f], 1, wp, L.K, ys, 0, N);
    } else if (bf16_kind(p.kind, L.K))
      q_blocks_bf16(p.kind, int4_order(p.kind) ? in.xb : in.xp, in.xs8, in.xs, wp, N, L.K, y + (a - n0), 0, blocks);
    else
      q_blocks(p.kind, in.x, in.xs, wp, N, L.K, y + (a - n0), 0, blocks);
  }
}

// This thread's share [n0, n1) of L's rows: whole ROWS blocks of equal bytes (parts of a mixed
// linear differ in bytes per row; otherwise equal rows).
void share_lin(const Lin& L, int tid, int nth, int64_t& n0, int64_t& n1) {
  if (L.parts.size() < 2) { share(L.N, tid, nth, n0, n1); return; }
  double total = 0;
  for (const auto& p : L.parts) total += static_cast<double>((p.n1 - p.n0) * block_row_bytes(p.kind, L.K));
  auto first = [&](int t) -> int64_t {  // the first row of thread t's share
    if (t <= 0) return 0;
    if (t >= nth) return L.N;
    double left = total * t / nth;
    for (const auto& p : L.parts) {
      const double rb = static_cast<double>(block_row_bytes(p.kind, L.K)), bytes = (p.n1 - p.n0) * rb;
      if (left < bytes) return std::min(p.n1, p.n0 + round_up(static_cast<int64_t>(left / rb), ROWS));
      left -= bytes;
    }
    return L.N;
  };
  n0 = first(tid);
  n1 = std::max(n0, first(tid + 1));
}

// Rows [n0, n1) of L's product with the input into y[0 .. n1-n0), before rounding.
void lin_rows(const Lin& L, const Input& in, int64_t n0, int64_t n1, float* y) {
  const int64_t N = n1 - n0, K = L.K, blocks = (N + ROWS - 1) / ROWS;
  const float* x = in.x;
  if (N <= 0) return;
  switch (L.kind) {
    case KIND_F32: {
      const float* wp = static_cast<const float*>(L.w) + n0 * K;
      gemv_blocks(x, N, K, y, 0, blocks, [&](int64_t n, int64_t k) { return _mm512_loadu_ps(wp + n * K + k); });
      break;
    }
    case KIND_BF16: {
      const uint16_t* wp = static_cast<const uint16_t*>(L.w) + n0 * K;
      gemv_blocks(x, N, K, y, 0, blocks, [&](int64_t n, int64_t k) { return bf16x16_to_f32(wp + n * K + k); });
      break;
    }
    case KIND_INT8: {
      const int8_t* qp = static_cast<const int8_t*>(L.w) + n0 * K;
      const float* sp = static_cast<const float*>(L.s) + n0;
      int8_blocks(x, qp, sp, N, K, y, 0, blocks);
      break;
    }
    case KIND_Q8_0: case KIND_Q4_0: case KIND_Q4_1: case KIND_Q4_K: case KIND_Q5_K: case KIND_Q6_K: case KIND_MIXED:
      block_rows(L, in, n0, n1, y);
      break;
    default: {
      const uint8_t* pp = static_cast<const uint8_t*>(L.w) + n0 * (K / 2);
      const uint16_t* sp = static_cast<const uint16_t*>(L.s) + n0 * (K / 32) * 2;
      if (cpu_has_bf16()) int4_blocks_bf16(in.xb, in.xs8, x, in.xs, pp, sp, N, K, y, 0, blocks);
      else int4_blocks(x, in.xs, pp, sp, N, K, y, 0, blocks);
    }
  }
}

// A GEMV output as the per-layer path has it: rounded to T, plus the bias (rounded again).
template <typename T>
inline float out_value(const Lin& L, int64_t n, float v) {
  float r = rnd<T>(v);
  if (L.bias) r = rnd<T>(r + static_cast<float>(static_cast<const T*>(L.bias)[n]));
  return r;
}

}  // namespace
