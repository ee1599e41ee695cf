// The CPU kernels' entry points. Each kernel source (csrc/sources.txt, tag "isa") is compiled once
// per instruction set, with CPU_CAPABILITY naming it; each copy fills a Kernels table in its own
// namespace, and cpu/dispatch.h picks the table the CPU can run.
#pragma once

#include <cstdint>

#include "cpu/decode.h"
#include "cpu/linear.h"
#include "cpu/sparse_attention.h"

namespace dalle_fast {
namespace cpu {

struct Kernels {
  // sparse_attention.h
  void (*sparse_attention_forward)(const Schedule& s, const AttnProblem& p, const float* q, const float* k,
                                   const float* v, float* out, float* lse);
  void (*sparse_attention_backward)(const Schedule& s, const AttnProblem& p, const BwdInputs& in, float* dq,
                                    float* dk, float* dv);
  // decode.h
  void (*decode_attention)(const DecodeArgs& a);
  void (*sample)(const SampleParams& p, const float* cond, const float* uncond, const int64_t* seeds,
                 int64_t step, int64_t* tokens, int32_t* errors);
  // linear.h
  void (*packed_linear)(const LinearArgs& a);
};

// One table per compiled instruction set (AVX2 and AVX512 on x86-64 only).
namespace DEFAULT { const Kernels& kernels(); }
#if defined(__x86_64__) || defined(_M_X64)
namespace AVX2 { const Kernels& kernels(); }
namespace AVX512 { const Kernels& kernels(); }
#endif

#ifdef CPU_CAPABILITY
// Inside a per-ISA translation unit: the definitions behind this ISA's table.
namespace CPU_CAPABILITY {
void sparse_attention_forward(const Schedule& s, const AttnProblem& p, const float* q, const float* k,
                              const float* v, float* out, float* lse);
void sparse_attention_backward(const Schedule& s, const AttnProblem& p, const BwdInputs& in, float* dq,
                               float* dk, float* dv);
void decode_attention(const DecodeArgs& a);
void sample(const SampleParams& p, const float* cond, const float* uncond, const int64_t* seeds, int64_t step,
            int64_t* tokens, int32_t* errors);
void packed_linear(const LinearArgs& a);
}  // namespace CPU_CAPABILITY
#endif

}  // namespace cpu
}  // namespace dalle_fast
