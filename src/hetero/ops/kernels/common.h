// Shared by every kernel source: SIMD conversions, rounding to the activation dtype, prefetch
// distances and how rows are split over threads.
// Helpers live in an unnamed namespace: each source gets its own copy, inlined as the compiler likes.
#pragma once
#include "kernels.h"
#include <torch/types.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <algorithm>
#include <vector>

namespace {

constexpr int64_t ROWS = 4;

inline __m512 bf16x16_to_f32(const uint16_t* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512 i8x16_to_f32(const int8_t* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
}

inline float bf16_to_f32(uint16_t v) {
  uint32_t b = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// Whether the CPU has AVX512-BF16 dot products (the int4 kernels' fast path for bf16 activations).
bool cpu_has_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Prefetch distance (bytes ahead in the rows' packed bytes / in their scales): a decode GEMV's share
// of rows is ~100-300 KB, short enough that the hardware prefetcher ramps up too late on its own.
constexpr int64_t PF_W = 4096, PF_S = 1024;
// ... and per row, when each row is prefetched as its own stream (blocks.h)
constexpr int64_t PF_R = 4096;

// v rounded to T (float or BFloat16) and back: the reference path's rounding points, kept in fp32.
template <typename T> inline float rnd(float v) { return static_cast<float>(static_cast<T>(v)); }
template <> inline float rnd<float>(float v) { return v; }

// 16 values of T widened to fp32.
template <typename T> inline __m512 load16(const T* p);
template <> inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <> inline __m512 load16<at::BFloat16>(const at::BFloat16* p) {
  return bf16x16_to_f32(reinterpret_cast<const uint16_t*>(p));
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// This thread's share [n0, n1) of N rows, in whole ROWS blocks.
inline void share(int64_t N, int tid, int nth, int64_t& n0, int64_t& n1) {
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  n0 = std::min(N, blocks * tid / nth * ROWS);
  n1 = std::min(N, blocks * (tid + 1) / nth * ROWS);
}

// Activations may come as fp32 or bf16 (any shape holding K values, contiguous): a bf16 x is widened
// here and the result rounded back to bf16, saving the two conversion ops per call at decode.
template <typename Run>
torch::Tensor with_act(const torch::Tensor& x, int64_t K, int64_t N, bool fp32_out, Run run) {
  TORCH_CHECK(x.numel() == K && x.is_contiguous() && x.device().is_cpu(), "x: K contiguous values expected");
  auto y = torch::empty({N}, x.options().dtype(fp32_out ? torch::kFloat32 : x.scalar_type()));
  if (x.scalar_type() == torch::kFloat32) {
    run(x.data_ptr<float>(), y.data_ptr<float>());
    return y;
  }
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "x: fp32 or bf16 expected");
  std::vector<float> xf(K);
  const at::BFloat16* xb = x.data_ptr<at::BFloat16>();
  for (int64_t k = 0; k < K; ++k) xf[k] = static_cast<float>(xb[k]);
  if (fp32_out) {   // unrounded fp32 sums (a head's logits)
    run(xf.data(), y.data_ptr<float>());
    return y;
  }
  std::vector<float> yf(N);
  run(xf.data(), yf.data());
  at::BFloat16* yb = y.data_ptr<at::BFloat16>();
  for (int64_t n = 0; n < N; ++n) yb[n] = static_cast<at::BFloat16>(yf[n]);
  return y;
}

template <typename Run>
torch::Tensor with_act(const torch::Tensor& x, int64_t K, int64_t N, Run run) { return with_act(x, K, N, false, run); }

}  // namespace
