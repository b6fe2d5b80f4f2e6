// The fused group/layer/instance norm of gn_kernels.cpp as one Python-callable function whose
// autograd node is C++: groupnorm_cpu_ops.fused_norm(x, w, b, G, eps, act) -> y or None.
//
// Why: through ctypes, each call also went through a Python autograd.Function, argument
// packing and Python-side allocations; on small tensors that cost about as much as the
// arithmetic (1x1280x8x8 with SiLU, forward and backward: 102 us, of which 53 us in the
// kernels). Here the call is one pybind11 call, the outputs are allocated in C++, and the
// backward runs in the autograd engine without Python. Same kernels, so the same bits.
//
// It is built against the installed torch's and Python's headers (about 25 s, once; cached like
// the plain library) and imported as an extension module. When that fails, the Python fast
// path keeps the ctypes library. Python checks the context (plain eager mode, plain tensor types) and the
// scalar arguments; the tensors' properties are checked here, where it costs less.

#include "gn_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: return -1;
  }
}

const float* f32_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
float* f32_out(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// the kernels take float32 contiguous params
at::Tensor as_f32(const at::Tensor& t) {
  if (!t.defined() || (t.scalar_type() == at::kFloat && t.is_contiguous())) return t;
  return t.to(at::kFloat).contiguous();
}

// A float32 view or copy of a small per-channel tensor (params, statistics; contiguous, in
// float32 or x's dtype): a plain loop instead of an ATen conversion, which costs ~1 us a call
// (a bfloat16 batch norm of 256 values took 11 us, torch 5). Conversions to float32 are exact.
struct F32Copy {
  std::vector<float> buf;
  const float* ptr = nullptr;
};

F32Copy f32_copy(const at::Tensor& t) {
  F32Copy out;
  if (!t.defined()) return out;
  if (t.scalar_type() == at::kFloat) {
    out.ptr = t.data_ptr<float>();
    return out;
  }
  const int64_t n = t.numel();
  out.buf.resize(n);
  if (t.scalar_type() == at::kBFloat16) {
    const auto* p = static_cast<const BF16*>(t.data_ptr());
    for (int64_t i = 0; i < n; ++i) out.buf[i] = load(p[i]);
  } else {
    const auto* p = static_cast<const F16*>(t.data_ptr());
    for (int64_t i = 0; i < n; ++i) out.buf[i] = load(p[i]);
  }
  out.ptr = out.buf.data();
  return out;
}

// 0 when x is (N, C, S) in memory, 1 when (N, S, C) (channels-last), -1 otherwise (the same
// answer as kernels/cpu.py's _ext_layout)
int layout_of(const at::Tensor& x) {
  if (x.is_contiguous()) return 0;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return 1;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return 1;
  if (x.dim() == 3 && x.transpose(1, 2).is_contiguous()) return 1;
  return -1;
}

// a param the kernels can take: absent, or a contiguous CPU vector of C values in float32 or in
// x's dtype
bool param_ok(const at::Tensor& p, const at::Tensor& x) {
  return !p.defined() ||
         (p.device().is_cpu() && p.dim() == 1 && p.size(0) == x.size(1) && p.is_contiguous() &&
          (p.scalar_type() == at::kFloat || p.scalar_type() == x.scalar_type()));
}

void forward_kernel(const at::Tensor& x, const at::Tensor& y, const at::Tensor& w32,
                    const at::Tensor& b32, const at::Tensor& mean, const at::Tensor& rstd,
                    int64_t G, double eps, int64_t act, int64_t layout) {
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / (N * C);
  const int rc = gn_forward(dtype_code(x), x.data_ptr(), y.data_ptr(), f32_ptr(w32),
                            f32_ptr(b32), f32_out(mean), f32_out(rstd), N, C, S, G,
                            static_cast<int>(layout), static_cast<float>(eps),
                            static_cast<int>(act), at::get_num_threads());
  TORCH_CHECK(rc == 0, "groupnorm_cpu::fused_norm: the forward kernel returned ", rc);
}

// Saves what the Python path saved (x, float32 weight and bias, mean, rstd: the memory target
// of benchmarks/README.md), and returns the params' gradients in their own dtype.
struct FusedNorm : public torch::autograd::Function<FusedNorm> {
  // (weight and bias come as optionals: autograd's Function rejects undefined tensors as
  // inputs, "tensor does not have a device")
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, int64_t G, double eps,
                            int64_t act, int64_t layout) {
    const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
    const at::Tensor w32 = as_f32(w), b32 = as_f32(b);
    const auto stats = x.options().dtype(at::kFloat);
    at::Tensor y = at::empty_like(x);  // same strides as x (dense)
    at::Tensor mean = at::empty({x.size(0), G}, stats), rstd = at::empty({x.size(0), G}, stats);
    forward_kernel(x, y, w32, b32, mean, rstd, G, eps, act, layout);
    ctx->save_for_backward({x, w32, b32, mean, rstd});
    ctx->saved_data["G"] = G;
    ctx->saved_data["act"] = act;
    ctx->saved_data["layout"] = layout;
    ctx->saved_data["w_dtype"] = static_cast<int64_t>(w.defined() ? w.scalar_type() : at::kFloat);
    ctx->saved_data["b_dtype"] = static_cast<int64_t>(b.defined() ? b.scalar_type() : at::kFloat);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // the kernels' gradients are not themselves differentiable: refuse rather than return a
    // second-order graph that silently lacks their terms (the Python path's
    // once_differentiable refuses one step later, at the second backward)
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "groupnorm: the fused CPU kernels have no double backward (create_graph=True "
                "was passed); for higher-order gradients use torch.nn.functional.group_norm");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w32 = saved[1], &b32 = saved[2];
    const at::Tensor &mean = saved[3], &rstd = saved[4];
    const int64_t G = ctx->saved_data["G"].toInt();
    const int64_t act = ctx->saved_data["act"].toInt();
    const int64_t layout = ctx->saved_data["layout"].toInt();
    at::Tensor dy = grads[0];
    if (dy.scalar_type() != x.scalar_type() || dy.strides() != x.strides())
      dy = at::empty_like(x).copy_(dy);  // the kernel reads dy with x's layout
    const int64_t N = x.size(0), C = x.size(1), S = x.numel() / (N * C);
    const auto f32 = x.options().dtype(at::kFloat);
    // (needs_input_grad counts tensor inputs only: an absent weight shifts the bias to edge 1)
    const size_t b_edge = w32.defined() ? 2 : 1;
    at::Tensor dx = ctx->needs_input_grad(0) ? at::empty_like(x) : at::Tensor();
    at::Tensor dw = w32.defined() && ctx->needs_input_grad(1) ? at::empty({C}, f32) : at::Tensor();
    at::Tensor db =
        b32.defined() && ctx->needs_input_grad(b_edge) ? at::empty({C}, f32) : at::Tensor();
    const int rc = gn_backward(dtype_code(x), dy.data_ptr(), x.data_ptr(), f32_ptr(w32),
                               f32_ptr(b32), f32_ptr(mean), f32_ptr(rstd),
                               dx.defined() ? dx.data_ptr() : nullptr, f32_out(dw), f32_out(db),
                               N, C, S, G, static_cast<int>(layout), static_cast<int>(act),
                               at::get_num_threads());
    TORCH_CHECK(rc == 0, "groupnorm_cpu::fused_norm: the backward kernel returned ", rc);
    const auto w_dtype = static_cast<at::ScalarType>(ctx->saved_data["w_dtype"].toInt());
    const auto b_dtype = static_cast<at::ScalarType>(ctx->saved_data["b_dtype"].toInt());
    if (dw.defined() && w_dtype != at::kFloat) dw = dw.to(w_dtype);
    if (db.defined() && b_dtype != at::kFloat) db = db.to(b_dtype);
    return {dx, dw, db, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// y, or None when the kernels cannot take the call as given: the caller then takes the full
// path, whose validation explains what is wrong.
std::optional<at::Tensor> fused_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias, int64_t G,
                                     double eps, int64_t act) {
  const at::Tensor w = weight.has_value() ? *weight : at::Tensor();
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  if (!x.device().is_cpu() || dtype_code(x) < 0 || x.dim() < 2 || x.numel() == 0 || G <= 0 ||
      x.size(1) % G != 0 || !param_ok(w, x) || !param_ok(b, x) || act < 0 || act > 3)
    return std::nullopt;
  const int layout = layout_of(x);
  if (layout < 0) return std::nullopt;
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || (w.defined() && w.requires_grad()) ||
                     (b.defined() && b.requires_grad()));
  if (grad) return FusedNorm::apply(x, weight, bias, G, eps, act, layout);
  at::Tensor y = at::empty_like(x);  // no autograd: no statistics either
  const F32Copy w32 = f32_copy(w), b32 = f32_copy(b);
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / (N * C);
  const int rc = gn_forward(dtype_code(x), x.data_ptr(), y.data_ptr(), w32.ptr, b32.ptr, nullptr,
                            nullptr, N, C, S, G, layout, static_cast<float>(eps),
                            static_cast<int>(act), at::get_num_threads());
  TORCH_CHECK(rc == 0, "groupnorm_cpu::fused_norm: the forward kernel returned ", rc);
  return y;
}

// The running-statistics update of batch norm for statistics in bfloat16/float16 on CPU, as
// functional.update_running_stats does with ATen operations (eight of them, ~6 us on a small
// tensor, more than torch's whole batch norm call): per channel, in double,
//   var = max(rstd^-2 - eps, 0) * count / max(count - 1, 1)  (the unbiased variance),
//   running += momentum * (batch value - running),
// rounded once to the statistics' dtype. Both paths call this for such statistics, so they
// give the same bits. false (nothing done) for anything else.
bool update_running_low(const at::Tensor& rm, const at::Tensor& rv, const at::Tensor& mean,
                        const at::Tensor& rstd, double eps, double momentum, int64_t count) {
  const auto t = rm.scalar_type();
  if ((t != at::kBFloat16 && t != at::kHalf) || rv.scalar_type() != t || !rm.device().is_cpu() ||
      !rv.device().is_cpu() || !mean.device().is_cpu() || !rstd.device().is_cpu() ||
      !rm.is_contiguous() || !rv.is_contiguous() || mean.scalar_type() != at::kFloat ||
      rstd.scalar_type() != at::kFloat || !mean.is_contiguous() || !rstd.is_contiguous() ||
      rm.numel() != mean.numel() || rv.numel() != mean.numel() || rstd.numel() != mean.numel() ||
      rm.requires_grad() || rv.requires_grad())
    return false;
  const double n = static_cast<double>(count);
  const double unbias = n / std::max(n - 1.0, 1.0);
  const float* pm = mean.data_ptr<float>();
  const float* pr = rstd.data_ptr<float>();
  auto run = [&](auto* m, auto* v) {
    for (int64_t c = 0; c < mean.numel(); ++c) {
      const double r = pr[c];
      double var = 1.0 / (r * r) - eps;
      var = (var > 0.0 ? var : 0.0) * unbias;
      const double old_m = load(m[c]), old_v = load(v[c]);
      store(m + c, static_cast<float>(old_m + momentum * (static_cast<double>(pm[c]) - old_m)));
      store(v + c, static_cast<float>(old_v + momentum * (var - old_v)));
    }
  };
  if (t == at::kBFloat16)
    run(static_cast<BF16*>(rm.data_ptr()), static_cast<BF16*>(rv.data_ptr()));
  else
    run(static_cast<F16*>(rm.data_ptr()), static_cast<F16*>(rv.data_ptr()));
  return true;
}

// Batch norm without autograd (the Python fast path keeps its autograd.Function for training
// with gradients): y, or None when the kernel cannot take the call (the full path explains).
// float32 running statistics are updated inside the kernel; running statistics in bfloat16 or
// float16 by update_running_low, which functional.update_running_stats also calls for them,
// so that both paths give the same bits. Python checks momentum and the scalar arguments.
std::optional<at::Tensor> batch_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& running_mean,
                                     const std::optional<at::Tensor>& running_var, bool training,
                                     double momentum, double eps, int64_t act) {
  const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
  const at::Tensor rm = running_mean.value_or(at::Tensor());
  const at::Tensor rv = running_var.value_or(at::Tensor());
  if (!x.device().is_cpu() || dtype_code(x) < 0 || x.dim() < 2 || x.numel() == 0 ||
      !param_ok(w, x) || !param_ok(b, x) || !param_ok(rm, x) || !param_ok(rv, x) ||
      rm.defined() != rv.defined() || act < 0 || act > 3)
    return std::nullopt;
  if (at::GradMode::is_enabled() && (x.requires_grad() || (w.defined() && w.requires_grad()) ||
                                     (b.defined() && b.requires_grad())))
    return std::nullopt;  // (autograd: the Python path)
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / (N * C);
  if (training ? N * S == 1 : !rm.defined()) return std::nullopt;
  const int layout = layout_of(x);
  if (layout < 0) return std::nullopt;
  const bool rows = layout == 1 || S == 1;  // (N * S, C) in memory
  const bool low = rm.defined() && (rm.scalar_type() != at::kFloat || rv.scalar_type() != at::kFloat);
  // low-precision running statistics that update_running_low cannot take (mixed dtypes, or
  // statistics that require grad): the full path, whose update_running_stats handles them
  if (training && low &&
      (rm.scalar_type() != rv.scalar_type() || rm.requires_grad() || rv.requires_grad()))
    return std::nullopt;
  F32Copy given_mean, given_var;
  at::Tensor mean, rstd;
  if (!training) {
    given_mean = f32_copy(rm);
    given_var = f32_copy(rv);
  }
  const bool update_inside = training && rm.defined() && !low;
  if (training && low) {  // the batch's statistics, for the update below
    mean = at::empty({C}, x.options().dtype(at::kFloat));
    rstd = at::empty({C}, x.options().dtype(at::kFloat));
  }
  const F32Copy w32 = f32_copy(w), b32 = f32_copy(b);
  at::Tensor y = at::empty_like(x);
  const int rc = bn_forward(
      dtype_code(x), x.data_ptr(), y.data_ptr(), w32.ptr, b32.ptr, given_mean.ptr,
      given_var.ptr, f32_out(mean), f32_out(rstd), N, C, S, static_cast<int>(rows),
      static_cast<float>(eps), static_cast<int>(act), at::get_num_threads(),
      update_inside ? rm.data_ptr<float>() : nullptr,
      update_inside ? rv.data_ptr<float>() : nullptr, momentum);
  TORCH_CHECK(rc == 0, "groupnorm_cpu_ops.batch_norm: the kernel returned ", rc);
  if (training && low) {
    TORCH_CHECK(update_running_low(rm, rv, mean, rstd, eps, momentum, N * S),
                "groupnorm_cpu_ops.batch_norm: running statistics not updated");
  }
  return y;
}

}  // namespace

// A Python module rather than a torch.ops operator: a pybind11 call costs about 0.8 us where
// the dispatcher's boxed path for an operator of six arguments cost about 3 us (1x64x4x4 group
// norm: 3.9 us through torch.ops against torch.group_norm's 2.6 us).
PYBIND11_MODULE(groupnorm_cpu_ops, m) {
  // (the GIL is released while the kernels run, as ctypes released it: other Python threads go
  // on; arguments are converted before and the result after, with the GIL held)
  m.def("fused_norm", &fused_norm, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "group/layer/instance norm with an optional activation (0 none, 1 silu, 2 gelu, 3 relu) "
        "through the fused kernels, or None when they cannot take the call");
  m.def("update_running_low", &update_running_low,
        "batch norm's running-statistics update for bfloat16/float16 statistics on CPU; False "
        "(nothing done) for other tensors");
  m.def("batch_norm", &batch_norm, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "batch norm without autograd through the fused kernel (running statistics updated), "
        "or None when it cannot take the call");
}
