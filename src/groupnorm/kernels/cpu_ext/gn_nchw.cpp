// Group/layer/instance norm with an optional activation, forward and backward, for x stored as
// (N, C, S): each set (n, g) is one contiguous block of D*S values (D = C/G channels of S).
// The threads share the sets (N * G items); a set's statistics pass leaves it in cache for the
// output pass. Short sets (instance norm on small maps, at most kShortSetMax values) take their
// statistics kStatBlock sets at a time, then the output pass of those sets: per set, the
// moments end in a scalar square root and division whose latency, for a set of 16 values,
// was the larger part of its cost; over a block they run as vector code. Shared helpers and
// the numerics: gn_common.h; constants: gn_tuning.h.
//
// Strategies (chosen by plan_forward_nchw and plan_backward_nchw; "SiLU or GELU" below stands for
// the activations marked costly in gn_common.h's list, kCostlyAct):
//
//   forward, kLines (AVX-512 builds; float32 with SiLU or GELU; 16 < S <= kShortRowMax):
//     z of the whole set is written into y walking x in 16-value vectors aligned to its cache
//     lines, then f runs over y in one flat loop. Why: a short channel starts anywhere in a
//     line, so walked channel by channel nearly every vector spans two lines and the last
//     vector of each channel is partly empty.
//   forward, kShortRows (SiLU or GELU; S <= kShortRowMax; not float32 rows of whole vectors):
//     z of the whole set first (into y for float32, a float32 buffer otherwise), then f over
//     it in one loop, in chunks after each of which the same stretch of the next set is
//     prefetched. Why: the activation is the costly part, and one long loop beats D short
//     ones with their setup and partial last vectors; rows of whole vectors lose nothing there.
//   forward, kPerChannel (everything else): per channel, y = f(a ((x - k) - md) + h) in one pass,
//     prefetching the next set's channel where the tensor is large enough to come from
//     memory (kPrefetchTensorBytes). Why: long rows already vectorize well.
//
//   backward, kLines (AVX-512 builds; float32 with SiLU or GELU; S <= kShortRowMax, S > 16,
//     except S of 32, 48 and 64, whose channels start on a line anyway): four passes over the
//     set, the per-channel ones walked in lines as the forward's kLines, dz in a buffer with
//     x's offset within a line. Why: as the forward's kLines.
//   backward, kShortSet (SiLU or GELU; S <= kShortRowMax): four passes over float32 buffers
//     of the set: z and x - mu per channel, dz = dy f'(z) in one flat loop, per-channel sums,
//     dx. Why: the derivative is the costly part and runs best as one long loop.
//   backward, kPerChannel (everything else): one pass for dz and the sums (dz kept in a
//     buffer of the set for the second pass when there is an activation), one for dx;
//     prefetching the next set where the tensor comes from memory and a set is at most
//     kPrefetchSetMaxBytes (larger sets measured a gain in some runs and a loss in others).
//
// float16 goes through float32 staging buffers (for_each_stage_block, with_f32, via_f32), in
// the same summation order as float32.

#include "gn_kernels.h"

namespace {

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

// z = ((x - k) - md) a_d + h_d over an nchw set of S > 16 values per channel (k: the set's
// shift, md: its mean minus k; pa, ph: D + 1 values each, the last unused but read), walked
// in x's lines; z may be y (in place of the output) or a buffer with x's line offset.
inline void z_lines(const float* x, float k, float md, const float* pa, const float* ph, i64 D,
                    i64 S, float* z) {
  const __m512 vk = _mm512_set1_ps(k), vmd = _mm512_set1_ps(md);
  for_each_line_vec(x, D, S, [&](auto step, i64 i, i64 d, __mmask16 m) {
    constexpr int K = decltype(step)::value;
    if constexpr (K == kFull) {
      const __m512 xc = _mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vk), vmd);
      _mm512_storeu_ps(z + i, _mm512_fmadd_ps(xc, _mm512_set1_ps(pa[d]), _mm512_set1_ps(ph[d])));
    } else if constexpr (K != kEnd) {
      // the lanes in the set: all but the head's first ones and those past the last channel
      const __mmask16 valid = K == kHead || d + 1 == D ? m : static_cast<__mmask16>(0xFFFF);
      const __m512 xc =
          _mm512_sub_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, x + i), vk), vmd);
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
// same stretch of the next set's x and y (more); benchmarks/README.md, "Kernel design, and
// why". Not inlined:
// inside forward_nchw, its vector code changed how GCC compiled the statistics pass (lane sums
// spilled to the stack).
template <int ACT>
__attribute__((noinline)) void forward_short_set_lines(const float* x, float* y, const float* w,
                                                       const float* b, float k, float md,
                                                       float r, i64 g,
                                                       i64 D, i64 S, float* par, bool more) {
  float* pa = par;
  float* ph = par + D + 1;
  set_lane_params(w, b, r, g, D, pa, ph);
  z_lines(x, k, md, pa, ph, D, S, y);
  const i64 L = D * S;
  for_each_prefetch_chunk(L, more, x + L, y + L,
                          [&](i64 i0, i64 n) { act_flat<ACT, true>(y + i0, nullptr, n); });
}
#endif

// ---- strategy of the forward --------------------------------------------------------------

enum class NchwForward { kLines, kShortRows, kPerChannel };
struct NchwForwardPlan {
  NchwForward how;
  bool prefetch;  // kPerChannel: fetch the next set's x ahead in the output pass
};

// Which forward runs (the table at the top of this file says why).
template <typename T, int ACT>
NchwForwardPlan plan_forward_nchw(i64 N, i64 C, i64 S) {
  constexpr bool costly_act = kCostlyAct<ACT>;
  constexpr bool f32 = std::is_same_v<T, float>;
#if defined(__AVX512F__)
  if (f32 && costly_act && S > kVec && S <= kShortRowMax) return {NchwForward::kLines, false};
#endif
  if (costly_act && S <= kShortRowMax && (!f32 || S % kVec != 0))
    return {NchwForward::kShortRows, false};
  return {NchwForward::kPerChannel,
          N * C * S * static_cast<i64>(sizeof(T)) >= kPrefetchTensorBytes};
}

template <typename T, int ACT>
void forward_nchw(const T* x, T* y, const float* w, const float* b, float* mean_out,
                  float* rstd_out, i64 N, i64 C, i64 S, i64 G, float eps, int nthreads) {
  const i64 D = C / G;
  const i64 L = D * S;
  const NchwForwardPlan plan = plan_forward_nchw<T, ACT>(N, C, S);
  const bool lines = plan.how == NchwForward::kLines;
  const bool short_rows = plan.how == NchwForward::kShortRows;
  const bool prefetch = plan.prefetch;
#pragma omp parallel num_threads(nthreads)
  {
  std::vector<float> z_buf(short_rows && !std::is_same_v<T, float> ? L : 0);
  std::vector<float> par_buf(lines ? 2 * (D + 1) : 0);
  float in_buf[kStageOf<T>], out_buf[kStageOf<T>];
  // the output pass of one set, from its mean (in double) and rstd
  auto output_pass = [&](i64 item, double set_mean, float r) __attribute__((always_inline)) {
    const i64 g = item % G;
    const T* px = x + item * L;
    T* py = y + item * L;
    const float mu = static_cast<float>(set_mean);
    // the shifted apply: x - k is exact near the mean, and md keeps the digits of the mean
    // that mu, rounded to float32, loses when |mu| is large against the spread
    const bool shifted = shift_needed(mu, r);
    const float k = shifted ? load(px[0]) : 0.0f;
    const float md = shifted ? static_cast<float>(set_mean - static_cast<double>(k)) : mu;
    if (mean_out) mean_out[item] = mu;  // null when the caller needs no statistics
    if (rstd_out) rstd_out[item] = r;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float> && kCostlyAct<ACT>) {
      if (lines) {
        forward_short_set_lines<ACT>(px, py, w, b, k, md, r, g, D, S, par_buf.data(),
                                     item + 1 < N * G);
        return;
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
            for_each_vec(S, [&](i64 s) { qz[s] = ((load(rx[s]) - k) - md) * a + h; });
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
      return;
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
            for_each_vec(len, [&](i64 s) {
              store(ry + s, act_fwd<ACT>(((load(rx[s]) - k) - md) * a + h));
            });
          }
        });
      });
    });
  };
  if (L > kShortSetMax) {
#pragma omp for schedule(static)
    for (i64 item = 0; item < N * G; ++item) {
      const Moments mom = run_moments(x + item * L, L, in_buf);
      output_pass(item, mom.mean, rstd_of(mom.m2, static_cast<double>(L), eps));
    }
  } else {
    // short sets, a block at a time: the moments of each, then rstd of the whole block in one
    // loop the compiler vectorizes (IEEE square root and division round as the scalar ones
    // do, so the bits are those of the loop above), then the output pass of each
    double mean_d[kStatBlock], m2[kStatBlock];
    float rstd[kStatBlock];
#pragma omp for schedule(static)
    for (i64 first = 0; first < N * G; first += kStatBlock) {
      const i64 sets = first + kStatBlock <= N * G ? kStatBlock : N * G - first;
      for (i64 j = 0; j < sets; ++j) {
        const Moments mom = run_moments(x + (first + j) * L, L, in_buf);
        mean_d[j] = mom.mean;
        m2[j] = mom.m2;
      }
      for (i64 j = sets; j < kStatBlock; ++j) m2[j] = 1.0;  // (unused lanes)
#pragma omp simd
      for (int j = 0; j < kStatBlock; ++j) rstd[j] = rstd_of(m2[j], static_cast<double>(L), eps);
      for (i64 j = 0; j < sets; ++j) output_pass(first + j, mean_d[j], rstd[j]);
    }
  }
  }
}

// Sums over s < n of u[s] and u[s] * v[s] (float32 arrays, n short): for the per-channel sums
// of the short-row backward below (with AVX-512, the float32 rows it still takes are those of
// up to 16 values and of 32, 48 and 64). With AVX-512 the sums stay in two registers and the
// last partial block is a masked load, so a channel costs a few vector adds and two horizontal
// reductions; the generic code keeps its lanes in memory.
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
// 2 (D + 1) floats; zb has x's offset within a line. Not inlined, as forward_short_set_lines
// (benchmarks/README.md, "Kernel design, and why").
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
  z_lines(x, mu, 0.0f, pa, ph, D, S, zb);  // (x - mu - 0: the float32 mean as it was saved)
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
// the bits differ), with silu_grad16: a little faster than sum_two with act_grad
// (benchmarks/README.md, "Kernel design, and why").
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

// ---- strategy of the backward -------------------------------------------------------------

enum class NchwBackward { kLines, kShortSet, kPerChannel };
struct NchwBackwardPlan {
  NchwBackward how;
  bool prefetch;  // kPerChannel: fetch the next set's x and dy ahead in the first pass
};

// Which backward runs (the table at the top of this file says why).
template <typename T, int ACT>
NchwBackwardPlan plan_backward_nchw(i64 N, i64 C, i64 S, i64 G) {
  constexpr bool costly_act = kCostlyAct<ACT>;
  const i64 bytes = static_cast<i64>(sizeof(T));
  const bool short_rows = costly_act && S <= kShortRowMax;
#if defined(__AVX512F__)
  if (std::is_same_v<T, float> && short_rows && S > kVec && (S % kVec != 0 || S > 64))
    return {NchwBackward::kLines, false};
#endif
  if (short_rows) return {NchwBackward::kShortSet, false};
  return {NchwBackward::kPerChannel, ACT != ACT_NONE && N * C * S * bytes >= kPrefetchTensorBytes &&
                                         (C / G) * S * bytes <= kPrefetchSetMaxBytes};
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
  const NchwBackwardPlan plan = plan_backward_nchw<T, ACT>(N, C, S, G);
  const bool prefetch = plan.prefetch;
#pragma omp parallel num_threads(nthreads)
  {
    // dz of the current set is kept for the second pass (the set is cache-sized), so f'(z) is
    // computed once per element
    const bool short_rows = plan.how == NchwBackward::kShortSet;
    const bool lines = plan.how == NchwBackward::kLines;
    std::vector<float> dz_buf(ACT == ACT_NONE || lines ? 0 : L);
    std::vector<float> xc_buf(short_rows ? L : 0);
    std::vector<float> line_buf(lines ? L + 32 : 0), par_buf(lines ? 2 * (D + 1) : 0);
    float stage_buf[kStageOf<T>], x_buf[kStageOf<T>], dy_buf[kStageOf<T>];  // float16 staging
#pragma omp for schedule(static)
    for (i64 item = 0; item < N * G; ++item) {
      const i64 n = item / G, g = item % G;
      const float mu = mean[item], r = rstd[item];
      const T* px = x + item * L;
      const T* pdy = dy + item * L;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float> && kCostlyAct<ACT>) {
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

}  // namespace

namespace gn_kernels {

GN_GROUP_ENTRIES(nchw)

}  // namespace gn_kernels
