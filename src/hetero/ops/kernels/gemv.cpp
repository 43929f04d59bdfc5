// Matrix-vector kernels for decode (one token: M = 1) on x86 with AVX-512.
// Why: torch's stock GEMV streams weights at ~10 GB/s on this class of CPU while plain copies reach
// ~30 GB/s; decode is bound by bytes of weights read per token, so the GEMV rate is decode speed.
// Each GEMV reads W [N, K] row-major once, 4 rows at a time (rows.h), split over torch's intra-op threads.
#include "kernels.h"
#include "rows.h"

// x: [K] fp32, w: [N, K] fp32 -> [N] fp32. K % 16 == 0. (All GEMVs: y in x's dtype, see with_act.)
torch::Tensor gemv_f32(torch::Tensor x, torch::Tensor w) {
  const int64_t N = w.size(0), K = w.size(1);
  const float* wp = w.data_ptr<float>();
  return with_act(x, K, N, [&](const float* xp, float* yp) {
    gemv_rows(xp, N, K, yp, [&](int64_t n, int64_t k) { return _mm512_loadu_ps(wp + n * K + k); });
  });
}

// x: [K] fp32, w: [N, K] bf16 -> [N] fp32 (bf16 widened exactly to fp32, fp32 accumulation).
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {
  const int64_t N = w.size(0), K = w.size(1);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  return with_act(x, K, N, [&](const float* xp, float* yp) {
    gemv_rows(xp, N, K, yp, [&](int64_t n, int64_t k) { return bf16x16_to_f32(wp + n * K + k); });
  });
}

// x: [K] fp32, q: [N, K] int8, scale: [N] fp32 -> [N] fp32: y[n] = scale[n] * sum_k q[n,k] x[k].
torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  const int64_t N = q.size(0), K = q.size(1);
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  return with_act(x, K, N, [&](const float* xp, float* yp) {
    at::parallel_for(0, (N + ROWS - 1) / ROWS, 16, [&](int64_t b0, int64_t b1) {
      int8_blocks(xp, qp, sp, N, K, yp, b0, b1);
    });
  });
}

// Group-wise int4, group 32, asymmetric: w[n,k] = q[n,k] * s[n,g] + m[n,g], g = k / 32.
// packed: [N, K/2] uint8; in each group's 16 bytes, byte i holds q[i] (low nibble) and q[i+16] (high).
// sm: [N, K/32, 2] bf16 (scale, zero) in torch's int4 convention w = (q - 8) * scale + zero, so the
// group minimum is m = zero - 8 * scale (computed in fp32). xs: per-group sums of x (for the m term).
torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor packed, torch::Tensor sm) {
  const int64_t N = packed.size(0), K = packed.size(1) * 2, G = K / 32;
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const uint16_t* smp = reinterpret_cast<const uint16_t*>(sm.data_ptr<at::BFloat16>());
  // bf16 activations (the decode path) take the BF16 dot-product kernel where the CPU has one.
  const bool dot_bf16 = x.scalar_type() == torch::kBFloat16 && cpu_has_bf16();
  return with_act(x, K, N, [&](const float* xp, float* yp) {
    std::vector<float> xs(G);
    if (dot_bf16) {
      std::vector<uint16_t> xb(K);
      std::vector<float> xs8(8 * G);
      int4_prep_bf16(xp, K, xb.data(), xs8.data(), xs.data());
      at::parallel_for(0, (N + ROWS - 1) / ROWS, 16, [&](int64_t b0, int64_t b1) {
        int4_blocks_bf16(xb.data(), xs8.data(), xp, xs.data(), pp, smp, N, K, yp, b0, b1);
      });
      return;
    }
    group_sums(xp, G, xs.data());
    at::parallel_for(0, (N + ROWS - 1) / ROWS, 16, [&](int64_t b0, int64_t b1) {
      int4_blocks(xp, xs.data(), pp, smp, N, K, yp, b0, b1);
    });
  });
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

// Whether int4 GEMVs with bf16 activations take the AVX512-BF16 dot-product kernel here.
bool has_bf16_dot() { return cpu_has_bf16(); }
