// CUDA implementations of decode_attention and sample: argument checks, then a kernel launch on
// the current stream (csrc/cuda/decode_attention.cu, csrc/cuda/sample.cu). No host synchronisation:
// pos / prompt_index values are validated on the device (NaN output for a bad row) and sampling
// errors go to the returned per-row flag.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "common/decode_index.h"
#include "cuda/decode.h"
#include "decode_checks.h"

namespace dalle_fast {
namespace {

int cuda_dtype(at::ScalarType t) {
  return t == at::kFloat ? cuda::kF32 : (t == at::kBFloat16 ? cuda::kBF16 : cuda::kF16);
}

// q, k_new, v_new are read with 16-byte vector loads: a contiguous view at an odd storage offset
// (e.g. buf[1:].view(...)) is copied to fresh (aligned) memory rather than faulting.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

void check_aligned(const at::Tensor& t, const char* name) {
  const int64_t es = t.element_size();
  const bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.stride(0) * es) % 16 == 0 &&
                  (t.stride(1) * es) % 16 == 0 && (t.stride(2) * es) % 16 == 0;
  TORCH_CHECK_VALUE(ok, "dalle_fast.decode_attention (cuda): ", name,
                    " rows must be 16-byte aligned (data pointer and strides), got strides ", t.strides());
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                 at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& pos,
                                 const c10::optional<at::Tensor>& text_k, const c10::optional<at::Tensor>& text_v,
                                 const c10::optional<at::Tensor>& prompt_index, int64_t kind, int64_t text_len,
                                 int64_t image_size, int64_t kernel_size, int64_t dilation, double scale) {
  const LayoutParams L = decode_layout(kind, text_len, image_size, kernel_size, dilation);
  const DecodeInfo info = check_decode(q, k_new, v_new, k_cache, v_cache, pos, text_k, text_v, prompt_index, L);
  TORCH_CHECK_VALUE(q.is_cuda(), "dalle_fast.decode_attention (cuda): tensors must be CUDA tensors, got ", q.device());
  check_scale("dalle_fast.decode_attention", scale);
  TORCH_CHECK_VALUE(info.D == 32 || info.D == 64 || info.D == 128,
                    "dalle_fast.decode_attention (cuda): head_dim must be 32, 64 or 128, got ", info.D);
  check_aligned(k_cache, "k_cache");
  check_aligned(v_cache, "v_cache");
  if (info.shared) {
    check_aligned(*text_k, "text_k_cache");
    check_aligned(*text_v, "text_v_cache");
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = aligned_contiguous(q), kc = aligned_contiguous(k_new), vc = aligned_contiguous(v_new);
  const at::Tensor pi = info.shared ? prompt_index->contiguous() : at::Tensor();
  const at::Tensor pc = pos.contiguous();  // the kernel reads pos with stride 1 (or 0 for a 0-dim pos)
  at::Tensor out = at::empty({info.B, info.H, 1, info.D}, q.options());
  if (info.B * info.H == 0) return out;
  const int64_t max_keys = max_decode_keys(L);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int splits = cuda::decode_num_splits(info.B * info.H, max_keys, sms);
  // launch limits of the grid (rows, key splits <= 64, heads) (decode_attention.cu): gridDim.x <= 2^31 - 1,
  // z <= 65535; the combine kernel's grid is batch * heads blocks
  TORCH_CHECK_VALUE(info.H <= 65535, "dalle_fast.decode_attention (cuda): q must have at most 65535 heads, got ", info.H,
                    " (use the cpu backend)");
  TORCH_CHECK_VALUE(info.B * info.H <= std::numeric_limits<int32_t>::max(),
                    "dalle_fast.decode_attention (cuda): batch * heads must be at most 2^31 - 1, got ", info.B, " * ",
                    info.H);
  at::Tensor part_o, part_lse;
  if (splits > 1) {
    part_o = at::empty({info.B, info.H, splits, info.D}, q.options().dtype(at::kFloat));
    part_lse = at::empty({info.B, info.H, splits}, q.options().dtype(at::kFloat));
  }
  cuda::DecodeParams p{};
  p.dtype = cuda_dtype(q.scalar_type());
  p.batch = static_cast<int>(info.B);
  p.heads = static_cast<int>(info.H);
  p.head_dim = static_cast<int>(info.D);
  p.q = qc.data_ptr();
  p.k_new = kc.data_ptr();
  p.v_new = vc.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.kc_s0 = k_cache.stride(0);
  p.kc_s1 = k_cache.stride(1);
  p.kc_s2 = k_cache.stride(2);
  p.vc_s0 = v_cache.stride(0);
  p.vc_s1 = v_cache.stride(1);
  p.vc_s2 = v_cache.stride(2);
  p.cache_len = info.cache_len;
  p.cache_offset = info.cache_offset;
  if (info.shared) {
    p.text_k = text_k->data_ptr();
    p.text_v = text_v->data_ptr();
    p.tk_s0 = text_k->stride(0);
    p.tk_s1 = text_k->stride(1);
    p.tk_s2 = text_k->stride(2);
    p.tv_s0 = text_v->stride(0);
    p.tv_s1 = text_v->stride(1);
    p.tv_s2 = text_v->stride(2);
    p.prompts = info.prompts;
    p.prompt_index = pi.data_ptr<int64_t>();
  }
  p.pos = pc.data_ptr<int64_t>();
  p.pos_stride = pc.dim() == 0 ? 0 : 1;
  p.layout = L;
  p.scale = static_cast<float>(scale);
  p.out = out.data_ptr();
  p.part_o = splits > 1 ? part_o.data_ptr<float>() : nullptr;
  p.part_lse = splits > 1 ? part_lse.data_ptr<float>() : nullptr;
  p.num_splits = splits;
  cuda::launch_decode_attention(p, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> sample_cuda(const at::Tensor& logits, const at::Tensor& seeds,
                                               const at::Tensor& step, const c10::optional<at::Tensor>& uncond,
                                               double cfg_scale, double temperature, int64_t top_k, double top_p,
                                               int64_t vocab_lo, int64_t vocab_hi) {
  const SampleParams p =
      check_sample(logits, seeds, step, uncond, cfg_scale, temperature, top_k, top_p, vocab_lo, vocab_hi);
  TORCH_CHECK_VALUE(logits.is_cuda(), "dalle_fast.sample (cuda): tensors must be CUDA tensors, got ", logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor c = logits.stride(1) == 1 ? logits : logits.contiguous();
  const at::Tensor u = p.guided ? (uncond->stride(1) == 1 ? *uncond : uncond->contiguous()) : at::Tensor();
  const at::Tensor s = seeds.contiguous();
  const at::Tensor st = step.reshape({1}).contiguous();
  at::Tensor tokens = at::full({p.batch}, p.lo, logits.options().dtype(at::kLong));
  at::Tensor errors = at::zeros({p.batch}, logits.options().dtype(at::kInt));
  cuda::SampleLaunch l{};
  l.p = p;
  l.dtype = cuda_dtype(logits.scalar_type());
  l.cond = c.data_ptr();
  l.uncond = p.guided ? u.data_ptr() : nullptr;
  l.row_stride = c.stride(0);
  l.uncond_row_stride = p.guided ? u.stride(0) : 0;
  l.seeds = s.data_ptr<int64_t>();
  l.step = st.data_ptr<int64_t>();
  l.tokens = tokens.data_ptr<int64_t>();
  l.errors = errors.data_ptr<int32_t>();
  cuda::launch_sample(l, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {tokens, errors};
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) {
  m.impl("decode_attention", &decode_attention_cuda);
  m.impl("sample", &sample_cuda);
}

}  // namespace dalle_fast
