// What the CPU kernel files export: one function per op and layout (gn_nchw.cpp, gn_nhwc.cpp,
// bn.cpp), and the C entry points of gn_entry.cpp, which choose among them. Including this
// header also gives the shared helpers of gn_common.h (element types, load/store), which the
// Python extension (gn_ops.cpp) uses to read small float16/bfloat16 tensors.
//
// Callers check shapes, dtypes and layouts; these functions trust their arguments. dtype: 0
// float32, 1 bfloat16, 2 float16; act: 0 none, 1 SiLU, 2 GELU, 3 ReLU (the list GN_ACTIVATIONS
// in gn_common.h); weight and bias are float32 (or null); mean and rstd float32, (N, G) for
// group norm and (C,) for batch norm. Each returns 0 on success, 1 for an unknown activation,
// 2 for an unknown dtype (dispatch_kernel's codes).
#pragma once

#include <cstdint>

#include "gn_common.h"

namespace gn_kernels {

// Running statistics, updated in place when given (training): as torch.nn.BatchNorm does,
// running = (1 - momentum) * running + momentum * batch value, with the unbiased variance.
struct Running {
  float* mean;
  float* var;
  double momentum;
};

// Group norm in one layout: nchw_* (gn_nchw.cpp) for x as (N, C, S), nhwc_* (gn_nhwc.cpp) for
// x as (N, S, C). Each file defines its pair with GN_GROUP_ENTRIES below.
using GroupForward = int(int dtype, const void* x, void* y, const float* w, const float* b,
                         float* mean, float* rstd, int64_t N, int64_t C, int64_t S, int64_t G,
                         float eps, int act, int nthreads);
using GroupBackward = int(int dtype, const void* dy, const void* x, const float* w,
                          const float* b, const float* mean, const float* rstd, void* dx,
                          float* dw, float* db, int64_t N, int64_t C, int64_t S, int64_t G,
                          int act, int nthreads);
GroupForward nchw_forward, nhwc_forward;
GroupBackward nchw_backward, nhwc_backward;

// Defines L##_forward and L##_backward (with the signatures above) in the file of layout L,
// whose kernel templates are forward_##L<T, ACT> and backward_##L<T, ACT>: each casts the
// pointers to the dtype's element type and runs the (dtype, activation) instance that
// dispatch_kernel picks.
#define GN_GROUP_ENTRIES(L)                                                                     \
  int L##_forward(int dtype, const void* x, void* y, const float* w, const float* b,          \
                  float* mean, float* rstd, int64_t N, int64_t C, int64_t S, int64_t G,      \
                  float eps, int act, int nthreads) {                                        \
    return dispatch_kernel(dtype, act, [&](auto t, auto a) {                                   \
      using T = typename decltype(t)::type;                                                    \
      forward_##L<T, decltype(a)::value>(static_cast<const T*>(x), static_cast<T*>(y), w, b,   \
                                         mean, rstd, N, C, S, G, eps, nthreads);               \
    });                                                                                        \
  }                                                                                            \
  int L##_backward(int dtype, const void* dy, const void* x, const float* w, const float* b,  \
                   const float* mean, const float* rstd, void* dx, float* dw, float* db,      \
                   int64_t N, int64_t C, int64_t S, int64_t G, int act, int nthreads) {       \
    return dispatch_kernel(dtype, act, [&](auto t, auto a) {                                   \
      using T = typename decltype(t)::type;                                                    \
      backward_##L<T, decltype(a)::value>(static_cast<const T*>(dy), static_cast<const T*>(x), \
                                          w, b, mean, rstd, static_cast<T*>(dx), dw, db, N, C, \
                                          S, G, nthreads);                                     \
    });                                                                                        \
  }

// batch norm forward, x as (N, C, S) ("planes") or (R, C) ("rows"); mean and rstd not null
int bn_forward_planes(int dtype, const void* x, void* y, const float* w, const float* b,
                      const float* given_mean, const float* given_var, float* mean, float* rstd,
                      int64_t N, int64_t C, int64_t S, float eps, const Running& run, int act,
                      int nthreads);
int bn_forward_rows(int dtype, const void* x, void* y, const float* w, const float* b,
                    const float* given_mean, const float* given_var, float* mean, float* rstd,
                    int64_t R, int64_t C, float eps, const Running& run, int act, int nthreads);

}  // namespace gn_kernels

// The C entry points, the only symbols a kernel library exports (it is compiled with hidden
// visibility; the extension finds these with dlsym).
#if defined(__GNUC__)
#define GN_EXPORT __attribute__((visibility("default")))
#else
#define GN_EXPORT
#endif

extern "C" {

// The instruction-set level the library was compiled for (e.g. "x86-64-v3").
GN_EXPORT const char* gn_level();

// Group/layer/instance norm forward: y, and mean/rstd (N, G) unless they are null (the caller
// needs no statistics). nhwc: x is (N, S, C) in memory, else (N, C, S).
GN_EXPORT int gn_forward(int dtype, const void* x, void* y, const float* w, const float* b, float* mean,
               float* rstd, int64_t N, int64_t C, int64_t S, int64_t G, int nhwc, float eps,
               int act, int nthreads);

// Batch norm forward (training when given_mean is null, else eval with the given statistics);
// writes mean and rstd of shape (C,) unless they are null. running_mean/running_var (float32,
// or null) are updated in place with momentum in training. nhwc: x is (N * S, C) in memory.
GN_EXPORT int bn_forward(int dtype, const void* x, void* y, const float* w, const float* b,
               const float* given_mean, const float* given_var, float* mean, float* rstd,
               int64_t N, int64_t C, int64_t S, int nhwc, float eps, int act, int nthreads,
               float* running_mean, float* running_var, double momentum);

// The backward of gn_forward: dx (x's dtype and layout), dw, db (float32), each null when not
// wanted, from dy (x's layout) and the forward's mean and rstd.
GN_EXPORT int gn_backward(int dtype, const void* dy, const void* x, const float* w, const float* b,
                const float* mean, const float* rstd, void* dx, float* dw, float* db, int64_t N,
                int64_t C, int64_t S, int64_t G, int nhwc, int act, int nthreads);

// The activation alone, elementwise on float32 (grad=1: its derivative), with the same inlined
// code as the fused kernels; for the accuracy tests of exp_nonpos and the activations.
GN_EXPORT int gn_activation(int act, int grad, const float* z, float* out, int64_t n);

}  // extern "C"
