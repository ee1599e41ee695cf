// CPU block-sparse attention, forward and backward.
//
// Algorithm (flash-style): for each (batch*head, query tile) the non-empty key tiles of the
// schedule are merged into runs of consecutive tiles (at most RUN_MAX keys); per run one GEMM
// computes the scores, the element mask is applied on partial tiles only, an online softmax folds
// the run into the running max / sum, and a second GEMM accumulates P V. Memory: O(BM * RUN_MAX)
// scratch per thread, no N x N buffer; traffic: each computed tile reads its K and V rows once.
// Backward recomputes P from the saved log-sum-exp. When there are enough heads to keep every
// thread busy, each task owns a whole head and walks it key-tile-major (dK, dV and dQ^T from
// 5 GEMMs per run); otherwise dK/dV (key-tile-major) and dQ (query-tile-major) are two parallel
// passes. All GEMMs are row-major C (+)= A B through ATen's brgemm (oneDNN micro-kernels, with a
// BLAS fallback), which is why the caller passes transposed copies where a GEMM needs X^T.
#include "cpu/sparse_attention.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace dalle_fast {
namespace cpu {
namespace {

constexpr int64_t RUN_MAX = 256;  // keys (or queries) per merged run of tiles
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// C[M x N] (ldc) = A[M x K] (lda) . B[K x N] (ldb), or += when accumulate. Row-major.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

// exp(x): 2^(x log2 e) split into 2^round * 2^frac, degree-6 Taylor polynomial for 2^frac
// (|frac| <= 1/2, relative error < 2e-7). Vectorises (omp simd). Inputs below -87 flush to ~0.
#pragma omp declare simd
inline float fast_exp(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.44269504088896341f;
  const float r = std::nearbyint(t);
  const float f = (t - r) * 0.69314718055994531f;  // in [-ln2/2, ln2/2]
  float p = 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(r) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale;
}

// A maximal run of consecutive tiles from a tile list.
struct Run {
  int64_t first;  // index into the TileRef list
  int64_t count;  // tiles in the run
};

// Splits list[b, e) into runs of consecutive tile ids with at most max_tiles tiles each.
template <typename F>
inline void for_each_run(const TileRef* list, int64_t b, int64_t e, int64_t max_tiles, F&& f) {
  int64_t i = b;
  while (i < e) {
    int64_t j = i + 1;
    while (j < e && j - i < max_tiles && list[j].tile == list[j - 1].tile + 1) ++j;
    f(Run{i, j - i});
    i = j;
  }
}

// S[rows x cols] (leading dim lds): entries whose mask byte (leading dim ldm) is 0 become -inf.
inline void apply_mask(float* S, int64_t lds, const uint8_t* mask, int64_t ldm, int64_t rows,
                       int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = S + r * lds;
    const uint8_t* mr = mask + r * ldm;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) sr[c] = mr[c] ? sr[c] : NEG_INF;
  }
}

// Masks the partial tiles of a run laid out along the columns of S[rows x cols]: query-major scores
// (the run's tiles are key tiles, `masks` = Schedule::masks, tile width BN) or key-major scores S^T
// (query tiles, Schedule::masks_t, width BM).
inline void mask_run(const std::vector<uint8_t>& masks, int64_t width, const TileRef* list, Run run, float* S,
                     int64_t rows, int64_t cols) {
  for (int64_t t = 0; t < run.count; ++t) {
    const TileRef& tr = list[run.first + t];
    if (tr.mask_off < 0) continue;
    const int64_t c0 = t * width;
    apply_mask(S + c0, cols, masks.data() + tr.mask_off, width, rows, std::min(width, cols - c0));
  }
}

// Runs body(next_task) on up to the configured number of torch threads; each body pulls task ids
// from a shared counter (dynamic load balance for tiles of uneven cost).
template <typename F>
inline void parallel_tasks(int64_t ntasks, F&& body) {
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      body([&]() { return next.fetch_add(1, std::memory_order_relaxed); });
    }
    at::native::cpublas::brgemm_release(false);
  });
}

}  // namespace

namespace {

// Per-thread copies of one head's keys and values in processing order: K transposed (D x N), V
// gathered (N x D) when the schedule permutes positions. Refilled when a thread moves to another
// head; the buffers stay in cache across the head's query tiles.
struct HeadCache {
  std::vector<float> kt, vp;
  int64_t head = -1;

  void fill(const Schedule& s, const float* k, const float* v, int64_t bh, int64_t N, int64_t D) {
    if (bh == head) return;
    head = bh;
    const float* K = k + bh * N * D;
    const float* V = v + bh * N * D;
    const int32_t* perm = s.identity ? nullptr : s.perm.data();
    constexpr int64_t B = 16;  // transpose in 16 x 16 blocks
    for (int64_t i0 = 0; i0 < N; i0 += B)
      for (int64_t d0 = 0; d0 < D; d0 += B)
        for (int64_t i = i0; i < std::min(N, i0 + B); ++i) {
          const float* row = K + (perm ? perm[i] : i) * D;
          for (int64_t d = d0; d < std::min(D, d0 + B); ++d) kt[d * N + i] = row[d];
        }
    if (perm)
      for (int64_t i = 0; i < N; ++i) std::copy(V + perm[i] * D, V + (perm[i] + 1) * D, vp.data() + i * D);
  }
  const float* values(const Schedule& s, const float* v, int64_t N, int64_t D) const {
    return s.identity ? v + head * N * D : vp.data();
  }
};

struct FwdScratch {
  std::vector<float> S, acc, m, l, qbuf;
  HeadCache cache;
};

// Forward of query tile qi of head bh (see the file comment).
void fwd_query_tile(const Schedule& s, const AttnProblem& p, const float* q, const float* k, const float* v,
                    float* out, float* lse, int64_t bh, int64_t qi, FwdScratch& w) {
  const int64_t N = p.n, D = p.d, BM = s.bm, BN = s.bn;
  const float scale = p.scale;
  const int64_t max_tiles = std::max<int64_t>(1, RUN_MAX / BN);
  const int32_t* perm = s.identity ? nullptr : s.perm.data();
  w.cache.fill(s, k, v, bh, N, D);
  const float* Kt = w.cache.kt.data();
  const float* Vh = w.cache.values(s, v, N, D);
  const int64_t q0 = qi * BM, mq = std::min(BM, N - q0);
  const float* Q = q + (bh * N + q0) * D;
  if (perm) {  // gather the tile's query rows
    for (int64_t r = 0; r < mq; ++r)
      std::copy(q + (bh * N + perm[q0 + r]) * D, q + (bh * N + perm[q0 + r] + 1) * D, w.qbuf.data() + r * D);
    Q = w.qbuf.data();
  }
  float *acc = w.acc.data(), *m = w.m.data(), *l = w.l.data();
  std::fill(acc, acc + BM * D, 0.f);
  std::fill(m, m + BM, NEG_INF);
  std::fill(l, l + BM, 0.f);
  const TileRef* list = s.q_tiles.data();
  for_each_run(list, s.q_ptr[qi], s.q_ptr[qi + 1], max_tiles, [&](Run run) {
    const int64_t k0 = list[run.first].tile * BN;
    const int64_t klen = std::min(run.count * BN, N - k0);
    float* Sp = w.S.data();
    gemm(mq, klen, D, Q, D, Kt + k0, N, Sp, klen, false);
    mask_run(s.masks, s.bn, list, run, Sp, mq, klen);
    // online softmax over this run
    for (int64_t r = 0; r < mq; ++r) {
      float* sr = Sp + r * klen;
      float mx = NEG_INF;  // of the unscaled scores: scale > 0 keeps the order
#pragma omp simd reduction(max : mx)
      for (int64_t c = 0; c < klen; ++c) mx = std::max(mx, sr[c]);
      if (mx == NEG_INF) {  // nothing allowed for this row in this run
        std::fill(sr, sr + klen, 0.f);
        continue;
      }
      const float mnew = std::max(m[r], mx * scale);
      const float alpha = m[r] == NEG_INF ? 0.f : fast_exp(m[r] - mnew);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < klen; ++c) {
        const float e = sr[c] == NEG_INF ? 0.f : fast_exp(sr[c] * scale - mnew);
        sr[c] = e;
        sum += e;
      }
      l[r] = l[r] * alpha + sum;
      m[r] = mnew;
      if (alpha != 1.f) {
        float* ar = acc + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
      }
    }
    gemm(mq, D, klen, Sp, klen, Vh + k0 * D, D, acc, D, true);
  });
  for (int64_t r = 0; r < mq; ++r) {  // write rows back to their sequence positions
    const int64_t pos = perm ? perm[q0 + r] : q0 + r;
    const float inv = 1.f / l[r];
    float* O = out + (bh * N + pos) * D;
    for (int64_t d = 0; d < D; ++d) O[d] = acc[r * D + d] * inv;
    lse[bh * N + pos] = m[r] + std::log(l[r]);
  }
}

}  // namespace

void sparse_attention_forward(const Schedule& s, const AttnProblem& p, const float* q, const float* k,
                              const float* v, float* out, float* lse) {
  const int64_t N = p.n, D = p.d, BM = s.bm, BN = s.bn;
  const int64_t max_tiles = std::max<int64_t>(1, RUN_MAX / BN);
  // Whole heads per task when that balances the threads (each thread fills its head cache once per
  // head); otherwise single query tiles, a thread filling the cache when it meets a new head.
  const int64_t nthreads = at::get_num_threads();
  const bool head_tasks = p.bh % nthreads == 0 || p.bh >= 4 * nthreads;
  const int64_t tiles_per_task = head_tasks ? s.nq : 1;
  const int64_t ntasks = p.bh * s.nq / tiles_per_task;
  parallel_tasks(ntasks, [&](auto next_task) {
    FwdScratch w;
    w.S.resize(BM * max_tiles * BN);
    w.acc.resize(BM * D);
    w.m.resize(BM);
    w.l.resize(BM);
    w.qbuf.resize(s.identity ? 0 : BM * D);
    w.cache.kt.resize(D * N);
    w.cache.vp.resize(s.identity ? 0 : N * D);
    for (int64_t task = next_task(); task < ntasks; task = next_task())
      for (int64_t t = task * tiles_per_task; t < (task + 1) * tiles_per_task; ++t)
        fwd_query_tile(s, p, q, k, v, out, lse, t / s.nq, t % s.nq, w);
  });
}

namespace {

// P = exp(S - lse) (masked entries are -inf -> 0) and dS = P * (dP - delta), in place
// (S becomes P, dP becomes dS). lse/delta index rows (query-major) or columns (key-major).
template <bool KEY_MAJOR>
inline void softmax_grad(float* S, float* dP, int64_t rows, int64_t cols, const float* lse,
                         const float* delta) {
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = S + r * cols;
    float* dr = dP + r * cols;
    if (KEY_MAJOR) {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const float pe = sr[c] == NEG_INF ? 0.f : fast_exp(sr[c] - lse[c]);
        sr[c] = pe;
        dr[c] = pe * (dr[c] - delta[c]);
      }
    } else {
      const float lr = lse[r], dl = delta[r];
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const float pe = sr[c] == NEG_INF ? 0.f : fast_exp(sr[c] - lr);
        sr[c] = pe;
        dr[c] = pe * (dr[c] - dl);
      }
    }
  }
}

struct BwdArgs {
  const Schedule& s;
  const AttnProblem& p;
  const BwdInputs& in;
  float *dq, *dk, *dv;
};

// Key-tile-major backward of key tile kj of head bh, with key-major scores S^T = K Q^T.
// Writes dK, dV of the tile; with dqt (D x N scratch of this head), accumulates dQ^T too.
void bwd_key_tile(const BwdArgs& a, int64_t bh, int64_t kj, float* dqt, float* St, float* dPt,
                  float* dk_acc, float* dv_acc) {
  const Schedule& s = a.s;
  const BwdInputs& in = a.in;
  const int64_t N = a.p.n, D = a.p.d, BM = s.bm, BN = s.bn;
  const int64_t k0 = kj * BN, nk = std::min(BN, N - k0);
  const int64_t rows = bh * N * D, cols = bh * D * N;  // head offsets in row / transposed arrays
  const float* K = in.k + rows + k0 * D;
  const float* V = in.v + rows + k0 * D;
  const float* Kt = in.kt + cols + k0;
  std::fill(dk_acc, dk_acc + nk * D, 0.f);
  std::fill(dv_acc, dv_acc + nk * D, 0.f);
  const int64_t max_tiles = std::max<int64_t>(1, RUN_MAX / BM);
  const TileRef* list = s.k_tiles.data();
  for_each_run(list, s.k_ptr[kj], s.k_ptr[kj + 1], max_tiles, [&](Run run) {
    const int64_t q0 = list[run.first].tile * BM;
    const int64_t qlen = std::min(run.count * BM, N - q0);
    gemm(nk, qlen, D, K, D, in.qst + cols + q0, N, St, qlen, false);        // S^T = K Qs^T
    mask_run(s.masks_t, s.bm, list, run, St, nk, qlen);
    gemm(nk, qlen, D, V, D, in.got + cols + q0, N, dPt, qlen, false);       // dP^T = V dO^T
    softmax_grad<true>(St, dPt, nk, qlen, in.lse + bh * N + q0, in.delta + bh * N + q0);
    gemm(nk, D, qlen, St, qlen, in.go + rows + q0 * D, D, dv_acc, D, true);  // dV += P^T dO
    gemm(nk, D, qlen, dPt, qlen, in.qs + rows + q0 * D, D, dk_acc, D, true); // dK += dS^T Qs
    if (dqt) gemm(D, qlen, nk, Kt, N, dPt, qlen, dqt + q0, N, true);          // dQ^T += K^T dS^T
  });
  std::copy(dk_acc, dk_acc + nk * D, a.dk + rows + k0 * D);
  std::copy(dv_acc, dv_acc + nk * D, a.dv + rows + k0 * D);
}

// Query-tile-major dQ of query tile qi of head bh (query-major scores).
void bwd_query_tile(const BwdArgs& a, int64_t bh, int64_t qi, float* S, float* dP) {
  const Schedule& s = a.s;
  const BwdInputs& in = a.in;
  const int64_t N = a.p.n, D = a.p.d, BM = s.bm, BN = s.bn;
  const int64_t q0 = qi * BM, mq = std::min(BM, N - q0);
  const int64_t rows = bh * N * D, cols = bh * D * N;
  float* DQ = a.dq + rows + q0 * D;
  std::fill(DQ, DQ + mq * D, 0.f);
  const int64_t max_tiles = std::max<int64_t>(1, RUN_MAX / BN);
  const TileRef* list = s.q_tiles.data();
  for_each_run(list, s.q_ptr[qi], s.q_ptr[qi + 1], max_tiles, [&](Run run) {
    const int64_t k0 = list[run.first].tile * BN;
    const int64_t klen = std::min(run.count * BN, N - k0);
    gemm(mq, klen, D, in.qs + rows + q0 * D, D, in.kt + cols + k0, N, S, klen, false);
    mask_run(s.masks, s.bn, list, run, S, mq, klen);
    gemm(mq, klen, D, in.go + rows + q0 * D, D, in.vt + cols + k0, N, dP, klen, false);
    softmax_grad<false>(S, dP, mq, klen, in.lse + bh * N + q0, in.delta + bh * N + q0);
    gemm(mq, D, klen, dP, klen, in.k + rows + k0 * D, D, DQ, D, true);
  });
}

}  // namespace

void sparse_attention_backward(const Schedule& s, const AttnProblem& p, const BwdInputs& in,
                               float* dq_unscaled, float* dk, float* dv) {
  const BwdArgs a{s, p, in, dq_unscaled, dk, dv};
  const int64_t N = p.n, D = p.d;
  const int64_t scratch = std::max(RUN_MAX, std::max(s.bm, s.bn)) * std::max(s.bm, s.bn);
  const int64_t nthreads = at::get_num_threads();
  if (p.bh >= 2 * nthreads || p.bh % nthreads == 0) {
    // each task owns one head: one key-tile-major pass that also accumulates dQ^T
    parallel_tasks(p.bh, [&](auto next_task) {
      std::vector<float> St(scratch), dPt(scratch), dka(s.bn * D), dva(s.bn * D), dqt(D * N);
      for (int64_t bh = next_task(); bh < p.bh; bh = next_task()) {
        std::fill(dqt.begin(), dqt.end(), 0.f);
        for (int64_t kj = 0; kj < s.nk; ++kj)
          bwd_key_tile(a, bh, kj, dqt.data(), St.data(), dPt.data(), dka.data(), dva.data());
        float* DQ = dq_unscaled + bh * N * D;
        for (int64_t i = 0; i < N; ++i)
          for (int64_t d = 0; d < D; ++d) DQ[i * D + d] = dqt[d * N + i];
      }
    });
    return;
  }
  // few heads: parallelise over tiles, dK/dV and dQ in separate passes
  parallel_tasks(p.bh * s.nk, [&](auto next_task) {
    std::vector<float> St(scratch), dPt(scratch), dka(s.bn * D), dva(s.bn * D);
    for (int64_t t = next_task(); t < p.bh * s.nk; t = next_task())
      bwd_key_tile(a, t / s.nk, t % s.nk, nullptr, St.data(), dPt.data(), dka.data(), dva.data());
  });
  parallel_tasks(p.bh * s.nq, [&](auto next_task) {
    std::vector<float> S(scratch), dP(scratch);
    for (int64_t t = next_task(); t < p.bh * s.nq; t = next_task())
      bwd_query_tile(a, t / s.nq, t % s.nq, S.data(), dP.data());
  });
}

}  // namespace cpu
}  // namespace dalle_fast
