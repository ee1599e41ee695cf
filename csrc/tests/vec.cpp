// Test of csrc/cpu/vec.h against double-precision loops, on lengths around the vector widths and
// with masked (-inf) entries. CMake builds it once per instruction set of the kernels (CPU_CAPABILITY
// and flags as for them); ctest runs the ones this CPU supports.
#include <cmath>
#include <cstdio>
#include <vector>

#include "cpu/vec.h"

// dot and axpy of float32 q against a float, bfloat16 or half row, against double sums
template <typename T>
int check_dot_axpy() {
  using namespace dalle_fast::cpu::CPU_CAPABILITY;
  int failures = 0;
  for (int n : {1, 7, 16, 33, 64, 100}) {
    std::vector<float> q(n), y(n, 1.f);
    std::vector<T> k(n);
    double want = 0;
    for (int i = 0; i < n; ++i) {
      q[i] = std::cos(0.3f * i);
      k[i] = static_cast<T>(std::sin(0.7f * i + 1.f));
      want += double(q[i]) * double(static_cast<float>(k[i]));
    }
    if (std::fabs(dot(q.data(), k.data(), n) - want) > 1e-5 * n) {
      std::printf("dot wrong at n=%d (%zu-byte elements)\n", n, sizeof(T));
      ++failures;
    }
    axpy(y.data(), 0.5f, k.data(), n);
    for (int i = 0; i < n; ++i)
      if (std::fabs(y[i] - (1.0 + 0.5 * double(static_cast<float>(k[i])))) > 1e-6) {
        std::printf("axpy wrong at %d of n=%d (%zu-byte elements)\n", i, n, sizeof(T));
        ++failures;
        break;
      }
  }
  return failures;
}

bool cpu_runs_this_isa() {
#if defined(CPU_CAPABILITY_AVX512)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#elif defined(CPU_CAPABILITY_AVX2)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return true;
#endif
}

int main() {
  using namespace dalle_fast::cpu::CPU_CAPABILITY;
  if (!cpu_runs_this_isa()) {
    std::printf("skipped: this CPU cannot run the instruction set of this build\n");
    return 77;  // ctest SKIP_RETURN_CODE
  }
  int failures = check_dot_axpy<float>() + check_dot_axpy<c10::BFloat16>() + check_dot_axpy<c10::Half>();
  // dots_in_gemm_order: bit for bit the sequential fused multiply-add chain
  {
    std::vector<float> a(77), b(77);
    for (int i = 0; i < 77; ++i) a[i] = std::sin(1.1f * i), b[i] = std::cos(0.9f * i) * 1e3f;
    const float* pa[3] = {a.data(), a.data() + 1, a.data() + 2};
    const float* pb[3] = {b.data(), b.data() + 2, b.data() + 1};
    float got[3];
    dots_in_gemm_order<3>(pa, pb, 70, got);
    for (int r = 0; r < 3; ++r) {
      float want = 0.f;
      for (int d = 0; d < 70; ++d) want = std::fma(pa[r][d], pb[r][d], want);
      if (got[r] != want) {
        std::printf("dots_in_gemm_order row %d: %.9g vs %.9g\n", r, got[r], want);
        ++failures;
      }
    }
  }
  for (int n : {0, 1, 5, 15, 16, 17, 31, 33, 256, 300}) {
    std::vector<float> x(n);
    for (int i = 0; i < n; ++i) x[i] = (i % 7 == 3) ? -INFINITY : 20.f * std::sin(1.7f * i);
    float want_max = -INFINITY;
    for (float v : x) want_max = v > want_max ? v : want_max;
    if (max_of(x.data(), n) != want_max) {
      std::printf("max_of wrong at n=%d\n", n);
      ++failures;
    }
    const float a = 0.125f * LOG2E;
    std::vector<float> y = x;
    const float sum = exp2_sum(y.data(), n, a, want_max);
    double want_sum = 0;
    for (int i = 0; i < n; ++i) {
      const double e = std::isinf(x[i]) ? 0.0 : std::exp2((double(x[i]) - want_max) * a);
      want_sum += e;
      if (std::fabs(y[i] - e) > 1e-6 * e) {  // the polynomial's bound is 3e-7
        std::printf("exp2_sum element %d wrong at n=%d: %g vs %g\n", i, n, y[i], e);
        ++failures;
      }
    }
    if (std::fabs(sum - want_sum) > 1e-6 * want_sum) {
      std::printf("exp2_sum sum wrong at n=%d: %g vs %g\n", n, sum, want_sum);
      ++failures;
    }
  }
  // NaN propagates (max_of returns it, exp2_sum keeps it), at every lane position and length
  for (int n : {1, 5, 16, 17, 40}) {
    for (int at : {0, n / 2, n - 1}) {
      std::vector<float> x(n, 1.f);
      x[at] = NAN;
      if (!std::isnan(max_of(x.data(), n))) {
        std::printf("max_of lost a NaN at %d of n=%d\n", at, n);
        ++failures;
      }
      if (!std::isnan(exp2_sum(x.data(), n, 1.f, 1.f)) || !std::isnan(x[at])) {
        std::printf("exp2_sum lost a NaN at %d of n=%d\n", at, n);
        ++failures;
      }
    }
  }
  // huge scores: the max's exponent is exactly 0 (subtraction before scaling), so nothing overflows
  {
    std::vector<float> x = {3e10f, 3e10f, 2.9999e10f, -INFINITY};
    const float mx = max_of(x.data(), 4);
    const float sum = exp2_sum(x.data(), 4, 1e-3f, mx);
    if (!(sum >= 2.f && sum <= 2.f + 1e-6f) || x[0] != 1.f || x[3] != 0.f) {
      std::printf("exp2_sum of huge scores wrong: sum %g, x0 %g\n", sum, x[0]);
      ++failures;
    }
  }
#define DALLE_FAST_STR2(x) #x
#define DALLE_FAST_STR(x) DALLE_FAST_STR2(x)
  std::printf("vec.h (%s, %d lanes): %d failures\n", DALLE_FAST_STR(CPU_CAPABILITY), static_cast<int>(VEC), failures);
  return failures == 0 ? 0 : 1;
}
