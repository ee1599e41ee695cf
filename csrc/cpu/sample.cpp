// CPU sampler: one row per task; passes over the row's vocab range: guided logits + max + checks,
// top-k threshold by a 12-bit count histogram of the order keys plus std::nth_element inside
// the selected bucket (O(V), no sort), integer weights, top-p
// threshold by a 4-pass 8-bit radix select on the order keys weighted by mass (O(V)), and the
// inverse-CDF draw in index order. Traffic: the row's logits once (twice with guidance), scratch
// in L1/L2. Semantics in common/sampling.h. Compiled once per instruction set (cpu/kernels.h).
#pragma GCC optimize("fp-contract=off")  // identical float bits to the CUDA sampler

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "cpu/kernels.h"

namespace dalle_fast {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr int RADIX_BITS = 8;
constexpr int RADIX_BINS = 1 << RADIX_BITS;
constexpr int TOPK_BITS = 12;  // first-level bucket bits of the top-k select
constexpr int64_t TOPK_BINS = int64_t(1) << TOPK_BITS;
constexpr int64_t SERIAL_ELEMENTS = 16384;  // rows x vocabulary below which one thread draws them all

struct Scratch {
  std::vector<float> x;
  std::vector<uint32_t> key, sel;
  std::vector<uint64_t> w;
  std::vector<int64_t> idx;
  std::vector<int64_t> hist;
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
  s.idx.resize(n);
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
  if (p.top_k > 0 && p.top_k < finite && n <= TOPK_BINS) {
    // k-th largest key of a small vocabulary: nth_element over the finite keys (zeroing and scanning
    // the histogram below would cost more than the row)
    s.sel.clear();
    for (int64_t i = 0; i < n; ++i)
      if (key[i] != NEG_INF_KEY) s.sel.push_back(key[i]);
    std::nth_element(s.sel.begin(), s.sel.begin() + (p.top_k - 1), s.sel.end(), std::greater<uint32_t>());
    tau_k = s.sel[p.top_k - 1];
  } else if (p.top_k > 0 && p.top_k < finite) {
    // k-th largest key: a count histogram of the top TOPK_BITS key bits finds its bucket, then
    // nth_element runs over that bucket only
    s.hist.assign(TOPK_BINS, 0);
    for (int64_t i = 0; i < n; ++i) s.hist[key[i] >> (32 - TOPK_BITS)] += key[i] != NEG_INF_KEY;
    int64_t bucket = TOPK_BINS - 1, above = 0;
    for (; bucket > 0 && above + s.hist[bucket] < p.top_k; --bucket) above += s.hist[bucket];
    s.sel.clear();
    for (int64_t i = 0; i < n; ++i)
      if ((key[i] >> (32 - TOPK_BITS)) == static_cast<uint32_t>(bucket) && key[i] != NEG_INF_KEY)
        s.sel.push_back(key[i]);
    const int64_t r = p.top_k - above - 1;  // rank inside the bucket
    std::nth_element(s.sel.begin(), s.sel.begin() + r, s.sel.end(), std::greater<uint32_t>());
    tau_k = s.sel[r];
  }
  if (p.top_k > 0 && p.top_k < finite) {
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
  // 3. C1 compacted in index order with its integer weights (top-p and the draw then touch only C1)
  int64_t m = 0;
  uint64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (key[i] > tau_k || (key[i] == tau_k && i <= cut_k)) {
      const uint64_t wi = logit_weight(x[i], mx, p.exp2_scale);
      if (wi == 0) continue;  // weight-0 members can never be drawn
      s.idx[m] = i;
      key[m] = key[i];  // m <= i: compaction in place
      w[m] = wi;
      total += wi;
      ++m;
    }
  }
  // 4. C2: top-p as the shortest rank prefix reaching ceil(top_p * total)
  uint64_t total2 = total;
  uint32_t tau_p = 0;
  int64_t cut_p = m;
  if (p.top_p < 1.0) {
    const uint64_t target = top_p_target(p.top_p, total);
    uint64_t above = 0;
    tau_p = radix_select_mass(key, w, m, target, &above);
    uint64_t acc = above;
    for (int64_t i = 0; i < m; ++i) {
      if (key[i] == tau_p) {
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
  for (int64_t i = 0; i < m; ++i) {
    if (key[i] < tau_p || (key[i] == tau_p && i > cut_p)) continue;
    acc += w[i];
    last = s.idx[i];
    if (acc > t) break;
  }
  *token = p.lo + last;
}

}  // namespace

void sample(const SampleParams& p, const float* cond, const float* uncond, const int64_t* seeds,
            int64_t step, int64_t* tokens, int32_t* errors) {
  // rows pulled dynamically (load balance on busy machines); a small call on the calling thread
  // (waking a pool thread costs more than a few short rows)
  const int64_t n_threads = p.batch * (p.hi - p.lo) < SERIAL_ELEMENTS
                                ? 1
                                : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.batch));
  std::atomic<int64_t> next{0};
  auto rows = [&](int64_t, int64_t) {
    Scratch s;
    for (int64_t b = next.fetch_add(1); b < p.batch; b = next.fetch_add(1)) {
      sample_row(p, cond + b * p.vocab, p.guided ? uncond + b * p.vocab : nullptr, seeds[b], step,
                 tokens + b, errors + b, s);
    }
  };
  if (n_threads == 1)
    rows(0, 1);
  else
    at::parallel_for(0, n_threads, 1, rows);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace dalle_fast
