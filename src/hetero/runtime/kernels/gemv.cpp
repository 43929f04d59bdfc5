// Matrix-vector kernels for decode (one token: M = 1) on x86 with AVX-512.
// Why: torch's stock GEMV streams weights at ~10 GB/s on this class of CPU while plain copies reach
// ~30 GB/s; decode is bound by bytes of weights read per token, so the GEMV rate is decode speed.
// Each kernel reads W [N, K] row-major once, 4 rows at a time, split over torch's intra-op threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
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

// Row loader: converts 16 weights of row r at column k to fp32.
template <typename Load>
void gemv_rows(const float* x, int64_t N, int64_t K, float* y, Load load) {
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
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
  });
}

}  // namespace

// x: [K] fp32, w: [N, K] fp32 -> [N] fp32. K % 16 == 0.
torch::Tensor gemv_f32(torch::Tensor x, torch::Tensor w) {
  const int64_t N = w.size(0), K = w.size(1);
  auto y = torch::empty({N}, x.options());
  const float* wp = w.data_ptr<float>();
  gemv_rows(x.data_ptr<float>(), N, K, y.data_ptr<float>(),
            [&](int64_t n, int64_t k) { return _mm512_loadu_ps(wp + n * K + k); });
  return y;
}

// x: [K] fp32, w: [N, K] bf16 -> [N] fp32 (bf16 widened exactly to fp32, fp32 accumulation).
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {
  const int64_t N = w.size(0), K = w.size(1);
  auto y = torch::empty({N}, x.options());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  gemv_rows(x.data_ptr<float>(), N, K, y.data_ptr<float>(),
            [&](int64_t n, int64_t k) { return bf16x16_to_f32(wp + n * K + k); });
  return y;
}

// x: [K] fp32, q: [N, K] int8, scale: [N] fp32 -> [N] fp32: y[n] = scale[n] * sum_k q[n,k] x[k].
torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  const int64_t N = q.size(0), K = q.size(1);
  auto y = torch::empty({N}, x.options());
  const int8_t* qp = q.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  gemv_rows(x.data_ptr<float>(), N, K, yp,
            [&](int64_t n, int64_t k) { return i8x16_to_f32(qp + n * K + k); });
  const float* sp = scale.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) yp[n] *= sp[n];
  return y;
}

// Group-wise int4, group 32, asymmetric: w[n,k] = q[n,k] * s[n,g] + m[n,g], g = k / 32.
// packed: [N, K/2] uint8; in each group's 16 bytes, byte i holds q[i] (low nibble) and q[i+16] (high).
// sm: [N, K/32, 2] bf16 (scale, zero) in torch's int4 convention w = (q - 8) * scale + zero, so the
// group minimum is m = zero - 8 * scale (computed in fp32). xs: per-group sums of x (for the m term).
torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor packed, torch::Tensor sm) {
  const int64_t N = packed.size(0), K = packed.size(1) * 2, G = K / 32;
  auto y = torch::empty({N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const uint16_t* smp = reinterpret_cast<const uint16_t*>(sm.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  std::vector<float> xs(G);
  for (int64_t g = 0; g < G; ++g) {
    __m512 a = _mm512_add_ps(_mm512_loadu_ps(xp + g * 32), _mm512_loadu_ps(xp + g * 32 + 16));
    xs[g] = _mm512_reduce_add_ps(a);
  }
  const __m512i lo_mask = _mm512_set1_epi32(0xF);
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
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
  });
  return y;
}

// Dequantise the int4 layout above to bf16 [N, K] (for prefill, where a bf16 GEMM is compute-bound).
torch::Tensor dequant_int4(torch::Tensor packed, torch::Tensor sm) {
  const int64_t N = packed.size(0), K = packed.size(1) * 2, G = K / 32;
  auto out = torch::empty({N, K}, packed.options().dtype(torch::kFloat32));
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const uint16_t* smp = reinterpret_cast<const uint16_t*>(sm.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  const __m512i lo_mask = _mm512_set1_epi32(0xF);
  at::parallel_for(0, N, 64, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n)
      for (int64_t g = 0; g < G; ++g) {
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pp + n * (K / 2) + g * 16)));
        const uint16_t* s = smp + (n * G + g) * 2;
        const float scf = bf16_to_f32(s[0]);
        const __m512 sc = _mm512_set1_ps(scf), mn = _mm512_set1_ps(bf16_to_f32(s[1]) - 8.f * scf);
        _mm512_storeu_ps(op + n * K + g * 32, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, lo_mask)), sc, mn));
        _mm512_storeu_ps(op + n * K + g * 32 + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), sc, mn));
      }
  });
  return out.to(torch::kBFloat16);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_f32", &gemv_f32);
  m.def("gemv_bf16", &gemv_bf16);
  m.def("gemv_int8", &gemv_int8);
  m.def("gemv_int4", &gemv_int4);
  m.def("dequant_int4", &dequant_int4);
}
