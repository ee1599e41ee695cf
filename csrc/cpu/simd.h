// exp2 and the two softmax row passes shared by the CPU kernels (forward, backward, decode).
//
// The row passes are written with AVX-512 intrinsics when the compiler targets it, else as
// `omp simd` loops. Why intrinsics: GCC keeps `mx = std::max(mx, x[i])` scalar (a 4-cycle vmaxss
// dependency chain per element: 60% of the forward kernel's non-GEMM time when measured), and the
// epilogue of an `omp simd reduction` is 16 dependent scalar adds from the stack (~20% of it),
// paid once per row and key run. Here each row costs one in-register tree reduction.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace dalle_fast {
namespace cpu {

constexpr float LOG2E = 1.44269504088896341f;

// 2^f for f in [-1/2, 1/2]: degree-6 minimax polynomial, relative error < 3e-7.
#define DALLE_FAST_EXP2_COEFFS                                                                  \
  1.5403530393381608e-4f, 1.3333558146428443e-3f, 9.6181291076284772e-3f, 5.5504108664821580e-2f, \
      2.4022650695910071e-1f, 6.9314718055994531e-1f, 1.0f

// 2^x for x <= 0 (~0 below -126), vectorisable inside `omp simd` loops.
inline float fast_exp2(float x) {
  constexpr float c[] = {DALLE_FAST_EXP2_COEFFS};
  x = std::max(x, -126.0f);
  const float r = std::nearbyint(x);
  const float f = x - r;
  float p = c[0];
  for (int i = 1; i < 7; ++i) p = p * f + c[i];
  const int32_t bits = (static_cast<int32_t>(r) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof(float));
  return p * s;
}

#if defined(__AVX512F__)
inline __m512 exp2_512(__m512 x) {
  constexpr float c[] = {DALLE_FAST_EXP2_COEFFS};
  x = _mm512_max_ps(_mm512_set1_ps(-126.0f), x);  // x second: a NaN x stays NaN (max_ps returns it)
  const __m512 r = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, r);
  __m512 p = _mm512_set1_ps(c[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(p, r);
}

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
#endif

// max(x[0..n)), -inf for n == 0, NaN if any x[i] is NaN (as softmax propagates it).
inline float max_of(const float* x, int64_t n) {
#if defined(__AVX512F__)
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;  // max_ps returns its second operand for a NaN: the NaN lanes are tracked aside
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, v);
  }
  if (i < n) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(k, x + i);
    nan |= _mm512_mask_cmp_ps_mask(k, v, v, _CMP_UNORD_Q);
    m = _mm512_mask_max_ps(m, k, m, v);
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(m);
#else
  float mx = -std::numeric_limits<float>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    mx = x[i] > mx ? x[i] : mx;
    nan |= x[i] != x[i];
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : mx;
#endif
}

// In place x[i] = 2^((x[i] - m) * a) for a > 0 and m = max of x (so that every exponent is <= 0 and
// exactly 0 at the max, whatever the scores' magnitude: the subtraction comes first), with
// x[i] == -inf (a masked score) giving 0 and a NaN staying NaN; returns the sum.
inline float exp2_sum(float* x, int64_t n, float a, float m) {
  constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
#if defined(__AVX512F__)
  const __m512 va = _mm512_set1_ps(a), vm = _mm512_set1_ps(m), ninf = _mm512_set1_ps(NEG_INF);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - i);
    const __m512 s = _mm512_maskz_loadu_ps(k, x + i);
    const __mmask16 live = _mm512_mask_cmp_ps_mask(k, s, ninf, _CMP_NEQ_UQ);  // unordered: NaN is live
    const __m512 e = _mm512_maskz_mov_ps(live, exp2_512(_mm512_mul_ps(_mm512_sub_ps(s, vm), va)));
    _mm512_mask_storeu_ps(x + i, k, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
#else
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float e = x[i] == NEG_INF ? 0.f : fast_exp2((x[i] - m) * a);
    x[i] = e;
    sum += e;
  }
  return sum;
#endif
}

}  // namespace cpu
}  // namespace dalle_fast
