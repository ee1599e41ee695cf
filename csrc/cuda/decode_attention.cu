// CUDA decode attention (flash-decoding over the allowed keys only).
//
// decode_kernel: grid (B, splits, H), blockIdx.x = row fastest so the candidates of one prompt
// (adjacent rows) read the same shared text keys back to back from L2. Each block takes a
// contiguous range of the query's key list (decode_index.h: keys in O(1) each; the range from
// decode_split, sized by the query's own list, so every split the query uses gets an equal share)
// and makes one pass over it: each group of TPK threads loads the K and V rows of DECODE_UNROLL
// keys at once with 16-byte vector loads (coalesced) and folds them into a running online softmax
// (log2 domain) in registers; the groups merge through shared memory at the end. The block writes
// either the final output (one split) or a partial (o, lse) pair. The new key/value is written to
// the cache by split 0 and read from k_new / v_new by whichever block owns the query's own key (the
// last one), so there is no read-after-write race between blocks.
// Traffic: the allowed K and V rows once each, q / k_new / v_new once, partials 4 * (D + 1) bytes
// per split. decode_combine_kernel: one block per (row, head) merges the splits' partials.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "common/decode_index.h"
#include "cuda/decode.h"

namespace dalle_fast {
namespace cuda {
namespace {

constexpr int DECODE_THREADS = 128;
constexpr int DECODE_BLOCKS_PER_SM = 8;   // resident blocks the launch plan counts on (<= 64 registers)
constexpr int DECODE_UNROLL = 4;          // keys (K and V rows) in flight per thread group
constexpr int MIN_KEYS_PER_SPLIT = 64;
constexpr int MAX_SPLITS = 64;
constexpr float LOG2E = 1.4426950408889634f;

template <typename T>
struct Vec;

template <>
struct Vec<float> {
  static constexpr int N = 4;
  __device__ __forceinline__ static void to_float(const uint4& r, float* f) {
    f[0] = __uint_as_float(r.x);
    f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z);
    f[3] = __uint_as_float(r.w);
  }
  __device__ __forceinline__ static float one(float x) { return x; }
  __device__ __forceinline__ static void store(float* p, float x) { *p = x; }
};

template <>
struct Vec<__nv_bfloat16> {
  static constexpr int N = 8;
  __device__ __forceinline__ static void to_float(const uint4& r, float* f) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
  __device__ __forceinline__ static void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
};

template <>
struct Vec<__half> {
  static constexpr int N = 8;
  __device__ __forceinline__ static void to_float(const uint4& r, float* f) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      memcpy(&h, &w[i], 4);
      const float2 v = __half22float2(h);
      f[2 * i] = v.x;
      f[2 * i + 1] = v.y;
    }
  }
  __device__ __forceinline__ static void store(__half* p, float x) { *p = __float2half_rn(x); }
};

template <typename T, int D>
__global__ void __launch_bounds__(DECODE_THREADS, DECODE_BLOCKS_PER_SM) decode_kernel(const DecodeParams p) {
  using V = Vec<T>;
  constexpr int VEC = V::N;
  constexpr int TPK = D / VEC;                 // threads per key row (4..32, a power of two)
  constexpr int KPI = DECODE_THREADS / TPK;    // thread groups = key rows per block iteration
  constexpr int STEP = KPI * DECODE_UNROLL;
  __shared__ float red_acc[KPI][D];
  __shared__ float red_m[KPI], red_l[KPI];

  const int b = blockIdx.x, split = blockIdx.y, h = blockIdx.z;
  const int tid = threadIdx.x, g = tid / TPK, lane = tid % TPK;
  const int64_t row = static_cast<int64_t>(b) * p.heads + h;
  const int64_t pos = p.pos[b * p.pos_stride];
  const LayoutParams& L = p.layout;
  const bool shared_text = p.text_k != nullptr;
  const int64_t prompt = shared_text ? p.prompt_index[b] : 0;
  const bool ok = pos >= p.cache_offset && pos < L.seq_len() && pos - p.cache_offset < p.cache_len &&
                  prompt >= 0 && (!shared_text || prompt < p.prompts);
  if (!ok) {  // invalid position / prompt: NaN output, cache untouched (no host sync to raise)
    const float nan = __int_as_float(0x7fc00000);
    for (int d = tid; d < D; d += DECODE_THREADS) {
      if (p.num_splits == 1) V::store(static_cast<T*>(p.out) + row * D + d, nan);
      else p.part_o[(row * p.num_splits + split) * D + d] = nan;
    }
    if (p.num_splits > 1 && tid == 0) p.part_lse[row * p.num_splits + split] = 0.f;
    return;
  }
  const FastDecodeKeys dk(decode_keys(L, pos));
  const int64_t n = dk.k.total();
  const KeyRange range = decode_split(n, p.num_splits, split, MIN_KEYS_PER_SPLIT);
  const int64_t j0 = range.begin, j1 = range.end;
  T* kc = static_cast<T*>(p.k_cache) + b * p.kc_s0 + h * p.kc_s1;
  T* vc = static_cast<T*>(p.v_cache) + b * p.vc_s0 + h * p.vc_s1;
  const T* kn = static_cast<const T*>(p.k_new) + row * D;
  const T* vn = static_cast<const T*>(p.v_new) + row * D;
  const int64_t slot = pos - p.cache_offset;
  if (split == 0) {
    if (tid < TPK) {
      reinterpret_cast<uint4*>(kc + slot * p.kc_s2)[tid] = reinterpret_cast<const uint4*>(kn)[tid];
    } else if (tid < 2 * TPK) {
      reinterpret_cast<uint4*>(vc + slot * p.vc_s2)[tid - TPK] = reinterpret_cast<const uint4*>(vn)[tid - TPK];
    }
  }
  if (j0 >= j1) {  // a split this query does not use (its key list is shorter than the layout's longest)
    for (int d = tid; d < D; d += DECODE_THREADS) p.part_o[(row * p.num_splits + split) * D + d] = 0.f;
    if (tid == 0) p.part_lse[row * p.num_splits + split] = -INFINITY;
    return;
  }
  const T* tk = nullptr;
  const T* tv = nullptr;
  if (shared_text) {
    tk = static_cast<const T*>(p.text_k) + prompt * p.tk_s0 + h * p.tk_s1;
    tv = static_cast<const T*>(p.text_v) + prompt * p.tv_s0 + h * p.tv_s1;
  }
  // the K and V rows of key j: k_new / v_new for the query's own key, else the text or the image cache
  auto key_rows = [&](int64_t j, const T*& kr, const T*& vr) {
    if (j == n - 1) {  // the query's own key: not read back from the cache
      kr = kn;
      vr = vn;
    } else if (j < dk.k.n_text && shared_text) {
      kr = tk + j * p.tk_s2;
      vr = tv + j * p.tv_s2;
    } else {
      const int64_t s = dk.position(j) - p.cache_offset;
      kr = kc + s * p.kc_s2;
      vr = vc + s * p.vc_s2;
    }
  };

  float qf[VEC];
  {
    const uint4 raw = reinterpret_cast<const uint4*>(static_cast<const T*>(p.q) + row * D)[lane];
    V::to_float(raw, qf);
    const float qs = p.scale * LOG2E;
#pragma unroll
    for (int e = 0; e < VEC; ++e) qf[e] *= qs;
  }
  // One pass over keys [j0, j1): group g takes keys j0 + g, j0 + g + KPI, ...; the K and V rows of
  // DECODE_UNROLL keys are loaded together, then folded into the group's running (m, l, acc) in the
  // log2 domain (online softmax). The loop bounds are the same for every thread, so the shuffles
  // below always have the whole warp.
  float m = -INFINITY, l = 0.f, acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
  for (int64_t base = j0; base < j1; base += STEP) {
    uint4 kraw[DECODE_UNROLL], vraw[DECODE_UNROLL];
#pragma unroll
    for (int u = 0; u < DECODE_UNROLL; ++u) {
      const int64_t j = base + u * KPI + g;
      if (j < j1) {
        const T* kr;
        const T* vr;
        key_rows(j, kr, vr);
        kraw[u] = reinterpret_cast<const uint4*>(kr)[lane];
        vraw[u] = reinterpret_cast<const uint4*>(vr)[lane];
      } else {
        kraw[u] = make_uint4(0, 0, 0, 0);
        vraw[u] = make_uint4(0, 0, 0, 0);
      }
    }
    float s[DECODE_UNROLL];
    float m_new = m;
#pragma unroll
    for (int u = 0; u < DECODE_UNROLL; ++u) {
      float kf[VEC];
      V::to_float(kraw[u], kf);
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) dot = fmaf(qf[e], kf[e], dot);
#pragma unroll
      for (int o = TPK / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      s[u] = base + u * KPI + g < j1 ? dot : -INFINITY;
      m_new = fmaxf(m_new, s[u]);
    }
    // a group with no key yet keeps m = -inf; exponentiate against 0 then, so nothing is NaN
    const float m_ref = m_new == -INFINITY ? 0.f : m_new;
    const float c = exp2f(m - m_ref);
    l *= c;
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] *= c;
#pragma unroll
    for (int u = 0; u < DECODE_UNROLL; ++u) {
      const float w = exp2f(s[u] - m_ref);
      float vf[VEC];
      V::to_float(vraw[u], vf);
      l += w;
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = fmaf(w, vf[e], acc[e]);
    }
    m = m_new;
  }
  // merge the groups: M = max_g m_g (finite: group 0 holds key j0), each scaled by 2^(m_g - M)
  if (lane == 0) {
    red_m[g] = m;
    red_l[g] = l;
  }
  __syncthreads();
  float M = red_m[0];
#pragma unroll
  for (int i = 1; i < KPI; ++i) M = fmaxf(M, red_m[i]);
  const float c = exp2f(m - M);
#pragma unroll
  for (int e = 0; e < VEC; ++e) red_acc[g][lane * VEC + e] = acc[e] * c;
  __syncthreads();
  float l_all = 0.f;
#pragma unroll
  for (int i = 0; i < KPI; ++i) l_all = fmaf(red_l[i], exp2f(red_m[i] - M), l_all);
  const float inv = 1.f / l_all;
  for (int d = tid; d < D; d += DECODE_THREADS) {
    float o = 0.f;
#pragma unroll
    for (int i = 0; i < KPI; ++i) o += red_acc[i][d];
    if (p.num_splits == 1) {
      V::store(static_cast<T*>(p.out) + row * D + d, o * inv);
    } else {
      p.part_o[(row * p.num_splits + split) * D + d] = o * inv;
    }
  }
  if (p.num_splits > 1 && tid == 0) p.part_lse[row * p.num_splits + split] = M + log2f(l_all);
}

// One block of D threads per (row, head): out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M).
// Traffic: splits * (D + 1) floats read, D outputs written.
template <typename T, int D>
__global__ void decode_combine_kernel(const DecodeParams p) {
  const int64_t row = blockIdx.x;
  const int d = threadIdx.x;
  const int S = p.num_splits;
  const float* lse = p.part_lse + row * S;
  float M = -INFINITY;
  for (int s = 0; s < S; ++s) M = fmaxf(M, lse[s]);
  float num = 0.f, den = 0.f;
  for (int s = 0; s < S; ++s) {
    const float w = exp2f(lse[s] - M);
    num = fmaf(w, p.part_o[(row * S + s) * D + d], num);
    den += w;
  }
  Vec<T>::store(static_cast<T*>(p.out) + row * D + d, num / den);
}

template <typename T, int D>
void launch_typed(const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(p.batch, p.num_splits, p.heads);
  decode_kernel<T, D><<<grid, DECODE_THREADS, 0, stream>>>(p);
  if (p.num_splits > 1) {
    decode_combine_kernel<T, D><<<p.batch * p.heads, D, 0, stream>>>(p);
  }
}

template <typename T>
void launch_dim(const DecodeParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: launch_typed<T, 32>(p, stream); break;
    case 64: launch_typed<T, 64>(p, stream); break;
    case 128: launch_typed<T, 128>(p, stream); break;
    default: break;  // rejected by the binding
  }
}

}  // namespace

int decode_num_splits(int64_t batch_heads, int64_t max_keys, int sm_count) {
  return static_cast<int>(decode_plan_splits(batch_heads, max_keys, static_cast<int64_t>(sm_count) * DECODE_BLOCKS_PER_SM,
                                             MIN_KEYS_PER_SPLIT, MAX_SPLITS));
}

void launch_decode_attention(const DecodeParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0) return;
  switch (p.dtype) {
    case kF32: launch_dim<float>(p, stream); break;
    case kBF16: launch_dim<__nv_bfloat16>(p, stream); break;
    case kF16: launch_dim<__half>(p, stream); break;
    default: break;
  }
}

}  // namespace cuda
}  // namespace dalle_fast
