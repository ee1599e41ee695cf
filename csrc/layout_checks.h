// Argument checks of a layout's integers, shared by every op binding (TORCH_CHECK naming the op
// and the argument).
#pragma once

#include <c10/util/Exception.h>

#include <cmath>

#include "common/mask.h"

namespace dalle_fast {

// The softmax scale of an attention op: the kernels' running max relies on scale > 0, and a
// non-finite scale gives NaN rows.
inline void check_scale(const char* op, double scale) {
  TORCH_CHECK(scale > 0 && std::isfinite(scale), op, ": scale must be positive and finite, got ", scale);
}

inline LayoutParams checked_layout(const char* op, int64_t kind, int64_t text_len, int64_t image_size,
                                   int64_t kernel_size, int64_t dilation) {
  TORCH_CHECK(kind >= 0 && kind < kNumKinds, op, ": kind must be in [0, ", int(kNumKinds), "), got ", kind);
  TORCH_CHECK(text_len > 0, op, ": text_len must be positive, got ", text_len);
  TORCH_CHECK(image_size > 0, op, ": image_size must be positive, got ", image_size);
  TORCH_CHECK(kernel_size > 0, op, ": kernel_size must be positive, got ", kernel_size);
  TORCH_CHECK(dilation > 0, op, ": dilation must be positive, got ", dilation);
  TORCH_CHECK(kind != kConv || kernel_size % 2 == 1, op, ": kernel_size must be odd for kind 'conv', got ",
              kernel_size);
  return LayoutParams{static_cast<int>(kind), text_len, image_size, kernel_size, dilation};
}

}  // namespace dalle_fast
