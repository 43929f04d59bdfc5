// A few activation rows against a cached chunk of weight rows (the batched decode stack,
// decode_rows.cpp): each weight vector is loaded and widened (int8) or unpacked (int4) once for up
// to MT activation rows, and every (weight row, activation row) accumulator sees exactly the
// operations, in the same order, of its one-token row kernel (rows.h): the same bits per row.
#pragma once
#include "common.h"
#include "rows.h"
#include "blocks.h"

namespace {

constexpr int MT = 4;  // activation rows per pass

// int8_rows for NR weight rows from n0 and M activation rows x[m] (K floats) -> y[m][n].
template <int NR, int M>
inline void int8_tile(const float* const* x, const int8_t* qp, const float* sp, int64_t K, int64_t n0, float* const* y) {
  const int8_t* wb = qp + n0 * K;
  __m512 acc[NR][M];
  for (int r = 0; r < NR; ++r) for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 w[NR];
    for (int r = 0; r < NR; ++r) w[r] = i8x16_to_f32(wb + r * K + k);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x[m] + k);
      for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(w[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < M; ++m) y[m][n0 + r] = _mm512_reduce_add_ps(acc[r][m]) * sp[n0 + r];
}

// int4_rows_bf16 (even group count) for NR weight rows from n0 and M activation rows, given each
// row's int4_prep_bf16 layout (xb[m], xs8[m]) -> y[m][n].
template <int NR, int M>
BF16_TARGET inline void int4_tile_bf16(const Int4Bf16Consts& c, const uint16_t* const* xb, const float* const* xs8,
                                       const uint8_t* pp, const uint16_t* smp, int64_t K, int64_t n0, float* const* y) {
  const int64_t G = K / 32, P = G / 2, row = K / 2;
  const __mmask32 odd = 0xAAAAAAAAu;
  const __m512 eight = _mm512_set1_ps(8.f);
  const uint8_t* wb = pp + n0 * row;
  const uint16_t* sb = smp + n0 * G * 2;
  __m512 acc[NR][M];
  for (int r = 0; r < NR; ++r) for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
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
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < M; ++m) y[m][n0 + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// Activation rows [0, M) in passes of MT: pass(m0, integral_constant<mt>).
template <typename Pass>
void by_passes(int64_t M, Pass pass) {
  for (int64_t m0 = 0; m0 < M; m0 += MT) {
    switch (std::min<int64_t>(MT, M - m0)) {
      case 1: pass(m0, std::integral_constant<int, 1>()); break;
      case 2: pass(m0, std::integral_constant<int, 2>()); break;
      case 3: pass(m0, std::integral_constant<int, 3>()); break;
      default: pass(m0, std::integral_constant<int, 4>()); break;
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
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < M; ++m) y[m][n0 + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// q4_rows_bf16 (Q4_0: M1 false, Q4_1: true; K % 64 == 0) for NR rows from n0 of w and M rows of
// block_prep_bf16's inputs; `end`: the matrix's last byte + 1 (the pair loads stop there).
template <bool M1, int NR, int M>
BF16_TARGET inline void q4_tile_bf16(const Int4Bf16Consts& c, const Q4PairConsts<M1>& pc, const uint16_t* const* xb,
                                     const float* const* xs8, const uint8_t* w, int64_t K, int64_t n0, float* const* y,
                                     const uint8_t* end) {
  constexpr int64_t B = M1 ? 20 : 18;
  constexpr __mmask64 pair = (1ULL << (2 * B)) - 1;
  const int64_t rb = K / 32 * B, P = K / 64;
  const uint8_t* wb = w + n0 * rb;
  const __m512 eight = _mm512_set1_ps(8.f);
  __m512 acc[NR][M];
  for (int r = 0; r < NR; ++r) for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512i wl[NR], wh[NR];
    __m512 sc[NR], mn[NR];
    for (int r = 0; r < NR; ++r) {
      const uint8_t* b0 = wb + r * rb + 2 * p * B;
      const __m512i raw = b0 + 64 <= end ? _mm512_loadu_si512(b0) : _mm512_maskz_loadu_epi8(pair, b0);
      const __m512i v = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(_mm512_permutexvar_epi16(pc.nib, raw)));
      wl[r] = _mm512_permutexvar_epi16(v, c.table);
      wh[r] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), c.table);
      const __m512i sm = _mm512_permutexvar_epi16(pc.scl, raw);
      sc[r] = _mm512_cvtph_ps(_mm512_castsi512_si256(sm));
      mn[r] = M1 ? _mm512_cvtph_ps(_mm512_extracti64x4_epi64(sm, 1)) : _mm512_setzero_ps();
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
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < M; ++m) y[m][n0 + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// q8_rows_int16 for NR rows from n0 of w and M rows of q8_prep_int16's inputs.
template <int NR, int M>
VNNI_TARGET inline void q8_tile_int16(const int16_t* const* xq, const float* const* dx16, const uint8_t* w, int64_t K,
                                      int64_t n0, float* const* y) {
  constexpr int64_t B = 34;
  const int64_t rb = K / 32 * B, P = K / 64;
  const uint8_t* wb = w + n0 * rb;
  const __m512i idx_d = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                         17, 17, 17, 17, 17, 17, 17, 17, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[NR][M];
  for (int r = 0; r < NR; ++r) for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512i w0[NR], w1[NR];
    __m512 dw[NR];
    for (int r = 0; r < NR; ++r) {
      const uint8_t* b0 = wb + r * rb + 2 * p * B;
      w0[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + 2)));
      w1[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + B + 2)));
      dw[r] = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(idx_d, _mm512_loadu_si512(b0))));
    }
    for (int m = 0; m < M; ++m) {
      const __m512i x0 = _mm512_loadu_si512(xq[m] + 64 * p), x1 = _mm512_loadu_si512(xq[m] + 64 * p + 32);
      const __m512 dx = _mm512_loadu_ps(dx16[m] + 16 * p);
      for (int r = 0; r < NR; ++r) {
        const __m512i s0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0[r], x0);
        const __m512i s1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w1[r], x1);
        const __m512i s = _mm512_add_epi32(_mm512_shuffle_i64x2(s0, s1, _MM_SHUFFLE(1, 0, 1, 0)),
                                           _mm512_shuffle_i64x2(s0, s1, _MM_SHUFFLE(3, 2, 3, 2)));
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw[r], dx), acc[r][m]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < M; ++m) y[m][n0 + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// Rows [c0, c1) of a block matrix w ([N, row bytes] in `kind`) for M rows of prepared inputs
// (in(m): xb/xs8 for Q4_0/Q4_1 in their bf16 layout, xq/dx16 for Q8_0 as int16) into out(m)[n - c0],
// when a tile serves this kind and input (true); else false: the caller runs each row's own kernel.
// q8: x is bf16 values held as Q8_0's int16 codes; bf16: x is bf16 values (the Q4 bf16 layout).
struct BlockRowsIn {
  const uint16_t* xb;
  const float* xs8;
  const int16_t* xq;
  const float* dx16;
};

template <typename In, typename Out>
inline bool block_tiles(int64_t kind, int64_t K, bool q8, bool bf16, int64_t M, In in, const uint8_t* w, int64_t N, int64_t c0,
                        int64_t c1, Out out) {
  const bool use_q8 = q8 && q8_int16(kind, K);
  const bool use_q4 = !use_q8 && bf16 && (kind == KIND_Q4_0 || kind == KIND_Q4_1) && bf16_kind(kind, K);
  if (!use_q8 && !use_q4) return false;
  static const Int4Bf16Consts c;
  static const Q4PairConsts<true> p41;
  static const Q4PairConsts<false> p40;
  const uint8_t* end = w + N * block_row_bytes(kind, K);
  by_passes(M, [&](int64_t m0, auto mt) {
    constexpr int MM = decltype(mt)::value;
    const uint16_t* xb[MM];
    const float* x8[MM];
    const int16_t* xq[MM];
    const float* dx[MM];
    float* ys[MM];
    for (int m = 0; m < MM; ++m) {
      const BlockRowsIn r = in(m0 + m);
      xb[m] = r.xb; x8[m] = r.xs8; xq[m] = r.xq; dx[m] = r.dx16; ys[m] = out(m0 + m) - c0;
    }
    for (int64_t n = c0; n < c1; n += 2) {
      const bool two = c1 - n >= 2;
      if (use_q8) { if (two) q8_tile_int16<2, MM>(xq, dx, w, K, n, ys); else q8_tile_int16<1, MM>(xq, dx, w, K, n, ys); }
      else if (kind == KIND_Q4_1) { if (two) q4_tile_bf16<true, 2, MM>(c, p41, xb, x8, w, K, n, ys, end); else q4_tile_bf16<true, 1, MM>(c, p41, xb, x8, w, K, n, ys, end); }
      else { if (two) q4_tile_bf16<false, 2, MM>(c, p40, xb, x8, w, K, n, ys, end); else q4_tile_bf16<false, 1, MM>(c, p40, xb, x8, w, K, n, ys, end); }
    }
  });
  return true;
}

}  // namespace
