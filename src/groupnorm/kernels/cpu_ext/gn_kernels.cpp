// Fused group/layer/instance norm + activation for CPU: forward and backward.
//
// Plain C++ with OpenMP, no torch headers (so it compiles in seconds), called from Python through
// ctypes with raw pointers. Python checks shapes, dtypes and layouts before calling; these
// functions trust their arguments.
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
// nchw keeps dz of the current set in a per-thread buffer between the two passes (the set is
// cache-sized); nhwc recomputes it in the second pass (its sets span the whole sample).
//
// Statistics: float32 partial sums over short runs, added into double; the variance is centred
// (two passes over each L1-sized run, runs combined with Chan's formula, for nchw and for nhwc
// with one group, whose sets are contiguous too; shifted sums per channel combined with Chan's
// formula for other nhwc), never E[x^2] - E[x]^2.

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

namespace {

using i64 = int64_t;

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

// Values per staged block (8 KiB of float32 per buffer: well inside L1).
constexpr i64 kStage = 2048;
// the length of a staging buffer for T (one unused float for types read in place)
template <typename T>
constexpr i64 kStageOf = std::is_same_v<T, F16> ? kStage : 1;

// Calls f(d0, nd, s0, len, count) for each block in which the nchw kernels stage a set of D
// channels of S contiguous values: channels d0 .. d0 + nd - 1 from position s0 of each, len
// values per channel, count values in all from d0 * S + s0 ((nd - 1) * S + len). float16 goes
// in spans of whole channels of at most kStage values (one conversion per span: per channel, a
// 7x7 map's few vectors stalled on store forwarding and cost 3x float32), or, where one
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

enum { ACT_NONE = 0, ACT_SILU = 1, ACT_GELU = 2, ACT_RELU = 3 };

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
// two multiplies: 13 % slower in a loop of the backward's shape, and 1.97e-7 against 1.66e-7
// largest absolute error on -110..110).
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

// (GCC's vectorization of act_fwd/act_grad was 2-5 % slower for SiLU in the backward's flat
// pass, and about even in the forward's; for GELU the reverse held: twins of erf_approx and
// GELU were 7 % slower forward and 8 % backward, so GELU keeps the scalar functions)
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

constexpr i64 kRun = 2048;  // values summed in float32 before the sum moves to double
// Staged float16 runs (run_moments) must fit a buffer, and the staged nchw backward's blocks
// must be its runs, for its sums to add in the same order as float32's.
static_assert(kRun == kStage, "float16 staging assumes runs of kStage values");

// Sums with kLanes independent accumulators: one vector accumulator is a chain of dependent
// adds (3-4 cycles each), which made the statistics pass latency-bound; 64 lanes are 4 zmm (or
// 8 ymm) registers whose adds overlap.
constexpr int kLanes = 64;

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

// Per-channel loops of S values (nchw) ran S % 16 values through the scalar code, which for
// SiLU or GELU costs about as much as a whole vector iteration per value (S = 196, 49: a
// third of the time). These helpers end with one 16-wide block that overlaps values already
// done instead. kVec is the float32 width of AVX-512; on narrower machines it is 2-4 vectors.
constexpr i64 kVec = 16;

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

// ---- nchw: one set is one contiguous block --------------------------------------------------

// Rows of up to this many values (7x7 to 16x16 maps) take the short-row paths: the activation,
// the costly part, runs as one loop over the whole set (n, g) instead of D loops of S values,
// each with its own setup and a partly wasted last block (49 values take four 16-wide blocks).
// Measured against the per-channel loops (benchmarks/README.md, #31-#35): 22-30 % less
// backward time at 7x7/8x8, 2-9 % at 14x14/16x16 (once the next set is prefetched, below;
// without that 16x16 lost 6 %), 15 % more at 28x28 and 32x32.
constexpr i64 kShortRowMax = 256;

// The short-row paths first make a cheap pass over the set (memory-bound when the tensor is
// larger than the cache) and then a costly one over data already in L1; without help the
// memory stalls of the first no longer overlap with the arithmetic (32x2048x7x7, 12.8 MB:
// 5-17 % slower than the per-channel loops). So the costly pass goes in chunks of this many
// values, each after prefetching the same stretch of the next set's data. (Chunks of 16, one
// prefetch per vector, made the bfloat16 forward 35-50 % slower: GCC vectorizes the bfloat16
// stores poorly in a 16-trip loop; 256 made float32 at 32x2048x7x7 4 % slower than 64.)
constexpr i64 kPrefetchChunk = 64;

// every 64-byte line of p[0..n) (the next set's share of a chunk or of a channel, fetched
// ahead of the costly loop)
template <typename T>
inline void prefetch_range(const T* p, i64 n) {
  const char* c = reinterpret_cast<const char*>(p);
  const i64 bytes = n * static_cast<i64>(sizeof(T));
  for (i64 k = 0; k < bytes; k += 64) __builtin_prefetch(c + k);
}

// body(i0, n) over the n values from i0 of [0, L), chunk by chunk (kPrefetchChunk), each
// after fetching the same stretch of the next set's a and b when `more` (a, b point at the
// next set)
template <typename A, typename B, typename F>
inline void for_each_prefetch_chunk(i64 L, bool more, const A* a, const B* b, F&& body) {
  for (i64 i0 = 0; i0 < L; i0 += kPrefetchChunk) {
    const i64 n = L - i0 < kPrefetchChunk ? L - i0 : kPrefetchChunk;
    if (more) {
      prefetch_range(a + i0, n);
      prefetch_range(b + i0, n);
    }
    body(i0, n);
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
// M2. One pass instead of two made the statistics of 8x512x28x28 float32 layer norm ~40 %
// cheaper. float16 runs go through buf (kStageOf<T> values).
struct Moments {
  double count, mean, m2;
};

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
        // a pass with two arrays doubles (14x14: +25 %). The mean is then shift + 0, unless
        // p[0] lay over 2 standard deviations away (~5 % of Gaussian data, or an outlier;
        // the first pass's mean carries the rounding of x - p[0], up to ~1e-4 standard
        // deviations with p[0] 1e4 away) or the shift's rounding to float32 is not small
        // against the spread (mean 1e4, std 1e-3: the squares would hold up to 25 % of the
        // variance): then a third pass takes S1 too.
        // (16 lanes for sets shorter than 64 lanes, which left the 49 values of a 7x7 map
        // to the scalar tail: instance norm 8x2048x7x7 float32 760 -> 500 us)
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

#if defined(__AVX512F__)
// The two totals of a1's and a2's 16 lanes in one reduction: the halves of both first (one
// shuffle pair and one add for both), then within 128-bit quarters.
inline void lanes_total16x2(__m512 a1, __m512 a2, float& s1, float& s2) {
  __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(a1, a2, 0x44), _mm512_shuffle_f32x4(a1, a2, 0xEE));
  t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0xB1));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));
  s1 = _mm512_cvtss_f32(t);
  s2 = _mm_cvtss_f32(_mm512_extractf32x4_ps(t, 2));
}

// The D*S values of an nchw set with S > 16 (so a vector holds values of at most two
// channels), walked in 16-value vectors aligned to the 64-byte lines of `line` (a float32
// array of the set). A 7x7 map's 49-value channels start anywhere in a line: walked channel by
// channel, nearly every vector access spans two lines, and each channel takes four vectors
// for 3.06 vectors' worth of values. body(Step<K>, i, d, m): the vector holds flat positions
// i .. i + 15, all in channel d, except:
//   kHead:  the set starts mid-line; m marks the lanes in the set (i < 0);
//   kSplit: channel d ends inside the vector; m marks its lanes, the rest are in d + 1, or
//           past the set's end for the last channel;
//   kEnd:   no vector (i is unused); channel d ended on a vector boundary.
enum { kFull, kHead, kSplit, kEnd };
template <int K>
using Step = std::integral_constant<int, K>;

template <typename F>
inline void for_each_line_vec(const float* line, i64 D, i64 S, F&& body) {
  i64 i = -static_cast<i64>((reinterpret_cast<uintptr_t>(line) & 63) >> 2);
  if (i < 0) {
    body(Step<kHead>{}, i, 0, static_cast<__mmask16>(0xFFFFu << -i));
    i += kVec;
  }
  for (i64 d = 0, end = S; d < D; ++d, end += S) {
    for (; i + kVec <= end; i += kVec) body(Step<kFull>{}, i, d, static_cast<__mmask16>(0xFFFF));
    if (i < end) {
      body(Step<kSplit>{}, i, d, static_cast<__mmask16>((1u << (end - i)) - 1u));
      i += kVec;
    } else {
      body(Step<kEnd>{}, i, d, static_cast<__mmask16>(0));
    }
  }
}

// each lane's value of a per-channel parameter p (p[d] in the lanes of `first`, else p[d + 1])
inline __m512 lane_param(const float* p, i64 d, __mmask16 first) {
  return _mm512_mask_blend_ps(first, _mm512_set1_ps(p[d + 1]), _mm512_set1_ps(p[d]));
}

// z = (x - mu) a_d + h_d over an nchw set of S > 16 values per channel (pa, ph: D + 1 values
// each, the last unused but read), walked in x's lines; z may be y (in place of the output)
// or a buffer with x's line offset.
inline void z_lines(const float* x, float mu, const float* pa, const float* ph, i64 D, i64 S,
                    float* z) {
  const __m512 vmu = _mm512_set1_ps(mu);
  for_each_line_vec(x, D, S, [&](auto step, i64 i, i64 d, __mmask16 m) {
    constexpr int K = decltype(step)::value;
    if constexpr (K == kFull) {
      const __m512 xc = _mm512_sub_ps(_mm512_loadu_ps(x + i), vmu);
      _mm512_storeu_ps(z + i, _mm512_fmadd_ps(xc, _mm512_set1_ps(pa[d]), _mm512_set1_ps(ph[d])));
    } else if constexpr (K != kEnd) {
      // the lanes in the set: all but the head's first ones and those past the last channel
      const __mmask16 valid = K == kHead || d + 1 == D ? m : static_cast<__mmask16>(0xFFFF);
      const __m512 xc = _mm512_sub_ps(_mm512_maskz_loadu_ps(valid, x + i), vmu);
      const __m512 a = K == kHead ? _mm512_set1_ps(pa[0]) : lane_param(pa, d, m);
      const __m512 h = K == kHead ? _mm512_set1_ps(ph[0]) : lane_param(ph, d, m);
      _mm512_mask_storeu_ps(z + i, valid, _mm512_fmadd_ps(xc, a, h));
    }
  });
}

// q[j] = f(q[j]) (FWD) or dy[j] f'(q[j]) for j < n (float32)
template <int ACT, bool FWD>
inline void act_flat(float* q, const float* dy, i64 n) {
  if constexpr (ACT == ACT_SILU) {
    // (dy is null for the forward: no pointer is formed from it there)
    const auto f = [dy](__m512 z, i64 j, __mmask16 m) {
      if constexpr (FWD) {
        return silu16(z);
      } else {
        return _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dy + j), silu_grad16(z));
      }
    };
    const i64 whole = n - n % kVec;
    for (i64 j = 0; j < whole; j += kVec)
      _mm512_storeu_ps(q + j, f(_mm512_loadu_ps(q + j), j, 0xFFFF));
    if (whole < n) {
      const __mmask16 t = static_cast<__mmask16>((1u << (n - whole)) - 1u);
      _mm512_mask_storeu_ps(q + whole, t, f(_mm512_maskz_loadu_ps(t, q + whole), whole, t));
    }
  } else {
    if constexpr (FWD) {
#pragma omp simd
      for (i64 j = 0; j < n; ++j) q[j] = act_fwd<ACT>(q[j]);
    } else {
#pragma omp simd
      for (i64 j = 0; j < n; ++j) q[j] = dy[j] * act_grad<ACT>(q[j]);
    }
  }
}

// a_d = r w_d and h_d = b_d of group g's D channels into pa and ph (D + 1 floats each; the
// last, read by the walks for lanes past the set, is 0)
inline void set_lane_params(const float* w, const float* b, float r, i64 g, i64 D, float* pa,
                            float* ph) {
  for (i64 d = 0; d < D; ++d) {
    pa[d] = w ? r * w[g * D + d] : r;
    ph[d] = b ? b[g * D + d] : 0.0f;
  }
  pa[D] = ph[D] = 0.0f;
}

// The forward of one set of float32 short rows of S > 16 values: z walked in x's lines
// (z_lines) into y, then f over y in one flat loop, a chunk at a time after fetching the
// same stretch of the next set's x and y (more). Harness, SiLU, 64-byte aligned tensors:
// 4x2048x7x7 102 -> 93 us, 16x2048x7x7 413 -> 367, 4x1024x14x14 183 -> 172 (#72). Not
// inlined: inside forward_nchw, its vector code changed how GCC compiled the statistics pass
// (lane sums spilled to the stack: 14x14 +40 %).
template <int ACT>
__attribute__((noinline)) void forward_short_set_lines(const float* x, float* y, const float* w,
                                                       const float* b, float mu, float r, i64 g,
                                                       i64 D, i64 S, float* par, bool more) {
  float* pa = par;
  float* ph = par + D + 1;
  set_lane_params(w, b, r, g, D, pa, ph);
  z_lines(x, mu, pa, ph, D, S, y);
  const i64 L = D * S;
  for_each_prefetch_chunk(L, more, x + L, y + L,
                          [&](i64 i0, i64 n) { act_flat<ACT, true>(y + i0, nullptr, n); });
}
#endif

template <typename T, int ACT>
void forward_nchw(const T* x, T* y, const float* w, const float* b, float* mean_out,
                  float* rstd_out, i64 N, i64 C, i64 S, i64 G, float eps, int nthreads) {
  const i64 D = C / G;
  const i64 L = D * S;
  // short rows with an activation: z of the whole set first, then f over it in one loop (see
  // kShortRowMax); z goes straight into y for float32, else into a float32 buffer. Not for
  // float32 rows of whole 16-value blocks (4x4 to 16x16), where nothing is wasted (8x8: the
  // extra pass cost 2 %) -- except with AVX-512, where float32 rows of more than 16 values take
  // forward_short_set_lines (8x8 included: 1x1280x8x8 20.6 -> 18.6 us, 8x1280x8x8 177 -> 151).
  const bool short_rows = (ACT == ACT_SILU || ACT == ACT_GELU) && S <= kShortRowMax &&
                          (!std::is_same_v<T, float> || S % kVec != 0);
#if defined(__AVX512F__)
  const bool lines = std::is_same_v<T, float> && (ACT == ACT_SILU || ACT == ACT_GELU) &&
                     S > kVec && S <= kShortRowMax;
#else
  const bool lines = false;
#endif
  // The output pass fetches the next set's x ahead (the statistics pass of that set then
  // reads it from cache) where the tensor comes from memory (4 MiB or more). With SiLU:
  // 8x512x28x28 -21 %, 32x1024x14x14 -24 %, 8x256x56x56 -11 %; within +-4 % below. Without
  // an activation too (session 4, harness): GN 32x1024x14x14 float32 2180 -> 1740 us,
  // bfloat16 1270 -> 900, 32x2048x7x7 -25 %, 8x512x28x28 -12 %; layer norm and instance norm
  // within +-5 % but for float16 layer norm 32x1024x14x14 1400 -> 1020.
  const bool prefetch = N * C * S * static_cast<i64>(sizeof(T)) >= (i64{4} << 20);
#pragma omp parallel num_threads(nthreads)
  {
  std::vector<float> z_buf(short_rows && !std::is_same_v<T, float> ? L : 0);
  std::vector<float> par_buf(lines ? 2 * (D + 1) : 0);
  float in_buf[kStageOf<T>], out_buf[kStageOf<T>];
#pragma omp for schedule(static)
  for (i64 item = 0; item < N * G; ++item) {
    const i64 g = item % G;
    const T* px = x + item * L;
    T* py = y + item * L;
    const Moments mom = run_moments(px, L, in_buf);
    const float mu = static_cast<float>(mom.mean);
    const float r = static_cast<float>(1.0 / std::sqrt(mom.m2 / static_cast<double>(L) + eps));
    if (mean_out) mean_out[item] = mu;  // null when the caller needs no statistics
    if (rstd_out) rstd_out[item] = r;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float> && (ACT == ACT_SILU || ACT == ACT_GELU)) {
      if (lines) {
        forward_short_set_lines<ACT>(px, py, w, b, mu, r, g, D, S, par_buf.data(),
                                     item + 1 < N * G);
        continue;
      }
    }
#endif
    if (short_rows) {
      float* zb;
      if constexpr (std::is_same_v<T, float>) {
        zb = py;
      } else {
        zb = z_buf.data();
      }
      // (S <= kShortRowMax: whole channels in each block)
      for_each_stage_block<T>(D, S, [&](i64 d0, i64 nd, i64, i64, i64 count) {
        with_f32(px + d0 * S, count, in_buf, [&](const auto* qx) {
          for (i64 d = d0; d < d0 + nd; ++d) {
            const i64 c = g * D + d;
            const float a = w ? r * w[c] : r;
            const float h = b ? b[c] : 0.0f;
            float* qz = zb + d * S;
            const auto* rx = qx + (d - d0) * S;
            for_each_vec(S, [&](i64 s) { qz[s] = (load(rx[s]) - mu) * a + h; });
          }
        });
      });
      // the next set's x and y are fetched while this one computes (see kPrefetchChunk)
      const bool more = item + 1 < N * G;
      for_each_prefetch_chunk(L, more, px + L, py + L, [&](i64 i0, i64 n) {
        const i64 whole = n - n % kVec;
        const float* qz = zb + i0;
        via_f32(py + i0, n, out_buf, [&](auto* qy) {
#pragma omp simd
          for (i64 j = 0; j < whole; ++j) store(qy + j, act_fwd<ACT>(qz[j]));
          for (i64 j = whole; j < n; ++j) store(qy + j, act_fwd<ACT>(qz[j]));
        });
      });
      continue;
    }
    const bool more = prefetch && item + 1 < N * G;
    for_each_stage_block<T>(D, S, [&](i64 d0, i64 nd, i64 s0, i64 len, i64 count) {
      with_f32(px + d0 * S + s0, count, in_buf, [&](const auto* qx) {
        via_f32(py + d0 * S + s0, count, out_buf, [&](auto* qy) {
          for (i64 d = 0; d < nd; ++d) {
            const i64 c = g * D + d0 + d;
            const float a = w ? r * w[c] : r;
            const float h = b ? b[c] : 0.0f;
            if (more && s0 == 0) prefetch_range(px + (d0 + d) * S + L, S);
            const auto* rx = qx + d * S;
            auto* ry = qy + d * S;
            for_each_vec(len, [&](i64 s) { store(ry + s, act_fwd<ACT>((load(rx[s]) - mu) * a + h)); });
          }
        });
      });
    });
  }
  }
}

// Sums over s < n of u[s] and u[s] * v[s] (float32 arrays, n short): for the per-channel sums
// of the short-row backward below (with AVX-512, the float32 rows it still takes are those of
// up to 16 values and of 32, 48 and 64). With AVX-512 the sums stay in two registers and the
// last partial block is a masked load, so a channel costs a few vector adds and two horizontal
// reductions; the generic code keeps its lanes in memory (approaches 18, 25, 27).
#if defined(__AVX512F__)
// the 16 lanes' total: halves, then quarters, pairs and neighbours added
inline float lanes_total16(__m512 v) {
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4E));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));
  return _mm512_cvtss_f32(v);
}
#endif

inline void short_sums(const float* u, const float* v, i64 n, float& s1, float& s2) {
#if defined(__AVX512F__)
  __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
  i64 i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 du = _mm512_loadu_ps(u + i);
    a1 = _mm512_add_ps(a1, du);
    a2 = _mm512_fmadd_ps(du, _mm512_loadu_ps(v + i), a2);
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 du = _mm512_maskz_loadu_ps(m, u + i);
    a1 = _mm512_add_ps(a1, du);
    a2 = _mm512_fmadd_ps(du, _mm512_maskz_loadu_ps(m, v + i), a2);
  }
  s1 = lanes_total16(a1);
  s2 = lanes_total16(a2);
#else
  sum_two(
      n,
      [&](i64 s, float& t1, float& t2) {
        t1 = u[s];
        t2 = u[s] * v[s];
      },
      s1, s2);
#endif
}

#if defined(__AVX512F__)
// backward_short_set (below) for float32 rows of S > 16 values (see backward_nchw for which),
// its four passes with the three per-channel ones walked in x's lines (for_each_line_vec):
//   1. z (z_lines) into zb; 2. dz = dy f'(z) over zb, flat, as before;
//   3. per channel, sum dz and sum dz (x - mu), lane sums reduced where a channel ends;
//   4. dx = A_d dz + B (x - mu) + K.
// x - mu is recomputed from x (in cache) instead of kept in a second buffer. par holds
// 2 (D + 1) floats; zb has x's offset within a line. Not inlined, as forward_short_set_lines.
// Harness, float32 SiLU, 64-byte aligned tensors: 4x2048x7x7 187 -> 150 us, 16x2048x7x7
// 850 -> 700, 4x1024x14x14 336 -> 295, 2x1280x16x16 268 -> 247 (benchmarks/README.md, #72).
template <int ACT>
__attribute__((noinline)) void backward_short_set_lines(const float* dy, const float* x,
                                                        const float* w, const float* b, float mu,
                                                        float r, i64 g, i64 D, i64 S, float* zb,
                                                        float* par, double* part_db,
                                                        double* part_dw, float* dx, bool more) {
  float* pa = par;
  float* ph = par + D + 1;
  set_lane_params(w, b, r, g, D, pa, ph);
  const __m512 vmu = _mm512_set1_ps(mu);
  const i64 L = D * S;
  double m1 = 0.0, m2 = 0.0;
  __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
  // Lane j sums the channel's positions p with p + phase = j (mod 16), phase being x's offset
  // in its line, in order: each lane's sum does not depend on the phase, only which lane holds
  // it, and lanes_total16x2's butterfly (lane k with k + 8, then k + 4, ...) gives the same
  // total for any rotation of the lanes. So the gradients do not depend on where in a line x
  // starts (tested: a view at an offset and a copy agree bit for bit).
  z_lines(x, mu, pa, ph, D, S, zb);
  for_each_prefetch_chunk(L, more, x + L, dy + L,
                          [&](i64 i0, i64 n) { act_flat<ACT, false>(zb + i0, dy + i0, n); });
  for_each_line_vec(x, D, S, [&](auto step, i64 i, i64 d, __mmask16 m) {
    constexpr int K = decltype(step)::value;
    if constexpr (K == kFull) {
      const __m512 dz = _mm512_loadu_ps(zb + i);
      a1 = _mm512_add_ps(a1, dz);
      a2 = _mm512_fmadd_ps(dz, _mm512_sub_ps(_mm512_loadu_ps(x + i), vmu), a2);
    } else if constexpr (K == kHead) {
      const __m512 dz = _mm512_maskz_loadu_ps(m, zb + i);
      a1 = dz;
      a2 = _mm512_maskz_mul_ps(m, dz, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vmu));
    } else {
      __m512 dz = _mm512_setzero_ps(), xc = dz;
      if constexpr (K == kSplit) {
        const __mmask16 valid = d + 1 < D ? static_cast<__mmask16>(0xFFFF) : m;
        dz = _mm512_maskz_loadu_ps(valid, zb + i);
        xc = _mm512_sub_ps(_mm512_maskz_loadu_ps(valid, x + i), vmu);
        a1 = _mm512_mask_add_ps(a1, m, a1, dz);
        a2 = _mm512_mask3_fmadd_ps(dz, xc, a2, m);
      }
      float s1, s2;
      lanes_total16x2(a1, a2, s1, s2);
      const float wc = w ? w[g * D + d] : 1.0f;
      part_db[d] = s1;
      part_dw[d] = static_cast<double>(s2) * r;
      m1 += wc * static_cast<double>(s1);
      m2 += wc * static_cast<double>(s2) * r;
      a1 = _mm512_maskz_mov_ps(static_cast<__mmask16>(~m), dz);
      a2 = _mm512_maskz_mul_ps(static_cast<__mmask16>(~m), dz, xc);
    }
  });
  if (!dx) return;
  m1 /= static_cast<double>(L);
  m2 /= static_cast<double>(L);
  const __m512 B = _mm512_set1_ps(static_cast<float>(-static_cast<double>(r) * r * m2));
  const __m512 K_ = _mm512_set1_ps(static_cast<float>(-static_cast<double>(r) * m1));
  // (dx's A_d = r w_d is z's a_d: pa as set above)
  for_each_line_vec(x, D, S, [&](auto step, i64 i, i64 d, __mmask16 m) {
    constexpr int K = decltype(step)::value;
    if constexpr (K == kFull) {
      const __m512 xc = _mm512_sub_ps(_mm512_loadu_ps(x + i), vmu);
      _mm512_storeu_ps(dx + i, _mm512_fmadd_ps(_mm512_set1_ps(pa[d]), _mm512_loadu_ps(zb + i),
                                               _mm512_fmadd_ps(B, xc, K_)));
    } else if constexpr (K != kEnd) {
      const __mmask16 valid = K == kHead || d + 1 == D ? m : static_cast<__mmask16>(0xFFFF);
      const __m512 xc = _mm512_sub_ps(_mm512_maskz_loadu_ps(valid, x + i), vmu);
      const __m512 a = K == kHead ? _mm512_set1_ps(pa[0]) : lane_param(pa, d, m);
      _mm512_mask_storeu_ps(
          dx + i, valid,
          _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(valid, zb + i), _mm512_fmadd_ps(B, xc, K_)));
    }
  });
}
#endif

// Short rows (S <= kShortRowMax) with SiLU or GELU, whose derivative is the costly part of the
// backward. One set (n, g) goes through four passes over two float32 buffers of its D*S values
// (more: a next set follows, whose x and dy pass 2 prefetches):
//   1. per channel: xc = x - mu, z = a_c xc + h_c (cheap);
//   2. the whole set at once: dz = dy f'(z), one long vector loop;
//   3. per channel: sum dz and sum dz xc (short_sums);
//   4. per channel: dx = A_c dz + B xc + K.
// Same formulas as the general path; the sums are in a different order.

template <typename T, int ACT>
void backward_short_set(const T* dy, const T* x, const float* w, const float* b, float mu, float r,
                        i64 g, i64 D, i64 S, float* zb, float* xb, float* stage, double* part_db,
                        double* part_dw, T* dx, bool more) {
  // float16 x and dx go through stage in spans of whole channels (S <= kShortRowMax), dy in
  // chunks (see with_f32)
  for_each_stage_block<T>(D, S, [&](i64 d0, i64 nd, i64, i64, i64 count) {
    with_f32(x + d0 * S, count, stage, [&](const auto* qx0) {
      for (i64 d = d0; d < d0 + nd; ++d) {
        const i64 c = g * D + d;
        const float a = w ? r * w[c] : r;
        const float h = b ? b[c] : 0.0f;
        const auto* qx = qx0 + (d - d0) * S;
        float* qz = zb + d * S;
        float* qc = xb + d * S;
        for_each_vec(S, [&](i64 s) {
          const float xc = load(qx[s]) - mu;
          qc[s] = xc;
          qz[s] = xc * a + h;
        });
      }
    });
  });
  const i64 L = D * S;
  for_each_prefetch_chunk(L, more, x + L, dy + L, [&](i64 i0, i64 n) {
    float* qz = zb + i0;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
      act_flat<ACT, false>(qz, dy + i0, n);
      return;
    }
#endif
    const i64 whole = n - n % kVec;
    with_f32(dy + i0, n, stage, [&](const auto* qdy) {
#pragma omp simd
      for (i64 j = 0; j < whole; ++j) qz[j] = load(qdy[j]) * act_grad<ACT>(qz[j]);
      for (i64 j = whole; j < n; ++j) qz[j] = load(qdy[j]) * act_grad<ACT>(qz[j]);
    });
  });
  double m1 = 0.0, m2 = 0.0;
  for (i64 d = 0; d < D; ++d) {
    const i64 c = g * D + d;
    const float wc = w ? w[c] : 1.0f;
    float s1, s2;
    short_sums(zb + d * S, xb + d * S, S, s1, s2);
    part_db[d] = s1;
    part_dw[d] = static_cast<double>(s2) * r;
    m1 += wc * static_cast<double>(s1);
    m2 += wc * static_cast<double>(s2) * r;
  }
  if (!dx) return;
  m1 /= static_cast<double>(L);
  m2 /= static_cast<double>(L);
  const float B = static_cast<float>(-static_cast<double>(r) * r * m2);
  const float K = static_cast<float>(-static_cast<double>(r) * m1);
  for_each_stage_block<T>(D, S, [&](i64 d0, i64 nd, i64, i64, i64 count) {
    via_f32(dx + d0 * S, count, stage, [&](auto* qdx0) {
      for (i64 d = d0; d < d0 + nd; ++d) {
        const float a = r * (w ? w[g * D + d] : 1.0f);
        const float* qz = zb + d * S;
        const float* qc = xb + d * S;
        auto* qdx = qdx0 + (d - d0) * S;
        for_each_vec(S, [&](i64 s) { store(qdx + s, a * qz[s] + B * qc[s] + K); });
      }
    });
  });
}

#if defined(__AVX512F__)
// The first pass of the general nchw backward for float32 SiLU over one run of n values of a
// channel: dz = dy f'(z) with z = (x - mu) a + h (stored), and the sums of dz and dz (x - mu),
// in 64 lanes as sum_two does for long runs (its lane groups are added in another order, so
// the bits differ), with silu_grad16. Harness, 1T, against sum_two with act_grad:
// 2x512x28x28 305 -> 292 us, 1x640x32x32 ~250 -> 240, 2x320x64x64 1340 -> 1290 (#74).
inline void silu_dz_sums(const float* x, const float* dy, float* dz, i64 n, float mu, float a,
                         float h, float& s1, float& s2) {
  const __m512 vmu = _mm512_set1_ps(mu), va = _mm512_set1_ps(a), vh = _mm512_set1_ps(h);
  __m512 a1[4], a2[4];
  for (int k = 0; k < 4; ++k) a1[k] = a2[k] = _mm512_setzero_ps();
  const auto step = [&](i64 i, int k, __mmask16 m) {
    const __m512 xc = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vmu);
    const __m512 d = _mm512_maskz_mul_ps(m, _mm512_maskz_loadu_ps(m, dy + i),
                                         silu_grad16(_mm512_fmadd_ps(xc, va, vh)));
    _mm512_mask_storeu_ps(dz + i, m, d);
    a1[k] = _mm512_add_ps(a1[k], d);
    a2[k] = _mm512_fmadd_ps(d, xc, a2[k]);
  };
  i64 i = 0;
  for (; i + 4 * kVec <= n; i += 4 * kVec)
    for (int k = 0; k < 4; ++k) step(i + k * kVec, k, 0xFFFF);
  for (; i + kVec <= n; i += kVec) step(i, 0, 0xFFFF);
  if (i < n) step(i, 0, static_cast<__mmask16>((1u << (n - i)) - 1u));
  lanes_total16x2(_mm512_add_ps(_mm512_add_ps(a1[0], a1[1]), _mm512_add_ps(a1[2], a1[3])),
                  _mm512_add_ps(_mm512_add_ps(a2[0], a2[1]), _mm512_add_ps(a2[2], a2[3])), s1, s2);
}
#endif

// db and dw of the backward: per (n, c) sums s1 and s2 (N * C doubles each, N >= 1) added over
// the samples in sample order into their first sample's row, which is then written out (dw,
// db may be null). Sample by sample, so that the reads run along memory (channel by channel
// they stride C doubles a step: ~15 % of the bfloat16 32x2048x7x7 channels-last backward,
// with the divisions that #76 also took out).
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

template <typename T, int ACT>
void backward_nchw(const T* dy, const T* x, const float* w, const float* b, const float* mean,
                   const float* rstd, T* dx, float* dw, float* db, i64 N, i64 C, i64 S, i64 G,
                   int nthreads) {
  const i64 D = C / G;
  const i64 L = D * S;
  // per (n, c): sum dz and sum dz * (x - mu) * r (one sample's worth at least: see
  // add_samples_into_first)
  std::vector<double> part_db((N > 0 ? N : 1) * C), part_dw((N > 0 ? N : 1) * C);
  // The first pass (with an activation) fetches the next set's x and dy ahead, channel by
  // channel, only where that was measured to pay: tensors of 4 MiB or more (they come from
  // memory, not cache) with sets of at most 32 KiB (16x1024x14x14: -13-19 %). Smaller tensors
  // lost 2-4 %; sets of 40-100 KiB (16x16 to 56x56) gained in one run and lost up to 17 % in
  // others.
  const i64 bytes = static_cast<i64>(sizeof(T));
  const bool prefetch =
      ACT != ACT_NONE && N * C * S * bytes >= (i64{4} << 20) && L * bytes <= (i64{32} << 10);
#pragma omp parallel num_threads(nthreads)
  {
    // dz of the current set, kept for the second pass (the set is cache-sized), so f'(z) is
    // computed once per element
    const bool short_rows = (ACT == ACT_SILU || ACT == ACT_GELU) && S <= kShortRowMax;
    // float32 short rows walked in lines where that measured faster: rows of S > 16 values but
    // 32, 48 and 64, whose channels start on a line anyway when the set does (8x8: +8 % with
    // the walks; 16x16: -8 %)
#if defined(__AVX512F__)
    const bool lines =
        std::is_same_v<T, float> && short_rows && S > kVec && (S % kVec != 0 || S > 64);
#else
    const bool lines = false;
#endif
    std::vector<float> dz_buf(ACT == ACT_NONE || lines ? 0 : L);
    std::vector<float> xc_buf(short_rows && !lines ? L : 0);
    std::vector<float> line_buf(lines ? L + 32 : 0), par_buf(lines ? 2 * (D + 1) : 0);
    float stage_buf[kStageOf<T>], x_buf[kStageOf<T>], dy_buf[kStageOf<T>];  // float16 staging
#pragma omp for schedule(static)
    for (i64 item = 0; item < N * G; ++item) {
      const i64 n = item / G, g = item % G;
      const float mu = mean[item], r = rstd[item];
      const T* px = x + item * L;
      const T* pdy = dy + item * L;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float> && (ACT == ACT_SILU || ACT == ACT_GELU)) {
        if (lines) {
          // zb: in line_buf at x's offset within a 64-byte line
          const uintptr_t line0 =
              (reinterpret_cast<uintptr_t>(line_buf.data()) + 63) & ~uintptr_t{63};
          float* zb = reinterpret_cast<float*>(line0 + (reinterpret_cast<uintptr_t>(px) & 63));
          backward_short_set_lines<ACT>(pdy, px, w, b, mu, r, g, D, S, zb, par_buf.data(),
                                        part_db.data() + n * C + g * D,
                                        part_dw.data() + n * C + g * D,
                                        dx ? dx + item * L : nullptr, item + 1 < N * G);
          continue;
        }
      }
#endif
      if (short_rows) {
        backward_short_set<T, ACT>(pdy, px, w, b, mu, r, g, D, S, dz_buf.data(), xc_buf.data(), stage_buf,
                                   part_db.data() + n * C + g * D, part_dw.data() + n * C + g * D,
                                   dx ? dx + item * L : nullptr, item + 1 < N * G);
        continue;
      }
      // float16 is staged as in forward_nchw (for_each_stage_block)
      const bool more = prefetch && item + 1 < N * G;
      for_each_stage_block<T>(D, S, [&](i64 d0, i64 nd, i64 s0, i64 len, i64 count) {
        with_f32(px + d0 * S + s0, count, x_buf, [&](const auto* qx0) {
          with_f32(pdy + d0 * S + s0, count, dy_buf, [&](const auto* qdy0) {
            for (i64 d = 0; d < nd; ++d) {
              const i64 c = g * D + d0 + d;
              const float a = r * (w ? w[c] : 1.0f);
              const float h = b ? b[c] : 0.0f;
              const auto* qx = qx0 + d * S;
              const auto* qdy = qdy0 + d * S;
              float* qdz = ACT == ACT_NONE ? nullptr : dz_buf.data() + (d0 + d) * S + s0;
              if (more && s0 == 0) {
                prefetch_range(px + (d0 + d) * S + L, S);
                prefetch_range(pdy + (d0 + d) * S + L, S);
              }
              double sdz = 0.0, sdzx = 0.0;
              for (i64 start = 0; start < len; start += kRun) {
                const i64 end = start + kRun < len ? start + kRun : len;
                float s1, s2;
#if defined(__AVX512F__)
                if constexpr (std::is_same_v<T, float> && ACT == ACT_SILU) {
                  silu_dz_sums(qx + start, qdy + start, qdz + start, end - start, mu, a, h, s1, s2);
                  sdz += s1;
                  sdzx += s2;
                  continue;
                }
#endif
                sum_two(
                    end - start,
                    [&](i64 i, float& t1, float& t2) {
                      const i64 s = start + i;
                      const float xv = load(qx[s]);
                      const float dz = load(qdy[s]) * act_grad<ACT>((xv - mu) * a + h);
                      if constexpr (ACT != ACT_NONE) qdz[s] = dz;
                      t1 = dz;
                      t2 = dz * (xv - mu);
                    },
                    s1, s2);
                sdz += s1;
                sdzx += s2;
              }
              // per channel sum dz and sum dz (x - mu), over the blocks of a long row
              part_db[n * C + c] = (s0 == 0 ? 0.0 : part_db[n * C + c]) + sdz;
              part_dw[n * C + c] = (s0 == 0 ? 0.0 : part_dw[n * C + c]) + sdzx;
            }
          });
        });
      });
      double m1 = 0.0, m2 = 0.0;
      for (i64 d = 0; d < D; ++d) {
        const i64 c = g * D + d;
        const float wc = w ? w[c] : 1.0f;
        m1 += wc * part_db[n * C + c];
        m2 += wc * part_dw[n * C + c] * r;  // (this order: the same bits as before staging)
        part_dw[n * C + c] *= r;
      }
      if (!dx) continue;
      m1 /= static_cast<double>(L);
      m2 /= static_cast<double>(L);
      const float B = static_cast<float>(-static_cast<double>(r) * r * m2);
      const float K = static_cast<float>(-static_cast<double>(r) * m1);
      T* pdx = dx + item * L;
      for_each_stage_block<T>(D, S, [&](i64 d0, i64 nd, i64 s0, i64 len, i64 count) {
        with_f32(px + d0 * S + s0, count, x_buf, [&](const auto* qx0) {
          via_f32(pdx + d0 * S + s0, count, stage_buf, [&](auto* qdx0) {
            if constexpr (ACT == ACT_NONE) {
              with_f32(pdy + d0 * S + s0, count, dy_buf, [&](const auto* qdy0) {
                for (i64 d = 0; d < nd; ++d) {
                  const float a = r * (w ? w[g * D + d0 + d] : 1.0f);
                  const auto* qx = qx0 + d * S;
                  const auto* qdy = qdy0 + d * S;
                  auto* qdx = qdx0 + d * S;
                  for_each_vec(len, [&](i64 s) {
                    store(qdx + s, a * load(qdy[s]) + B * (load(qx[s]) - mu) + K);
                  });
                }
              });
            } else {
              for (i64 d = 0; d < nd; ++d) {
                const float a = r * (w ? w[g * D + d0 + d] : 1.0f);
                const auto* qx = qx0 + d * S;
                const float* qdz = dz_buf.data() + (d0 + d) * S + s0;
                auto* qdx = qdx0 + d * S;
                for_each_vec(len, [&](i64 s) {
                  store(qdx + s, a * qdz[s] + B * (load(qx[s]) - mu) + K);
                });
              }
            }
          });
        });
      });
    }
  }
  add_samples_into_first(part_db.data(), part_dw.data(), N, C, db, dw);
}

// ---- nhwc: sets are strided; work on (n, chunk of rows) items, vectorize over channels ------

constexpr int kBlock = 64;  // channels whose sums are kept in registers (4 zmm each)

// Chunk moments that stand an ill-chosen shift: a chunk's float32 sums of d = x - shift and
// d^2 give M2 = S2 - S1^2/n, which cancels when the shift lies far from the chunk's values
// (an outlier as the first row, 1e4 among N(0, 1) values: float32 error ~1e-2 in y). So each
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
// values (float32 dz) up to which the nhwc backward keeps dz between its passes (8 MiB: at
// 16 MiB and more, 8x256x56x56 float32 was 25 % slower than computing f'(z) twice)
constexpr i64 kKeepDzMax = i64{1} << 21;

// Rows per chunk of the channels-last kernels: about 2^16 values a chunk, 16 to 256 rows (short
// enough for float32 partial sums, enough chunks for the threads). A function of the shape
// alone: the chunks' float32 sums, and so the results, must not depend on the thread count
// (they did when the count of chunks followed it: 2x128x14x14, 2 chunks a sample on one
// thread and 4 on two; test_determinism's few-samples-channels-last). The S rows are then
// shared evenly among the fewest chunks of at most that many rows: with 51 rows a chunk,
// 1x1280x8x8 had chunks of 51 and 13 rows, and two threads sped it up by only 8-16 %.
inline i64 rows_per_chunk(i64 C, i64 S) {
  i64 rows = (i64{1} << 16) / (C > 0 ? C : 1);
  if (rows > 256) rows = 256;
  if (rows < 16) rows = 16;
  const i64 chunks = S > rows ? (S + rows - 1) / rows : 1;
  return S > rows ? (S + chunks - 1) / chunks : rows;
}

template <typename T, int ACT>
void forward_nhwc(const T* x, T* y, const float* w, const float* b, float* mean_out,
                  float* rstd_out, i64 N, i64 C, i64 S, i64 G, float eps, int nthreads) {
  const i64 D = C / G;
  const i64 rows = rows_per_chunk(C, S);
  const i64 chunks = (S + rows - 1) / rows;
  // per (n, c): z = (x - m_c) a_c + h_c, with m_c the mean of c's group; per (n, g): mean
  std::vector<float> coef_a(N * C), coef_m(N * C), group_mean(N * G);
  std::vector<float> zeros(b ? 0 : C, 0.0f);
  const float* h = b ? b : zeros.data();
  // One group: each sample is one contiguous set, summed as a flat array (as nchw does)
  // instead of per channel. Each sample is cut into pieces of kPiece values (whole runs)
  // whose moments are then combined in order, so that threads share a sample and the result
  // does not depend on their number. (float16 only from 2^22 values: below, staging the runs
  // costs more than the per-channel sums with their row blocks converted in registers, 24
  // against 14 us at 1x1280x16x16, 5-12 % at 8x512x28x28 and 2x320x64x64; above, where x
  // comes from memory, the flat read wins: 32x1024x14x14 1770 -> 1200 us, 32x512x28x28
  // 3213 -> 2431.)
  const bool flat = G == 1 && (!std::is_same_v<T, F16> || N * C * S >= (i64{1} << 22));
  constexpr i64 kPiece = i64{1} << 16;
  static_assert(kPiece % kRun == 0, "pieces are whole runs");
  const i64 L = C * S;
  const i64 pieces = (L + kPiece - 1) / kPiece;
  const i64 stat_items = flat ? pieces : chunks;  // statistics items per sample
  std::vector<Moments> moments(flat ? N * pieces : 0);
  // per (n, chunk, c): the chunk's mean around pivots[n, c] = x[n, 0, c], and its M2
  std::vector<double> part_mean(flat ? 0 : N * chunks * C), part_m2(flat ? 0 : N * chunks * C);
  std::vector<float> pivots(flat ? 0 : N * C);
  for (i64 n = 0; n < (flat ? 0 : N); ++n) {
#pragma omp simd
    for (i64 c = 0; c < C; ++c) pivots[n * C + c] = load(x[n * S * C + c]);
  }

  auto stats_item = [&](i64 item) {  // item = n * stat_items + (piece or chunk)
    const i64 n = item / stat_items, k = item % stat_items;
    if (flat) {
      const i64 start = k * kPiece;
      const i64 len = L - start < kPiece ? L - start : kPiece;
      float buf[kStageOf<T>];
      moments[item] = run_moments(x + n * L + start, len, buf);
      return;
    }
    const i64 end = (k + 1) * rows < S ? (k + 1) * rows : S;
    chunk_moments(x + n * S * C, C, k * rows, end, pivots.data() + n * C,
                  part_mean.data() + item * C, part_m2.data() + item * C);
  };

  auto finish_sample = [&](i64 n) {  // the sample's statistics and coefficients
    if (flat) {
      Moments m = moments[n * pieces];
      for (i64 k = 1; k < pieces; ++k) m = combine(m, moments[n * pieces + k]);
      const float muf = static_cast<float>(m.mean);
      const float r = static_cast<float>(1.0 / std::sqrt(m.m2 / static_cast<double>(L) + eps));
      if (mean_out) mean_out[n] = muf;
      if (rstd_out) rstd_out[n] = r;
      group_mean[n] = muf;
      float* ca = coef_a.data() + n * C;
      float* cm = coef_m.data() + n * C;
#pragma omp simd
      for (i64 c = 0; c < C; ++c) {
        ca[c] = w ? r * w[c] : r;
        cm[c] = muf;
      }
      return;
    }
    // per channel: mean and centred sum of squares from the chunks' (loops over channels, which
    // vectorize; a loop over groups of chained double adds took 9 us of 40 at 2x2048x7x7)
    std::vector<double> t1(C, 0.0), t2(C, 0.0);
    for (i64 k = 0; k < chunks; ++k) {
      const double nk = static_cast<double>(((k + 1) * rows < S ? (k + 1) * rows : S) - k * rows);
      chan_add(C, static_cast<double>(k * rows), nk, part_mean.data() + (n * chunks + k) * C,
               part_m2.data() + (n * chunks + k) * C, t1.data(), t2.data());
    }
    const float* ref = pivots.data() + n * C;
#pragma omp simd
    for (i64 c = 0; c < C; ++c) t1[c] += static_cast<double>(ref[c]);  // the channel's mean
    for (i64 g = 0; g < G; ++g) {
      // Chan et al.: combine per-channel (mean, M2) into the group's
      // (means around the group's first: far from zero, mean_c^2 would drown their spread)
      const double first = t1[g * D];
      double sum_mean = 0.0, sum_m2 = 0.0, sum_mean_sq = 0.0;
#pragma omp simd reduction(+ : sum_mean, sum_m2, sum_mean_sq)
      for (i64 c = g * D; c < (g + 1) * D; ++c) {
        const double e = t1[c] - first;
        sum_mean += e;
        sum_mean_sq += e * e;
        sum_m2 += t2[c];
      }
      const double mu = first + sum_mean / static_cast<double>(D);
      // sum_c (mean_c - mu)^2
      double between = sum_mean_sq - sum_mean * (sum_mean / static_cast<double>(D));
      if (between < 0.0) between = 0.0;
      const double var = (sum_m2 + static_cast<double>(S) * between) / static_cast<double>(D * S);
      const float r = static_cast<float>(1.0 / std::sqrt(var + eps));
      const float muf = static_cast<float>(mu);
      if (mean_out) mean_out[n * G + g] = muf;
      if (rstd_out) rstd_out[n * G + g] = r;
      group_mean[n * G + g] = muf;
      float* ca = coef_a.data() + n * C + g * D;
      float* cm = coef_m.data() + n * C + g * D;
#pragma omp simd
      for (i64 d = 0; d < D; ++d) {
        ca[d] = w ? r * w[g * D + d] : r;
        cm[d] = muf;
      }
    }
  };

  // With one group (layer norm) the mean is one number for the whole row: two coefficient
  // streams instead of three (2x2048x7x7 35.1 -> 30.6 us, 2x1280x16x16 114.9 -> 99.8, harness).
  // Not for groups: with 16 channels a group (512 channels, G = 32) the short loop per group
  // made the forward 1.4-2x slower (2x512x28x28 bfloat16 SiLU 257 -> 509 us), and at 64 it
  // gained nothing.
  const bool by_group = G == 1;
  const i64 groups_per_block = D > kStage ? 1 : kStage / D;
  auto apply_chunk = [&](i64 item) {  // item = n * chunks + k
    const i64 n = item / chunks, k = item % chunks;
    const float* a = coef_a.data() + n * C;
    const float* m = coef_m.data() + n * C;
    const float* gm = group_mean.data() + n * G;
    const i64 end = (k + 1) * rows < S ? (k + 1) * rows : S;
    float in_buf[kStageOf<T>], out_buf[kStageOf<T>];
    for (i64 s = k * rows; s < end; ++s) {
      const T* row0 = x + (n * S + s) * C;
      T* out0 = y + (n * S + s) * C;
      if (by_group && D <= kStage) {
        for (i64 g0 = 0; g0 < G; g0 += groups_per_block) {
          const i64 ng = G - g0 < groups_per_block ? G - g0 : groups_per_block;
          with_f32(row0 + g0 * D, ng * D, in_buf, [&](const auto* row) {
            via_f32(out0 + g0 * D, ng * D, out_buf, [&](auto* out) {
              for (i64 j = 0; j < ng; ++j) {
                const float mu = gm[g0 + j];
                const i64 c0 = (g0 + j) * D;
                const float *ac = a + c0, *hc = h + c0;
                const auto* r = row + j * D;
                auto* o = out + j * D;
#pragma omp simd
                for (i64 d = 0; d < D; ++d)
                  store(o + d, act_fwd<ACT>((load(r[d]) - mu) * ac[d] + hc[d]));
              }
            });
          });
        }
        continue;
      }
      for (i64 c0 = 0; c0 < C; c0 += kStage) {
        const i64 len = C - c0 < kStage ? C - c0 : kStage;
        const float *mc = m + c0, *ac = a + c0, *hc = h + c0;
        with_f32(row0 + c0, len, in_buf, [&](const auto* row) {
          via_f32(out0 + c0, len, out_buf, [&](auto* out) {
#pragma omp simd
            for (i64 c = 0; c < len; ++c)
              store(out + c, act_fwd<ACT>((load(row[c]) - mc[c]) * ac[c] + hc[c]));
          });
        });
      }
    }
  };

  if (N % nthreads == 0 || N >= 4 * nthreads) {
    // Sample by sample: each thread normalizes whole samples, reading a sample's x for the
    // output pass while its statistics pass has left it in cache (as torch's channels-last
    // kernel does per group). One phase over the whole tensor read x back from memory:
    // 8x512x28x28 float32 layer norm at 0.79x of torch.
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (i64 n = 0; n < N; ++n) {
      for (i64 k = 0; k < stat_items; ++k) stats_item(n * stat_items + k);
      finish_sample(n);
      for (i64 k = 0; k < chunks; ++k) apply_chunk(n * chunks + k);
    }
    return;
  }
  // fewer samples than threads: the threads share each phase, in one parallel region (see
  // backward_nhwc_samples)
#pragma omp parallel num_threads(nthreads)
  {
#pragma omp for schedule(static)
    for (i64 item = 0; item < N * stat_items; ++item) stats_item(item);
#pragma omp for schedule(static)
    for (i64 n = 0; n < N; ++n) finish_sample(n);
#pragma omp for schedule(static)
    for (i64 item = 0; item < N * chunks; ++item) apply_chunk(item);
  }
}

// The backward of samples [n0, n0 + N) (pointers and N as if they were the whole tensor, so
// x, dy, dx, mean and rstd start at sample n0), writing each (n, c)'s sums of dz and
// dz (x - mu) rstd into sdz and sdzx (N * C doubles each). With an activation, dz is kept
// between the passes in dz_buf (N * S * C floats) when the samples fit kKeepDzMax; a null
// dz_buf means a buffer of its own.
template <typename T, int ACT>
void backward_nhwc_samples(const T* dy, const T* x, const float* w, const float* b,
                           const float* mean, const float* rstd, T* dx, double* sdz,
                           double* sdzx, i64 N, i64 C, i64 S, i64 G, int nthreads,
                           float* dz_buf) {
  const i64 D = C / G;
  const i64 rows = rows_per_chunk(C, S);
  const i64 chunks = (S + rows - 1) / rows;
  std::vector<float> coef_a(N * C), coef_h(N * C), mu_c(N * C);
  for (i64 n = 0; n < N; ++n) {
    for (i64 g = 0; g < G; ++g) {
      const float r = rstd[n * G + g], mu = mean[n * G + g];
      for (i64 c = g * D; c < (g + 1) * D; ++c) {
        coef_a[n * C + c] = w ? r * w[c] : r;
        coef_h[n * C + c] = b ? b[c] : 0.0f;
        mu_c[n * C + c] = mu;
      }
    }
  }
  std::vector<float> part1(N * chunks * C), part2(N * chunks * C);
  // With an activation, dz of the first pass is kept for the second when the tensor is small
  // enough for the buffer to stay in cache (f'(z) is the costly part; nchw keeps each set's
  // dz the same way); larger tensors compute f'(z) again rather than stream the buffer.
  const bool keep_dz = ACT != ACT_NONE && N * S * C <= kKeepDzMax;
  // (not value-initialized: the first pass writes every value)
  std::unique_ptr<float[]> own_dz(keep_dz && !dz_buf ? new float[N * S * C] : nullptr);
  float* const dz_all = dz_buf ? dz_buf : own_dz.get();
  // per (n, c) sums, then per (n, g) M1, M2, then dx coefficients per (n, c)
  std::vector<float> coef_b(N * C), coef_k(N * C);
  // One parallel region for both passes and the sums between them (a single thread does those):
  // starting a region wakes the other threads, asleep in the gaps between calls from Python,
  // where a barrier finds them awake (#79: float32 1x1280x8x8 on two threads, called from
  // Python, forward 25 -> 18 us and forward+backward ~95 -> 69 us with the forward's regions
  // merged the same way; the harness, calling back to back, sees no difference).
#pragma omp parallel num_threads(nthreads)
  {
#pragma omp for schedule(static)
    for (i64 item = 0; item < N * chunks; ++item) {
      const i64 n = item / chunks, k = item % chunks;
      const float* a = coef_a.data() + n * C;
      const float* h = coef_h.data() + n * C;
      const float* mu = mu_c.data() + n * C;
      float* s1 = part1.data() + item * C;
      float* s2 = part2.data() + item * C;
      for (i64 c = 0; c < C; ++c) s1[c] = s2[c] = 0.0f;
      const i64 end = (k + 1) * rows < S ? (k + 1) * rows : S;
      float x_buf[kStageOf<T>], dy_buf[kStageOf<T>];
      for (i64 s = k * rows; s < end; ++s) {
        for (i64 c0 = 0; c0 < C; c0 += kStage) {
          const i64 len = C - c0 < kStage ? C - c0 : kStage;
          with_f32(x + (n * S + s) * C + c0, len, x_buf, [&](const auto* row) {
            with_f32(dy + (n * S + s) * C + c0, len, dy_buf, [&](const auto* drow) {
              const float *ac = a + c0, *hc = h + c0, *mc = mu + c0;
              float *t1 = s1 + c0, *t2 = s2 + c0;
              float* kept = keep_dz ? dz_all + (n * S + s) * C + c0 : nullptr;
#pragma omp simd
              for (i64 c = 0; c < len; ++c) {
                const float xv = load(row[c]);
                const float dz = load(drow[c]) * act_grad<ACT>((xv - mc[c]) * ac[c] + hc[c]);
                if (keep_dz) kept[c] = dz;
                t1[c] += dz;
                t2[c] += dz * (xv - mc[c]);
              }
            });
          });
        }
      }
    }
#pragma omp single
    {
      for (i64 n = 0; n < N; ++n) {
        // the chunks' sums in chunk order, chunk by chunk (reads along memory, no division)
        double *t1 = sdz + n * C, *t2 = sdzx + n * C;
        for (i64 c = 0; c < C; ++c) t1[c] = t2[c] = 0.0;
        for (i64 k = 0; k < chunks; ++k) {
          const float* p1 = part1.data() + (n * chunks + k) * C;
          const float* p2 = part2.data() + (n * chunks + k) * C;
#pragma omp simd
          for (i64 c = 0; c < C; ++c) {
            t1[c] += p1[c];
            t2[c] += p2[c];
          }
        }
        for (i64 g = 0; g < G; ++g)
          for (i64 c = g * D; c < (g + 1) * D; ++c) t2[c] *= rstd[n * G + g];
        for (i64 g = 0; g < G; ++g) {
          double m1 = 0.0, m2 = 0.0;
          for (i64 d = 0; d < D; ++d) {
            const i64 c = g * D + d;
            const double wc = w ? w[c] : 1.0;
            m1 += wc * sdz[n * C + c];
            m2 += wc * sdzx[n * C + c];
          }
          m1 /= static_cast<double>(D * S);
          m2 /= static_cast<double>(D * S);
          const double r = rstd[n * G + g];
          for (i64 d = 0; d < D; ++d) {
            coef_b[n * C + g * D + d] = static_cast<float>(-r * r * m2);
            coef_k[n * C + g * D + d] = static_cast<float>(-r * m1);
          }
        }
      }
    }
    if (dx) {
#pragma omp for schedule(static)
      for (i64 item = 0; item < N * chunks; ++item) {
        const i64 n = item / chunks, k = item % chunks;
        const float* a = coef_a.data() + n * C;
        const float* h = coef_h.data() + n * C;
        const float* cb = coef_b.data() + n * C;
        const float* ck = coef_k.data() + n * C;
        const float* mu = mu_c.data() + n * C;
        const i64 end = (k + 1) * rows < S ? (k + 1) * rows : S;
        float x_buf[kStageOf<T>], dy_buf[kStageOf<T>], dx_buf[kStageOf<T>];
        for (i64 s = k * rows; s < end; ++s) {
          for (i64 c0 = 0; c0 < C; c0 += kStage) {
            const i64 len = C - c0 < kStage ? C - c0 : kStage;
            const float *ac = a + c0, *hc = h + c0, *mc = mu + c0, *bc = cb + c0, *kc = ck + c0;
            if (keep_dz) {
              const float* kept = dz_all + (n * S + s) * C + c0;
              with_f32(x + (n * S + s) * C + c0, len, x_buf, [&](const auto* row) {
                via_f32(dx + (n * S + s) * C + c0, len, dx_buf, [&](auto* out) {
#pragma omp simd
                  for (i64 c = 0; c < len; ++c)
                    store(out + c, ac[c] * kept[c] + bc[c] * (load(row[c]) - mc[c]) + kc[c]);
                });
              });
              continue;
            }
            with_f32(x + (n * S + s) * C + c0, len, x_buf, [&](const auto* row) {
              with_f32(dy + (n * S + s) * C + c0, len, dy_buf, [&](const auto* drow) {
                via_f32(dx + (n * S + s) * C + c0, len, dx_buf, [&](auto* out) {
#pragma omp simd
                  for (i64 c = 0; c < len; ++c) {
                    const float xv = load(row[c]);
                    const float dz = load(drow[c]) * act_grad<ACT>((xv - mc[c]) * ac[c] + hc[c]);
                    store(out + c, ac[c] * dz + bc[c] * (xv - mc[c]) + kc[c]);
                  }
                });
              });
            });
          }
        }
      }
    }
  }
}

// The backward with an activation runs sample by sample where one sample's dz fits the
// kept-dz limit (kKeepDzMax): each sample's second pass then reads its dz and x while the
// first has left them in cache, and samples whose tensor is too large to keep dz whole still
// keep it. Harness, 1 thread, SiLU, against babfc47 (#76): bfloat16 32x2048x7x7 2630 -> 1690
// us, 16x1024x14x14 2260 -> 1540, 8x512x28x28 2170 -> 1350, 2x320x64x64 1810 -> 1070; float32
// 32x2048x7x7 3670 -> 2830.
template <typename T, int ACT>
void backward_nhwc(const T* dy, const T* x, const float* w, const float* b, const float* mean,
                   const float* rstd, T* dx, float* dw, float* db, i64 N, i64 C, i64 S, i64 G,
                   int nthreads) {
  // (one sample's worth at least: dw and db are read from the first, zeros when N is 0)
  std::vector<double> sdz((N > 0 ? N : 1) * C, 0.0), sdzx((N > 0 ? N : 1) * C, 0.0);
  // Both drivers do the same arithmetic on each sample (its chunks do not depend on the
  // driver), so which one runs, and so the thread count, changes no bit. Without an
  // activation there is no f'(z) to save: the per-sample driver measured even there.
  const bool per_sample = ACT != ACT_NONE && S * C <= kKeepDzMax &&
                          (N % nthreads == 0 || N >= 4 * nthreads);
  if (per_sample) {
#pragma omp parallel num_threads(nthreads)
    {
      // one dz buffer a thread, for all its samples, not zero-filled (the whole-tensor
      // buffer's zero-fill, which the first pass overwrites, cost bfloat16 6-7 %)
      std::unique_ptr<float[]> dz_sample(new float[S * C]);
#pragma omp for schedule(static)
      for (i64 n = 0; n < N; ++n) {
        const i64 at = n * S * C;
        backward_nhwc_samples<T, ACT>(dy + at, x + at, w, b, mean + n * G, rstd + n * G,
                                      dx ? dx + at : nullptr, sdz.data() + n * C,
                                      sdzx.data() + n * C, 1, C, S, G, 1, dz_sample.get());
      }
    }
  } else {
    backward_nhwc_samples<T, ACT>(dy, x, w, b, mean, rstd, dx, sdz.data(), sdzx.data(), N, C,
                                  S, G, nthreads, nullptr);
  }
  add_samples_into_first(sdz.data(), sdzx.data(), N, C, db, dw);
}

// ---- batch norm forward: one set per channel, across all samples ----------------------------
// Training: statistics over (N, S) of each channel, summed in one pass in float32 lanes that
// move into double every kRun values, around the channel's first value, checked afterwards for
// that value lying far from the mean (then summed again around the mean; see rows_moments and
// channel_stats in bn_forward_nchw). Eval (given_mean/given_var non-null): the given
// statistics. Then y = f((x - mean) * rstd * w + b), and mean/rstd are written (the
// backward, torch's native_batch_norm_backward, takes them). torch's own CPU kernel for this
// runs at a fraction of the memory bandwidth; this one runs at the speed of group norm.

// adds (p[i] - pivot) and its square, i < n, into kVec lanes; the overlapping last block adds
// zero for values already counted
template <typename T>
inline void add_shifted(const T* p, i64 n, float pivot, float* a1, float* a2) {
  i64 i = 0;
  for (; i + kVec <= n; i += kVec) {
#pragma omp simd
    for (int j = 0; j < kVec; ++j) {
      const float d = load(p[i + j]) - pivot;
      a1[j] += d;
      a2[j] += d * d;
    }
  }
  if (i == n) return;
  if (n >= kVec) {
    const i64 base = n - kVec;
#pragma omp simd
    for (int j = 0; j < kVec; ++j) {
      const float v = load(p[base + j]) - pivot;
      const float d = base + j >= i ? v : 0.0f;
      a1[j] += d;
      a2[j] += d * d;
    }
  } else {
    for (; i < n; ++i) {
      const float d = load(p[i]) - pivot;
      a1[0] += d;
      a2[0] += d * d;
    }
  }
}

// Running statistics, updated in place when given (training): as torch.nn.BatchNorm does,
// running = (1 - momentum) * running + momentum * batch value, with the unbiased variance.
struct Running {
  float* mean;
  float* var;
  double momentum;
};

// mean and 1/sqrt(var + eps) from a channel's mean and centred sum of squares m2 over count
// values, and the update of channel c's running statistics
inline void finish_stats(double mean_d, double m2, double count, float eps, float* mean,
                         float* rstd, const Running& run, i64 c) {
  if (m2 < 0.0) m2 = 0.0;
  *mean = static_cast<float>(mean_d);
  *rstd = static_cast<float>(1.0 / std::sqrt(m2 / count + eps));
  if (run.mean) {
    const double m = run.momentum;
    const double unbiased = m2 / (count > 1.0 ? count - 1.0 : 1.0);
    run.mean[c] = static_cast<float>((1.0 - m) * run.mean[c] + m * mean_d);
    run.var[c] = static_cast<float>((1.0 - m) * run.var[c] + m * unbiased);
  }
}

// Batch norm over (N, C, S) rows whose maps have at most this many values (7x7 to 16x16) goes
// through blocks of channels (bn_forward_nchw): one channel's N rows lie C * S values apart, so
// walking one channel at a time read 100-200 KB strides the prefetcher does not follow
// (bfloat16 32x2048x7x7 at 0.79x of torch, float16 0.44x).
constexpr i64 kBnShortRow = 256;

template <typename T, int ACT>
void bn_forward_nchw(const T* x, T* y, const float* w, const float* b, const float* given_mean,
                     const float* given_var, float* mean_out, float* rstd_out, i64 N, i64 C,
                     i64 S, float eps, const Running& run, int nthreads) {
  // float16 rows go through float32 buffers (see with_f32), in blocks of up to kStage values
  const i64 step = std::is_same_v<T, F16> && S > kStage ? kStage : S;

  // channel c's statistics, walking its N rows
  auto channel_stats = [&](i64 c, float* in_buf) {
    // Flushes of >= kRun values summed in float32 around a shift, combined in double (Chan
    // et al.). The first flush's shift is x[0, c, 0], which may be an outlier: it is summed
    // again around its mean if ill-conditioned (see rows_moments). Later flushes are shifted
    // by the mean so far, which keeps their error a few ulps of the channel's M2 (see
    // run_moments).
    const float pivot = load(x[c * S]);
    float shift = pivot;
    float a1[kVec] = {}, a2[kVec] = {};
    double count = 0.0, mean_off = 0.0, m2 = 0.0;  // mean_off: around pivot
    i64 first = 0, pending = 0;
    auto sum_rows = [&](i64 n0, i64 n1, float sh) {  // sums of x - sh and of its square
      // (into local lanes, which GCC keeps in registers; through a1/a2, which this lambda
      // captures, every vector's sums went through the stack: float16 with 28x28 maps
      // 540 -> 750 us)
      float l1[kVec], l2[kVec];
      for (int j = 0; j < kVec; ++j) l1[j] = l2[j] = 0.0f;
      for (i64 n = n0; n < n1; ++n) {
        for (i64 s0 = 0; s0 < S; s0 += step) {
          const i64 len = S - s0 < step ? S - s0 : step;
          with_f32(x + (n * C + c) * S + s0, len, in_buf,
                   [&](const auto* row) { add_shifted(row, len, sh, l1, l2); });
        }
      }
      for (int j = 0; j < kVec; ++j) {
        a1[j] += l1[j];
        a2[j] += l2[j];
      }
    };
    for (i64 n = 0; n < N; ++n) {
      sum_rows(n, n + 1, shift);
      pending += S;
      if (pending >= kRun || n == N - 1) {
        const float nf = static_cast<float>(pending);
        float s1 = lanes_total<kVec>(a1), s2 = lanes_total<kVec>(a2);
        float mr = s1 / nf;
        if (count == 0.0 && s1 * s1 > kIllShift * nf * s2) {
          // the pivot lay far away: summed again around shift + mr (as a float32 shift, so
          // that x - shift keeps its digits)
          for (int j = 0; j < kVec; ++j) a1[j] = a2[j] = 0.0f;
          shift += mr;
          sum_rows(first, n + 1, shift);
          s1 = lanes_total<kVec>(a1);
          s2 = lanes_total<kVec>(a2);
          mr = s1 / nf;
        }
        float q = s2 - s1 * mr;
        if (q < 0.0f) q = 0.0f;
        const double run_mean = static_cast<double>(shift) - pivot + mr;
        const double delta = run_mean - mean_off, total = count + nf;
        mean_off += delta * nf / total;
        m2 += static_cast<double>(q) + delta * delta * count * nf / total;
        count = total;
        shift = static_cast<float>(static_cast<double>(pivot) + mean_off);
        for (int j = 0; j < kVec; ++j) a1[j] = a2[j] = 0.0f;
        pending = 0;
        first = n + 1;
      }
    }
    finish_stats(static_cast<double>(pivot) + mean_off, m2, static_cast<double>(N * S), eps,
                 &mean_out[c], &rstd_out[c], run, c);
  };
  // channel c's statistics from its sums t1, t2 of (x - pivot) and (x - pivot)^2 over N * S
  // values, or, where they are ill-conditioned (pivot far from the mean), from channel_stats:
  // sum (x - pivot)^2 = t2 bounds every partial sum's float32 error, so while t2 is within 16x
  // the channel's M2 that error is a few ulps of the M2
  auto finish_channel = [&](i64 c, float pivot, double t1, double t2, float* in_buf) {
    const double count = static_cast<double>(N * S);
    if (t1 * t1 > kIllShift * count * t2) {
      channel_stats(c, in_buf);
      return;
    }
    const double mc = t1 / count;
    finish_stats(static_cast<double>(pivot) + mc, t2 - t1 * mc, count, eps, &mean_out[c],
                 &rstd_out[c], run, c);
  };
  auto given_stats = [&](i64 c) {
    mean_out[c] = given_mean[c];
    rstd_out[c] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(given_var[c]) + eps));
  };
  // y of row (n, c)
  auto apply_row = [&](i64 n, i64 c, float* in_buf, float* out_buf) {
    const float mu = mean_out[c], r = rstd_out[c];
    const float a = w ? r * w[c] : r;
    const float h = b ? b[c] : 0.0f;
    for (i64 s0 = 0; s0 < S; s0 += step) {
      const i64 len = S - s0 < step ? S - s0 : step;
      with_f32(x + (n * C + c) * S + s0, len, in_buf, [&](const auto* qx) {
        via_f32(y + (n * C + c) * S + s0, len, out_buf, [&](auto* qy) {
          for_each_vec(len, [&](i64 s) { store(qy + s, act_fwd<ACT>((load(qx[s]) - mu) * a + h)); });
        });
      });
    }
  };

  // Maps of 257-1024 values (28x28, 32x32) in tensors of 8 MiB or more, which come from
  // memory: the row blocks below, one block per thread, read as a sweep over the samples in
  // the order they lie (bfloat16 32x512x28x28 was ~0.9x of torch, float16 0.6x; #69 in
  // benchmarks/README.md: the sweep at every map size lost at 56x56 and 14x14)
  const bool sweep = S > kBnShortRow && S <= 4 * kBnShortRow &&
                     N * C * S * static_cast<i64>(sizeof(T)) >= (i64{8} << 20);
  if (S > kBnShortRow && !sweep) {  // long rows: one channel at a time, read again from cache
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (i64 c = 0; c < C; ++c) {
      float in_buf[kStageOf<T>], out_buf[kStageOf<T>];
      if (given_mean) {
        given_stats(c);
      } else {
        channel_stats(c, in_buf);
      }
      for (i64 n = 0; n < N; ++n) apply_row(n, c, in_buf, out_buf);
    }
    return;
  }
  if (std::is_same_v<T, float> || sweep) {
    // float32 short rows: blocks of channels that fill ~256 KB, whose rows of one sample are
    // contiguous; each row summed into its channel's lane accumulator around the channel's
    // first value (flushed to double every kRun values; an ill-conditioned channel is summed
    // again by channel_stats), then the block normalized row by row from L2. (The per-value
    // spans below, which bfloat16 and float16 take, were 5-20 % slower in float32: 32x2048x7x7
    // 1190 -> 1249 us, 32x1024x14x14 3042 -> 3360, harness.)
    // (In a sweep a block is a thread's share of the channels, at most kRowBlock.)
    constexpr i64 kRowBlock = 512;
    const i64 per_channel = N * S * static_cast<i64>(sizeof(T));
    const i64 cap = sweep ? kRowBlock : 64;
    i64 rb = sweep ? (C + nthreads - 1) / nthreads : (i64{256} << 10) / per_channel;
    rb = rb < 1 ? 1 : (rb > cap ? cap : rb);
    const i64 row_blocks = (C + rb - 1) / rb;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (i64 blk = 0; blk < row_blocks; ++blk) {
      const i64 c0 = blk * rb, nc = C - c0 < rb ? C - c0 : rb;
      float in_buf[kStageOf<T>], out_buf[kStageOf<T>];
      if (given_mean) {
        for (i64 j = 0; j < nc; ++j) given_stats(c0 + j);
      } else {
        alignas(64) float acc1[kRowBlock][kVec], acc2[kRowBlock][kVec];
        float piv[kRowBlock];
        double t1[kRowBlock], t2[kRowBlock];
        for (i64 j = 0; j < nc; ++j) {
          piv[j] = load(x[(c0 + j) * S]);
          t1[j] = t2[j] = 0.0;
          for (int l = 0; l < kVec; ++l) acc1[j][l] = acc2[j][l] = 0.0f;
        }
        i64 pending = 0;
        for (i64 n = 0; n < N; ++n) {
          for (i64 j = 0; j < nc; ++j) {
            if constexpr (std::is_same_v<T, float>) {
              add_shifted(x + (n * C + c0 + j) * S, S, piv[j], acc1[j], acc2[j]);
            } else {  // (a sweep: S <= 1024 <= kStage, one staged block a row)
              with_f32(x + (n * C + c0 + j) * S, S, in_buf,
                       [&](const auto* row) { add_shifted(row, S, piv[j], acc1[j], acc2[j]); });
            }
          }
          pending += S;
          if (pending >= kRun || n == N - 1) {
            for (i64 j = 0; j < nc; ++j) {
              t1[j] += lanes_total<kVec>(acc1[j]);
              t2[j] += lanes_total<kVec>(acc2[j]);
              for (int l = 0; l < kVec; ++l) acc1[j][l] = acc2[j][l] = 0.0f;
            }
            pending = 0;
          }
        }
        for (i64 j = 0; j < nc; ++j) finish_channel(c0 + j, piv[j], t1[j], t2[j], in_buf);
      }
      for (i64 n = 0; n < N; ++n)
        for (i64 j = 0; j < nc; ++j) apply_row(n, c0 + j, in_buf, out_buf);
    }
    return;
  }
  // Short rows: blocks of nc channels whose rows of one sample are one contiguous span of
  // L = nc * S <= kStage values, so every loop runs over a whole span with per-value copies of
  // the per-channel numbers (per-row loops of 49 values spent their time in setup and partial
  // vectors). Statistics: each value position keeps its own float32 sums over the samples
  // (flushed to the channel's double sums every kBnFlush samples), around the channel's first
  // value; a channel whose sums turn out ill-conditioned (that value far from its mean, see
  // rows_moments) is summed again by channel_stats. Then the block is normalized sample by
  // sample while it is still in L2 (N * L values).
  constexpr i64 kBnBlock = 256, kBnFlush = 64;
  i64 cb = kStage / S;
  cb = cb > kBnBlock ? kBnBlock : cb;
  const i64 blocks = (C + cb - 1) / cb;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (i64 blk = 0; blk < blocks; ++blk) {
    const i64 c0 = blk * cb, nc = C - c0 < cb ? C - c0 : cb, L = nc * S;
    float in_buf[kStageOf<T>], out_buf[kStageOf<T>];
    alignas(64) float e0[kStage], e1[kStage], e2[kStage];  // per-value numbers of the block
    if (given_mean) {
      for (i64 j = 0; j < nc; ++j) given_stats(c0 + j);
    } else {
      double t1[kBnBlock], t2[kBnBlock];
      for (i64 j = 0; j < nc; ++j) {
        const float pivot = load(x[(c0 + j) * S]);
        t1[j] = t2[j] = 0.0;
        for (i64 k = j * S; k < (j + 1) * S; ++k) {
          e0[k] = pivot;
          e1[k] = e2[k] = 0.0f;
        }
      }
      for (i64 n = 0; n < N; ++n) {
        with_f32(x + (n * C + c0) * S, L, in_buf, [&](const auto* q) {
#pragma omp simd
          for (i64 k = 0; k < L; ++k) {
            const float d = load(q[k]) - e0[k];
            e1[k] += d;
            e2[k] += d * d;
          }
        });
        if ((n + 1) % kBnFlush == 0 || n == N - 1) {
          for (i64 j = 0; j < nc; ++j) {
            float u = 0.0f, v = 0.0f;
#pragma omp simd reduction(+ : u, v)
            for (i64 k = j * S; k < (j + 1) * S; ++k) {
              u += e1[k];
              v += e2[k];
              e1[k] = e2[k] = 0.0f;
            }
            t1[j] += u;
            t2[j] += v;
          }
        }
      }
      for (i64 j = 0; j < nc; ++j) finish_channel(c0 + j, e0[j * S], t1[j], t2[j], in_buf);
    }
    for (i64 j = 0; j < nc; ++j) {
      const i64 c = c0 + j;
      const float mu = mean_out[c], r = rstd_out[c];
      const float a = w ? r * w[c] : r;
      const float h = b ? b[c] : 0.0f;
      for (i64 k = j * S; k < (j + 1) * S; ++k) {
        e0[k] = mu;
        e1[k] = a;
        e2[k] = h;
      }
    }
    for (i64 n = 0; n < N; ++n) {
      with_f32(x + (n * C + c0) * S, L, in_buf, [&](const auto* qx) {
        via_f32(y + (n * C + c0) * S, L, out_buf, [&](auto* qy) {
#pragma omp simd
          for (i64 k = 0; k < L; ++k)
            store(qy + k, act_fwd<ACT>((load(qx[k]) - e0[k]) * e1[k] + e2[k]));
        });
      });
    }
  }
}

// (R, C) rows, R = N * S (channels-last, or (N, C) itself)
template <typename T, int ACT>
void bn_forward_nhwc(const T* x, T* y, const float* w, const float* b, const float* given_mean,
                     const float* given_var, float* mean_out, float* rstd_out, i64 R, i64 C,
                     float eps, const Running& run, int nthreads) {
  std::vector<float> coef_a(C), coef_h(C), coef_m(C);
  if (given_mean) {
    for (i64 c = 0; c < C; ++c) {
      mean_out[c] = given_mean[c];
      rstd_out[c] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(given_var[c]) + eps));
    }
  } else {
    // rows in chunks of at most 256 (float32 partial sums), 8 or more chunks for the threads;
    // the chunks do not depend on the thread count, so neither do the sums (bit-identical
    // results with 1 or 2 threads)
    i64 rows = (R + 7) / 8;
    if (rows > 256) rows = 256;
    if (rows < 1) rows = 1;
    const i64 chunks = (R + rows - 1) / rows;
    // per (chunk, c): the chunk's mean around the first row and its M2 (see rows_moments)
    std::vector<double> part_mean(chunks * C), part_m2(chunks * C);
    std::vector<float> ref(C);
    for (i64 c = 0; c < C; ++c) ref[c] = load(x[c]);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (i64 k = 0; k < chunks; ++k) {
      const i64 end = (k + 1) * rows < R ? (k + 1) * rows : R;
      chunk_moments(x, C, k * rows, end, ref.data(), part_mean.data() + k * C,
                    part_m2.data() + k * C);
    }
    std::vector<double> t1(C, 0.0), t2(C, 0.0);
    for (i64 k = 0; k < chunks; ++k) {
      const double nk = static_cast<double>(((k + 1) * rows < R ? (k + 1) * rows : R) - k * rows);
      chan_add(C, static_cast<double>(k * rows), nk, part_mean.data() + k * C,
               part_m2.data() + k * C, t1.data(), t2.data());
    }
    for (i64 c = 0; c < C; ++c)
      finish_stats(static_cast<double>(ref[c]) + t1[c], t2[c], static_cast<double>(R), eps,
                   &mean_out[c], &rstd_out[c], run, c);
  }
  for (i64 c = 0; c < C; ++c) {
    coef_m[c] = mean_out[c];
    coef_a[c] = w ? rstd_out[c] * w[c] : rstd_out[c];
    coef_h[c] = b ? b[c] : 0.0f;
  }
  const float* a = coef_a.data();
  const float* h = coef_h.data();
  const float* m = coef_m.data();
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (i64 s = 0; s < R; ++s) {
    float in_buf[kStageOf<T>], out_buf[kStageOf<T>];
    for (i64 c0 = 0; c0 < C; c0 += kStage) {
      const i64 len = C - c0 < kStage ? C - c0 : kStage;
      const float *mc = m + c0, *ac = a + c0, *hc = h + c0;
      with_f32(x + s * C + c0, len, in_buf, [&](const auto* row) {
        via_f32(y + s * C + c0, len, out_buf, [&](auto* out) {
#pragma omp simd
          for (i64 c = 0; c < len; ++c)
            store(out + c, act_fwd<ACT>((load(row[c]) - mc[c]) * ac[c] + hc[c]));
        });
      });
    }
  }
}

template <typename T>
int bn_forward_any(const void* x, void* y, const float* w, const float* b, const float* gm,
                   const float* gv, float* mean, float* rstd, i64 N, i64 C, i64 S, int nhwc,
                   float eps, const Running& run, int act, int nthreads) {
  const T* px = static_cast<const T*>(x);
  T* py = static_cast<T*>(y);
  std::vector<float> scratch;
  if (!mean) {  // the caller needs no statistics; the kernels still do
    scratch.resize(2 * C);
    mean = scratch.data();
    rstd = mean + C;
  }
#define BN_FWD(A)                                                                        \
  (nhwc ? bn_forward_nhwc<T, A>(px, py, w, b, gm, gv, mean, rstd, N * S, C, eps, run,  \
                                nthreads)                                                \
        : bn_forward_nchw<T, A>(px, py, w, b, gm, gv, mean, rstd, N, C, S, eps, run, nthreads))
  switch (act) {
    case ACT_NONE: BN_FWD(ACT_NONE); return 0;
    case ACT_SILU: BN_FWD(ACT_SILU); return 0;
    case ACT_GELU: BN_FWD(ACT_GELU); return 0;
    case ACT_RELU: BN_FWD(ACT_RELU); return 0;
    default: return 1;
  }
#undef BN_FWD
}

// ---- dispatch on layout and activation --------------------------------------------------------

template <typename T>
int forward_any(const void* x, void* y, const float* w, const float* b, float* mean, float* rstd,
                i64 N, i64 C, i64 S, i64 G, int nhwc, float eps, int act, int nthreads) {
  const T* px = static_cast<const T*>(x);
  T* py = static_cast<T*>(y);
#define GN_FWD(A)                                                               \
  (nhwc ? forward_nhwc<T, A>(px, py, w, b, mean, rstd, N, C, S, G, eps, nthreads) \
        : forward_nchw<T, A>(px, py, w, b, mean, rstd, N, C, S, G, eps, nthreads))
  switch (act) {
    case ACT_NONE: GN_FWD(ACT_NONE); return 0;
    case ACT_SILU: GN_FWD(ACT_SILU); return 0;
    case ACT_GELU: GN_FWD(ACT_GELU); return 0;
    case ACT_RELU: GN_FWD(ACT_RELU); return 0;
    default: return 1;
  }
#undef GN_FWD
}

template <typename T>
int backward_any(const void* dy, const void* x, const float* w, const float* b, const float* mean,
                 const float* rstd, void* dx, float* dw, float* db, i64 N, i64 C, i64 S, i64 G,
                 int nhwc, int act, int nthreads) {
  const T* pdy = static_cast<const T*>(dy);
  const T* px = static_cast<const T*>(x);
  T* pdx = static_cast<T*>(dx);
#define GN_BWD(A)                                                                          \
  (nhwc ? backward_nhwc<T, A>(pdy, px, w, b, mean, rstd, pdx, dw, db, N, C, S, G, nthreads) \
        : backward_nchw<T, A>(pdy, px, w, b, mean, rstd, pdx, dw, db, N, C, S, G, nthreads))
  switch (act) {
    case ACT_NONE: GN_BWD(ACT_NONE); return 0;
    case ACT_SILU: GN_BWD(ACT_SILU); return 0;
    case ACT_GELU: GN_BWD(ACT_GELU); return 0;
    case ACT_RELU: GN_BWD(ACT_RELU); return 0;
    default: return 1;
  }
#undef GN_BWD
}

}  // namespace

// Below this many elements a second thread costs more to wake than it saves (torch's own
// grain size for its parallel loops is of the same order).
constexpr i64 kSerialBelow = 1 << 15;

struct ForwardArgs {
  i64 dtype, x, y, w, b, mean, rstd, N, C, S, G, nhwc;
  double eps;
  i64 act, nthreads;
};

struct BatchForwardArgs {
  i64 dtype, x, y, w, b, given_mean, given_var, mean, rstd, N, C, S, nhwc;
  double eps;
  i64 act, nthreads, running_mean, running_var;
  double momentum;
};

struct BackwardArgs {
  i64 dtype, dy, x, w, b, mean, rstd, dx, dw, db, N, C, S, G, nhwc, act, nthreads;
};

template <typename P>
inline P* ptr(i64 v) {
  return reinterpret_cast<P*>(static_cast<intptr_t>(v));
}

extern "C" {

// dtype: 0 float32, 1 bfloat16, 2 float16. Returns 0 on success.
int gn_forward(int dtype, const void* x, void* y, const float* w, const float* b, float* mean,
               float* rstd, i64 N, i64 C, i64 S, i64 G, int nhwc, float eps, int act,
               int nthreads) {
  if (N * C * S < kSerialBelow) nthreads = 1;
  switch (dtype) {
    case 0: return forward_any<float>(x, y, w, b, mean, rstd, N, C, S, G, nhwc, eps, act, nthreads);
    case 1: return forward_any<BF16>(x, y, w, b, mean, rstd, N, C, S, G, nhwc, eps, act, nthreads);
    case 2:
      return forward_any<F16>(x, y, w, b, mean, rstd, N, C, S, G, nhwc, eps, act, nthreads);
    default: return 2;
  }
}

// Batch norm forward (training when given_mean is null, else eval with the given statistics);
// writes mean and rstd of shape (C,). Same dtype codes and return values as gn_forward.
// running_mean/running_var (float32, or null) are updated in place with momentum in training;
// mean/rstd may be null when the caller needs no statistics.
int bn_forward(int dtype, const void* x, void* y, const float* w, const float* b,
               const float* given_mean, const float* given_var, float* mean, float* rstd, i64 N,
               i64 C, i64 S, int nhwc, float eps, int act, int nthreads, float* running_mean,
               float* running_var, double momentum) {
  if (N * C * S < kSerialBelow) nthreads = 1;
  const Running run{given_mean ? nullptr : running_mean, running_var, momentum};
  switch (dtype) {
    case 0:
      return bn_forward_any<float>(x, y, w, b, given_mean, given_var, mean, rstd, N, C, S, nhwc,
                                   eps, run, act, nthreads);
    case 1:
      return bn_forward_any<BF16>(x, y, w, b, given_mean, given_var, mean, rstd, N, C, S, nhwc,
                                  eps, run, act, nthreads);
    case 2:
      return bn_forward_any<F16>(x, y, w, b, given_mean, given_var, mean, rstd, N, C, S,
                                      nhwc, eps, run, act, nthreads);
    default: return 2;
  }
}

int gn_backward(int dtype, const void* dy, const void* x, const float* w, const float* b,
                const float* mean, const float* rstd, void* dx, float* dw, float* db, i64 N,
                i64 C, i64 S, i64 G, int nhwc, int act, int nthreads) {
  if (N * C * S < kSerialBelow) nthreads = 1;
  switch (dtype) {
    case 0:
      return backward_any<float>(dy, x, w, b, mean, rstd, dx, dw, db, N, C, S, G, nhwc, act,
                                 nthreads);
    case 1:
      return backward_any<BF16>(dy, x, w, b, mean, rstd, dx, dw, db, N, C, S, G, nhwc, act,
                                nthreads);
    case 2:
      return backward_any<F16>(dy, x, w, b, mean, rstd, dx, dw, db, N, C, S, G, nhwc, act,
                                    nthreads);
    default: return 2;
  }
}

// The same two entry points with their arguments packed in one array of 8-byte fields (Python
// fills it with struct.pack): ctypes converts each argument separately, about 0.1 us apiece,
// which was 1.5 us of a 4096-value call; one pointer costs one conversion.
int gn_forward_packed(const ForwardArgs* a) {
  return gn_forward(static_cast<int>(a->dtype), ptr<const void>(a->x), ptr<void>(a->y),
                    ptr<const float>(a->w), ptr<const float>(a->b), ptr<float>(a->mean),
                    ptr<float>(a->rstd), a->N, a->C, a->S, a->G, static_cast<int>(a->nhwc),
                    static_cast<float>(a->eps), static_cast<int>(a->act),
                    static_cast<int>(a->nthreads));
}

int bn_forward_packed(const BatchForwardArgs* a) {
  return bn_forward(static_cast<int>(a->dtype), ptr<const void>(a->x), ptr<void>(a->y),
                    ptr<const float>(a->w), ptr<const float>(a->b), ptr<const float>(a->given_mean),
                    ptr<const float>(a->given_var), ptr<float>(a->mean), ptr<float>(a->rstd), a->N,
                    a->C, a->S, static_cast<int>(a->nhwc), static_cast<float>(a->eps),
                    static_cast<int>(a->act), static_cast<int>(a->nthreads),
                    ptr<float>(a->running_mean), ptr<float>(a->running_var), a->momentum);
}

int gn_backward_packed(const BackwardArgs* a) {
  return gn_backward(static_cast<int>(a->dtype), ptr<const void>(a->dy), ptr<const void>(a->x),
                     ptr<const float>(a->w), ptr<const float>(a->b), ptr<const float>(a->mean),
                     ptr<const float>(a->rstd), ptr<void>(a->dx), ptr<float>(a->dw),
                     ptr<float>(a->db), a->N, a->C, a->S, a->G, static_cast<int>(a->nhwc),
                     static_cast<int>(a->act), static_cast<int>(a->nthreads));
}

// The activation alone, elementwise on float32 (grad=1: its derivative), with the same inlined
// code as the fused kernels; for the accuracy tests of exp_nonpos and the activations.
int gn_activation(int act, int grad, const float* z, float* out, i64 n) {
#define GN_ACT(A)                                                      \
  do {                                                                 \
    if (grad) {                                                        \
      _Pragma("omp simd") for (i64 i = 0; i < n; ++i) out[i] = act_grad<A>(z[i]); \
    } else {                                                           \
      _Pragma("omp simd") for (i64 i = 0; i < n; ++i) out[i] = act_fwd<A>(z[i]);  \
    }                                                                  \
  } while (0)
  switch (act) {
    case ACT_NONE: GN_ACT(ACT_NONE); return 0;
    case ACT_SILU: GN_ACT(ACT_SILU); return 0;
    case ACT_GELU: GN_ACT(ACT_GELU); return 0;
    case ACT_RELU: GN_ACT(ACT_RELU); return 0;
    default: return 1;
  }
#undef GN_ACT
}

int gn_abi_version(void) { return 1; }

}  // extern "C"
