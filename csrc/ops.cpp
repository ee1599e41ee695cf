// Op schemas of the dalle_fast namespace, defined once. Implementations live in *_impl.cpp
// (TORCH_LIBRARY_IMPL per dispatch key); autograd and fake kernels are registered in
// dalle_fast/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(dalle_fast, m) {
  // Block-sparse masked attention. q, k, v: (B, H, N, D). Layout given by its integers
  // (dalle_fast.masks.Layout.params()). Returns (out (B, H, N, D) in q's dtype,
  // lse (B, H, N) float32, natural-log log-sum-exp of the scaled scores).
  m.def(
      "sparse_attention_fwd(Tensor q, Tensor k, Tensor v, int kind, int text_len, int image_size, "
      "int kernel_size, int dilation, float scale) -> (Tensor, Tensor)");
  // Its backward: returns (dq, dk, dv) in the inputs' dtype.
  m.def(
      "sparse_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "int kind, int text_len, int image_size, int kernel_size, int dilation, float scale) "
      "-> (Tensor, Tensor, Tensor)");
}
