// The shared part of the CPU kernels: element types and float16 staging, the activations,
// vector helpers, the walks over blocks (tile walkers), and the numerics of the statistics
// (float32 runs added into double, shifted and centred moments, Chan's combination).
//
// Plain C++ with OpenMP and no torch header. Everything here is inline or a template in an
// anonymous namespace, so every kernel file gets its own copy and no symbol leaks. The kernel
// files (gn_nchw.cpp, gn_nhwc.cpp, bn.cpp) and the entry points (gn_entry.cpp) are separate
// translation units that compile in parallel; gn_kernels.h declares what they export.
//
// Layouts: "nchw" means the input is (N, C, S) contiguous (each group is one contiguous block of
// D*S values, D = C/G); "nhwc" means (N, S, C) contiguous (channels-last).
//
// Forward, per set (n, g) with mean mu and r = 1/sqrt(var + eps):
//   a_c = r * w_c,  z = a_c * (x - mu) + b_c,  y = f(z).
//   (centred: x * a_c + (b_c - mu * a_c) would lose all digits when |mu| >> sigma)
// Backward, with dz = dy * f'(z) and m = D*S values per set:
//   db_c  = sum_{n,s} dz,                 dw_c = sum_{n,s} dz * (x - mu) * r,
//   M1    = sum_{c,s} w_c dz / m,         M2   = sum_{c,s} w_c dz (x - mu) r / m,
//   dx    = r * (w_c dz - M1 - (x - mu) r M2) = A_c dz + B (x - mu) + K
//   with A_c = r w_c, B = -r^2 M2, K = -r M1.
//
// Statistics: float32 partial sums over short runs, added into double; the variance is centred
// (two passes over each L1-sized run, runs combined with Chan's formula, for nchw and for nhwc
// with one group, whose sets are contiguous too; shifted sums per channel combined with Chan's
// formula for other nhwc), never E[x^2] - E[x]^2.
#pragma once

#include <omp.h>

#if defined(__AVX512F__) || defined(__F16C__)
// GCC 12's AVX-512 header trips its own -Wmaybe-uninitialized (a known false positive about
// the undefined vectors it starts shuffles from)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "gn_tuning.h"

namespace {

using i64 = int64_t;
using namespace gn_tuning;

// ---- element types -------------------------------------------------------------------------

struct BF16 {
  uint16_t bits;
};

inline float load(float v) { return v; }
inline float load(BF16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// float16 as bits, converted with integer and float arithmetic that GCC vectorizes (a cast of
// _Float16 compiled to one scalar vcvtph2ps per value and left float16 2-4x slower than torch).
// The hot loops now convert whole blocks with the hardware's instructions (load_block and
// store_block below); these handle the short tails and the cold paths. They give the
// hardware's values: checked on all 65536 inputs for load, and for store on 2e8 random floats
// plus a sweep of every 7th float below 2^17, RNE, with overflow to inf; a NaN stays a NaN
// (the hardware keeps its payload, store() gives the quiet NaN 0x7e00 with its sign).
struct F16 {
  uint16_t bits;
};
inline float load(F16 v) {
  uint32_t h = v.bits;
  uint32_t mag = (h & 0x7fffu) << 13;  // exponent and mantissa in float position
  float f;
  std::memcpy(&f, &mag, 4);
  f *= 0x1p112f;  // rebias 15 -> 127; exact for normals and subnormals alike
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = ((h & 0x7c00u) == 0x7c00u) ? (0x7f800000u | mag) : u;  // inf and NaN
  u |= (h & 0x8000u) << 16;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void store(float* p, float v) { *p = v; }
inline void store(BF16* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  // round to nearest even; NaN stays a (quiet) NaN
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  p->bits = (v != v) ? static_cast<uint16_t>(0x7fc0u) : static_cast<uint16_t>(rounded);
}
inline void store(F16* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  uint32_t a = u & 0x7fffffffu;
  // normal result: rebias the exponent (-112 << 23) and round the 13 dropped bits to even
  uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  // subnormal result (|v| < 2^-14): adding 0.5 makes the FPU round |v| to a multiple of 2^-24
  float f;
  std::memcpy(&f, &a, 4);
  f += 0.5f;
  uint32_t r;
  std::memcpy(&r, &f, 4);
  uint32_t sub = r - 0x3f000000u;
  uint32_t special = a > 0x7f800000u ? 0x7e00u : 0x7c00u;  // NaN, or overflow to inf
  uint32_t h = a >= 0x47800000u ? special : (a < 0x38800000u ? sub : normal);
  p->bits = static_cast<uint16_t>(((u >> 16) & 0x8000u) | h);
}

// Whole blocks of float16: the loops above convert one value at a time, which GCC cannot turn
// into the hardware's vector conversions (vcvtph2ps/vcvtps2ph, 16 values per instruction with
// AVX-512, 8 with F16C). The hot loops of float16 therefore convert a block into a float32
// buffer in L1, work on float32, and convert the results back (with_f32 / via_f32 below).
// The hardware conversions round to nearest even, as store() does.
inline void load_block(const F16* p, i64 n, float* out) {
  i64 i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(p + i))));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
#endif
  for (; i < n; ++i) out[i] = load(p[i]);
}
inline void store_block(F16* p, i64 n, const float* in) {
  i64 i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) store(p + i, in[i]);
}

// (kStage, the values per staged block: gn_tuning.h)
// the length of a staging buffer for T (one unused float for types read in place)
template <typename T>
constexpr i64 kStageOf = std::is_same_v<T, F16> ? kStage : 1;

// Calls f(d0, nd, s0, len, count) for each block in which the nchw kernels stage a set of D
// channels of S contiguous values: channels d0 .. d0 + nd - 1 from position s0 of each, len
// values per channel, count values in all from d0 * S + s0 ((nd - 1) * S + len). float16 goes
// in spans of whole channels of at most kStage values (one conversion per span: per channel, a
// 7x7 map's few vectors stalled on store forwarding), or, where one
// channel is longer, in blocks of kStage of its values; other types in one block, the set.
template <typename T, typename F>
inline void for_each_stage_block(i64 D, i64 S, F&& f) {
  constexpr bool staged = std::is_same_v<T, F16>;
  const i64 span = !staged ? D : (S <= kStage ? kStage / S : 1);
  const i64 step = !staged || S <= kStage ? S : kStage;
  for (i64 d0 = 0; d0 < D; d0 += span) {
    const i64 nd = D - d0 < span ? D - d0 : span;
    for (i64 s0 = 0; s0 < S; s0 += step) {
      const i64 len = S - s0 < step ? S - s0 : step;
      f(d0, nd, s0, len, (nd - 1) * S + len);  // (len == S when nd > 1)
    }
  }
}

// body(q) with q pointing at p[0..n) as something load() reads: p itself, or for float16 a
// float32 copy in buf (n <= kStage). float32 and bfloat16 (a shift per value, which vectorizes)
// are read in place.
template <typename T, typename F>
inline void with_f32(const T* p, i64 n, float* buf, F&& body) {
  if constexpr (std::is_same_v<T, F16>) {
    load_block(p, n, buf);
    body(static_cast<const float*>(buf));
  } else {
    (void)n;
    (void)buf;
    body(p);
  }
}

// body(q) with q a place that store() writes n values to, which end up in p[0..n): p itself, or
// for float16 a float32 buffer converted into p afterwards (n <= kStage).
template <typename T, typename F>
inline void via_f32(T* p, i64 n, float* buf, F&& body) {
  if constexpr (std::is_same_v<T, F16>) {
    body(buf);
    store_block(p, n, buf);
  } else {
    (void)n;
    (void)buf;
    body(p);
  }
}

// ---- activations ---------------------------------------------------------------------------

// The activations, one line each: X(name, code, costly). The code is the integer the Python
// side passes (groupnorm's activation codes; they must not change). costly: f or f' takes an
// exp or a division per value, so that the nchw kernels run it in one flat loop over a short
// set (their kLines and kShortRows/kShortSet strategies) rather than channel by channel.
// Everything that maps a code to a kernel comes from this list (the enum, valid_activation,
// dispatch_act); an activation's formulas are its branches in act_fwd and act_grad below.
#define GN_ACTIVATIONS(X) \
  X(ACT_NONE, 0, false)   \
  X(ACT_SILU, 1, true)    \
  X(ACT_GELU, 2, true)    \
  X(ACT_RELU, 3, false)

#define GN_ACT_ENUM(name, code, costly) name = code,
enum { GN_ACTIVATIONS(GN_ACT_ENUM) };
#undef GN_ACT_ENUM

// whether act is the code of an activation (the callers' check before any kernel runs)
constexpr bool valid_activation(i64 act) {
#define GN_ACT_IS(name, code, costly) || act == name
  return false GN_ACTIVATIONS(GN_ACT_IS);
#undef GN_ACT_IS
}

// whether activation ACT is costly (see the list)
#define GN_ACT_COSTLY(name, code, costly) || (ACT == name && costly)
template <int ACT>
constexpr bool kCostlyAct = false GN_ACTIVATIONS(GN_ACT_COSTLY);
#undef GN_ACT_COSTLY

// ---- from run-time codes to a kernel's template arguments ----------------------------------

// An element type and an activation as values, for the generic lambdas of the dispatch below:
// typename decltype(t)::type and decltype(a)::value are compile-time constants there.
template <typename T>
struct TypeTag {
  using type = T;
};
template <int ACT>
using ActTag = std::integral_constant<int, ACT>;

// f(ActTag<ACT>{}) for the activation whose code is act. Returns 0, or 1 (f not called) for an
// unknown code. Each activation gets its own instantiation of f, so inside f the activation
// is a template argument and the kernels' loops are compiled for it alone.
template <typename F>
inline int dispatch_act(int act, F&& f) {
  switch (act) {
#define GN_ACT_CASE(name, code, costly) \
  case name:                            \
    f(ActTag<name>{});                  \
    return 0;
    GN_ACTIVATIONS(GN_ACT_CASE)
#undef GN_ACT_CASE
    default:
      return 1;
  }
}

// f(TypeTag<T>{}, ActTag<ACT>{}) for the element type of dtype (0 float32, 1 bfloat16,
// 2 float16) and the activation of code act: the kernels' entry points. Returns 0, 1 for an
// unknown activation, 2 for an unknown dtype (f not called in either case).
template <typename F>
inline int dispatch_kernel(int dtype, int act, F&& f) {
  const auto with = [&](auto t) { return dispatch_act(act, [&](auto a) { f(t, a); }); };
  switch (dtype) {
    case 0: return with(TypeTag<float>{});
    case 1: return with(TypeTag<BF16>{});
    case 2: return with(TypeTag<F16>{});
    default: return 2;
  }
}

// e^x for x <= 0 (every exp here has a non-positive argument: SiLU's sigmoid is written with
// e^-|z|, erf and GELU's density with -z^2). Range reduction x = n ln2 + r, |r| <= ln2/2, and a
// degree-5 polynomial for e^r fitted for relative error (about 1 ulp; 2-3 ulp after float32
// rounding). Written with plain arithmetic and comparisons only (no floor/fmin/fmax, which are
// library calls), so that the loops calling it vectorize. The multiply-add units are what the
// SiLU loops are bound by, so the work is kept off them where it can be:
//  * n = round(x / ln2) comes from one float addition of 1.5 * 2^23, which rounds to nearest
//    and leaves n in the low mantissa bits; no float-to-int conversion;
//  * 2^n is applied by adding n << 23 to the bits of the polynomial (an integer add) instead of
//    a multiply; valid while the result stays a normal number, hence the clamp below;
//  * below -86.5 (e^x < 2.7e-38, the normal range ends at 1.2e-38) the result is 0, so
//    silu(-100) = -0 and sigmoid(-100) = 0; torch's silu flushes below -88.7;
//  * NaN stays NaN (comparisons with NaN are false, and NaN propagates through the polynomial).
inline float exp_nonpos(float x) {
  constexpr float kLow = -86.5f;  // n >= -125, so 2^n * [0.7, 1.42] is a normal number
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23
  const float xc = x < kLow ? kLow : x;
  const float k = xc * 1.44269504088896341f + kShift;
  const float n = k - kShift;  // round(x / ln2), exact
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;  // Cody-Waite: ln2 in two parts
  float p = 8.2903122529e-3f;
  p = p * r + 4.1897930205e-2f;
  p = p * r + 1.6667635739e-1f;
  p = p * r + 4.9999150634e-1f;
  p = p * r + 9.9999970198e-1f;
  p = p * r + 1.0f;
  int32_t kb, pb;
  std::memcpy(&kb, &k, 4);
  std::memcpy(&pb, &p, 4);
  pb += static_cast<int32_t>(static_cast<uint32_t>(kb) << 23);  // n into the exponent field
  float e;
  std::memcpy(&e, &pb, 4);
  return x < kLow ? 0.0f : e;
}

// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), branch-free.
inline float erf_approx(float x) {
  float ax = std::fabs(x);
  float t = 1.0f / (1.0f + 0.3275911f * ax);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  float v = 1.0f - p * t * exp_nonpos(-ax * ax);
  return std::copysign(v, x);
}

// SiLU through e = e^-|z| in (0, 1], which never overflows:
//   sigmoid(z) = 1 / (1 + e) for z >= 0,  e / (1 + e) for z < 0.
// silu(100) = 100, silu(-100) = -0 (e is 0 there), silu(NaN) = NaN, silu(-inf) = NaN (as torch's
// x / (1 + exp(-x))), silu(inf) = inf.
template <int ACT>
inline float act_fwd(float z) {
  if constexpr (ACT == ACT_SILU) {
    const float e = exp_nonpos(-std::fabs(z));
    return (z < 0.0f ? z * e : z) / (1.0f + e);
  } else if constexpr (ACT == ACT_GELU) {
    return 0.5f * z * (1.0f + erf_approx(z * 0.70710678118654752f));
  } else if constexpr (ACT == ACT_RELU) {
    return z < 0.0f ? 0.0f : z;  // NaN passes through, as torch.relu
  } else {
    return z;
  }
}

// f'(z); for SiLU, s + z s (1 - s) with s = sigmoid(z). With e = e^-|z| and q = 1 / (1 + e),
// s (1 - s) = e q^2 for either sign of z (s is q or e q, 1 - s the other), so it needs no
// subtraction from 1 (no lost digits where s is close to 1) and no second select: one multiply,
// one select and one multiply-add after the division (s (1 + z (1 - s)) took two selects and
// two multiplies, and was both slower and less accurate; benchmarks/README.md, "Tried and rejected").
template <int ACT>
inline float act_grad(float z) {
  if constexpr (ACT == ACT_SILU) {
    const float e = exp_nonpos(-std::fabs(z));
    const float q = 1.0f / (1.0f + e);
    const float eq = e * q;
    const float s = z < 0.0f ? eq : q;
    return s + z * (eq * q);
  } else if constexpr (ACT == ACT_GELU) {
    float cdf = 0.5f * (1.0f + erf_approx(z * 0.70710678118654752f));
    return cdf + z * exp_nonpos(-0.5f * z * z) * 0.39894228040143268f;
  } else if constexpr (ACT == ACT_RELU) {
    return z <= 0.0f ? 0.0f : 1.0f;
  } else {
    return 1.0f;
  }
}

// The output pass over one row of C channel values of a channels-last tensor (batch norm's
// rows, group norm's nhwc samples): y[c] = f(((x[c] - k[c]) - m[c]) * a[c] + h[c]), in blocks
// of kStage channels staged through float32 for float16. Without shifted, k is all zeros and
// its stream is left out (the same values).
template <int ACT, typename T>
inline void affine_act_row(const T* x, T* y, i64 C, const float* m, const float* k,
                           const float* a, const float* h, bool shifted) {
  float in_buf[kStageOf<T>], out_buf[kStageOf<T>];
  for (i64 c0 = 0; c0 < C; c0 += kStage) {
    const i64 len = C - c0 < kStage ? C - c0 : kStage;
    const float *mc = m + c0, *kc = k + c0, *ac = a + c0, *hc = h + c0;
    with_f32(x + c0, len, in_buf, [&](const auto* row) {
      via_f32(y + c0, len, out_buf, [&](auto* out) {
        if (shifted) {
#pragma omp simd
          for (i64 c = 0; c < len; ++c)
            store(out + c, act_fwd<ACT>(((load(row[c]) - kc[c]) - mc[c]) * ac[c] + hc[c]));
        } else {
#pragma omp simd
          for (i64 c = 0; c < len; ++c)
            store(out + c, act_fwd<ACT>((load(row[c]) - mc[c]) * ac[c] + hc[c]));
        }
      });
    });
  }
}

#if defined(__AVX512F__)
// 16-lane twins of exp_nonpos and of SiLU's act_fwd and act_grad: the same operations in the
// same order, for the loops written with intrinsics (the short-row passes below).
inline __m512 neg_abs16(__m512 v) {  // -|v|: the sign bit set
  return _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_castps_si512(v), _mm512_set1_epi32(static_cast<int>(0x80000000u))));
}

inline __m512 exp_nonpos16(__m512 x) {
  const __m512 kLow = _mm512_set1_ps(-86.5f), kShift = _mm512_set1_ps(12582912.0f);
  const __m512 xc = _mm512_max_ps(kLow, x);  // (a NaN x is kept: max returns its second operand)
  const __m512 k = _mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), kShift);
  const __m512 n = _mm512_sub_ps(k, kShift);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc));
  __m512 p = _mm512_set1_ps(8.2903122529e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1897930205e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6667635739e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.9999150634e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.9999970198e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512 e = _mm512_castsi512_ps(_mm512_add_epi32(
      _mm512_castps_si512(p), _mm512_slli_epi32(_mm512_castps_si512(k), 23)));
  return _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(x, kLow, _CMP_LT_OQ), _mm512_setzero_ps());
}

// (GCC's vectorization of act_fwd/act_grad was slower for SiLU in the backward's flat pass,
// and about even in the forward's; for GELU the reverse held, so GELU keeps the scalar
// functions)
inline __m512 silu16(__m512 z) {
  const __m512 e = exp_nonpos16(neg_abs16(z));
  const __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_div_ps(_mm512_mask_mul_ps(z, neg, z, e), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

inline __m512 silu_grad16(__m512 z) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = exp_nonpos16(neg_abs16(z));
  const __m512 q = _mm512_div_ps(one, _mm512_add_ps(one, e));
  const __m512 eq = _mm512_mul_ps(e, q);
  const __m512 s = _mm512_mask_mov_ps(q, _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), eq);
  return _mm512_fmadd_ps(z, _mm512_mul_ps(eq, q), s);
}
#endif

// Sums run in kRun-value runs (float32 inside a run, double across runs; kRun == kStage, so a
// staged float16 run fills one buffer and the staged nchw backward adds in float32's order),
// with kLanes independent accumulators: one vector accumulator would be a chain of dependent
// adds, which left the statistics pass bound by their latency.

// acc[0] + ... + acc[W - 1] as a tree of W/2, W/4, ... lane-wise adds (unrolled: constant
// trip counts give straight vector code)
template <int W = kLanes>
inline float lanes_total(float* acc) {
#pragma GCC unroll 8
  for (int w = W / 2; w > 0; w /= 2) {
#pragma GCC unroll 32
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  return acc[0];
}

// sum of (p[i] - shift), i < n, with W lane accumulators
template <int W, typename T>
inline float shifted_sum(const T* p, i64 n, float shift) {
  float acc[W] = {};
  i64 i = 0;
  for (; i + W <= n; i += W) {
#pragma omp simd
    for (int j = 0; j < W; ++j) acc[j] += load(p[i + j]) - shift;
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += load(p[i]) - shift;
  return lanes_total<W>(acc) + tail;
}

// Per-channel loops of S values (nchw) would run S % 16 values through scalar code, which for
// SiLU or GELU costs about as much per value as a whole vector iteration. These helpers end
// with one kVec-wide block that overlaps values already done instead. kVec is the float32
// width of AVX-512; on narrower machines it is 2-4 vectors.

// body(s) for every s < n; body must write the same values when called twice for one s.
template <typename F>
inline void for_each_vec(i64 n, F&& body) {
  const i64 whole = n - n % kVec;
#pragma omp simd
  for (i64 s = 0; s < whole; ++s) body(s);
  if (whole == n) return;
  if (n >= kVec) {
#pragma omp simd
    for (i64 j = 0; j < kVec; ++j) body(n - kVec + j);
  } else {
    for (i64 s = whole; s < n; ++s) body(s);
  }
}

// Sums over s < n of the two terms body(s, t1, t2) returns, with kLanes accumulators; values
// of the overlapping last block that were already summed add zero. body may also store
// per-element results (the same values when called twice).
template <int W, typename F>
inline void sum_two_lanes(i64 n, F&& body, float& out1, float& out2) {
  float a1[W] = {}, a2[W] = {};
  i64 i = 0;
  for (; i + W <= n; i += W) {
#pragma omp simd
    for (int j = 0; j < W; ++j) {
      float t1, t2;
      body(i + j, t1, t2);
      a1[j] += t1;
      a2[j] += t2;
    }
  }
  for (; i + kVec <= n; i += kVec) {
#pragma omp simd
    for (int j = 0; j < kVec; ++j) {
      float t1, t2;
      body(i + j, t1, t2);
      a1[j] += t1;
      a2[j] += t2;
    }
  }
  if (i < n && n >= kVec) {
    const i64 base = n - kVec;
#pragma omp simd
    for (int j = 0; j < kVec; ++j) {
      float t1, t2;
      body(base + j, t1, t2);
      const bool fresh = base + j >= i;
      a1[j] += fresh ? t1 : 0.0f;
      a2[j] += fresh ? t2 : 0.0f;
    }
  } else {
    for (; i < n; ++i) {
      float t1, t2;
      body(i, t1, t2);
      a1[0] += t1;
      a2[0] += t2;
    }
  }
  out1 = lanes_total<W>(a1);
  out2 = lanes_total<W>(a2);
}

// Sums over s < n of the two terms body(s, t1, t2) returns, with kLanes accumulators (kVec
// for short runs, whose setup and final reduction would otherwise dominate); values of the
// overlapping last block that were already summed add zero. body may also store per-element
// results (the same values when called twice).
template <typename F>
inline void sum_two(i64 n, F&& body, float& out1, float& out2) {
  if (n >= 4 * kLanes) {
    sum_two_lanes<kLanes>(n, body, out1, out2);
  } else {
    sum_two_lanes<kVec>(n, body, out1, out2);
  }
}

// sum of (p[i] - shift)^2, i < n, with W lane accumulators
template <int W, typename T>
inline float shifted_sq(const T* p, i64 n, float shift) {
  float acc[W] = {};
  i64 i = 0;
  for (; i + W <= n; i += W) {
#pragma omp simd
    for (int j = 0; j < W; ++j) {
      const float d = load(p[i + j]) - shift;
      acc[j] += d * d;
    }
  }
  float tail = 0.0f;
  for (; i < n; ++i) {
    const float d = load(p[i]) - shift;
    tail += d * d;
  }
  return lanes_total<W>(acc) + tail;
}

// sums of (p[i] - shift) and of its square, i < n, in one pass (W lane accumulators each)
template <int W, typename T>
inline void shifted_sums(const T* p, i64 n, float shift, float& s1, float& s2) {
  float a1[W] = {}, a2[W] = {};
  i64 i = 0;
  for (; i + W <= n; i += W) {
#pragma omp simd
    for (int j = 0; j < W; ++j) {
      const float d = load(p[i + j]) - shift;
      a1[j] += d;
      a2[j] += d * d;
    }
  }
  float t1 = 0.0f, t2 = 0.0f;
  for (; i < n; ++i) {
    const float d = load(p[i]) - shift;
    t1 += d;
    t2 += d * d;
  }
  s1 = lanes_total<W>(a1) + t1;
  s2 = lanes_total<W>(a2) + t2;
}

// Count, mean and centred sum of squares (M2) of the n contiguous values at p, in runs of kRun
// values combined in double with Chan et al.'s formula. Each run's float32 sums are taken
// around a shift. The first run is summed twice while in L1: around its first value, which
// may be far from the rest (an outlier: x[0] = 1e4 among N(0, 1) values), for its mean, then
// around that mean (a float32 shift, so x - shift keeps its digits). Later runs are shifted
// by the previous run's mean and summed once (S1 and S2 of d = x - shift; M2 = S2 - S1^2/n).
// That loses digits only when the run's mean is far from the shift, by some D against its
// spread s; but then the two runs' means differ by D and the set's M2 grows by at least
// n D^2/2, so the error, a few float32 ulps of n (D^2 + s^2), stays a few ulps of the set's
// M2; and one pass instead of two makes the statistics much cheaper. float16 runs go through buf (kStageOf<T> values).
struct Moments {
  double count, mean, m2;
};

// A set's rstd from its M2 and value count: 1 / sqrt(M2 / count + eps) in double, rounded once
// to float32 (where every kernel's statistics end; IEEE square root and division, so a
// vectorized loop of it gives the same bits)
inline float rstd_of(double m2, double count, double eps) {
  return static_cast<float>(1.0 / std::sqrt(m2 / count + eps));
}

// (always inlined: called once per set of instance norm, whose sets are short)
template <typename T>
__attribute__((always_inline)) inline Moments run_moments(const T* p, i64 n, float* buf) {
  float shift = load(p[0]);
  double count = 0.0, mean_d = 0.0, m2 = 0.0;  // mean_d around p[0]
  const double base = static_cast<double>(shift);
  for (i64 start = 0; start < n; start += kRun) {
    const i64 end = start + kRun < n ? start + kRun : n;
    const float nr = static_cast<float>(end - start);
    float mr, q;  // the run's mean around shift and its M2
    with_f32(p + start, end - start, buf, [&](const auto* run) {
      const i64 len = end - start;
      if (start == 0) {
        // mean around p[0], then the squares around that mean (a float32 shift), one lane
        // array each: sets of one run (instance norm) are mostly setup and reduction, which
        // a pass with two arrays makes costlier. The mean is then shift + 0, unless
        // p[0] lay over 2 standard deviations away (~5 % of Gaussian data, or an outlier;
        // the first pass's mean carries the rounding of x - p[0], up to ~1e-4 standard
        // deviations with p[0] 1e4 away) or the shift's rounding to float32 is not small
        // against the spread (mean 1e4, std 1e-3: the squares would hold up to 25 % of the
        // variance): then a third pass takes S1 too.
        // (16 lanes for sets shorter than 64 lanes, which would leave the 49 values of a 7x7
        // map to the scalar tail)
        if (len < kLanes) {
          shift += shifted_sum<kVec>(run, len, shift) / nr;
          q = shifted_sq<kVec>(run, len, shift);
        } else {
          shift += shifted_sum<kLanes>(run, len, shift) / nr;
          q = shifted_sq<kLanes>(run, len, shift);
        }
        mr = 0.0f;
        const float moved = shift - static_cast<float>(base);  // (base = p[0], exactly)
        const float half_ulp = std::fabs(shift) * 0x1p-24f;  // the shift's own rounding
        if (moved * moved * nr > 4.0f * q || half_ulp * half_ulp * nr > 0x1p-24f * q) {
          float s1, s2;
          shifted_sums<kLanes>(run, len, shift, s1, s2);
          mr = s1 / nr;
          q = s2 - s1 * mr;
        }
      } else {
        float s1, s2;
        shifted_sums<kLanes>(run, len, shift, s1, s2);
        mr = s1 / nr;
        q = s2 - s1 * mr;
      }
    });
    // the run's mean around p[0]; the next run's shift
    const double run_mean = static_cast<double>(shift) - base + static_cast<double>(mr);
    shift = static_cast<float>(base + run_mean);
    const double delta = run_mean - mean_d;
    const double total = count + nr;
    mean_d += delta * nr / total;
    m2 += static_cast<double>(q) + delta * delta * count * nr / total;
    count = total;
  }
  return {count, base + mean_d, m2 < 0.0 ? 0.0 : m2};  // (rounding: never below zero)
}

inline Moments combine(const Moments& a, const Moments& b) {
  const double total = a.count + b.count;
  const double delta = b.mean - a.mean;
  return {total, a.mean + delta * b.count / total,
          a.m2 + b.m2 + delta * delta * a.count * b.count / total};
}

// ---- the shifted apply --------------------------------------------------------------------

// Whether a set's output needs the shifted apply, ((x - k) - md) * r with k the shift the
// statistics were summed around and md = mean - k in float32, rather than (x - mu) * r with
// the mean rounded to float32 (mu). The latter moves every output by up to half an ulp of mu
// times r, at most 2^-24 |mu| r: while |mu| r <= 1 (the mean within a standard deviation of
// zero) that is below the float32 rounding of a unit-sized output, and the kernels take
// k = 0, md = mu, which gives the unshifted results bit for bit and lets the channels-last
// loops skip the shift's stream. A NaN or infinite mean compares false: unshifted, as before.
inline bool shift_needed(float mu, float r) { return std::fabs(mu) * r > 1.0f; }

// ---- channels-last statistics: per-channel moments of row blocks, vectorized over channels --

// Chunk moments that stand an ill-chosen shift: a chunk's float32 sums of d = x - shift and
// d^2 give M2 = S2 - S1^2/n, which cancels when the shift lies far from the chunk's values
// (an outlier as the first row, 1e4 among N(0, 1) values, would cost y most of its digits). So each
// channel's shift is the chunk's own first row, and a block whose S1^2/n exceeds 15/16 of S2
// for some channel (more than 4 bits lost; a shift over 3.9 standard deviations from the
// mean: rare unless that row is an outlier) is summed again around its means while in cache.
constexpr float kIllShift = 15.0f / 16.0f;

// Moments of n <= kBlock channels over `rows` rows of an (rows, stride) row-major block p:
// mean_off[j] = the mean of channel j minus ref[j] (double: a far ref keeps its digits) and
// m2[j], its centred sum of squares. FULL: n == kBlock, whose sums stay in registers.
template <bool FULL, typename T>
inline void rows_moments(const T* p, i64 stride, i64 rows, i64 n, const float* ref,
                         double* mean_off, double* m2) {
  const i64 len = FULL ? kBlock : n;
  float tmp[kBlock];  // a float16 row block as float32
  float a1[kBlock], a2[kBlock], sh[kBlock], mr[kBlock];
  for (i64 j = 0; j < len; ++j) sh[j] = load(p[j]);
  const float nr = static_cast<float>(rows), inv = 1.0f / nr;
  // pass 0 around the first row; pass 1, only where some channel's shift was ill-chosen,
  // around the chunk's means (rows * kBlock values: in L1 or L2) as float32 shifts, since
  // x - (shift + mean) keeps the digits that x - shift rounded away
  for (int pass = 0; pass < 2; ++pass) {
    for (i64 j = 0; j < len; ++j) a1[j] = a2[j] = 0.0f;
    for (i64 s = 0; s < rows; ++s) {
      with_f32(p + s * stride, len, tmp, [&](const auto* row) {
#pragma omp simd
        for (i64 j = 0; j < len; ++j) {
          const float d = load(row[j]) - sh[j];
          a1[j] += d;
          a2[j] += d * d;
        }
      });
    }
    float worst = 0.0f;  // > 0 where a channel's shift was ill-chosen (vector code: no branches)
#pragma omp simd reduction(max : worst)
    for (i64 j = 0; j < len; ++j) {
      mr[j] = a1[j] * inv;
      const float excess = a1[j] * mr[j] - kIllShift * a2[j];
      worst = excess > worst ? excess : worst;
    }
    if (pass == 1 || worst <= 0.0f) break;
    for (i64 j = 0; j < len; ++j) sh[j] += mr[j];
  }
#pragma omp simd
  for (i64 j = 0; j < len; ++j) {
    const float q = a2[j] - a1[j] * mr[j];
    mean_off[j] = (static_cast<double>(sh[j]) - static_cast<double>(ref[j])) + mr[j];
    m2[j] = q < 0.0f ? 0.0f : q;  // (a NaN stays)
  }
}

// Per-channel moments of rows [r0, r1) of a channels-last block x (row stride C) for every
// channel, in register blocks of kBlock channels
template <typename T>
inline void chunk_moments(const T* x, i64 C, i64 r0, i64 r1, const float* ref, double* mean_off,
                          double* m2) {
  i64 c0 = 0;
  for (; c0 + kBlock <= C; c0 += kBlock)
    rows_moments<true>(x + r0 * C + c0, C, r1 - r0, kBlock, ref + c0, mean_off + c0, m2 + c0);
  if (c0 < C)
    rows_moments<false>(x + r0 * C + c0, C, r1 - r0, C - c0, ref + c0, mean_off + c0, m2 + c0);
}

// Chan et al.'s combination, channel by channel, of chunk k's (count, mean_off, m2) into the
// running (count, mean, m2) of every channel
inline void chan_add(i64 C, double count, double nk, const double* mean_k, const double* m2_k,
                     double* mean, double* m2) {
  const double total = count + nk;
  const double wk = nk / total, wb = count * nk / total;
#pragma omp simd
  for (i64 c = 0; c < C; ++c) {
    const double delta = mean_k[c] - mean[c];
    mean[c] += delta * wk;
    m2[c] += m2_k[c] + delta * delta * wb;
  }
}

// db and dw of the backward: per (n, c) sums s1 and s2 (N * C doubles each, N >= 1) added over
// the samples in sample order into their first sample's row, which is then written out (dw,
// db may be null). Sample by sample, so that the reads run along memory (channel by channel
// they would stride C doubles a step).
inline void add_samples_into_first(double* s1, double* s2, i64 N, i64 C, float* db, float* dw) {
  for (i64 n = 1; n < N; ++n) {
    const double *p1 = s1 + n * C, *p2 = s2 + n * C;
#pragma omp simd
    for (i64 c = 0; c < C; ++c) {
      s1[c] += p1[c];
      s2[c] += p2[c];
    }
  }
  for (i64 c = 0; c < C; ++c) {
    if (db) db[c] = static_cast<float>(s1[c]);
    if (dw) dw[c] = static_cast<float>(s2[c]);
  }
}


}  // namespace
