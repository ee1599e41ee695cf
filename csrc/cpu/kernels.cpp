// This instruction set's table of kernels (compiled once per ISA, like the kernels themselves).
// A function-local constant of function pointers: constant-initialised, so no code of this ISA runs
// before the dispatcher has checked that the CPU supports it.
#include "cpu/kernels.h"

namespace dalle_fast {
namespace cpu {
namespace CPU_CAPABILITY {

const Kernels& kernels() {
  static constexpr Kernels table{&sparse_attention_forward, &sparse_attention_backward, &decode_attention,
                                 &sample, &packed_linear};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace dalle_fast
