// groupnorm_cpu_ops: the fused CPU kernels (gn_kernels.h) as a Python extension module, the
// CPU backend's only route to them.
//
// - fused_norm / batch_norm: a whole plain-eager call (group/layer/instance norm, batch norm):
//   the tensors checked here (None when the kernels cannot take them; the caller then validates
//   and routes the call elsewhere), the outputs allocated, the kernel run, an autograd node
//   recorded when gradients are needed, batch norm's running statistics updated.
// - forward / backward / batch_forward: plain kernel calls for the custom op's backend functions.
// - update_running: batch norm's running-statistics update (twin of kernels/running.py).
// - activation: the kernels' inlined activation, for batch norm's backward and the tests.
//
// Why a pybind11 module: one call costs about 0.8 us, where a torch.ops operator's boxed call
// cost about 3 us for six arguments, and the backward runs in the autograd engine without
// Python. It is compiled once by cpu_ext/build.py and calls the kernel library of the level
// that cpu_ext/__init__.py chose through a table of function pointers (load_kernels).

#include "gn_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/native_batch_norm_backward.h>
#include <ATen/TensorOperators.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <dlfcn.h>

#include <string>

namespace {

// The kernel library in use: one of libgnkernels-<level>.so, chosen by the Python side for this
// CPU and opened with load_kernels(). Every kernel call goes through this table.
struct KernelTable {
  decltype(&::gn_forward) gn_forward = nullptr;
  decltype(&::bn_forward) bn_forward = nullptr;
  decltype(&::gn_backward) gn_backward = nullptr;
  decltype(&::gn_activation) gn_activation = nullptr;
  decltype(&::gn_level) gn_level = nullptr;
};

KernelTable g_kernels;

const KernelTable& kernels() {
  TORCH_CHECK(g_kernels.gn_forward != nullptr,
              "groupnorm_cpu_ops: no kernel library is loaded (call load_kernels first)");
  return g_kernels;
}

// Open a kernel library and take its entry points; "" on success, else why not. The library
// replaced stays open (a call on another thread may still be in it).
std::string load_kernels(const std::string& path) {
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* err = dlerror();
    return err ? err : "dlopen failed";
  }
  KernelTable table;
  table.gn_forward = reinterpret_cast<decltype(table.gn_forward)>(dlsym(handle, "gn_forward"));
  table.bn_forward = reinterpret_cast<decltype(table.bn_forward)>(dlsym(handle, "bn_forward"));
  table.gn_backward = reinterpret_cast<decltype(table.gn_backward)>(dlsym(handle, "gn_backward"));
  table.gn_activation =
      reinterpret_cast<decltype(table.gn_activation)>(dlsym(handle, "gn_activation"));
  table.gn_level = reinterpret_cast<decltype(table.gn_level)>(dlsym(handle, "gn_level"));
  if (!table.gn_forward || !table.bn_forward || !table.gn_backward || !table.gn_activation ||
      !table.gn_level) {
    dlclose(handle);
    return path + " lacks the kernels' entry points";
  }
  g_kernels = table;
  return "";
}

// The level of the kernel library in use ("" when none is loaded).
std::string kernel_level() { return g_kernels.gn_level ? g_kernels.gn_level() : ""; }

using torch::autograd::collect_next_edges;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::set_history;
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
  const int rc = kernels().gn_forward(dtype_code(x), x.data_ptr(), y.data_ptr(),
                                      f32_ptr(w32),
                            f32_ptr(b32), f32_out(mean), f32_out(rstd), N, C, S, G,
                            static_cast<int>(layout), static_cast<float>(eps),
                            static_cast<int>(act), at::get_num_threads());
  TORCH_CHECK(rc == 0, "groupnorm_cpu::fused_norm: the forward kernel returned ", rc);
}

// With create_graph=True the engine runs the backward under grad mode, and the gradients must
// carry a graph themselves; the kernels' do not. Such a backward is computed by torch operations
// instead (groupnorm.kernels.cpu.differentiable_backward: the portable core's formula with the
// statistics recomputed from x), whose history autograd records. The ordinary backward, without
// grad mode, never comes here.
variable_list differentiable_grads(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                   const at::Tensor& b, const at::Tensor& mean,
                                   const at::Tensor& rstd, int64_t G, bool pool, bool given,
                                   int64_t act, double eps, bool need_dx, bool need_dw,
                                   bool need_db) {
  pybind11::gil_scoped_acquire gil;
  auto opt = [](const at::Tensor& t) {
    return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
  };
  std::string error;
  variable_list out(3);
  try {
    pybind11::tuple grads =
        pybind11::module_::import("groupnorm.kernels.cpu")
            .attr("differentiable_backward")(dy, x, opt(w), opt(b), mean, rstd, G, pool, given,
                                             act, eps, need_dx, need_dw, need_db);
    for (size_t i = 0; i < 3; ++i) {
      auto t = grads[i].cast<std::optional<at::Tensor>>();
      if (t.has_value()) out[i] = *t;
    }
  } catch (pybind11::error_already_set& e) {
    error = e.what();
  }
  TORCH_CHECK(error.empty(), error);
  return out;
}

// What the two autograd nodes below share: the forward's saved tensors (x, the float32 weight
// and bias, mean and rstd, and the params themselves where the float32 ones are converted
// copies), the activation and eps, and the params' dtypes, in which their gradients return.
struct NormBackward : public Node {
  SavedVariable x_, w32_, b32_, mean_, rstd_;
  SavedVariable w_, b_;  // the params themselves where w32/b32 are converted copies
  int64_t act = 0;
  double eps = 0.0;
  at::ScalarType w_dtype = at::kFloat, b_dtype = at::kFloat;

  // Records the forward's tensors and makes x, w, b (an absent one an invalid edge) the node's
  // next edges.
  void save(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& w32,
            const at::Tensor& b32, const at::Tensor& mean, const at::Tensor& rstd,
            int64_t act_code, double eps_value) {
    set_next_edges(collect_next_edges(x, w, b));
    x_ = SavedVariable(x, false);
    w32_ = SavedVariable(w32, false);
    b32_ = SavedVariable(b32, false);
    mean_ = SavedVariable(mean, false);
    rstd_ = SavedVariable(rstd, false);
    if (w.defined() && !w32.is_same(w)) w_ = SavedVariable(w, false);
    if (b.defined() && !b32.is_same(b)) b_ = SavedVariable(b, false);
    act = act_code;
    eps = eps_value;
    w_dtype = w.defined() ? w.scalar_type() : at::kFloat;
    b_dtype = b.defined() ? b.scalar_type() : at::kFloat;
  }

  void release_variables() override {
    x_.reset_data();
    w32_.reset_data();
    b32_.reset_data();
    mean_.reset_data();
    rstd_.reset_data();
    w_.reset_data();
    b_.reset_data();
  }

  // The gradients under create_graph=True (see differentiable_grads), from the params as the
  // forward received them.
  variable_list differentiable(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w32,
                               const at::Tensor& b32, const at::Tensor& mean,
                               const at::Tensor& rstd, int64_t G, bool pool, bool given,
                               bool need_dx, bool need_dw, bool need_db) {
    const at::Tensor w = w_.unpack(), b = b_.unpack();
    return differentiable_grads(dy, x, w.defined() ? w : w32, b.defined() ? b : b32, mean, rstd,
                                G, pool, given, act, eps, need_dx, need_dw, need_db);
  }

  // dw and db (float32 from the kernels) in the params' own dtypes
  void to_param_dtypes(at::Tensor& dw, at::Tensor& db) const {
    if (dw.defined() && w_dtype != at::kFloat) dw = dw.to(w_dtype);
    if (db.defined() && b_dtype != at::kFloat) db = db.to(b_dtype);
  }
};

// dy as the kernels (and torch's batch-norm backward) read it: in x's dtype and strides
at::Tensor in_layout_of(const at::Tensor& dy, const at::Tensor& x) {
  if (dy.scalar_type() != x.scalar_type() || dy.strides() != x.strides())
    return at::empty_like(x).copy_(dy);
  return dy;
}

// The autograd node of a fused group/layer/instance norm: a plain Node rather than a
// torch::autograd::Function, whose general machinery (saved-data dictionary, output wrapping)
// cost more than the kernels on small tensors. Saves what NormBackward holds (the memory target
// of benchmarks/README.md); returns the params' gradients in their own dtype.
struct GroupNormBackward : public NormBackward {
  int64_t G = 0, layout = 0;

  std::string name() const override { return "groupnorm::GroupNormBackward"; }

  variable_list apply(variable_list&& grads) override {
    const at::Tensor x = x_.unpack(), w32 = w32_.unpack(), b32 = b32_.unpack();
    const at::Tensor mean = mean_.unpack(), rstd = rstd_.unpack();
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    if (at::GradMode::is_enabled())
      return differentiable(grads[0], x, w32, b32, mean, rstd, G, false, false,
                            task_should_compute_output(0), task_should_compute_output(1),
                            task_should_compute_output(2));
    const at::Tensor dy = in_layout_of(grads[0], x);
    const int64_t N = x.size(0), C = x.size(1), S = x.numel() / (N * C);
    const auto f32 = x.options().dtype(at::kFloat);
    at::Tensor dx = task_should_compute_output(0) ? at::empty_like(x) : at::Tensor();
    at::Tensor dw =
        w32.defined() && task_should_compute_output(1) ? at::empty({C}, f32) : at::Tensor();
    at::Tensor db =
        b32.defined() && task_should_compute_output(2) ? at::empty({C}, f32) : at::Tensor();
    const int rc = kernels().gn_backward(dtype_code(x), dy.data_ptr(), x.data_ptr(), f32_ptr(w32),
                               f32_ptr(b32), f32_ptr(mean), f32_ptr(rstd),
                               dx.defined() ? dx.data_ptr() : nullptr, f32_out(dw), f32_out(db),
                               N, C, S, G, static_cast<int>(layout), static_cast<int>(act),
                               at::get_num_threads());
    TORCH_CHECK(rc == 0, "groupnorm_cpu::fused_norm: the backward kernel returned ", rc);
    to_param_dtypes(dw, db);
    return {dx, dw, db};
  }
};

// y with a GroupNormBackward node as its grad_fn
at::Tensor fused_norm_with_grad(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                int64_t G, double eps, int64_t act, int64_t layout) {
  at::Tensor y, w32, b32, mean, rstd;
  {
    at::NoGradGuard no_grad;  // (a conversion of the params records nothing)
    w32 = as_f32(w);
    b32 = as_f32(b);
    const auto stats = x.options().dtype(at::kFloat);
    y = at::empty_like(x);  // same strides as x (dense)
    mean = at::empty({x.size(0), G}, stats);
    rstd = at::empty({x.size(0), G}, stats);
    forward_kernel(x, y, w32, b32, mean, rstd, G, eps, act, layout);
  }
  auto node = c10::make_intrusive<GroupNormBackward>();
  node->save(x, w, b, w32, b32, mean, rstd, act, eps);
  node->G = G;
  node->layout = layout;
  set_history(y, node);
  return y;
}

// y, or None when the kernels cannot take the call as given: the caller then takes the full
// path, whose validation explains what is wrong.
std::optional<at::Tensor> fused_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias, int64_t G,
                                     double eps, int64_t act) {
  const at::Tensor w = weight.has_value() ? *weight : at::Tensor();
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  if (!x.device().is_cpu() || dtype_code(x) < 0 || x.dim() < 2 || x.numel() == 0 || G <= 0 ||
      x.size(1) % G != 0 || !param_ok(w, x) || !param_ok(b, x) || !valid_activation(act))
    return std::nullopt;
  const int layout = layout_of(x);
  if (layout < 0) return std::nullopt;
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || (w.defined() && w.requires_grad()) ||
                     (b.defined() && b.requires_grad()));
  if (grad) return fused_norm_with_grad(x, w, b, G, eps, act, layout);
  at::Tensor y = at::empty_like(x);  // no autograd: no statistics either
  const F32Copy w32 = f32_copy(w), b32 = f32_copy(b);
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / (N * C);
  const int rc = kernels().gn_forward(dtype_code(x), x.data_ptr(), y.data_ptr(), w32.ptr, b32.ptr, nullptr,
                            nullptr, N, C, S, G, layout, static_cast<float>(eps),
                            static_cast<int>(act), at::get_num_threads());
  TORCH_CHECK(rc == 0, "groupnorm_cpu::fused_norm: the forward kernel returned ", rc);
  return y;
}

// Batch norm's running-statistics update, the one formula every route uses (its twin in
// torch operations is kernels/running.py, for the routes that cannot call C++; the tests check
// that both give the same bits). Per channel, in double, from the batch's float32 mean and rstd:
//   var = max(rstd^-2 - eps, 0) * count / max(count - 1, 1)   (the unbiased variance)
//   running = running + momentum * (batch value - running)
// rounded once to the statistics' dtype (float32, bfloat16 or float16). The product is kept in a
// volatile so that no compiler fuses it into an FMA (torch's separate ops round it). false
// (nothing done) for tensors it does not take.
bool update_running(const at::Tensor& rm, const at::Tensor& rv, const at::Tensor& mean,
                    const at::Tensor& rstd, double eps, double momentum, int64_t count) {
  const auto t = rm.scalar_type();
  if ((t != at::kFloat && t != at::kBFloat16 && t != at::kHalf) || rv.scalar_type() != t ||
      !rm.device().is_cpu() || !rv.device().is_cpu() || !mean.device().is_cpu() ||
      !rstd.device().is_cpu() || !rm.is_contiguous() || !rv.is_contiguous() ||
      mean.scalar_type() != at::kFloat || rstd.scalar_type() != at::kFloat ||
      !mean.is_contiguous() || !rstd.is_contiguous() || rm.numel() != mean.numel() ||
      rv.numel() != mean.numel() || rstd.numel() != mean.numel() || rm.requires_grad() ||
      rv.requires_grad())
    return false;
  const double n = static_cast<double>(count);
  const double unbias = n / std::max(n - 1.0, 1.0);
  const float* pm = mean.data_ptr<float>();
  const float* pr = rstd.data_ptr<float>();
  auto run = [&](auto* m, auto* v) {
    for (int64_t c = 0; c < mean.numel(); ++c) {
      const double r = pr[c];
      double var = 1.0 / (r * r) - eps;
      var = (var < 0.0 ? 0.0 : var) * unbias;
      const double old_m = load(m[c]), old_v = load(v[c]);
      volatile double step_m = (static_cast<double>(pm[c]) - old_m) * momentum;
      volatile double step_v = (var - old_v) * momentum;
      store(m + c, static_cast<float>(old_m + step_m));
      store(v + c, static_cast<float>(old_v + step_v));
    }
  };
  if (t == at::kFloat)
    run(rm.data_ptr<float>(), rv.data_ptr<float>());
  else if (t == at::kBFloat16)
    run(static_cast<BF16*>(rm.data_ptr()), static_cast<BF16*>(rv.data_ptr()));
  else
    run(static_cast<F16*>(rm.data_ptr()), static_cast<F16*>(rv.data_ptr()));
  return true;
}

// the per-channel layout the batch-norm kernel reads: (N * S, C) rows (channels-last, or S = 1)
bool rows_layout(const at::Tensor& x, int layout) {
  return layout == 1 || x.numel() == x.size(0) * x.size(1);
}

// y, mean, rstd (float32, (C,)) of batch norm; training statistics, or the given ones.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_kernel(const at::Tensor& x,
                                                            const float* w32, const float* b32,
                                                            const float* given_mean,
                                                            const float* given_var, double eps,
                                                            int64_t act, int layout) {
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / (N * C);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(x), mean = at::empty({C}, f32), rstd = at::empty({C}, f32);
  const int rc = kernels().bn_forward(dtype_code(x), x.data_ptr(), y.data_ptr(), w32, b32, given_mean,
                            given_var, mean.data_ptr<float>(), rstd.data_ptr<float>(), N, C, S,
                            static_cast<int>(rows_layout(x, layout)), static_cast<float>(eps),
                            static_cast<int>(act), at::get_num_threads(), nullptr, nullptr, 0.0);
  TORCH_CHECK(rc == 0, "groupnorm_cpu_ops: the batch-norm kernel returned ", rc);
  return {y, mean, rstd};
}

// The kernels' activation (or with grad its derivative), elementwise on float32, with the
// kernels' inlined code: batch norm's backward uses the derivative (one thread, so the bits do
// not depend on the thread count), and the tests check its accuracy.
at::Tensor activation(const at::Tensor& z_in, int64_t act, bool grad) {
  TORCH_CHECK(z_in.scalar_type() == at::kFloat && z_in.device().is_cpu(),
              "groupnorm_cpu_ops.activation takes a float32 CPU tensor");
  const at::Tensor z = z_in.contiguous();
  at::Tensor out = at::empty_like(z);
  const int rc = kernels().gn_activation(static_cast<int>(act), static_cast<int>(grad),
                               z.data_ptr<float>(), out.data_ptr<float>(), z.numel());
  TORCH_CHECK(rc == 0, "groupnorm_cpu_ops.activation: unknown activation code ", act);
  return out;
}

// Batch norm's autograd: our forward kernel (with the activation fused). Without an
// activation the backward is torch's native_batch_norm_backward: for batch statistics from the
// saved mean and rstd, for given (running) statistics, which are constants, from their mean
// (float32 copy), the given variance in float32, and eps (dx = dy * w * rstd per channel). With an
// activation it first recomputes the activation's input z = w * x_hat + b and its derivative
// (activation() above), then the same formulas in float32 ATen operations. Saves x, the float32
// params, mean and rstd (and the given variance).
struct BatchNormBackward : public NormBackward {
  SavedVariable var_;
  bool given = false;

  std::string name() const override { return "groupnorm::BatchNormBackward"; }

  void release_variables() override {
    NormBackward::release_variables();
    var_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const at::Tensor x = x_.unpack(), w32 = w32_.unpack(), b32 = b32_.unpack();
    const at::Tensor mean = mean_.unpack(), rstd = rstd_.unpack();
    const bool need_dx = task_should_compute_output(0);
    const bool need_dw = w32.defined() && task_should_compute_output(1);
    const bool need_db = b32.defined() && task_should_compute_output(2);
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    if (at::GradMode::is_enabled())
      return differentiable(grads[0], x, w32, b32, mean, rstd, x.size(1), true, given, need_dx,
                            need_dw, need_db);
    const at::Tensor dy = in_layout_of(grads[0], x);
    at::Tensor dx, dw, db;
    if (act == ACT_NONE) {
      auto out = given ? at::native_batch_norm_backward(dy, x, w32, mean, var_.unpack(), {}, {},
                                                        false, eps, {need_dx, need_dw, need_db})
                       : at::native_batch_norm_backward(dy, x, w32, {}, {}, mean, rstd, true,
                                                        0.0, {need_dx, need_dw, need_db});
      dx = std::get<0>(out);
      dw = std::get<1>(out);
      db = std::get<2>(out);
    } else {
      // in float32 over the (N, C, S) view, with sums whose order does not depend on the thread
      // count: dz = dy * f'(z); db = sum dz; dw = sum dz * x_hat;
      // dx = rstd * w * (dz - mean(dz) - x_hat * mean(dz * x_hat)), or rstd * w * dz for given
      // statistics
      const int64_t N = x.size(0), C = x.size(1);
      const std::vector<int64_t> rows{N, C, x.numel() / (N * C)}, col{1, C, 1};
      const at::Tensor xhat =
          (x.reshape(rows).to(at::kFloat) - mean.view(col)) * rstd.view(col);
      at::Tensor z = w32.defined() ? xhat * w32.view(col) : xhat;
      if (b32.defined()) z = z + b32.view(col);
      const at::Tensor dz =
          dy.reshape(rows).to(at::kFloat) * activation(z.contiguous(), act, true).view(rows);
      const at::Tensor dz_xhat = dz * xhat;
      const std::vector<int64_t> dims{0, 2};
      if (need_db) db = dz.sum(dims);
      if (need_dw) dw = dz_xhat.sum(dims);
      if (need_dx) {
        const at::Tensor scale = (w32.defined() ? w32 * rstd : rstd).view(col);
        at::Tensor g = given ? dz : dz - dz.mean(dims, true) - xhat * dz_xhat.mean(dims, true);
        dx = at::empty_like(x);
        dx.view(rows).copy_(g * scale);
      }
    }
    to_param_dtypes(dw, db);
    if (!need_dx) dx = at::Tensor();
    if (!need_dw) dw = at::Tensor();
    if (!need_db) db = at::Tensor();
    return {dx, dw, db};
  }
};

// (y, mean, rstd) with a BatchNormBackward node as y's grad_fn; mean and rstd carry no gradient
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_with_grad(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& given_mean,
    const at::Tensor& given_var, double eps, int64_t act, int layout) {
  at::Tensor y, mean, rstd, w32, b32;
  {
    at::NoGradGuard no_grad;
    w32 = as_f32(w);
    b32 = as_f32(b);
    const F32Copy gm = f32_copy(given_mean), gv = f32_copy(given_var);
    std::tie(y, mean, rstd) =
        batch_kernel(x, f32_ptr(w32), f32_ptr(b32), gm.ptr, gv.ptr, eps, act, layout);
  }
  auto node = c10::make_intrusive<BatchNormBackward>();
  node->save(x, w, b, w32, b32, mean, rstd, act, eps);
  node->given = given_mean.defined();
  // (saved as torch's batch norm saves it: changing it in place before the backward is an
  // error there too)
  if (node->given && act == ACT_NONE) {
    node->var_ = SavedVariable(as_f32(given_var), false);
  }
  set_history(y, node);
  return {y, mean, rstd};
}

// Batch norm in plain eager mode: (y, mean, rstd), or None when the kernel cannot take the call
// (the caller then takes another route). Training uses the batch's statistics and updates the running ones
// (when given) with update_running; eval normalizes with the running statistics. With
// gradients: the C++ autograd node above.
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> batch_norm(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& running_mean,
                                     const std::optional<at::Tensor>& running_var, bool training,
                                     double momentum, double eps, int64_t act) {
  const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
  const at::Tensor rm = running_mean.value_or(at::Tensor());
  const at::Tensor rv = running_var.value_or(at::Tensor());
  if (!x.device().is_cpu() || dtype_code(x) < 0 || x.dim() < 2 || x.numel() == 0 ||
      !param_ok(w, x) || !param_ok(b, x) || !param_ok(rm, x) || !param_ok(rv, x) ||
      rm.defined() != rv.defined() || !valid_activation(act))
    return std::nullopt;
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / (N * C);
  if (training ? N * S == 1 : !rm.defined()) return std::nullopt;
  if (training && rm.defined() &&
      (rm.scalar_type() != rv.scalar_type() || rm.requires_grad() || rv.requires_grad()))
    return std::nullopt;  // (update_running takes one dtype for both; the Python update does)
  const int layout = layout_of(x);
  if (layout < 0) return std::nullopt;
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || (w.defined() && w.requires_grad()) ||
                     (b.defined() && b.requires_grad()));
  at::Tensor y, mean, rstd;
  if (grad) {
    std::tie(y, mean, rstd) = batch_norm_with_grad(x, w, b, training ? at::Tensor() : rm,
                                                   training ? at::Tensor() : rv, eps, act, layout);
  } else {
    const F32Copy w32 = f32_copy(w), b32 = f32_copy(b);
    F32Copy gm, gv;
    if (!training) gm = f32_copy(rm), gv = f32_copy(rv);
    std::tie(y, mean, rstd) = batch_kernel(x, w32.ptr, b32.ptr, gm.ptr, gv.ptr, eps, act, layout);
  }
  if (training && rm.defined()) {
    TORCH_CHECK(update_running(rm, rv, mean, rstd, eps, momentum, N * S),
                "groupnorm_cpu_ops.batch_norm: running statistics not updated");
  }
  return std::make_tuple(y, mean, rstd);
}

// ---- plain kernel calls (no autograd), for the custom op's backend functions and the tests ----

// float32 contiguous per-channel params, as the kernels read them
void check_f32_param(const at::Tensor& p, const at::Tensor& x, const char* name) {
  TORCH_CHECK(!p.defined() || (p.scalar_type() == at::kFloat && p.is_contiguous() &&
                               p.device().is_cpu() && p.numel() == x.size(1)),
              "groupnorm_cpu_ops: ", name, " must be a contiguous float32 CPU tensor of C values");
}

int checked_layout(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && dtype_code(x) >= 0 && x.dim() >= 2 && x.numel() > 0,
              "groupnorm_cpu_ops: x must be a non-empty float32/bfloat16/float16 CPU tensor "
              "(N, C, *)");
  const int layout = layout_of(x);
  TORCH_CHECK(layout >= 0, "groupnorm_cpu_ops: x must be contiguous or channels-last");
  return layout;
}

// y, mean, rstd ((N, G) float32) of group/layer/instance norm.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x,
                                                       const std::optional<at::Tensor>& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       int64_t G, double eps, int64_t act) {
  const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
  const int layout = checked_layout(x);
  check_f32_param(w, x, "weight");
  check_f32_param(b, x, "bias");
  TORCH_CHECK(G > 0 && x.size(1) % G == 0 && valid_activation(act),
              "groupnorm_cpu_ops.forward: bad groups or activation");
  const auto stats = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({x.size(0), G}, stats), rstd = at::empty({x.size(0), G}, stats);
  forward_kernel(x, y, w, b, mean, rstd, G, eps, act, layout);
  return {y, mean, rstd};
}

// dx (like x), dweight, dbias (float32), None where not asked for. dy is read with x's layout.
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
backward(const at::Tensor& dy_in, const at::Tensor& x, const std::optional<at::Tensor>& weight,
         const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
         int64_t G, int64_t act, bool need_dx, bool need_dw, bool need_db) {
  const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
  const int layout = checked_layout(x);
  check_f32_param(w, x, "weight");
  check_f32_param(b, x, "bias");
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / (N * C);
  TORCH_CHECK(G > 0 && C % G == 0 && valid_activation(act) && mean.scalar_type() == at::kFloat &&
                  rstd.scalar_type() == at::kFloat && mean.numel() == N * G &&
                  rstd.numel() == N * G,
              "groupnorm_cpu_ops.backward: bad groups, activation or statistics");
  const at::Tensor m = mean.contiguous(), r = rstd.contiguous();
  const at::Tensor dy = in_layout_of(dy_in, x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = need_dx ? at::empty_like(x) : at::Tensor();
  at::Tensor dw = need_dw && w.defined() ? at::empty({C}, f32) : at::Tensor();
  at::Tensor db = need_db && b.defined() ? at::empty({C}, f32) : at::Tensor();
  const int rc = kernels().gn_backward(dtype_code(x), dy.data_ptr(), x.data_ptr(), f32_ptr(w), f32_ptr(b),
                             m.data_ptr<float>(), r.data_ptr<float>(),
                             dx.defined() ? dx.data_ptr() : nullptr, f32_out(dw), f32_out(db), N,
                             C, S, G, layout, static_cast<int>(act), at::get_num_threads());
  TORCH_CHECK(rc == 0, "groupnorm_cpu_ops.backward: the kernel returned ", rc);
  auto opt = [](const at::Tensor& t) {
    return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
  };
  return {opt(dx), opt(dw), opt(db)};
}

// y, mean, rstd ((C,) float32) of batch norm; the given statistics (float32) when passed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& given_mean,
    const std::optional<at::Tensor>& given_var, double eps, int64_t act) {
  const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
  const at::Tensor gm = given_mean.value_or(at::Tensor()), gv = given_var.value_or(at::Tensor());
  const int layout = checked_layout(x);
  check_f32_param(w, x, "weight");
  check_f32_param(b, x, "bias");
  check_f32_param(gm, x, "given_mean");
  check_f32_param(gv, x, "given_var");
  TORCH_CHECK(gm.defined() == gv.defined() && valid_activation(act),
              "groupnorm_cpu_ops.batch_forward: pass both statistics or neither");
  TORCH_CHECK(gm.defined() || x.numel() > x.size(1),
              "groupnorm_cpu_ops.batch_forward: one value per channel");
  return batch_kernel(x, f32_ptr(w), f32_ptr(b), f32_ptr(gm), f32_ptr(gv), eps, act, layout);
}


}  // namespace

// A Python module rather than a torch.ops operator: a pybind11 call costs about 0.8 us where
// the dispatcher's boxed path for an operator of six arguments cost about 3 us (1x64x4x4 group
// norm: 3.9 us through torch.ops against torch.group_norm's 2.6 us).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("load_kernels", &load_kernels,
        "open a kernel library (libgnkernels-<level>.so) and use it from now on: \"\" on "
        "success, else the reason");
  m.def("kernel_level", &kernel_level, "the level of the kernel library in use");
  // (the GIL is released while the kernels run: other Python threads go
  // on; arguments are converted before and the result after, with the GIL held)
  m.def("fused_norm", &fused_norm, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "group/layer/instance norm with an optional activation (0 none, 1 silu, 2 gelu, 3 relu) "
        "through the fused kernels, or None when they cannot take the call");
  m.def("update_running", &update_running,
        "batch norm's running-statistics update (float32/bfloat16/float16 statistics, float32 "
        "batch mean and rstd); False (nothing done) for other tensors");
  m.def("batch_norm", &batch_norm, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "batch norm in plain eager mode through the fused kernel (running statistics updated, "
        "autograd in C++): (y, mean, rstd), or None when it cannot take the call");
  m.def("forward", &forward, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "group/layer/instance norm forward: (y, mean, rstd); float32 params");
  m.def("backward", &backward, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "group/layer/instance norm backward: (dx, dweight, dbias), None where not asked for");
  m.def("batch_forward", &batch_forward, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "batch norm forward: (y, mean, rstd), training or with given float32 statistics");
  m.def("activation", &activation,
        "the kernels' activation (grad=True: its derivative) on a float32 tensor");
}
