// Per-row math of one decode step (B = 1, T = 1): RMSNorm, RoPE, the KV-cache write and one head's
// attention, shared by the fused per-layer ops (decode_ops.cpp) and the decode stack (decode_stack.cpp).
// Element type T is float or BFloat16; math is fp32, with the reference's bf16 roundings kept
// (rnd<T>) so that both paths round at the same points.
#pragma once
#include "common.h"
#include <type_traits>

namespace {

// rms_norm of one row, each value rounded to T; stored as O (T, or fp32 for a GEMV's input).
template <typename T, typename O>
void rmsnorm_row(const T* x, const float* w, O* out, int64_t n, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) { const float v = static_cast<float>(x[i]); ss += v * v; }
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<O>(rnd<T>(w[i] * (static_cast<float>(x[i]) * r)));
}

// x*cos + rotate_half(x)*sin for one head of D values, in the reference's rounding order.
// In: where q/k come from (T, or fp32 already rounded to T).
template <typename T, typename In = T>
inline void rope_head(const In* x, const T* c, const T* s, float* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; ++i) {
    const float xi = static_cast<float>(x[i]);
    const float rot = i < half ? -static_cast<float>(x[i + half]) : static_cast<float>(x[i - half]);
    out[i] = rnd<T>(rnd<T>(xi * static_cast<float>(c[i])) + rnd<T>(rot * static_cast<float>(s[i])));
  }
}

// KV head kh's new K (rotated) and V into the caches [1, K, L, D] at `pos`; buf: D floats.
template <typename T, typename In>
void kv_write_head(const In* qkv, const T* c, const T* s, T* kc, T* vc, int64_t pos, int64_t kh, int64_t H,
                   int64_t K, int64_t D, int64_t L, float* buf) {
  rope_head<T, In>(qkv + H * D + kh * D, c, s, buf, D);
  T* kd = kc + (kh * L + pos) * D;
  T* vd = vc + (kh * L + pos) * D;
  const In* v = qkv + H * D + K * D + kh * D;
  for (int64_t i = 0; i < D; ++i) { kd[i] = static_cast<T>(buf[i]); vd[i] = static_cast<T>(v[i]); }
}

// Query head h over cached positions 0..pos (GQA: kv head h / (H/K)) -> out[h*D .. h*D+D) rounded to T.
// q: D floats, p: pos + 1 floats of scratch.
template <typename T, typename In, typename Out>
void attend_head(const In* qkv, const T* c, const T* s, const T* kc, const T* vc, Out* out, int64_t pos,
                 int64_t h, int64_t H, int64_t K, int64_t D, int64_t L, float scale, float* q, float* p) {
  const int64_t S = pos + 1;
  rope_head<T, In>(qkv + h * D, c, s, q, D);
  const T* kb = kc + (h / (H / K)) * L * D;
  const T* vb = vc + (h / (H / K)) * L * D;
  float m = -INFINITY;
  for (int64_t j = 0; j < S; ++j) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16<T>(kb + j * D + i), acc);
    const float v = rnd<T>(rnd<T>(_mm512_reduce_add_ps(acc)) * scale);
    p[j] = v;
    m = std::max(m, v);
  }
  float z = 0.f;
  for (int64_t j = 0; j < S; ++j) { p[j] = std::exp(p[j] - m); z += p[j]; }
  const float inv = 1.f / z;
  for (int64_t j = 0; j < S; ++j) p[j] = rnd<T>(p[j] * inv);
  for (int64_t i = 0; i < D; i += 16) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < S; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), load16<T>(vb + j * D + i), acc);
    float tmp[16];
    _mm512_storeu_ps(tmp, acc);
    for (int k = 0; k < 16; ++k) out[h * D + i + k] = static_cast<Out>(rnd<T>(tmp[k]));
  }
}

// ---- int8 KV (model/kvstore.py Int8KV): codes [1, K, L, D] int8 and scales [1, K, L, 1] fp16 ----

// One row of D values (already rounded to T) to codes and its fp16 scale, as quantize_rows does:
// absmax / 127 rounded to fp16, codes rounded half to even against that stored scale.
inline void q8_row(const float* x, int8_t* codes, at::Half* scale, int64_t D) {
  float amax = 0.f;
  for (int64_t i = 0; i < D; ++i) amax = std::max(amax, std::fabs(x[i]));
  const at::Half sh = static_cast<at::Half>(std::max(amax / 127.f, 5.9604644775390625e-08f));  // 2^-24
  const float sc = static_cast<float>(sh);
  for (int64_t i = 0; i < D; ++i)
    codes[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(x[i] / sc))));
  *scale = sh;
}

// kv_write_head into an int8 cache: K rotated and V, each rounded to T first (what a T cache holds).
template <typename T, typename In>
void kv_write_head_q8(const In* qkv, const T* c, const T* s, int8_t* kc, at::Half* ks, int8_t* vc, at::Half* vs,
                      int64_t pos, int64_t kh, int64_t H, int64_t K, int64_t D, int64_t L, float* buf) {
  const int64_t row = kh * L + pos;
  rope_head<T, In>(qkv + H * D + kh * D, c, s, buf, D);
  q8_row(buf, kc + row * D, ks + row, D);
  const In* v = qkv + H * D + K * D + kh * D;
  for (int64_t i = 0; i < D; ++i) buf[i] = rnd<T>(static_cast<float>(v[i]));
  q8_row(buf, vc + row * D, vs + row, D);
}

// 16 values of one int8 row read back as the torch path does: code x scale in fp32, rounded to T.
template <typename T>
inline __m512 load16_q8(const int8_t* p, float scale) {
  __m512 v = _mm512_mul_ps(i8x16_to_f32(p), _mm512_set1_ps(scale));
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    float t[16];
    _mm512_storeu_ps(t, v);
    for (int k = 0; k < 16; ++k) t[k] = rnd<T>(t[k]);
    return _mm512_loadu_ps(t);
  }
}

// attend_head over an int8 cache: the same rounding points, each key/value row dequantised on the fly.
template <typename T, typename In, typename Out>
void attend_head_q8(const In* qkv, const T* c, const T* s, const int8_t* kc, const at::Half* ks, const int8_t* vc,
                    const at::Half* vs, Out* out, int64_t pos, int64_t h, int64_t H, int64_t K, int64_t D,
                    int64_t L, float scale, float* q, float* p) {
  const int64_t S = pos + 1;
  rope_head<T, In>(qkv + h * D, c, s, q, D);
  const int64_t kh = h / (H / K);
  const int8_t* kb = kc + kh * L * D;
  const int8_t* vb = vc + kh * L * D;
  const at::Half* ksb = ks + kh * L;
  const at::Half* vsb = vs + kh * L;
  float m = -INFINITY;
  for (int64_t j = 0; j < S; ++j) {
    const float sj = static_cast<float>(ksb[j]);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16_q8<T>(kb + j * D + i, sj), acc);
    const float v = rnd<T>(rnd<T>(_mm512_reduce_add_ps(acc)) * scale);
    p[j] = v;
    m = std::max(m, v);
  }
  float z = 0.f;
  for (int64_t j = 0; j < S; ++j) { p[j] = std::exp(p[j] - m); z += p[j]; }
  const float inv = 1.f / z;
  for (int64_t j = 0; j < S; ++j) p[j] = rnd<T>(p[j] * inv);
  for (int64_t i = 0; i < D; i += 16) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < S; ++j)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), load16_q8<T>(vb + j * D + i, static_cast<float>(vsb[j])), acc);
    float tmp[16];
    _mm512_storeu_ps(tmp, acc);
    for (int k = 0; k < 16; ++k) out[h * D + i + k] = static_cast<Out>(rnd<T>(tmp[k]));
  }
}

// The K or V rows of KV head kh at positions 0, 1, 2, .. of a paged pool ([n_blocks, K, bs, D]), one
// per next(): the block table is read once per block, not divided into once per position.
template <typename T>
struct PagedRows {
  const T* pool;
  const int64_t* table;
  int64_t bs, K, kh, D, blk = 0, off = 0;
  const T* base = nullptr;
  PagedRows(const T* pool_, const int64_t* table_, int64_t bs_, int64_t K_, int64_t kh_, int64_t D_)
      : pool(pool_), table(table_), bs(bs_), K(K_), kh(kh_), D(D_) {}
  const T* next() {   // (the table is read at a block's first position only: never past the last one used)
    if (off == 0) base = pool + (table[blk] * K + kh) * bs * D;
    const T* r = base + off * D;
    if (++off == bs) { off = 0; ++blk; }
    return r;
  }
};

// attend_head over paged KV ([n_blocks, K, bs, D]; position j of this sequence in block
// table[j / bs] at offset j % bs): the same operations in the same order, so a sequence's bits are
// those it gets from a contiguous cache.
template <typename T, typename In, typename Out>
void attend_head_paged(const In* qkv, const T* c, const T* s, const T* kp, const T* vp, const int64_t* table,
                       int64_t bs, Out* out, int64_t pos, int64_t h, int64_t H, int64_t K, int64_t D, float scale,
                       float* q, float* p) {
  const int64_t S = pos + 1, kh = h / (H / K);
  rope_head<T, In>(qkv + h * D, c, s, q, D);
  PagedRows<T> keys(kp, table, bs, K, kh, D);
  float m = -INFINITY;
  for (int64_t j = 0; j < S; ++j) {
    const T* kj = keys.next();
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16<T>(kj + i), acc);
    const float v = rnd<T>(rnd<T>(_mm512_reduce_add_ps(acc)) * scale);
    p[j] = v;
    m = std::max(m, v);
  }
  float z = 0.f;
  for (int64_t j = 0; j < S; ++j) { p[j] = std::exp(p[j] - m); z += p[j]; }
  const float inv = 1.f / z;
  for (int64_t j = 0; j < S; ++j) p[j] = rnd<T>(p[j] * inv);
  for (int64_t i = 0; i < D; i += 16) {
    __m512 acc = _mm512_setzero_ps();
    PagedRows<T> values(vp, table, bs, K, kh, D);
    for (int64_t j = 0; j < S; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), load16<T>(values.next() + i), acc);
    float tmp[16];
    _mm512_storeu_ps(tmp, acc);
    for (int k = 0; k < 16; ++k) out[h * D + i + k] = static_cast<Out>(rnd<T>(tmp[k]));
  }
}

}  // namespace
