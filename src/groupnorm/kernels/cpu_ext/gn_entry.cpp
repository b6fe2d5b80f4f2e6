// The C entry points of the CPU kernels (declared in gn_kernels.h): they pick the kernel file
// by op and layout and run small tensors on one thread. The rest of this file is what the
// ctypes binding of kernels/cpu_ext/__init__.py calls (packed arguments, the ABI version).

#include "gn_kernels.h"

// (kSerialBelow: gn_tuning.h)

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

// The same two entry points with their arguments packed in one array of 8-byte fields (Python
// fills it with struct.pack): ctypes converts each argument separately, which costs as much
// as a small call's arithmetic; one pointer costs one conversion.
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
