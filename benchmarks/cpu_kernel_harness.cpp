// Times one CPU kernel alone, without Python or torch: the "harness" numbers of
// benchmarks/README.md. It calls the kernels' C entry points (gn_kernels.h) and is linked with
// the kernel sources:
//
//   K=src/groupnorm/kernels/cpu_ext
//   g++ -O3 -march=native -fopenmp -std=c++17 -fno-math-errno -fno-trapping-math -I$K
//       benchmarks/cpu_kernel_harness.cpp $K/gn_entry.cpp $K/gn_nchw.cpp $K/gn_nhwc.cpp
//       $K/bn.cpp -o /tmp/harness                                 (one command line)
//   /tmp/harness DTYPE ACT N C S G LAYOUT PASS REPS [THREADS]
//
// To time another version of the kernels against this one on the same machine, build a second
// binary from that version's sources; a version kept in one file (before the kernels were
// split by op) is built with -DKERNELS='"path/to/gn_kernels.cpp"' and without the other sources.
//
// DTYPE 0 float32, 1 bfloat16, 2 float16; ACT 0 none, 1 silu, 2 gelu, 3 relu; the input is
// (N, C, S) with G groups, LAYOUT 0 (N, C, S) in memory or 1 (N, S, C); PASS 0 forward, 1
// backward, 2 batch norm's forward (training statistics; G is ignored); THREADS threads (1 if
// not given). Prints the median and 20th percentile of REPS calls, and a checksum
// of the output (y for the forward, dx for the backward) and a hash of all its bits with the
// statistics or the weight and bias gradients, to compare builds by. Buffers are
// reused between calls, so unlike the Python benchmark no call faults in fresh pages, and
// start on a 64-byte line, as torch's CPU allocator places tensors (malloc's 16-byte offset
// made the line-aligned walks of the short-row kernels look slower than in torch).
#if defined(KERNELS)
#include KERNELS
#else
#include "gn_kernels.h"
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <random>
#include <vector>

namespace {

// 64-byte aligned storage for std::vector
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64}));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t{64}); }
  bool operator==(const Aligned64&) const { return true; }
  bool operator!=(const Aligned64&) const { return false; }
};
using Bytes = std::vector<char, Aligned64<char>>;

template <typename T>
void fill(Bytes& buf, const std::vector<float>& v) {
  T* p = reinterpret_cast<T*>(buf.data());
  for (size_t i = 0; i < v.size(); ++i) store(p + i, v[i]);
}

template <typename T>
double checksum(const Bytes& buf, i64 n) {
  const T* p = reinterpret_cast<const T*>(buf.data());
  double sum = 0.0;
  for (i64 i = 0; i < n; i += 97) sum += load(p[i]);
  return sum;
}

// FNV-1a of n bytes, continuing from h: equal only when every bit of the results is equal
uint64_t fnv(const void* p, size_t n, uint64_t h = 14695981039346656037ull) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ c[i]) * 1099511628211ull;
  return h;
}

template <typename T>
int run(int act, i64 N, i64 C, i64 S, i64 G, int layout, int pass, int reps, int threads) {
  const i64 n = N * C * S;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> xf(n), dyf(n), w(C), b(C);
  for (auto* v : {&xf, &dyf, &w, &b})
    for (auto& e : *v) e = normal(rng);
  Bytes x(n * sizeof(T)), y(n * sizeof(T)), dy(n * sizeof(T)), dx(n * sizeof(T));
  fill<T>(x, xf);
  fill<T>(dy, dyf);
  std::vector<float> mean(N * G + C), rstd(N * G + C), dw(C), db(C);
  const int dtype = std::is_same_v<T, float> ? 0 : (std::is_same_v<T, BF16> ? 1 : 2);
  auto forward = [&] {
    gn_forward(dtype, x.data(), y.data(), w.data(), b.data(), mean.data(), rstd.data(), N, C, S,
               G, layout, 1e-5f, act, threads);
  };
  forward();  // (the statistics the backward needs)
  std::vector<double> times;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    if (pass == 0)
      forward();
    else if (pass == 2)
      bn_forward(dtype, x.data(), y.data(), w.data(), b.data(), nullptr, nullptr, mean.data(),
                 rstd.data(), N, C, S, layout, 1e-5f, act, threads, nullptr, nullptr, 0.0);
    else
      gn_backward(dtype, dy.data(), x.data(), w.data(), b.data(), mean.data(), rstd.data(),
                  dx.data(), dw.data(), db.data(), N, C, S, G, layout, act, threads);
    times.push_back(
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  // bits: a hash of the whole output and its statistics (forward) or gradients (backward)
  uint64_t bits = fnv((pass == 1 ? dx : y).data(), n * sizeof(T));
  if (pass == 1) {
    bits = fnv(dw.data(), C * sizeof(float), fnv(db.data(), C * sizeof(float), bits));
  } else {
    const i64 stats = pass == 2 ? C : N * G;
    bits = fnv(mean.data(), stats * sizeof(float), fnv(rstd.data(), stats * sizeof(float), bits));
  }
  std::printf("%.1f us (p20 %.1f) checksum %.6g bits %016llx\n", times[times.size() / 2],
              times[times.size() / 5], checksum<T>(pass == 1 ? dx : y, n),
              static_cast<unsigned long long>(bits));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 10 && argc != 11) {
    std::fprintf(stderr, "usage: %s DTYPE ACT N C S G LAYOUT PASS REPS [THREADS]\n", argv[0]);
    return 2;
  }
  const int dtype = std::atoi(argv[1]), act = std::atoi(argv[2]);
  const i64 N = std::atol(argv[3]), C = std::atol(argv[4]), S = std::atol(argv[5]);
  const i64 G = std::atol(argv[6]);
  const int layout = std::atoi(argv[7]), pass = std::atoi(argv[8]), reps = std::atoi(argv[9]);
  const int threads = argc == 11 ? std::atoi(argv[10]) : 1;
  if (N < 1 || C < 1 || S < 1 || G < 1 || C % G || reps < 1 || dtype < 0 || dtype > 2 ||
      threads < 1) {
    std::fprintf(stderr, "bad arguments: C must divide by G, all sizes positive\n");
    return 2;
  }
  switch (dtype) {
    case 0: return run<float>(act, N, C, S, G, layout, pass, reps, threads);
    case 1: return run<BF16>(act, N, C, S, G, layout, pass, reps, threads);
    default: return run<F16>(act, N, C, S, G, layout, pass, reps, threads);
  }
}
