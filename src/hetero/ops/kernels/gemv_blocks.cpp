// Decode GEMV over GGUF blocks as the file stores them (blocks.h): y = W x for one token.
#include "kernels.h"
#include "blocks.h"

// x: K values (fp32 or bf16; y in x's dtype), data: [N, row bytes] uint8 blocks of `kind` -> [N].
torch::Tensor gemv_gguf(torch::Tensor x, torch::Tensor data, int64_t kind, int64_t K) {
  TORCH_CHECK(is_block_kind(kind), "gemv_gguf: not a block kind: ", kind);
  TORCH_CHECK(data.scalar_type() == torch::kUInt8 && data.is_contiguous() && data.dim() == 2 &&
              (K % 256 == 0 || (K % 32 == 0 && kind <= KIND_Q4_1)), "gemv_gguf: bad K or data");
  TORCH_CHECK(data.size(1) == block_row_bytes(kind, K), "gemv_gguf: row bytes do not match K");
  const int64_t N = data.size(0);
  const uint8_t* w = data.data_ptr<uint8_t>();
  // bf16 activations take the BF16 dot-product kernel where there is one (Q4_0, Q4_1, Q4_K)
  const bool dot_bf16 = x.scalar_type() == torch::kBFloat16 && bf16_kind(kind, K);
  return with_act(x, K, N, [&](const float* xp, float* yp) {
    std::vector<float> xs(K / 32);
    if (dot_bf16) {
      std::vector<uint16_t> xb(K);
      std::vector<float> xs8(K / 4);
      block_prep_bf16(kind, xp, K, xb.data(), xs8.data(), xs.data());
      at::parallel_for(0, (N + ROWS - 1) / ROWS, 16, [&](int64_t b0, int64_t b1) {
        q_blocks_bf16(kind, xb.data(), xs8.data(), xs.data(), w, N, K, yp, b0, b1);
      });
      return;
    }
    group_sums(xp, K / 32, xs.data());
    at::parallel_for(0, (N + ROWS - 1) / ROWS, 16, [&](int64_t b0, int64_t b1) {
      q_blocks(kind, xp, xs.data(), w, N, K, yp, b0, b1);
    });
  });
}
