// Matrix-vector kernels for decode (one token: M = 1) on x86 with AVX-512.
// Why: torch's stock GEMV streams weights at ~10 GB/s on this class of CPU while plain copies reach
// ~30 GB/s; decode is bound by bytes of weights read per token, so the GEMV rate is decode speed.
// Each kernel reads W [N, K] row-major once, 4 rows at a time, split over torch's intra-op threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <immintrin.h>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <algorithm>
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

// Row loader: converts 16 weights of row r at column k to fp32. Rows [b0 * ROWS, b1 * ROWS) of y.
template <typename Load>
void gemv_blocks(const float* x, int64_t N, int64_t K, float* y, int64_t b0, int64_t b1, Load load) {
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
}

template <typename Load>
void gemv_rows(const float* x, int64_t N, int64_t K, float* y, Load load) {
  at::parallel_for(0, (N + ROWS - 1) / ROWS, 16, [&](int64_t b0, int64_t b1) { gemv_blocks(x, N, K, y, b0, b1, load); });
}

// Per-group sums of x (the int4 kernels' min term): xs[g] = sum of x[32g .. 32g + 31].
void group_sums(const float* x, int64_t G, float* xs) {
  for (int64_t g = 0; g < G; ++g)
    xs[g] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(x + g * 32), _mm512_loadu_ps(x + g * 32 + 16)));
}

// Int4 with AVX512-BF16 dot products (vdpbf16ps: 32 bf16 products summed pairwise into 16 fp32 lanes per
// instruction), for activations that are bf16 values: the weights' nibbles become exact bf16 0..15
// through a table lookup, the products are exact in fp32, so the result differs from the fp32 kernel
// above only in summation order. ~3x fewer instructions per weight than widening to fp32.
bool cpu_has_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

// x (K floats, each a bf16 value; K % 32 == 0) prepared for int4_blocks_bf16, per pair of groups p:
// xb[64p ..] = bf16 of x[64p + 0..15], x[64p + 32..47] (low nibbles), x[64p + 16..31], x[64p + 48..63]
// (high); xs8[16p ..] = group sums / 8 (lanes 0-7 group 2p, 8-15 group 2p+1; 8 lanes sum to one).
// An odd last group is left to the fp32 kernel: xs holds every group's sum.
void int4_prep_bf16(const float* x, int64_t K, uint16_t* xb, float* xs8, float* xs) {
  const int64_t G = K / 32;
  group_sums(x, G, xs);
  auto bits = [](float v) { uint32_t u; std::memcpy(&u, &v, 4); return static_cast<uint16_t>(u >> 16); };
  for (int64_t p = 0; p < G / 2; ++p) {
    for (int i = 0; i < 16; ++i) {
      xb[64 * p + i] = bits(x[64 * p + i]);
      xb[64 * p + 16 + i] = bits(x[64 * p + 32 + i]);
      xb[64 * p + 32 + i] = bits(x[64 * p + 16 + i]);
      xb[64 * p + 48 + i] = bits(x[64 * p + 48 + i]);
    }
    for (int i = 0; i < 8; ++i) { xs8[16 * p + i] = xs[2 * p] / 8.f; xs8[16 * p + 8 + i] = xs[2 * p + 1] / 8.f; }
  }
}

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Prefetch distance (bytes ahead in the rows' packed bytes / in their scales): a decode GEMV's share
// of rows is ~100-300 KB, short enough that the hardware prefetcher ramps up too late on its own.
constexpr int64_t PF_W = 4096, PF_S = 1024;

struct Int4Bf16Consts {
  __m512i table, idx_s, idx_z;
  BF16_TARGET Int4Bf16Consts() {
    // word i -> bf16(i & 15): a byte's low nibble indexes it directly (vpermw reads 5 index bits).
    alignas(64) uint16_t tab[32], is[32], iz[32];
    for (int i = 0; i < 32; ++i) { const float v = static_cast<float>(i & 15); uint32_t u; std::memcpy(&u, &v, 4); tab[i] = u >> 16; }
    // (scale, zero) of groups 2p, 2p+1 (4 bf16 words) -> fp32 lanes 0-7 / 8-15 (bf16 in a dword's high half).
    for (int l = 0; l < 16; ++l) { is[2 * l] = iz[2 * l] = 0; is[2 * l + 1] = l < 8 ? 0 : 2; iz[2 * l + 1] = l < 8 ? 1 : 3; }
    table = _mm512_load_si512(tab);
    idx_s = _mm512_load_si512(is);
    idx_z = _mm512_load_si512(iz);
  }
};

// NR consecutive rows from n0 (their bytes and scales are contiguous): y[n0 ..] = the rows' products.
template <int NR>
BF16_TARGET inline void int4_rows_bf16(const Int4Bf16Consts& c, const uint16_t* xb, const float* xs8, const float* x,
                                       const float* xs, const uint8_t* pp, const uint16_t* smp, int64_t K,
                                       int64_t n0, float* yp) {
  const int64_t G = K / 32, P = G / 2, row = K / 2;
  const __mmask32 odd = 0xAAAAAAAAu;
  const __m512 eight = _mm512_set1_ps(8.f);
  const uint8_t* wb = pp + n0 * row;
  const uint16_t* sb = smp + n0 * G * 2;
  __m512 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    _mm_prefetch(reinterpret_cast<const char*>(wb) + PF_W + p * 32 * NR, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb) + PF_W + p * 32 * NR + 64, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(sb) + PF_S + p * 8 * NR, _MM_HINT_T0);
    const __m512i xl = _mm512_loadu_si512(xb + 64 * p), xh = _mm512_loadu_si512(xb + 64 * p + 32);
    const __m512 s8 = _mm512_loadu_ps(xs8 + 16 * p);
    for (int r = 0; r < NR; ++r) {
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + r * row + 32 * p)));
      const __m512i wl = _mm512_permutexvar_epi16(v, c.table);
      const __m512i wh = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), c.table);
      __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)wl, (__m512bh)xl);
      d = _mm512_dpbf16_ps(d, (__m512bh)wh, (__m512bh)xh);
      const __m512i sz = _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sb + (r * G + 2 * p) * 2)));
      const __m512 sc = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(odd, c.idx_s, sz));
      const __m512 zr = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(odd, c.idx_z, sz));
      acc[r] = _mm512_fmadd_ps(d, sc, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_fnmadd_ps(eight, sc, zr), s8, acc[r]);  // (zero - 8 scale) * sum / 8
    }
  }
  for (int r = 0; r < NR; ++r) yp[n0 + r] = _mm512_reduce_add_ps(acc[r]);
  if (G % 2) {  // the odd last group, as the fp32 kernel does it
    const int64_t g = G - 1;
    const __m512 xl = _mm512_loadu_ps(x + g * 32), xh = _mm512_loadu_ps(x + g * 32 + 16);
    const __m512i lo_mask = _mm512_set1_epi32(0xF);
    for (int r = 0; r < NR; ++r) {
      __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + r * row + g * 16)));
      __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), xh,
                                 _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, lo_mask)), xl));
      const uint16_t* sp = sb + (r * G + g) * 2;
      const float sc = bf16_to_f32(sp[0]);
      yp[n0 + r] += sc * _mm512_reduce_add_ps(t) + (bf16_to_f32(sp[1]) - 8.f * sc) * xs[g];
    }
  }
}

BF16_TARGET void int4_blocks_bf16(const uint16_t* xb, const float* xs8, const float* x, const float* xs,
                                  const uint8_t* pp, const uint16_t* smp, int64_t N, int64_t K, float* yp,
                                  int64_t b0, int64_t b1) {
  static const Int4Bf16Consts c;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * ROWS;
    if (N - n0 >= ROWS) int4_rows_bf16<ROWS>(c, xb, xs8, x, xs, pp, smp, K, n0, yp);
    else for (int64_t n = n0; n < N; ++n) int4_rows_bf16<1>(c, xb, xs8, x, xs, pp, smp, K, n, yp);
  }
}

// Int8 per output channel: y[n] = scale[n] * sum_k q[n,k] x[k], NR consecutive rows from n0 (their bytes
// are contiguous: NR * K), fp32 products. The rows' bytes are prefetched PF_W ahead, one cache line per
// 16 columns of NR = 4 rows, so the prefetch sweeps the block's bytes at the rate they are read: without
// it a decode GEMV streamed int8 weights at ~12 GB/s where int4 (prefetched) reached ~27.
template <int NR>
inline void int8_rows(const float* x, const int8_t* qp, const float* sp, int64_t K, int64_t n0, float* y) {
  const int8_t* wb = qp + n0 * K;
  __m512 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(wb) + PF_W + k * NR, _MM_HINT_T0);
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_fmadd_ps(i8x16_to_f32(wb + r * K + k), xv, acc[r]);
  }
  for (int r = 0; r < NR; ++r) y[n0 + r] = _mm512_reduce_add_ps(acc[r]) * sp[n0 + r];
}

// Int8 rows [b0 * ROWS, b1 * ROWS) of y (N rows in all, K % 16 == 0).
void int8_blocks(const float* x, const int8_t* qp, const float* sp, int64_t N, int64_t K, float* y, int64_t b0,
                 int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * ROWS;
    if (N - n0 >= ROWS) int8_rows<ROWS>(x, qp, sp, K, n0, y);
    else for (int64_t n = n0; n < N; ++n) int8_rows<1>(x, qp, sp, K, n, y);
  }
}

// Int4 rows [b0 * ROWS, b1 * ROWS) of y; layout and convention: see gemv_int4.
void int4_blocks(const float* xp, const float* xs, const uint8_t* pp, const uint16_t* smp, int64_t N, int64_t K,
                 float* yp, int64_t b0, int64_t b1) {
  const int64_t G = K / 32;
  const __m512i lo_mask = _mm512_set1_epi32(0xF);
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
    at::parallel_for(0, (N + ROWS - 1) / ROWS, 16, [&](int64_t b0, int64_t b1) {
      int8_blocks(xp, qp, sp, N, K, yp, b0, b1);
    });
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
  // bf16 activations (the decode path) take the BF16 dot-product kernel where the CPU has one.
  const bool dot_bf16 = x.scalar_type() == torch::kBFloat16 && cpu_has_bf16();
  return with_act(x, K, N, [&](const float* xp, float* yp) {
    std::vector<float> xs(G);
    if (dot_bf16) {
      std::vector<uint16_t> xb(K);
      std::vector<float> xs8(8 * G);
      int4_prep_bf16(xp, K, xb.data(), xs8.data(), xs.data());
      at::parallel_for(0, (N + ROWS - 1) / ROWS, 16, [&](int64_t b0, int64_t b1) {
        int4_blocks_bf16(xb.data(), xs8.data(), xp, xs.data(), pp, smp, N, K, yp, b0, b1);
      });
      return;
    }
    group_sums(xp, G, xs.data());
    at::parallel_for(0, (N + ROWS - 1) / ROWS, 16, [&](int64_t b0, int64_t b1) {
      int4_blocks(xp, xs.data(), pp, smp, N, K, yp, b0, b1);
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

// rms_norm of one row, each value rounded to T; stored as O (T, or fp32 for a GEMV's input).
template <typename T, typename O>
void rmsnorm_row(const T* x, const float* w, O* out, int64_t n, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) { const float v = static_cast<float>(x[i]); ss += v * v; }
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<O>(rnd<T>(w[i] * (static_cast<float>(x[i]) * r)));
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
// In: where q/k come from (T, or fp32 already rounded to T).
template <typename T, typename In = T>
inline void rope_head(const In* x, const T* c, const T* s, float* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; ++i) {
    const float xi = static_cast<float>(x[i]);
    const float rot = i < half ? -static_cast<float>(x[i + half]) : static_cast<float>(x[i - half]);
    out[i] = rnd<T>(rnd<T>(xi * static_cast<float>(c[i])) + rnd<T>(rot * static_cast<float>(s[i])));
  }
}

// KV head kh's new K (rotated) and V into the caches [1, K, L, D] at `pos`; buf: D floats.
template <typename T, typename In>
void kv_write_head(const In* qkv, const T* c, const T* s, T* kc, T* vc, int64_t pos, int64_t kh, int64_t H,
                   int64_t K, int64_t D, int64_t L, float* buf) {
  rope_head<T, In>(qkv + H * D + kh * D, c, s, buf, D);
  T* kd = kc + (kh * L + pos) * D;
  T* vd = vc + (kh * L + pos) * D;
  const In* v = qkv + H * D + K * D + kh * D;
  for (int64_t i = 0; i < D; ++i) { kd[i] = static_cast<T>(buf[i]); vd[i] = static_cast<T>(v[i]); }
}

// Query head h over cached positions 0..pos (GQA: kv head h / (H/K)) -> out[h*D .. h*D+D) rounded to T.
// q: D floats, p: pos + 1 floats of scratch.
template <typename T, typename In, typename Out>
void attend_head(const In* qkv, const T* c, const T* s, const T* kc, const T* vc, Out* out, int64_t pos,
                 int64_t h, int64_t H, int64_t K, int64_t D, int64_t L, float scale, float* q, float* p) {
  const int64_t S = pos + 1;
  rope_head<T, In>(qkv + h * D, c, s, q, D);
  const T* kb = kc + (h / (H / K)) * L * D;
  const T* vb = vc + (h / (H / K)) * L * D;
  float m = -INFINITY;
  for (int64_t j = 0; j < S; ++j) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16<T>(kb + j * D + i), acc);
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
    for (int k = 0; k < 16; ++k) out[h * D + i + k] = static_cast<Out>(rnd<T>(tmp[k]));
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

// ---- The whole decoder stack for one decode step (B = 1, T = 1) in one call ---------------------
// Why: at decode a layer's work is ~10 small ops on 576-wide vectors; called one by one from Python
// each pays a Python frame, torch dispatch, an output allocation and (GEMVs) an OpenMP wake-up, which
// together cost more than the weights take to stream. Here every layer runs inside ONE OpenMP
// parallel region: GEMVs split rows over the threads, small ops are split or repeated per thread,
// and threads meet at barriers (spinning, so they stay hot). Same math and the same T (bf16) rounding
// points as the fused per-layer ops above: norm, qkv, rope + KV write + attention, o + residual,
// norm, gate_up + silu*mul, down + residual.
namespace {

enum Kind : int64_t { KIND_F32 = 0, KIND_BF16 = 1, KIND_INT8 = 2, KIND_INT4 = 3 };

struct Lin {
  int64_t kind = -1, N = 0, K = 0;  // K: the weight's input width (int8/int4: padded with zero columns)
  const void* w = nullptr;          // [N, K] f32 / bf16 / int8, or int4 packed [N, K/2]
  const void* s = nullptr;          // int8: scale [N] fp32; int4: (scale, zero) [N, K/32, 2] bf16
  const void* bias = nullptr;       // [N] in the activation dtype, or none
};

struct Layer {
  Lin qkv, o, gu, down;
  const float* attn_norm;
  const float* mlp_norm;
};

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// A GEMV input as the row kernels read it: x (fp32, zero beyond the layer's input width) and, for
// int4, its per-group sums (xs) or its BF16 dot-product layout (xb, xs8; see int4_prep_bf16).
struct Input {
  const float* x;
  float* xs;
  uint16_t* xb;
  float* xs8;
};

void prepare(const Lin& L, const float* x, Input& in) {
  in.x = x;
  if (L.kind != KIND_INT4) return;
  if (cpu_has_bf16()) int4_prep_bf16(x, L.K, in.xb, in.xs8, in.xs);
  else group_sums(x, L.K / 32, in.xs);
}

// Rows [n0, n1) of L's product with the input into y[0 .. n1-n0), before rounding.
void lin_rows(const Lin& L, const Input& in, int64_t n0, int64_t n1, float* y) {
  const int64_t N = n1 - n0, K = L.K, blocks = (N + ROWS - 1) / ROWS;
  const float* x = in.x;
  if (N <= 0) return;
  switch (L.kind) {
    case KIND_F32: {
      const float* wp = static_cast<const float*>(L.w) + n0 * K;
      gemv_blocks(x, N, K, y, 0, blocks, [&](int64_t n, int64_t k) { return _mm512_loadu_ps(wp + n * K + k); });
      break;
    }
    case KIND_BF16: {
      const uint16_t* wp = static_cast<const uint16_t*>(L.w) + n0 * K;
      gemv_blocks(x, N, K, y, 0, blocks, [&](int64_t n, int64_t k) { return bf16x16_to_f32(wp + n * K + k); });
      break;
    }
    case KIND_INT8: {
      const int8_t* qp = static_cast<const int8_t*>(L.w) + n0 * K;
      const float* sp = static_cast<const float*>(L.s) + n0;
      int8_blocks(x, qp, sp, N, K, y, 0, blocks);
      break;
    }
    default: {
      const uint8_t* pp = static_cast<const uint8_t*>(L.w) + n0 * (K / 2);
      const uint16_t* sp = static_cast<const uint16_t*>(L.s) + n0 * (K / 32) * 2;
      if (cpu_has_bf16()) int4_blocks_bf16(in.xb, in.xs8, x, in.xs, pp, sp, N, K, y, 0, blocks);
      else int4_blocks(x, in.xs, pp, sp, N, K, y, 0, blocks);
    }
  }
}

// This thread's share [n0, n1) of N rows, in whole ROWS blocks.
inline void share(int64_t N, int tid, int nth, int64_t& n0, int64_t& n1) {
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  n0 = std::min(N, blocks * tid / nth * ROWS);
  n1 = std::min(N, blocks * (tid + 1) / nth * ROWS);
}

// A GEMV output as the per-layer path has it: rounded to T, plus the bias (rounded again).
template <typename T>
inline float out_value(const Lin& L, int64_t n, float v) {
  float r = rnd<T>(v);
  if (L.bias) r = rnd<T>(r + static_cast<float>(static_cast<const T*>(L.bias)[n]));
  return r;
}

}  // namespace

class DecodeStack {
 public:
  // H query heads, K kv heads, D head dim, E hidden size, I MLP width; bf16: activation dtype.
  DecodeStack(int64_t H, int64_t K, int64_t D, int64_t E, int64_t I, double eps, double scale, bool bf16)
      : H_(H), K_(K), D_(D), E_(E), I_(I), eps_(static_cast<float>(eps)), scale_(static_cast<float>(scale)),
        dt_(bf16 ? torch::kBFloat16 : torch::kFloat32) {
    TORCH_CHECK(D % 16 == 0 && H % K == 0, "head_dim % 16 == 0 and H % K == 0 expected");
    width_ = round_up(std::max({E, H * D, I}), 64);  // widest GEMV input, padded for int8/int4
    qkv_.assign((H + 2 * K) * D, 0.f);
    attn_.assign(width_, 0.f);
    act_.assign(width_, 0.f);
  }

  // One layer: each linear as (kind, weight, scales, bias), empty tensors for none; norms fp32 [E].
  void add_layer(std::vector<int64_t> kinds, std::vector<torch::Tensor> w, std::vector<torch::Tensor> s,
                 std::vector<torch::Tensor> b, torch::Tensor attn_norm, torch::Tensor mlp_norm) {
    TORCH_CHECK(kinds.size() == 4 && w.size() == 4 && s.size() == 4 && b.size() == 4, "4 linears expected");
    const int64_t n_out[4] = {(H_ + 2 * K_) * D_, E_, 2 * I_, E_}, n_in[4] = {E_, H_ * D_, E_, I_};
    Layer ly;
    Lin* lins[4] = {&ly.qkv, &ly.o, &ly.gu, &ly.down};
    for (int i = 0; i < 4; ++i) {
      Lin& L = *lins[i];
      L.kind = kinds[i];
      TORCH_CHECK(w[i].is_contiguous() && w[i].device().is_cpu() && w[i].dim() == 2, "weight: contiguous 2-D CPU");
      L.N = w[i].size(0);
      L.K = L.kind == KIND_INT4 ? w[i].size(1) * 2 : w[i].size(1);
      TORCH_CHECK(L.N == n_out[i] && L.K >= n_in[i] && L.K <= width_ && L.K % 16 == 0, "linear ", i, ": bad shape");
      const auto wt = w[i].scalar_type();
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
      L.w = w[i].data_ptr();
      L.s = s[i].numel() ? s[i].data_ptr() : nullptr;
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
    for (auto* v : {&w, &s, &b}) keep_.insert(keep_.end(), v->begin(), v->end());
    keep_.push_back(attn_norm);
    keep_.push_back(mlp_norm);
  }

  int64_t n_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x: [.., E] hidden state at position `pos`; cos/sin: [.., D] for `pos`; k/v caches per layer
  // [1, K, L, D]. Returns the hidden state after every layer (x untouched); the caches get `pos`.
  torch::Tensor step(torch::Tensor x, int64_t pos, torch::Tensor cos, torch::Tensor sin,
                     std::vector<torch::Tensor> kc, std::vector<torch::Tensor> vc) {
    TORCH_CHECK(x.scalar_type() == dt_ && x.numel() == E_ && x.device().is_cpu(), "x: E values in the act dtype");
    TORCH_CHECK(cos.scalar_type() == dt_ && sin.scalar_type() == dt_ && cos.is_contiguous() && sin.is_contiguous() &&
                cos.numel() == D_ && sin.numel() == D_, "cos/sin: [D] in the act dtype");
    const size_t n = layers_.size();
    TORCH_CHECK(kc.size() == n && vc.size() == n, "one k and v cache per layer");
    const int64_t L = n ? kc[0].size(2) : 1;
    TORCH_CHECK(pos >= 0 && pos < L, "position outside the cache");
    for (size_t l = 0; l < n; ++l)
      for (auto* t : {&kc[l], &vc[l]})
        TORCH_CHECK(t->scalar_type() == dt_ && t->is_contiguous() && t->dim() == 4 && t->size(0) == 1 &&
                    t->size(1) == K_ && t->size(2) == L && t->size(3) == D_, "cache: [1, K, L, D] contiguous");
    auto out = x.contiguous().clone();
    if (dt_ == torch::kFloat32)
      run<float>(out.data_ptr<float>(), pos, L, cos.data_ptr<float>(), sin.data_ptr<float>(), kc, vc);
    else
      run<at::BFloat16>(out.data_ptr<at::BFloat16>(), pos, L, cos.data_ptr<at::BFloat16>(),
                        sin.data_ptr<at::BFloat16>(), kc, vc);
    return out;
  }

 private:
  template <typename T>
  void run(T* x, int64_t pos, int64_t L, const T* c, const T* s, std::vector<torch::Tensor>& kc,
           std::vector<torch::Tensor>& vc) {
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
      std::vector<uint16_t> xb(width_);
      Input in{nullptr, xs.data(), xb.data(), xs8.data()};
      int64_t n0, n1;
      // this thread's share of lin's rows over src, added into the residual stream x
      auto rows_into_residual = [&](const Lin& lin, const float* src) {
        prepare(lin, src, in);
        share(lin.N, tid, nth, n0, n1);
        lin_rows(lin, in, n0, n1, y.data());
        for (int64_t n = n0; n < n1; ++n) x[n] = static_cast<T>(static_cast<float>(x[n]) + out_value<T>(lin, n, y[n - n0]));
      };
      for (size_t l = 0; l < layers_.size(); ++l) {
        const Layer& ly = layers_[l];
        T* kcp = kc[l].template data_ptr<T>();
        T* vcp = vc[l].template data_ptr<T>();
        // norm (each thread its own copy: cheaper than a barrier) -> qkv rows
        rmsnorm_row<T, float>(x, ly.attn_norm, h.data(), E, eps_);
        prepare(ly.qkv, h.data(), in);
        share(ly.qkv.N, tid, nth, n0, n1);
        lin_rows(ly.qkv, in, n0, n1, y.data());
        for (int64_t n = n0; n < n1; ++n) qkv[n] = out_value<T>(ly.qkv, n, y[n - n0]);
#pragma omp barrier
        for (int64_t kh = tid; kh < K; kh += nth) kv_write_head<T, float>(qkv, c, s, kcp, vcp, pos, kh, H, K, D, L, q.data());
#pragma omp barrier
        for (int64_t hh = H * tid / nth; hh < H * (tid + 1) / nth; ++hh)
          attend_head<T, float, float>(qkv, c, s, kcp, vcp, attn, pos, hh, H, K, D, L, scale_, q.data(), p.data());
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

  int64_t H_, K_, D_, E_, I_, width_;
  float eps_, scale_;
  torch::ScalarType dt_;
  std::vector<Layer> layers_;
  std::vector<torch::Tensor> keep_;
  std::vector<float> qkv_, attn_, act_;  // shared between the threads of a step
};

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
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, bool>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("n_layers", &DecodeStack::n_layers)
      .def("step", &DecodeStack::step);
}
