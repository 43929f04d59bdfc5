// A MoE layer's routed experts for one decode token, in one call: the k experts' gate/up GEMVs as one
// grouped GEMV, SiLU(gate) * up, their down GEMVs as another, and the routing-weighted sum.
// Why: run expert by expert from Python, one token costs k x (index_select, 2 GEMVs, silu, mul,
// scale, index_put) ~ 10 ops per expert; at OLMoE's 8 of 64 experts x 16 layers that is ~1300 ops,
// several milliseconds a token of dispatch on top of the ~13 ms the weights take to read.
// One grouped GEMV also splits all k experts' rows over the threads at once (each expert alone is
// 2048 rows: a few hundred KB a thread, where the hardware prefetcher barely ramps up).
// The row kernels are the per-layer GEMVs' (rows.h, blocks.h), so each expert's sums are those of
// its own GEMV; rounding to the activation dtype happens where the per-expert path rounds.
#include "kernels.h"
#include "blocks.h"

namespace {

// One expert linear as the row kernels read it: int4 (packed [N, K/2], (scale, zero) [N, K/32, 2] bf16),
// int8 (q [N, K], scale [N] fp32) or GGUF blocks ([N, row bytes]).
struct Op {
  const uint8_t* w;
  const void* s;
};

std::vector<Op> ops_of(const std::vector<torch::Tensor>& w, const std::vector<torch::Tensor>& s, int64_t kind,
                       int64_t N, int64_t K, const char* what) {
  TORCH_CHECK(s.size() == w.size() || (is_block_kind(kind) && s.empty()), what, ": one scale per weight");
  std::vector<Op> ops;
  for (size_t j = 0; j < w.size(); ++j) {
    const auto& t = w[j];
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu() && t.dim() == 2 && t.size(0) == N, what, ": bad weight");
    if (kind == KIND_INT4) {
      TORCH_CHECK(t.scalar_type() == torch::kUInt8 && t.size(1) * 2 == K && s[j].scalar_type() == torch::kBFloat16 &&
                  s[j].numel() == N * (K / 32) * 2 && s[j].is_contiguous(), what, ": bad int4 operands");
      ops.push_back({t.data_ptr<uint8_t>(), s[j].data_ptr()});
    } else if (kind == KIND_INT8) {
      TORCH_CHECK(t.scalar_type() == torch::kInt8 && t.size(1) == K && s[j].scalar_type() == torch::kFloat32 &&
                  s[j].numel() == N && s[j].is_contiguous(), what, ": bad int8 operands");
      ops.push_back({reinterpret_cast<const uint8_t*>(t.data_ptr<int8_t>()), s[j].data_ptr()});
    } else {
      TORCH_CHECK(is_block_kind(kind) && t.scalar_type() == torch::kUInt8 && t.size(1) == block_row_bytes(kind, K),
                  what, ": bad block operands");
      ops.push_back({t.data_ptr<uint8_t>(), nullptr});
    }
  }
  return ops;
}

// y [J, N] = W_j x_j for J weights [N, K] of one kind; x_j = x + j * xstride (xstride 0: one x for all).
// bf16: the x values are bf16 values (the dot-product kernels' inputs). All J x N rows are one
// parallel loop, in ROWS blocks.
void grouped_gemv(int64_t kind, const std::vector<Op>& ops, const float* x, int64_t xstride, int64_t N, int64_t K,
                  bool bf16, float* y) {
  const int64_t J = static_cast<int64_t>(ops.size()), nb = (N + ROWS - 1) / ROWS, X = xstride ? J : 1;
  const bool dot = bf16 && (kind == KIND_INT4 ? cpu_has_bf16() : is_block_kind(kind) && bf16_kind(kind, K));
  std::vector<uint16_t> xb(dot ? X * K : 0);
  std::vector<float> xs8(dot ? X * (K / 4) : 0), xs(X * (K / 32));
  for (int64_t i = 0; i < X; ++i) {
    const float* xi = x + i * xstride;
    if (!dot) { if (kind != KIND_INT8) group_sums(xi, K / 32, xs.data() + i * (K / 32)); continue; }
    if (kind == KIND_INT4) int4_prep_bf16(xi, K, xb.data() + i * K, xs8.data() + i * (K / 4), xs.data() + i * (K / 32));
    else block_prep_bf16(kind, xi, K, xb.data() + i * K, xs8.data() + i * (K / 4), xs.data() + i * (K / 32));
  }
  at::parallel_for(0, J * nb, 4, [&](int64_t a, int64_t b) {
    while (a < b) {
      const int64_t j = a / nb, b0 = a % nb, b1 = std::min(nb, b0 + (b - a)), i = xstride ? j : 0;
      const float* xi = x + i * xstride;
      const float* xsi = xs.data() + i * (K / 32);
      const Op& op = ops[j];
      float* yj = y + j * N;
      if (kind == KIND_INT8) {
        int8_blocks(xi, reinterpret_cast<const int8_t*>(op.w), static_cast<const float*>(op.s), N, K, yj, b0, b1);
      } else if (kind == KIND_INT4) {
        const uint16_t* sm = static_cast<const uint16_t*>(op.s);
        if (dot) int4_blocks_bf16(xb.data() + i * K, xs8.data() + i * (K / 4), xi, xsi, op.w, sm, N, K, yj, b0, b1);
        else int4_blocks(xi, xsi, op.w, sm, N, K, yj, b0, b1);
      } else if (dot) {
        q_blocks_bf16(kind, xb.data() + i * K, xs8.data() + i * (K / 4), xsi, op.w, N, K, yj, b0, b1);
      } else {
        q_blocks(kind, xi, xsi, op.w, N, K, yj, b0, b1);
      }
      a += b1 - b0;
    }
  });
}

template <typename T>
void round_all(float* v, int64_t n) { for (int64_t i = 0; i < n; ++i) v[i] = rnd<T>(v[i]); }

// The FFN in activation dtype T (float or BFloat16), rounding where the per-expert torch path does.
template <typename T>
void ffn(int64_t kind, const std::vector<Op>& gu, const std::vector<Op>& dn, const float* x, int64_t H, int64_t F,
         const std::vector<int64_t>& ids, const float* wt, float* out) {
  constexpr bool bf = !std::is_same<T, float>::value;
  const int64_t J = static_cast<int64_t>(gu.size());
  std::vector<float> g(J * 2 * F), act(J * F), d(J * H);
  grouped_gemv(kind, gu, x, 0, 2 * F, H, bf, g.data());
  round_all<T>(g.data(), J * 2 * F);
  for (int64_t j = 0; j < J; ++j)
    for (int64_t i = 0; i < F; ++i) {
      const float a = g[j * 2 * F + i];
      act[j * F + i] = rnd<T>(rnd<T>(a / (1.f + std::exp(-a))) * g[j * 2 * F + F + i]);
    }
  grouped_gemv(kind, dn, act.data(), F, H, F, bf, d.data());
  round_all<T>(d.data(), J * H);
  // accumulated in ascending expert id, each term rounded, as the per-expert path adds them
  std::vector<int64_t> order(J);
  for (int64_t j = 0; j < J; ++j) order[j] = j;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  std::fill(out, out + H, 0.f);
  for (int64_t j : order) {
    const float w = rnd<T>(wt[j]);
    for (int64_t n = 0; n < H; ++n) out[n] = rnd<T>(out[n] + rnd<T>(d[j * H + n] * w));
  }
}

}  // namespace

torch::Tensor experts_ffn(torch::Tensor x, int64_t kind, std::vector<torch::Tensor> gu_w, std::vector<torch::Tensor> gu_s,
                          std::vector<torch::Tensor> down_w, std::vector<torch::Tensor> down_s,
                          std::vector<int64_t> ids, torch::Tensor weight) {
  const int64_t H = x.numel(), J = static_cast<int64_t>(gu_w.size());
  TORCH_CHECK(J > 0 && down_w.size() == gu_w.size() && static_cast<int64_t>(ids.size()) == J, "experts_ffn: k of each");
  TORCH_CHECK(kind == KIND_INT4 || kind == KIND_INT8 || is_block_kind(kind), "experts_ffn: unsupported kind ", kind);
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu() && H % 32 == 0, "experts_ffn: x must be contiguous, width % 32");
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.is_contiguous() && weight.numel() == J,
              "experts_ffn: weight must be k fp32 values");
  const int64_t F = gu_w[0].size(0) / 2;
  TORCH_CHECK(F > 0 && F % 32 == 0 && (!is_block_kind(kind) || kind <= KIND_Q4_1 || (H % 256 == 0 && F % 256 == 0)),
              "experts_ffn: widths the kind's blocks do not divide");
  const auto gu = ops_of(gu_w, gu_s, kind, 2 * F, H, "experts_ffn gate_up");
  const auto dn = ops_of(down_w, down_s, kind, H, F, "experts_ffn down");
  auto out = torch::empty({H}, x.options());
  std::vector<float> o(H);
  if (x.scalar_type() == torch::kFloat32) {
    ffn<float>(kind, gu, dn, x.data_ptr<float>(), H, F, ids, weight.data_ptr<float>(), o.data());
    std::copy(o.begin(), o.end(), out.data_ptr<float>());
    return out;
  }
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "experts_ffn: x fp32 or bf16");
  std::vector<float> xf(H);
  const at::BFloat16* xb = x.data_ptr<at::BFloat16>();
  for (int64_t k = 0; k < H; ++k) xf[k] = static_cast<float>(xb[k]);
  ffn<at::BFloat16>(kind, gu, dn, xf.data(), H, F, ids, weight.data_ptr<float>(), o.data());
  at::BFloat16* ob = out.data_ptr<at::BFloat16>();
  for (int64_t n = 0; n < H; ++n) ob[n] = static_cast<at::BFloat16>(o[n]);
  return out;
}
