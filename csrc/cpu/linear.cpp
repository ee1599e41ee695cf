// The decode step's linear layers on the CPU: a few rows (M = the generation's rows) against a
// weight read once per step. torch's GEMM reaches 30-80 GFLOP/s at these shapes on two cores; this
// register-tiled kernel streams the packed weight once per tile of rows (cpu/linear.h).
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/kernels.h"
#include "cpu/vec.h"

namespace dalle_fast {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

static_assert(VEC == 8 || VEC == 16, "packed_linear tiles two vectors of 8 or 16 floats per row");
static_assert(LINEAR_PANEL % VEC == 0, "a panel holds whole vectors");

// A column block is two vectors wide: one panel in halves (8 floats) or two panels (16 floats).
// Rows per tile: its R x 2 accumulators stay in registers (16 of 32 zmm, 12 of 16 ymm).
constexpr int64_t BLOCK = 2 * VEC;
constexpr int MR = VEC == 16 ? 8 : 6;

// Rows [0, R) of x against the column block at c0: stream a holds columns c0 + [0, VEC), stream b
// (NV == 2) columns c0 + VEC + [0, VEC), both advancing one panel row (16 floats) per k. The sum
// over k runs in chunks of KC added up in out, so its rounding error grows with KC + K / KC, not K
// (a single running sum over K = 2048 was 5x torch's error against float64).
constexpr int64_t KC = 32;
constexpr int64_t PREFETCH = 16;

template <int R, int NV>
void tile(const float* __restrict x, int64_t ldx, const float* __restrict a, const float* __restrict b,
          int64_t K, const float* bias, int64_t c0, int64_t N, float* __restrict out, int64_t ldo) {
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t k1 = std::min(K, k0 + KC);
    Vec acc[R][NV];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = Vec(0.f);
    for (int64_t k = k0; k < k1; ++k) {
      // one panel row is one cache line: ask for the line PREFETCH rows ahead of each stream (a weight
      // larger than L2, like the head's 8192 columns, streams from L3 or memory)
      __builtin_prefetch(a + (k + PREFETCH) * LINEAR_PANEL);
      if constexpr (NV == 2) __builtin_prefetch(b + (k + PREFETCH) * LINEAR_PANEL);
      Vec w[NV];
      w[0] = Vec::loadu(a + k * LINEAR_PANEL);
      if constexpr (NV == 2) w[1] = Vec::loadu(b + k * LINEAR_PANEL);
      for (int r = 0; r < R; ++r) {
        const Vec xr(x[r * ldx + k]);
        for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(xr, w[v], acc[r][v]);
      }
    }
    const bool last = k1 == K;
    for (int v = 0; v < NV; ++v) {
      const int64_t c = c0 + v * VEC;
      const int64_t n = std::min<int64_t>(VEC, N - c);
      if (n <= 0) break;
      Vec add(0.f);
      if (last && bias != nullptr) add = n == VEC ? Vec::loadu(bias + c) : Vec::loadu(bias + c, n);
      for (int r = 0; r < R; ++r) {
        float* o = out + r * ldo + c;
        Vec y = acc[r][v] + add;
        if (k0 > 0) y = y + (n == VEC ? Vec::loadu(o) : Vec::loadu(o, n));
        if (n == VEC)
          y.store(o);
        else
          y.store(o, n);
      }
    }
  }
}

template <int NV>
void rows(int R, const float* x, int64_t ldx, const float* a, const float* b, int64_t K, const float* bias,
          int64_t c0, int64_t N, float* out, int64_t ldo) {
  switch (R) {
#define DALLE_FAST_TILE(r) \
  case r:                  \
    return tile<(r <= MR ? r : MR), NV>(x, ldx, a, b, K, bias, c0, N, out, ldo);
    DALLE_FAST_TILE(1)
    DALLE_FAST_TILE(2)
    DALLE_FAST_TILE(3)
    DALLE_FAST_TILE(4)
    DALLE_FAST_TILE(5)
    DALLE_FAST_TILE(6)
    DALLE_FAST_TILE(7)
    DALLE_FAST_TILE(8)
#undef DALLE_FAST_TILE
    default:
      return;
  }
}

}  // namespace

void packed_linear(const LinearArgs& p) {
  const int64_t panels = (p.N + LINEAR_PANEL - 1) / LINEAR_PANEL;
  const int64_t n_blocks = (p.N + BLOCK - 1) / BLOCK;
  // at least ~64K multiply-adds per task: below that a thread costs more than it saves
  const int64_t per_block = std::max<int64_t>(1, p.M * p.K * BLOCK);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / per_block);
  at::parallel_for(0, n_blocks, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t c0 = blk * BLOCK;
      const float* a = p.packed + (c0 / LINEAR_PANEL) * p.K * LINEAR_PANEL + c0 % LINEAR_PANEL;
      const int64_t cb = c0 + VEC;  // first column of stream b
      const bool two = cb / LINEAR_PANEL < panels;
      const float* b = p.packed + (cb / LINEAR_PANEL) * p.K * LINEAR_PANEL + cb % LINEAR_PANEL;
      for (int64_t m0 = 0; m0 < p.M; m0 += MR) {
        const int R = static_cast<int>(std::min<int64_t>(MR, p.M - m0));
        const float* x = p.x + m0 * p.ldx;
        float* out = p.out + m0 * p.ldo;
        if (two)
          rows<2>(R, x, p.ldx, a, b, p.K, p.bias, c0, p.N, out, p.ldo);
        else
          rows<1>(R, x, p.ldx, a, nullptr, p.K, p.bias, c0, p.N, out, p.ldo);
      }
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace dalle_fast
