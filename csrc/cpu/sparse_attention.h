// CPU block-sparse attention kernels (flash-style, float32 compute): tile sizes and argument types.
// The kernels (Kernels::sparse_attention_forward / _backward, cpu/kernels.h):
// - forward on q, k, v (rows) in sequence order: visits positions in the schedule's order (gathering
//   rows through the permutation) and writes out (rows, sequence order) = softmax(scale q k^T +
//   mask) v and lse (BH, N) = log-sum-exp of each masked score row;
// - backward: writes dq, dk, dv (rows, sequence order). Everything else happens inside, per head:
//   the gather into processing order, the scale, the transposed copies the GEMMs need and
//   delta = rowsum(grad_out * out) - grad_lse.
//
// Arrays are float32 and contiguous; "rows" arrays are (BH, N, D), "transposed" arrays (BH, D, N);
// the sequence dim is in the schedule's processing (permuted) order.
#pragma once

#include <cstdint>

#include "cpu/schedule.h"

namespace dalle_fast {
namespace cpu {

// Tile sizes of the CPU kernels: 32 queries x 32 keys, so that at S = 32 a row-mask query tile is
// one image row and computes no keys outside it (docs/design-notes.md, "CPU kernels: 32 x 32 tiles").
// Exported to Python as dalle_fast._C.CPU_TILE_M / CPU_TILE_N (the benchmark's computed-tile counts).
constexpr int64_t TILE_M = 32;
constexpr int64_t TILE_N = 32;

struct AttnProblem {
  int64_t bh;  // batch * heads
  int64_t n;   // sequence length
  int64_t d;   // head dim
  float scale; // softmax scale (> 0)
};

// Inputs of the backward, float32 and contiguous in sequence order: q, k, v, grad_out and the
// forward's out as rows (BH, N, D), the forward's lse (BH, N) and grad_lse (BH, N) or nullptr.
struct BwdInputs {
  const float *q, *k, *v, *go, *out, *lse, *grad_lse;
};

}  // namespace cpu
}  // namespace dalle_fast
