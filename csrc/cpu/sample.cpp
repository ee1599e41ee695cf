// CPU sampler: one row per task; passes over the row's vocab range: guided logits + max + checks,
// top-k threshold by std::nth_element on order keys (O(V), no sort), integer weights, top-p
// threshold by a 4-pass 8-bit radix select on the order keys weighted by mass (O(V)), and the
// inverse-CDF draw in index order. Traffic: the row's logits once (twice with guidance), scratch
// in L1/L2. Semantics in common/sampling.h.
#pragma GCC optimize("fp-contract=off")  // identical float bits to the CUDA sampler

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/decode.h"

namespace dalle_fast {
namespace cpu {
namespace {

constexpr int RADIX_BITS = 8;
constexpr int RADIX_BINS = 1 << RADIX_BITS;

struct Scratch {
  std::vector<float> x;
  std::vector<uint32_t> key, sel;
  std::vector<uint64_t> w;
};

// Largest order key tau such that the mass of C1 elements with key >= tau reaches target; also
// returns the mass strictly above tau.
uint32_t radix_select_mass(const uint32_t* key, const uint64_t* w, int64_t n, uint64_t target,
                           uint64_t* mass_above) {
  uint32_t prefix = 0, mask = 0;
  uint64_t above = 0;
  uint64_t hist[RADIX_BINS];
  for (int shift = 32 - RADIX_BITS; shift >= 0; shift -= RADIX_BITS) {
    std::fill(hist, hist + RADIX_BINS, 0ull);
    for (int64_t i = 0; i < n; ++i) {
      if (w[i] != 0 && (key[i] & mask) == prefix) hist[(key[i] >> shift) & (RADIX_BINS - 1)] += w[i];
    }
    int bin = RADIX_BINS - 1;
    for (; bin > 0; --bin) {
      if (above + hist[bin] >= target) break;
      above += hist[bin];
    }
    prefix |= static_cast<uint32_t>(bin) << shift;
    mask |= static_cast<uint32_t>(RADIX_BINS - 1) << shift;
  }
  *mass_above = above;
  return prefix;
}

void sample_row(const SampleParams& p, const float* cond, const float* uncond, int64_t seed, int64_t step,
                int64_t* token, int32_t* error, Scratch& s) {
  const int64_t n = p.hi - p.lo;
  s.x.resize(n);
  s.key.resize(n);
  s.w.resize(n);
  float* x = s.x.data();
  uint32_t* key = s.key.data();
  uint64_t* w = s.w.data();
  // 1. guided logits, max / argmax (first), finite count, checks
  float mx = -INFINITY;
  int64_t arg = -1, finite = 0;
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    const float c = cond[p.lo + i], u = p.guided ? uncond[p.lo + i] : 0.f;
    const float v = guided_logit(c, u, p.cfg_scale, p.guided);
    bad |= bad_token(c, u, v, p.guided);
    x[i] = v;
    if (v > -INFINITY) {
      ++finite;
      if (v > mx) {
        mx = v;
        arg = i;
      }
    }
  }
  *token = p.lo;
  if (bad) {
    *error = SAMPLE_NONFINITE;
    return;
  }
  if (finite == 0) {
    *error = SAMPLE_EMPTY;
    return;
  }
  *error = SAMPLE_OK;
  if (p.greedy) {
    *token = p.lo + arg;
    return;
  }
  const uint32_t NEG_INF_KEY = ordered_key(-INFINITY);
  for (int64_t i = 0; i < n; ++i) key[i] = ordered_key(x[i]);
  // 2. C1: top-k by threshold (k-th largest key) and an index cutoff among ties
  uint32_t tau_k = NEG_INF_KEY + 1;  // every finite key
  int64_t cut_k = n;                  // ties at tau_k admitted up to this index (inclusive)
  if (p.top_k > 0 && p.top_k < finite) {
    s.sel.resize(finite);
    int64_t f = 0;
    for (int64_t i = 0; i < n; ++i)
      if (key[i] != NEG_INF_KEY) s.sel[f++] = key[i];
    std::nth_element(s.sel.begin(), s.sel.begin() + (p.top_k - 1), s.sel.end(), std::greater<uint32_t>());
    tau_k = s.sel[p.top_k - 1];
    int64_t gt = 0;
    for (int64_t i = 0; i < n; ++i) gt += key[i] > tau_k;
    int64_t need = p.top_k - gt;  // >= 1 ties admitted, in index order
    for (int64_t i = 0; i < n; ++i) {
      if (key[i] == tau_k && --need == 0) {
        cut_k = i;
        break;
      }
    }
  }
  // 3. integer weights of C1
  uint64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool in = key[i] > tau_k || (key[i] == tau_k && i <= cut_k);
    w[i] = in ? logit_weight(x[i], mx, p.exp2_scale) : 0ull;
    total += w[i];
  }
  // 4. C2: top-p as the shortest rank prefix reaching ceil(top_p * total)
  uint64_t total2 = total;
  uint32_t tau_p = 0;
  int64_t cut_p = n;
  if (p.top_p < 1.0) {
    const uint64_t target = top_p_target(p.top_p, total);
    uint64_t above = 0;
    tau_p = radix_select_mass(key, w, n, target, &above);
    uint64_t acc = above;
    for (int64_t i = 0; i < n; ++i) {
      if (key[i] == tau_p && w[i] != 0) {
        acc += w[i];
        if (acc >= target) {
          cut_p = i;
          break;
        }
      }
    }
    total2 = acc;
  }
  // 5. inverse CDF in index order over C2
  const uint64_t t = mulhi64(sample_random_u64(seed, step), total2);
  uint64_t acc = 0;
  int64_t last = arg;
  for (int64_t i = 0; i < n; ++i) {
    if (w[i] == 0 || key[i] < tau_p || (key[i] == tau_p && i > cut_p)) continue;
    acc += w[i];
    last = i;
    if (acc > t) break;
  }
  *token = p.lo + last;
}

}  // namespace

void sample(const SampleParams& p, const float* cond, const float* uncond, const int64_t* seeds,
            int64_t step, int64_t* tokens, int32_t* errors) {
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    for (int64_t b = begin; b < end; ++b) {
      sample_row(p, cond + b * p.vocab, p.guided ? uncond + b * p.vocab : nullptr, seeds[b], step,
                 tokens + b, errors + b, s);
    }
  });
}

}  // namespace cpu
}  // namespace dalle_fast
