// Run-time instruction-set dispatch of the CPU kernels (see cpu/dispatch.h). Compiled for the
// baseline of the architecture, like every file outside the per-ISA kernel sources.
#include "cpu/dispatch.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace dalle_fast {
namespace cpu {
namespace {

struct IsaEntry {
  const char* name;
  const Kernels& (*table)();
  bool (*supported)();
};

#if defined(__x86_64__) || defined(_M_X64)
// The features each ISA's compiler flags assume (csrc/sources.txt, isa_flags); __builtin_cpu_supports
// also checks that the OS saves the vector registers (XGETBV).
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
#endif
bool always() { return true; }

// Lowest first.
const IsaEntry ISAS[] = {
    {"default", &DEFAULT::kernels, &always},
#if defined(__x86_64__) || defined(_M_X64)
    {"avx2", &AVX2::kernels, &has_avx2},
    {"avx512", &AVX512::kernels, &has_avx512},
#endif
};
constexpr int N_ISAS = sizeof(ISAS) / sizeof(ISAS[0]);

std::string names(bool supported_only) {
  std::string s;
  for (const auto& e : ISAS)
    if (!supported_only || e.supported()) s += (s.empty() ? "" : ", ") + std::string(e.name);
  return s;
}

int find_isa(const std::string& name, const char* what) {
  for (int i = 0; i < N_ISAS; ++i) {
    if (name == ISAS[i].name) {
      TORCH_CHECK(ISAS[i].supported(), what, ": this CPU cannot run the '", name, "' kernels (it runs: ",
                  names(true), ")");
      return i;
    }
  }
  TORCH_CHECK(false, what, ": unknown instruction set '", name, "' (this build has: ", names(false), ")");
}

int initial_isa() {
  const char* env = std::getenv("DALLE_FAST_CPU_ISA");
  if (env != nullptr && *env != '\0') return find_isa(env, "$DALLE_FAST_CPU_ISA");
  int best = 0;
  for (int i = 0; i < N_ISAS; ++i)
    if (ISAS[i].supported()) best = i;
  return best;
}

std::atomic<int> g_active{-1};

int active() {
  int i = g_active.load(std::memory_order_acquire);
  if (i < 0) {
    const int chosen = initial_isa();  // throws on a bad $DALLE_FAST_CPU_ISA (and stays unset)
    g_active.compare_exchange_strong(i, chosen, std::memory_order_acq_rel);
    i = g_active.load(std::memory_order_acquire);
  }
  return i;
}

}  // namespace

const Kernels& kernels() { return ISAS[active()].table(); }

std::string isa() { return ISAS[active()].name; }

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const auto& e : ISAS)
    if (e.supported()) out.emplace_back(e.name);
  return out;
}

void set_isa(const std::string& name) {
  g_active.store(find_isa(name, "dalle_fast.set_cpu_isa: isa"), std::memory_order_release);
}

}  // namespace cpu
}  // namespace dalle_fast
