// The CPU decode step's residual branches, each one op: ``residual + scale * norm_out(core(shift(
// norm(x))))`` for one token per row, with ``core`` the attention (packed to_qkv, rotary embedding,
// decode_attention on the layer's caches, packed to_out) or the feed-forward net (packed linear,
// GELU or GEGLU, packed linear). At the decode step's shapes (a few rows of a few hundred features)
// each of the ~25 torch ops a branch takes from Python costs 3-10 us of dispatch and allocation,
// several times its arithmetic; here a branch is one call. The linear layers (packed weights: the
// per-ISA kernel; plain weights: torch's GEMM) and the attention run the kernels (cpu/kernels.h); the
// norms, the token shift, the rotary embedding and the activation are loops over the step's few rows.
// Float32 only.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/linear.h"
#include "decode_cpu_args.h"

namespace dalle_fast {
namespace {

struct Norm {
  const float* weight = nullptr;  // nullptr: no affine weight
  const float* bias = nullptr;
  float eps = 0.f;
};

// a float32 CPU vector of ``n`` elements (contiguous), or nullptr when absent
const float* vector_arg(const char* op, const char* name, const c10::optional<at::Tensor>& t, int64_t n) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->numel() == n && t->is_contiguous(),
                    op, ": ", name, " must be a contiguous float32 CPU tensor of ", n, " elements, got ",
                    t->scalar_type(), " ", t->device(), " shape ", t->sizes());
  return t->data_ptr<float>();
}

// ``name``: the argument prefix (norm / norm_out); its three arguments are named in full for the errors
Norm norm_arg(const char* op, const char* name, const char* weight_name, const char* bias_name,
              const c10::optional<at::Tensor>& w, const c10::optional<at::Tensor>& b, double eps, int64_t dim) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": ", name, "_eps must be finite and >= 0, got ", eps);
  Norm n;
  n.weight = vector_arg(op, weight_name, w, dim);
  n.bias = vector_arg(op, bias_name, b, dim);
  n.eps = static_cast<float>(eps);
  return n;
}

// LayerNorm of each row (biased variance, as torch), statistics in double
void layer_norm_rows(const float* x, int64_t ldx, float* out, int64_t ldo, int64_t rows, int64_t dim, const Norm& n) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    float* o = out + r * ldo;
    double mean = 0;
    for (int64_t i = 0; i < dim; ++i) mean += xr[i];
    mean /= static_cast<double>(dim);
    double var = 0;
    for (int64_t i = 0; i < dim; ++i) {
      const double d = xr[i] - mean;
      var += d * d;
    }
    var /= static_cast<double>(dim);
    const float rstd = static_cast<float>(1.0 / std::sqrt(var + n.eps)), m = static_cast<float>(mean);
    for (int64_t i = 0; i < dim; ++i) {
      float v = (xr[i] - m) * rstd;
      if (n.weight) v *= n.weight[i];
      if (n.bias) v += n.bias[i];
      o[i] = v;
    }
  }
}

// The residual input ``x`` and the sizes every branch shares.
struct Rows {
  at::Tensor x, residual;  // (rows, dim) views, float32, unit feature stride
  int64_t rows, dim;
};

Rows rows_arg(const char* op, const at::Tensor& x, const at::Tensor& residual) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kFloat, op, ": x must be a float32 CPU tensor, got ",
                    x.scalar_type(), " ", x.device());
  TORCH_CHECK_VALUE((x.dim() == 2 || (x.dim() == 3 && x.size(1) == 1)) && x.size(-1) > 0, op,
                    ": x must be (rows, dim) or (rows, 1, dim), got shape ", x.sizes());
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes() && residual.scalar_type() == at::kFloat && residual.device().is_cpu(),
                    op, ": residual must be a float32 CPU tensor of x's shape ", x.sizes(), ", got ",
                    residual.scalar_type(), " ", residual.sizes());
  Rows r;
  r.rows = x.size(0);
  r.dim = x.size(-1);
  r.x = x.reshape({r.rows, r.dim}).contiguous();
  r.residual = residual.reshape({r.rows, r.dim}).contiguous();
  return r;
}

// DALLE-pytorch's token shift of an image token at m = pos - text_len: the first ``top`` features
// come from the token above (m - S, zeros in the first row), the next ``left`` from the token to the
// left (m - 1, zeros in the first column); ``history (rows, >= S*S, top + left)`` keeps those
// features of every image token fed so far and gets this token's.
struct Shift {
  float* hist = nullptr;
  int64_t s0 = 0, s1 = 0, top = 0, left = 0;
};

Shift shift_arg(const char* op, const c10::optional<at::Tensor>& history, int64_t top, int64_t left, int64_t rows,
                int64_t dim, int64_t image_size) {
  Shift s;
  if (!history.has_value() || !history->defined()) return s;
  const at::Tensor& h = *history;
  TORCH_CHECK_VALUE(top >= 0 && left >= 0 && top + left <= dim, op, ": shift_top and shift_left must be >= 0 with a sum "
                    "<= dim = ", dim, ", got ", top, " and ", left);
  TORCH_CHECK_VALUE(h.device().is_cpu() && h.scalar_type() == at::kFloat && h.dim() == 3 && h.size(0) == rows &&
                        h.size(1) >= image_size * image_size && h.size(2) == top + left && h.stride(2) == 1,
                    op, ": shift_history must be a float32 CPU tensor (rows = ", rows, ", >= image_size^2 = ",
                    image_size * image_size, ", shift_top + shift_left = ", top + left,
                    ") contiguous in its last dim, got ", h.scalar_type(), " shape ", h.sizes(), " strides ",
                    h.strides());
  TORCH_CHECK_VALUE(at::has_internal_overlap(h) != at::MemOverlap::Yes, op,
                    ": shift_history is written in place and must not have elements that share memory");
  s.hist = h.data_ptr<float>();
  s.s0 = h.stride(0);
  s.s1 = h.stride(1);
  s.top = top;
  s.left = left;
  return s;
}

// positions (rows,) from a 0-dim or (rows,) int64 CPU tensor, each in [text_len, text_len + S*S)
std::vector<int64_t> image_positions(const char* op, const at::Tensor& pos, int64_t rows, int64_t text_len,
                                     int64_t image_size) {
  TORCH_CHECK_VALUE(pos.device().is_cpu() && pos.scalar_type() == at::kLong &&
                        (pos.dim() == 0 || (pos.dim() == 1 && pos.size(0) == rows)),
                    op, ": pos must be a 0-dim or (rows,) = (", rows, ",) int64 CPU tensor, got ", pos.scalar_type(),
                    " shape ", pos.sizes());
  const at::Tensor p = pos.reshape({-1}).contiguous();
  std::vector<int64_t> out(static_cast<size_t>(rows));
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t v = p.data_ptr<int64_t>()[pos.dim() == 0 ? 0 : b];
    TORCH_CHECK_VALUE(v >= text_len && v < text_len + image_size * image_size, op, ": pos must be an image position in [",
                      text_len, ", ", text_len + image_size * image_size, "), got ", v);
    out[static_cast<size_t>(b)] = v;
  }
  return out;
}

void token_shift(float* h, int64_t rows, int64_t dim, const Shift& s, const std::vector<int64_t>& pos,
                 int64_t text_len, int64_t S) {
  if (!s.hist) return;
  const int64_t w = s.top + s.left;
  for (int64_t b = 0; b < rows; ++b) {
    float* hr = h + b * dim;
    float* hist = s.hist + b * s.s0;
    const int64_t m = pos[static_cast<size_t>(b)] - text_len;
    std::memcpy(hist + m * s.s1, hr, static_cast<size_t>(w) * sizeof(float));
    if (m >= S)
      std::memcpy(hr, hist + (m - S) * s.s1, static_cast<size_t>(s.top) * sizeof(float));
    else
      std::fill(hr, hr + s.top, 0.f);
    if (m % S)
      std::memcpy(hr + s.top, hist + (m - 1) * s.s1 + s.top, static_cast<size_t>(s.left) * sizeof(float));
    else
      std::fill(hr + s.top, hr + w, 0.f);
  }
}

// A linear layer of in_features K and out_features N: a weight packed by pack_linear_weight (the
// per-ISA kernel, AVX2 / AVX-512), or the plain (N, K) weight (torch's GEMM: the baseline ISA, where
// the packed kernel is slower than torch's).
struct Linear {
  const float* packed = nullptr;
  at::Tensor weight, bias_t;  // plain weight and its bias (undefined when packed / absent)
  const float* bias = nullptr;
  int64_t K = 0, N = 0;
};

Linear linear_arg(const char* op, const char* name, const char* bias_name, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, int64_t K, int64_t N) {
  Linear l;
  if (weight.dim() == 2) {
    TORCH_CHECK_VALUE(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.size(0) == N &&
                          weight.size(1) == K && N > 0,
                      op, ": ", name, " must be a float32 CPU weight (", N, ", ", K,
                      ") or that weight packed by pack_linear_weight, got ", weight.scalar_type(), " shape ",
                      weight.sizes());
    l.weight = weight;
  } else {
    TORCH_CHECK_VALUE(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 3 &&
                          weight.size(1) == K && weight.size(2) == cpu::LINEAR_PANEL && weight.is_contiguous() &&
                          N > 0 && weight.size(0) == (N + cpu::LINEAR_PANEL - 1) / cpu::LINEAR_PANEL,
                      op, ": ", name, " must be a contiguous float32 CPU weight of ", K, " in and ", N,
                      " out features packed by pack_linear_weight (or the plain (", N, ", ", K, ") weight), got ",
                      weight.scalar_type(), " shape ", weight.sizes());
    l.packed = weight.data_ptr<float>();
  }
  l.bias = vector_arg(op, bias_name, bias, N);
  if (l.bias) l.bias_t = *bias;
  l.K = K;
  l.N = N;
  return l;
}

void linear(const Linear& l, const float* x, int64_t rows, float* out) {
  if (rows <= 0) return;
  if (!l.packed) {  // plain weight: out = x W^T (+ bias) by torch's GEMM, in place
    const at::Tensor xt = at::from_blob(const_cast<float*>(x), {rows, l.K}, at::kFloat);
    at::Tensor ot = at::from_blob(out, {rows, l.N}, at::kFloat);
    if (l.bias)
      at::addmm_out(ot, l.bias_t, xt, l.weight.t());
    else
      at::mm_out(ot, xt, l.weight.t());
    return;
  }
  cpu::kernels().packed_linear(cpu::LinearArgs{rows, l.K, l.N, x, l.K, l.packed, l.bias, out, l.N});
}

// The branch's ends: the input norm, and ``residual + layer_scale * norm_out(y)`` into out.
struct Ends {
  Norm norm, norm_out;
  bool has_norm_out = false;
  const float* layer_scale = nullptr;
};

Ends ends_arg(const char* op, int64_t dim, const c10::optional<at::Tensor>& norm_weight,
              const c10::optional<at::Tensor>& norm_bias, double norm_eps, bool norm_out,
              const c10::optional<at::Tensor>& norm_out_weight, const c10::optional<at::Tensor>& norm_out_bias,
              double norm_out_eps, const c10::optional<at::Tensor>& layer_scale) {
  Ends e;
  e.norm = norm_arg(op, "norm", "norm_weight", "norm_bias", norm_weight, norm_bias, norm_eps, dim);
  e.has_norm_out = norm_out;
  if (norm_out)
    e.norm_out = norm_arg(op, "norm_out", "norm_out_weight", "norm_out_bias", norm_out_weight, norm_out_bias,
                          norm_out_eps, dim);
  e.layer_scale = vector_arg(op, "layer_scale", layer_scale, dim);
  return e;
}

at::Tensor finish(const Ends& e, const Rows& r, at::Tensor& y, const at::Tensor& x_in) {
  float* yp = y.data_ptr<float>();
  if (e.has_norm_out) layer_norm_rows(yp, r.dim, yp, r.dim, r.rows, r.dim, e.norm_out);
  at::Tensor out = at::empty_like(r.residual);
  const float* res = r.residual.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t b = 0; b < r.rows; ++b)
    for (int64_t i = 0; i < r.dim; ++i) {
      const float v = e.layer_scale ? yp[b * r.dim + i] * e.layer_scale[i] : yp[b * r.dim + i];
      o[b * r.dim + i] = res[b * r.dim + i] + v;
    }
  return out.view(x_in.sizes());
}

at::Tensor decode_attention_branch_cpu(
    const at::Tensor& x, const at::Tensor& residual, const c10::optional<at::Tensor>& norm_weight,
    const c10::optional<at::Tensor>& norm_bias, double norm_eps, bool norm_out,
    const c10::optional<at::Tensor>& norm_out_weight, const c10::optional<at::Tensor>& norm_out_bias,
    double norm_out_eps, const c10::optional<at::Tensor>& layer_scale, const c10::optional<at::Tensor>& shift_history,
    int64_t shift_top, int64_t shift_left, const at::Tensor& qkv_packed, const c10::optional<at::Tensor>& qkv_bias,
    int64_t heads, const c10::optional<at::Tensor>& rotary_cos, const c10::optional<at::Tensor>& rotary_sin,
    at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& pos, const c10::optional<at::Tensor>& text_k_cache,
    const c10::optional<at::Tensor>& text_v_cache, const c10::optional<at::Tensor>& prompt_index, int64_t kind,
    int64_t text_len, int64_t image_size, int64_t kernel_size, int64_t dilation, double scale,
    const at::Tensor& out_packed, const c10::optional<at::Tensor>& out_bias) {
  const char* op = "dalle_fast.decode_attention_branch";
  const Rows r = rows_arg(op, x, residual);
  const Ends e = ends_arg(op, r.dim, norm_weight, norm_bias, norm_eps, norm_out, norm_out_weight, norm_out_bias,
                          norm_out_eps, layer_scale);
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.size(3) > 0, op, ": k_cache must be (rows, heads, cache_len, "
                    "head_dim), got shape ", k_cache.sizes());
  TORCH_CHECK_VALUE(heads > 0 && k_cache.size(1) == heads, op, ": heads must be k_cache's size(1) = ",
                    k_cache.size(1), ", got ", heads);
  const int64_t H = heads, D = k_cache.size(3), B = r.rows;
  const Linear qkv = linear_arg(op, "qkv_packed", "qkv_bias", qkv_packed, qkv_bias, r.dim, 3 * H * D);
  const Linear to_out = linear_arg(op, "out_packed", "out_bias", out_packed, out_bias, H * D, r.dim);
  const Shift shift = shift_arg(op, shift_history, shift_top, shift_left, B, r.dim, image_size);
  // rotary tables (positions, rot): cos and the sine with the pairs' sign folded in (even features negated)
  const bool rotary = rotary_cos.has_value() && rotary_cos->defined();
  TORCH_CHECK_VALUE(rotary == (rotary_sin.has_value() && rotary_sin->defined()), op,
                    ": rotary_cos and rotary_sin go together");
  int64_t rot = 0;
  if (rotary) {
    const at::Tensor& c = *rotary_cos;
    TORCH_CHECK_VALUE(c.device().is_cpu() && c.scalar_type() == at::kFloat && c.dim() == 2 && c.is_contiguous() &&
                          c.size(1) % 2 == 0 && c.size(1) <= D,
                      op, ": rotary_cos must be a contiguous float32 CPU table (positions, an even rot <= head_dim = ",
                      D, "), got ", c.scalar_type(), " shape ", c.sizes());
    TORCH_CHECK_VALUE(rotary_sin->sizes() == c.sizes() && rotary_sin->scalar_type() == at::kFloat &&
                          rotary_sin->is_contiguous() && rotary_sin->device().is_cpu(),
                      op, ": rotary_sin must be a contiguous float32 CPU table of rotary_cos's shape ", c.sizes());
    rot = c.size(1);
  }
  const std::vector<int64_t> p = image_positions(op, pos, B, text_len, image_size);
  if (rotary)
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK_VALUE(p[static_cast<size_t>(b)] < rotary_cos->size(0), op, ": rotary_cos has ", rotary_cos->size(0),
                        " positions, pos needs ", p[static_cast<size_t>(b)] + 1);
  // every check before the first write (caches, history): q, k, v are filled below, the kernel runs last
  at::Tensor qkv3 = at::empty({3, B, H, 1, D}, r.x.options());
  const LayoutParams L = decode_layout(kind, text_len, image_size, kernel_size, dilation);
  TORCH_CHECK_VALUE(k_cache.scalar_type() == at::kFloat, op, ": the caches must be float32, got ",
                    k_cache.scalar_type());
  CpuDecodeCall call = prepare_cpu_decode(qkv3[0], qkv3[1], qkv3[2], k_cache, v_cache, pos, text_k_cache, text_v_cache,
                                          prompt_index, L, scale);

  // norm, shift, to_qkv
  at::Tensor h = at::empty({B, r.dim}, r.x.options());
  layer_norm_rows(r.x.data_ptr<float>(), r.dim, h.data_ptr<float>(), r.dim, B, r.dim, e.norm);
  token_shift(h.data_ptr<float>(), B, r.dim, shift, p, text_len, image_size);
  at::Tensor qkv_rows = at::empty({B, 3 * H * D}, r.x.options());
  linear(qkv, h.data_ptr<float>(), B, qkv_rows.data_ptr<float>());
  // (rows, 3, H, D) -> q, k, v (B, H, 1, D), the rotary embedding of the row's position on all three
  // (DALLE-pytorch rotates v too): out = t * cos + pair_swap(t) * sin on the first rot features
  const float* src = qkv_rows.data_ptr<float>();
  float* dst = qkv3.data_ptr<float>();
  for (int64_t t = 0; t < 3; ++t)
    for (int64_t b = 0; b < B; ++b) {
      const float* cs = rotary ? rotary_cos->data_ptr<float>() + p[static_cast<size_t>(b)] * rot : nullptr;
      const float* sn = rotary ? rotary_sin->data_ptr<float>() + p[static_cast<size_t>(b)] * rot : nullptr;
      for (int64_t hh = 0; hh < H; ++hh) {
        const float* s = src + b * 3 * H * D + t * H * D + hh * D;
        float* d = dst + ((t * B + b) * H + hh) * D;
        for (int64_t i = 0; i < rot; i += 2) {
          const float a0 = s[i], a1 = s[i + 1];
          const float p0 = a0 * cs[i], q0 = a1 * sn[i];
          const float p1 = a1 * cs[i + 1], q1 = a0 * sn[i + 1];
          d[i] = p0 + q0;
          d[i + 1] = p1 + q1;
        }
        std::memcpy(d + rot, s + rot, static_cast<size_t>(D - rot) * sizeof(float));
      }
    }
  // attention on the layer's caches
  at::Tensor att = at::empty({B, H * D}, r.x.options());
  call.args.out = att.data_ptr<float>();
  if (B > 0) cpu::kernels().decode_attention(call.args);
  // to_out, norm_out, layer scale, residual
  at::Tensor y = at::empty({B, r.dim}, r.x.options());
  linear(to_out, att.data_ptr<float>(), B, y.data_ptr<float>());
  return finish(e, r, y, x);
}

at::Tensor decode_mlp_branch_cpu(const at::Tensor& x, const at::Tensor& residual,
                                 const c10::optional<at::Tensor>& norm_weight, const c10::optional<at::Tensor>& norm_bias,
                                 double norm_eps, bool norm_out, const c10::optional<at::Tensor>& norm_out_weight,
                                 const c10::optional<at::Tensor>& norm_out_bias, double norm_out_eps,
                                 const c10::optional<at::Tensor>& layer_scale,
                                 const c10::optional<at::Tensor>& shift_history, int64_t shift_top, int64_t shift_left,
                                 const at::Tensor& pos, int64_t text_len, int64_t image_size, const at::Tensor& w1_packed,
                                 const c10::optional<at::Tensor>& b1, int64_t hidden, bool geglu,
                                 const at::Tensor& w2_packed, const c10::optional<at::Tensor>& b2) {
  const char* op = "dalle_fast.decode_mlp_branch";
  const Rows r = rows_arg(op, x, residual);
  const Ends e = ends_arg(op, r.dim, norm_weight, norm_bias, norm_eps, norm_out, norm_out_weight, norm_out_bias,
                          norm_out_eps, layer_scale);
  TORCH_CHECK_VALUE(hidden > 0, op, ": hidden must be > 0, got ", hidden);
  TORCH_CHECK_VALUE(text_len >= 1 && image_size >= 1, op, ": text_len and image_size must be >= 1, got ", text_len,
                    " and ", image_size);
  const int64_t B = r.rows;
  const Linear l1 = linear_arg(op, "w1_packed", "b1", w1_packed, b1, r.dim, geglu ? 2 * hidden : hidden);
  const Linear l2 = linear_arg(op, "w2_packed", "b2", w2_packed, b2, hidden, r.dim);
  const Shift shift = shift_arg(op, shift_history, shift_top, shift_left, B, r.dim, image_size);
  std::vector<int64_t> p;
  if (shift.hist) p = image_positions(op, pos, B, text_len, image_size);

  at::Tensor h = at::empty({B, r.dim}, r.x.options());
  layer_norm_rows(r.x.data_ptr<float>(), r.dim, h.data_ptr<float>(), r.dim, B, r.dim, e.norm);
  token_shift(h.data_ptr<float>(), B, r.dim, shift, p, text_len, image_size);
  at::Tensor u = at::empty({B, l1.N}, r.x.options());
  linear(l1, h.data_ptr<float>(), B, u.data_ptr<float>());
  // GELU (erf form), or GEGLU: the first half times the GELU of the second
  at::Tensor a = geglu ? at::empty({B, hidden}, r.x.options()) : u;
  const float* up = u.data_ptr<float>();
  float* ap = a.data_ptr<float>();
  constexpr float kRsqrt2 = 0.70710678118654752440f;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < hidden; ++i) {
      const float g = up[b * l1.N + (geglu ? hidden + i : i)];
      const float gelu = 0.5f * g * (1.f + std::erf(g * kRsqrt2));
      ap[b * hidden + i] = geglu ? up[b * l1.N + i] * gelu : gelu;
    }
  at::Tensor y = at::empty({B, r.dim}, r.x.options());
  linear(l2, ap, B, y.data_ptr<float>());
  return finish(e, r, y, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("decode_attention_branch", &decode_attention_branch_cpu);
  m.impl("decode_mlp_branch", &decode_mlp_branch_cpu);
}

}  // namespace dalle_fast
