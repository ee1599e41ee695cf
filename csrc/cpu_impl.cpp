// CPU implementations of the dalle_fast ops: argument checks, then a kernel call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "common/mask.h"
#include "layout_checks.h"
#include "cpu/dispatch.h"
#include "cpu/schedule.h"
#include "cpu/sparse_attention.h"

namespace dalle_fast {
namespace {

constexpr int64_t CPU_MAX_HEAD_DIM = 256;

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const LayoutParams& L) {
  TORCH_CHECK_VALUE(q.dim() == 4, "dalle_fast.sparse_attention: q must be (batch, heads, seq, head_dim), got ",
                    q.dim(), " dims");
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "dalle_fast.sparse_attention: k must have q's shape ", q.sizes(),
                    ", got ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == q.sizes(), "dalle_fast.sparse_attention: v must have q's shape ", q.sizes(),
                    ", got ", v.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "dalle_fast.sparse_attention (cpu): ", name,
                      " must be on the CPU, got ", t->device());
    TORCH_CHECK_VALUE(t->scalar_type() == q.scalar_type(), "dalle_fast.sparse_attention: ", name,
                      " must have q's dtype ", q.scalar_type(), ", got ", t->scalar_type());
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                    "dalle_fast.sparse_attention (cpu): dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK_VALUE(q.size(2) >= 1 && q.size(2) <= L.seq_len(), "dalle_fast.sparse_attention: seq (",
                    q.size(2), ") must be in [1, text_len + image_size**2 = ", L.seq_len(), "]");
  TORCH_CHECK_VALUE(q.size(3) >= 1 && q.size(3) <= CPU_MAX_HEAD_DIM,
                    "dalle_fast.sparse_attention (cpu): head_dim must be in [1, ", CPU_MAX_HEAD_DIM, "], got ",
                    q.size(3));
}

// float32 and contiguous (no copy when it already is).
at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, int64_t kind,
                                                            int64_t text_len, int64_t image_size,
                                                            int64_t kernel_size, int64_t dilation,
                                                            double scale) {
  const LayoutParams L = checked_layout("dalle_fast.sparse_attention", kind, text_len, image_size, kernel_size, dilation);
  check_qkv(q, k, v, L);
  check_scale("dalle_fast.sparse_attention", scale);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  auto sched = cpu::get_schedule(L, N, cpu::TILE_M, cpu::TILE_N);
  // float32, contiguous, sequence order: the kernel handles the permutation itself
  const at::Tensor qc = f32(q), kc = f32(k), vc = f32(v);
  at::Tensor out = at::empty({B, H, N, D}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  if (B * H > 0) {
    cpu::kernels().sparse_attention_forward(*sched, cpu::AttnProblem{B * H, N, D, static_cast<float>(scale)},
                                  qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(),
                                  out.data_ptr<float>(), lse.data_ptr<float>());
  }
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse, int64_t kind,
    int64_t text_len, int64_t image_size,
    int64_t kernel_size, int64_t dilation, double scale) {
  const LayoutParams L = checked_layout("dalle_fast.sparse_attention", kind, text_len, image_size, kernel_size, dilation);
  check_qkv(q, k, v, L);
  check_scale("dalle_fast.sparse_attention backward", scale);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes(), "dalle_fast.sparse_attention backward: grad_out must have shape ",
                    q.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK_VALUE(out.sizes() == q.sizes(), "dalle_fast.sparse_attention backward: out must have shape ",
                    q.sizes(), ", got ", out.sizes());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == N,
                    "dalle_fast.sparse_attention backward: lse must be (batch, heads, seq), got ", lse.sizes());
  c10::optional<at::Tensor> glse;
  if (grad_lse.has_value() && grad_lse->defined()) {
    TORCH_CHECK_VALUE(grad_lse->sizes() == lse.sizes(), "dalle_fast.sparse_attention backward: grad_lse must be ",
                      "(batch, heads, seq), got ", grad_lse->sizes());
    glse = f32(*grad_lse);
  }
  auto sched = cpu::get_schedule(L, N, cpu::TILE_M, cpu::TILE_N);
  // float32, contiguous, sequence order (no copies for float32 contiguous inputs): the kernel does
  // the permutation, scaling, transposes and delta itself, per head
  const at::Tensor qc = f32(q), kc = f32(k), vc = f32(v), gc = f32(grad_out), oc = f32(out), lc = f32(lse);
  at::Tensor dq = at::empty({B, H, N, D}, q.options().dtype(at::kFloat));
  at::Tensor dk = at::empty_like(dq), dv = at::empty_like(dq);
  if (B * H > 0) {
    const cpu::BwdInputs in{qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(),
                            gc.data_ptr<float>(), oc.data_ptr<float>(), lc.data_ptr<float>(),
                            glse ? glse->data_ptr<float>() : nullptr};
    cpu::kernels().sparse_attention_backward(*sched, cpu::AttnProblem{B * H, N, D, static_cast<float>(scale)}, in,
                                   dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>());
  }
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("sparse_attention_fwd", &sparse_attention_fwd_cpu);
  m.impl("sparse_attention_bwd", &sparse_attention_bwd_cpu);
}

TORCH_LIBRARY_IMPL(dalle_fast, CompositeExplicitAutograd, m) {
  m.impl("_cpu_isa", [] { return cpu::isa(); });
  m.impl("_cpu_isas", [] { return cpu::available_isas(); });
  m.impl("_set_cpu_isa", [](std::string isa) { cpu::set_isa(isa); });
}

}  // namespace dalle_fast
