// Test of csrc/cpu/simd.h against double-precision loops, on lengths around the 16-lane width and
// with masked (-inf) entries. CMake builds it twice: with the kernels' -march (the AVX-512 path
// where the machine has it) and without (the portable `omp simd` path).
#include <cmath>
#include <cstdio>
#include <vector>

#include "cpu/simd.h"

int main() {
  using namespace dalle_fast::cpu;
  int failures = 0;
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
#if defined(__AVX512F__)
  std::printf("simd.h (AVX-512 path): %d failures\n", failures);
#else
  std::printf("simd.h (portable path): %d failures\n", failures);
#endif
  return failures == 0 ? 0 : 1;
}
