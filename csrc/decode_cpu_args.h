// The CPU kernel arguments of one decode_attention call, checked (decode_checks.h): shared by the
// decode_attention op and the fused decode-branch ops (csrc/decode_branch_cpu_impl.cpp).
#pragma once

#include <ATen/ATen.h>

#include "common/decode_index.h"
#include "cpu/decode.h"
#include "decode_checks.h"

namespace dalle_fast {

inline cpu::CacheRef cache_ref(const at::Tensor& t) {
  return cpu::CacheRef{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

inline int cpu_dtype(at::ScalarType t) {
  return t == at::kFloat ? cpu::kF32 : (t == at::kBFloat16 ? cpu::kBF16 : cpu::kF16);
}

// The arguments and the tensors whose memory they point to (keep this alive until the kernel ran).
// ``args.out`` is left for the caller to set.
struct CpuDecodeCall {
  cpu::DecodeArgs args{};
  DecodeInfo info{};
  at::Tensor pos, q, k_new, v_new, prompt_index;
};

inline CpuDecodeCall prepare_cpu_decode(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                        at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& pos,
                                        const c10::optional<at::Tensor>& text_k, const c10::optional<at::Tensor>& text_v,
                                        const c10::optional<at::Tensor>& prompt_index, const LayoutParams& L,
                                        double scale) {
  CpuDecodeCall c;
  c.info = check_decode(q, k_new, v_new, k_cache, v_cache, pos, text_k, text_v, prompt_index, L);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "dalle_fast.decode_attention (cpu): tensors must be on the CPU, got ",
                    q.device());
  check_scale("dalle_fast.decode_attention", scale);
  c.pos = pos.contiguous();  // checked and read by the kernel: the same memory
  check_decode_values(c.pos, prompt_index, c.info, L);
  c.q = q.contiguous();
  c.k_new = k_new.contiguous();
  c.v_new = v_new.contiguous();
  if (c.info.shared) c.prompt_index = prompt_index->contiguous();
  cpu::DecodeArgs& a = c.args;
  a.dtype = cpu_dtype(q.scalar_type());
  a.batch = c.info.B;
  a.heads = c.info.H;
  a.head_dim = c.info.D;
  a.q = c.q.data_ptr();
  a.k_new = c.k_new.data_ptr();
  a.v_new = c.v_new.data_ptr();
  a.k_cache = cache_ref(k_cache);
  a.v_cache = cache_ref(v_cache);
  a.cache_offset = c.info.cache_offset;
  if (c.info.shared) {
    a.text_k = cache_ref(*text_k);
    a.text_v = cache_ref(*text_v);
    a.prompt_index = c.prompt_index.data_ptr<int64_t>();
  }
  a.pos = c.pos.data_ptr<int64_t>();
  a.pos_stride = c.pos.dim() == 0 ? 0 : 1;
  a.layout = L;
  a.scale = static_cast<float>(scale);
  return c;
}

}  // namespace dalle_fast
