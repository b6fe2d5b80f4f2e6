// The C entry points of the CPU kernels (declared in gn_kernels.h): they pick the kernel file
// by op and layout and run small tensors on one thread.

#include "gn_kernels.h"

// (kSerialBelow: gn_tuning.h)

#ifndef GN_LEVEL
#define GN_LEVEL "unnamed"
#endif

extern "C" {

const char* gn_level() { return GN_LEVEL; }

// dtype: 0 float32, 1 bfloat16, 2 float16. Returns 0 on success.
int gn_forward(int dtype, const void* x, void* y, const float* w, const float* b, float* mean,
               float* rstd, i64 N, i64 C, i64 S, i64 G, int nhwc, float eps, int act,
               int nthreads) {
  if (N * C * S < kSerialBelow) nthreads = 1;
  return nhwc ? gn_kernels::nhwc_forward(dtype, x, y, w, b, mean, rstd, N, C, S, G, eps, act,
                                         nthreads)
              : gn_kernels::nchw_forward(dtype, x, y, w, b, mean, rstd, N, C, S, G, eps, act,
                                         nthreads);
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
  const gn_kernels::Running run{given_mean ? nullptr : running_mean, running_var, momentum};
  std::vector<float> scratch;
  if (!mean) {  // the caller needs no statistics; the kernels still do
    scratch.resize(2 * C);
    mean = scratch.data();
    rstd = mean + C;
  }
  return nhwc ? gn_kernels::bn_forward_rows(dtype, x, y, w, b, given_mean, given_var, mean, rstd,
                                            N * S, C, eps, run, act, nthreads)
              : gn_kernels::bn_forward_planes(dtype, x, y, w, b, given_mean, given_var, mean,
                                              rstd, N, C, S, eps, run, act, nthreads);
}

int gn_backward(int dtype, const void* dy, const void* x, const float* w, const float* b,
                const float* mean, const float* rstd, void* dx, float* dw, float* db, i64 N,
                i64 C, i64 S, i64 G, int nhwc, int act, int nthreads) {
  if (N * C * S < kSerialBelow) nthreads = 1;
  return nhwc ? gn_kernels::nhwc_backward(dtype, dy, x, w, b, mean, rstd, dx, dw, db, N, C, S, G,
                                          act, nthreads)
              : gn_kernels::nchw_backward(dtype, dy, x, w, b, mean, rstd, dx, dw, db, N, C, S, G,
                                          act, nthreads);
}

// The activation alone, elementwise on float32 (grad=1: its derivative), with the same inlined
// code as the fused kernels; for the accuracy tests of exp_nonpos and the activations.
int gn_activation(int act, int grad, const float* z, float* out, i64 n) {
  return dispatch_act(act, [&](auto a) {
    constexpr int A = decltype(a)::value;
    if (grad) {
#pragma omp simd
      for (i64 i = 0; i < n; ++i) out[i] = act_grad<A>(z[i]);
    } else {
#pragma omp simd
      for (i64 i = 0; i < n; ++i) out[i] = act_fwd<A>(z[i]);
    }
  });
}

}  // extern "C"
