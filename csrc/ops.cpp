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
  // Its backward: returns (dq, dk, dv) in the inputs' dtype. grad_lse (B, H, N) or None: the
  // gradient of the lse output (d lse / d score = softmax, so it folds into delta).
  m.def(
      "sparse_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? grad_lse, int kind, int text_len, int image_size, int kernel_size, int dilation, "
      "float scale) -> (Tensor, Tensor, Tensor)");

  // KV-cached decode step (csrc/decode_*_impl.cpp). q, k_new, v_new: (B, H, 1, D); caches
  // (B, H, L, D), written in place at pos (int64, (B,) or 0-dim). With the optional shared text
  // caches text_k_cache/text_v_cache (P, H, >= T, D) and prompt_index (B,) the text keys of row b
  // come from prompt prompt_index[b] and the per-row caches hold image positions only (slot
  // pos - T). Returns (B, H, 1, D) in q's dtype.
  m.def(
      "decode_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor pos, Tensor? text_k_cache, Tensor? text_v_cache, Tensor? prompt_index, int kind, "
      "int text_len, int image_size, int kernel_size, int dilation, float scale) -> Tensor");
  // One token per row of logits (B, V): guidance, vocab range [vocab_lo, vocab_hi), temperature,
  // top-k, top-p, Philox draw keyed by (seeds[b], step). Returns (tokens int64 (B,), error int32
  // (B,): 0 ok, 1 NaN/+inf, 2 all -inf; the CPU kernel raises instead).
  m.def(
      "sample(Tensor logits, Tensor seeds, Tensor step, Tensor? uncond_logits, float cfg_scale, "
      "float temperature, int top_k, float top_p, int vocab_lo, int vocab_hi) -> (Tensor, Tensor)");
  // The decode step's linear layers (csrc/cpu/linear.h): weight (N, K) packed once into column
  // panels (ceil(N / 16), K, 16); then x (..., K) -> x @ weight^T + bias (..., N), float32, CPU.
  // One residual branch of a CPU decode step (csrc/decode_branch_cpu_impl.cpp), float32, x and
  // residual (rows, dim) or (rows, 1, dim): residual + layer_scale * norm_out(core(shift(norm(x)))),
  // norm_out only with norm_out=True, layer_scale and the biases optional. shift_history (rows,
  // >= S*S, shift_top + shift_left) given: DALLE-pytorch's image token shift at m = pos - text_len
  // (written in place). Attention core: qkv_packed (pack_linear_weight of the (3 * heads * D, dim)
  // weight, or that weight itself), the rotary tables (positions, rot) of cos and sign-folded sin on
  // q, k and v, decode_attention on the caches (its arguments), out_packed. MLP core: w1_packed (hidden
  // or 2 * hidden outputs with geglu), GELU or GEGLU, w2_packed. pos: image positions only.
  m.def(
      "decode_attention_branch(Tensor x, Tensor residual, Tensor? norm_weight, Tensor? norm_bias, float norm_eps, "
      "bool norm_out, Tensor? norm_out_weight, Tensor? norm_out_bias, float norm_out_eps, Tensor? layer_scale, "
      "Tensor(c!)? shift_history, int shift_top, int shift_left, Tensor qkv_packed, Tensor? qkv_bias, int heads, "
      "Tensor? rotary_cos, Tensor? rotary_sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor pos, "
      "Tensor? text_k_cache, Tensor? text_v_cache, Tensor? prompt_index, int kind, int text_len, int image_size, "
      "int kernel_size, int dilation, float scale, Tensor out_packed, Tensor? out_bias) -> Tensor");
  m.def(
      "decode_mlp_branch(Tensor x, Tensor residual, Tensor? norm_weight, Tensor? norm_bias, float norm_eps, "
      "bool norm_out, Tensor? norm_out_weight, Tensor? norm_out_bias, float norm_out_eps, Tensor? layer_scale, "
      "Tensor(c!)? shift_history, int shift_top, int shift_left, Tensor pos, int text_len, int image_size, "
      "Tensor w1_packed, Tensor? b1, int hidden, bool geglu, Tensor w2_packed, Tensor? b2) -> Tensor");
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  // Test hooks of csrc/common/decode_index.h: the key positions of one decode query, and the
  // largest key count over a layout.
  m.def("_decode_key_positions(int pos, int kind, int text_len, int image_size, int kernel_size, "
        "int dilation) -> Tensor");
  m.def("_max_decode_keys(int kind, int text_len, int image_size, int kernel_size, int dilation) -> int");
  // Instruction set of the CPU kernels (csrc/cpu/dispatch.h): the active one, those this CPU runs
  // (lowest first), and a switch to another one.
  m.def("_cpu_isa() -> str");
  m.def("_cpu_isas() -> str[]");
  m.def("_set_cpu_isa(str isa) -> ()");
}
