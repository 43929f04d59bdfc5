// A few activation rows against one weight (batched decode: M = B sequences, M <= ~32), AVX-512.
// Why: torch's int8 kernel at small M is M matrix-vector products (the weight read M times) and
// int4 dequantises the whole weight first; here each chunk of weight rows is read from memory once
// and, while it sits in L1/L2, dotted with every activation row, each weight vector widened once
// for up to MT rows at a time. Each row's arithmetic is exactly the
// one-token GEMV's (rows.h), so a batched step gives every sequence the bits it would get alone.
#include "kernels.h"
#include "rows.h"
#include "tiles.h"

namespace {

// Weight rows per chunk: ~32 KB of them, so they stay cached across the passes over activation rows.
inline int64_t chunk_blocks(int64_t row_bytes) { return std::max<int64_t>(1, 32768 / (ROWS * row_bytes)); }

torch::Tensor rows_out(const torch::Tensor& x, int64_t K, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.is_contiguous() && x.scalar_type() == torch::kFloat32 &&
              x.device().is_cpu(), "x: [M, K] contiguous fp32 expected");
  return torch::empty({x.size(0), N}, x.options());
}

// int4_blocks (rows.h) for rows [b0, b1) blocks and M activation rows (M <= MT): each group's nibbles
// are unpacked once for all M; per (row, m) the same operations in the same order as the GEMV.
template <int M>
void int4_pass(const float* x, const float* xs, int64_t K, const uint8_t* pp, const uint16_t* smp, int64_t N,
               float* y, int64_t b0, int64_t b1) {
  const int64_t G = K / 32;
  const __m512i lo_mask = _mm512_set1_epi32(0xF);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * ROWS, nr = std::min(ROWS, N - n0);
    __m512 acc[ROWS][M];
    float mins[ROWS][M];
    for (int r = 0; r < ROWS; ++r) for (int m = 0; m < M; ++m) { acc[r][m] = _mm512_setzero_ps(); mins[r][m] = 0.f; }
    for (int64_t g = 0; g < G; ++g) {
      for (int r = 0; r < nr; ++r) {
        const int64_t n = n0 + r;
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pp + n * (K / 2) + g * 16)));
        const __m512 ql = _mm512_cvtepi32_ps(_mm512_and_si512(v, lo_mask));
        const __m512 qh = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
        const uint16_t* s = smp + (n * G + g) * 2;
        const float sc = bf16_to_f32(s[0]), mn = bf16_to_f32(s[1]) - 8.f * sc;
        const __m512 scv = _mm512_set1_ps(sc);
        for (int m = 0; m < M; ++m) {
          const float* xm = x + m * K + g * 32;
          __m512 t = _mm512_fmadd_ps(qh, _mm512_loadu_ps(xm + 16), _mm512_mul_ps(ql, _mm512_loadu_ps(xm)));
          acc[r][m] = _mm512_fmadd_ps(t, scv, acc[r][m]);
          mins[r][m] += mn * xs[m * G + g];
        }
      }
    }
    for (int r = 0; r < nr; ++r)
      for (int m = 0; m < M; ++m) y[m * N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]) + mins[r][m];
  }
}

}  // namespace

// x: [M, K] fp32, q: [N, K] int8, scale: [N] fp32 -> [M, N] fp32 (row m = gemv_int8(x[m])).
torch::Tensor gemm_rows_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  const int64_t N = q.size(0), K = q.size(1), M = x.size(0);
  auto y = rows_out(x, K, N);
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (N + ROWS - 1) / ROWS, ch = chunk_blocks(K);
  at::parallel_for(0, (blocks + ch - 1) / ch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b0 = c * ch, b1 = std::min(blocks, b0 + ch);
      by_passes(M, [&](int64_t m0, auto mt) {
        constexpr int MM = decltype(mt)::value;
        const float* xs[MM];
        float* ys[MM];
        for (int m = 0; m < MM; ++m) { xs[m] = xp + (m0 + m) * K; ys[m] = yp + (m0 + m) * N; }
        constexpr int NR = tile_rows<MM>();
        for (int64_t n = b0 * ROWS; n < std::min(N, b1 * ROWS); n += NR) {
          if (N - n >= NR) int8_tile<NR, MM>(xs, qp, sp, K, n, ys, m0 == 0);
          else for (int64_t r = n; r < N; ++r) int8_tile<1, MM>(xs, qp, sp, K, r, ys, m0 == 0);
        }
      });
    }
  });
  return y;
}

// x: [M, K] fp32, the int4 layout of gemv_int4 -> [M, N] fp32, row m = gemv_int4(x[m]): with
// bf16_values (x holds bf16 activations) on a CPU with AVX512-BF16 that is its dot-product kernel
// (a pass per row over the cached chunk), else the fp32 kernel (tiled, nibbles unpacked once per MT).
torch::Tensor gemm_rows_int4(torch::Tensor x, torch::Tensor packed, torch::Tensor sm, bool bf16_values) {
  const int64_t N = packed.size(0), K = packed.size(1) * 2, G = K / 32, M = x.size(0);
  auto y = rows_out(x, K, N);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const uint16_t* smp = reinterpret_cast<const uint16_t*>(sm.data_ptr<at::BFloat16>());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool dot_bf16 = bf16_values && cpu_has_bf16();
  std::vector<float> xs(M * G), xs8(dot_bf16 ? M * 8 * G : 0);
  std::vector<uint16_t> xb(dot_bf16 ? M * K : 0);
  for (int64_t m = 0; m < M; ++m) {
    if (dot_bf16) int4_prep_bf16(xp + m * K, K, xb.data() + m * K, xs8.data() + m * 8 * G, xs.data() + m * G);
    else group_sums(xp + m * K, G, xs.data() + m * G);
  }
  const int64_t blocks = (N + ROWS - 1) / ROWS, ch = chunk_blocks(K / 2 + G * 4);
  at::parallel_for(0, (blocks + ch - 1) / ch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b0 = c * ch, b1 = std::min(blocks, b0 + ch);
      if (dot_bf16 && G % 2 == 0) {  // the weight unpacked once per MT rows (tiles.h)
        static const Int4Bf16Consts consts;
        by_passes(M, [&](int64_t m0, auto mt) {
          constexpr int MM = decltype(mt)::value;
          const uint16_t* xbs[MM];
          const float* x8[MM];
          float* ys[MM];
          for (int m = 0; m < MM; ++m) {
            xbs[m] = xb.data() + (m0 + m) * K; x8[m] = xs8.data() + (m0 + m) * 8 * G; ys[m] = yp + (m0 + m) * N;
          }
          for (int64_t n = b0 * ROWS; n < std::min(N, b1 * ROWS); n += 2) {
            if (N - n >= 2) int4_tile_bf16<2, MM>(consts, xbs, x8, pp, smp, K, n, ys, m0 == 0);
            else int4_tile_bf16<1, MM>(consts, xbs, x8, pp, smp, K, n, ys, m0 == 0);
          }
        });
        continue;
      }
      if (dot_bf16) {
        for (int64_t m = 0; m < M; ++m)
          int4_blocks_bf16(xb.data() + m * K, xs8.data() + m * 8 * G, xp + m * K, xs.data() + m * G, pp, smp, N, K,
                           yp + m * N, b0, b1);
        continue;
      }
      by_passes(M, [&](int64_t m0, auto mt) {
        int4_pass<decltype(mt)::value>(xp + m0 * K, xs.data() + m0 * G, K, pp, smp, N, yp + m0 * N, b0, b1);
      });
    }
  });
  return y;
}

// x: [M, K] fp32, w: [N, K] fp32 or bf16 -> [M, N] fp32, row m = gemv_f32 / gemv_bf16 (x[m]): a chunk
// of W's rows is read once, each weight vector widened once per MT rows (tiles.h).
torch::Tensor gemm_rows_dense(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && (w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16),
              "w: [N, K] contiguous fp32 or bf16 expected");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  TORCH_CHECK(K % 16 == 0, "K % 16 == 0 expected");
  auto y = rows_out(x, K, N);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool f32 = w.scalar_type() == torch::kFloat32;
  const float* wf = f32 ? w.data_ptr<float>() : nullptr;
  const uint16_t* wb = f32 ? nullptr : reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const int64_t blocks = (N + ROWS - 1) / ROWS, ch = chunk_blocks(K * (f32 ? 4 : 2));
  at::parallel_for(0, (blocks + ch - 1) / ch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b0 = c * ch, b1 = std::min(blocks, b0 + ch);
      auto lf = [&](int64_t n, int64_t k) { return _mm512_loadu_ps(wf + n * K + k); };
      auto lb = [&](int64_t n, int64_t k) { return bf16x16_to_f32(wb + n * K + k); };
      by_passes(M, [&](int64_t m0, auto mt) {
        constexpr int MM = decltype(mt)::value;
        const float* xs[MM];
        float* ys[MM];
        for (int m = 0; m < MM; ++m) { xs[m] = xp + (m0 + m) * K; ys[m] = yp + (m0 + m) * N; }
        constexpr int NR = tile_rows<MM>();
        for (int64_t n = b0 * ROWS; n < std::min(N, b1 * ROWS); n += NR) {
          if (N - n >= NR) { if (f32) dense_tile<NR, MM>(xs, K, n, ys, lf); else dense_tile<NR, MM>(xs, K, n, ys, lb); }
          else for (int64_t r = n; r < N; ++r) { if (f32) dense_tile<1, MM>(xs, K, r, ys, lf); else dense_tile<1, MM>(xs, K, r, ys, lb); }
        }
      });
    }
  });
  return y;
}
