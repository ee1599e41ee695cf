// C++ smoke test of the CMake-built library: the sparse_attention op is registered and, for the
// `full` kind, equals dense causal attention computed with ATen.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <iostream>

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("dalle_fast::sparse_attention_fwd", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                          const at::Tensor&, int64_t, int64_t, int64_t,
                                                          int64_t, int64_t, double)>();
  at::manual_seed(0);
  const int64_t B = 2, H = 3, T = 5, S = 4, N = T + S * S, D = 16;
  const double scale = 1.0 / std::sqrt(double(D));
  auto q = at::randn({B, H, N, D}), k = at::randn({B, H, N, D}), v = at::randn({B, H, N, D});
  auto [out, lse] = op.call(q, k, v, /*kind=full*/ 0, T, S, 11, 1, scale);
  auto scores = at::matmul(q, k.transpose(-1, -2)) * scale;
  auto causal = at::ones({N, N}, at::kBool).tril();
  auto ref = at::matmul(at::softmax(scores.masked_fill(causal.logical_not(), -INFINITY), -1), v);
  const double err = (out - ref).abs().max().item<double>();
  std::cout << "dalle_fast_smoke: max error vs dense causal attention " << err << std::endl;
  return err < 1e-4 ? 0 : 1;
}
