// Group/layer/instance norm with an optional activation, forward and backward, for x stored
// channels-last, (N, S, C): a set (n, g) is D channels strided over S rows. The threads work on
// (sample, chunk of rows) items and vectorize over channels; each chunk's sums are float32,
// kept as (mean, M2) in double and combined in chunk order with Chan's formula, so the results
// do not depend on the thread count. Shared helpers and numerics: gn_common.h; constants:
// gn_tuning.h.
//
// Strategies (chosen by plan_forward_nhwc and plan_backward_nhwc):
//
//   forward, statistics flat (one group; float16 only from kFlatF16MinValues values): each
//     sample is one contiguous set, summed as a flat array in pieces of kPiece values whose
//     moments are combined in order (as nchw does). Why: no per-channel bookkeeping; float16
//     below the threshold is cheaper per channel, its row blocks converted in registers,
//     than staged through buffers.
//   forward, statistics per channel (otherwise): per chunk of rows, per-channel shifted sums
//     in register blocks of kBlock channels (rows_moments), combined per channel and then per
//     group.
//   forward, output with one mean per row (one group): two coefficient streams instead of
//     three. Not for groups: a short loop per group of few channels was much slower.
//   forward, per sample (N a multiple of the threads, or at least 4 per thread): each thread
//     takes whole samples, statistics then output, while the sample is in cache; otherwise the
//     threads share each phase (statistics, per-sample sums, output) inside one parallel
//     region, since starting a region wakes sleeping threads and a barrier does not.
//
//   backward, kPerSample (with an activation; one sample's S * C values within kKeepDzMax;
//     samples spread evenly over the threads): each thread runs whole samples with its own
//     dz buffer, so the second pass reads dz and x while the first left them in cache.
//   backward, kWhole (otherwise): both passes over the whole tensor in one parallel region;
//     dz kept between them when the tensor is within kKeepDzMax, else f'(z) computed again
//     (streaming a large dz buffer cost more than the derivative).

#include "gn_kernels.h"

namespace {

// Rows per chunk of the channels-last kernels: about kChunkValues values a chunk, kChunkRowsMin
// to kChunkRowsMax rows (short enough for float32 partial sums, enough chunks for the threads).
// A function of the shape alone: the chunks' float32 sums, and so the results, must not depend
// on the thread count (test_determinism checks it). The S rows are then shared evenly among
// the fewest chunks of at most that many rows, so that no thread gets a short last chunk
// while the other does the rest.
inline i64 rows_per_chunk(i64 C, i64 S) {
  i64 rows = kChunkValues / (C > 0 ? C : 1);
  if (rows > kChunkRowsMax) rows = kChunkRowsMax;
  if (rows < kChunkRowsMin) rows = kChunkRowsMin;
  const i64 chunks = S > rows ? (S + rows - 1) / rows : 1;
  return S > rows ? (S + chunks - 1) / chunks : rows;
}

// ---- strategies ----------------------------------------------------------------------------

struct NhwcForwardPlan {
  bool flat;        // statistics of each sample as one flat array (one group only)
  bool one_mean;    // output pass with one mean per row (one group only)
  bool per_sample;  // threads take whole samples; else they share each phase
};

// Which forward runs (the table at the top of this file says why).
template <typename T>
NhwcForwardPlan plan_forward_nhwc(i64 N, i64 C, i64 S, i64 G, int nthreads) {
  const bool flat = G == 1 && (!std::is_same_v<T, F16> || N * C * S >= kFlatF16MinValues);
  return {flat, G == 1, N % nthreads == 0 || N >= 4 * nthreads};
}

enum class NhwcBackward { kPerSample, kWhole };

// Which backward runs (the table at the top of this file says why). Both do the same
// arithmetic on each sample (its chunks do not depend on the driver), so the choice, and so
// the thread count, changes no bit.
template <int ACT>
NhwcBackward plan_backward_nhwc(i64 N, i64 C, i64 S, int nthreads) {
  const bool per_sample = ACT != ACT_NONE && S * C <= kKeepDzMax &&
                          (N % nthreads == 0 || N >= 4 * nthreads);
  return per_sample ? NhwcBackward::kPerSample : NhwcBackward::kWhole;
}

template <typename T, int ACT>
void forward_nhwc(const T* x, T* y, const float* w, const float* b, float* mean_out,
                  float* rstd_out, i64 N, i64 C, i64 S, i64 G, float eps, int nthreads) {
  const i64 D = C / G;
  const i64 rows = rows_per_chunk(C, S);
  const i64 chunks = (S + rows - 1) / rows;
  // per (n, c): z = ((x - k_c) - m_c) a_c + h_c, with k_c the shift of c's group (the group's
  // first value, x[n, 0, g D]) and m_c its mean minus k_c (the shifted apply: x - k is exact
  // near the mean, and m_c keeps the digits a float32 mean loses when the mean is large
  // against the spread); per (n, g): k and m
  std::vector<float> coef_a(N * C), coef_m(N * C), coef_k(N * C), group_mean(N * G),
      group_shift(N * G);
  // per sample: whether some group needs the shifted apply (else every k is 0, and the output
  // loop leaves out the shift's stream; see shift_needed)
  std::vector<char> sample_shifted(N, 0);
  std::vector<float> zeros(b ? 0 : C, 0.0f);
  const float* h = b ? b : zeros.data();
  const NhwcForwardPlan plan = plan_forward_nhwc<T>(N, C, S, G, nthreads);
  const bool flat = plan.flat;
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
      const float r = rstd_of(m.m2, static_cast<double>(L), eps);
      if (mean_out) mean_out[n] = muf;
      if (rstd_out) rstd_out[n] = r;
      const bool shifted = shift_needed(muf, r);
      sample_shifted[n] = shifted;
      const float shift = shifted ? load(x[n * L]) : 0.0f;
      const float md = shifted ? static_cast<float>(m.mean - static_cast<double>(shift)) : muf;
      group_mean[n] = md;
      group_shift[n] = shift;
      float* ca = coef_a.data() + n * C;
      float* cm = coef_m.data() + n * C;
      float* ck = coef_k.data() + n * C;
#pragma omp simd
      for (i64 c = 0; c < C; ++c) {
        ca[c] = w ? r * w[c] : r;
        cm[c] = md;
        ck[c] = shift;
      }
      return;
    }
    // per channel: mean and centred sum of squares from the chunks' (loops over channels, which
    // vectorize; a loop over groups of chained double adds was a large share of small calls)
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
      const bool shifted = shift_needed(muf, r);
      sample_shifted[n] |= shifted;
      const float shift = shifted ? ref[g * D] : 0.0f;  // x[n, 0, g D]
      const float md = shifted ? static_cast<float>(mu - static_cast<double>(shift)) : muf;
      group_mean[n * G + g] = md;
      group_shift[n * G + g] = shift;
      float* ca = coef_a.data() + n * C + g * D;
      float* cm = coef_m.data() + n * C + g * D;
      float* ck = coef_k.data() + n * C + g * D;
#pragma omp simd
      for (i64 d = 0; d < D; ++d) {
        ca[d] = w ? r * w[g * D + d] : r;
        cm[d] = md;
        ck[d] = shift;
      }
    }
  };

  const bool by_group = plan.one_mean;
  const i64 groups_per_block = D > kStage ? 1 : kStage / D;
  auto apply_chunk = [&](i64 item) {  // item = n * chunks + k
    const i64 n = item / chunks, k = item % chunks;
    const float* a = coef_a.data() + n * C;
    const float* m = coef_m.data() + n * C;
    const float* mk = coef_k.data() + n * C;
    const float* gm = group_mean.data() + n * G;
    const float* gk = group_shift.data() + n * G;
    const bool shifted = sample_shifted[n];
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
                const float md = gm[g0 + j], shift = gk[g0 + j];
                const i64 c0 = (g0 + j) * D;
                const float *ac = a + c0, *hc = h + c0;
                const auto* r = row + j * D;
                auto* o = out + j * D;
#pragma omp simd
                for (i64 d = 0; d < D; ++d)
                  store(o + d, act_fwd<ACT>(((load(r[d]) - shift) - md) * ac[d] + hc[d]));
              }
            });
          });
        }
        continue;
      }
      affine_act_row<ACT>(row0, out0, C, m, mk, a, h, shifted);
    }
  };

  if (plan.per_sample) {
    // sample by sample: each thread normalizes whole samples, reading a sample's x for the
    // output pass while its statistics pass has left it in cache
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
  // where a barrier finds them awake (a back-to-back harness does not see the difference;
  // calls from Python do; benchmarks/README.md, "Kernel design, and why").
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
// keep it.
template <typename T, int ACT>
void backward_nhwc(const T* dy, const T* x, const float* w, const float* b, const float* mean,
                   const float* rstd, T* dx, float* dw, float* db, i64 N, i64 C, i64 S, i64 G,
                   int nthreads) {
  // (one sample's worth at least: dw and db are read from the first, zeros when N is 0)
  std::vector<double> sdz((N > 0 ? N : 1) * C, 0.0), sdzx((N > 0 ? N : 1) * C, 0.0);
  if (plan_backward_nhwc<ACT>(N, C, S, nthreads) == NhwcBackward::kPerSample) {
#pragma omp parallel num_threads(nthreads)
    {
      // one dz buffer a thread, for all its samples, not zero-filled (the first pass writes
      // every value)
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

}  // namespace

namespace gn_kernels {

GN_GROUP_ENTRIES(nhwc)

}  // namespace gn_kernels
