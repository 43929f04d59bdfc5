// Vector forms of the batched step's per-row math (decode_rows.cpp): the output roundings, the
// linears' input layouts, silu·mul and a GQA group's attention, 16 lanes at a time. Each gives
// exactly the bits of its scalar form (decode_math.h, rows.h, stack_lin.h: the one-token stack's).
// Why: at B = 8 this per-row work, scalar, cost about as much as the batched linears themselves.
#pragma once
#include "common.h"
#include "decode_math.h"
#include "stack_lin.h"
#include "tiles.h"
#include <type_traits>

namespace {

// rnd<T> on 16 lanes: c10's float -> bf16 (round to nearest even, NaN -> 0x7FC0), back to fp32.
template <typename T>
inline __m512 rnd16(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                          _mm512_set1_epi32(0x7FFF));
    __m512i r = _mm512_and_si512(_mm512_add_epi32(u, bias), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
    return _mm512_castsi512_ps(r);
  }
}

inline __mmask16 lanes(int64_t n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }

// The lanes k of 16 T values as fp32 / 16 values that are T values stored as T.
template <typename T>
inline __m512 load16m(const T* p, __mmask16 k) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(k, p);
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
  }
}

template <typename T>
inline void store16m(T* p, __mmask16 k, __m512 v) {
  if constexpr (std::is_same_v<T, float>) _mm512_mask_storeu_ps(p, k, v);
  else _mm512_mask_cvtepi32_storeu_epi16(p, k, _mm512_srli_epi32(_mm512_castps_si512(v), 16));
}

// out_value (stack_lin.h) of rows n .. n+15 (lanes k): rounded to T, plus the bias rounded again.
template <typename T>
inline __m512 out_values(const Lin& L, int64_t n, __mmask16 k, __m512 v) {
  __m512 r = rnd16<T>(v);
  if (L.bias) r = rnd16<T>(_mm512_add_ps(r, load16m<T>(static_cast<const T*>(L.bias) + n, k)));
  return r;
}

// x[n] = T(x[n] + out_value(y[n - a])) for n in [a, b): a linear's rows added into the residual.
template <typename T>
inline void add_rows(const Lin& L, const float* y, int64_t a, int64_t b, T* x) {
  for (int64_t n = a; n < b; n += 16) {
    const __mmask16 k = lanes(b - n);
    const __m512 o = out_values<T>(L, n, k, _mm512_maskz_loadu_ps(k, y + (n - a)));
    store16m<T>(x + n, k, rnd16<T>(_mm512_add_ps(load16m<T>(x + n, k), o)));
  }
}

// out[n] = out_value(y[n - a]) for n in [a, b).
template <typename T>
inline void put_rows(const Lin& L, const float* y, int64_t a, int64_t b, float* out) {
  for (int64_t n = a; n < b; n += 16) {
    const __mmask16 k = lanes(b - n);
    _mm512_mask_storeu_ps(out + n, k, out_values<T>(L, n, k, _mm512_maskz_loadu_ps(k, y + (n - a))));
  }
}

// act[i] = rnd(rnd(silu(g)) * u), g and u the gate and up rows' out_values, for i in [a, b) (gate
// rows i, up rows I + i; yg / yu from row a). exp is the scalar std::exp of the one-token stack.
template <typename T>
inline void silu_rows(const Lin& L, const float* yg, const float* yu, int64_t a, int64_t b, int64_t I, float* act) {
  for (int64_t i = a; i < b; i += 16) {
    const __mmask16 k = lanes(b - i);
    const __m512 g = out_values<T>(L, i, k, _mm512_maskz_loadu_ps(k, yg + (i - a)));
    const __m512 u = out_values<T>(L, I + i, k, _mm512_maskz_loadu_ps(k, yu + (i - a)));
    alignas(64) float gt[16], et[16];
    _mm512_store_ps(gt, g);
    for (int l = 0; l < 16; ++l) et[l] = std::exp(-gt[l]);
    const __m512 s = rnd16<T>(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), _mm512_load_ps(et))));
    _mm512_mask_storeu_ps(act + i, k, rnd16<T>(_mm512_mul_ps(s, u)));
  }
}

// The high 16 bits of 16 fp32 (bf16 values: exact) as bf16 words.
inline void bf16_words(const float* x, uint16_t* o) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(_mm512_loadu_ps(x)), 16)));
}

// int4_prep_bf16 (rows.h), vectorised: the same xb, xs8, xs.
inline void int4_prep_rows(const float* x, int64_t K, uint16_t* xb, float* xs8, float* xs) {
  const int64_t G = K / 32;
  group_sums(x, G, xs);
  const __m512 eight = _mm512_set1_ps(8.f);
  for (int64_t p = 0; p < G / 2; ++p) {
    bf16_words(x + 64 * p, xb + 64 * p);
    bf16_words(x + 64 * p + 32, xb + 64 * p + 16);
    bf16_words(x + 64 * p + 16, xb + 64 * p + 32);
    bf16_words(x + 64 * p + 48, xb + 64 * p + 48);
    const __m512 s = _mm512_insertf32x8(_mm512_set1_ps(xs[2 * p]), _mm256_set1_ps(xs[2 * p + 1]), 1);
    _mm512_storeu_ps(xs8 + 16 * p, _mm512_div_ps(s, eight));
  }
}

// prepare (stack_lin.h) with the vector layouts.
inline void prepare_rows(const Lin& L, const float* x, Input& in) {
  in.x = x;
  if (!L.parts.empty()) {
    bool need[I8_FAMILIES];
    const bool other = i8_needs(L, need);
    prepare_i8(L, x, in, need);
    if (!other) return;
    bool i4 = false, plain = false;
    for (const auto& p : L.parts)
      if (i8_kind(p.kind, L.K) == I8_NONE && bf16_kind(p.kind, L.K)) (int4_order(p.kind) ? i4 : plain) = true;
    if (i4) int4_prep_rows(x, L.K, in.xb, in.xs8, in.xs);
    else group_sums(x, L.K / 32, in.xs);
    if (plain) for (int64_t k = 0; k < L.K; k += 16) bf16_words(x + k, in.xp + k);
    return;
  }
  if (L.kind != KIND_INT4) return;
  if (cpu_has_bf16()) int4_prep_rows(x, L.K, in.xb, in.xs8, in.xs);
  else group_sums(x, L.K / 32, in.xs);
}

constexpr int64_t MAX_GROUP = 16;  // query heads per KV head that attend_group_paged takes at once
constexpr int64_t MAX_GROUP_DIM = 256;  // and the head dim it takes (its scratch: 16 * MAX_GROUP vectors)

// attend_head_paged (decode_math.h) for the G = H / K query heads of KV head kh at once: per head
// the same operations in the same order; each key and value row is read and widened once for the
// group, and the score sums reduced 16 positions at a time (reduce_many: the same tree).
// q: G * D floats, p: G * (pos + 1) floats, acc: 16 * G vectors of scratch.
template <typename T>
void attend_group_paged(const float* qkv, const T* c, const T* s, const T* kp, const T* vp, const int64_t* table,
                        int64_t bs, float* out, int64_t pos, int64_t kh, int64_t H, int64_t K, int64_t D,
                        float scale, float* q, float* p, __m512* acc) {
  const int64_t S = pos + 1, G = H / K, h0 = kh * G;
  for (int64_t g = 0; g < G; ++g) rope_head<T, float>(qkv + (h0 + g) * D, c, s, q + g * D, D);
  // position j's row: block table[j / bs], offset j % bs, walked in order (no division per position)
  PagedRows<T> keys(kp, table, bs, K, kh, D);
  float mx[MAX_GROUP], sums[16];
  for (int64_t g = 0; g < G; ++g) mx[g] = -INFINITY;
  for (int64_t j0 = 0; j0 < S; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, S - j0);
    for (int64_t jj = 0; jj < 16; ++jj) {
      if (jj >= nj) { for (int64_t g = 0; g < G; ++g) acc[g * 16 + jj] = _mm512_setzero_ps(); continue; }
      const T* kj = keys.next();
      for (int64_t g = 0; g < G; ++g) acc[g * 16 + jj] = _mm512_setzero_ps();
      for (int64_t i = 0; i < D; i += 16) {
        const __m512 kv = load16<T>(kj + i);
        for (int64_t g = 0; g < G; ++g)
          acc[g * 16 + jj] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + i), kv, acc[g * 16 + jj]);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      reduce_many<16>(acc + g * 16, sums);
      for (int64_t jj = 0; jj < nj; ++jj) {
        const float v = rnd<T>(rnd<T>(sums[jj]) * scale);
        p[g * S + j0 + jj] = v;
        mx[g] = std::max(mx[g], v);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* pg = p + g * S;
    float z = 0.f;
    for (int64_t j = 0; j < S; ++j) { pg[j] = std::exp(pg[j] - mx[g]); z += pg[j]; }
    const __m512 inv = _mm512_set1_ps(1.f / z);
    for (int64_t j = 0; j < S; j += 16) {
      const __mmask16 k = lanes(S - j);
      _mm512_mask_storeu_ps(pg + j, k, rnd16<T>(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, pg + j), inv)));
    }
  }
  // values: each row read once for all D / 16 lane groups of every head (acc[g * NI + i]); each
  // lane still sums over j in order, so the bits are those of one lane group at a time
  const int64_t NI = D / 16;
  for (int64_t t = 0; t < G * NI; ++t) acc[t] = _mm512_setzero_ps();
  PagedRows<T> values(vp, table, bs, K, kh, D);
  for (int64_t j = 0; j < S; ++j) {
    const T* vj = values.next();
    for (int64_t i = 0; i < NI; ++i) {
      const __m512 v = load16<T>(vj + 16 * i);
      for (int64_t g = 0; g < G; ++g) acc[g * NI + i] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * S + j]), v, acc[g * NI + i]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < NI; ++i) _mm512_storeu_ps(out + (h0 + g) * D + 16 * i, rnd16<T>(acc[g * NI + i]));
}

}  // namespace
