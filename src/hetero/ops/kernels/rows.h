// The GEMV row kernels: y rows from W rows (fp32, bf16, int8 per channel, int4 group-wise), shared by
// the per-layer GEMVs (gemv.cpp) and the whole-stack decode step (decode_stack.cpp).
// Each reads W [N, K] row-major once, ROWS rows at a time.
#pragma once
#include "common.h"

namespace {

// Row loader: converts 16 weights of row r at column k to fp32. Rows [b0 * ROWS, b1 * ROWS) of y.
template <typename Load>
void gemv_blocks(const float* x, int64_t N, int64_t K, float* y, int64_t b0, int64_t b1, Load load) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * ROWS, nr = std::min(ROWS, N - n0);
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
      for (int r = 0; r < nr; ++r) acc[r] = _mm512_fmadd_ps(load(n0 + r, k), xv, acc[r]);
    }
    for (int r = 0; r < nr; ++r) y[n0 + r] = _mm512_reduce_add_ps(acc[r]);
  }
}

template <typename Load>
void gemv_rows(const float* x, int64_t N, int64_t K, float* y, Load load) {
  at::parallel_for(0, (N + ROWS - 1) / ROWS, 16, [&](int64_t b0, int64_t b1) { gemv_blocks(x, N, K, y, b0, b1, load); });
}

// Per-group sums of x (the int4 kernels' min term): xs[g] = sum of x[32g .. 32g + 31].
void group_sums(const float* x, int64_t G, float* xs) {
  for (int64_t g = 0; g < G; ++g)
    xs[g] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(x + g * 32), _mm512_loadu_ps(x + g * 32 + 16)));
}

// Int4 with AVX512-BF16 dot products (vdpbf16ps: 32 bf16 products summed pairwise into 16 fp32 lanes per
// instruction), for activations that are bf16 values: the weights' nibbles become exact bf16 0..15
// through a table lookup, the products are exact in fp32, so the result differs from the fp32 kernel
// (int4_blocks) only in summation order. ~3x fewer instructions per weight than widening to fp32.
//
// x (K floats, each a bf16 value; K % 32 == 0) prepared for int4_blocks_bf16, per pair of groups p:
// xb[64p ..] = bf16 of x[64p + 0..15], x[64p + 32..47] (low nibbles), x[64p + 16..31], x[64p + 48..63]
// (high); xs8[16p ..] = group sums / 8 (lanes 0-7 group 2p, 8-15 group 2p+1; 8 lanes sum to one).
// An odd last group is left to the fp32 kernel: xs holds every group's sum.
void int4_prep_bf16(const float* x, int64_t K, uint16_t* xb, float* xs8, float* xs) {
  const int64_t G = K / 32;
  group_sums(x, G, xs);
  auto bits = [](float v) { uint32_t u; std::memcpy(&u, &v, 4); return static_cast<uint16_t>(u >> 16); };
  for (int64_t p = 0; p < G / 2; ++p) {
    for (int i = 0; i < 16; ++i) {
      xb[64 * p + i] = bits(x[64 * p + i]);
      xb[64 * p + 16 + i] = bits(x[64 * p + 32 + i]);
      xb[64 * p + 32 + i] = bits(x[64 * p + 16 + i]);
      xb[64 * p + 48 + i] = bits(x[64 * p + 48 + i]);
    }
    for (int i = 0; i < 8; ++i) { xs8[16 * p + i] = xs[2 * p] / 8.f; xs8[16 * p + 8 + i] = xs[2 * p + 1] / 8.f; }
  }
}

struct Int4Bf16Consts {
  __m512i table, idx_s, idx_z;
  BF16_TARGET Int4Bf16Consts() {
    // word i -> bf16(i & 15): a byte's low nibble indexes it directly (vpermw reads 5 index bits).
    alignas(64) uint16_t tab[32], is[32], iz[32];
    for (int i = 0; i < 32; ++i) { const float v = static_cast<float>(i & 15); uint32_t u; std::memcpy(&u, &v, 4); tab[i] = u >> 16; }
    // (scale, zero) of groups 2p, 2p+1 (4 bf16 words) -> fp32 lanes 0-7 / 8-15 (bf16 in a dword's high half).
    for (int l = 0; l < 16; ++l) { is[2 * l] = iz[2 * l] = 0; is[2 * l + 1] = l < 8 ? 0 : 2; iz[2 * l + 1] = l < 8 ? 1 : 3; }
    table = _mm512_load_si512(tab);
    idx_s = _mm512_load_si512(is);
    idx_z = _mm512_load_si512(iz);
  }
};

// NR consecutive rows from n0 (their bytes and scales are contiguous): y[n0 ..] = the rows' products.
template <int NR>
BF16_TARGET inline void int4_rows_bf16(const Int4Bf16Consts& c, const uint16_t* xb, const float* xs8, const float* x,
                                       const float* xs, const uint8_t* pp, const uint16_t* smp, int64_t K,
                                       int64_t n0, float* yp) {
  const int64_t G = K / 32, P = G / 2, row = K / 2;
  const __mmask32 odd = 0xAAAAAAAAu;
  const __m512 eight = _mm512_set1_ps(8.f);
  const uint8_t* wb = pp + n0 * row;
  const uint16_t* sb = smp + n0 * G * 2;
  __m512 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    _mm_prefetch(reinterpret_cast<const char*>(wb) + PF_W + p * 32 * NR, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb) + PF_W + p * 32 * NR + 64, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(sb) + PF_S + p * 8 * NR, _MM_HINT_T0);
    const __m512i xl = _mm512_loadu_si512(xb + 64 * p), xh = _mm512_loadu_si512(xb + 64 * p + 32);
    const __m512 s8 = _mm512_loadu_ps(xs8 + 16 * p);
    for (int r = 0; r < NR; ++r) {
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + r * row + 32 * p)));
      const __m512i wl = _mm512_permutexvar_epi16(v, c.table);
      const __m512i wh = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), c.table);
      __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)wl, (__m512bh)xl);
      d = _mm512_dpbf16_ps(d, (__m512bh)wh, (__m512bh)xh);
      const __m512i sz = _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sb + (r * G + 2 * p) * 2)));
      const __m512 sc = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(odd, c.idx_s, sz));
      const __m512 zr = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(odd, c.idx_z, sz));
      acc[r] = _mm512_fmadd_ps(d, sc, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_fnmadd_ps(eight, sc, zr), s8, acc[r]);  // (zero - 8 scale) * sum / 8
    }
  }
  for (int r = 0; r < NR; ++r) yp[n0 + r] = _mm512_reduce_add_ps(acc[r]);
  if (G % 2) {  // the odd last group, as the fp32 kernel does it
    const int64_t g = G - 1;
    const __m512 xl = _mm512_loadu_ps(x + g * 32), xh = _mm512_loadu_ps(x + g * 32 + 16);
    const __m512i lo_mask = _mm512_set1_epi32(0xF);
    for (int r = 0; r < NR; ++r) {
      __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + r * row + g * 16)));
      __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), xh,
                                 _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, lo_mask)), xl));
      const uint16_t* sp = sb + (r * G + g) * 2;
      const float sc = bf16_to_f32(sp[0]);
      yp[n0 + r] += sc * _mm512_reduce_add_ps(t) + (bf16_to_f32(sp[1]) - 8.f * sc) * xs[g];
    }
  }
}

BF16_TARGET void int4_blocks_bf16(const uint16_t* xb, const float* xs8, const float* x, const float* xs,
                                  const uint8_t* pp, const uint16_t* smp, int64_t N, int64_t K, float* yp,
                                  int64_t b0, int64_t b1) {
  static const Int4Bf16Consts c;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * ROWS;
    if (N - n0 >= ROWS) int4_rows_bf16<ROWS>(c, xb, xs8, x, xs, pp, smp, K, n0, yp);
    else for (int64_t n = n0; n < N; ++n) int4_rows_bf16<1>(c, xb, xs8, x, xs, pp, smp, K, n, yp);
  }
}

// Int8 per output channel: y[n] = scale[n] * sum_k q[n,k] x[k], NR consecutive rows from n0 (their bytes
// are contiguous: NR * K), fp32 products. The rows' bytes are prefetched PF_W ahead, one cache line per
// 16 columns of NR = 4 rows, so the prefetch sweeps the block's bytes at the rate they are read: without
// it a decode GEMV streamed int8 weights at ~12 GB/s where int4 (prefetched) reached ~27.
template <int NR>
inline void int8_rows(const float* x, const int8_t* qp, const float* sp, int64_t K, int64_t n0, float* y) {
  const int8_t* wb = qp + n0 * K;
  __m512 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(wb) + PF_W + k * NR, _MM_HINT_T0);
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_fmadd_ps(i8x16_to_f32(wb + r * K + k), xv, acc[r]);
  }
  for (int r = 0; r < NR; ++r) y[n0 + r] = _mm512_reduce_add_ps(acc[r]) * sp[n0 + r];
}

// Int8 rows [b0 * ROWS, b1 * ROWS) of y (N rows in all, K % 16 == 0).
void int8_blocks(const float* x, const int8_t* qp, const float* sp, int64_t N, int64_t K, float* y, int64_t b0,
                 int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * ROWS;
    if (N - n0 >= ROWS) int8_rows<ROWS>(x, qp, sp, K, n0, y);
    else for (int64_t n = n0; n < N; ++n) int8_rows<1>(x, qp, sp, K, n, y);
  }
}

// Int4 rows [b0 * ROWS, b1 * ROWS) of y; layout and convention: see gemv_int4 (gemv.cpp).
void int4_blocks(const float* xp, const float* xs, const uint8_t* pp, const uint16_t* smp, int64_t N, int64_t K,
                 float* yp, int64_t b0, int64_t b1) {
  const int64_t G = K / 32;
  const __m512i lo_mask = _mm512_set1_epi32(0xF);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * ROWS, nr = std::min(ROWS, N - n0);
    __m512 acc[ROWS];
    float mins[ROWS];
    for (int r = 0; r < ROWS; ++r) { acc[r] = _mm512_setzero_ps(); mins[r] = 0.f; }
    for (int64_t g = 0; g < G; ++g) {
      const __m512 xl = _mm512_loadu_ps(xp + g * 32), xh = _mm512_loadu_ps(xp + g * 32 + 16);
      for (int r = 0; r < nr; ++r) {
        const int64_t n = n0 + r;
        __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pp + n * (K / 2) + g * 16));
        __m512i v = _mm512_cvtepu8_epi32(raw);
        __m512 ql = _mm512_cvtepi32_ps(_mm512_and_si512(v, lo_mask));
        __m512 qh = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
        __m512 t = _mm512_fmadd_ps(qh, xh, _mm512_mul_ps(ql, xl));
        const uint16_t* s = smp + (n * G + g) * 2;
        const float sc = bf16_to_f32(s[0]);
        acc[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(sc), acc[r]);
        mins[r] += (bf16_to_f32(s[1]) - 8.f * sc) * xs[g];
      }
    }
    for (int r = 0; r < nr; ++r) yp[n0 + r] = _mm512_reduce_add_ps(acc[r]) + mins[r];
  }
}

}  // namespace
