// CPU implementations of the decode step's linear layer (csrc/cpu/linear.cpp): packing a weight
// into column panels once, then x @ W^T + bias against the packed weight.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/dispatch.h"
#include "cpu/linear.h"

namespace dalle_fast {
namespace {

constexpr int64_t PANEL = cpu::LINEAR_PANEL;

at::Tensor pack_linear_weight_cpu(const at::Tensor& weight) {
  TORCH_CHECK_VALUE(weight.device().is_cpu(), "dalle_fast.pack_linear_weight: weight must be on the CPU, got ",
                    weight.device());
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kFloat,
                    "dalle_fast.pack_linear_weight: weight must be float32, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) > 0 && weight.size(1) > 0,
                    "dalle_fast.pack_linear_weight: weight must be (out_features, in_features) with both > 0, got "
                    "shape ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1), panels = (N + PANEL - 1) / PANEL;
  at::Tensor padded = at::zeros({panels * PANEL, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  return padded.view({panels, PANEL, K}).transpose(1, 2).contiguous();  // (panels, K, 16)
}

at::Tensor packed_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                             int64_t out_features) {
  const char* op = "dalle_fast.packed_linear";
  TORCH_CHECK_VALUE(x.device().is_cpu() && packed.device().is_cpu(), op,
                    ": x and packed must be on the CPU, got ", x.device(), " and ", packed.device());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(packed.scalar_type() == at::kFloat, op, ": packed must be float32, got ",
                    packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 3 && packed.size(2) == PANEL && packed.is_contiguous(), op,
                    ": packed must be a contiguous (panels, in_features, ", PANEL,
                    ") tensor from pack_linear_weight, got shape ", packed.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == packed.size(1), op, ": x must be (..., in_features = ",
                    packed.size(1), "), got shape ", x.sizes());
  const int64_t K = packed.size(1), N = out_features;
  TORCH_CHECK_VALUE(N > 0 && (N + PANEL - 1) / PANEL == packed.size(0), op, ": out_features must be in (",
                    (packed.size(0) - 1) * PANEL, ", ", packed.size(0) * PANEL, "] for packed of ", packed.size(0),
                    " panels, got ", N);
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                          bias->size(0) == N,
                      op, ": bias must be a float32 CPU tensor of shape (", N, "), got ", bias->scalar_type(), " ",
                      bias->device(), " shape ", bias->sizes());
    b = bias->contiguous();
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out = at::empty(out_shape, x.options());
  at::Tensor x2 = x.reshape({-1, K});
  const int64_t M = x2.size(0);
  if (M == 0) return out;
  if (x2.stride(1) != 1 || (M > 1 && x2.stride(0) < K)) x2 = x2.contiguous();
  cpu::LinearArgs a{};
  a.M = M;
  a.K = K;
  a.N = N;
  a.x = x2.data_ptr<float>();
  a.ldx = x2.stride(0);
  a.packed = packed.data_ptr<float>();
  a.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  a.out = out.data_ptr<float>();
  a.ldo = N;
  cpu::kernels().packed_linear(a);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("pack_linear_weight", &pack_linear_weight_cpu);
  m.impl("packed_linear", &packed_linear_cpu);
}

}  // namespace dalle_fast
