// Argument types of the CPU kernels of KV-cached decoding (plain C++, no torch types). The kernels
// (Kernels::decode_attention and Kernels::sample, cpu/kernels.h):
// - decode_attention writes k_new/v_new at pos, then attends over decode_keys(layout, pos);
// - sample draws one token per row of logits (B, vocab) float32 (row stride = vocab; uncond may be
//   null): tokens[b] gets the token, errors[b] a SAMPLE_* code.
#pragma once

#include <cstdint>

#include "common/mask.h"
#include "common/sampling.h"

namespace dalle_fast {
namespace cpu {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Strides (elements) of a (rows, heads, seq, D) cache whose last dim is contiguous.
struct CacheRef {
  void* data = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0;
};

struct DecodeArgs {
  int dtype;                       // DType of q, k_new, v_new and the caches
  int64_t batch, heads, head_dim;
  const void* q;                   // (B, H, D) contiguous
  const void* k_new;               // (B, H, D) contiguous
  const void* v_new;               // (B, H, D) contiguous
  CacheRef k_cache, v_cache;       // (B, H, L, D); slot of position p is p - cache_offset
  int64_t cache_offset;            // 0, or T when the text part lives in the shared text caches
  CacheRef text_k, text_v;         // (P, H, T, D) shared text caches, data == nullptr when unused
  const int64_t* prompt_index;     // (B,) row -> prompt, nullptr when unused
  const int64_t* pos;              // position of row b at pos[b * pos_stride] (validated)
  int64_t pos_stride;
  LayoutParams layout;
  float scale;
  float* out;                      // (B, H, D) float32
};

}  // namespace cpu
}  // namespace dalle_fast
