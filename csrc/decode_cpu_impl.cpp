// CPU implementations of decode_attention and sample (+ the decode index test ops): argument
// checks, then a kernel call (csrc/cpu/decode_attention.cpp, csrc/cpu/sample.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "common/decode_index.h"
#include "cpu/decode.h"
#include "cpu/dispatch.h"
#include "decode_checks.h"
#include "decode_cpu_args.h"

namespace dalle_fast {
namespace {

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& pos,
                                const c10::optional<at::Tensor>& text_k, const c10::optional<at::Tensor>& text_v,
                                const c10::optional<at::Tensor>& prompt_index, int64_t kind, int64_t text_len,
                                int64_t image_size, int64_t kernel_size, int64_t dilation, double scale) {
  const LayoutParams L = decode_layout(kind, text_len, image_size, kernel_size, dilation);
  CpuDecodeCall c = prepare_cpu_decode(q, k_new, v_new, k_cache, v_cache, pos, text_k, text_v, prompt_index, L, scale);
  at::Tensor out = at::empty({c.info.B, c.info.H, 1, c.info.D}, q.options().dtype(at::kFloat));
  c.args.out = out.data_ptr<float>();
  if (c.info.B * c.info.H > 0) cpu::kernels().decode_attention(c.args);
  return out.to(q.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> sample_cpu(const at::Tensor& logits, const at::Tensor& seeds,
                                              const at::Tensor& step, const c10::optional<at::Tensor>& uncond,
                                              double cfg_scale, double temperature, int64_t top_k, double top_p,
                                              int64_t vocab_lo, int64_t vocab_hi) {
  const SampleParams p =
      check_sample(logits, seeds, step, uncond, cfg_scale, temperature, top_k, top_p, vocab_lo, vocab_hi);
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "dalle_fast.sample (cpu): tensors must be on the CPU, got ",
                    logits.device());
  const at::Tensor c = logits.to(at::kFloat).contiguous();
  const at::Tensor u = p.guided ? uncond->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor s = seeds.contiguous();
  const int64_t st = step.reshape({}).item<int64_t>();
  at::Tensor tokens = at::empty({p.batch}, logits.options().dtype(at::kLong));
  at::Tensor errors = at::zeros({p.batch}, logits.options().dtype(at::kInt));
  if (p.batch > 0) {
    cpu::kernels().sample(p, c.data_ptr<float>(), p.guided ? u.data_ptr<float>() : nullptr, s.data_ptr<int64_t>(), st,
                tokens.data_ptr<int64_t>(), errors.data_ptr<int32_t>());
  }
  const int32_t* e = errors.data_ptr<int32_t>();
  for (int64_t b = 0; b < p.batch; ++b) {
    TORCH_CHECK(e[b] != SAMPLE_NONFINITE, "dalle_fast.sample: logits (or uncond_logits / the guided mix) of row ",
                b, " contain NaN or +inf inside vocab_range");
    TORCH_CHECK(e[b] != SAMPLE_EMPTY, "dalle_fast.sample: every logit of row ", b,
                " inside vocab_range is -inf; nothing to sample");
  }
  return {tokens, errors};
}

at::Tensor decode_key_positions(int64_t pos, int64_t kind, int64_t text_len, int64_t image_size,
                                int64_t kernel_size, int64_t dilation) {
  const LayoutParams L = decode_layout(kind, text_len, image_size, kernel_size, dilation);
  TORCH_CHECK_VALUE(pos >= 0 && pos < L.seq_len(), "dalle_fast._decode_key_positions: pos must be in [0, ", L.seq_len(),
                    "), got ", pos);
  const DecodeKeys d = decode_keys(L, pos);
  at::Tensor out = at::empty({d.total()}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t j = 0; j < d.total(); ++j) o[j] = d.position(j);
  return out;
}

int64_t max_decode_keys_op(int64_t kind, int64_t text_len, int64_t image_size, int64_t kernel_size,
                           int64_t dilation) {
  return max_decode_keys(decode_layout(kind, text_len, image_size, kernel_size, dilation));
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("decode_attention", &decode_attention_cpu);
  m.impl("sample", &sample_cpu);
}

TORCH_LIBRARY_IMPL(dalle_fast, CompositeExplicitAutograd, m) {
  m.impl("_decode_key_positions", &decode_key_positions);
  m.impl("_max_decode_keys", &max_decode_keys_op);
}

}  // namespace dalle_fast
