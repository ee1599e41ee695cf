// Block-sparse schedule of one (layout, seq_len, BM, BN) for the CPU kernels.
//
// Mirrors dalle_fast.masks.Layout.tile_table: positions are processed in permuted order
// (column-major image part for column kinds), grouped into query tiles of BM slots and key tiles of
// BN slots. For each query tile it lists its non-empty key tiles (ascending), and for each key tile
// its non-empty query tiles (the transpose, for backward). Partial tiles carry a BM x BN byte mask
// (row = query slot in the tile, column = key slot in the tile); full tiles need none.
// Built once per distinct argument tuple and cached (thread-safe).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "common/mask.h"

namespace dalle_fast {
namespace cpu {

struct TileRef {
  int32_t tile;      // key tile (in q-major lists) or query tile (in k-major lists)
  int32_t mask_off;  // offset into Schedule::masks, or -1 for a full tile
};

struct Schedule {
  int64_t n = 0, bm = 0, bn = 0, nq = 0, nk = 0;
  bool identity = true;
  std::vector<int32_t> perm;                 // slot -> sequence position
  std::vector<int32_t> inv_perm;             // sequence position -> slot
  std::vector<int32_t> q_ptr;                // nq + 1
  std::vector<TileRef> q_tiles;              // key tiles of each query tile, ascending
  std::vector<int32_t> k_ptr;                // nk + 1
  std::vector<TileRef> k_tiles;              // query tiles of each key tile, ascending
  std::vector<uint8_t> masks;                // BM x BN bytes per partial tile (query-major)
  std::vector<uint8_t> masks_t;              // the same masks transposed (BN x BM, key-major)
  int64_t computed_pairs = 0;                // in-range score entries of all non-empty tiles
};

// Cached schedule for a layout, a run of n positions and the tile sizes.
std::shared_ptr<const Schedule> get_schedule(const LayoutParams& L, int64_t n, int64_t bm, int64_t bn);

}  // namespace cpu
}  // namespace dalle_fast
