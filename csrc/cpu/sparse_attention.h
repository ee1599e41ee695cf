// CPU block-sparse attention kernels (flash-style, float32 compute).
//
// All arrays are float32, contiguous, shape (BH, N, D), rows in the schedule's permuted order.
#pragma once

#include <cstdint>

#include "cpu/schedule.h"

namespace dalle_fast {
namespace cpu {

struct AttnProblem {
  int64_t bh;     // batch * heads
  int64_t n;      // sequence length
  int64_t d;      // head dim
  float scale;    // softmax scale
};

// out = softmax(scale * q k^T + mask) v ; lse = log-sum-exp of each masked score row.
void sparse_attention_forward(const Schedule& s, const AttnProblem& p, const float* q, const float* k,
                              const float* v, float* out, float* lse);

// Gradients given grad_out, the forward's lse and delta = rowsum(grad_out * out).
// dq, dk, dv are written (not accumulated).
void sparse_attention_backward(const Schedule& s, const AttnProblem& p, const float* q, const float* k,
                               const float* v, const float* grad_out, const float* lse,
                               const float* delta, float* dq, float* dk, float* dv);

}  // namespace cpu
}  // namespace dalle_fast
