// Vector helpers of the CPU kernels (softmax row passes, exp2, dot products), written once over
// PyTorch's portable vector type at::vec::Vectorized<float>: AVX-512, AVX2 or the baseline (SSE2 on
// x86-64, NEON on aarch64) depending on the flags of the translation unit that includes this header.
// Every kernel source is compiled once per instruction set (csrc/sources.txt, tag "isa") with
// CPU_CAPABILITY naming it, so each copy lives in its own namespace (dalle_fast::cpu::<ISA>, and
// at::vec::<ISA> for PyTorch's types) and the dispatcher (cpu/dispatch.h) picks one at run time.
//
// Reductions (max, sum) keep one vector accumulator and reduce it once per row: a scalar
// `mx = max(mx, x[i])` loop is a dependency chain of one max per element.
#pragma once

#ifndef CPU_CAPABILITY
#error "cpu/vec.h belongs to the per-ISA kernel sources: define CPU_CAPABILITY (DEFAULT, AVX2 or AVX512)"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <vector>

namespace dalle_fast {
namespace cpu {
namespace CPU_CAPABILITY {

// Scratch buffers of the kernels start on a 64-byte boundary (a cache line, a 512-bit vector): at
// malloc's 16 bytes, rows of a GEMM's operand or output straddle lines, and where each buffer
// starts relative to the others (hence the speed) changed from one process to the next.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    void* p = ::operator new(n * sizeof(T), std::align_val_t(64));
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
};
using Buffer = std::vector<float, CacheLineAllocator<float>>;

using Vec = at::vec::Vectorized<float>;
using VecI = at::vec::Vectorized<int32_t>;
constexpr int64_t VEC = Vec::size();
constexpr float LOG2E = 1.44269504088896341f;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// 2^x for x <= 0; 0 below -127 (so 2^-inf, a masked score, is 0 with no test of its own); NaN
// stays NaN. Degree-6 minimax polynomial on the fraction f = x - round(x) in [-1/2, 1/2] (relative
// error < 3e-7), times 2^round(x) built in the exponent field (0 at round(x) = -127).
inline Vec exp2(Vec x) {
  x = at::vec::maximum(x, Vec(-127.f));  // propagates NaN
  // round to nearest even by adding and removing 1.5 * 2^23 (exact for |x| < 2^22): two adds on
  // every ISA, where the baseline x86-64 (SSE2) has no rounding instruction
  const Vec magic(12582912.f);
  const Vec r = (x + magic) - magic;
  const Vec f = x - r;
  Vec p(1.5403530393381608e-4f);
  p = at::vec::fmadd(p, f, Vec(1.3333558146428443e-3f));
  p = at::vec::fmadd(p, f, Vec(9.6181291076284772e-3f));
  p = at::vec::fmadd(p, f, Vec(5.5504108664821580e-2f));
  p = at::vec::fmadd(p, f, Vec(2.4022650695910071e-1f));
  p = at::vec::fmadd(p, f, Vec(6.9314718055994531e-1f));
  p = at::vec::fmadd(p, f, Vec(1.0f));
#if defined(CPU_CAPABILITY_DEFAULT)
  // the portable conversion is a C++ cast, undefined for NaN: zero those lanes (p is NaN there)
  const VecI ri = at::vec::convert_to_int_of_same_size(Vec::blendv(r, Vec(0.f), r != r));
#else
  const VecI ri = at::vec::convert_to_int_of_same_size(r);  // cvttps: NaN gives INT_MIN, p is NaN
#endif
  const Vec s = at::vec::cast<float>((ri + VecI(127)) << VecI(23));
  return p * s;
}

inline float exp2(float x) {
  float out;
  exp2(Vec(x)).store(&out, 1);
  return out;
}

inline float reduce_max(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

inline float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// max(x[0..n)), -inf for n == 0, NaN if any x[i] is NaN (softmax propagates it).
inline float max_of(const float* x, int64_t n) {
  Vec m(NEG_INF);
  int64_t i = 0;
  for (; i + VEC <= n; i += VEC) m = at::vec::maximum(m, Vec::loadu(x + i));
  if (i < n) m = at::vec::maximum(m, Vec::set(Vec(NEG_INF), Vec::loadu(x + i, n - i), n - i));
  return reduce_max(m);
}

// True when no x[i] (i < n) is NaN or an infinity: x - x is 0 for a finite x, NaN otherwise.
inline bool all_finite(const float* x, int64_t n) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + VEC <= n; i += VEC) {
    const Vec v = Vec::loadu(x + i);
    acc = acc + (v - v);
  }
  if (i < n) {
    const Vec v = Vec::loadu(x + i, n - i);  // the lanes past n load as 0
    acc = acc + (v - v);
  }
  return !std::isnan(reduce_sum(acc));
}

// 2^((s - m) * a) for the scores s of one vector, 0 where s == -inf (a masked score); NaN stays NaN.
inline Vec softmax_numerator(const Vec& s, const Vec& m, const Vec& a) {
  return Vec::blendv(Vec(0.f), exp2((s - m) * a), s != Vec(NEG_INF));  // != is unordered: NaN is live
}

// In place x[i] = 2^((x[i] - m) * a) for a > 0 and m = max of x, finite (every exponent <= 0,
// exactly 0 at the max whatever the scores' magnitude: the subtraction comes first); x[i] == -inf
// gives 0 (exp2 of -inf), a NaN stays NaN. Returns the sum.
inline float exp2_sum(float* x, int64_t n, float a, float m) {
  const Vec va(a), vm(m);
  Vec sum(0.f);
  int64_t i = 0;
  for (; i + VEC <= n; i += VEC) {
    const Vec e = exp2((Vec::loadu(x + i) - vm) * va);
    e.store(x + i);
    sum = sum + e;
  }
  if (i < n) {
    const Vec e = exp2((Vec::loadu(x + i, n - i) - vm) * va);
    e.store(x + i, n - i);
    sum = sum + Vec::set(Vec(0.f), e, n - i);
  }
  return reduce_sum(sum);
}

// x[i] *= a.
inline void scale_by(float* x, int64_t n, float a) {
  const Vec va(a);
  int64_t i = 0;
  for (; i + VEC <= n; i += VEC) (Vec::loadu(x + i) * va).store(x + i);
  if (i < n) (Vec::loadu(x + i, n - i) * va).store(x + i, n - i);
}

// x[0..n) of a float, bfloat16 or half array as floats.
template <typename T>
inline Vec load_float(const T* x) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(x);
  } else {
    Vec out;
    at::vec::load_to_float<T>(x, out);
    return out;
  }
}

// sum_d q[d] * k[d] (q float32, k float, bfloat16 or half).
template <typename T>
inline float dot(const float* q, const T* k, int64_t n) {
  Vec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + 2 * VEC <= n; i += 2 * VEC) {
    acc0 = at::vec::fmadd(Vec::loadu(q + i), load_float(k + i), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(q + i + VEC), load_float(k + i + VEC), acc1);
  }
  for (; i + VEC <= n; i += VEC) acc0 = at::vec::fmadd(Vec::loadu(q + i), load_float(k + i), acc0);
  float s = reduce_sum(acc0 + acc1);
  for (; i < n; ++i) s += q[i] * static_cast<float>(k[i]);
  return s;
}

// out[r] = sum_d a[r][d] * b[r][d] for R rows, accumulated d = 0, 1, ... with one fused multiply-add
// per term from 0: the rounding of a GEMM micro-kernel's entry of C = A B (k ascending), so that the
// two agree bit for bit. The R rows are independent chains (a scalar chain is latency-bound).
template <int64_t R>
inline void dots_in_gemm_order(const float* const* a, const float* const* b, int64_t n, float* out) {
  float acc[R] = {};
  for (int64_t d = 0; d < n; ++d)
    for (int64_t r = 0; r < R; ++r) acc[r] = std::fma(a[r][d], b[r][d], acc[r]);
  for (int64_t r = 0; r < R; ++r) out[r] = acc[r];
}

// y[d] += a * x[d] (y float32, x float, bfloat16 or half).
template <typename T>
inline void axpy(float* y, float a, const T* x, int64_t n) {
  const Vec va(a);
  int64_t i = 0;
  for (; i + VEC <= n; i += VEC) at::vec::fmadd(va, load_float(x + i), Vec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += a * static_cast<float>(x[i]);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace dalle_fast
