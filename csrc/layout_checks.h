// Argument checks of a layout's integers, shared by every op binding (TORCH_CHECK naming the op
// and the argument).
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <string>

#include "common/mask.h"

namespace dalle_fast {

// Largest softmax scale: the kernels compute in float32 with log2(e) folded into the scale
// (dalle_fast.ops.MAX_SCALE).
constexpr double kMaxScale = 2.0e38;
// Longest sequence: positions and tile offsets are int32 in the kernels.
constexpr int64_t kMaxSeqLen = 2147483647;

// The softmax scale of an attention op: the kernels' running max relies on scale > 0, and a
// non-finite scale gives NaN rows; checked in float32, the kernels' precision.
inline void check_scale(const char* op, double scale) {
  TORCH_CHECK_VALUE(scale > 0 && scale <= kMaxScale && static_cast<float>(scale) > 0, op,
                    ": scale must be positive and finite in float32 (the kernels' precision), i.e. in (1.5e-45, ",
                    kMaxScale, "], got ", scale);
}

inline LayoutParams checked_layout(const char* op, int64_t kind, int64_t text_len, int64_t image_size,
                                   int64_t kernel_size, int64_t dilation) {
  TORCH_CHECK_VALUE(kind >= 0 && kind < kNumKinds, op, ": kind must be in [0, ", int(kNumKinds), "), got ", kind);
  TORCH_CHECK_VALUE(text_len > 0, op, ": text_len must be positive, got ", text_len);
  TORCH_CHECK_VALUE(image_size > 0, op, ": image_size must be positive, got ", image_size);
  TORCH_CHECK_VALUE(kernel_size > 0, op, ": kernel_size must be positive, got ", kernel_size);
  TORCH_CHECK_VALUE(dilation > 0, op, ": dilation must be positive, got ", dilation);
  TORCH_CHECK_VALUE(text_len <= kMaxSeqLen, op, ": text_len must be at most ", kMaxSeqLen, ", got ", text_len);
  // image_size**2 computed only where it cannot overflow int64 (a wrapped value printed negative)
  TORCH_CHECK_VALUE(image_size <= kMaxSeqLen && image_size * image_size <= kMaxSeqLen - text_len, op,
                    ": text_len + image_size**2 must be at most ", kMaxSeqLen, " (int32 positions), got ", text_len,
                    " + ", image_size, "**2",
                    image_size <= 3037000499 ? " = " + std::to_string(text_len + image_size * image_size) : std::string());
  TORCH_CHECK_VALUE(kernel_size <= kMaxSeqLen, op, ": kernel_size must be at most ", kMaxSeqLen, ", got ", kernel_size);
  TORCH_CHECK_VALUE(dilation <= kMaxSeqLen, op, ": dilation must be at most ", kMaxSeqLen, ", got ", dilation);
  TORCH_CHECK_VALUE(kind != kConv || kernel_size % 2 == 1, op, ": kernel_size must be odd for kind 'conv', got ",
                    kernel_size);
  return LayoutParams{static_cast<int>(kind), text_len, image_size, kernel_size, dilation};
}

}  // namespace dalle_fast
