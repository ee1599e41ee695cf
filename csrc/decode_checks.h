// Argument checks of decode_attention and sample shared by the CPU and CUDA bindings (TORCH_CHECK,
// naming the argument). Value checks that need the host (pos range, prompt ids) are done by the
// CPU binding; the CUDA kernels validate them on the device instead (no host synchronisation).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "common/decode_index.h"
#include "common/mask.h"
#include "common/sampling.h"
#include "layout_checks.h"

namespace dalle_fast {

inline LayoutParams decode_layout(int64_t kind, int64_t text_len, int64_t image_size, int64_t kernel_size,
                                  int64_t dilation) {
  return checked_layout("dalle_fast.decode_attention", kind, text_len, image_size, kernel_size, dilation);
}

struct DecodeInfo {
  int64_t B, H, D, cache_len, cache_offset, prompts;
  bool shared;
};

inline void check_cache_tensor(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.dim() == 4, "dalle_fast.decode_attention: ", name, " must be 4-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), "dalle_fast.decode_attention: ", name,
                    " must have q's dtype ", q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), "dalle_fast.decode_attention: ", name, " must be on q's device ",
                    q.device(), ", got ", t.device());
  TORCH_CHECK_VALUE(t.size(3) == q.size(3), "dalle_fast.decode_attention: ", name, " must have head_dim ",
                    q.size(3), ", got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.stride(3) == 1 || t.size(3) == 1, "dalle_fast.decode_attention: ", name,
                    " must be contiguous in its last dim, got strides ", t.strides());
}

inline DecodeInfo check_decode(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                               const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos,
                               const c10::optional<at::Tensor>& text_k, const c10::optional<at::Tensor>& text_v,
                               const c10::optional<at::Tensor>& prompt_index, const LayoutParams& L) {
  TORCH_CHECK_VALUE(q.dim() == 4 && q.size(2) == 1, "dalle_fast.decode_attention: q must be (batch, heads, 1, head_dim), got ",
                    q.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                    "dalle_fast.decode_attention: dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK_VALUE(k_new.sizes() == q.sizes(), "dalle_fast.decode_attention: k_new must have q's shape ", q.sizes(),
                    ", got ", k_new.sizes());
  TORCH_CHECK_VALUE(v_new.sizes() == q.sizes(), "dalle_fast.decode_attention: v_new must have q's shape ", q.sizes(),
                    ", got ", v_new.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&k_new, "k_new"}, {&v_new, "v_new"}}) {
    TORCH_CHECK_VALUE(t->scalar_type() == dt, "dalle_fast.decode_attention: ", name, " must have q's dtype ", dt,
                      ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == q.device(), "dalle_fast.decode_attention: ", name, " must be on q's device ",
                      q.device(), ", got ", t->device());
  }
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  check_cache_tensor(k_cache, "k_cache", q);
  check_cache_tensor(v_cache, "v_cache", q);
  // the caches are written in place: no two elements may share memory (an expanded cache would take
  // every row's new key in one slot), nor may the two caches overlap
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&k_cache, "k_cache"}, {&v_cache, "v_cache"}})
    TORCH_CHECK_VALUE(at::has_internal_overlap(*t) != at::MemOverlap::Yes, "dalle_fast.decode_attention: ", name,
                      " is written in place and must not have elements that share memory (expanded or stride-0 dims), "
                      "got strides ", t->strides());
  const auto overlap = at::get_overlap_status(k_cache, v_cache);
  TORCH_CHECK_VALUE(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial,
                    "dalle_fast.decode_attention: k_cache and v_cache must not share memory");
  TORCH_CHECK_VALUE(k_cache.size(0) == B && k_cache.size(1) == H, "dalle_fast.decode_attention: k_cache must be (",
                    B, ", ", H, ", cache_len, ", D, "), got ", k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "dalle_fast.decode_attention: v_cache must have k_cache's shape ",
                    k_cache.sizes(), ", got ", v_cache.sizes());
  TORCH_CHECK_VALUE(pos.scalar_type() == at::kLong, "dalle_fast.decode_attention: pos must be int64, got ",
                    pos.scalar_type());
  TORCH_CHECK_VALUE(pos.device() == q.device(), "dalle_fast.decode_attention: pos must be on q's device ", q.device(),
                    ", got ", pos.device());
  TORCH_CHECK_VALUE(pos.dim() == 0 || (pos.dim() == 1 && pos.size(0) == B),
                    "dalle_fast.decode_attention: pos must be 0-dim or (batch,) = (", B, ",), got shape ", pos.sizes());
  const bool shared = text_k.has_value();
  TORCH_CHECK_VALUE(text_v.has_value() == shared && prompt_index.has_value() == shared,
                    "dalle_fast.decode_attention: text_k_cache, text_v_cache and prompt_index go together");
  DecodeInfo info{B, H, D, k_cache.size(2), shared ? L.text_len : 0, 0, shared};
  TORCH_CHECK_VALUE(info.cache_len >= 1, "dalle_fast.decode_attention: k_cache must hold at least one position");
  if (shared) {
    check_cache_tensor(*text_k, "text_k_cache", q);
    check_cache_tensor(*text_v, "text_v_cache", q);
    TORCH_CHECK_VALUE(text_k->size(1) == H && text_k->size(2) >= L.text_len,
                      "dalle_fast.decode_attention: text_k_cache must be (prompts, ", H, ", >= text_len = ", L.text_len,
                      ", ", D, "), got ", text_k->sizes());
    TORCH_CHECK_VALUE(text_v->sizes() == text_k->sizes(), "dalle_fast.decode_attention: text_v_cache must have ",
                      "text_k_cache's shape ", text_k->sizes(), ", got ", text_v->sizes());
    info.prompts = text_k->size(0);
    TORCH_CHECK_VALUE(info.prompts >= 1, "dalle_fast.decode_attention: text_k_cache must hold at least one prompt");
    TORCH_CHECK_VALUE(prompt_index->scalar_type() == at::kLong && prompt_index->dim() == 1 && prompt_index->size(0) == B,
                      "dalle_fast.decode_attention: prompt_index must be int64 (batch,) = (", B, ",), got ",
                      prompt_index->scalar_type(), " ", prompt_index->sizes());
    TORCH_CHECK_VALUE(prompt_index->device() == q.device(), "dalle_fast.decode_attention: prompt_index must be on q's device");
  }
  return info;
}

// Host-side value checks (CPU tensors): pos in range for the layout and the cache, prompt ids.
// ``pos`` must be the contiguous tensor the kernel then reads (a strided view's data_ptr is not its
// values in order).
inline void check_decode_values(const at::Tensor& pos, const c10::optional<at::Tensor>& prompt_index,
                                const DecodeInfo& info, const LayoutParams& L) {
  const at::Tensor p = pos.reshape({-1});
  const int64_t* pp = p.data_ptr<int64_t>();
  for (int64_t i = 0; i < p.numel(); ++i) {
    TORCH_CHECK_VALUE(pp[i] >= info.cache_offset && pp[i] < L.seq_len(), "dalle_fast.decode_attention: pos[", i, "] = ",
                      pp[i], " must be in [", info.cache_offset, ", ", L.seq_len(), ")",
                      info.shared ? " (with shared text caches only image positions are decoded)" : "");
    TORCH_CHECK_VALUE(pp[i] - info.cache_offset < info.cache_len, "dalle_fast.decode_attention: cache too short: pos[",
                      i, "] = ", pp[i], " needs cache_len > ", pp[i] - info.cache_offset, ", got ", info.cache_len);
  }
  if (info.shared) {
    const at::Tensor pi = prompt_index->contiguous();
    const int64_t* ip = pi.data_ptr<int64_t>();
    for (int64_t i = 0; i < pi.numel(); ++i)
      TORCH_CHECK_VALUE(ip[i] >= 0 && ip[i] < info.prompts, "dalle_fast.decode_attention: prompt_index[", i, "] = ",
                        ip[i], " must be in [0, ", info.prompts, ")");
  }
}

// Checks of sample's arguments; returns the kernel parameters.
inline SampleParams check_sample(const at::Tensor& logits, const at::Tensor& seeds, const at::Tensor& step,
                                 const c10::optional<at::Tensor>& uncond, double cfg_scale, double temperature,
                                 int64_t top_k, double top_p, int64_t vocab_lo, int64_t vocab_hi) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "dalle_fast.sample: logits must be (batch, vocab), got shape ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                    "dalle_fast.sample: logits must be float32, bfloat16 or float16, got ", dt);
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(V >= 1, "dalle_fast.sample: logits must have a non-empty vocab dim");
  TORCH_CHECK_VALUE(seeds.scalar_type() == at::kLong && seeds.dim() == 1 && seeds.size(0) == B,
                    "dalle_fast.sample: seeds must be int64 (batch,) = (", B, ",), got ", seeds.scalar_type(), " ",
                    seeds.sizes());
  TORCH_CHECK_VALUE(seeds.device() == logits.device(), "dalle_fast.sample: seeds must be on logits' device");
  TORCH_CHECK_VALUE(step.scalar_type() == at::kLong && step.numel() == 1,
                    "dalle_fast.sample: step must be a one-element int64 tensor, got ", step.scalar_type(), " ", step.sizes());
  TORCH_CHECK_VALUE(step.device() == logits.device(), "dalle_fast.sample: step must be on logits' device");
  if (uncond.has_value()) {
    TORCH_CHECK_VALUE(uncond->sizes() == logits.sizes() && uncond->scalar_type() == dt && uncond->device() == logits.device(),
                      "dalle_fast.sample: uncond_logits must match logits in shape, dtype and device, got ",
                      uncond->sizes(), " ", uncond->scalar_type());
  }
  TORCH_CHECK_VALUE(temperature >= 0 && std::isfinite(temperature), "dalle_fast.sample: temperature must be >= 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(top_k >= 0, "dalle_fast.sample: top_k must be >= 0, got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, "dalle_fast.sample: top_p must be in (0, 1], got ", top_p);
  TORCH_CHECK_VALUE(std::isfinite(cfg_scale), "dalle_fast.sample: cfg_scale must be finite, got ", cfg_scale);
  TORCH_CHECK_VALUE(vocab_lo >= 0 && vocab_lo < vocab_hi && vocab_hi <= V, "dalle_fast.sample: vocab_range must satisfy ",
                    "0 <= lo < hi <= vocab = ", V, ", got (", vocab_lo, ", ", vocab_hi, ")");
  TORCH_CHECK_VALUE(vocab_hi - vocab_lo <= SAMPLE_MAX_RANGE, "dalle_fast.sample: vocab_range (", vocab_lo, ", ",
                    vocab_hi, ") holds ", vocab_hi - vocab_lo, " tokens; at most ", SAMPLE_MAX_RANGE,
                    " are supported (the exact 64-bit integer weight sums would overflow)");
  SampleParams p{};
  p.batch = B;
  p.vocab = V;
  p.lo = vocab_lo;
  p.hi = vocab_hi;
  p.top_k = top_k;
  p.top_p = top_p;
  p.cfg_scale = static_cast<float>(cfg_scale);
  p.guided = uncond.has_value();
  // Only temperature 0 is greedy. A positive temperature so small that log2(e) / temperature
  // overflows float (below ~4e-39) still samples (ties at the max share the mass, as in the
  // reference): the factor saturates at FLT_MAX, which gives every logit more than ~1e-37 below
  // the max weight 0 and the max (x - x_max = 0) full weight, never 0 * inf.
  const double s = 1.4426950408889634 / temperature;
  p.greedy = temperature == 0;
  p.exp2_scale = p.greedy ? 0.f : static_cast<float>(std::min(s, static_cast<double>(FLT_MAX)));
  return p;
}

}  // namespace dalle_fast
