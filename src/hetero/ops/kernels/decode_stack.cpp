// The whole decoder stack for one decode step (B = 1, T = 1) in one call.
// Why: at decode a layer's work is ~10 small ops on 576-wide vectors; called one by one from Python
// each pays a Python frame, torch dispatch, an output allocation and (GEMVs) an OpenMP wake-up, which
// together cost more than the weights take to stream. Here every layer runs inside ONE OpenMP
// parallel region: GEMVs split rows over the threads, small ops are split or repeated per thread,
// and threads meet at barriers (spinning, so they stay hot). Same math and the same T (bf16) rounding
// points as the fused per-layer ops (decode_ops.cpp): norm, qkv, rope + KV write + attention, o + residual,
// norm, gate_up + silu*mul, down + residual.
#include "kernels.h"
#include "rows.h"
#include "blocks.h"
#include "decode_math.h"
#include "stack_lin.h"
#include <omp.h>

DecodeStack::DecodeStack(int64_t H, int64_t K, int64_t D, int64_t E, int64_t I, double eps, double scale, bool bf16)
    : H_(H), K_(K), D_(D), E_(E), I_(I), eps_(static_cast<float>(eps)), scale_(static_cast<float>(scale)),
      dt_(bf16 ? torch::kBFloat16 : torch::kFloat32) {
  TORCH_CHECK(D % 16 == 0 && H % K == 0, "head_dim % 16 == 0 and H % K == 0 expected");
  width_ = round_up(std::max({E, H * D, I}), 64);  // widest GEMV input, padded for int8/int4
  qkv_.assign((H + 2 * K) * D, 0.f);
  attn_.assign(width_, 0.f);
  act_.assign(width_, 0.f);
}

void DecodeStack::add_layer(std::vector<std::vector<int64_t>> kinds, std::vector<std::vector<torch::Tensor>> ws,
                             std::vector<torch::Tensor> s, std::vector<torch::Tensor> b, torch::Tensor attn_norm,
                             torch::Tensor mlp_norm) {
  TORCH_CHECK(kinds.size() == 4 && ws.size() == 4 && s.size() == 4 && b.size() == 4, "4 linears expected");
  const int64_t n_out[4] = {(H_ + 2 * K_) * D_, E_, 2 * I_, E_}, n_in[4] = {E_, H_ * D_, E_, I_};
  Layer ly;
  Lin* lins[4] = {&ly.qkv, &ly.o, &ly.gu, &ly.down};
  for (int i = 0; i < 4; ++i) {
    Lin& L = *lins[i];
    TORCH_CHECK(!kinds[i].empty() && kinds[i].size() == ws[i].size(), "linear ", i, ": one weight per kind");
    for (const auto& t : ws[i])
      TORCH_CHECK(t.is_contiguous() && t.device().is_cpu() && t.dim() == 2, "weight: contiguous 2-D CPU");
    if (kinds[i].size() > 1 || is_block_kind(kinds[i][0])) {
      // GGUF blocks as stored, bf16 activations (their bf16 kernels read x as bf16): K is the
      // layer's input width (a whole number of blocks); the parts' rows follow one another
      L.kind = kinds[i].size() > 1 ? KIND_MIXED : kinds[i][0];
      L.K = n_in[i];
      TORCH_CHECK(dt_ == torch::kBFloat16 && L.K <= width_ && L.K % 16 == 0, "block linear ", i, ": bf16 activations");
      int64_t n = 0;
      for (size_t j = 0; j < kinds[i].size(); ++j) {
        const int64_t k = kinds[i][j];
        const auto& t = ws[i][j];
        TORCH_CHECK(is_block_kind(k) && t.scalar_type() == torch::kUInt8 && L.K % (k <= KIND_Q4_1 ? 32 : 256) == 0 &&
                    t.size(1) == block_row_bytes(k, L.K), "block linear ", i, ": row bytes do not match K");
        L.parts.push_back({k, n, n + t.size(0), t.data_ptr()});
        n += t.size(0);
      }
      L.N = n;
      L.w = ws[i][0].data_ptr();
      TORCH_CHECK(L.N == n_out[i], "linear ", i, ": bad shape");
    } else {
      const torch::Tensor& w = ws[i][0];
      L.kind = kinds[i][0];
      L.N = w.size(0);
      L.K = L.kind == KIND_INT4 ? w.size(1) * 2 : w.size(1);
      TORCH_CHECK(L.N == n_out[i] && L.K >= n_in[i] && L.K <= width_ && L.K % 16 == 0, "linear ", i, ": bad shape");
      const auto wt = w.scalar_type();
      switch (L.kind) {
        case KIND_F32: TORCH_CHECK(wt == torch::kFloat32 && dt_ == torch::kFloat32 && L.K == n_in[i], "fp32 linear"); break;
        case KIND_BF16: TORCH_CHECK(wt == torch::kBFloat16 && dt_ == torch::kBFloat16 && L.K == n_in[i], "bf16 linear"); break;
        case KIND_INT8:
          TORCH_CHECK(wt == torch::kInt8 && dt_ == torch::kBFloat16 && s[i].scalar_type() == torch::kFloat32 &&
                      s[i].numel() == L.N && s[i].is_contiguous(), "int8 linear");
          break;
        case KIND_INT4:
          TORCH_CHECK(wt == torch::kUInt8 && dt_ == torch::kBFloat16 && L.K % 32 == 0 &&
                      s[i].scalar_type() == torch::kBFloat16 && s[i].numel() == L.N * (L.K / 32) * 2 &&
                      s[i].is_contiguous(), "int4 linear");
          break;
        default: TORCH_CHECK(false, "unknown linear kind ", L.kind);
      }
      L.w = w.data_ptr();
      L.s = s[i].numel() ? s[i].data_ptr() : nullptr;
    }
    if (b[i].numel()) {
      TORCH_CHECK(b[i].scalar_type() == dt_ && b[i].numel() == L.N && b[i].is_contiguous(), "bias: [N] in act dtype");
      L.bias = b[i].data_ptr();
    }
  }
  for (auto* t : {&attn_norm, &mlp_norm})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->numel() == E_ && t->is_contiguous(), "norm: fp32 [E]");
  ly.attn_norm = attn_norm.data_ptr<float>();
  ly.mlp_norm = mlp_norm.data_ptr<float>();
  layers_.push_back(ly);
  // The stack reads these by pointer: it holds them so they live as long as it does.
  for (const auto& v : ws) keep_.insert(keep_.end(), v.begin(), v.end());
  for (auto* v : {&s, &b}) keep_.insert(keep_.end(), v->begin(), v->end());
  keep_.push_back(attn_norm);
  keep_.push_back(mlp_norm);
}

template <typename T>
void DecodeStack::run(T* x, int64_t pos, int64_t L, const T* c, const T* s, std::vector<torch::Tensor>& kc,
                      std::vector<torch::Tensor>& vc, std::vector<torch::Tensor>* ks,
                      std::vector<torch::Tensor>* vs) {
  const bool q8 = ks != nullptr;
  const int64_t H = H_, K = K_, D = D_, E = E_, I = I_;
  float* qkv = qkv_.data();
  float* attn = attn_.data();
  float* act = act_.data();
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    // Per thread: the normed input (zero beyond E), group sums, one head's q, scores, GEMV rows.
    std::vector<float> h(width_, 0.f), xs(width_ / 32), xs8(width_ / 4), q(D), p(pos + 1),
        y(2 * round_up(std::max({E, I, (H + 2 * K) * D}), ROWS));
    std::vector<uint16_t> xb(width_), xp(width_);
    Input in{nullptr, xs.data(), xb.data(), xs8.data(), xp.data(), {}};
    XI8Buf i8buf(width_);
    bind_i8(in, i8buf);
    int64_t n0, n1;
    // this thread's share of lin's rows over src, added into the residual stream x
    auto rows_into_residual = [&](const Lin& lin, const float* src) {
      prepare(lin, src, in);
      share_lin(lin, tid, nth, n0, n1);
      lin_rows(lin, in, n0, n1, y.data());
      for (int64_t n = n0; n < n1; ++n) x[n] = static_cast<T>(static_cast<float>(x[n]) + out_value<T>(lin, n, y[n - n0]));
    };
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& ly = layers_[l];
      T* kcp = q8 ? nullptr : kc[l].template data_ptr<T>();
      T* vcp = q8 ? nullptr : vc[l].template data_ptr<T>();
      int8_t* kq = q8 ? kc[l].template data_ptr<int8_t>() : nullptr;
      int8_t* vq = q8 ? vc[l].template data_ptr<int8_t>() : nullptr;
      at::Half* ksp = q8 ? (*ks)[l].template data_ptr<at::Half>() : nullptr;
      at::Half* vsp = q8 ? (*vs)[l].template data_ptr<at::Half>() : nullptr;
      // norm (each thread its own copy: cheaper than a barrier) -> qkv rows
      rmsnorm_row<T, float>(x, ly.attn_norm, h.data(), E, eps_);
      prepare(ly.qkv, h.data(), in);
      share_lin(ly.qkv, tid, nth, n0, n1);
      lin_rows(ly.qkv, in, n0, n1, y.data());
      for (int64_t n = n0; n < n1; ++n) qkv[n] = out_value<T>(ly.qkv, n, y[n - n0]);
#pragma omp barrier
      for (int64_t kh = tid; kh < K; kh += nth) {
        if (q8) kv_write_head_q8<T, float>(qkv, c, s, kq, ksp, vq, vsp, pos, kh, H, K, D, L, q.data());
        else kv_write_head<T, float>(qkv, c, s, kcp, vcp, pos, kh, H, K, D, L, q.data());
      }
#pragma omp barrier
      for (int64_t hh = H * tid / nth; hh < H * (tid + 1) / nth; ++hh) {
        if (q8) attend_head_q8<T, float, float>(qkv, c, s, kq, ksp, vq, vsp, attn, pos, hh, H, K, D, L, scale_,
                                                q.data(), p.data());
        else attend_head<T, float, float>(qkv, c, s, kcp, vcp, attn, pos, hh, H, K, D, L, scale_, q.data(), p.data());
      }
#pragma omp barrier
      rows_into_residual(ly.o, attn);
#pragma omp barrier
      // norm -> gate and up rows of the same range, so silu(gate) * up needs no barrier
      rmsnorm_row<T, float>(x, ly.mlp_norm, h.data(), E, eps_);
      prepare(ly.gu, h.data(), in);
      share(I, tid, nth, n0, n1);
      const int64_t m = n1 - n0;
      lin_rows(ly.gu, in, n0, n1, y.data());
      lin_rows(ly.gu, in, I + n0, I + n1, y.data() + m);
      for (int64_t i = n0; i < n1; ++i) {
        const float g = out_value<T>(ly.gu, i, y[i - n0]), u = out_value<T>(ly.gu, I + i, y[m + i - n0]);
        act[i] = rnd<T>(rnd<T>(g / (1.f + std::exp(-g))) * u);
      }
#pragma omp barrier
      rows_into_residual(ly.down, act);
#pragma omp barrier
    }
  }
}

torch::Tensor DecodeStack::step(torch::Tensor x, int64_t pos, torch::Tensor cos, torch::Tensor sin,
                                 std::vector<torch::Tensor> kc, std::vector<torch::Tensor> vc) {
  return checked_step(x, pos, cos, sin, kc, vc, nullptr, nullptr);
}

torch::Tensor DecodeStack::step_q8(torch::Tensor x, int64_t pos, torch::Tensor cos, torch::Tensor sin,
                                    std::vector<torch::Tensor> kc, std::vector<torch::Tensor> ks,
                                    std::vector<torch::Tensor> vc, std::vector<torch::Tensor> vs) {
  return checked_step(x, pos, cos, sin, kc, vc, &ks, &vs);
}

torch::Tensor DecodeStack::checked_step(torch::Tensor x, int64_t pos, torch::Tensor cos, torch::Tensor sin,
                                         std::vector<torch::Tensor>& kc, std::vector<torch::Tensor>& vc,
                                         std::vector<torch::Tensor>* ks, std::vector<torch::Tensor>* vs) {
  const bool q8 = ks != nullptr;
  TORCH_CHECK(x.scalar_type() == dt_ && x.numel() == E_ && x.device().is_cpu(), "x: E values in the act dtype");
  TORCH_CHECK(cos.scalar_type() == dt_ && sin.scalar_type() == dt_ && cos.is_contiguous() && sin.is_contiguous() &&
              cos.numel() == D_ && sin.numel() == D_, "cos/sin: [D] in the act dtype");
  const size_t n = layers_.size();
  TORCH_CHECK(kc.size() == n && vc.size() == n, "one k and v cache per layer");
  const int64_t L = n ? kc[0].size(2) : 1;
  TORCH_CHECK(pos >= 0 && pos < L, "position outside the cache");
  if (q8) TORCH_CHECK(ks->size() == n && vs->size() == n, "one k and v scale tensor per layer");
  const auto cache_dt = q8 ? torch::kInt8 : dt_;
  for (size_t l = 0; l < n; ++l) {
    for (auto* t : {&kc[l], &vc[l]})
      TORCH_CHECK(t->scalar_type() == cache_dt && t->is_contiguous() && t->dim() == 4 && t->size(0) == 1 &&
                  t->size(1) == K_ && t->size(2) == L && t->size(3) == D_, "cache: [1, K, L, D] contiguous");
    if (q8)
      for (auto* t : {&(*ks)[l], &(*vs)[l]})
        TORCH_CHECK(t->scalar_type() == torch::kHalf && t->is_contiguous() && t->dim() == 4 && t->size(0) == 1 &&
                    t->size(1) == K_ && t->size(2) == L && t->size(3) == 1, "scales: [1, K, L, 1] fp16 contiguous");
  }
  auto out = x.contiguous().clone();
  if (dt_ == torch::kFloat32)
    run<float>(out.data_ptr<float>(), pos, L, cos.data_ptr<float>(), sin.data_ptr<float>(), kc, vc, ks, vs);
  else
    run<at::BFloat16>(out.data_ptr<at::BFloat16>(), pos, L, cos.data_ptr<at::BFloat16>(),
                      sin.data_ptr<at::BFloat16>(), kc, vc, ks, vs);
  return out;
}
