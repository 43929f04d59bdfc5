// GEMV row kernels over GGUF blocks as the file stores them (hetero/ops/blocks.py documents each
// layout): Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K. Shared by the per-layer GEMV (gemv_blocks.cpp) and
// the whole-stack decode step (decode_stack.cpp).
//
// Each weight is dequantised exactly (the integers are exact in fp32, the block scales are computed
// in fp32 as gguf-py does); a block's integers are dotted with x in fp32 and the dot is scaled once
// per 16 or 32 weights (the sum's rounding order differs from dequantise-then-dot, nothing else).
// The offset terms (Q4_0's -8 d, Q4_1's m, the K types' -dmin mn) use per-32 sums of x (xs).
#pragma once
#include "common.h"

namespace {

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}

inline __m512i u8x16i(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m512 cvt(__m512i v) { return _mm512_cvtepi32_ps(v); }

// 6-bit (scale, min) j of a K-type block's 12 scale bytes (llama.cpp's get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* q, int& sc, int& mn) {
  if (j < 4) { sc = q[j] & 63; mn = q[j + 4] & 63; }
  else { sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}

// One block of each type: acc += the block's weights * x (vector), off += the offset terms (scalar).
struct BQ8_0 {
  static constexpr int64_t W = 32, B = 34;
  static inline void dot(const uint8_t* b, const float* x, const float*, __m512& acc, float&) {
    const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2))));
    const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18))));
    const __m512 t = _mm512_fmadd_ps(q1, _mm512_loadu_ps(x + 16), _mm512_mul_ps(q0, _mm512_loadu_ps(x)));
    acc = _mm512_fmadd_ps(t, _mm512_set1_ps(f16(b)), acc);
  }
};

// 16 nibble bytes (byte i = q[i] | q[i+16] << 4) dotted with x[0..31].
inline __m512 nib_dot(const uint8_t* qs, const float* x) {
  const __m512i v = u8x16i(qs), lo = _mm512_set1_epi32(0xF);
  return _mm512_fmadd_ps(cvt(_mm512_srli_epi32(v, 4)), _mm512_loadu_ps(x + 16),
                         _mm512_mul_ps(cvt(_mm512_and_si512(v, lo)), _mm512_loadu_ps(x)));
}

struct BQ4_0 {
  static constexpr int64_t W = 32, B = 18;
  static inline void dot(const uint8_t* b, const float* x, const float* xs, __m512& acc, float& off) {
    const float d = f16(b);
    acc = _mm512_fmadd_ps(nib_dot(b + 2, x), _mm512_set1_ps(d), acc);
    off += -8.f * d * xs[0];
  }
};

struct BQ4_1 {
  static constexpr int64_t W = 32, B = 20;
  static inline void dot(const uint8_t* b, const float* x, const float* xs, __m512& acc, float& off) {
    acc = _mm512_fmadd_ps(nib_dot(b + 4, x), _mm512_set1_ps(f16(b)), acc);
    off += f16(b + 2) * xs[0];
  }
};

// Q4_K / Q5_K: 8 sub-blocks of 32; per 64 weights 32 nibble bytes (low: sub-block 2j, high: 2j+1).
template <bool FIFTH>
struct BK {
  static constexpr int64_t W = 256, B = FIFTH ? 176 : 144;
  static inline void dot(const uint8_t* b, const float* x, const float* xs, __m512& acc, float& off) {
    const float d = f16(b), dmin = f16(b + 2);
    const uint8_t* sc6 = b + 4;
    const uint8_t* qs = b + (FIFTH ? 48 : 16);
    const __m512i lo = _mm512_set1_epi32(0xF), one = _mm512_set1_epi32(1);
    __m512i h0 = _mm512_setzero_si512(), h1 = h0;
    if (FIFTH) { h0 = u8x16i(b + 16); h1 = u8x16i(b + 32); }
    for (int j = 0; j < 4; ++j) {
      const __m512i v0 = u8x16i(qs + 32 * j), v1 = u8x16i(qs + 32 * j + 16);
      for (int half = 0; half < 2; ++half) {
        const int s = 2 * j + half;
        __m512i a = half ? _mm512_srli_epi32(v0, 4) : _mm512_and_si512(v0, lo);
        __m512i c = half ? _mm512_srli_epi32(v1, 4) : _mm512_and_si512(v1, lo);
        if (FIFTH) {
          const __m128i sh = _mm_cvtsi32_si128(s);
          a = _mm512_or_si512(a, _mm512_slli_epi32(_mm512_and_si512(_mm512_srl_epi32(h0, sh), one), 4));
          c = _mm512_or_si512(c, _mm512_slli_epi32(_mm512_and_si512(_mm512_srl_epi32(h1, sh), one), 4));
        }
        int sc, mn;
        scale_min_k4(s, sc6, sc, mn);
        const float* xp = x + 32 * s;
        const __m512 t = _mm512_fmadd_ps(cvt(c), _mm512_loadu_ps(xp + 16), _mm512_mul_ps(cvt(a), _mm512_loadu_ps(xp)));
        acc = _mm512_fmadd_ps(t, _mm512_set1_ps(d * static_cast<float>(sc)), acc);
        off -= dmin * static_cast<float>(mn) * xs[s];
      }
    }
  }
};

// Q6_K: 16 sub-blocks of 16 with an int8 scale each; q = 6 bits - 32.
struct BQ6_K {
  static constexpr int64_t W = 256, B = 210;
  static inline void dot(const uint8_t* b, const float* x, const float*, __m512& acc, float&) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = f16(b + 208);
    const __m512i lo = _mm512_set1_epi32(0xF), three = _mm512_set1_epi32(3), k32 = _mm512_set1_epi32(32);
    for (int h = 0; h < 2; ++h) {
      const __m512i hb0 = u8x16i(qh + 32 * h), hb1 = u8x16i(qh + 32 * h + 16);
      for (int i = 0; i < 4; ++i) {
        const uint8_t* lp = ql + 64 * h + 32 * (i % 2);
        const __m512i a0 = u8x16i(lp), a1 = u8x16i(lp + 16);
        const __m128i sh = _mm_cvtsi32_si128(2 * i);
        __m512i q0 = i < 2 ? _mm512_and_si512(a0, lo) : _mm512_srli_epi32(a0, 4);
        __m512i q1 = i < 2 ? _mm512_and_si512(a1, lo) : _mm512_srli_epi32(a1, 4);
        q0 = _mm512_sub_epi32(_mm512_or_si512(q0, _mm512_slli_epi32(_mm512_and_si512(_mm512_srl_epi32(hb0, sh), three), 4)), k32);
        q1 = _mm512_sub_epi32(_mm512_or_si512(q1, _mm512_slli_epi32(_mm512_and_si512(_mm512_srl_epi32(hb1, sh), three), 4)), k32);
        const int e = 128 * h + 32 * i;
        acc = _mm512_fmadd_ps(_mm512_mul_ps(cvt(q0), _mm512_loadu_ps(x + e)), _mm512_set1_ps(d * static_cast<float>(sc[e / 16])), acc);
        acc = _mm512_fmadd_ps(_mm512_mul_ps(cvt(q1), _mm512_loadu_ps(x + e + 16)), _mm512_set1_ps(d * static_cast<float>(sc[e / 16 + 1])), acc);
      }
    }
  }
};

// NR consecutive rows from n0 (row stride rb bytes; NR rows are contiguous, so the prefetch sweeps
// them as one stream, PF_W ahead, at the rate they are read).
template <class T, int NR>
inline void q_rows(const float* x, const float* xs, const uint8_t* w, int64_t rb, int64_t K, int64_t n0, float* y) {
  const uint8_t* wb = w + n0 * rb;
  __m512 acc[NR];
  float off[NR];
  for (int r = 0; r < NR; ++r) { acc[r] = _mm512_setzero_ps(); off[r] = 0.f; }
  const int64_t nb = K / T::W;
  for (int64_t i = 0; i < nb; ++i) {
    const char* pf = reinterpret_cast<const char*>(wb) + PF_W + i * T::B * NR;
    for (int64_t o = 0; o < T::B * NR; o += 64) _mm_prefetch(pf + o, _MM_HINT_T0);
    for (int r = 0; r < NR; ++r) T::dot(wb + r * rb + i * T::B, x + i * T::W, xs + i * (T::W / 32), acc[r], off[r]);
  }
  for (int r = 0; r < NR; ++r) y[n0 + r] = _mm512_reduce_add_ps(acc[r]) + off[r];
}

template <class T>
void q_blocks_t(const float* x, const float* xs, const uint8_t* w, int64_t N, int64_t K, float* y, int64_t b0, int64_t b1) {
  const int64_t rb = K / T::W * T::B;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * ROWS;
    if (N - n0 >= ROWS) q_rows<T, ROWS>(x, xs, w, rb, K, n0, y);
    else for (int64_t n = n0; n < N; ++n) q_rows<T, 1>(x, xs, w, rb, K, n, y);
  }
}

inline bool is_block_kind(int64_t kind) { return kind >= KIND_Q8_0 && kind <= KIND_Q6_K; }

// Bytes of one row of K weights in a block kind.
inline int64_t block_row_bytes(int64_t kind, int64_t K) {
  switch (kind) {
    case KIND_Q8_0: return K / 32 * BQ8_0::B;
    case KIND_Q4_0: return K / 32 * BQ4_0::B;
    case KIND_Q4_1: return K / 32 * BQ4_1::B;
    case KIND_Q4_K: return K / 256 * BK<false>::B;
    case KIND_Q5_K: return K / 256 * BK<true>::B;
    default: return K / 256 * BQ6_K::B;
  }
}

// Rows [b0 * ROWS, b1 * ROWS) of y = W x for W [N, K] in block kind `kind`; xs: per-32 sums of x.
void q_blocks(int64_t kind, const float* x, const float* xs, const uint8_t* w, int64_t N, int64_t K, float* y,
              int64_t b0, int64_t b1) {
  switch (kind) {
    case KIND_Q8_0: q_blocks_t<BQ8_0>(x, xs, w, N, K, y, b0, b1); break;
    case KIND_Q4_0: q_blocks_t<BQ4_0>(x, xs, w, N, K, y, b0, b1); break;
    case KIND_Q4_1: q_blocks_t<BQ4_1>(x, xs, w, N, K, y, b0, b1); break;
    case KIND_Q4_K: q_blocks_t<BK<false>>(x, xs, w, N, K, y, b0, b1); break;
    case KIND_Q5_K: q_blocks_t<BK<true>>(x, xs, w, N, K, y, b0, b1); break;
    default: q_blocks_t<BQ6_K>(x, xs, w, N, K, y, b0, b1);
  }
}

}  // namespace
