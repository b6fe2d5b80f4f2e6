// Batch norm forward with an optional activation: one set per channel, across all samples.
// Training: statistics over (N, S) of each channel, summed in float32 lanes that move into
// double every kRun values, around the channel's first value, checked afterwards for that
// value lying far from the mean (then summed again around the mean; see rows_moments and
// channel_stats). Eval (given_mean/given_var non-null): the given statistics. Then
// y = f((x - mean) * rstd * w + b), and mean/rstd are written (the backward, torch's
// native_batch_norm_backward, takes them). Shared helpers and numerics: gn_common.h;
// constants: gn_tuning.h.
//
// Two layouts: "planes", x as (N, C, S), and "rows", x as (R, C) with R = N * S (channels-last,
// or S = 1).
//
// Strategies of the planes layout (chosen by plan_bn_planes):
//   kPerChannel (maps of more than kBnShortRow values, unless a sweep): one channel at a time,
//     statistics then output, its rows read again from cache. Long rows vectorize well and a
//     channel's N rows fit the cache.
//   kRowBlocks (float32 maps of up to kBnShortRow values; or a sweep: maps of kBnShortRow to
//     4 kBnShortRow values in tensors of kBnSweepBytes or more): blocks of channels whose rows of
//     one sample are contiguous, each row summed into its channel's lanes, then the block
//     normalized row by row from L2. Walking one channel at a time would read rows C * S values
//     apart, strides the prefetcher does not follow; a sweep reads a large tensor in the order
//     it lies in memory.
//   kSpans (bfloat16/float16 maps of up to kBnShortRow values): blocks of channels whose rows of
//     one sample form one span of at most kStage values, every loop running over the whole span
//     with per-value copies of the per-channel numbers. Per-row loops of a few dozen values
//     spent their time in setup and partial vectors; in float32 the row blocks were faster.
// The rows layout has one strategy: chunks of rows summed per channel in register blocks
// (chunk_moments), combined in chunk order, then one output pass over the rows.

#include "gn_kernels.h"

namespace {

using gn_kernels::Running;

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

// mean and 1/sqrt(var + eps) from a channel's mean and centred sum of squares m2 over count
// values, the channel's shift (the pivot its sums were taken around) and its mean minus the
// shift, md, for the shifted apply ((x - shift) - md: x - shift is exact near the mean, and md
// keeps the digits that a float32 mean loses when the mean is large against the spread), and
// the update of channel c's running statistics
inline void finish_stats(double mean_d, double m2, double count, float eps, float* mean,
                         float* rstd, float pivot, float* shift, float* md, const Running& run,
                         i64 c) {
  if (m2 < 0.0) m2 = 0.0;
  *mean = static_cast<float>(mean_d);
  *rstd = rstd_of(m2, count, eps);
  const bool shifted = shift_needed(*mean, *rstd);
  *shift = shifted ? pivot : 0.0f;
  *md = shifted ? static_cast<float>(mean_d - static_cast<double>(pivot)) : *mean;
  if (run.mean) {
    const double m = run.momentum;
    const double unbiased = m2 / (count > 1.0 ? count - 1.0 : 1.0);
    run.mean[c] = static_cast<float>((1.0 - m) * run.mean[c] + m * mean_d);
    run.var[c] = static_cast<float>((1.0 - m) * run.var[c] + m * unbiased);
  }
}

// ---- strategy of the (N, C, S) forward -----------------------------------------------------

enum class BnPlanes { kPerChannel, kRowBlocks, kSpans };
struct BnPlanesPlan {
  BnPlanes how;
  bool sweep;  // kRowBlocks: one block per thread, read as one sweep over the samples
};

// Which (N, C, S) forward runs (the table at the top of this file says why).
template <typename T>
BnPlanesPlan plan_bn_planes(i64 N, i64 C, i64 S) {
  const bool sweep = S > kBnShortRow && S <= 4 * kBnShortRow &&
                     N * C * S * static_cast<i64>(sizeof(T)) >= kBnSweepBytes;
  if (S > kBnShortRow && !sweep) return {BnPlanes::kPerChannel, false};
  if (std::is_same_v<T, float> || sweep) return {BnPlanes::kRowBlocks, sweep};
  return {BnPlanes::kSpans, false};
}

template <typename T, int ACT>
void bn_forward_nchw(const T* x, T* y, const float* w, const float* b, const float* given_mean,
                     const float* given_var, float* mean_out, float* rstd_out, i64 N, i64 C,
                     i64 S, float eps, const Running& run, int nthreads) {
  // float16 rows go through float32 buffers (see with_f32), in blocks of up to kStage values
  const i64 step = std::is_same_v<T, F16> && S > kStage ? kStage : S;
  // per channel: the shift and the mean minus the shift (see finish_stats)
  std::vector<float> shift_c(C), md_c(C);

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
      // captures, every vector's sums went through the stack)
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
                 &mean_out[c], &rstd_out[c], pivot, &shift_c[c], &md_c[c], run, c);
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
                 &rstd_out[c], pivot, &shift_c[c], &md_c[c], run, c);
  };
  auto given_stats = [&](i64 c) {
    mean_out[c] = given_mean[c];
    rstd_out[c] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(given_var[c]) + eps));
    shift_c[c] = 0.0f;  // (a float32 mean: no digits below it to keep)
    md_c[c] = given_mean[c];
  };
  // y of row (n, c)
  auto apply_row = [&](i64 n, i64 c, float* in_buf, float* out_buf) {
    const float k = shift_c[c], md = md_c[c], r = rstd_out[c];
    const float a = w ? r * w[c] : r;
    const float h = b ? b[c] : 0.0f;
    for (i64 s0 = 0; s0 < S; s0 += step) {
      const i64 len = S - s0 < step ? S - s0 : step;
      with_f32(x + (n * C + c) * S + s0, len, in_buf, [&](const auto* qx) {
        via_f32(y + (n * C + c) * S + s0, len, out_buf, [&](auto* qy) {
          for_each_vec(len, [&](i64 s) {
            store(qy + s, act_fwd<ACT>(((load(qx[s]) - k) - md) * a + h));
          });
        });
      });
    }
  };

  const BnPlanesPlan plan = plan_bn_planes<T>(N, C, S);
  const bool sweep = plan.sweep;
  if (plan.how == BnPlanes::kPerChannel) {  // one channel at a time, read again from cache
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
  if (plan.how == BnPlanes::kRowBlocks) {
    // blocks of channels of about kBnRowBlockBytes, whose rows of one sample are contiguous;
    // each row summed into its channel's lane accumulator around the channel's first value
    // (flushed to double every kRun values; an ill-conditioned channel is summed again by
    // channel_stats), then the block normalized row by row from L2. (In a sweep a block is a
    // thread's share of the channels, at most kRowBlock.)
    constexpr i64 kRowBlock = kBnRowBlockMax;
    const i64 per_channel = N * S * static_cast<i64>(sizeof(T));
    const i64 cap = sweep ? kRowBlock : kBnRowBlockCap;
    i64 rb = sweep ? (C + nthreads - 1) / nthreads : kBnRowBlockBytes / per_channel;
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
  // kSpans: blocks of nc channels whose rows of one sample are one contiguous span of
  // L = nc * S <= kStage values, so every loop runs over a whole span with per-value copies of
  // the per-channel numbers (per-row loops of 49 values spent their time in setup and partial
  // vectors). Statistics: each value position keeps its own float32 sums over the samples
  // (flushed to the channel's double sums every kBnFlush samples), around the channel's first
  // value; a channel whose sums turn out ill-conditioned (that value far from its mean, see
  // rows_moments) is summed again by channel_stats. Then the block is normalized sample by
  // sample while it is still in L2 (N * L values).
  i64 cb = kStage / S;
  cb = cb > kBnBlock ? kBnBlock : cb;
  const i64 blocks = (C + cb - 1) / cb;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (i64 blk = 0; blk < blocks; ++blk) {
    const i64 c0 = blk * cb, nc = C - c0 < cb ? C - c0 : cb, L = nc * S;
    float in_buf[kStageOf<T>], out_buf[kStageOf<T>];
    // per-value numbers of the block
    alignas(64) float e0[kStage], e1[kStage], e2[kStage], e3[kStage];
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
      const float r = rstd_out[c];
      const float a = w ? r * w[c] : r;
      const float h = b ? b[c] : 0.0f;
      for (i64 k = j * S; k < (j + 1) * S; ++k) {
        e0[k] = md_c[c];
        e1[k] = a;
        e2[k] = h;
        e3[k] = shift_c[c];
      }
    }
    for (i64 n = 0; n < N; ++n) {
      with_f32(x + (n * C + c0) * S, L, in_buf, [&](const auto* qx) {
        via_f32(y + (n * C + c0) * S, L, out_buf, [&](auto* qy) {
#pragma omp simd
          for (i64 k = 0; k < L; ++k)
            store(qy + k, act_fwd<ACT>(((load(qx[k]) - e3[k]) - e0[k]) * e1[k] + e2[k]));
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
  // per channel: scale, bias, the mean minus the shift, the shift (see finish_stats)
  std::vector<float> coef_a(C), coef_h(C), coef_m(C), coef_k(C);
  if (given_mean) {
    for (i64 c = 0; c < C; ++c) {
      mean_out[c] = given_mean[c];
      rstd_out[c] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(given_var[c]) + eps));
      coef_k[c] = 0.0f;  // (a float32 mean: no digits below it to keep)
      coef_m[c] = given_mean[c];
    }
  } else {
    // rows in chunks of at most kBnChunkRowsMax (float32 partial sums), kBnMinChunks or more
    // chunks for the threads; the chunks do not depend on the thread count, so neither do the
    // sums (bit-identical results with 1 or 2 threads)
    i64 rows = (R + kBnMinChunks - 1) / kBnMinChunks;
    if (rows > kBnChunkRowsMax) rows = kBnChunkRowsMax;
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
                   &mean_out[c], &rstd_out[c], ref[c], &coef_k[c], &coef_m[c], run, c);
  }
  bool shifted = false;  // some channel needs the shifted apply (see shift_needed)
  for (i64 c = 0; c < C; ++c) {
    shifted |= coef_k[c] != 0.0f;
    coef_a[c] = w ? rstd_out[c] * w[c] : rstd_out[c];
    coef_h[c] = b ? b[c] : 0.0f;
  }
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (i64 s = 0; s < R; ++s)
    affine_act_row<ACT>(x + s * C, y + s * C, C, coef_m.data(), coef_k.data(), coef_a.data(),
                        coef_h.data(), shifted);
}

}  // namespace

namespace gn_kernels {

int bn_forward_planes(int dtype, const void* x, void* y, const float* w, const float* b,
                      const float* given_mean, const float* given_var, float* mean, float* rstd,
                      int64_t N, int64_t C, int64_t S, float eps, const Running& run, int act,
                      int nthreads) {
  return dispatch_kernel(dtype, act, [&](auto t, auto a) {
    using T = typename decltype(t)::type;
    bn_forward_nchw<T, decltype(a)::value>(static_cast<const T*>(x), static_cast<T*>(y), w, b,
                                           given_mean, given_var, mean, rstd, N, C, S, eps, run,
                                           nthreads);
  });
}

int bn_forward_rows(int dtype, const void* x, void* y, const float* w, const float* b,
                    const float* given_mean, const float* given_var, float* mean, float* rstd,
                    int64_t R, int64_t C, float eps, const Running& run, int act, int nthreads) {
  return dispatch_kernel(dtype, act, [&](auto t, auto a) {
    using T = typename decltype(t)::type;
    bn_forward_nhwc<T, decltype(a)::value>(static_cast<const T*>(x), static_cast<T*>(y), w, b,
                                           given_mean, given_var, mean, rstd, R, C, eps, run,
                                           nthreads);
  });
}

}  // namespace gn_kernels
