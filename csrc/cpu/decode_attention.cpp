// CPU decode attention: per (row, head) one pass over the allowed keys (decode_index.h) computing
// the scores, a softmax, one pass over the allowed values; float32 accumulation. Traffic: each
// allowed key and value row once (T + image keys, not the prefix); q/k_new/v_new once. Work items
// are (head, row) with rows innermost, so candidates sharing a prompt's text caches reuse it from
// the CPU cache.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/decode_index.h"
#include "cpu/decode.h"

namespace dalle_fast {
namespace cpu {
namespace {

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE half -> float without F16C (branch-free normal/subnormal select, vectorisable).
inline float f16_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  uint32_t nb = (two_w >> 4) + (0xE0u << 23);
  float normalized;
  std::memcpy(&normalized, &nb, 4);
  normalized *= 0x1.0p-112f;
  uint32_t db = (two_w >> 17) | (126u << 23);
  float denormalized;
  std::memcpy(&denormalized, &db, 4);
  denormalized -= 0.5f;
  uint32_t nbits, dbits;
  std::memcpy(&nbits, &normalized, 4);
  std::memcpy(&dbits, &denormalized, 4);
  const uint32_t r = sign | (two_w < (1u << 27) ? dbits : nbits);
  float out;
  std::memcpy(&out, &r, 4);
  return out;
}

template <typename T>
inline float load(const T* p, int64_t i);
template <>
inline float load<float>(const float* p, int64_t i) { return p[i]; }

struct BF16 { uint16_t x; };
struct F16 { uint16_t x; };
template <>
inline float load<BF16>(const BF16* p, int64_t i) { return bf16_to_float(p[i].x); }
template <>
inline float load<F16>(const F16* p, int64_t i) { return f16_to_float(p[i].x); }

// 2^x for x <= 0, degree-6 polynomial (relative error < 3e-7), vectorisable; ~0 below -126.
inline float fast_exp2(float x) {
  x = std::max(x, -126.0f);
  const float r = std::nearbyint(x);
  const float f = x - r;
  float p = 1.5403530393381608e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(r) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, 4);
  return p * s;
}

template <typename T>
void run(const DecodeArgs& a) {
  const int64_t B = a.batch, H = a.heads, D = a.head_dim;
  const LayoutParams& L = a.layout;
  const int64_t max_keys = max_decode_keys(L);
  const float qscale = a.scale * 1.44269504088896341f;  // scores in log2 units
  const bool shared = a.text_k.data != nullptr;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(max_keys));
    std::vector<float> qf(static_cast<size_t>(D)), acc(static_cast<size_t>(D));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / B, b = item % B;
      const int64_t pos = a.pos[b * a.pos_stride];
      const int64_t slot = pos - a.cache_offset;
      const int64_t row = b * H + h;
      T* kc = static_cast<T*>(a.k_cache.data) + b * a.k_cache.s0 + h * a.k_cache.s1;
      T* vc = static_cast<T*>(a.v_cache.data) + b * a.v_cache.s0 + h * a.v_cache.s1;
      // 1. append the new key/value at pos
      std::memcpy(kc + slot * a.k_cache.s2, static_cast<const T*>(a.k_new) + row * D, D * sizeof(T));
      std::memcpy(vc + slot * a.v_cache.s2, static_cast<const T*>(a.v_new) + row * D, D * sizeof(T));
      const T* tk = nullptr;
      const T* tv = nullptr;
      if (shared) {
        const int64_t p = a.prompt_index[b];
        tk = static_cast<const T*>(a.text_k.data) + p * a.text_k.s0 + h * a.text_k.s1;
        tv = static_cast<const T*>(a.text_v.data) + p * a.text_v.s0 + h * a.text_v.s1;
      }
      const T* qp = static_cast<const T*>(a.q) + row * D;
      for (int64_t d = 0; d < D; ++d) qf[d] = load(qp, d) * qscale;
      const DecodeKeys dk = decode_keys(L, pos);
      const int64_t n = dk.total();
      auto key_row = [&](int64_t j, bool value) -> const T* {
        if (j < dk.n_text && shared) return (value ? tv : tk) + j * (value ? a.text_v.s2 : a.text_k.s2);
        const int64_t s = dk.position(j) - a.cache_offset;
        return value ? vc + s * a.v_cache.s2 : kc + s * a.k_cache.s2;
      };
      // 2. scores
      float mx = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        const T* kr = key_row(j, false);
        float s = 0.f;
        for (int64_t d = 0; d < D; ++d) s += qf[d] * load(kr, d);
        scores[j] = s;
        mx = std::max(mx, s);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        const float p = fast_exp2(scores[j] - mx);
        scores[j] = p;
        sum += p;
      }
      // 3. weighted values
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const T* vr = key_row(j, true);
        const float p = scores[j];
        for (int64_t d = 0; d < D; ++d) acc[d] += p * load(vr, d);
      }
      float* o = a.out + row * D;
      const float inv = 1.f / sum;
      for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
    }
  });
}

}  // namespace

void decode_attention(const DecodeArgs& a) {
  switch (a.dtype) {
    case kF32: run<float>(a); break;
    case kBF16: run<BF16>(a); break;
    case kF16: run<F16>(a); break;
    default: break;
  }
}

}  // namespace cpu
}  // namespace dalle_fast
