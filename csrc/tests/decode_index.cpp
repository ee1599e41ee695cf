// Test of the CUDA decode kernel's index math (csrc/common/decode_index.h), on the host: the 32-bit
// division by an invariant divisor against `/`, the key positions it computes against
// DecodeKeys::position for every kind and position of several layouts, the per-query split plan
// (every key in exactly one split, equal shares, unused splits empty) and the launch's split count.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "common/decode_index.h"

using namespace dalle_fast;

static int check_fast_div() {
  int failures = 0;
  std::mt19937_64 rng(0);
  std::vector<uint32_t> divisors;
  for (uint32_t d = 1; d <= 3000; ++d) divisors.push_back(d);
  for (uint32_t d : {65535u, 65536u, 65537u, 1u << 30, (1u << 30) + 1, 2147483646u, 2147483647u}) divisors.push_back(d);
  for (int i = 0; i < 200; ++i) divisors.push_back(1 + static_cast<uint32_t>(rng() % 2147483647u));
  for (uint32_t d : divisors) {
    const FastDivU32 f(d);
    std::vector<uint32_t> ns = {0, 1, d - 1, d, d + 1, 2 * d - 1, 2147483647u, 2147483646u};
    for (uint32_t k = 1; k < 64; ++k) {
      const uint64_t m = uint64_t(d) * k;
      if (m < 2147483648u) ns.insert(ns.end(), {uint32_t(m - 1), uint32_t(m)});
    }
    for (int i = 0; i < 64; ++i) ns.push_back(static_cast<uint32_t>(rng() % 2147483648u));
    for (uint32_t n = 0; n < 2000; ++n) ns.push_back(n);
    for (uint32_t n : ns) {
      if (n >= 2147483648u) continue;
      if (f.div(n) != n / d) {
        if (++failures <= 5) std::printf("FastDivU32(%u).div(%u) = %u, want %u\n", d, n, f.div(n), n / d);
      }
    }
  }
  return failures;
}

static int check_positions_and_splits() {
  int failures = 0;
  const LayoutParams layouts[] = {
      {kFull, 4, 5, 1, 1},    {kRow, 4, 5, 1, 1},      {kCol, 3, 6, 1, 1},      {kConv, 2, 7, 5, 1},
      {kConv, 3, 4, 11, 1},   {kAxialRow, 5, 6, 1, 1}, {kAxialCol, 5, 6, 1, 1}, {kConvLike, 4, 9, 3, 2},
      {kRow, 256, 32, 1, 1},  {kCol, 256, 32, 1, 1},   {kConv, 256, 32, 11, 1}, {kFull, 256, 32, 1, 1},
  };
  const int64_t min_keys = 64;
  for (const LayoutParams& L : layouts) {
    const int64_t longest = max_decode_keys(L);
    for (int64_t pos = 0; pos < L.seq_len(); ++pos) {
      const DecodeKeys dk = decode_keys(L, pos);
      const FastDecodeKeys fk(dk);
      const int64_t n = dk.total();
      if (n < 1 || n > longest) {
        if (++failures <= 5) std::printf("kind %d pos %lld: %lld keys, longest %lld\n", L.kind, (long long)pos,
                                         (long long)n, (long long)longest);
      }
      for (int64_t j = 0; j < n; ++j) {
        if (fk.position(j) != dk.position(j)) {
          if (++failures <= 5)
            std::printf("kind %d pos %lld key %lld: fast position %lld, want %lld\n", L.kind, (long long)pos,
                        (long long)j, (long long)fk.position(j), (long long)dk.position(j));
        }
      }
      for (int64_t splits : {int64_t(1), int64_t(2), int64_t(3), int64_t(7), int64_t(64)}) {
        int64_t next = 0, used = 0, smallest = n, largest = 0;
        for (int64_t s = 0; s < splits; ++s) {
          const KeyRange r = decode_split(n, splits, s, min_keys);
          if (r.begin == r.end) {
            if (r.begin != n) failures++;  // an unused split is the empty range at the end
            continue;
          }
          if (r.begin != next || r.end <= r.begin || r.end > n) {
            if (++failures <= 5) std::printf("n %lld: split %lld of %lld is [%lld, %lld), expected it to start at %lld\n",
                                             (long long)n, (long long)s, (long long)splits, (long long)r.begin,
                                             (long long)r.end, (long long)next);
          }
          next = r.end;
          ++used;
          smallest = r.end - r.begin < smallest ? r.end - r.begin : smallest;
          largest = r.end - r.begin > largest ? r.end - r.begin : largest;
        }
        const int64_t want_used = (n + min_keys - 1) / min_keys < splits ? (n + min_keys - 1) / min_keys : splits;
        if (next != n || used != want_used || largest - smallest > 1 ||
            (used > 1 && smallest < min_keys / 2)) {
          if (++failures <= 5)
            std::printf("n %lld, %lld splits: covered %lld keys with %lld splits (want %lld), sizes %lld..%lld\n",
                        (long long)n, (long long)splits, (long long)next, (long long)used, (long long)want_used,
                        (long long)smallest, (long long)largest);
        }
      }
    }
  }
  return failures;
}

// The launch plan: (batch * heads, longest list, slots) -> splits, worked out by hand from the model
// (132 SMs x 8 blocks = 1056 slots).
static int check_plan() {
  struct Case {
    int64_t rows, keys, slots, want;
  };
  const Case cases[] = {
      {1, 1280, 1056, 20},    // one query: as many 64-key splits as its list has
      {16, 289, 1056, 5},     {128, 1280, 1056, 8},  // one wave: 1024 blocks of 160 keys (9 splits: two)
      {256, 289, 1056, 4},    {512, 1280, 1056, 2},  {1024, 289, 1056, 1},  // one wave, no merge
      {1100, 289, 1056, 3},   // 1100 blocks would be two waves of 289 keys; 3300 of 97 are four
      {2048, 1280, 1056, 1},  {4096, 289, 1056, 1},  {8, 40, 1056, 1},      // short lists: one split
      {1, 100000, 1056, 64},  // at most max_splits
  };
  int failures = 0;
  for (const Case& c : cases) {
    const int64_t got = decode_plan_splits(c.rows, c.keys, c.slots, 64, 64);
    if (got != c.want) {
      ++failures;
      std::printf("decode_plan_splits(%lld rows, %lld keys, %lld slots) = %lld, want %lld\n", (long long)c.rows,
                  (long long)c.keys, (long long)c.slots, (long long)got, (long long)c.want);
    }
  }
  return failures;
}

int main() {
  const int failures = check_fast_div() + check_positions_and_splits() + check_plan();
  std::printf("dalle_fast_decode_index: %d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
