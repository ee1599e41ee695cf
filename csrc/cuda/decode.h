// Launch interface of the CUDA decode-attention and sampling kernels (no torch types; the bindings
// in csrc/decode_cuda_impl.cpp fill these structs and pass the current stream).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/mask.h"
#include "common/sampling.h"

namespace dalle_fast {
namespace cuda {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct DecodeParams {
  int dtype;                          // DType of q, k_new, v_new, caches and out
  int batch, heads, head_dim;         // head_dim in {32, 64, 128}
  const void* q;                      // (B, H, D) contiguous
  const void* k_new;
  const void* v_new;
  void* k_cache;                      // (B, H, L, D), strides in elements, 16-byte aligned rows
  void* v_cache;
  int64_t kc_s0, kc_s1, kc_s2, vc_s0, vc_s1, vc_s2;
  int64_t cache_len;                  // L
  int64_t cache_offset;               // T with shared text caches, else 0
  const void* text_k;                 // (P, H, >= T, D) or nullptr
  const void* text_v;
  int64_t tk_s0, tk_s1, tk_s2, tv_s0, tv_s1, tv_s2;
  int64_t prompts;                    // P
  const int64_t* prompt_index;        // (B,) or nullptr
  const int64_t* pos;                 // pos[b * pos_stride]
  int64_t pos_stride;
  LayoutParams layout;
  float scale;
  void* out;                          // (B, H, D) contiguous, q's dtype
  float* part_o;                      // (B, H, num_splits, D) when num_splits > 1
  float* part_lse;                    // (B, H, num_splits), log2 units
  int num_splits;                     // splits of the launch; each query uses as many as its list needs
};

// Number of key splits for a launch (flash-decoding), for the layout's longest key list on
// `sm_count` SMs (decode_plan_splits; a query with a shorter list uses fewer: decode_split).
int decode_num_splits(int64_t batch_heads, int64_t max_keys, int sm_count);

void launch_decode_attention(const DecodeParams& p, cudaStream_t stream);

struct SampleLaunch {
  SampleParams p;
  int dtype;                          // DType of logits / uncond
  const void* cond;                   // (B, vocab) rows of stride `row_stride`
  const void* uncond;                 // or nullptr
  int64_t row_stride, uncond_row_stride;
  const int64_t* seeds;               // (B,)
  const int64_t* step;                // one element
  int64_t* tokens;                    // (B,)
  int32_t* errors;                    // (B,)
};

void launch_sample(const SampleLaunch& s, cudaStream_t stream);

}  // namespace cuda
}  // namespace dalle_fast
