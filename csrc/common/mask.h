// Mask predicate of DALL-E-style layouts, shared by the CPU, CUDA and host code.
//
// The single C++ definition of docs/design.md's mask table (dalle_fast/masks.py is the Python one; the
// tests check both against an independent brute force). Header-only, no torch dependency, usable
// from host and device code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DF_HOST_DEVICE inline
#endif

namespace dalle_fast {

// Kind ids; the order matches dalle_fast.masks.KINDS.
enum MaskKind : int {
  kFull = 0,
  kRow = 1,
  kCol = 2,
  kConv = 3,
  kAxialRow = 4,
  kAxialCol = 5,
  kConvLike = 6,
  kNumKinds = 7,
};

// The integers that define one layer's layout.
struct LayoutParams {
  int kind;
  int64_t text_len;     // T
  int64_t image_size;   // S (image is S x S tokens)
  int64_t kernel_size;  // K for conv / conv_like
  int64_t dilation;     // d for conv_like

  DF_HOST_DEVICE int64_t seq_len() const { return text_len + image_size * image_size; }
  // Column kinds are processed with the image part in column-major order.
  DF_HOST_DEVICE bool transposed() const { return kind == kCol || kind == kAxialCol; }
};

// Image-image rule for image indices m (query) and mk (key), both >= 0 and mk <= m.
DF_HOST_DEVICE bool image_pair_allowed(const LayoutParams& L, int64_t m, int64_t mk) {
  const int64_t S = L.image_size;
  const int64_t r = m / S, c = m % S, rk = mk / S, ck = mk % S;
  switch (L.kind) {
    case kFull:
      return true;
    case kRow:
      return mk >= m - S;
    case kCol:
    case kAxialCol:
      return ck == c;
    case kConv: {
      const int64_t h = L.kernel_size / 2;
      const int64_t dc = ck - c;
      return rk >= r - h && rk <= r && dc >= -h && dc <= h;
    }
    case kAxialRow:
      return rk == r;
    case kConvLike: {
      const int64_t dr = r - rk, dc = c - ck, d = L.dilation;
      return dr >= 0 && dc >= 0 && dr % d == 0 && dc % d == 0 && dr / d < L.kernel_size &&
             dc / d < L.kernel_size;
    }
    default:
      return false;
  }
}

// True when query position q may attend to key position k.
DF_HOST_DEVICE bool mask_allowed(const LayoutParams& L, int64_t q, int64_t k) {
  if (k > q) return false;
  if (k < L.text_len) return true;  // text keys: causal only
  return image_pair_allowed(L, q - L.text_len, k - L.text_len);
}

// Position processed at slot i of a run of n positions (identity, or the image part column-major
// for column kinds). Matches dalle_fast.masks.Layout.permutation. O(1) for full image rows; the
// last, partial image row of a run (n not at a row boundary) is handled exactly.
DF_HOST_DEVICE int64_t permuted_position(const LayoutParams& L, int64_t n, int64_t i) {
  const int64_t T = L.text_len, S = L.image_size;
  if (!L.transposed() || i < T) return i;
  const int64_t img = n - T;         // image positions present
  const int64_t full_rows = img / S;  // complete rows
  const int64_t rem = img % S;        // columns 0..rem-1 have one extra row
  int64_t j = i - T;                  // slot inside the image part
  // columns c < rem hold full_rows + 1 entries, the others full_rows
  const int64_t big = full_rows + 1;
  int64_t c, r;
  if (j < rem * big) {
    c = j / big;
    r = j % big;
  } else {
    j -= rem * big;
    c = rem + j / full_rows;
    r = j % full_rows;
  }
  return T + r * S + c;
}

}  // namespace dalle_fast
