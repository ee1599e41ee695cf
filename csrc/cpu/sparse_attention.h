// CPU block-sparse attention kernels (flash-style, float32 compute).
//
// Arrays are float32 and contiguous; "rows" arrays are (BH, N, D), "transposed" arrays (BH, D, N);
// the sequence dim is in the schedule's processing (permuted) order.
#pragma once

#include <cstdint>

#include "cpu/schedule.h"

namespace dalle_fast {
namespace cpu {

struct AttnProblem {
  int64_t bh;  // batch * heads
  int64_t n;   // sequence length
  int64_t d;   // head dim
  float scale; // softmax scale (> 0)
};

// Forward on q, k, v (rows) in sequence order: the kernel itself visits positions in the schedule's
// order (gathering rows through the permutation) and writes out (rows, sequence order) =
// softmax(scale q k^T + mask) v and lse (BH, N) = log-sum-exp of each masked score row.
void sparse_attention_forward(const Schedule& s, const AttnProblem& p, const float* q, const float* k,
                              const float* v, float* out, float* lse);

// Inputs of the backward, float32 and contiguous in sequence order: q, k, v, grad_out and the
// forward's out as rows (BH, N, D), the forward's lse (BH, N) and grad_lse (BH, N) or nullptr.
struct BwdInputs {
  const float *q, *k, *v, *go, *out, *lse, *grad_lse;
};

// Writes dq, dk, dv (rows, sequence order). Everything else happens inside, per head: the gather
// into processing order, the scale, the transposed copies the GEMMs need and
// delta = rowsum(grad_out * out) - grad_lse.
void sparse_attention_backward(const Schedule& s, const AttnProblem& p, const BwdInputs& in, float* dq,
                               float* dk, float* dv);

}  // namespace cpu
}  // namespace dalle_fast
