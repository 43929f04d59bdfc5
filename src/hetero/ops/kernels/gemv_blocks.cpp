// Decode GEMV over GGUF blocks as the file stores them (blocks.h): y = W x for one token.
#include "kernels.h"
#include "blocks.h"
#include "tiles.h"
#include "blocks_i8.h"
#include <atomic>

namespace { std::atomic<bool> g_act_int8{false}; }
void set_act_int8(bool on) { g_act_int8 = on; }
bool act_int8() { return g_act_int8; }
bool has_act_int8() { return cpu_has_i8dot(); }

// x: K values (fp32 or bf16; y in x's dtype, or fp32 with fp32_out: unrounded logits), data: [N, row bytes] uint8 blocks of `kind` -> [N].
torch::Tensor gemv_gguf(torch::Tensor x, torch::Tensor data, int64_t kind, int64_t K, bool fp32_out) {
  TORCH_CHECK(is_block_kind(kind), "gemv_gguf: not a block kind: ", kind);
  TORCH_CHECK(data.scalar_type() == torch::kUInt8 && data.is_contiguous() && data.dim() == 2 &&
              (K % 256 == 0 || (K % 32 == 0 && kind <= KIND_Q4_1)), "gemv_gguf: bad K or data");
  TORCH_CHECK(data.size(1) == block_row_bytes(kind, K), "gemv_gguf: row bytes do not match K");
  const int64_t N = data.size(0);
  const uint8_t* w = data.data_ptr<uint8_t>();
  // bf16 activations take the BF16 dot-product kernel where there is one (Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)
  const bool dot_bf16 = x.scalar_type() == torch::kBFloat16 && bf16_kind(kind, K);
  const int f8 = i8_kind(kind, K);
  return with_act(x, K, N, fp32_out, [&](const float* xp, float* yp) {
    if (f8 != I8_NONE) {
      XI8Buf buf(K);
      const XI8 v = buf.view(f8);
      i8_prep(f8, xp, K, v);
      at::parallel_for(0, (N + ROWS - 1) / ROWS, 16, [&](int64_t b0, int64_t b1) {
        float* ys[1] = {yp};
        i8_rows(kind, &v, 1, w, K, ys, b0 * ROWS, std::min(N, b1 * ROWS));
      });
      return;
    }
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

// x: [M, K] (fp32 or bf16) -> [M, N] in x's dtype (fp32 with fp32_out), row m = gemv_gguf(x[m]) bit
// for bit: a batched step's head or linear over GGUF blocks. A chunk of weight rows (~24 KB) is
// read from memory once and passed by every row's GEMV kernel while it sits in cache.
torch::Tensor gemm_rows_gguf(torch::Tensor x, torch::Tensor data, int64_t kind, int64_t K, bool fp32_out) {
  TORCH_CHECK(is_block_kind(kind), "gemm_rows_gguf: not a block kind: ", kind);
  TORCH_CHECK(data.scalar_type() == torch::kUInt8 && data.is_contiguous() && data.dim() == 2 &&
              (K % 256 == 0 || (K % 32 == 0 && kind <= KIND_Q4_1)) && data.size(1) == block_row_bytes(kind, K),
              "gemm_rows_gguf: bad K or data");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.is_contiguous() && x.device().is_cpu() &&
              (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16), "x: [M, K] fp32 or bf16");
  const int64_t N = data.size(0), M = x.size(0);
  const uint8_t* w = data.data_ptr<uint8_t>();
  const bool bf16_x = x.scalar_type() == torch::kBFloat16;
  const bool dot_bf16 = bf16_x && bf16_kind(kind, K);   // Q8_0 reads fp32 x, as gemv_gguf does
  auto xf = x.to(torch::kFloat32).contiguous();
  const float* xp = xf.data_ptr<float>();
  const int f8 = i8_kind(kind, K);
  if (f8 != I8_NONE) {   // int8 activations: each weight row unpacked once for 8 activation rows
    std::vector<XI8Buf> bufs;
    std::vector<XI8> v;
    bufs.reserve(M);
    for (int64_t m = 0; m < M; ++m) { bufs.emplace_back(K); v.push_back(bufs.back().view(f8)); i8_prep(f8, xp + m * K, K, v.back()); }
    auto yf = torch::empty({M, N}, xf.options());
    float* yp = yf.data_ptr<float>();
    std::vector<float*> ys(M);
    for (int64_t m = 0; m < M; ++m) ys[m] = yp + m * N;
    const int64_t ch = std::max<int64_t>(4, 24576 / block_row_bytes(kind, K));
    at::parallel_for(0, (N + ch - 1) / ch, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) i8_rows_chunked(kind, v.data(), M, w, K, ys.data(), c * ch, std::min(N, (c + 1) * ch));
    });
    return fp32_out || !bf16_x ? yf : yf.to(torch::kBFloat16);
  }
  std::vector<float> xs(M * (K / 32)), xs8(dot_bf16 ? M * (K / 4) : 0);
  std::vector<uint16_t> xb(dot_bf16 ? M * K : 0);
  for (int64_t m = 0; m < M; ++m) {
    if (dot_bf16) block_prep_bf16(kind, xp + m * K, K, xb.data() + m * K, xs8.data() + m * (K / 4), xs.data() + m * (K / 32));
    else group_sums(xp + m * K, K / 32, xs.data() + m * (K / 32));
  }
  auto yf = torch::empty({M, N}, xf.options());
  float* yp = yf.data_ptr<float>();
  const int64_t blocks = (N + ROWS - 1) / ROWS, ch = std::max<int64_t>(1, 24576 / (ROWS * block_row_bytes(kind, K)));
  at::parallel_for(0, (blocks + ch - 1) / ch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b0 = c * ch, b1 = std::min(blocks, b0 + ch), n0 = b0 * ROWS, n1 = std::min(N, b1 * ROWS);
      auto rin = [&](int64_t m) {
        return BlockRowsIn{xp + m * K, dot_bf16 ? xb.data() + m * K : nullptr, dot_bf16 ? xs8.data() + m * (K / 4) : nullptr};
      };
      if (block_tiles(kind, K, dot_bf16, M, rin, w, n0, n1, [&](int64_t m) { return yp + m * N + n0; })) continue;
      for (int64_t m = 0; m < M; ++m) {
        float* y = yp + m * N;
        if (dot_bf16)
          q_blocks_bf16(kind, xb.data() + m * K, xs8.data() + m * (K / 4), xs.data() + m * (K / 32), w, N, K, y, b0, b1);
        else q_blocks(kind, xp + m * K, xs.data() + m * (K / 32), w, N, K, y, b0, b1);
      }
    }
  });
  return fp32_out || !bf16_x ? yf : yf.to(torch::kBFloat16);
}

namespace {

// One block of each kind -> its W fp32 weights, with gguf-py's operations in its order (a multiply,
// then an add or subtract: no fused multiply-add), so the values are its values bit for bit.
void dequant_block(int64_t kind, const uint8_t* b, float* o) {
  const __m512i lo = _mm512_set1_epi32(0xF);
  auto nib = [&](const uint8_t* qs, __m512i& l, __m512i& h) { const __m512i v = u8x16i(qs); l = _mm512_and_si512(v, lo); h = _mm512_srli_epi32(v, 4); };
  switch (kind) {
    case KIND_Q8_0: {
      const __m512 d = _mm512_set1_ps(f16(b));
      for (int i = 0; i < 2; ++i)
        _mm512_storeu_ps(o + 16 * i, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + 16 * i))))));
      break;
    }
    case KIND_Q4_0: case KIND_Q4_1: {
      const bool m1 = kind == KIND_Q4_1;
      const __m512 d = _mm512_set1_ps(f16(b)), m = _mm512_set1_ps(m1 ? f16(b + 2) : 0.f);
      __m512i l, h;
      nib(b + (m1 ? 4 : 2), l, h);
      const __m512i eight = _mm512_set1_epi32(m1 ? 0 : 8);
      __m512 wl = _mm512_mul_ps(d, cvt(_mm512_sub_epi32(l, eight))), wh = _mm512_mul_ps(d, cvt(_mm512_sub_epi32(h, eight)));
      if (m1) { wl = _mm512_add_ps(wl, m); wh = _mm512_add_ps(wh, m); }
      _mm512_storeu_ps(o, wl);
      _mm512_storeu_ps(o + 16, wh);
      break;
    }
    case KIND_Q4_K: case KIND_Q5_K: {
      const bool fifth = kind == KIND_Q5_K;
      const float d = f16(b), dmin = f16(b + 2);
      alignas(16) uint8_t sm[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(sm), scales_mins_simd(b + 4));
      const uint8_t* qs = b + (fifth ? 48 : 16);
      const __m512i h0 = fifth ? u8x16i(b + 16) : _mm512_setzero_si512(), h1 = fifth ? u8x16i(b + 32) : _mm512_setzero_si512();
      const __m512i one = _mm512_set1_epi32(1);
      for (int s = 0; s < 8; ++s) {
        const __m512 ds = _mm512_set1_ps(d * static_cast<float>(sm[s])), dm = _mm512_set1_ps(dmin * static_cast<float>(sm[8 + s]));
        const uint8_t* q = qs + 32 * (s / 2);
        __m512i a = u8x16i(q), c = u8x16i(q + 16);
        a = s % 2 ? _mm512_srli_epi32(a, 4) : _mm512_and_si512(a, lo);
        c = s % 2 ? _mm512_srli_epi32(c, 4) : _mm512_and_si512(c, lo);
        if (fifth) {
          const __m128i sh = _mm_cvtsi32_si128(s);
          a = _mm512_or_si512(a, _mm512_slli_epi32(_mm512_and_si512(_mm512_srl_epi32(h0, sh), one), 4));
          c = _mm512_or_si512(c, _mm512_slli_epi32(_mm512_and_si512(_mm512_srl_epi32(h1, sh), one), 4));
        }
        _mm512_storeu_ps(o + 32 * s, _mm512_sub_ps(_mm512_mul_ps(ds, cvt(a)), dm));
        _mm512_storeu_ps(o + 32 * s + 16, _mm512_sub_ps(_mm512_mul_ps(ds, cvt(c)), dm));
      }
      break;
    }
    default: {  // Q6_K
      const uint8_t* ql = b;
      const uint8_t* qh = b + 128;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      const float d = f16(b + 208);
      const __m512i three = _mm512_set1_epi32(3), k32 = _mm512_set1_epi32(32);
      for (int h = 0; h < 2; ++h)
        for (int i = 0; i < 4; ++i)
          for (int half = 0; half < 2; ++half) {
            const __m512i a = u8x16i(ql + 64 * h + 32 * (i % 2) + 16 * half), hb = u8x16i(qh + 32 * h + 16 * half);
            __m512i q = i < 2 ? _mm512_and_si512(a, lo) : _mm512_srli_epi32(a, 4);
            q = _mm512_sub_epi32(_mm512_or_si512(q, _mm512_slli_epi32(_mm512_and_si512(_mm512_srl_epi32(hb, _mm_cvtsi32_si128(2 * i)), three), 4)), k32);
            const int e = 128 * h + 32 * i + 16 * half;
            _mm512_storeu_ps(o + e, _mm512_mul_ps(_mm512_set1_ps(d * static_cast<float>(sc[e / 16])), cvt(q)));
          }
    }
  }
}

}  // namespace

// data: [N, row bytes] uint8 blocks of `kind` -> fp32 [N, K], the exact values (prefill: a GEMM
// after dequantising is compute-bound, so dequantising first is cheap).
torch::Tensor dequant_gguf(torch::Tensor data, int64_t kind, int64_t K) {
  TORCH_CHECK(is_block_kind(kind) && data.scalar_type() == torch::kUInt8 && data.is_contiguous() && data.dim() == 2 &&
              data.size(1) == block_row_bytes(kind, K), "dequant_gguf: bad data for kind and K");
  const int64_t N = data.size(0), W = kind <= KIND_Q4_1 ? 32 : 256, B = block_row_bytes(kind, W);
  auto out = torch::empty({N, K}, data.options().dtype(torch::kFloat32));
  const uint8_t* w = data.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t rb = block_row_bytes(kind, K);
  at::parallel_for(0, N, 16, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n)
      for (int64_t i = 0; i < K / W; ++i) dequant_block(kind, w + n * rb + i * B, op + n * K + i * W);
  });
  return out;
}
