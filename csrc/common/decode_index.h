// Decode index math: the keys one query position may read, enumerated in O(keys).
//
// For a query at position `pos` the allowed keys (csrc/common/mask.h, docs/design.md's table) are the
// text keys 0 .. n_text-1 (n_text = min(pos + 1, T)) followed, for image queries, by an image part
// that for every kind is an affine 2-D grid of image indices
//     m' = base + (j / width) * row_stride + (j % width) * col_stride,   j in [0, n_image),
// in ascending position order, whose last element is the query itself (m' = m). So key j of the
// list is computed in O(1) without scanning the prefix, which is what lets a split-K decode kernel
// hand any contiguous range of j to a thread block. Header-only, host and device.
#pragma once

#include <cstdint>

#include "common/mask.h"

namespace dalle_fast {

struct DecodeKeys {
  int64_t text_len;    // T (position offset of image index 0)
  int64_t n_text;      // text keys: positions 0 .. n_text-1
  int64_t n_image;     // image keys
  int64_t base;        // image index of image key 0
  int64_t width;       // keys per grid row (>= 1)
  int64_t row_stride;  // image-index step between grid rows
  int64_t col_stride;  // image-index step inside a grid row

  DF_HOST_DEVICE int64_t total() const { return n_text + n_image; }
  // Image index (0-based inside the image) of image key j, j in [0, n_image).
  DF_HOST_DEVICE int64_t image_index(int64_t j) const {
    const int64_t r = j / width;
    return base + r * row_stride + (j - r * width) * col_stride;
  }
  // Sequence position of key j, j in [0, total()).
  DF_HOST_DEVICE int64_t position(int64_t j) const {
    return j < n_text ? j : text_len + image_index(j - n_text);
  }
};

DF_HOST_DEVICE int64_t df_min64(int64_t a, int64_t b) { return a < b ? a : b; }
DF_HOST_DEVICE int64_t df_max64(int64_t a, int64_t b) { return a > b ? a : b; }

// The key list of query position pos (0 <= pos < L.seq_len()).
DF_HOST_DEVICE DecodeKeys decode_keys(const LayoutParams& L, int64_t pos) {
  const int64_t T = L.text_len, S = L.image_size;
  DecodeKeys d{T, df_min64(pos + 1, T), 0, 0, 1, 0, 1};
  if (pos < T) return d;
  const int64_t m = pos - T, r = m / S, c = m % S;
  switch (L.kind) {
    case kFull:  // all earlier image tokens
      d.n_image = m + 1;
      d.width = d.n_image;
      break;
    case kRow: {  // the previous S image tokens and itself
      d.base = df_max64(0, m - S);
      d.n_image = m - d.base + 1;
      d.width = d.n_image;
      break;
    }
    case kCol:
    case kAxialCol:  // same column, rows 0..r
      d.base = c;
      d.n_image = r + 1;
      d.width = d.n_image;
      d.col_stride = S;
      break;
    case kAxialRow:  // same row, columns 0..c
      d.base = r * S;
      d.n_image = c + 1;
      d.width = d.n_image;
      break;
    case kConv: {  // rows r-h..r, columns c-h..c+h clipped; the last row stops at column c
      const int64_t h = L.kernel_size / 2;
      const int64_t r0 = df_max64(0, r - h), c0 = df_max64(0, c - h), c1 = df_min64(S - 1, c + h);
      d.base = r0 * S + c0;
      d.width = c1 - c0 + 1;
      d.row_stride = S;
      d.n_image = (r - r0) * d.width + (c - c0 + 1);
      break;
    }
    case kConvLike: {  // r - a*d, c - b*d for a, b in [0, K-1], inside the image
      const int64_t dil = L.dilation, K = L.kernel_size;
      const int64_t na = df_min64(K, r / dil + 1), nb = df_min64(K, c / dil + 1);
      d.base = (r - (na - 1) * dil) * S + (c - (nb - 1) * dil);
      d.width = nb;
      d.row_stride = dil * S;
      d.col_stride = dil;
      d.n_image = na * nb;
      break;
    }
    default:
      break;
  }
  return d;
}

// Unsigned 32-bit division by a divisor fixed at construction (1 <= d < 2^31), for dividends
// n < 2^31: one high multiply, an add and a shift (Granlund-Montgomery, round-up variant) instead of
// a 64-bit division routine per key in the decode kernel's inner loop.
struct FastDivU32 {
  uint32_t d, mul, shift;

  DF_HOST_DEVICE explicit FastDivU32(uint32_t divisor) : d(divisor), mul(0), shift(0) {
    while ((uint64_t(1) << shift) < divisor) ++shift;  // ceil(log2(d))
    mul = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - divisor)) / divisor + 1);
  }
  DF_HOST_DEVICE uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t t = __umulhi(n, mul);
#else
    const uint32_t t = static_cast<uint32_t>((uint64_t(n) * mul) >> 32);
#endif
    return (t + n) >> shift;  // t <= n < 2^31: no overflow
  }
};

// DecodeKeys::position with 32-bit index math (positions are below 2^31: layout_checks.h), for the
// inner loop of a kernel that computes one key's position per load.
struct FastDecodeKeys {
  DecodeKeys k;
  FastDivU32 width;

  DF_HOST_DEVICE explicit FastDecodeKeys(const DecodeKeys& keys)
      : k(keys), width(static_cast<uint32_t>(keys.width)) {}
  DF_HOST_DEVICE int64_t position(int64_t j) const {
    if (j < k.n_text) return j;
    const uint32_t i = static_cast<uint32_t>(j - k.n_text);
    const uint32_t r = width.div(i), c = i - r * width.d;
    return k.text_len + k.base + static_cast<int64_t>(r) * k.row_stride + static_cast<int64_t>(c) * k.col_stride;
  }
};

// Key range [begin, end) that split `split` of a launch with `num_splits` splits (flash-decoding)
// takes from a query's list of n keys. The plan is chosen per query, from its own n: it uses
// e = min(num_splits, ceil(n / min_keys)) splits of n / e keys each (sizes differ by at most one),
// and splits >= e are empty. A launch sizes num_splits for the layout's longest list, so a query
// with a shorter one (an early position of `full`, a top row of `col`) still spreads its keys
// evenly over its blocks instead of leaving most of them empty and one doing a full share.
struct KeyRange {
  int64_t begin, end;
};

// Splits a list of n keys takes: one per min_keys keys (rounded up), at least 1, at most `cap`.
DF_HOST_DEVICE int64_t splits_for_keys(int64_t n, int64_t cap, int64_t min_keys) {
  return df_max64(1, df_min64(cap, (n + min_keys - 1) / min_keys));
}

DF_HOST_DEVICE KeyRange decode_split(int64_t n, int64_t num_splits, int64_t split, int64_t min_keys) {
  const int64_t used = splits_for_keys(n, num_splits, min_keys);
  if (split >= used) return KeyRange{n, n};
  return KeyRange{split * n / used, (split + 1) * n / used};
}

// Splits per query of a flash-decoding launch over `batch_heads` queries whose longest key list has
// `max_keys` keys, on a GPU that holds `slots` blocks at once (SMs x resident blocks per SM). Each
// split's block takes ceil(max_keys / s) keys; the blocks run in ceil(batch_heads * s / slots)
// waves. The time is modelled as waves x (keys per block + min_keys / 2 for a block's fixed work:
// its launch, q, the merges, the partial it writes) and the fewest splits of least time are chosen,
// at most ceil(max_keys / min_keys) and `max_splits`. A last, partly filled wave costs as much as a
// full one, so filling the GPU "at least once" (ceil(slots / batch_heads) splits) often adds a wave
// (B=64 x 16 heads on 132 SMs: 2 splits, two waves, where 1 split is one wave and no merge kernel).
inline int64_t decode_plan_splits(int64_t batch_heads, int64_t max_keys, int64_t slots, int64_t min_keys,
                                  int64_t max_splits) {
  batch_heads = df_max64(batch_heads, 1);
  slots = df_max64(slots, 1);
  const int64_t most = splits_for_keys(max_keys, max_splits, min_keys);
  int64_t best = 1, best_cost = -1;
  for (int64_t s = 1; s <= most; ++s) {
    const int64_t waves = (batch_heads * s + slots - 1) / slots;
    const int64_t cost = waves * ((max_keys + s - 1) / s + min_keys / 2);
    if (best_cost < 0 || cost < best_cost) {
      best = s;
      best_cost = cost;
    }
  }
  return best;
}

// Upper bound of decode_keys(L, pos).total() over all positions of the layout (exact maximum for
// every kind); sizes split-K work partitions on the host without knowing the device-side pos.
inline int64_t max_decode_keys(const LayoutParams& L) {
  const int64_t T = L.text_len, S = L.image_size;
  int64_t img = 0;
  switch (L.kind) {
    case kFull: img = S * S; break;
    case kRow: img = df_min64(S + 1, S * S); break;
    case kCol:
    case kAxialCol:
    case kAxialRow: img = S; break;
    case kConv: {  // full rows above times the window width, plus the last row; max over columns
      const int64_t h = L.kernel_size / 2, rows = df_min64(h, S - 1);
      for (int64_t c = 0; c < S; ++c) {
        const int64_t c0 = df_max64(0, c - h), c1 = df_min64(S - 1, c + h);
        img = df_max64(img, rows * (c1 - c0 + 1) + (c - c0 + 1));
      }
      break;
    }
    case kConvLike: {
      const int64_t n = df_min64(L.kernel_size, (S - 1) / L.dilation + 1);
      img = n * n;
      break;
    }
    default: break;
  }
  return T + img;
}

}  // namespace dalle_fast
