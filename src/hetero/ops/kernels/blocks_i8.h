// GEMV rows over GGUF blocks as stored, on int8 activations (AVX512-VNNI): Q8_0, Q4_0, Q4_1, Q4_K, Q6_K.
//
// The weights stay the file's integers; x is rounded to int8 as llama.cpp rounds it for these
// kinds: one scale per 32 values (Q8_0, Q4_0, Q4_1) or per 256 with per-32 or per-16 sums (Q4_K,
// Q6_K: llama.cpp's q8_K). Each block's integer dot is exact (int32), scaled once in fp32. vpdpbusd does 64 multiply-
// adds per 512-bit operation, twice the bf16 pair products of blocks.h, and the per-block float work
// is shared by four blocks (Q8_0, Q4_0, Q4_1) or a whole 256-block (Q4_K, Q6_K): these loops spend about half the
// 512-bit operations per byte of the bf16 ones, which ran compute-bound near one thread's share of
// the memory rate.
//
// Every loop takes NX activation rows: the weights are unpacked once and each row gets the same
// operations in the same order as alone, so a batched step's row has the single step's bits.
#pragma once
#include "common.h"
#include "blocks.h"

#define I8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni,f16c,fma")))

namespace {

bool cpu_has_i8dot() {
  static const bool has = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi") &&
                          __builtin_cpu_supports("gfni");
  return has;
}

// The three x layouts (families) the int8 loops read.
enum I8Family : int { I8_NONE = -1, I8_Q8 = 0, I8_Q4 = 1, I8_K4 = 2, I8_K6 = 3 };
constexpr int I8_FAMILIES = 4;

inline int i8_family(int64_t kind, int64_t K) {
  if (kind == KIND_Q8_0 && K % 32 == 0) return I8_Q8;
  if ((kind == KIND_Q4_0 || kind == KIND_Q4_1) && K % 32 == 0) return I8_Q4;
  if (kind == KIND_Q4_K && K % 256 == 0) return I8_K4;
  if (kind == KIND_Q6_K && K % 256 == 0) return I8_K6;
  return I8_NONE;
}

// Whether `kind` at width K runs on int8 activations now (the process-wide mode, and a CPU with it).
inline int i8_kind(int64_t kind, int64_t K) { return act_int8() && cpu_has_i8dot() ? i8_family(kind, K) : I8_NONE; }

// Sizes of one activation row's buffers (elements), for any family at width K.
inline int64_t i8_q_len(int64_t K) { return round_up(K, 256); }
inline int64_t i8_f_len(int64_t K) { return round_up(K, 256) / 4; }

// One activation row as a family's loop reads it (K rounded up to 128 or 256 with zeros).
//   Q8, Q4: q  per 4 blocks (128 values), two 64-byte vectors: lane l (4 bytes) of the first holds
//       values 4(l/4)..+3 of block l%4, of the second values 16 + 4(l/4)..+3 (for Q4_0/Q4_1 the
//       low and high nibbles); so every lane's sum is one block's, and a block's per-row terms are
//       4 values a group (lanes 0-3, or broadcast to all): d: dx; c: -128 * sum q (Q8: the loop
//       adds 128 to the weights to make them unsigned) or -8 * sum q (Q4); m: dx * sum q (Q4_1's
//       offset term).
//   K4: q  per 128: sub-blocks 4c, 4c+2 (the low nibbles of a 64-byte load), then 4c+1, 4c+3;
//       d: dx per 256; bs: sum q per sub-block of 32.
//   K6: q  natural order; d: dx per 256; bs: sum q per 16 (Q6_K's sub-block).
struct XI8 {
  int8_t* q;
  float* d;
  int32_t* c;
  float* m;
  int16_t* bs;
};

// Per-group int8 rounding of x (G groups of `g` values): q, the scale per group, the sum per 32.
I8_TARGET inline void quant_groups(const float* x, int64_t K, int64_t g, int8_t* q, float* dx, int32_t* s32) {
  for (int64_t k0 = 0; k0 < K; k0 += g) {
    __m512 mx = _mm512_setzero_ps();
    for (int64_t k = k0; k < k0 + g; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
    const float amax = _mm512_reduce_max_ps(mx), d = amax / 127.f;
    dx[k0 / g] = d;
    const __m512 inv = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
    for (int64_t k = k0; k < k0 + g; k += 32) {
      const __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), inv));
      const __m512i b = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k + 16), inv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(a));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k + 16), _mm512_cvtsepi32_epi8(b));
      s32[k / 32] = _mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
    }
  }
}

// x (K fp32) into family f's layout; scratch: K int8 + K / 32 floats and ints.
I8_TARGET inline void i8_prep(int f, const float* x, int64_t K, const XI8& o) {
  const int64_t nb = K / 32;
  thread_local std::vector<int8_t> qn;
  thread_local std::vector<float> dn;
  thread_local std::vector<int32_t> sn;
  qn.resize(K); dn.resize(nb); sn.resize(nb);
  if (f == I8_K4) {
    quant_groups(x, K, 256, qn.data(), o.d, sn.data());
    for (int64_t i = 0; i < K / 256; ++i)
      for (int c = 0; c < 2; ++c) {
        const int8_t* src = qn.data() + 256 * i + 128 * c;
        int8_t* dst = o.q + 256 * i + 128 * c;
        std::memcpy(dst, src, 32); std::memcpy(dst + 32, src + 64, 32);
        std::memcpy(dst + 64, src + 32, 32); std::memcpy(dst + 96, src + 96, 32);
      }
    for (int64_t b = 0; b < nb; ++b) o.bs[b] = static_cast<int16_t>(sn[b]);
    return;
  }
  if (f == I8_K6) {
    quant_groups(x, K, 256, o.q, o.d, sn.data());
    for (int64_t j = 0; j < K / 16; ++j) {
      int s16 = 0;
      for (int k = 0; k < 16; ++k) s16 += o.q[16 * j + k];
      o.bs[j] = static_cast<int16_t>(s16);
    }
    return;
  }
  quant_groups(x, K, 32, qn.data(), dn.data(), sn.data());
  const int64_t G = (nb + 3) / 4;   // Q8, Q4: groups of 4 blocks, the last padded with zero blocks
  std::memset(o.q, 0, G * 128);
  for (int64_t b = 0; b < 4 * G; ++b) {
    const bool in = b < nb;
    const int64_t g = b / 4, j = b % 4;
    if (in)
      for (int h = 0; h < 2; ++h)
        for (int w = 0; w < 4; ++w)   // lane 4w + j of vector h: values 16h + 4w .. +3 of block j
          std::memcpy(o.q + 128 * g + 64 * h + 4 * (4 * w + j), qn.data() + 32 * b + 16 * h + 4 * w, 4);
    o.d[4 * g + j] = in ? dn[b] : 0.f;
    o.c[4 * g + j] = in ? (f == I8_Q8 ? -128 : -8) * sn[b] : 0;
    o.m[4 * g + j] = in ? dn[b] * static_cast<float>(sn[b]) : 0.f;
  }
}

// The high nibble of each byte (a right shift by 4 per byte, in one GF(2) affine operation).
I8_TARGET inline __m512i hi_nibbles(__m512i v) {
  return _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(0x1020408000000000LL), 0);
}

// ---- Q8_0: four blocks a step --------------------------------------------------------------------
// Four 32-byte loads, two dword permutes into the lane order above; per activation row two vpdpbusd,
// and one convert and one FMA for the four blocks.
struct Q8I8Consts {
  __m512i pa, pb;   // dwords of (blocks 0, 1 | blocks 2, 3) into the two vectors
  I8_TARGET Q8I8Consts() {
    alignas(64) uint32_t a[16], b[16];
    for (int l = 0; l < 16; ++l) {
      const int blk = l % 4, dw = l / 4, base = (blk < 2 ? 0 : 16) + 8 * (blk % 2);
      a[l] = static_cast<uint32_t>(base + dw);
      b[l] = static_cast<uint32_t>(base + 4 + dw);
    }
    pa = _mm512_load_si512(a);
    pb = _mm512_load_si512(b);
  }
};

template <int NX>
I8_TARGET inline void q8_row_i8(const Q8I8Consts& c, const XI8* xs, const uint8_t* row, int64_t rb, int64_t K,
                                float* const* y, int64_t n) {
  constexpr int64_t B = 34;
  const int64_t nb = K / 32, G = (nb + 3) / 4;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[NX];
  for (int x = 0; x < NX; ++x) acc[x] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    prefetch_rows<1>(row, rb, 4 * B * g, 4 * B);
    const uint8_t* p = row + 4 * B * g;
    const int64_t nbk = std::min<int64_t>(4, nb - 4 * g);   // blocks in this step (the last may have fewer)
    auto blk = [&](int j) {
      return j < nbk ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + B * j + 2)) : _mm256_setzero_si256();
    };
    const __m512i z0 = _mm512_inserti64x4(_mm512_castsi256_si512(blk(0)), blk(1), 1);
    const __m512i z1 = _mm512_inserti64x4(_mm512_castsi256_si512(blk(2)), blk(3), 1);
    const __m512i wa = _mm512_xor_si512(flip, _mm512_permutex2var_epi32(z0, c.pa, z1));   // w + 128: unsigned
    const __m512i wb = _mm512_xor_si512(flip, _mm512_permutex2var_epi32(z0, c.pb, z1));
    uint16_t h[4] = {0, 0, 0, 0};
    for (int j = 0; j < nbk; ++j) std::memcpy(h + j, p + B * j, 2);
    const __m512 sc = _mm512_broadcast_f32x4(_mm_cvtph_ps(_mm_setr_epi16(h[0], h[1], h[2], h[3], 0, 0, 0, 0)));
    for (int x = 0; x < NX; ++x) {
      const XI8& r = xs[x];
      __m512i t = _mm512_zextsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r.c + 4 * g)));
      t = _mm512_dpbusd_epi32(t, wa, _mm512_loadu_si512(r.q + 128 * g));
      t = _mm512_dpbusd_epi32(t, wb, _mm512_loadu_si512(r.q + 128 * g + 64));
      acc[x] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(sc, _mm512_broadcast_f32x4(_mm_loadu_ps(r.d + 4 * g))), acc[x]);
    }
  }
  for (int x = 0; x < NX; ++x) y[x][n] = _mm512_reduce_add_ps(acc[x]);
}

// ---- Q4_0 / Q4_1: four blocks a step ------------------------------------------------------------
// Two loads cover four blocks' bytes (72 or 80); one byte permute gathers their 64 nibble bytes into
// the lane order above, one word permute their scales (lane l: block l%4's).
template <bool M1>
struct Q4I8Consts {
  __m512i iq, id, im;
  I8_TARGET Q4I8Consts() {
    constexpr int B = M1 ? 20 : 18, OFF = M1 ? 4 : 2;
    alignas(64) uint8_t q[64];
    alignas(64) uint16_t d[32], m[32];
    for (int l = 0; l < 16; ++l)   // lane l: bytes 4(l/4)..+3 of block l%4's nibbles
      for (int b = 0; b < 4; ++b) q[4 * l + b] = static_cast<uint8_t>(B * (l % 4) + OFF + 4 * (l / 4) + b);
    for (int l = 0; l < 32; ++l) {
      const int j = l % 4;
      d[l] = static_cast<uint16_t>(B * j / 2);
      m[l] = static_cast<uint16_t>(B * j / 2 + 1);
    }
    iq = _mm512_load_si512(q);
    id = _mm512_load_si512(d);
    im = _mm512_load_si512(m);
  }
};

template <bool M1, int NX>
I8_TARGET inline void q4_row_i8(const Q4I8Consts<M1>& c, const XI8* xs, const uint8_t* row, int64_t rb, int64_t K,
                                float* const* y, int64_t n) {
  constexpr int64_t B = M1 ? 20 : 18;
  const int64_t nb = K / 32, G = (nb + 3) / 4;
  const __m512i m15 = _mm512_set1_epi8(0xF);
  __m512 acc[NX];
  for (int x = 0; x < NX; ++x) acc[x] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    prefetch_rows<1>(row, rb, 4 * B * g, 4 * B);
    const uint8_t* p = row + 4 * B * g;
    const int64_t L = std::min<int64_t>(4, nb - 4 * g) * B;   // bytes of this step's blocks
    const __mmask64 ma = L >= 64 ? ~0ULL : (1ULL << L) - 1, mb = L > 64 ? (1ULL << (L - 64)) - 1 : 0;
    const __m512i a = _mm512_maskz_loadu_epi8(ma, p), b = _mm512_maskz_loadu_epi8(mb, p + 64);
    const __m512i z = _mm512_permutex2var_epi8(a, c.iq, b);
    const __m512i lo = _mm512_and_si512(z, m15), hi = hi_nibbles(z);
    const __m512 dv = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi16(a, c.id, b)));
    __m512 mv = _mm512_setzero_ps();
    if (M1) mv = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi16(a, c.im, b)));
    for (int x = 0; x < NX; ++x) {
      const XI8& r = xs[x];
      __m512i t = M1 ? _mm512_setzero_si512()
                     : _mm512_zextsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r.c + 4 * g)));
      t = _mm512_dpbusd_epi32(t, lo, _mm512_loadu_si512(r.q + 128 * g));
      t = _mm512_dpbusd_epi32(t, hi, _mm512_loadu_si512(r.q + 128 * g + 64));
      acc[x] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(dv, _mm512_broadcast_f32x4(_mm_loadu_ps(r.d + 4 * g))), acc[x]);
      if (M1) acc[x] = _mm512_fmadd_ps(mv, _mm512_zextps128_ps512(_mm_loadu_ps(r.m + 4 * g)), acc[x]);
    }
  }
  for (int x = 0; x < NX; ++x) y[x][n] = _mm512_reduce_add_ps(acc[x]);
}

// A 256-block's integer dot: unsigned weights w (4 vectors) by x q (signed), pair sums (vpmaddubsw)
// times word scales sc per sub-block (vpdpwssd). Q4_K's and Q6_K's inner step.
I8_TARGET inline __m512i scaled_dot256(const __m512i* w, const int8_t* q, const __m512i* sc) {
  __m512i s = _mm512_setzero_si512();
  for (int v = 0; v < 4; ++v) s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(w[v], _mm512_loadu_si512(q + 64 * v)), sc[v]);
  return s;
}

// ---- Q4_K: a 256-block a step -------------------------------------------------------------------
// The sub-block scales (6-bit integers) multiply inside the integer sums (vpmaddubsw pairs, then
// vpdpwssd by a word vector of scales), so a block's float work is one convert and one FMA.
struct K4I8Consts {
  __m512i isc[4];   // byte permutes: scale s of sub-blocks (4c, 4c+2), (4c+1, 4c+3) into words
  I8_TARGET K4I8Consts() {
    const int subs[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};
    for (int v = 0; v < 4; ++v) {
      alignas(64) uint8_t ix[64];
      for (int i = 0; i < 64; ++i) ix[i] = static_cast<uint8_t>(subs[v][i / 32]);
      isc[v] = _mm512_load_si512(ix);
    }
  }
};

template <int NX>
I8_TARGET inline void q4k_row_i8(const K4I8Consts& c, const XI8* xs, const uint8_t* row, int64_t rb, int64_t K,
                                 float* const* y, int64_t n) {
  constexpr int64_t B = 144;
  const int64_t nb = K / 256;
  const __m512i m15 = _mm512_set1_epi8(0xF);
  constexpr __mmask64 even = 0x5555555555555555ULL;
  __m512 acc[NX];
  __m128 off[NX];
  for (int x = 0; x < NX; ++x) { acc[x] = _mm512_setzero_ps(); off[x] = _mm_setzero_ps(); }
  for (int64_t i = 0; i < nb; ++i) {
    prefetch_rows<1>(row, rb, B * i, B);
    const uint8_t* b = row + B * i;
    const __m128i smv = scales_mins_simd(b + 4);
    const __m512i sz = _mm512_castsi128_si512(smv);
    __m512i sc[4];
    for (int v = 0; v < 4; ++v) sc[v] = _mm512_maskz_permutexvar_epi8(even, c.isc[v], sz);
    const __m128i mn = _mm_cvtepu8_epi16(_mm_srli_si128(smv, 8));
    const __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128(*reinterpret_cast<const int*>(b)));   // d, dmin
    const __m512i v0 = _mm512_loadu_si512(b + 16), v1 = _mm512_loadu_si512(b + 80);
    const __m512i w[4] = {_mm512_and_si512(v0, m15), hi_nibbles(v0), _mm512_and_si512(v1, m15), hi_nibbles(v1)};
    for (int x = 0; x < NX; ++x) {
      const XI8& r = xs[x];
      __m512i s = scaled_dot256(w, r.q + 256 * i, sc);
      const __m128 ddx = _mm_mul_ps(dd, _mm_set1_ps(r.d[i]));
      acc[x] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_broadcastss_ps(ddx), acc[x]);
      const __m128i mi = _mm_madd_epi16(mn, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r.bs + 8 * i)));
      off[x] = _mm_fmadd_ps(_mm_cvtepi32_ps(mi), _mm_shuffle_ps(ddx, ddx, 0x55), off[x]);
    }
  }
  for (int x = 0; x < NX; ++x) {
    alignas(16) float t[4];
    _mm_store_ps(t, off[x]);
    y[x][n] = _mm512_reduce_add_ps(acc[x]) - (t[0] + t[1] + t[2] + t[3]);
  }
}

// ---- Q6_K: a 256-block a step -------------------------------------------------------------------
// Weights 0-63 as stored (low nibbles from ql, two high bits from qh, llama.cpp's order: within each
// 128, ql's 64 bytes' low nibbles are values 0-63, high nibbles 64-127, qh's 32 bytes give bits
// 0-1 / 2-3 / 4-5 / 6-7 to values l, l+32, l+64, l+96), so x stays in natural order. The signed
// sub-block scales (16 values each) multiply inside the integer sums; the -32 offset is one madd of
// the scales with x's per-16 sums.
struct K6I8Consts {
  __m512i isc[4];   // word permutes: the scale of each word pair's sub-block, per 64 values
  __m512i shl, shr; // per-64-bit-lane shifts bringing qh's bit pairs to bits 4-5
  I8_TARGET K6I8Consts() {
    for (int v = 0; v < 4; ++v) {
      alignas(64) uint16_t ix[32];
      for (int l = 0; l < 32; ++l) ix[l] = static_cast<uint16_t>(4 * v + l / 8);
      isc[v] = _mm512_load_si512(ix);
    }
    shl = _mm512_set_epi64(2, 2, 2, 2, 4, 4, 4, 4);   // values l (bits 0-1), l+32 (bits 2-3)
    shr = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);   // values l+64 (bits 4-5), l+96 (bits 6-7)
  }
};

template <int NX>
I8_TARGET inline void q6k_row_i8(const K6I8Consts& c, const XI8* xs, const uint8_t* row, int64_t rb, int64_t K,
                                 float* const* y, int64_t n) {
  constexpr int64_t B = 210;
  const int64_t nb = K / 256;
  const __m512i m15 = _mm512_set1_epi8(0xF), m48 = _mm512_set1_epi8(0x30);
  __m512 acc[NX];
  for (int x = 0; x < NX; ++x) acc[x] = _mm512_setzero_ps();
  for (int64_t i = 0; i < nb; ++i) {
    prefetch_rows<1>(row, rb, B * i, B);
    const uint8_t* b = row + B * i;
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192)));
    const __m512i scz = _mm512_castsi256_si512(sc16);
    __m512i sc[4], w[4];
    for (int v = 0; v < 4; ++v) sc[v] = _mm512_permutexvar_epi16(c.isc[v], scz);
    for (int h = 0; h < 2; ++h) {
      const __m512i l = _mm512_loadu_si512(b + 64 * h);
      const __m512i q = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h)));
      w[2 * h] = _mm512_or_si512(_mm512_and_si512(l, m15), _mm512_and_si512(_mm512_sllv_epi64(q, c.shl), m48));
      w[2 * h + 1] = _mm512_or_si512(hi_nibbles(l), _mm512_and_si512(_mm512_srlv_epi64(q, c.shr), m48));
    }
    uint16_t dh;
    std::memcpy(&dh, b + 208, 2);
    const float d = _cvtsh_ss(dh);
    for (int x = 0; x < NX; ++x) {
      const XI8& r = xs[x];
      __m512i s = scaled_dot256(w, r.q + 256 * i, sc);
      const __m256i o = _mm256_madd_epi16(sc16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.bs + 16 * i)));
      s = _mm512_sub_epi32(s, _mm512_slli_epi32(_mm512_zextsi256_si512(o), 5));   // - 32 * sum sc * x
      acc[x] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(d * r.d[i]), acc[x]);
    }
  }
  for (int x = 0; x < NX; ++x) y[x][n] = _mm512_reduce_add_ps(acc[x]);
}

// Rows [n0, n1) of W (`kind`, family f, [N, row bytes] from w) for NX activation rows into y[x][n].
template <int NX>
I8_TARGET void i8_rows_t(int64_t kind, const XI8* xs, const uint8_t* w, int64_t K, float* const* y, int64_t n0, int64_t n1) {
  static const Q8I8Consts c8;
  static const Q4I8Consts<false> c40;
  static const Q4I8Consts<true> c41;
  static const K4I8Consts ck;
  static const K6I8Consts c6;
  const int64_t rb = block_row_bytes(kind, K);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * rb;
    switch (kind) {
      case KIND_Q8_0: q8_row_i8<NX>(c8, xs, row, rb, K, y, n); break;
      case KIND_Q4_0: q4_row_i8<false, NX>(c40, xs, row, rb, K, y, n); break;
      case KIND_Q4_1: q4_row_i8<true, NX>(c41, xs, row, rb, K, y, n); break;
      case KIND_Q6_K: q6k_row_i8<NX>(c6, xs, row, rb, K, y, n); break;
      default: q4k_row_i8<NX>(ck, xs, row, rb, K, y, n);
    }
  }
}

// ... for M activation rows, in passes of up to 8 (each weight row unpacked once a pass). 3 rows run
// as a 4-row pass and 5 to 7 as an 8-row one, the spare rows repeating the last input into a scratch
// output: a pass of 1 (or 2) more rows costs less than another pass (a 3-row step as 2 + 1 cost more
// than a 4-row one, a 7-row one as 4 + 2 + 1 more than an 8-row one). Each row's arithmetic does not
// depend on the pass it rides in, so its bits do not either.
template <int T>
inline void i8_rows_padded(int64_t kind, const XI8* xs, int64_t left, const uint8_t* w, int64_t K, float* const* y,
                           int64_t n0, int64_t n1) {
  static thread_local std::vector<float> spare;
  if (static_cast<int64_t>(spare.size()) < n1) spare.resize(n1);
  XI8 xp[T];
  float* yp[T];
  for (int i = 0; i < T; ++i) {
    xp[i] = xs[std::min<int64_t>(i, left - 1)];
    yp[i] = i < left ? y[i] : spare.data();
  }
  i8_rows_t<T>(kind, xp, w, K, yp, n0, n1);
}

inline void i8_rows(int64_t kind, const XI8* xs, int64_t M, const uint8_t* w, int64_t K, float* const* y, int64_t n0,
                    int64_t n1) {
  for (int64_t m = 0; m < M;) {
    const int64_t left = M - m;
    if (left >= 8) { i8_rows_t<8>(kind, xs + m, w, K, y + m, n0, n1); m += 8; }
    else if (left >= 5) { i8_rows_padded<8>(kind, xs + m, left, w, K, y + m, n0, n1); m = M; }
    else if (left == 4) { i8_rows_t<4>(kind, xs + m, w, K, y + m, n0, n1); m += 4; }
    else if (left == 3) { i8_rows_padded<4>(kind, xs + m, left, w, K, y + m, n0, n1); m = M; }
    else if (left == 2) { i8_rows_t<2>(kind, xs + m, w, K, y + m, n0, n1); m += 2; }
    else { i8_rows_t<1>(kind, xs + m, w, K, y + m, n0, n1); m += 1; }
  }
}

// i8_rows over [n0, n1) in chunks of rows (~24 KB) when M takes more than one pass (past 8 rows), so
// the later passes read a chunk from cache, not memory.
inline void i8_rows_chunked(int64_t kind, const XI8* xs, int64_t M, const uint8_t* w, int64_t K, float* const* y,
                            int64_t n0, int64_t n1) {
  const int64_t ch = M <= 8 ? n1 - n0 : std::max<int64_t>(4, 24576 / block_row_bytes(kind, K));
  for (int64_t a = n0; a < n1; a += ch) i8_rows(kind, xs, M, w, K, y, a, std::min(n1, a + ch));
}

// One activation row's buffers for every family (K rounded up), owned.
struct XI8Buf {
  std::vector<int8_t> q[I8_FAMILIES];
  std::vector<float> d[I8_FAMILIES], m;
  std::vector<int32_t> c[I8_FAMILIES];
  std::vector<int16_t> bs[I8_FAMILIES];
  explicit XI8Buf(int64_t K) : m(i8_f_len(K)) {
    for (int f = 0; f < I8_FAMILIES; ++f) {
      q[f].resize(i8_q_len(K)); d[f].resize(i8_f_len(K)); c[f].resize(i8_f_len(K)); bs[f].resize(i8_q_len(K) / 16);
    }
  }
  XI8 view(int f) { return {q[f].data(), d[f].data(), c[f].data(), m.data(), bs[f].data()}; }
};

}  // namespace
