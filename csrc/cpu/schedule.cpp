// Builds and caches block-sparse schedules (see schedule.h).
#include "cpu/schedule.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

namespace dalle_fast {
namespace cpu {

namespace {

std::shared_ptr<const Schedule> build(const LayoutParams& L, int64_t n, int64_t bm, int64_t bn) {
  auto s = std::make_shared<Schedule>();
  s->n = n;
  s->bm = bm;
  s->bn = bn;
  s->nq = (n + bm - 1) / bm;
  s->nk = (n + bn - 1) / bn;
  s->perm.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    s->perm[i] = static_cast<int32_t>(permuted_position(L, n, i));
    s->identity = s->identity && s->perm[i] == i;
  }
  s->inv_perm.resize(n);
  for (int64_t i = 0; i < n; ++i) s->inv_perm[s->perm[i]] = static_cast<int32_t>(i);
  // Classify every (query tile, key tile) pair. In permuted order every allowed pair has
  // key slot <= query slot (the permutation keeps causality for column kinds), so only tiles at
  // or left of the diagonal can be non-empty.
  std::vector<std::vector<TileRef>> by_k(s->nk);
  std::vector<uint8_t> tile(bm * bn);
  s->q_ptr.push_back(0);
  for (int64_t i = 0; i < s->nq; ++i) {
    const int64_t q0 = i * bm, q1 = std::min(n, q0 + bm);
    const int64_t last_k = std::min(s->nk - 1, (q1 - 1) / bn);
    for (int64_t j = 0; j <= last_k; ++j) {
      const int64_t k0 = j * bn, k1 = std::min(n, k0 + bn);
      int64_t count = 0;
      std::fill(tile.begin(), tile.end(), 0);
      for (int64_t a = q0; a < q1; ++a) {
        const int64_t qp = s->perm[a];
        for (int64_t b = k0; b < k1; ++b) {
          const bool ok = mask_allowed(L, qp, s->perm[b]);
          tile[(a - q0) * bn + (b - k0)] = ok;
          count += ok;
        }
      }
      if (count == 0) continue;
      s->computed_pairs += (q1 - q0) * (k1 - k0);
      int32_t off = -1;
      if (count != bm * bn) {  // partial (includes tiles cut by the sequence end)
        off = static_cast<int32_t>(s->masks.size());
        s->masks.insert(s->masks.end(), tile.begin(), tile.end());
        for (int64_t b = 0; b < bn; ++b)
          for (int64_t a = 0; a < bm; ++a) s->masks_t.push_back(tile[a * bn + b]);
      }
      s->q_tiles.push_back({static_cast<int32_t>(j), off});
      by_k[j].push_back({static_cast<int32_t>(i), off});
    }
    s->q_ptr.push_back(static_cast<int32_t>(s->q_tiles.size()));
  }
  s->k_ptr.push_back(0);
  for (int64_t j = 0; j < s->nk; ++j) {
    s->k_tiles.insert(s->k_tiles.end(), by_k[j].begin(), by_k[j].end());
    s->k_ptr.push_back(static_cast<int32_t>(s->k_tiles.size()));
  }
  return s;
}

}  // namespace

std::shared_ptr<const Schedule> get_schedule(const LayoutParams& L, int64_t n, int64_t bm, int64_t bn) {
  using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;
  static std::mutex mu;
  static std::map<Key, std::shared_ptr<const Schedule>> cache;
  const Key key{L.kind, L.text_len, L.image_size, L.kernel_size, L.dilation, n, bm, bn};
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto s = build(L, n, bm, bn);  // outside the lock: building can take milliseconds
  std::lock_guard<std::mutex> lock(mu);
  if (cache.size() > 512) cache.clear();  // bound memory for programs that sweep many shapes
  return cache.emplace(key, s).first->second;
}

}  // namespace cpu
}  // namespace dalle_fast
