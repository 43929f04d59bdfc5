// A few activation rows against a cached chunk of weight rows (the batched decode stack,
// decode_rows.cpp): each weight vector is loaded and widened (int8) or unpacked (int4) once for up
// to MT activation rows, and every (weight row, activation row) accumulator sees exactly the
// operations, in the same order, of its one-token row kernel (rows.h): the same bits per row.
#pragma once
#include "common.h"
#include "rows.h"
#include "blocks.h"

namespace {

// Activation rows per pass: 8 rows x 2 weight rows = 16 accumulators, so a batched step of up to 8
// sequences reads and unpacks each weight vector once, from memory straight into registers (with
// MT = 4, B = 8 took two passes and the per-row unpacking, not the dot products, bounded the step).
constexpr int MT = 8;

// out[i] = _mm512_reduce_add_ps(v[i]) for i < C, bit for bit: the same additions in the same tree
// (GCC's: 256-bit halves, 128-bit halves, lanes two apart, adjacent lanes), 16 vectors at once
// through transposing shuffles: 15 vector adds per 16 sums instead of 64 (K = 576 rows spent
// ~20% of a tile in the per-accumulator reductions).
template <int C>
inline void reduce_many(const __m512* v, float* out) {
  alignas(64) static const int32_t tr[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
  const __m512i idx = _mm512_load_si512(tr);
  for (int g = 0; g < C; g += 16) {
    __m512 a[8], b[4], c[2];
    auto at = [&](int i) { return g + i < C ? v[g + i] : _mm512_setzero_ps(); };
    for (int i = 0; i < 8; ++i) {  // [x.lo256 + x.hi256, y.lo256 + y.hi256]
      const __m512 x = at(2 * i), y = at(2 * i + 1);
      a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0xEE), _mm512_shuffle_f32x4(x, y, 0x44));
    }
    for (int j = 0; j < 4; ++j)  // 128-bit lane L of b[j]: vector 4j + L's upper + lower 128 bits
      b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xDD),
                           _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x88));
    for (int k = 0; k < 2; ++k)  // lanes 0 + 2 and 1 + 3 of each
      c[k] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    // element 4L + e: vector 4e + L's sum; transposed back to vector order
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
    alignas(64) float o[16];
    _mm512_store_ps(o, _mm512_permutexvar_ps(idx, r));
    for (int i = 0; i < 16 && g + i < C; ++i) out[g + i] = o[i];
  }
}

// The contiguous bytes of NR short rows read as one stream, prefetched PF_W ahead as the one-row
// kernels do (a tile's first pass streams the weights from memory; without it the hardware
// prefetcher does not ramp up over a thread's ~100-300 KB share).
inline void prefetch_run(const void* base, int64_t off, int64_t len) {
  const char* q = static_cast<const char*>(base) + PF_W + off;
  for (int64_t l = 0; l < len; l += 64) _mm_prefetch(q + l, _MM_HINT_T0);
}

// int8_rows for NR weight rows from n0 and M activation rows x[m] (K floats) -> y[m][n]; pf: prefetch
// as int8_rows does (a chunk's first pass).
template <int NR, int M>
inline void int8_tile(const float* const* x, const int8_t* qp, const float* sp, int64_t K, int64_t n0, float* const* y,
                      bool pf) {
  const int8_t* wb = qp + n0 * K;
  __m512 acc[NR][M];
  for (int r = 0; r < NR; ++r) for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    if (pf && (k * NR) % 64 == 0) prefetch_run(wb, k * NR, 64);
    __m512 w[NR];
    for (int r = 0; r < NR; ++r) w[r] = i8x16_to_f32(wb + r * K + k);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x[m] + k);
      for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(w[r], xv, acc[r][m]);
    }
  }
  float s[NR * M];
  reduce_many<NR * M>(&acc[0][0], s);
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < M; ++m) y[m][n0 + r] = s[r * M + m] * sp[n0 + r];
}

// Weight rows per tile for M activation rows: NR x M accumulators plus NR weight vectors in 32 registers.
template <int M>
constexpr int tile_rows() { return M <= 4 ? 4 : 2; }

// int4_rows_bf16 (even group count) for NR weight rows from n0 and M activation rows, given each
// row's int4_prep_bf16 layout (xb[m], xs8[m]) -> y[m][n].
template <int NR, int M>
BF16_TARGET inline void int4_tile_bf16(const Int4Bf16Consts& c, const uint16_t* const* xb, const float* const* xs8,
                                       const uint8_t* pp, const uint16_t* smp, int64_t K, int64_t n0, float* const* y,
                                       bool pf) {
  const int64_t G = K / 32, P = G / 2, row = K / 2;
  const __mmask32 odd = 0xAAAAAAAAu;
  const __m512 eight = _mm512_set1_ps(8.f);
  const uint8_t* wb = pp + n0 * row;
  const uint16_t* sb = smp + n0 * G * 2;
  __m512 acc[NR][M];
  for (int r = 0; r < NR; ++r) for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    if (pf) {  // as int4_rows_bf16 does
      prefetch_run(wb, p * 32 * NR, 32 * NR);
      _mm_prefetch(reinterpret_cast<const char*>(sb) + PF_S + p * 8 * NR, _MM_HINT_T0);
    }
    __m512i wl[NR], wh[NR];
    __m512 sc[NR], off[NR];
    for (int r = 0; r < NR; ++r) {
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + r * row + 32 * p)));
      wl[r] = _mm512_permutexvar_epi16(v, c.table);
      wh[r] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), c.table);
      const __m512i sz = _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sb + (r * G + 2 * p) * 2)));
      sc[r] = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(odd, c.idx_s, sz));
      off[r] = _mm512_fnmadd_ps(eight, sc[r], _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(odd, c.idx_z, sz)));
    }
    for (int m = 0; m < M; ++m) {
      const __m512i xl = _mm512_loadu_si512(xb[m] + 64 * p), xh = _mm512_loadu_si512(xb[m] + 64 * p + 32);
      const __m512 s8 = _mm512_loadu_ps(xs8[m] + 16 * p);
      for (int r = 0; r < NR; ++r) {
        __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)wl[r], (__m512bh)xl);
        d = _mm512_dpbf16_ps(d, (__m512bh)wh[r], (__m512bh)xh);
        acc[r][m] = _mm512_fmadd_ps(d, sc[r], acc[r][m]);
        acc[r][m] = _mm512_fmadd_ps(off[r], s8, acc[r][m]);
      }
    }
  }
  float s[NR * M];
  reduce_many<NR * M>(&acc[0][0], s);
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < M; ++m) y[m][n0 + r] = s[r * M + m];
}

// Activation rows [0, M) in passes of MT: pass(m0, integral_constant<mt>).
template <typename Pass>
void by_passes(int64_t M, Pass pass) {
  for (int64_t m0 = 0; m0 < M; m0 += MT) {
    switch (std::min<int64_t>(MT, M - m0)) {
      case 1: pass(m0, std::integral_constant<int, 1>()); break;
      case 2: pass(m0, std::integral_constant<int, 2>()); break;
      case 3: pass(m0, std::integral_constant<int, 3>()); break;
      case 4: pass(m0, std::integral_constant<int, 4>()); break;
      case 5: pass(m0, std::integral_constant<int, 5>()); break;
      case 6: pass(m0, std::integral_constant<int, 6>()); break;
      case 7: pass(m0, std::integral_constant<int, 7>()); break;
      default: pass(m0, std::integral_constant<int, 8>()); break;
    }
  }
}

// gemv_blocks (fp32 / bf16 weights) for NR weight rows from n0 and M activation rows.
template <int NR, int M, typename Load>
inline void dense_tile(const float* const* x, int64_t K, int64_t n0, float* const* y, Load load) {
  __m512 acc[NR][M];
  for (int r = 0; r < NR; ++r) for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 w[NR];
    for (int r = 0; r < NR; ++r) w[r] = load(n0 + r, k);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x[m] + k);
      for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(w[r], xv, acc[r][m]);
    }
  }
  float s[NR * M];
  reduce_many<NR * M>(&acc[0][0], s);
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < M; ++m) y[m][n0 + r] = s[r * M + m];
}

// q4_rows_bf16 (Q4_0: M1 false, Q4_1: true; K % 64 == 0) for NR rows from n0 of w and M rows of
// block_prep_bf16's inputs: the same loads and operations per (row, activation row).
template <bool M1, int NR, int M>
BF16_TARGET inline void q4_tile_bf16(const Int4Bf16Consts& c, const uint16_t* const* xb, const float* const* xs8,
                                     const uint8_t* w, int64_t K, int64_t n0, float* const* y, bool pf) {
  constexpr int64_t B = M1 ? 20 : 18, OFF = M1 ? 4 : 2;
  const int64_t rb = K / 32 * B, P = K / 64;
  const bool short_rows = rb * NR <= 2 * PF_W;
  const uint8_t* wb = w + n0 * rb;
  const __m512 eight = _mm512_set1_ps(8.f);
  const __m256i idx_d = pair_index(0, B), idx_m = pair_index(1, B);
  __m512 acc[NR][M];
  for (int r = 0; r < NR; ++r) for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    if (pf) {  // as q4_rows_bf16 does
      if (short_rows) prefetch_run(wb, p * 2 * B * NR, 2 * B * NR);
      else prefetch_rows<NR>(wb, rb, p * 2 * B, 2 * B);
    }
    __m512i wl[NR], wh[NR];
    __m512 sc[NR], mn[NR];
    for (int r = 0; r < NR; ++r) {
      const uint8_t* b0 = wb + r * rb + 2 * p * B;
      const __m256i raw = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b0 + B + OFF)),
                                           _mm_loadu_si128(reinterpret_cast<const __m128i*>(b0 + OFF)));
      const __m512i v = _mm512_cvtepu8_epi16(raw);
      wl[r] = _mm512_permutexvar_epi16(v, c.table);
      wh[r] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), c.table);
      sc[r] = f16_pair(b0, idx_d);
      mn[r] = M1 ? f16_pair(b0, idx_m) : _mm512_setzero_ps();
    }
    for (int m = 0; m < M; ++m) {
      const __m512i xl = _mm512_loadu_si512(xb[m] + 64 * p), xh = _mm512_loadu_si512(xb[m] + 64 * p + 32);
      const __m512 s8 = _mm512_loadu_ps(xs8[m] + 16 * p), s64 = _mm512_mul_ps(eight, s8);
      for (int r = 0; r < NR; ++r) {
        __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)wl[r], (__m512bh)xl);
        d = _mm512_dpbf16_ps(d, (__m512bh)wh[r], (__m512bh)xh);
        if (M1) {
          acc[r][m] = _mm512_fmadd_ps(d, sc[r], acc[r][m]);
          acc[r][m] = _mm512_fmadd_ps(mn[r], s8, acc[r][m]);
        } else {
          acc[r][m] = _mm512_fmadd_ps(_mm512_sub_ps(d, s64), sc[r], acc[r][m]);
        }
      }
    }
  }
  float s[NR * M];
  reduce_many<NR * M>(&acc[0][0], s);
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < M; ++m) y[m][n0 + r] = s[r * M + m];
}

// BQ8_0::dot's q_rows (fp32 activations) for NR rows from n0 of w and M activation rows x[m]: each
// block's int8 weights widened to fp32 once for all M rows (the widening, not memory, bounds the
// one-row kernel), then the GEMV's operations in its order per (row, activation row).
template <int NR, int M>
inline void q8_tile(const float* const* x, const uint8_t* w, int64_t K, int64_t n0, float* const* y, bool pf) {
  constexpr int64_t B = 34;
  const int64_t rb = K / 32 * B, nb = K / 32;
  const uint8_t* wb = w + n0 * rb;
  __m512 acc[NR][M];
  for (int r = 0; r < NR; ++r) for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t i = 0; i < nb; ++i) {
    if (pf) prefetch_rows<NR>(wb, rb, i * B, B);  // as q_rows does
    __m512 q0[NR], q1[NR], d[NR];
    for (int r = 0; r < NR; ++r) {
      const uint8_t* b = wb + r * rb + i * B;
      q0[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2))));
      q1[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18))));
      d[r] = _mm512_set1_ps(f16(b));
    }
    for (int m = 0; m < M; ++m) {
      const __m512 x0 = _mm512_loadu_ps(x[m] + 32 * i), x1 = _mm512_loadu_ps(x[m] + 32 * i + 16);
      for (int r = 0; r < NR; ++r)
        acc[r][m] = _mm512_fmadd_ps(_mm512_fmadd_ps(q1[r], x1, _mm512_mul_ps(q0[r], x0)), d[r], acc[r][m]);
    }
  }
  // + 0.f: q_rows adds its (zero) offset term, which turns a -0 sum into +0
  float s[NR * M];
  reduce_many<NR * M>(&acc[0][0], s);
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < M; ++m) y[m][n0 + r] = s[r * M + m] + 0.f;
}

// Rows [c0, c1) of a block matrix w ([N, row bytes] in `kind`) for M rows of prepared inputs
// (in(m): x for Q8_0 (fp32 values), xb/xs8 for Q4_0/Q4_1 in their bf16 layout) into out(m)[n - c0],
// when a tile serves this kind and input (true); else false: the caller runs each row's own kernel.
// bf16: x is bf16 values (the Q4 bf16 layout applies).
struct BlockRowsIn {
  const float* x;
  const uint16_t* xb;
  const float* xs8;
};

template <typename In, typename Out>
inline bool block_tiles(int64_t kind, int64_t K, bool bf16, int64_t M, In in, const uint8_t* w, int64_t c0, int64_t c1,
                        Out out) {
  const bool use_q8 = kind == KIND_Q8_0;
  const bool use_q4 = bf16 && (kind == KIND_Q4_0 || kind == KIND_Q4_1) && bf16_kind(kind, K);
  if (!use_q8 && !use_q4) return false;
  static const Int4Bf16Consts c;
  by_passes(M, [&](int64_t m0, auto mt) {
    constexpr int MM = decltype(mt)::value;
    const float* xf[MM];
    const uint16_t* xb[MM];
    const float* x8[MM];
    float* ys[MM];
    for (int m = 0; m < MM; ++m) {
      const BlockRowsIn r = in(m0 + m);
      xf[m] = r.x; xb[m] = r.xb; x8[m] = r.xs8; ys[m] = out(m0 + m) - c0;
    }
    const bool pf = m0 == 0;  // the first pass streams the rows from memory
    for (int64_t n = c0; n < c1; n += 2) {
      const bool two = c1 - n >= 2;
      if (use_q8) { if (two) q8_tile<2, MM>(xf, w, K, n, ys, pf); else q8_tile<1, MM>(xf, w, K, n, ys, pf); }
      else if (kind == KIND_Q4_1) { if (two) q4_tile_bf16<true, 2, MM>(c, xb, x8, w, K, n, ys, pf); else q4_tile_bf16<true, 1, MM>(c, xb, x8, w, K, n, ys, pf); }
      else { if (two) q4_tile_bf16<false, 2, MM>(c, xb, x8, w, K, n, ys, pf); else q4_tile_bf16<false, 1, MM>(c, xb, x8, w, K, n, ys, pf); }
    }
  });
  return true;
}

}  // namespace
