// CUDA sampler: one block of SAMPLE_THREADS threads per row (block-level selection, no sort).
//
// Pass 0 reads the row's logits (and uncond) once from global memory, forms the guided logits and
// stores their order keys in shared memory (when the row fits; otherwise later passes recompute
// them from global / L2), with the max, argmax, finite count and NaN check as block reductions.
// Top-k and top-p thresholds are radix selects over the 32-bit order keys, 4 passes of 8 bits with
// per-warp private histograms (integer counts for top-k, integer weights for top-p: exact and
// order-independent, so reruns are bit-identical), then one chunked prefix scan resolves ties by
// index. The draw is one more chunked prefix scan of the integer weights in index order. Traffic:
// the logits once; everything else in shared memory. Semantics: common/sampling.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/decode.h"

namespace dalle_fast {
namespace cuda {
namespace {

constexpr int SAMPLE_THREADS = 512;
constexpr int SAMPLE_WARPS = SAMPLE_THREADS / 32;
constexpr int RADIX_BITS = 8;
constexpr int RADIX_BINS = 1 << RADIX_BITS;
constexpr size_t HIST_BYTES = sizeof(unsigned long long) * SAMPLE_WARPS * RADIX_BINS;

template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }

struct Shared {
  unsigned long long scan[SAMPLE_WARPS];
  unsigned long long merged[RADIX_BINS];
  unsigned long long bcast_u64[2];
  uint32_t bcast_u32[4];
  int64_t bcast_i64[2];
  int flags[SAMPLE_WARPS];
};

// Block-wide inclusive scan / total of a uint64 per thread; returns the exclusive prefix.
__device__ unsigned long long block_exclusive_scan(unsigned long long v, unsigned long long* total, Shared& sh) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  unsigned long long inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long t = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += t;
  }
  __syncthreads();
  if (lane == 31) sh.scan[warp] = inc;
  __syncthreads();
  unsigned long long before = 0, all = 0;
  for (int w = 0; w < SAMPLE_WARPS; ++w) {
    if (w < warp) before += sh.scan[w];
    all += sh.scan[w];
  }
  *total = all;
  return before + inc - v;
}

__device__ unsigned long long block_sum(unsigned long long v, Shared& sh) {
  unsigned long long total;
  block_exclusive_scan(v, &total, sh);
  return total;
}

template <typename T, bool CACHED>
struct Row {
  const T* cond;
  const T* uncond;
  uint32_t* keys;  // shared memory (CACHED)
  const SampleParams* p;
  __device__ __forceinline__ float guided(int64_t i) const {
    const float c = to_f(cond[p->lo + i]);
    const float u = p->guided ? to_f(uncond[p->lo + i]) : 0.f;
    return guided_logit(c, u, p->cfg_scale, p->guided);
  }
  __device__ __forceinline__ uint32_t key(int64_t i) const {
    if constexpr (CACHED) return keys[i];
    else return ordered_key(guided(i));
  }
};

// Largest key tau with sum_{key >= tau} weight >= target; *above = weight strictly above tau.
// weight(i, key) is 0 for excluded elements. Per-warp private histograms, merged per pass.
template <typename R, typename W>
__device__ uint32_t radix_select(const R& row, int64_t n, W weight, unsigned long long target,
                                 unsigned long long* above_out, unsigned long long* hist, Shared& sh) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  uint32_t prefix = 0, mask = 0;
  unsigned long long above = 0;
  for (int shift = 32 - RADIX_BITS; shift >= 0; shift -= RADIX_BITS) {
    for (int i = tid; i < SAMPLE_WARPS * RADIX_BINS; i += SAMPLE_THREADS) hist[i] = 0ull;
    __syncthreads();
    unsigned long long* mine = hist + warp * RADIX_BINS;
    for (int64_t i = tid; i < n; i += SAMPLE_THREADS) {
      const uint32_t k = row.key(i);
      if ((k & mask) != prefix) continue;
      const unsigned long long w = weight(i, k);
      if (w) atomicAdd(mine + ((k >> shift) & (RADIX_BINS - 1)), w);
    }
    __syncthreads();
    for (int bin = tid; bin < RADIX_BINS; bin += SAMPLE_THREADS) {
      unsigned long long s = 0;
      for (int w = 0; w < SAMPLE_WARPS; ++w) s += hist[w * RADIX_BINS + bin];
      sh.merged[bin] = s;
    }
    __syncthreads();
    if (warp == 0) {
      // lane l owns bins 255 - 8l .. 248 - 8l (descending)
      constexpr int PER = RADIX_BINS / 32;
      unsigned long long local = 0;
      for (int i = 0; i < PER; ++i) local += sh.merged[RADIX_BINS - 1 - lane * PER - i];
      unsigned long long inc = local;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long t = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += t;
      }
      const unsigned long long excl = above + inc - local;
      // first lane whose inclusive sum reaches the target (the last lane otherwise)
      const unsigned ballot = __ballot_sync(0xffffffffu, above + inc >= target);
      const int owner = ballot ? __ffs(ballot) - 1 : 31;
      if (lane == owner) {
        unsigned long long acc = excl;
        int bin = RADIX_BINS - 1 - lane * PER;
        for (int i = 0; i < PER; ++i, --bin) {
          const unsigned long long hb = sh.merged[bin];
          if (acc + hb >= target || (i == PER - 1)) break;
          acc += hb;
        }
        sh.bcast_u32[0] = static_cast<uint32_t>(bin);
        sh.bcast_u64[0] = acc;
      }
    }
    __syncthreads();
    prefix |= sh.bcast_u32[0] << shift;
    mask |= static_cast<uint32_t>(RADIX_BINS - 1) << shift;
    above = sh.bcast_u64[0];
    __syncthreads();
  }
  *above_out = above;
  return prefix;
}

// Index (in index order) of the element with key == tau at which the running weight over such
// elements first reaches need; *mass gets that running weight. Chunked prefix scan.
template <typename R, typename W>
__device__ int64_t tie_cutoff(const R& row, int64_t n, uint32_t tau, W weight, unsigned long long need,
                              unsigned long long* mass, Shared& sh) {
  const int64_t chunk = (n + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
  const int64_t i0 = threadIdx.x * chunk, i1 = min(n, i0 + chunk);
  unsigned long long local = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const uint32_t k = row.key(i);
    if (k == tau) local += weight(i, k);
  }
  unsigned long long total;
  const unsigned long long excl = block_exclusive_scan(local, &total, sh);
  if (excl < need && excl + local >= need) {
    unsigned long long acc = excl;
    for (int64_t i = i0; i < i1; ++i) {
      const uint32_t k = row.key(i);
      if (k != tau) continue;
      acc += weight(i, k);
      if (acc >= need) {
        sh.bcast_i64[0] = i;
        sh.bcast_u64[1] = acc;
        break;
      }
    }
  }
  __syncthreads();
  *mass = sh.bcast_u64[1];
  const int64_t r = sh.bcast_i64[0];
  __syncthreads();
  return r;
}

template <typename T, bool CACHED>
__global__ void __launch_bounds__(SAMPLE_THREADS) sample_kernel(const SampleLaunch s) {
  extern __shared__ __align__(16) unsigned char dyn[];
  __shared__ Shared sh;
  const SampleParams& p = s.p;
  const int b = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t n = p.hi - p.lo;
  unsigned long long* hist = reinterpret_cast<unsigned long long*>(dyn);
  Row<T, CACHED> row{static_cast<const T*>(s.cond) + b * s.row_stride,
                     p.guided ? static_cast<const T*>(s.uncond) + b * s.uncond_row_stride : nullptr,
                     reinterpret_cast<uint32_t*>(dyn + HIST_BYTES), &p};
  const uint32_t NEG_INF_KEY = ordered_key(-INFINITY);
  // pass 0: guided logits, checks, argmax, finite count
  bool bad = false;
  uint32_t best = 0;
  int64_t best_i = n;
  unsigned long long finite = 0;
  for (int64_t i = tid; i < n; i += SAMPLE_THREADS) {
    const float c = to_f(row.cond[p.lo + i]);
    const float u = p.guided ? to_f(row.uncond[p.lo + i]) : 0.f;
    const float x = guided_logit(c, u, p.cfg_scale, p.guided);
    bad |= bad_token(c, u, x, p.guided);
    const uint32_t k = ordered_key(x);
    if constexpr (CACHED) row.keys[i] = k;
    if (k != NEG_INF_KEY) {
      ++finite;
      if (k > best) {  // strided loop visits indices ascending: first max kept
        best = k;
        best_i = i;
      }
    }
  }
  // argmax (key max, then lowest index) by warp shuffles + shared memory
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint32_t ok = __shfl_xor_sync(0xffffffffu, best, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, best_i, o);
    if (ok > best || (ok == best && oi < best_i)) {
      best = ok;
      best_i = oi;
    }
  }
  const int any_bad = __syncthreads_or(bad);
  if (lane == 0) {
    sh.merged[warp] = (static_cast<unsigned long long>(best) << 32);
    sh.merged[SAMPLE_WARPS + warp] = static_cast<unsigned long long>(best_i);
  }
  const unsigned long long n_finite = block_sum(finite, sh);  // its barriers publish sh.merged
  uint32_t best_key = 0;
  int64_t arg = n;
  for (int w = 0; w < SAMPLE_WARPS; ++w) {
    const uint32_t k = static_cast<uint32_t>(sh.merged[w] >> 32);
    const int64_t i = static_cast<int64_t>(sh.merged[SAMPLE_WARPS + w]);
    if (k > best_key || (k == best_key && i < arg)) {
      best_key = k;
      arg = i;
    }
  }
  __syncthreads();
  if (any_bad || n_finite == 0) {
    if (tid == 0) {
      s.tokens[b] = p.lo;
      s.errors[b] = any_bad ? SAMPLE_NONFINITE : SAMPLE_EMPTY;
    }
    return;
  }
  if (p.greedy) {
    if (tid == 0) {
      s.tokens[b] = p.lo + arg;
      s.errors[b] = SAMPLE_OK;
    }
    return;
  }
  const float x_max = key_to_float(best_key);
  // C1: top-k threshold (counts)
  uint32_t tau_k = NEG_INF_KEY + 1;
  int64_t cut_k = n;
  if (p.top_k > 0 && static_cast<unsigned long long>(p.top_k) < n_finite) {
    auto count = [&](int64_t, uint32_t k) -> unsigned long long { return k != NEG_INF_KEY ? 1ull : 0ull; };
    unsigned long long above = 0, mass = 0;
    tau_k = radix_select(row, n, count, static_cast<unsigned long long>(p.top_k), &above, hist, sh);
    cut_k = tie_cutoff(row, n, tau_k, count, static_cast<unsigned long long>(p.top_k) - above, &mass, sh);
  }
  auto w1 = [&](int64_t i, uint32_t k) -> unsigned long long {
    const bool in = k > tau_k || (k == tau_k && i <= cut_k);
    return in ? logit_weight(key_to_float(k), x_max, p.exp2_scale) : 0ull;
  };
  // C2: top-p threshold (integer weights)
  uint32_t tau_p = 0;
  int64_t cut_p = n;
  unsigned long long total2;
  {
    unsigned long long local = 0;
    for (int64_t i = tid; i < n; i += SAMPLE_THREADS) local += w1(i, row.key(i));
    total2 = block_sum(local, sh);
  }
  if (p.top_p < 1.0) {
    const unsigned long long target = top_p_target(p.top_p, total2);
    unsigned long long above = 0, mass = 0;
    tau_p = radix_select(row, n, w1, target, &above, hist, sh);
    cut_p = tie_cutoff(row, n, tau_p, w1, target - above, &mass, sh);
    total2 = above + mass;
  }
  // draw: inverse CDF over C2 in index order (chunked prefix scan)
  const unsigned long long t = mulhi64(sample_random_u64(s.seeds[b], s.step[0]), total2);
  const int64_t chunk = (n + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
  const int64_t i0 = tid * chunk, i1 = min(n, i0 + chunk);
  auto w2 = [&](int64_t i, uint32_t k) -> unsigned long long {
    if (k < tau_p || (k == tau_p && i > cut_p)) return 0ull;
    return w1(i, k);
  };
  unsigned long long local = 0;
  for (int64_t i = i0; i < i1; ++i) local += w2(i, row.key(i));
  unsigned long long total;
  const unsigned long long excl = block_exclusive_scan(local, &total, sh);
  if (excl <= t && t < excl + local) {
    unsigned long long acc = excl;
    for (int64_t i = i0; i < i1; ++i) {
      acc += w2(i, row.key(i));
      if (acc > t) {
        s.tokens[b] = p.lo + i;
        s.errors[b] = SAMPLE_OK;
        break;
      }
    }
  }
}

template <typename T>
void launch_typed(const SampleLaunch& s, cudaStream_t stream) {
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  const int64_t n = s.p.hi - s.p.lo;
  const size_t cached_bytes = HIST_BYTES + static_cast<size_t>(n) * sizeof(uint32_t);
  const bool cached = cached_bytes + sizeof(Shared) + 1024 <= static_cast<size_t>(optin);
  const size_t smem = cached ? cached_bytes : HIST_BYTES;
  if (cached) {
    cudaFuncSetAttribute(sample_kernel<T, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    sample_kernel<T, true><<<s.p.batch, SAMPLE_THREADS, smem, stream>>>(s);
  } else {
    sample_kernel<T, false><<<s.p.batch, SAMPLE_THREADS, smem, stream>>>(s);
  }
}

}  // namespace

void launch_sample(const SampleLaunch& s, cudaStream_t stream) {
  if (s.p.batch == 0) return;
  switch (s.dtype) {
    case kF32: launch_typed<float>(s, stream); break;
    case kBF16: launch_typed<__nv_bfloat16>(s, stream); break;
    case kF16: launch_typed<__half>(s, stream); break;
    default: break;
  }
}

}  // namespace cuda
}  // namespace dalle_fast
