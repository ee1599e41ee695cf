// CPU block-sparse attention, forward and backward.
//
// Algorithm (flash-style): for each (batch*head, query tile) the non-empty key tiles of the
// schedule are merged into runs of consecutive tiles (at most RUN_MAX keys); per run one GEMM
// computes the scores, the element mask is applied on partial tiles only, an online softmax folds
// the run into the running max / sum, and a second GEMM accumulates P V. Memory: O(BM * RUN_MAX)
// scratch per thread, no N x N buffer; traffic: each computed tile reads its K and V rows once.
// Backward recomputes P from the saved log-sum-exp. When there are enough heads to keep every
// thread busy, each task owns a whole head and walks it key-tile-major (dK, dV, dQ in 5 GEMMs per
// tile); otherwise dK/dV (key-tile-major) and dQ (query-tile-major) are two parallel passes.
// GEMMs go to the BLAS torch links (sgemm_), work is spread with at::parallel_for.
#include "cpu/sparse_attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace dalle_fast {
namespace cpu {
namespace {

constexpr int64_t RUN_MAX = 256;  // keys (or queries) per merged run of tiles
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// Row-major GEMM helpers on top of column-major BLAS.
// C[M x N] = alpha * A[M x K] . B[N x K]^T + beta * C
inline void gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const int m = (int)M, n = (int)N, k = (int)K, la = (int)lda, lb = (int)ldb, lc = (int)ldc;
  sgemm_("T", "N", &n, &m, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
}
// C[M x N] = alpha * A[M x K] . B[K x N] + beta * C
inline void gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const int m = (int)M, n = (int)N, k = (int)K, la = (int)lda, lb = (int)ldb, lc = (int)ldc;
  sgemm_("N", "N", &n, &m, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
}
// C[M x N] = alpha * A[K x M]^T . B[K x N] + beta * C
inline void gemm_tn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const int m = (int)M, n = (int)N, k = (int)K, la = (int)lda, lb = (int)ldb, lc = (int)ldc;
  sgemm_("N", "T", &n, &m, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

// exp(x) for x <= 0 (and moderate x > 0): 2^(x log2 e) split into 2^round * 2^frac, degree-6
// Taylor polynomial for 2^frac (|frac| <= 1/2, relative error < 2e-7). Written so the compiler
// vectorises loops over it. Inputs below -87 flush to ~0 (2^-126 scale).
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

// A maximal run of consecutive tiles from a tile list (start tile index and count).
struct Run {
  int64_t first;    // index into the TileRef list
  int64_t count;    // tiles in the run
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

// Masks scores S[rows x cols] (leading dim lds) of one tile: entries whose mask byte is 0
// become -inf. `tm` is the tile's BM x BN mask, (r0, c0) the offset of S inside the tile.
inline void apply_mask(float* S, int64_t lds, const uint8_t* tm, int64_t tile_ld, int64_t rows,
                       int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = S + r * lds;
    const uint8_t* mr = tm + r * tile_ld;
    for (int64_t c = 0; c < cols; ++c) sr[c] = mr[c] ? sr[c] : NEG_INF;
  }
}

// Runs `body(tid)` on up to the configured number of torch threads; tasks are then pulled
// dynamically by the bodies (load balance for tiles of uneven cost).
template <typename F>
inline void parallel_tasks(int64_t ntasks, F&& body) {
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      body([&]() { return next.fetch_add(1, std::memory_order_relaxed); });
    }
  });
}

}  // namespace

void sparse_attention_forward(const Schedule& s, const AttnProblem& p, const float* q, const float* k,
                              const float* v, float* out, float* lse) {
  const int64_t N = p.n, D = p.d, BM = s.bm, BN = s.bn;
  const int64_t max_tiles = std::max<int64_t>(1, RUN_MAX / BN);
  const int64_t ntasks = p.bh * s.nq;
  parallel_tasks(ntasks, [&](auto next_task) {
    std::vector<float> S(BM * max_tiles * BN), acc(BM * D), m(BM), l(BM);
    for (int64_t task = next_task(); task < ntasks; task = next_task()) {
      const int64_t bh = task / s.nq, qi = task % s.nq;
      const int64_t q0 = qi * BM, mq = std::min(BM, N - q0);
      const float* Q = q + (bh * N + q0) * D;
      const float* Kh = k + bh * N * D;
      const float* Vh = v + bh * N * D;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), NEG_INF);
      std::fill(l.begin(), l.end(), 0.f);
      const TileRef* list = s.q_tiles.data();
      for_each_run(list, s.q_ptr[qi], s.q_ptr[qi + 1], max_tiles, [&](Run run) {
        const int64_t k0 = list[run.first].tile * BN;
        const int64_t klen = std::min(run.count * BN, N - k0);
        float* Sp = S.data();
        gemm_nt(mq, klen, D, p.scale, Q, D, Kh + k0 * D, D, 0.f, Sp, klen);
        for (int64_t t = 0; t < run.count; ++t) {
          const TileRef& tr = list[run.first + t];
          if (tr.mask_off < 0) continue;
          const int64_t c0 = t * BN;
          apply_mask(Sp + c0, klen, s.masks.data() + tr.mask_off, BN, mq, std::min(BN, klen - c0));
        }
        // online softmax over this run
        for (int64_t r = 0; r < mq; ++r) {
          float* sr = Sp + r * klen;
          float mx = NEG_INF;
          for (int64_t c = 0; c < klen; ++c) mx = std::max(mx, sr[c]);
          if (mx == NEG_INF) {  // nothing allowed for this row in this run
            std::fill(sr, sr + klen, 0.f);
            continue;
          }
          const float mnew = std::max(m[r], mx);
          const float alpha = m[r] == NEG_INF ? 0.f : fast_exp(m[r] - mnew);
          float sum = 0.f;
          for (int64_t c = 0; c < klen; ++c) {
            const float e = sr[c] == NEG_INF ? 0.f : fast_exp(sr[c] - mnew);
            sr[c] = e;
            sum += e;
          }
          l[r] = l[r] * alpha + sum;
          m[r] = mnew;
          if (alpha != 1.f) {
            float* ar = acc.data() + r * D;
            for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
          }
        }
        gemm_nn(mq, D, klen, 1.f, Sp, klen, Vh + k0 * D, D, 1.f, acc.data(), D);
      });
      float* O = out + (bh * N + q0) * D;
      float* L = lse + bh * N + q0;
      for (int64_t r = 0; r < mq; ++r) {
        const float inv = 1.f / l[r];
        for (int64_t d = 0; d < D; ++d) O[r * D + d] = acc[r * D + d] * inv;
        L[r] = m[r] + std::log(l[r]);
      }
    }
  });
}

namespace {

// P = exp(S - lse) on the allowed entries of S[rows x cols] (masked entries are -inf -> 0), then
// dS = P * (dP - delta) in place of dP. S becomes P.
inline void softmax_grad(float* S, float* dP, int64_t rows, int64_t cols, const float* lse_rows,
                         const float* delta_rows) {
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = S + r * cols;
    float* dr = dP + r * cols;
    const float lr = lse_rows[r], dl = delta_rows[r];
    for (int64_t c = 0; c < cols; ++c) {
      const float pe = sr[c] == NEG_INF ? 0.f : fast_exp(sr[c] - lr);
      sr[c] = pe;
      dr[c] = pe * (dr[c] - dl);
    }
  }
}

struct BwdArgs {
  const Schedule& s;
  const AttnProblem& p;
  const float *q, *k, *v, *go, *lse, *delta;
  float *dq, *dk, *dv;
};

// Key-tile-major backward of key tile kj of head bh: writes dK, dV of the tile; if dq_out,
// also accumulates dQ of every query tile that attends to it (caller owns the whole head).
void bwd_key_tile(const BwdArgs& a, int64_t bh, int64_t kj, bool dq_out, float* S, float* dP,
                  float* dk_acc, float* dv_acc) {
  const Schedule& s = a.s;
  const int64_t N = a.p.n, D = a.p.d, BM = s.bm, BN = s.bn;
  const float scale = a.p.scale;
  const int64_t k0 = kj * BN, nk = std::min(BN, N - k0);
  const int64_t off = bh * N * D;
  const float* Kt = a.k + off + k0 * D;
  const float* Vt = a.v + off + k0 * D;
  std::fill(dk_acc, dk_acc + nk * D, 0.f);
  std::fill(dv_acc, dv_acc + nk * D, 0.f);
  const int64_t max_tiles = std::max<int64_t>(1, RUN_MAX / BM);
  const TileRef* list = s.k_tiles.data();
  for_each_run(list, s.k_ptr[kj], s.k_ptr[kj + 1], max_tiles, [&](Run run) {
    const int64_t q0 = list[run.first].tile * BM;
    const int64_t qlen = std::min(run.count * BM, N - q0);
    const float* Q = a.q + off + q0 * D;
    const float* GO = a.go + off + q0 * D;
    gemm_nt(qlen, nk, D, scale, Q, D, Kt, D, 0.f, S, nk);
    for (int64_t t = 0; t < run.count; ++t) {
      const TileRef& tr = list[run.first + t];
      if (tr.mask_off < 0) continue;
      const int64_t r0 = t * BM;
      apply_mask(S + r0 * nk, nk, a.s.masks.data() + tr.mask_off, BN, std::min(BM, qlen - r0), nk);
    }
    gemm_nt(qlen, nk, D, 1.f, GO, D, Vt, D, 0.f, dP, nk);
    softmax_grad(S, dP, qlen, nk, a.lse + bh * N + q0, a.delta + bh * N + q0);
    gemm_tn(nk, D, qlen, 1.f, S, nk, GO, D, 1.f, dv_acc, D);
    gemm_tn(nk, D, qlen, scale, dP, nk, Q, D, 1.f, dk_acc, D);
    if (dq_out) gemm_nn(qlen, D, nk, scale, dP, nk, Kt, D, 1.f, a.dq + off + q0 * D, D);
  });
  std::copy(dk_acc, dk_acc + nk * D, a.dk + off + k0 * D);
  std::copy(dv_acc, dv_acc + nk * D, a.dv + off + k0 * D);
}

// Query-tile-major dQ of query tile qi of head bh.
void bwd_query_tile(const BwdArgs& a, int64_t bh, int64_t qi, float* S, float* dP) {
  const Schedule& s = a.s;
  const int64_t N = a.p.n, D = a.p.d, BM = s.bm, BN = s.bn;
  const float scale = a.p.scale;
  const int64_t q0 = qi * BM, mq = std::min(BM, N - q0);
  const int64_t off = bh * N * D;
  const float* Q = a.q + off + q0 * D;
  const float* GO = a.go + off + q0 * D;
  float* DQ = a.dq + off + q0 * D;
  std::fill(DQ, DQ + mq * D, 0.f);
  const int64_t max_tiles = std::max<int64_t>(1, RUN_MAX / BN);
  const TileRef* list = s.q_tiles.data();
  for_each_run(list, s.q_ptr[qi], s.q_ptr[qi + 1], max_tiles, [&](Run run) {
    const int64_t k0 = list[run.first].tile * BN;
    const int64_t klen = std::min(run.count * BN, N - k0);
    gemm_nt(mq, klen, D, scale, Q, D, a.k + off + k0 * D, D, 0.f, S, klen);
    for (int64_t t = 0; t < run.count; ++t) {
      const TileRef& tr = list[run.first + t];
      if (tr.mask_off < 0) continue;
      const int64_t c0 = t * BN;
      apply_mask(S + c0, klen, s.masks.data() + tr.mask_off, BN, mq, std::min(BN, klen - c0));
    }
    gemm_nt(mq, klen, D, 1.f, GO, D, a.v + off + k0 * D, D, 0.f, dP, klen);
    softmax_grad(S, dP, mq, klen, a.lse + bh * N + q0, a.delta + bh * N + q0);
    gemm_nn(mq, D, klen, scale, dP, klen, a.k + off + k0 * D, D, 1.f, DQ, D);
  });
}

}  // namespace

void sparse_attention_backward(const Schedule& s, const AttnProblem& p, const float* q, const float* k,
                               const float* v, const float* grad_out, const float* lse,
                               const float* delta, float* dq, float* dk, float* dv) {
  const BwdArgs a{s, p, q, k, v, grad_out, lse, delta, dq, dk, dv};
  const int64_t N = p.n, D = p.d;
  const int64_t run = std::max(RUN_MAX, std::max(s.bm, s.bn));
  const int64_t scratch = run * std::max(s.bm, s.bn);
  const int64_t nthreads = at::get_num_threads();
  if (p.bh >= 2 * nthreads || p.bh % nthreads == 0) {
    // each task owns one head: key-tile-major pass that also accumulates dQ
    parallel_tasks(p.bh, [&](auto next_task) {
      std::vector<float> S(scratch), dP(scratch), dka(s.bn * D), dva(s.bn * D);
      for (int64_t bh = next_task(); bh < p.bh; bh = next_task()) {
        std::fill(dq + bh * N * D, dq + (bh + 1) * N * D, 0.f);
        for (int64_t kj = 0; kj < s.nk; ++kj)
          bwd_key_tile(a, bh, kj, true, S.data(), dP.data(), dka.data(), dva.data());
      }
    });
    return;
  }
  // few heads: parallelise over tiles, dK/dV and dQ in separate passes
  parallel_tasks(p.bh * s.nk, [&](auto next_task) {
    std::vector<float> S(scratch), dP(scratch), dka(s.bn * D), dva(s.bn * D);
    for (int64_t t = next_task(); t < p.bh * s.nk; t = next_task())
      bwd_key_tile(a, t / s.nk, t % s.nk, false, S.data(), dP.data(), dka.data(), dva.data());
  });
  parallel_tasks(p.bh * s.nq, [&](auto next_task) {
    std::vector<float> S(scratch), dP(scratch);
    for (int64_t t = next_task(); t < p.bh * s.nq; t = next_task())
      bwd_query_tile(a, t / s.nq, t % s.nq, S.data(), dP.data());
  });
}

}  // namespace cpu
}  // namespace dalle_fast
