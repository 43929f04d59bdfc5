// Fused decode-step ops (one token, B = 1).
// At decode each op's work is tiny (hidden 576, 9 heads x 64), so the cost of a step is the number
// of ops, not the bytes: each fused op below replaces 5-25 torch ops. They run single-threaded
// (attention splits heads over threads only when the cache is long enough to pay for the handoff).
// Per-row math (and its rounding points): decode_math.h.
#include "kernels.h"
#include "decode_math.h"

namespace {

template <typename T>
void add_rmsnorm_rows(const T* x, const T* y, const float* w, T* sum, T* out, int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < n; ++i)
      sum[r * n + i] = static_cast<T>(static_cast<float>(x[r * n + i]) + static_cast<float>(y[r * n + i]));
    rmsnorm_row<T>(sum + r * n, w, out + r * n, n, eps);
  }
}

template <typename T>
void decode_attention_impl(const T* qkv, const T* c, const T* s, T* kc, T* vc, T* out, int64_t pos,
                           int64_t H, int64_t K, int64_t D, int64_t L, float scale) {
  std::vector<float> buf(D);
  for (int64_t kh = 0; kh < K; ++kh) kv_write_head<T, T>(qkv, c, s, kc, vc, pos, kh, H, K, D, L, buf.data());
  // Below ~64k multiply-adds per head the OpenMP handoff costs more than the work it splits.
  const int64_t grain = (pos + 1) * D >= 65536 ? 1 : H;
  at::parallel_for(0, H, grain, [&](int64_t h0, int64_t h1) {
    std::vector<float> q(D), p(pos + 1);
    for (int64_t h = h0; h < h1; ++h) attend_head<T, T, T>(qkv, c, s, kc, vc, out, pos, h, H, K, D, L, scale, q.data(), p.data());
  });
}

template <typename T>
void silu_mul_rows(const T* gu, T* out, int64_t rows, int64_t I) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < I; ++i) {
      const float g = static_cast<float>(gu[r * 2 * I + i]);
      const float sg = rnd<T>(g / (1.f + std::exp(-g)));
      out[r * I + i] = static_cast<T>(sg * static_cast<float>(gu[r * 2 * I + I + i]));
    }
}

void check_act(const torch::Tensor& t) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "contiguous CPU tensor expected");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16, "fp32 or bf16 expected");
}

}  // namespace

// rms_norm over the last dim: fp32 math, output in x's dtype. w: [n] fp32.
torch::Tensor rmsnorm(torch::Tensor x, torch::Tensor w, double eps) {
  check_act(x);
  const int64_t n = x.size(-1), rows = x.numel() / n;
  auto out = torch::empty_like(x);
  const float* wp = w.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    if (x.scalar_type() == torch::kFloat32)
      rmsnorm_row<float>(x.data_ptr<float>() + r * n, wp, out.data_ptr<float>() + r * n, n, static_cast<float>(eps));
    else
      rmsnorm_row<at::BFloat16>(x.data_ptr<at::BFloat16>() + r * n, wp, out.data_ptr<at::BFloat16>() + r * n, n,
                                static_cast<float>(eps));
  }
  return out;
}

// (x + y, rms_norm(x + y)): the residual add and the next norm in one pass. x, y same dtype.
std::vector<torch::Tensor> add_rmsnorm(torch::Tensor x, torch::Tensor y, torch::Tensor w, double eps) {
  check_act(x);
  check_act(y);
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && x.numel() == y.numel(), "x and y must match");
  const int64_t n = x.size(-1), rows = x.numel() / n;
  auto sum = torch::empty_like(x), out = torch::empty_like(x);
  if (x.scalar_type() == torch::kFloat32)
    add_rmsnorm_rows<float>(x.data_ptr<float>(), y.data_ptr<float>(), w.data_ptr<float>(), sum.data_ptr<float>(),
                            out.data_ptr<float>(), rows, n, static_cast<float>(eps));
  else
    add_rmsnorm_rows<at::BFloat16>(x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), w.data_ptr<float>(),
                                   sum.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), rows, n,
                                   static_cast<float>(eps));
  return {sum, out};
}

// One decode step of attention for B = 1: qkv [.., (H + 2K) * D] from the fused projection; cos/sin
// [.., D] for position `pos`; RoPE on q and k, k and v written to the caches [1, K, L, D] at `pos`,
// then softmax(q k^T * scale) v over positions 0..pos with GQA (head h reads kv head h / (H/K)).
// Returns [H * D] in qkv's dtype. D % 16 == 0.
torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                               torch::Tensor v_cache, int64_t pos, int64_t H, int64_t K, int64_t D, double scale) {
  check_act(qkv);
  check_act(k_cache);
  check_act(v_cache);
  const auto dt = qkv.scalar_type();
  TORCH_CHECK(cos.scalar_type() == dt && sin.scalar_type() == dt && k_cache.scalar_type() == dt &&
              v_cache.scalar_type() == dt, "one dtype expected");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == D && sin.numel() == D, "cos/sin: [D]");
  TORCH_CHECK(D % 16 == 0 && qkv.numel() == (H + 2 * K) * D && k_cache.size(0) == 1 && k_cache.size(1) == K &&
              k_cache.size(3) == D && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  const int64_t L = k_cache.size(2);
  TORCH_CHECK(pos >= 0 && pos < L, "position outside the cache");
  auto out = torch::empty({H * D}, qkv.options());
  const float sc = static_cast<float>(scale);
  if (dt == torch::kFloat32)
    decode_attention_impl<float>(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                                 k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), out.data_ptr<float>(), pos,
                                 H, K, D, L, sc);
  else
    decode_attention_impl<at::BFloat16>(qkv.data_ptr<at::BFloat16>(), cos.data_ptr<at::BFloat16>(),
                                        sin.data_ptr<at::BFloat16>(), k_cache.data_ptr<at::BFloat16>(),
                                        v_cache.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), pos, H, K, D,
                                        L, sc);
  return out;
}

// silu(gate) * up for gate_up [.., 2I] (gate first) -> [.., I], in gate_up's dtype.
torch::Tensor silu_mul(torch::Tensor gu) {
  check_act(gu);
  const int64_t I = gu.size(-1) / 2, rows = gu.numel() / (2 * I);
  auto sizes = gu.sizes().vec();
  sizes.back() = I;
  auto out = torch::empty(sizes, gu.options());
  if (gu.scalar_type() == torch::kFloat32)
    silu_mul_rows<float>(gu.data_ptr<float>(), out.data_ptr<float>(), rows, I);
  else
    silu_mul_rows<at::BFloat16>(gu.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), rows, I);
  return out;
}
