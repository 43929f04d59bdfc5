// Matrix-vector kernels for decode (one token: M = 1) on x86 with AVX-512.
// Why: torch's stock GEMV streams weights at ~10 GB/s on this class of CPU while plain copies reach
// ~30 GB/s; decode is bound by bytes of weights read per token, so the GEMV rate is decode speed.
// Each kernel reads W [N, K] row-major once, 4 rows at a time, split over torch's intra-op threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t ROWS = 4;

inline __m512 bf16x16_to_f32(const uint16_t* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512 i8x16_to_f32(const int8_t* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
}

inline float bf16_to_f32(uint16_t v) {
  uint32_t b = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// Row loader: converts 16 weights of row r at column k to fp32.
template <typename Load>
void gemv_rows(const float* x, int64_t N, int64_t K, float* y, Load load) {
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * ROWS, nr = std::min(ROWS, N - n0);
      __m512 acc[ROWS];
      for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) {
        const __m512 xv = _mm512_loadu_ps(x + k);
        for (int r = 0; r < nr; ++r) acc[r] = _mm512_fmadd_ps(load(n0 + r, k), xv, acc[r]);
      }
      for (int r = 0; r < nr; ++r) y[n0 + r] = _mm512_reduce_add_ps(acc[r]);
    }
  });
}

// Activations may come as fp32 or bf16 (any shape holding K values, contiguous): a bf16 x is widened
// here and the result rounded back to bf16, saving the two conversion ops per call at decode.
template <typename Run>
torch::Tensor with_act(const torch::Tensor& x, int64_t K, int64_t N, Run run) {
  TORCH_CHECK(x.numel() == K && x.is_contiguous() && x.device().is_cpu(), "x: K contiguous values expected");
  auto y = torch::empty({N}, x.options());
  if (x.scalar_type() == torch::kFloat32) {
    run(x.data_ptr<float>(), y.data_ptr<float>());
    return y;
  }
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "x: fp32 or bf16 expected");
  std::vector<float> xf(K), yf(N);
  const at::BFloat16* xb = x.data_ptr<at::BFloat16>();
  for (int64_t k = 0; k < K; ++k) xf[k] = static_cast<float>(xb[k]);
  run(xf.data(), yf.data());
  at::BFloat16* yb = y.data_ptr<at::BFloat16>();
  for (int64_t n = 0; n < N; ++n) yb[n] = static_cast<at::BFloat16>(yf[n]);
  return y;
}

}  // namespace

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
    gemv_rows(xp, N, K, yp, [&](int64_t n, int64_t k) { return i8x16_to_f32(qp + n * K + k); });
    for (int64_t n = 0; n < N; ++n) yp[n] *= sp[n];
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
  return with_act(x, K, N, [&](const float* xp, float* yp) {
  std::vector<float> xs(G);
  for (int64_t g = 0; g < G; ++g) {
    __m512 a = _mm512_add_ps(_mm512_loadu_ps(xp + g * 32), _mm512_loadu_ps(xp + g * 32 + 16));
    xs[g] = _mm512_reduce_add_ps(a);
  }
  const __m512i lo_mask = _mm512_set1_epi32(0xF);
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * ROWS, nr = std::min(ROWS, N - n0);
      __m512 acc[ROWS];
      float mins[ROWS];
      for (int r = 0; r < ROWS; ++r) { acc[r] = _mm512_setzero_ps(); mins[r] = 0.f; }
      for (int64_t g = 0; g < G; ++g) {
        const __m512 xl = _mm512_loadu_ps(xp + g * 32), xh = _mm512_loadu_ps(xp + g * 32 + 16);
        for (int r = 0; r < nr; ++r) {
          const int64_t n = n0 + r;
          __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pp + n * (K / 2) + g * 16));
          __m512i v = _mm512_cvtepu8_epi32(raw);
          __m512 ql = _mm512_cvtepi32_ps(_mm512_and_si512(v, lo_mask));
          __m512 qh = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
          __m512 t = _mm512_fmadd_ps(qh, xh, _mm512_mul_ps(ql, xl));
          const uint16_t* s = smp + (n * G + g) * 2;
          const float sc = bf16_to_f32(s[0]);
          acc[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(sc), acc[r]);
          mins[r] += (bf16_to_f32(s[1]) - 8.f * sc) * xs[g];
        }
      }
      for (int r = 0; r < nr; ++r) yp[n0 + r] = _mm512_reduce_add_ps(acc[r]) + mins[r];
    }
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

// ---- Fused decode-step ops (one token, B = 1) -------------------------------------------------
// At decode each op's work is tiny (hidden 576, 9 heads x 64), so the cost of a step is the number
// of ops, not the bytes: each fused op below replaces 5-25 torch ops. They run single-threaded
// (attention splits heads over threads only when the cache is long enough to pay for the handoff).
// Element type T is float or BFloat16; math is fp32, with the reference's bf16 roundings kept
// (rnd<T>) so that both paths round at the same points.
namespace {

template <typename T> inline float rnd(float v) { return static_cast<float>(static_cast<T>(v)); }
template <> inline float rnd<float>(float v) { return v; }

template <typename T> inline __m512 load16(const T* p);
template <> inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <> inline __m512 load16<at::BFloat16>(const at::BFloat16* p) {
  return bf16x16_to_f32(reinterpret_cast<const uint16_t*>(p));
}

template <typename T>
void rmsnorm_row(const T* x, const float* w, T* out, int64_t n, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) { const float v = static_cast<float>(x[i]); ss += v * v; }
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(w[i] * (static_cast<float>(x[i]) * r));
}

template <typename T>
void add_rmsnorm_rows(const T* x, const T* y, const float* w, T* sum, T* out, int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < n; ++i)
      sum[r * n + i] = static_cast<T>(static_cast<float>(x[r * n + i]) + static_cast<float>(y[r * n + i]));
    rmsnorm_row<T>(sum + r * n, w, out + r * n, n, eps);
  }
}

// x*cos + rotate_half(x)*sin for one head of D values, in the reference's rounding order.
template <typename T>
inline void rope_head(const T* x, const T* c, const T* s, float* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; ++i) {
    const float xi = static_cast<float>(x[i]);
    const float rot = i < half ? -static_cast<float>(x[i + half]) : static_cast<float>(x[i - half]);
    out[i] = rnd<T>(rnd<T>(xi * static_cast<float>(c[i])) + rnd<T>(rot * static_cast<float>(s[i])));
  }
}

template <typename T>
void decode_attention_impl(const T* qkv, const T* c, const T* s, T* kc, T* vc, T* out, int64_t pos,
                           int64_t H, int64_t K, int64_t D, int64_t L, float scale) {
  const int64_t G = H / K, S = pos + 1;
  std::vector<float> buf(D);
  // New K (rotated) and V go into the cache at `pos`: cache [1, K, L, D].
  for (int64_t kh = 0; kh < K; ++kh) {
    rope_head<T>(qkv + H * D + kh * D, c, s, buf.data(), D);
    T* kd = kc + (kh * L + pos) * D;
    for (int64_t i = 0; i < D; ++i) kd[i] = static_cast<T>(buf[i]);
    std::memcpy(vc + (kh * L + pos) * D, qkv + H * D + K * D + kh * D, D * sizeof(T));
  }
  // Below ~64k multiply-adds per head the OpenMP handoff costs more than the work it splits.
  const int64_t grain = S * D >= 65536 ? 1 : H;
  at::parallel_for(0, H, grain, [&](int64_t h0, int64_t h1) {
    std::vector<float> q(D), p(S);
    for (int64_t h = h0; h < h1; ++h) {
      rope_head<T>(qkv + h * D, c, s, q.data(), D);
      const T* kb = kc + (h / G) * L * D;
      const T* vb = vc + (h / G) * L * D;
      float m = -INFINITY;
      for (int64_t j = 0; j < S; ++j) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.data() + i), load16<T>(kb + j * D + i), acc);
        const float v = rnd<T>(rnd<T>(_mm512_reduce_add_ps(acc)) * scale);
        p[j] = v;
        m = std::max(m, v);
      }
      float z = 0.f;
      for (int64_t j = 0; j < S; ++j) { p[j] = std::exp(p[j] - m); z += p[j]; }
      const float inv = 1.f / z;
      for (int64_t j = 0; j < S; ++j) p[j] = rnd<T>(p[j] * inv);
      for (int64_t i = 0; i < D; i += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < S; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), load16<T>(vb + j * D + i), acc);
        float tmp[16];
        _mm512_storeu_ps(tmp, acc);
        for (int k = 0; k < 16; ++k) out[h * D + i + k] = static_cast<T>(tmp[k]);
      }
    }
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_f32", &gemv_f32);
  m.def("gemv_bf16", &gemv_bf16);
  m.def("gemv_int8", &gemv_int8);
  m.def("gemv_int4", &gemv_int4);
  m.def("dequant_int4", &dequant_int4);
  m.def("rmsnorm", &rmsnorm);
  m.def("add_rmsnorm", &add_rmsnorm);
  m.def("decode_attention", &decode_attention);
  m.def("silu_mul", &silu_mul);
}
