// Argument type of the CPU kernel of the decode step's linear layers (plain C++, no torch types):
// out (M, N) = x (M, K) @ W^T + bias for a few rows M, W (N, K) packed once into column panels
// (Kernels::packed_linear, cpu/kernels.h). The panel layout is fixed (not per ISA), so a packed
// weight serves every instruction set: panel p holds columns [16 p, 16 p + 16) as (K, 16), zero past N.
#pragma once

#include <cstdint>

namespace dalle_fast {
namespace cpu {

constexpr int64_t LINEAR_PANEL = 16;

struct LinearArgs {
  int64_t M, K, N;
  const float* x;       // (M, K), row stride ldx, unit column stride
  int64_t ldx;
  const float* packed;  // (ceil(N / 16), K, 16) contiguous
  const float* bias;    // (N,) or nullptr
  float* out;           // (M, N), row stride ldo
  int64_t ldo;
};

}  // namespace cpu
}  // namespace dalle_fast
