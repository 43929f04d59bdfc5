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
#include "tiles.h"

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

// Rows [b0 * ROWS, b1 * ROWS) of y = W x for one weight; x prepared as the kind's GEMV reads it (xb, xs8:
// the bf16 dot-product layout, when dot; xs: per-32 sums). The per-layer GEMVs' kernels, so each row's
// sums are that GEMV's bits.
inline void row_blocks(int64_t kind, bool dot, const Op& op, const float* x, const uint16_t* xb, const float* xs8,
                       const float* xs, int64_t N, int64_t K, float* y, int64_t b0, int64_t b1) {
  if (kind == KIND_INT8) {
    int8_blocks(x, reinterpret_cast<const int8_t*>(op.w), static_cast<const float*>(op.s), N, K, y, b0, b1);
  } else if (kind == KIND_INT4) {
    const uint16_t* sm = static_cast<const uint16_t*>(op.s);
    if (dot) int4_blocks_bf16(xb, xs8, x, xs, op.w, sm, N, K, y, b0, b1);
    else int4_blocks(x, xs, op.w, sm, N, K, y, b0, b1);
  } else if (dot) {
    q_blocks_bf16(kind, xb, xs8, xs, op.w, N, K, y, b0, b1);
  } else {
    q_blocks(kind, x, xs, op.w, N, K, y, b0, b1);
  }
}

// Whether the kind's GEMV takes bf16 dot products for bf16 activations at width K.
inline bool dot_kind(int64_t kind, int64_t K, bool bf16) {
  return bf16 && (kind == KIND_INT4 ? cpu_has_bf16() : is_block_kind(kind) && bf16_kind(kind, K));
}

// R activation rows of width K (fp32 values; bf16 values when bf16) prepared once for the row kernels.
struct Prepared {
  bool dot;
  int64_t K;
  std::vector<uint16_t> xb;
  std::vector<float> xs8, xs;
  Prepared(int64_t kind, const float* x, int64_t R, int64_t K_, bool bf16, bool parallel)
      : dot(dot_kind(kind, K_, bf16)), K(K_), xb(dot ? R * K_ : 0), xs8(dot ? R * (K_ / 4) : 0), xs(R * (K_ / 32)) {
    auto one = [&](int64_t i) {
      const float* xi = x + i * K;
      if (!dot) { if (kind != KIND_INT8) group_sums(xi, K / 32, xs.data() + i * (K / 32)); return; }
      if (kind == KIND_INT4) int4_prep_bf16(xi, K, xb.data() + i * K, xs8.data() + i * (K / 4), xs.data() + i * (K / 32));
      else block_prep_bf16(kind, xi, K, xb.data() + i * K, xs8.data() + i * (K / 4), xs.data() + i * (K / 32));
    };
    if (parallel) at::parallel_for(0, R, 16, [&](int64_t a, int64_t b) { for (int64_t i = a; i < b; ++i) one(i); });
    else for (int64_t i = 0; i < R; ++i) one(i);
  }
  const uint16_t* b(int64_t i) const { return dot ? xb.data() + i * K : nullptr; }
  const float* s8(int64_t i) const { return dot ? xs8.data() + i * (K / 4) : nullptr; }
  const float* s(int64_t i) const { return xs.data() + i * (K / 32); }
};

// y [J, N] = W_j x_j for J weights [N, K] of one kind; x_j = x + j * xstride (xstride 0: one x for all).
// bf16: the x values are bf16 values (the dot-product kernels' inputs). All J x N rows are one
// parallel loop, in ROWS blocks.
void grouped_gemv(int64_t kind, const std::vector<Op>& ops, const float* x, int64_t xstride, int64_t N, int64_t K,
                  bool bf16, float* y) {
  const int64_t J = static_cast<int64_t>(ops.size()), nb = (N + ROWS - 1) / ROWS, X = xstride ? J : 1;
  const Prepared p(kind, x, X, K, bf16, false);
  at::parallel_for(0, J * nb, 4, [&](int64_t a, int64_t b) {
    while (a < b) {
      const int64_t j = a / nb, b0 = a % nb, b1 = std::min(nb, b0 + (b - a)), i = xstride ? j : 0;
      row_blocks(kind, p.dot, ops[j], x + i * xstride, p.b(i), p.s8(i), p.s(i), N, K, y + j * N, b0, b1);
      a += b1 - b0;
    }
  });
}

// Bytes of one weight row as the kind stores it (int4: nibbles and (scale, zero) pairs).
inline int64_t row_bytes(int64_t kind, int64_t K) {
  return kind == KIND_INT4 ? K / 2 + K / 32 * 4 : kind == KIND_INT8 ? K + 4 : block_row_bytes(kind, K);
}

// y [S, N]: slot s's row x[s] through weight j's rows, for the slots [off[j], off[j + 1]) of each of J
// weights (one expert's tokens). A chunk of ~24 KB of weight rows is read from memory once and passed
// by all of its slots while it sits in cache (tiles of several rows where the kind has them: the same
// bits), so an expert's weights are read once per step however many tokens it serves; the J x chunks
// work items are one parallel loop.
void grouped_rows(int64_t kind, const std::vector<Op>& ops, const std::vector<int64_t>& off, const float* x,
                  const Prepared& p, int64_t N, int64_t K, float* y) {
  const int64_t J = static_cast<int64_t>(ops.size()), blocks = (N + ROWS - 1) / ROWS;
  const int64_t ch = std::max<int64_t>(1, 24576 / (ROWS * row_bytes(kind, K))), nc = (blocks + ch - 1) / ch;
  at::parallel_for(0, J * nc, 1, [&](int64_t a, int64_t b) {
    for (int64_t u = a; u < b; ++u) {
      const int64_t j = u / nc, b0 = (u % nc) * ch, b1 = std::min(blocks, b0 + ch);
      const int64_t s0 = off[j], M = off[j + 1] - s0, n0 = b0 * ROWS, n1 = std::min(N, b1 * ROWS);
      if (M == 0) continue;
      if (is_block_kind(kind) && M > 1) {   // one row: the GEMV's own kernel (it prefetches a lone stream)
        auto in = [&](int64_t m) { return BlockRowsIn{x + (s0 + m) * K, p.b(s0 + m), p.s8(s0 + m)}; };
        auto out = [&](int64_t m) { return y + (s0 + m) * N + n0; };
        if (block_tiles(kind, K, p.dot, M, in, ops[j].w, n0, n1, out)) continue;
      }
      for (int64_t m = s0; m < s0 + M; ++m)
        row_blocks(kind, p.dot, ops[j], x + m * K, p.b(m), p.s8(m), p.s(m), N, K, y + m * N, b0, b1);
    }
  });
}

// The FFN in activation dtype T (float or BFloat16), rounding where the per-expert torch path does.
template <typename T>
void ffn(int64_t kind, const std::vector<Op>& gu, const std::vector<Op>& dn, const float* x, int64_t H, int64_t F,
         const std::vector<int64_t>& ids, const float* wt, float* out) {
  constexpr bool bf = !std::is_same<T, float>::value;
  const int64_t J = static_cast<int64_t>(gu.size());
  std::vector<float> g(J * 2 * F), act(J * F), d(J * H);
  grouped_gemv(kind, gu, x, 0, 2 * F, H, bf, g.data());
  // the element-wise parts over the threads too: serial, SiLU's J x F exps and the weighted sum were
  // ~50 us a layer (~0.8 ms an OLMoE token) with the second core idle; each element's math is unchanged
  at::parallel_for(0, J * F, 1024, [&](int64_t a0, int64_t a1) {
    for (int64_t u = a0; u < a1; ++u) {
      const int64_t j = u / F, i = u % F;
      const float a = rnd<T>(g[j * 2 * F + i]);
      act[u] = rnd<T>(rnd<T>(a / (1.f + std::exp(-a))) * rnd<T>(g[j * 2 * F + F + i]));
    }
  });
  grouped_gemv(kind, dn, act.data(), F, H, F, bf, d.data());
  // accumulated in ascending expert id, each term rounded, as the per-expert path adds them
  std::vector<int64_t> order(J);
  for (int64_t j = 0; j < J; ++j) order[j] = j;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  at::parallel_for(0, H, 512, [&](int64_t n0, int64_t n1) {
    std::fill(out + n0, out + n1, 0.f);
    for (int64_t j : order) {
      const float w = rnd<T>(wt[j]);
      for (int64_t n = n0; n < n1; ++n) out[n] = rnd<T>(out[n] + rnd<T>(rnd<T>(d[j * H + n]) * w));
    }
  });
}

// The FFN of S slots (a token's row routed to one expert; slots [off[j], off[j + 1]) are expert j's,
// tok[s] the slot's token, wt[s] its routing weight) over x [N, H], in activation dtype T, rounding
// where ffn (and the per-expert torch path) rounds: each slot's values are those the token would get
// alone in a decode step. out [N, H]: each token's terms added in ascending expert id (ids ascending).
template <typename T>
void ffn_rows(int64_t kind, const std::vector<Op>& gu, const std::vector<Op>& dn, const float* x, int64_t H, int64_t F,
              const std::vector<int64_t>& off, const int64_t* tok, const float* wt, int64_t N, float* out) {
  constexpr bool bf = !std::is_same<T, float>::value;
  const int64_t J = static_cast<int64_t>(gu.size()), S = off[J];
  std::vector<float> xg(S * H), g(S * 2 * F), act(S * F), d(S * H);
  at::parallel_for(0, S, 16, [&](int64_t a, int64_t b) {
    for (int64_t s = a; s < b; ++s) std::copy(x + tok[s] * H, x + tok[s] * H + H, xg.data() + s * H);
  });
  {
    const Prepared px(kind, xg.data(), S, H, bf, true);
    grouped_rows(kind, gu, off, xg.data(), px, 2 * F, H, g.data());
  }
  at::parallel_for(0, S, 16, [&](int64_t a, int64_t b) {
    for (int64_t s = a; s < b; ++s)
      for (int64_t i = 0; i < F; ++i) {
        const float gt = rnd<T>(g[s * 2 * F + i]), up = rnd<T>(g[s * 2 * F + F + i]);
        act[s * F + i] = rnd<T>(rnd<T>(gt / (1.f + std::exp(-gt))) * up);
      }
  });
  {
    const Prepared pa(kind, act.data(), S, F, bf, true);
    grouped_rows(kind, dn, off, act.data(), pa, H, F, d.data());
  }
  std::fill(out, out + N * H, 0.f);
  at::parallel_for(0, H, 256, [&](int64_t a, int64_t b) {
    for (int64_t j = 0; j < J; ++j)
      for (int64_t s = off[j]; s < off[j + 1]; ++s) {
        const float w = rnd<T>(wt[s]);
        float* o = out + tok[s] * H;
        const float* ds = d.data() + s * H;
        for (int64_t n = a; n < b; ++n) o[n] = rnd<T>(o[n] + rnd<T>(rnd<T>(ds[n]) * w));
      }
  });
}

}  // namespace

torch::Tensor experts_rows(torch::Tensor x, int64_t kind, std::vector<torch::Tensor> gu_w, std::vector<torch::Tensor> gu_s,
                           std::vector<torch::Tensor> down_w, std::vector<torch::Tensor> down_s, std::vector<int64_t> ids,
                           std::vector<int64_t> offsets, torch::Tensor tokens, torch::Tensor weight) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() && x.size(1) % 32 == 0,
              "experts_rows: x must be [N, H] contiguous, H % 32 == 0");
  const int64_t N = x.size(0), H = x.size(1), J = static_cast<int64_t>(gu_w.size());
  TORCH_CHECK(J > 0 && down_w.size() == gu_w.size() && static_cast<int64_t>(ids.size()) == J &&
              static_cast<int64_t>(offsets.size()) == J + 1 && offsets[0] == 0, "experts_rows: J experts, J + 1 offsets");
  for (int64_t j = 0; j < J; ++j)
    TORCH_CHECK(offsets[j + 1] >= offsets[j] && (j == 0 || ids[j] > ids[j - 1]), "experts_rows: ids ascending, offsets non-decreasing");
  const int64_t S = offsets[J];
  TORCH_CHECK(kind == KIND_INT4 || kind == KIND_INT8 || is_block_kind(kind), "experts_rows: unsupported kind ", kind);
  TORCH_CHECK(tokens.scalar_type() == torch::kInt64 && tokens.is_contiguous() && tokens.numel() == S &&
              weight.scalar_type() == torch::kFloat32 && weight.is_contiguous() && weight.numel() == S,
              "experts_rows: tokens int64 and weight fp32, one per slot");
  const int64_t* tok = tokens.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(tok[s] >= 0 && tok[s] < N, "experts_rows: token out of range");
  const int64_t F = gu_w[0].size(0) / 2;
  TORCH_CHECK(F > 0 && F % 32 == 0 && (!is_block_kind(kind) || kind <= KIND_Q4_1 || (H % 256 == 0 && F % 256 == 0)),
              "experts_rows: widths the kind's blocks do not divide");
  const auto gu = ops_of(gu_w, gu_s, kind, 2 * F, H, "experts_rows gate_up");
  const auto dn = ops_of(down_w, down_s, kind, H, F, "experts_rows down");
  std::vector<float> o(N * H);
  if (x.scalar_type() == torch::kFloat32) {
    ffn_rows<float>(kind, gu, dn, x.data_ptr<float>(), H, F, offsets, tok, weight.data_ptr<float>(), N, o.data());
    return torch::from_blob(o.data(), {N, H}, torch::kFloat32).clone();
  }
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "experts_rows: x fp32 or bf16");
  auto xf = x.to(torch::kFloat32).contiguous();
  ffn_rows<at::BFloat16>(kind, gu, dn, xf.data_ptr<float>(), H, F, offsets, tok, weight.data_ptr<float>(), N, o.data());
  return torch::from_blob(o.data(), {N, H}, torch::kFloat32).to(torch::kBFloat16);
}

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

// ---- One decode token's whole routed-experts half, operands bound once --------------------------
// Why: from Python a token's MoE half is ~15 torch ops (router GEMV, softmax, top-k, renormalise,
// the ids to a list, the chosen experts' 4 x k tensors through pybind) per layer: ~1-2 ms a token at
// OLMoE's 16 layers, where the weights take ~20 ms to read. Routing here is the torch path's math in
// fp32 (softmax over all E logits, the top k, renormalised if asked); the logits' summation order
// differs from torch's GEMV, so a weight may differ in its last fp32 bit, and a near-tie may pick
// the other expert.

ExpertsRouted::ExpertsRouted(torch::Tensor router, int64_t k, bool renormalise, int64_t kind,
                             std::vector<torch::Tensor> gu_w, std::vector<torch::Tensor> gu_s,
                             std::vector<torch::Tensor> down_w, std::vector<torch::Tensor> down_s)
    : k_(k), kind_(kind), renorm_(renormalise) {
  TORCH_CHECK(router.dim() == 2 && router.scalar_type() == torch::kFloat32 && router.is_contiguous() &&
              router.device().is_cpu(), "ExpertsRouted: router must be [E, h] fp32 contiguous");
  E_ = router.size(0);
  H_ = router.size(1);
  TORCH_CHECK(H_ % 32 == 0 && k_ > 0 && k_ <= E_ && static_cast<int64_t>(gu_w.size()) == E_ &&
              down_w.size() == gu_w.size(), "ExpertsRouted: one gate_up and down per expert, 0 < k <= E");
  TORCH_CHECK(kind == KIND_INT4 || kind == KIND_INT8 || is_block_kind(kind), "ExpertsRouted: unsupported kind ", kind);
  F_ = gu_w[0].size(0) / 2;
  TORCH_CHECK(F_ > 0 && F_ % 32 == 0 && (!is_block_kind(kind) || kind <= KIND_Q4_1 || (H_ % 256 == 0 && F_ % 256 == 0)),
              "ExpertsRouted: widths the kind's blocks do not divide");
  for (const Op& op : ops_of(gu_w, gu_s, kind, 2 * F_, H_, "ExpertsRouted gate_up")) gu_.emplace_back(op.w, op.s);
  for (const Op& op : ops_of(down_w, down_s, kind, H_, F_, "ExpertsRouted down")) dn_.emplace_back(op.w, op.s);
  keep_ = {router};
  for (auto* v : {&gu_w, &gu_s, &down_w, &down_s}) keep_.insert(keep_.end(), v->begin(), v->end());
  router_ = router.data_ptr<float>();
}

void ExpertsRouted::route(const float* x, std::vector<int64_t>& ids, std::vector<float>& wt) const {
  std::vector<float> p(E_);
  // the router's E x h fp32 rows (512 KB a layer at OLMoE's shape) over the threads
  at::parallel_for(0, E_, 8, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const float* r = router_ + e * H_;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < H_; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(r + i), _mm512_loadu_ps(x + i), acc);
      p[e] = _mm512_reduce_add_ps(acc);
    }
  });
  const float mx = *std::max_element(p.begin(), p.end());
  float sum = 0.f;
  for (auto& v : p) { v = std::exp(v - mx); sum += v; }
  for (auto& v : p) v /= sum;
  std::vector<int64_t> order(E_);
  for (int64_t e = 0; e < E_; ++e) order[e] = e;
  std::partial_sort(order.begin(), order.begin() + k_, order.end(),
                    [&](int64_t a, int64_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
  ids.assign(order.begin(), order.begin() + k_);
  wt.resize(k_);
  float top = 0.f;
  for (int64_t j = 0; j < k_; ++j) { wt[j] = p[ids[j]]; top += wt[j]; }
  if (renorm_) for (auto& v : wt) v /= top;
}

torch::Tensor ExpertsRouted::step(torch::Tensor x) {
  TORCH_CHECK(x.numel() == H_ && x.is_contiguous() && x.device().is_cpu() &&
              (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16), "ExpertsRouted: x [h] fp32 or bf16");
  const bool bf = x.scalar_type() == torch::kBFloat16;
  std::vector<float> xf(H_), o(H_);
  if (bf) { const at::BFloat16* xb = x.data_ptr<at::BFloat16>(); for (int64_t i = 0; i < H_; ++i) xf[i] = static_cast<float>(xb[i]); }
  else std::copy(x.data_ptr<float>(), x.data_ptr<float>() + H_, xf.begin());
  std::vector<int64_t> ids;
  std::vector<float> wt;
  route(xf.data(), ids, wt);
  std::vector<Op> gu, dn;
  for (int64_t e : ids) { gu.push_back({gu_[e].first, gu_[e].second}); dn.push_back({dn_[e].first, dn_[e].second}); }
  auto out = torch::empty_like(x);
  if (bf) {
    ffn<at::BFloat16>(kind_, gu, dn, xf.data(), H_, F_, ids, wt.data(), o.data());
    at::BFloat16* ob = out.data_ptr<at::BFloat16>();
    for (int64_t n = 0; n < H_; ++n) ob[n] = static_cast<at::BFloat16>(o[n]);
  } else {
    ffn<float>(kind_, gu, dn, xf.data(), H_, F_, ids, wt.data(), o.data());
    std::copy(o.begin(), o.end(), out.data_ptr<float>());
  }
  return out;
}

std::vector<torch::Tensor> ExpertsRouted::route_only(torch::Tensor x) {
  TORCH_CHECK(x.numel() == H_ && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "route_only: x [h] fp32");
  std::vector<int64_t> ids;
  std::vector<float> wt;
  route(x.data_ptr<float>(), ids, wt);
  return {torch::tensor(ids, torch::kInt64), torch::tensor(wt, torch::kFloat32)};
}
