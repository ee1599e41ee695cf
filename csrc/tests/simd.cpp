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
    const float a = 0.125f * LOG2E, b = want_max * a;
    std::vector<float> y = x;
    const float sum = exp2_sum(y.data(), n, a, b);
    double want_sum = 0;
    for (int i = 0; i < n; ++i) {
      const double e = std::isinf(x[i]) ? 0.0 : std::exp2(double(x[i]) * a - b);
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
#if defined(__AVX512F__)
  std::printf("simd.h (AVX-512 path): %d failures\n", failures);
#else
  std::printf("simd.h (portable path): %d failures\n", failures);
#endif
  return failures == 0 ? 0 : 1;
}
