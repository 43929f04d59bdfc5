// The whole decoder stack for one decode step of B sequences at once (a batched step's decode
// rows), over paged KV, in one call. Why: the per-layer batched path ran ~35 torch ops per layer
// and gathered each row's KV blocks in Python, costing several times the weights' read; here, as in
// the one-token stack (decode_stack.cpp), every layer runs in ONE OpenMP region, and each linear's
// weight is read from memory once per step: a chunk of its rows is brought into cache and dotted
// with every row's input (tiles.h for int8 / int4, the row kernels once per row otherwise).
// Each row's arithmetic is the one-token stack's, so each sequence gets the bits it gets alone.
#include "kernels.h"
#include "decode_math.h"
#include "stack_lin.h"
#include "tiles.h"
#include "rows_math.h"
#include <omp.h>

using stack::Layer;
using stack::Lin;

namespace {

// Bytes of one weight row of L (for sizing the chunk that stays cached across the rows).
int64_t lin_row_bytes(const Lin& L) {
  switch (L.kind) {
    case KIND_F32: return 4 * L.K;
    case KIND_BF16: return 2 * L.K;
    case KIND_INT8: return L.K;
    case KIND_INT4: return L.K / 2 + L.K / 8;
    default: {
      int64_t b = 0;
      for (const auto& p : L.parts) b = std::max(b, block_row_bytes(p.kind, L.K));
      return b;
    }
  }
}

// Whether every part of L runs on int8 activations (i8_rows: all of a step's rows in one pass).
bool all_i8(const Lin& L) {
  if (L.parts.empty()) return false;
  for (const auto& p : L.parts)
    if (i8_kind(p.kind, L.K) == I8_NONE) return false;
  return true;
}

// Weight rows per chunk: ~24 KB of them (L1 holds them while every activation row passes).
int64_t chunk_rows(const Lin& L) { return std::max<int64_t>(ROWS, 24576 / lin_row_bytes(L) / ROWS * ROWS); }

// Rows [c0, c1) of L's product with each of the M inputs: y[m][n - c0], before rounding.
void lin_rows_m(const Lin& L, const Input* in, int64_t M, int64_t c0, int64_t c1, float* const* y) {
  if (c1 <= c0) return;
  if (M == 1) { lin_rows(L, in[0], c0, c1, y[0]); return; }
  const int64_t K = L.K;
  if (L.kind == KIND_INT8) {
    const int8_t* qp = static_cast<const int8_t*>(L.w);
    const float* sp = static_cast<const float*>(L.s);
    by_passes(M, [&](int64_t m0, auto mt) {
      constexpr int MM = decltype(mt)::value;
      const float* xs[MM];
      float* ys[MM];
      for (int m = 0; m < MM; ++m) { xs[m] = in[m0 + m].x; ys[m] = y[m0 + m] - c0; }
      constexpr int NR = tile_rows<MM>();
      for (int64_t n = c0; n < c1; n += NR) {
        if (c1 - n >= NR) int8_tile<NR, MM>(xs, qp, sp, K, n, ys, m0 == 0);
        else for (int64_t r = n; r < c1; ++r) int8_tile<1, MM>(xs, qp, sp, K, r, ys, m0 == 0);
      }
    });
    return;
  }
  if (L.kind == KIND_INT4 && cpu_has_bf16() && (K / 32) % 2 == 0) {
    static const Int4Bf16Consts c;
    const uint8_t* pp = static_cast<const uint8_t*>(L.w);
    const uint16_t* sp = static_cast<const uint16_t*>(L.s);
    by_passes(M, [&](int64_t m0, auto mt) {
      constexpr int MM = decltype(mt)::value;
      const uint16_t* xb[MM];
      const float* x8[MM];
      float* ys[MM];
      for (int m = 0; m < MM; ++m) { xb[m] = in[m0 + m].xb; x8[m] = in[m0 + m].xs8; ys[m] = y[m0 + m] - c0; }
      for (int64_t n = c0; n < c1; n += 2) {
        if (c1 - n >= 2) int4_tile_bf16<2, MM>(c, xb, x8, pp, sp, K, n, ys, m0 == 0);
        else int4_tile_bf16<1, MM>(c, xb, x8, pp, sp, K, n, ys, m0 == 0);
      }
    });
    return;
  }
  if (L.kind == KIND_F32 || L.kind == KIND_BF16) {
    by_passes(M, [&](int64_t m0, auto mt) {
      constexpr int MM = decltype(mt)::value;
      const float* xs[MM];
      float* ys[MM];
      for (int m = 0; m < MM; ++m) { xs[m] = in[m0 + m].x; ys[m] = y[m0 + m] - c0; }
      constexpr int NR = tile_rows<MM>();
      for (int64_t n = c0; n < c1; n += NR) {
        const int64_t nr = std::min<int64_t>(NR, c1 - n);
        if (L.kind == KIND_F32) {
          const float* wp = static_cast<const float*>(L.w);
          auto ld = [&](int64_t r, int64_t k) { return _mm512_loadu_ps(wp + r * K + k); };
          if (nr == NR) dense_tile<NR, MM>(xs, K, n, ys, ld); else for (int64_t r = n; r < c1; ++r) dense_tile<1, MM>(xs, K, r, ys, ld);
        } else {
          const uint16_t* wp = static_cast<const uint16_t*>(L.w);
          auto ld = [&](int64_t r, int64_t k) { return bf16x16_to_f32(wp + r * K + k); };
          if (nr == NR) dense_tile<NR, MM>(xs, K, n, ys, ld); else for (int64_t r = n; r < c1; ++r) dense_tile<1, MM>(xs, K, r, ys, ld);
        }
      }
    });
    return;
  }
  if (!L.parts.empty()) {  // block kinds: each part's rows by a tile where one serves it
    for (const auto& p : L.parts) {
      const int64_t a = std::max(c0, p.n0), b = std::min(c1, p.n1);
      if (a >= b) continue;
      const uint8_t* w = static_cast<const uint8_t*>(p.w);
      auto rin = [&](int64_t m) { return BlockRowsIn{in[m].x, in[m].xb, in[m].xs8}; };
      auto out = [&](int64_t m) { return y[m] + (a - c0); };
      if (const int f = i8_kind(p.kind, K); f != I8_NONE) {   // int8 activations: every row's in one pass
        constexpr int64_t S = 32;   // on the stack for a decode step's rows (this runs per chunk)
        XI8 xs_s[S];
        float* ys_s[S];
        std::vector<XI8> xv(M > S ? M : 0);
        std::vector<float*> yv(M > S ? M : 0);
        XI8* xv_p = M > S ? xv.data() : xs_s;
        float** ys = M > S ? yv.data() : ys_s;
        for (int64_t m = 0; m < M; ++m) { xv_p[m] = in[m].i8[f]; ys[m] = out(m); }
        i8_rows_chunked(p.kind, xv_p, M, w + (a - p.n0) * block_row_bytes(p.kind, K), K, ys, 0, b - a);
        continue;
      }
      // (block linears run bf16 activations: add_layer checks it)
      if (block_tiles(p.kind, K, true, M, rin, w, a - p.n0, b - p.n0, out)) continue;
      const uint8_t* wp = w + (a - p.n0) * block_row_bytes(p.kind, K);
      const int64_t N = b - a, blocks = (N + ROWS - 1) / ROWS;
      for (int64_t m = 0; m < M; ++m) {  // as block_rows (stack_lin.h) does one part
        const Input& im = in[m];
        if (bf16_kind(p.kind, K))
          q_blocks_bf16(p.kind, int4_order(p.kind) ? im.xb : im.xp, im.xs8, im.xs, wp, N, K, out(m), 0, blocks);
        else
          q_blocks(p.kind, im.x, im.xs, wp, N, K, out(m), 0, blocks);
      }
    }
    return;
  }
  for (int64_t m = 0; m < M; ++m) lin_rows(L, in[m], c0, c1, y[m]);
}

// Per row of the step: its input buffers in every layout a linear may read.
struct RowInputs {
  std::vector<float> xs, xs8;
  std::vector<uint16_t> xb, xp;
  std::vector<Input> in;
  std::vector<XI8Buf> i8;
  RowInputs(int64_t M, int64_t width) : xs(M * width / 32), xs8(M * width / 4), xb(M * width), xp(M * width) {
    i8.reserve(M);
    for (int64_t m = 0; m < M; ++m) {
      in.push_back({nullptr, xs.data() + m * width / 32, xb.data() + m * width, xs8.data() + m * width / 4,
                    xp.data() + m * width, {}});
      i8.emplace_back(width);
      bind_i8(in.back(), i8.back());
    }
  }
};

}  // namespace

template <typename T>
void DecodeStack::run_rows(T* x, int64_t M, const int64_t* pos, const T* c, const T* s, std::vector<torch::Tensor>& kp,
                           std::vector<torch::Tensor>& vp, const int64_t* tables, int64_t nb, int64_t bs) {
  const int64_t H = H_, K = K_, D = D_, E = E_, I = I_, W = width_, Q = (H + 2 * K) * D;
  // shared between the threads: each row's normed input, qkv, attention output and MLP activation
  std::vector<float> h(M * W, 0.f), qkv(M * Q, 0.f), attn(M * W, 0.f), act(M * W, 0.f);
  RowInputs ri(M, W);
  Input* in = ri.in.data();
  int64_t longest = 0;
  for (int64_t m = 0; m < M; ++m) longest = std::max(longest, pos[m]);
  // the attention tasks (a row's KV head, or head) split over the threads by their keys, not their
  // count: a prefill chunk's rows at a long position beside short decode rows would otherwise all
  // land on one thread
  const int nth_all = at::get_num_threads();
  const bool group = H % K == 0 && H / K <= MAX_GROUP && D <= MAX_GROUP_DIM;  // a GQA group's heads at once
  const int64_t per_row = group ? K : H;
  std::vector<int64_t> att_split(nth_all + 1, M * per_row);
  {
    double total = 0;
    for (int64_t m = 0; m < M; ++m) total += per_row * static_cast<double>(pos[m] + 1 + 32);
    double run = 0;
    int th = 1;
    att_split[0] = 0;
    for (int64_t t = 0; t < M * per_row && th < nth_all; ++t) {
      while (th < nth_all && run >= total * th / nth_all) att_split[th++] = t;
      run += static_cast<double>(pos[t / per_row] + 1 + 32);
    }
  }
#pragma omp parallel num_threads(nth_all)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t t_lo = nth == nth_all ? att_split[tid] : M * per_row * tid / nth;
    const int64_t t_hi = nth == nth_all ? att_split[tid + 1] : M * per_row * (tid + 1) / nth;
    int64_t n0 = 0, n1 = 0;
    // A linear whose rows all pass in one go takes its whole share in one call, as the one-token
    // stack does: one row (it reuses nothing from cache), or up to 8 over int8-activation blocks
    // (one pass of i8_rows for every row). Chunks of ~24 KB, there for kernels that run row by
    // row, cost a 1-row step 1.25-1.3x the one-token stack.
    auto whole = [&](const Lin& L) { return M == 1 || (M <= 8 && all_i8(L)); };
    auto rows_per_call = [&](const Lin& L) { return whole(L) ? std::max<int64_t>(1, n1 - n0) : chunk_rows(L); };
    int64_t ch = 0;
    for (const Layer& ly : layers_)
      for (const Lin* L : {&ly.qkv, &ly.o, &ly.gu, &ly.down}) ch = std::max(ch, whole(*L) ? L->N + ROWS : chunk_rows(*L));
    const int64_t G = group ? H / K : 1;
    std::vector<float> q(G * D), p(G * (longest + 1)), ybuf(2 * M * ch);
    alignas(64) __m512 sacc[16 * MAX_GROUP];
    std::vector<float*> y(M), yu(M);
    for (int64_t m = 0; m < M; ++m) { y[m] = ybuf.data() + 2 * m * ch; yu[m] = y[m] + ch; }
    // the step's rows split over the threads (norms, input layouts)
    const int64_t r0 = M * tid / nth, r1 = M * (tid + 1) / nth;
    // this thread's share of lin's rows over every row's (prepared) input, added into x
    auto rows_into_residual = [&](const Lin& lin) {
      share_lin(lin, tid, nth, n0, n1);
      const int64_t cr = rows_per_call(lin);
      for (int64_t a = n0; a < n1; a += cr) {
        const int64_t b = std::min(n1, a + cr);
        lin_rows_m(lin, in, M, a, b, y.data());
        for (int64_t m = 0; m < M; ++m) add_rows<T>(lin, y[m], a, b, x + m * E);
      }
    };
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& ly = layers_[l];
      T* kpp = kp[l].template data_ptr<T>();
      T* vpp = vp[l].template data_ptr<T>();
      for (int64_t m = r0; m < r1; ++m) {
        rmsnorm_row<T, float>(x + m * E, ly.attn_norm, h.data() + m * W, E, eps_);
        prepare_rows(ly.qkv, h.data() + m * W, in[m]);
      }
#pragma omp barrier
      share_lin(ly.qkv, tid, nth, n0, n1);
      const int64_t cq = rows_per_call(ly.qkv);
      for (int64_t a = n0; a < n1; a += cq) {
        const int64_t b = std::min(n1, a + cq);
        lin_rows_m(ly.qkv, in, M, a, b, y.data());
        for (int64_t m = 0; m < M; ++m) put_rows<T>(ly.qkv, y[m], a, b, qkv.data() + m * Q);
      }
#pragma omp barrier
      // each row's new K (rotated) and V into (its block, its offset)
      for (int64_t t = tid; t < M * K; t += nth) {
        const int64_t m = t / K, kh = t % K, blk = tables[m * nb + pos[m] / bs];
        kv_write_head<T, float>(qkv.data() + m * Q, c + m * D, s + m * D, kpp + blk * K * bs * D,
                                vpp + blk * K * bs * D, pos[m] % bs, kh, H, K, D, bs, q.data());
      }
#pragma omp barrier
      if (group) {
        for (int64_t t = t_lo; t < t_hi; ++t) {
          const int64_t m = t / K, kh = t % K;
          attend_group_paged<T>(qkv.data() + m * Q, c + m * D, s + m * D, kpp, vpp, tables + m * nb, bs,
                                attn.data() + m * W, pos[m], kh, H, K, D, scale_, q.data(), p.data(), sacc);
        }
      } else {
        for (int64_t t = t_lo; t < t_hi; ++t) {
          const int64_t m = t / H, hh = t % H;
          attend_head_paged<T, float, float>(qkv.data() + m * Q, c + m * D, s + m * D, kpp, vpp, tables + m * nb, bs,
                                             attn.data() + m * W, pos[m], hh, H, K, D, scale_, q.data(), p.data());
        }
      }
#pragma omp barrier
      for (int64_t m = r0; m < r1; ++m) prepare_rows(ly.o, attn.data() + m * W, in[m]);
#pragma omp barrier
      rows_into_residual(ly.o);
#pragma omp barrier
      for (int64_t m = r0; m < r1; ++m) {
        rmsnorm_row<T, float>(x + m * E, ly.mlp_norm, h.data() + m * W, E, eps_);
        prepare_rows(ly.gu, h.data() + m * W, in[m]);
      }
#pragma omp barrier
      // gate and up rows of the same range, so silu(gate) * up needs no barrier
      share(I, tid, nth, n0, n1);
      const int64_t cg = whole(ly.gu) ? std::max<int64_t>(1, n1 - n0) : std::max<int64_t>(ROWS, chunk_rows(ly.gu) / 2 / ROWS * ROWS);
      for (int64_t a = n0; a < n1; a += cg) {
        const int64_t b = std::min(n1, a + cg);
        lin_rows_m(ly.gu, in, M, a, b, y.data());
        lin_rows_m(ly.gu, in, M, I + a, I + b, yu.data());
        for (int64_t m = 0; m < M; ++m) silu_rows<T>(ly.gu, y[m], yu[m], a, b, I, act.data() + m * W);
      }
#pragma omp barrier
      for (int64_t m = r0; m < r1; ++m) prepare_rows(ly.down, act.data() + m * W, in[m]);
#pragma omp barrier
      rows_into_residual(ly.down);
#pragma omp barrier
    }
  }
}

torch::Tensor DecodeStack::step_rows(torch::Tensor x, torch::Tensor pos, torch::Tensor cos, torch::Tensor sin,
                                     std::vector<torch::Tensor> kp, std::vector<torch::Tensor> vp, torch::Tensor tables) {
  TORCH_CHECK(x.scalar_type() == dt_ && x.dim() == 2 && x.size(1) == E_ && x.device().is_cpu(), "x: [M, E] in the act dtype");
  const int64_t M = x.size(0);
  TORCH_CHECK(pos.scalar_type() == torch::kInt64 && pos.is_contiguous() && pos.numel() == M, "pos: [M] int64");
  TORCH_CHECK(cos.scalar_type() == dt_ && sin.scalar_type() == dt_ && cos.is_contiguous() && sin.is_contiguous() &&
              cos.numel() == M * D_ && sin.numel() == M * D_, "cos/sin: [M, D] in the act dtype");
  TORCH_CHECK(tables.scalar_type() == torch::kInt64 && tables.is_contiguous() && tables.dim() == 2 &&
              tables.size(0) == M, "tables: [M, nb] int64");
  const size_t n = layers_.size();
  TORCH_CHECK(kp.size() == n && vp.size() == n, "one k and v pool per layer");
  const int64_t nb = tables.size(1), blocks = n ? kp[0].size(0) : 0, bs = n ? kp[0].size(2) : 1;
  for (size_t l = 0; l < n; ++l)
    for (auto* t : {&kp[l], &vp[l]})
      TORCH_CHECK(t->scalar_type() == dt_ && t->is_contiguous() && t->dim() == 4 && t->size(0) == blocks &&
                  t->size(1) == K_ && t->size(2) == bs && t->size(3) == D_, "pool: [n_blocks, K, block, D] contiguous");
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(pp[m] >= 0 && pp[m] < nb * bs, "a position past its block table");
    for (int64_t j = 0; j <= pp[m] / bs; ++j) TORCH_CHECK(tp[m * nb + j] >= 0 && tp[m * nb + j] < blocks, "block id out of range");
  }
  auto out = x.contiguous().clone();
  if (M == 0) return out;
  if (dt_ == torch::kFloat32)
    run_rows<float>(out.data_ptr<float>(), M, pp, cos.data_ptr<float>(), sin.data_ptr<float>(), kp, vp, tp, nb, bs);
  else
    run_rows<at::BFloat16>(out.data_ptr<at::BFloat16>(), M, pp, cos.data_ptr<at::BFloat16>(),
                           sin.data_ptr<at::BFloat16>(), kp, vp, tp, nb, bs);
  return out;
}
