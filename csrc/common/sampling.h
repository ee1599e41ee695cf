// Sampling math shared by the CPU and CUDA samplers (host/device, no torch dependency).
//
// Definition of one draw (per row; dalle_fast/reference.py implements the same with a full sort):
//   x_i  = uncond_i + cfg_scale * (cond_i - uncond_i)  (fmaf; x_i = cond_i without guidance), i in
//          the vocab range [lo, hi); NaN or +inf there is an error, -inf means "never".
//   order: descending x, ties by ascending index ("rank"); temperature 0 returns rank 0 (argmax).
//   C1   = the first top_k ranks (all finite-weight candidates when top_k = 0).
//   w_i  = floor(2^40 * 2^((x_i - x_max) * inv_temperature * log2 e)): integer weights, so every
//          sum is exact and independent of summation order (bit-identical reruns, CPU == GPU).
//   C2   = the shortest rank prefix of C1 whose weight reaches ceil(top_p * sum_C1 w).
//   draw = with u = Philox4x32-10(key = seed, counter = (step, SAMPLE_DOMAIN)) as 64 bits,
//          t = floor(u * sum_C2 w / 2^64); the token is the first index of C2 (in index order)
//          where the running weight sum exceeds t. Depends only on (seed, step, this row).
#pragma once

#include <cstdint>

#include "common/mask.h"  // DF_HOST_DEVICE

#if defined(__CUDA_ARCH__)
#define DF_FMAF(a, b, c) __fmaf_rn((a), (b), (c))
#define DF_MULF(a, b) __fmul_rn((a), (b))
#define DF_SUBF(a, b) __fsub_rn((a), (b))
#else
#include <cmath>
#define DF_FMAF(a, b, c) std::fma((a), (b), (c))
#define DF_MULF(a, b) ((a) * (b))
#define DF_SUBF(a, b) ((a) - (b))
#endif

namespace dalle_fast {

constexpr int WEIGHT_BITS = 40;                 // fixed-point bits of a weight (max weight 2^40)
constexpr float WEIGHT_MIN_EXP2 = -41.0f;       // 2^e below 2^-41 floors to weight 0
constexpr uint32_t SAMPLE_DOMAIN = 0x534D504Cu; // "SMPL": Philox counter word 2
// Largest vocab range hi - lo: the weights (<= 2^WEIGHT_BITS each) of the whole range must sum
// exactly in 64 bits, (2^24 - 1) * 2^40 < 2^64; a wider range would wrap the sums and skew draws.
constexpr int64_t SAMPLE_MAX_RANGE = (int64_t(1) << (64 - WEIGHT_BITS)) - 1;

// Error codes of the sampler (per-row flag on CUDA; an exception on CPU).
constexpr int SAMPLE_OK = 0;
constexpr int SAMPLE_NONFINITE = 1;  // NaN or +inf in the (guided) logits inside the vocab range
constexpr int SAMPLE_EMPTY = 2;      // every logit in the vocab range is -inf

DF_HOST_DEVICE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
#endif
}

DF_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#endif
}

// Order-preserving map float -> uint32 (larger float -> larger key). -0 and +0 compare equal, so
// they get the same key (that of +0): ties between them are broken by index like any other tie
// (the reference's stable sort); distinct keys would rank every +0 above every -0.
DF_HOST_DEVICE uint32_t ordered_key(float f) {
  uint32_t u = float_bits(f);
  if (u == 0x80000000u) u = 0u;  // -0 -> +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
DF_HOST_DEVICE float key_to_float(uint32_t k) {
  return bits_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

// Classification of a guided logit: 0 finite or -inf, SAMPLE_NONFINITE for NaN / +inf.
DF_HOST_DEVICE bool is_bad_logit(float x) {
  const uint32_t u = float_bits(x);
  return (u & 0x7F800000u) == 0x7F800000u && u != 0xFF800000u;  // inf/NaN exponent, not -inf
}

// The guided logit: cond when there is no guidance, else uncond + scale * (cond - uncond); a token
// that is -inf (masked) in either stays -inf.
DF_HOST_DEVICE float guided_logit(float cond, float uncond, float cfg_scale, bool guided) {
  if (!guided) return cond;
  const uint32_t NEG_INF = 0xFF800000u;
  if (float_bits(cond) == NEG_INF || float_bits(uncond) == NEG_INF) return bits_float(NEG_INF);
  return DF_FMAF(cfg_scale, DF_SUBF(cond, uncond), uncond);
}

// True when cond/uncond/guided value of one token make the row invalid (NaN or +inf anywhere).
DF_HOST_DEVICE bool bad_token(float cond, float uncond, float x, bool guided) {
  return is_bad_logit(cond) || (guided && is_bad_logit(uncond)) || is_bad_logit(x);
}

// floor(2^40 * 2^e) for e <= 0, e = (x - x_max) * inv_temperature * log2(e). Degree-6 polynomial
// for 2^f on f in [-1/2, 1/2] (relative error < 3e-7) with explicit fma, so host and device give
// identical bits regardless of compiler contraction; 0 below 2^-41.
DF_HOST_DEVICE uint64_t weight_from_exp2(float e) {
  if (!(e >= WEIGHT_MIN_EXP2)) return 0;  // also catches -inf and NaN
  const float n = rintf(e);
  const float f = DF_SUBF(e, n);
  float p = 1.5403530393381608e-4f;
  p = DF_FMAF(p, f, 1.3333558146428443e-3f);
  p = DF_FMAF(p, f, 9.6181291076284772e-3f);
  p = DF_FMAF(p, f, 5.5504108664821580e-2f);
  p = DF_FMAF(p, f, 2.4022650695910071e-1f);
  p = DF_FMAF(p, f, 6.9314718055994531e-1f);
  p = DF_FMAF(p, f, 1.0f);
  // p in [0.70, 1.42]; multiply by 2^(WEIGHT_BITS + n) via the exponent field (exact)
  const int sh = WEIGHT_BITS + static_cast<int>(n);  // >= -1
  const float scaled = DF_MULF(p, bits_float(static_cast<uint32_t>(127 + sh) << 23));
  return static_cast<uint64_t>(scaled);  // truncation toward zero
}

// Weight of guided logit x given the row maximum and log2(e) / temperature.
DF_HOST_DEVICE uint64_t logit_weight(float x, float x_max, float exp2_scale) {
  return weight_from_exp2(DF_MULF(DF_SUBF(x, x_max), exp2_scale));
}

// High 64 bits of a * b.
DF_HOST_DEVICE uint64_t mulhi64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

DF_HOST_DEVICE void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox4x32-10 (Salmon et al., SC'11); returns the first two output words as one uint64
// (word 1 high). Counter-based: the output depends only on (key, counter).
DF_HOST_DEVICE uint64_t philox_u64(uint64_t key, uint64_t counter_lo, uint32_t c2, uint32_t c3) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  uint32_t c[4] = {static_cast<uint32_t>(counter_lo), static_cast<uint32_t>(counter_lo >> 32), c2, c3};
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(M0, c[0], hi0, lo0);
    mulhilo32(M1, c[2], hi1, lo1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
    k0 += W0;
    k1 += W1;
  }
  return (static_cast<uint64_t>(c[1]) << 32) | c[0];
}

// The 64 random bits of one draw.
DF_HOST_DEVICE uint64_t sample_random_u64(int64_t seed, int64_t step) {
  return philox_u64(static_cast<uint64_t>(seed), static_cast<uint64_t>(step), SAMPLE_DOMAIN, 0u);
}

// Scalar parameters of a sample call (validated by the caller).
struct SampleParams {
  int64_t batch;
  int64_t vocab;           // row length of logits
  int64_t lo, hi;          // vocab range [lo, hi)
  int64_t top_k;           // 0: no top-k
  double top_p;            // 1: no top-p
  float exp2_scale;        // log2(e) / temperature (unused when greedy)
  float cfg_scale;
  bool greedy;             // temperature == 0
  bool guided;             // uncond logits given
};

// ceil(top_p * total) as an integer weight target (>= 1 for top_p > 0 and total > 0).
DF_HOST_DEVICE uint64_t top_p_target(double top_p, uint64_t total) {
  const double t = ceil(top_p * static_cast<double>(total));
  uint64_t r = t < 1.0 ? 1ull : static_cast<uint64_t>(t);
  return r > total ? total : r;
}

}  // namespace dalle_fast
