// CPU implementations of the dalle_fast ops: argument checks, then a kernel call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "common/mask.h"
#include "layout_checks.h"
#include "cpu/schedule.h"
#include "cpu/sparse_attention.h"

namespace dalle_fast {
namespace {

// Tile sizes of the CPU kernels: 64 queries x 32 keys wastes little on row/column masks
// (S = 32) while keeping the GEMMs large enough for the BLAS.
constexpr int64_t CPU_BM = 64;
constexpr int64_t CPU_BN = 32;
constexpr int64_t CPU_MAX_HEAD_DIM = 256;

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const LayoutParams& L) {
  TORCH_CHECK(q.dim() == 4, "dalle_fast.sparse_attention: q must be (batch, heads, seq, head_dim), got ",
              q.dim(), " dims");
  TORCH_CHECK(k.sizes() == q.sizes(), "dalle_fast.sparse_attention: k must have q's shape ", q.sizes(),
              ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), "dalle_fast.sparse_attention: v must have q's shape ", q.sizes(),
              ", got ", v.sizes());
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), "dalle_fast.sparse_attention (cpu): tensors must be on the CPU, got ",
                t->device());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(),
                "dalle_fast.sparse_attention: q, k, v must share a dtype, got ", q.scalar_type(), " and ",
                t->scalar_type());
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "dalle_fast.sparse_attention (cpu): dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(q.size(2) >= 1 && q.size(2) <= L.seq_len(), "dalle_fast.sparse_attention: seq (",
              q.size(2), ") must be in [1, text_len + image_size**2 = ", L.seq_len(), "]");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= CPU_MAX_HEAD_DIM,
              "dalle_fast.sparse_attention (cpu): head_dim must be in [1, ", CPU_MAX_HEAD_DIM, "], got ",
              q.size(3));
}

// dst[b, h, i] = src[b, h, idx[i]] for contiguous float32 (B, H, N[, D]) tensors sharing B, H, N:
// rows gathered with memcpy in one parallel region over (tensor, b, h) (several times faster here
// than index_select on dim 2, and one synchronisation point for all the tensors).
std::vector<at::Tensor> gather_rows(const std::vector<at::Tensor>& srcs, const std::vector<int32_t>& idx) {
  std::vector<at::Tensor> dsts;
  for (const auto& t : srcs) dsts.push_back(at::empty_like(t));
  const int64_t BH = srcs[0].size(0) * srcs[0].size(1), N = srcs[0].size(2);
  at::parallel_for(0, static_cast<int64_t>(srcs.size()) * BH, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const at::Tensor& src = srcs[t / BH];
      const int64_t bh = t % BH, W = src.dim() == 4 ? src.size(3) : 1;
      const float* s = src.data_ptr<float>() + bh * N * W;
      float* d = dsts[t / BH].data_ptr<float>() + bh * N * W;
      for (int64_t i = 0; i < N; ++i) std::memcpy(d + i * W, s + idx[i] * W, W * sizeof(float));
    }
  });
  return dsts;
}

// float32, contiguous, sequence dim (2 of (B, H, N[, D])) in the schedule's processing order.
std::vector<at::Tensor> to_slots(const std::vector<at::Tensor>& ts, const cpu::Schedule& s) {
  std::vector<at::Tensor> r;
  for (const auto& t : ts) r.push_back(t.to(at::kFloat).contiguous());
  return s.identity ? r : gather_rows(r, s.perm);
}

// (B, H, N, D) -> contiguous (B, H, D, N).
at::Tensor transposed(const at::Tensor& t) { return t.transpose(2, 3).contiguous(); }

// Inverse of to_slots along the sequence dim, cast to `dtype`.
std::vector<at::Tensor> from_slots(const std::vector<at::Tensor>& ts, const cpu::Schedule& s,
                                   at::ScalarType dtype) {
  std::vector<at::Tensor> r = s.identity ? ts : gather_rows(ts, s.inv_perm);
  for (auto& t : r) t = t.to(dtype);
  return r;
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, int64_t kind,
                                                            int64_t text_len, int64_t image_size,
                                                            int64_t kernel_size, int64_t dilation,
                                                            double scale) {
  const LayoutParams L = checked_layout("dalle_fast.sparse_attention", kind, text_len, image_size, kernel_size, dilation);
  check_qkv(q, k, v, L);
  TORCH_CHECK(scale > 0, "dalle_fast.sparse_attention: scale must be positive, got ", scale);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  auto sched = cpu::get_schedule(L, N, CPU_BM, CPU_BN);
  // float32, contiguous, sequence order: the kernel handles the permutation itself
  const at::Tensor qc = q.to(at::kFloat).contiguous(), kc = k.to(at::kFloat).contiguous();
  const at::Tensor vc = v.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, H, N, D}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  if (B * H > 0) {
    cpu::sparse_attention_forward(*sched, cpu::AttnProblem{B * H, N, D, static_cast<float>(scale)},
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
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "dalle_fast.sparse_attention backward: grad_out must have shape ",
              q.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "dalle_fast.sparse_attention backward: out must have shape ",
              q.sizes(), ", got ", out.sizes());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == N,
              "dalle_fast.sparse_attention backward: lse must be (batch, heads, seq), got ", lse.sizes());
  auto sched = cpu::get_schedule(L, N, CPU_BM, CPU_BN);
  const cpu::Schedule& sc = *sched;
  at::Tensor delta = (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1);
  if (grad_lse.has_value() && grad_lse->defined()) {
    TORCH_CHECK(grad_lse->sizes() == lse.sizes(), "dalle_fast.sparse_attention backward: grad_lse must be ",
                "(batch, heads, seq), got ", grad_lse->sizes());
    delta = delta - grad_lse->to(at::kFloat);
  }
  const std::vector<at::Tensor> in_slots = to_slots({q, k, v, grad_out, delta, lse}, sc);
  const at::Tensor qs = in_slots[0].mul(scale), &ks = in_slots[1], &vs = in_slots[2], &gs = in_slots[3];
  const at::Tensor &ds = in_slots[4], &ls = in_slots[5];
  const at::Tensor qst = transposed(qs), kt = transposed(ks), vt = transposed(vs), gst = transposed(gs);
  at::Tensor dq = at::empty({B, H, N, D}, q.options().dtype(at::kFloat));
  at::Tensor dk = at::empty_like(dq), dv = at::empty_like(dq);
  if (B * H > 0) {
    const cpu::BwdInputs in{qs.data_ptr<float>(),  qst.data_ptr<float>(), ks.data_ptr<float>(),
                            kt.data_ptr<float>(),  vs.data_ptr<float>(),  vt.data_ptr<float>(),
                            gs.data_ptr<float>(),  gst.data_ptr<float>(), ls.data_ptr<float>(),
                            ds.data_ptr<float>()};
    cpu::sparse_attention_backward(*sched, cpu::AttnProblem{B * H, N, D, static_cast<float>(scale)}, in, dq.data_ptr<float>(),
                                   dk.data_ptr<float>(), dv.data_ptr<float>());
    dq.mul_(scale);
  }
  const auto dt = q.scalar_type();
  std::vector<at::Tensor> grads = from_slots({dq, dk, dv}, sc, dt);
  return {grads[0], grads[1], grads[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("sparse_attention_fwd", &sparse_attention_fwd_cpu);
  m.impl("sparse_attention_bwd", &sparse_attention_bwd_cpu);
}

}  // namespace dalle_fast
