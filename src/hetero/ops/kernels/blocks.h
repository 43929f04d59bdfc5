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
#include "rows.h"

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

// Each of NR rows (stride rb bytes, from wb) is read as its own stream, `len` bytes a step from byte
// `off` of the row: each row's bytes PF_R ahead are prefetched, past the row's end in the same row
// of the next NR rows (read after these). One stream over the NR rows' bytes PF_W ahead, as
// before, ran behind rows 1..NR-1 of a long row: Q6_K [2048, 5632] streamed at 7 GB/s, 19 at K 2048.
template <int NR>
inline void prefetch_rows(const uint8_t* wb, int64_t rb, int64_t off, int64_t len) {
  int64_t o = off + PF_R, g = 0;
  while (o >= rb) { o -= rb; ++g; }   // PF_R is a few rows at most
  const char* p = reinterpret_cast<const char*>(wb) + g * NR * rb + o;
  for (int r = 0; r < NR; ++r)
    for (int64_t l = 0; l < len; l += 64) _mm_prefetch(p + r * rb + l, _MM_HINT_T0);
}

// NR consecutive rows from n0 (row stride rb bytes).
template <class T, int NR>
inline void q_rows(const float* x, const float* xs, const uint8_t* w, int64_t rb, int64_t K, int64_t n0, float* y) {
  const uint8_t* wb = w + n0 * rb;
  __m512 acc[NR];
  float off[NR];
  for (int r = 0; r < NR; ++r) { acc[r] = _mm512_setzero_ps(); off[r] = 0.f; }
  const int64_t nb = K / T::W;
  for (int64_t i = 0; i < nb; ++i) {
    prefetch_rows<NR>(wb, rb, i * T::B, T::B);
    for (int r = 0; r < NR; ++r) T::dot(wb + r * rb + i * T::B, x + i * T::W, xs + i * (T::W / 32), acc[r], off[r]);
  }
  for (int r = 0; r < NR; ++r) y[n0 + r] = _mm512_reduce_add_ps(acc[r]) + off[r];
}

// Whether a GEMV reads its rows one at a time, in memory order (x_bytes: the bytes of x each row
// reads). Then a thread's share of W is one linear stream, which this CPU's prefetchers follow at
// the memory rate; four rows side by side are four streams and ran at about half of it (Q8_0
// [5632, 2048], 2 threads: 17 -> 28-33 GB/s beside a 33 GB/s read rate). Rows go in fours only when
// x is too big to stay in L1 beside the stream, so it is loaded once for four rows (fp32 x of 5632:
// one by one ran at 19 GB/s, in fours 22-26). A row's sums are the same either way, bit for bit.
inline bool rows_one_by_one(int64_t x_bytes) { return x_bytes <= 16384; }

template <class T>
void q_blocks_t(const float* x, const float* xs, const uint8_t* w, int64_t N, int64_t K, float* y, int64_t b0, int64_t b1) {
  const int64_t rb = K / T::W * T::B;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * ROWS;
    if (N - n0 >= ROWS && !rows_one_by_one(K * 4)) q_rows<T, ROWS>(x, xs, w, rb, K, n0, y);
    else for (int64_t n = n0; n < std::min(N, n0 + ROWS); ++n) q_rows<T, 1>(x, xs, w, rb, K, n, y);
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


// ---- bf16 activations: AVX512-BF16 dot products (as int4_rows_bf16 in rows.h) -------------------
// The nibbles become exact bf16 0..15 through a table, x is bf16 already, each product is exact in
// fp32: the result differs from the fp32 kernel only in summation order. Q4_0/Q4_1 (K % 64 == 0) read
// x in int4_prep_bf16's layout (their nibble order is the int4 rows layout's); Q4_K, Q5_K and Q6_K read x
// as plain bf16 (a 32-byte run of Q4_K nibbles is one sub-block in the low nibbles, the next in the high).

inline bool bf16_kind(int64_t kind, int64_t K) {
  return cpu_has_bf16() && ((kind == KIND_Q4_0 || kind == KIND_Q4_1) ? K % 64 == 0 : (kind == KIND_Q4_K || kind == KIND_Q5_K || kind == KIND_Q6_K));
}

// x (K fp32 values that are bf16 values) as bf16 bits.
inline void bf16_bits(const float* x, int64_t K, uint16_t* xb) {
  for (int64_t k = 0; k < K; ++k) { uint32_t u; std::memcpy(&u, x + k, 4); xb[k] = static_cast<uint16_t>(u >> 16); }
}

// The bf16 inputs of a bf16_kind GEMV: xb (K), xs8 (K / 4), xs (K / 32) from x (K fp32 bf16 values).
inline void block_prep_bf16(int64_t kind, const float* x, int64_t K, uint16_t* xb, float* xs8, float* xs) {
  if (kind == KIND_Q4_0 || kind == KIND_Q4_1) { int4_prep_bf16(x, K, xb, xs8, xs); return; }
  group_sums(x, K / 32, xs);
  bf16_bits(x, K, xb);
}

// fp16 words w and w + B/2 of the 32 bytes at p (one field of two consecutive B-byte blocks) as
// fp32 in lanes 0-7 / 8-15, the permute's index from pair_index(w, B): one load and one permute.
BF16_TARGET inline __m512 f16_pair(const uint8_t* p, __m256i idx) {
  return _mm512_cvtph_ps(_mm256_permutexvar_epi16(idx, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}

BF16_TARGET inline __m256i pair_index(int w, int B) {
  return _mm256_set_epi16(w + B / 2, w + B / 2, w + B / 2, w + B / 2, w + B / 2, w + B / 2, w + B / 2, w + B / 2,
                          w, w, w, w, w, w, w, w);
}

// Q4_0 (M1 = false) / Q4_1 (true): NR consecutive rows from n0, two blocks per step.
template <bool M1, int NR>
BF16_TARGET inline void q4_rows_bf16(const Int4Bf16Consts& c, const uint16_t* xb, const float* xs8, const uint8_t* w,
                                     int64_t K, int64_t n0, float* y) {
  constexpr int64_t B = M1 ? 20 : 18, OFF = M1 ? 4 : 2;
  const int64_t rb = K / 32 * B, P = K / 64;
  const uint8_t* wb = w + n0 * rb;
  const bool short_rows = rb * NR <= 2 * PF_W;
  const __m512 eight = _mm512_set1_ps(8.f);
  const __m256i idx_d = pair_index(0, B), idx_m = pair_index(1, B);
  __m512 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    // short rows (SmolLM2's 576 wide: 360 bytes) make the NR rows one short run, read best as one
    // stream PF_W ahead (the built-in model's decode stack: 3.0 -> 2.0 ms a step); long rows as NR streams
    if (short_rows) {
      const char* q = reinterpret_cast<const char*>(wb) + PF_W + p * 2 * B * NR;
      for (int64_t l = 0; l < 2 * B * NR; l += 64) _mm_prefetch(q + l, _MM_HINT_T0);
    } else {
      prefetch_rows<NR>(wb, rb, p * 2 * B, 2 * B);
    }
    const __m512i xl = _mm512_loadu_si512(xb + 64 * p), xh = _mm512_loadu_si512(xb + 64 * p + 32);
    const __m512 s8 = _mm512_loadu_ps(xs8 + 16 * p), s64 = _mm512_mul_ps(eight, s8);
    for (int r = 0; r < NR; ++r) {
      const uint8_t* b0 = wb + r * rb + 2 * p * B;
      const uint8_t* b1 = b0 + B;
      const __m256i raw = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b1 + OFF)),
                                           _mm_loadu_si128(reinterpret_cast<const __m128i*>(b0 + OFF)));
      const __m512i v = _mm512_cvtepu8_epi16(raw);
      const __m512i wl = _mm512_permutexvar_epi16(v, c.table);
      const __m512i wh = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), c.table);
      __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)wl, (__m512bh)xl);
      d = _mm512_dpbf16_ps(d, (__m512bh)wh, (__m512bh)xh);
      const __m512 sc = f16_pair(b0, idx_d);
      if (M1) {
        acc[r] = _mm512_fmadd_ps(d, sc, acc[r]);
        acc[r] = _mm512_fmadd_ps(f16_pair(b0, idx_m), s8, acc[r]);   // m * sum
      } else {
        acc[r] = _mm512_fmadd_ps(_mm512_sub_ps(d, s64), sc, acc[r]);    // d (dot - 8 sum)
      }
    }
  }
  for (int r = 0; r < NR; ++r) y[n0 + r] = _mm512_reduce_add_ps(acc[r]);
}

// The 8 scales and 8 mins of a K-type block's 12 scale bytes, bytes 0-7 / 8-15 of the result
// (llama.cpp's uint32 unpacking of get_scale_min_k4, in SIMD: no trip through general registers).
inline __m128i scales_mins_simd(const uint8_t* q) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));   // u0, u1, u2 (+4 bytes unused)
  const __m128i a = _mm_srlv_epi32(_mm_shuffle_epi32(v, _MM_SHUFFLE(2, 1, 2, 0)), _mm_set_epi32(4, 0, 0, 0));
  const __m128i top = _mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(v, _MM_SHUFFLE(1, 1, 0, 0)), 2), _mm_set1_epi32(0x30303030));
  return _mm_blend_epi32(_mm_and_si128(a, _mm_set1_epi32(0x3f3f3f3f)),
                         _mm_ternarylogic_epi32(a, _mm_set1_epi32(0x0f0f0f0f), top, 0xEA), 0b1010);  // (a & 15) | top
}

// Q5_K: 32 bytes of nibbles are sub-blocks 2j (low) and 2j+1 (high); the fifth bits (qh byte l, bit
// s: weight l of sub-block s) are shifted to bit 4 of each word and merged in with one bit-select;
// vpermw reads 5 index bits, so the table holds bf16(0 .. 31). (Q4_K has its own kernel below.)
BF16_TARGET inline __m512i q5_word_index(__m512i nib, __m512i qhw, int s) {
  const __m512i sh = s < 4 ? _mm512_slli_epi16(qhw, 4 - s) : _mm512_srli_epi16(qhw, s - 4);
  return _mm512_ternarylogic_epi32(_mm512_set1_epi16(0xF), nib, sh, 0xCA);  // (nib & 15) | (sh & ~15)
}

struct Q5Bf16Consts {
  __m512i table;
  BF16_TARGET Q5Bf16Consts() {
    alignas(64) uint16_t tab[32];
    for (int i = 0; i < 32; ++i) { const float v = static_cast<float>(i); uint32_t u; std::memcpy(&u, &v, 4); tab[i] = u >> 16; }
    table = _mm512_load_si512(tab);
  }
};

template <int NR>
BF16_TARGET inline void q5k_rows_bf16(__m512i table, const uint16_t* xb, const float* xs, const uint8_t* w,
                                      int64_t K, int64_t n0, float* y) {
  constexpr int64_t B = 176, QS = 48;
  const int64_t rb = K / 256 * B, nb = K / 256;
  const uint8_t* wb = w + n0 * rb;
  // two sums per row, sub-block pairs j even / odd: one sum took 8 dependent FMAs a block, and a
  // row read alone (rows_one_by_one) waited on them
  __m512 acc[2][NR];
  __m256 off[NR];   // dmin * mn * (sum of the sub-block's x), 8 sub-blocks in 8 lanes
  for (int r = 0; r < NR; ++r) { acc[0][r] = acc[1][r] = _mm512_setzero_ps(); off[r] = _mm256_setzero_ps(); }
  alignas(32) float sc[NR][8];
  for (int64_t i = 0; i < nb; ++i) {
    prefetch_rows<NR>(wb, rb, i * B, B);
    const __m256 xs8 = _mm256_loadu_ps(xs + 8 * i);
    for (int r = 0; r < NR; ++r) {  // the rows' scales first, so x is loaded once for all rows
      const uint8_t* b = wb + r * rb + i * B;
      const __m128i smv = scales_mins_simd(b + 4);
      _mm256_store_ps(sc[r], _mm256_mul_ps(_mm256_set1_ps(f16(b)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(smv))));
      const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(smv, 8)));
      off[r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(f16(b + 2)), mn), xs8, off[r]);
    }
    for (int j = 0; j < 4; ++j) {
      const uint16_t* xp = xb + 256 * i + 64 * j;
      const __m512i xl = _mm512_loadu_si512(xp), xh = _mm512_loadu_si512(xp + 32);
      for (int r = 0; r < NR; ++r) {
        const uint8_t* b = wb + r * rb + i * B;
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + QS + 32 * j)));
        const __m512i qhw = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16)));
        const __m512i wl = _mm512_permutexvar_epi16(q5_word_index(v, qhw, 2 * j), table);
        const __m512i wh = _mm512_permutexvar_epi16(q5_word_index(_mm512_srli_epi16(v, 4), qhw, 2 * j + 1), table);
        const __m512 d0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)wl, (__m512bh)xl);
        const __m512 d1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)wh, (__m512bh)xh);
        const __m512 t = _mm512_fmadd_ps(d1, _mm512_set1_ps(sc[r][2 * j + 1]), _mm512_mul_ps(d0, _mm512_set1_ps(sc[r][2 * j])));
        acc[j & 1][r] = _mm512_add_ps(acc[j & 1][r], t);
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    const __m256 o = off[r];
    alignas(32) float t[8];
    _mm256_store_ps(t, o);
    float s = 0.f;
    for (float v : t) s += v;
    y[n0 + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r])) - s;
  }
}

// Q6_K: a 32-weight group's 6-bit values built in 16-bit words and mapped to exact bf16 (q - 32)
// by a 64-entry table (vpermt2w); x plain bf16; the two 16-weight sub-blocks' scales fill lanes
// 0-7 / 8-15 (dot products sum word pairs into dwords: lanes 0-7 are the group's first 16 weights).
struct Q6Bf16Consts {
  __m512i lo, hi, pair;   // pair: dword lanes 0-7 -> 0, 8-15 -> 1
  BF16_TARGET Q6Bf16Consts() {
    pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    alignas(64) uint16_t tab[64];
    for (int i = 0; i < 64; ++i) { const float v = static_cast<float>(i - 32); uint32_t u; std::memcpy(&u, &v, 4); tab[i] = u >> 16; }
    lo = _mm512_load_si512(tab);
    hi = _mm512_load_si512(tab + 32);
  }
};

template <int NR>
BF16_TARGET inline void q6k_rows_bf16(const Q6Bf16Consts& c, const uint16_t* xb, const uint8_t* w, int64_t K,
                                      int64_t n0, float* y) {
  constexpr int64_t B = 210;
  const int64_t rb = K / 256 * B, nb = K / 256;
  const uint8_t* wb = w + n0 * rb;
  const __m512i m15 = _mm512_set1_epi16(0xF);
  __m512 acc[2][NR];   // groups 0-1 / 2-3 of each half: two short chains a row, as in q5k_rows_bf16
  for (int r = 0; r < NR; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < nb; ++i) {
    prefetch_rows<NR>(wb, rb, i * B, B);
    for (int r = 0; r < NR; ++r) {
      const uint8_t* b = wb + r * rb + i * B;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      const __m512 d = _mm512_set1_ps(f16(b + 208));
      // the 16 sub-block scales as fp32 (d * sc, as gguf-py computes them)
      const __m512 s16 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)))));
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m512i qh = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h)));
        const __m512i l0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h)));
        const __m512i l1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + 32)));
        // group g: nibbles (low of l0, low of l1, high of l0, high of l1) in bits 0-3, qh bits 2g, 2g+1
        // moved to bits 4-5 and merged by one bit-select; vpermt2w reads 6 index bits (the rest
        // do not matter) from the 64-entry table of bf16(q - 32)
        const __m512i q[4] = {_mm512_ternarylogic_epi32(m15, l0, _mm512_slli_epi16(qh, 4), 0xCA),
                              _mm512_ternarylogic_epi32(m15, l1, _mm512_slli_epi16(qh, 2), 0xCA),
                              _mm512_ternarylogic_epi32(m15, _mm512_srli_epi16(l0, 4), qh, 0xCA),
                              _mm512_ternarylogic_epi32(m15, _mm512_srli_epi16(l1, 4), _mm512_srli_epi16(qh, 2), 0xCA)};
        __m512 part[4];
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) {
          const __m512i wv = _mm512_permutex2var_epi16(c.lo, q[g], c.hi);
          const int e = 128 * h + 32 * g;
          part[g] = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)wv, (__m512bh)_mm512_loadu_si512(xb + 256 * i + e));
          // scales of sub-blocks e/16 (lanes 0-7) and e/16 + 1 (lanes 8-15)
          const __m512 scv = _mm512_permutexvar_ps(_mm512_add_epi32(c.pair, _mm512_set1_epi32(e / 16)), s16);
          part[g] = g % 2 ? _mm512_fmadd_ps(part[g], scv, part[g - 1]) : _mm512_mul_ps(part[g], scv);
        }
        acc[0][r] = _mm512_add_ps(acc[0][r], part[1]);
        acc[1][r] = _mm512_add_ps(acc[1][r], part[3]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) y[n0 + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]));
}

// ---- Q4_K on bf16 x, 128 weights a step -------------------------------------------------------
// 64 bytes of nibbles (runs j, j+1 of 32 bytes) load as one zmm of 32 words; the four nibbles of
// each word (even byte low/high, odd byte low/high) become four bf16 vectors with one shift and one
// bit-select each: bits 0x4300 | q are exactly 128 + q, and each product starts from -128 times its
// lane's x (k4_x_bias). Their weights are x's in a fixed interleaved order (k4_x_order), so x is permuted
// once per call and each pair of words a dot product sums stays in one sub-block: lanes 0-7 of a
// product are sub-block 2j (+1 for the high nibbles), lanes 8-15 sub-block 2j+2 (+1). Two products
// share a scale vector, so a block costs 4 scale FMAs, not the 16 broadcast multiply-adds of
// q5k_rows_bf16's loop.
// A standalone copy of the two loops, 256 rows of K 2048 in L2, one thread: 10.3-12.1 -> 13.3-17.5 GB/s;
// streamed from memory at 2 threads the gain is ~5-10% (docs/BENCHMARKS.md).

// Word w of x's 128-word chunk c (c = 0, 1 of a 256-block) in the order the kernel's four vectors
// read it: vectors A, B, C, D = words [0, 32), [32, 64), [64, 96), [96, 128).
BF16_TARGET inline void k4_x_order(const uint16_t* xb, int64_t K, uint16_t* xk) {
  alignas(64) static const uint16_t lo[32] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                              32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
  // A: even words of x[0, 32) then of x[64, 96); B: of x[32, 64), x[96, 128); C, D: the odd words
  const __m512i ie = _mm512_load_si512(lo), io = _mm512_add_epi16(ie, _mm512_set1_epi16(1));
  for (int64_t c = 0; c < K; c += 128) {
    const __m512i x0 = _mm512_loadu_si512(xb + c), x1 = _mm512_loadu_si512(xb + c + 32);
    const __m512i x2 = _mm512_loadu_si512(xb + c + 64), x3 = _mm512_loadu_si512(xb + c + 96);
    _mm512_storeu_si512(xk + c, _mm512_permutex2var_epi16(x0, ie, x2));
    _mm512_storeu_si512(xk + c + 32, _mm512_permutex2var_epi16(x1, ie, x3));
    _mm512_storeu_si512(xk + c + 64, _mm512_permutex2var_epi16(x0, io, x2));
    _mm512_storeu_si512(xk + c + 96, _mm512_permutex2var_epi16(x1, io, x3));
  }
}

// -128 times the sums of x each product lane of q4k_rows_bf16 reads (K / 4 floats: per 128 words,
// 16 lanes for the (A, C) products, then 16 for (B, D)), from xk. The products start from them, so
// each lane's 128s cancel inside its own four exact products. Taken off once a block with the other
// offsets instead, the fp32 sums carried 128 times the magnitude: a GEMV's outputs were 10x noisier
// (8e-6 of their size against 6e-7), enough to flip bf16 roundings in a small model's logits.
BF16_TARGET inline void k4_x_bias(const uint16_t* xk, int64_t K, float* xn) {
  const __m512i m128 = _mm512_set1_epi16(static_cast<int16_t>(0xC300));   // bf16 -128
  for (int64_t c = 0; c < K; c += 128) {
    const __m512i* v = reinterpret_cast<const __m512i*>(xk + c);
    const __m512 ac = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)m128, (__m512bh)_mm512_loadu_si512(v)),
                                       (__m512bh)m128, (__m512bh)_mm512_loadu_si512(v + 2));
    const __m512 bd = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)m128, (__m512bh)_mm512_loadu_si512(v + 1)),
                                       (__m512bh)m128, (__m512bh)_mm512_loadu_si512(v + 3));
    _mm512_storeu_ps(xn + c / 4, ac);
    _mm512_storeu_ps(xn + c / 4 + 16, bd);
  }
}

template <int NR>
BF16_TARGET inline void q4k_rows_bf16(const uint16_t* xk, const float* xn, const float* xs, const uint8_t* w,
                                      int64_t K, int64_t n0, float* y) {
  constexpr int64_t B = 144;
  const int64_t rb = K / 256 * B, nb = K / 256;
  const uint8_t* wb = w + n0 * rb;
  const __m512i m15 = _mm512_set1_epi16(0xF), bias = _mm512_set1_epi16(0x4300);
  // scale lanes of the (A, C) / (B, D) products of chunk c: [sc[4c] x8, sc[4c+2] x8] / [sc[4c+1] x8, sc[4c+3] x8]
  const __m512i iac[2] = {_mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0),
                          _mm512_set_epi32(6, 6, 6, 6, 6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4)};
  const __m512i ibd[2] = {_mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1),
                          _mm512_set_epi32(7, 7, 7, 7, 7, 7, 7, 7, 5, 5, 5, 5, 5, 5, 5, 5)};
  __m512 acc[2][NR];
  __m256 off[NR];   // dmin * mn * (sum of the sub-block's x), 8 sub-blocks in 8 lanes
  for (int r = 0; r < NR; ++r) { acc[0][r] = acc[1][r] = _mm512_setzero_ps(); off[r] = _mm256_setzero_ps(); }
  for (int64_t i = 0; i < nb; ++i) {
    prefetch_rows<NR>(wb, rb, i * B, B);
    const __m256 xs8 = _mm256_loadu_ps(xs + 8 * i);
    for (int r = 0; r < NR; ++r) {
      const uint8_t* b = wb + r * rb + i * B;
      const __m128i smv = scales_mins_simd(b + 4);
      const __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128(*reinterpret_cast<const int*>(b)));   // d, dmin
      const __m256 scv = _mm256_mul_ps(_mm256_broadcastss_ps(dd), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(smv)));
      const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(smv, 8)));
      off[r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dd)), mn), xs8, off[r]);
      const __m512 sz = _mm512_castps256_ps512(scv);
#pragma GCC unroll 2
      for (int c = 0; c < 2; ++c) {
        const uint16_t* xp = xk + 256 * i + 128 * c;
        const float* np = xn + 64 * i + 32 * c;
        const __m512i v = _mm512_loadu_si512(b + 16 + 64 * c);
        const __m512i wa = _mm512_ternarylogic_epi32(m15, v, bias, 0xEA);   // (v & 15) | 0x4300
        const __m512i wb4 = _mm512_ternarylogic_epi32(m15, _mm512_srli_epi16(v, 4), bias, 0xEA);
        const __m512i wc = _mm512_ternarylogic_epi32(m15, _mm512_srli_epi16(v, 8), bias, 0xEA);
        const __m512i wd = _mm512_or_si512(_mm512_srli_epi16(v, 12), bias);
        __m512 ac = _mm512_dpbf16_ps(_mm512_loadu_ps(np), (__m512bh)wa, (__m512bh)_mm512_loadu_si512(xp));
        __m512 bd = _mm512_dpbf16_ps(_mm512_loadu_ps(np + 16), (__m512bh)wb4, (__m512bh)_mm512_loadu_si512(xp + 32));
        ac = _mm512_dpbf16_ps(ac, (__m512bh)wc, (__m512bh)_mm512_loadu_si512(xp + 64));
        bd = _mm512_dpbf16_ps(bd, (__m512bh)wd, (__m512bh)_mm512_loadu_si512(xp + 96));
        acc[0][r] = _mm512_fmadd_ps(ac, _mm512_permutexvar_ps(iac[c], sz), acc[0][r]);
        acc[1][r] = _mm512_fmadd_ps(bd, _mm512_permutexvar_ps(ibd[c], sz), acc[1][r]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    alignas(32) float t[8];
    _mm256_store_ps(t, off[r]);
    float s = 0.f;
    for (float v : t) s += v;
    y[n0 + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r])) - s;
  }
}

// Rows [b0 * ROWS, b1 * ROWS) of y for a bf16_kind, from block_prep_bf16's inputs.
BF16_TARGET void q_blocks_bf16(int64_t kind, const uint16_t* xb, const float* xs8, const float* xs, const uint8_t* w,
                               int64_t N, int64_t K, float* y, int64_t b0, int64_t b1) {
  static const Int4Bf16Consts c;
  static const Q6Bf16Consts c6;
  static const Q5Bf16Consts c5;
  // Q4_K reads x in k4_x_order: permuted here, per call (K words, a few hundred cycles beside the rows)
  thread_local std::vector<uint16_t> xk_buf;
  thread_local std::vector<float> xn_buf;
  if (kind == KIND_Q4_K) {
    if (static_cast<int64_t>(xk_buf.size()) < K) { xk_buf.resize(K); xn_buf.resize(K / 4); }
    k4_x_order(xb, K, xk_buf.data());
    k4_x_bias(xk_buf.data(), K, xn_buf.data());
  }
  const uint16_t* xk = xk_buf.data();
  const float* xn = xn_buf.data();
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * ROWS;
    const bool full = N - n0 >= ROWS && !rows_one_by_one(K * 2);
    for (int64_t n = n0; n < (full ? n0 + 1 : std::min(N, n0 + ROWS)); ++n) {
      if (kind == KIND_Q6_K) { if (full) q6k_rows_bf16<ROWS>(c6, xb, w, K, n, y); else q6k_rows_bf16<1>(c6, xb, w, K, n, y); }
      else if (kind == KIND_Q4_K) { if (full) q4k_rows_bf16<ROWS>(xk, xn, xs, w, K, n, y); else q4k_rows_bf16<1>(xk, xn, xs, w, K, n, y); }
      else if (kind == KIND_Q5_K) { if (full) q5k_rows_bf16<ROWS>(c5.table, xb, xs, w, K, n, y); else q5k_rows_bf16<1>(c5.table, xb, xs, w, K, n, y); }
      else if (kind == KIND_Q4_1) { if (full) q4_rows_bf16<true, ROWS>(c, xb, xs8, w, K, n, y); else q4_rows_bf16<true, 1>(c, xb, xs8, w, K, n, y); }
      else { if (full) q4_rows_bf16<false, ROWS>(c, xb, xs8, w, K, n, y); else q4_rows_bf16<false, 1>(c, xb, xs8, w, K, n, y); }
    }
  }
}

}  // namespace
