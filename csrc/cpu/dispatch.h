// Run-time choice of the CPU kernels' instruction set: the best one this build contains and the CPU
// supports, unless $DALLE_FAST_CPU_ISA (default | avx2 | avx512) or set_isa() asks for another one
// (an error when the CPU lacks it).
#pragma once

#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace dalle_fast {
namespace cpu {

// The table of the active instruction set (chosen on first use).
const Kernels& kernels();

// Name of the active instruction set ("default", "avx2", "avx512").
std::string isa();

// The instruction sets this build contains and this CPU runs, lowest first.
std::vector<std::string> available_isas();

// Makes `name` the active instruction set. Throws (c10::Error, naming the argument) when the name is
// unknown or the CPU cannot run it.
void set_isa(const std::string& name);

}  // namespace cpu
}  // namespace dalle_fast
