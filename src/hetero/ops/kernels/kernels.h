// The extension's entry points, as module.cpp binds them: per-layer GEMVs (gemv.cpp), fused decode
// ops (decode_ops.cpp) and the whole-stack decode step (decode_stack.cpp).
#pragma once
#include <torch/types.h>
#include <cstdint>
#include <vector>

// Kinds of linear layer the whole-stack decode step reads (Python asks the module for them: kinds()).
// KIND_Q8_0 .. KIND_Q6_K: GGUF blocks as stored, [N, row bytes] uint8 (hetero/ops/blocks.py).
enum Kind : int64_t { KIND_F32 = 0, KIND_BF16 = 1, KIND_INT8 = 2, KIND_INT4 = 3,
                      KIND_Q8_0 = 4, KIND_Q4_0 = 5, KIND_Q4_1 = 6, KIND_Q4_K = 7, KIND_Q5_K = 8, KIND_Q6_K = 9,
                      KIND_MIXED = 100 /* stack-internal: row parts of several block kinds */ };

// ---- GEMVs, one token (gemv.cpp) ----------------------------------------------------------------
torch::Tensor gemv_f32(torch::Tensor x, torch::Tensor w);
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w);
torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scale);
torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor packed, torch::Tensor sm);
torch::Tensor dequant_int4(torch::Tensor packed, torch::Tensor sm);
bool has_bf16_dot();

// ---- A few rows (batched decode, small M), each row as its GEMV gives it (gemm_rows.cpp) -------
torch::Tensor gemm_rows_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scale);
torch::Tensor gemm_rows_int4(torch::Tensor x, torch::Tensor packed, torch::Tensor sm, bool bf16_values);
torch::Tensor gemm_rows_dense(torch::Tensor x, torch::Tensor w);
torch::Tensor gemm_rows_gguf(torch::Tensor x, torch::Tensor data, int64_t kind, int64_t K, bool fp32_out);

// ---- GEMV over GGUF blocks, one token (gemv_blocks.cpp) -----------------------------------------
torch::Tensor gemv_gguf(torch::Tensor x, torch::Tensor data, int64_t kind, int64_t K, bool fp32_out);
torch::Tensor dequant_gguf(torch::Tensor data, int64_t kind, int64_t K);

// Process-wide: whether the block GEMVs with an int8 loop (Q8_0, Q4_0, Q4_1, Q4_K: blocks_i8.h) round
// x to int8 as llama.cpp does and run VNNI dot products (on), or keep bf16 / fp32 x (off, the default).
// Single, batched and whole-stack steps read it alike, so a batched row keeps the single step's bits.
void set_act_int8(bool on);
bool act_int8();
bool has_act_int8();   // this CPU has the int8 loops (AVX512-VNNI, VBMI, GFNI)

// ---- A MoE layer's k routed experts for one token, one call (experts.cpp) ---------------------
torch::Tensor experts_ffn(torch::Tensor x, int64_t kind, std::vector<torch::Tensor> gu_w, std::vector<torch::Tensor> gu_s,
                          std::vector<torch::Tensor> down_w, std::vector<torch::Tensor> down_s,
                          std::vector<int64_t> ids, torch::Tensor weight);
// ... and for N tokens (a prefill pass): each touched expert's weights read once for all its tokens
// (ids ascending; offsets [J + 1] delimit each expert's slots in tokens / weight [S]); each token gets
// experts_ffn's bits.
torch::Tensor experts_rows(torch::Tensor x, int64_t kind, std::vector<torch::Tensor> gu_w, std::vector<torch::Tensor> gu_s,
                           std::vector<torch::Tensor> down_w, std::vector<torch::Tensor> down_s, std::vector<int64_t> ids,
                           std::vector<int64_t> offsets, torch::Tensor tokens, torch::Tensor weight);

// A MoE layer's router and its E experts bound once (experts.cpp): step(x) routes one token (softmax,
// top k, renormalised if asked) and runs its k experts as experts_ffn does.
class ExpertsRouted {
 public:
  ExpertsRouted(torch::Tensor router, int64_t k, bool renormalise, int64_t kind, std::vector<torch::Tensor> gu_w,
                std::vector<torch::Tensor> gu_s, std::vector<torch::Tensor> down_w, std::vector<torch::Tensor> down_s);
  torch::Tensor step(torch::Tensor x);                      // x [h] -> [h], x's dtype
  std::vector<torch::Tensor> route_only(torch::Tensor x);  // x [h] fp32 -> (ids [k] int64, weights [k] fp32)

 private:
  void route(const float* x, std::vector<int64_t>& ids, std::vector<float>& wt) const;
  int64_t k_, kind_, E_ = 0, H_ = 0, F_ = 0;
  bool renorm_;
  const float* router_ = nullptr;
  std::vector<torch::Tensor> keep_;
  std::vector<std::pair<const uint8_t*, const void*>> gu_, dn_;  // each expert's (weight, scales)
};

// ---- Fused decode-step ops (decode_ops.cpp) -----------------------------------------------------
torch::Tensor rmsnorm(torch::Tensor x, torch::Tensor w, double eps);
std::vector<torch::Tensor> add_rmsnorm(torch::Tensor x, torch::Tensor y, torch::Tensor w, double eps);
torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                               torch::Tensor v_cache, int64_t pos, int64_t H, int64_t K, int64_t D, double scale);
torch::Tensor silu_mul(torch::Tensor gu);

// ---- The whole decoder stack for one decode step (decode_stack.cpp) -----------------------------
namespace stack {

// Rows [n0, n1) of a block linear held in one GGUF kind (a Q4_K_M QKV: Q4_K Q/K rows, Q6_K V rows).
struct Part {
  int64_t kind = -1, n0 = 0, n1 = 0;
  const void* w = nullptr;          // [n1 - n0, row bytes] blocks
};

// A linear layer as the stack reads it; kind: a Kind (KIND_MIXED: block parts of several kinds).
struct Lin {
  int64_t kind = -1, N = 0, K = 0;  // K: the weight's input width (int8/int4: padded with zero columns)
  std::vector<Part> parts;          // block kinds: the row segments in output order (one for one kind)
  const void* w = nullptr;          // [N, K] f32 / bf16 / int8, int4 packed [N, K/2], or blocks [N, row bytes]
  const void* s = nullptr;          // int8: scale [N] fp32; int4: (scale, zero) [N, K/32, 2] bf16
  const void* bias = nullptr;       // [N] in the activation dtype, or none
};

struct Layer {
  Lin qkv, o, gu, down;
  const float* attn_norm;
  const float* mlp_norm;
};

}  // namespace stack

class DecodeStack {
 public:
  // H query heads, K kv heads, D head dim, E hidden size, I MLP width; bf16: activation dtype.
  DecodeStack(int64_t H, int64_t K, int64_t D, int64_t E, int64_t I, double eps, double scale, bool bf16);

  // One layer: each linear as (kinds, weights, scales, bias), empty tensors for none; norms fp32 [E].
  // A linear is one (kind, weight), or for GGUF blocks several: row segments in output order, each
  // in its own kind (module.cpp takes an int or a list per linear).
  void add_layer(std::vector<std::vector<int64_t>> kinds, std::vector<std::vector<torch::Tensor>> w,
                 std::vector<torch::Tensor> s,
                 std::vector<torch::Tensor> b, torch::Tensor attn_norm, torch::Tensor mlp_norm);

  int64_t n_layers() const { return static_cast<int64_t>(layers_.size()); }

  // M decode rows of a batched step at once (decode_rows.cpp): x [M, E], pos [M] int64, cos/sin
  // [M, D] at each row's position, per layer the paged K/V pools [n_blocks, K, block, D] and
  // tables [M, nb] int64 (row m's block j holds its positions j*block ..). Returns the hidden states
  // after every layer; row m's K/V are written at pos[m]. Each row gets step()'s bits.
  torch::Tensor step_rows(torch::Tensor x, torch::Tensor pos, torch::Tensor cos, torch::Tensor sin,
                          std::vector<torch::Tensor> kp, std::vector<torch::Tensor> vp, torch::Tensor tables);

  // x: [.., E] hidden state at position `pos`; cos/sin: [.., D] for `pos`; k/v caches per layer
  // [1, K, L, D]. Returns the hidden state after every layer (x untouched); the caches get `pos`.
  torch::Tensor step(torch::Tensor x, int64_t pos, torch::Tensor cos, torch::Tensor sin,
                     std::vector<torch::Tensor> kc, std::vector<torch::Tensor> vc);

  // The same step over int8 caches (model/kvstore.py Int8KV): codes [1, K, L, D] int8 and scales
  // [1, K, L, 1] fp16 per layer for K and for V.
  torch::Tensor step_q8(torch::Tensor x, int64_t pos, torch::Tensor cos, torch::Tensor sin,
                        std::vector<torch::Tensor> kc, std::vector<torch::Tensor> ks,
                        std::vector<torch::Tensor> vc, std::vector<torch::Tensor> vs);

 private:
  // ks/vs empty: kc/vc are T caches; else int8 codes with their fp16 scales
  template <typename T>
  void run(T* x, int64_t pos, int64_t L, const T* c, const T* s, std::vector<torch::Tensor>& kc,
           std::vector<torch::Tensor>& vc, std::vector<torch::Tensor>* ks = nullptr,
           std::vector<torch::Tensor>* vs = nullptr);
  torch::Tensor checked_step(torch::Tensor x, int64_t pos, torch::Tensor cos, torch::Tensor sin,
                             std::vector<torch::Tensor>& kc, std::vector<torch::Tensor>& vc,
                             std::vector<torch::Tensor>* ks, std::vector<torch::Tensor>* vs);
  template <typename T>
  void run_rows(T* x, int64_t M, const int64_t* pos, const T* c, const T* s, std::vector<torch::Tensor>& kp,
                std::vector<torch::Tensor>& vp, const int64_t* tables, int64_t nb, int64_t bs);

  int64_t H_, K_, D_, E_, I_, width_;
  float eps_, scale_;
  torch::ScalarType dt_;
  std::vector<stack::Layer> layers_;
  std::vector<torch::Tensor> keep_;
  std::vector<float> qkv_, attn_, act_;  // shared between the threads of a step
};
