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
// Compiled once per instruction set (cpu/kernels.h); the vector code is cpu/vec.h.
#include "cpu/kernels.h"
#include "cpu/vec.h"

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
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t RUN_MAX = 256;  // keys (or queries) per merged run of tiles

// C[M x N] (ldc) = A[M x K] (lda) . B[K x N] (ldb), or += when accumulate. Row-major.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
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

// rows[i] = src[perm[i]] (when rows is non-null) and t[d * N + i] = src[perm[i]][d] (when t is
// non-null) for one head's (N, D) rows; perm == nullptr is the identity. One read of the source;
// 16 rows at a time are made contiguous (in rows, or a scratch block) and transposed in 16 x 16
// register tiles (at::vec::transpose_mxn). With `finite`, *finite becomes false when a source row
// holds a NaN or an infinity (checked on the block just read, in L1).
void gather_head(const float* src, const int32_t* perm, int64_t N, int64_t D, float* rows, float* t,
                 bool* finite = nullptr) {
  constexpr int64_t B = 16;
  Buffer scratch(perm && !rows && t ? B * D : 0);
  for (int64_t i0 = 0; i0 < N; i0 += B) {
    const int64_t nb = std::min(B, N - i0);
    const float* block = src + i0 * D;  // nb contiguous rows (ld D)
    if (perm) {
      float* dst = rows ? rows + i0 * D : scratch.data();
      for (int64_t r = 0; r < nb; ++r) std::memcpy(dst + r * D, src + perm[i0 + r] * D, D * sizeof(float));
      block = dst;
    } else if (rows) {
      std::memcpy(rows + i0 * D, block, nb * D * sizeof(float));
    }
    if (finite && *finite) *finite = all_finite(block, nb * D);
    if (!t) continue;
    for (int64_t d0 = 0; d0 < D; d0 += B) {
      if (nb == B && D - d0 >= B) {
        at::vec::transpose_mxn<float, B, B>(block + d0, D, t + d0 * N + i0, N);
      } else {
        for (int64_t d = d0; d < std::min(D, d0 + B); ++d)
          for (int64_t r = 0; r < nb; ++r) t[d * N + i0 + r] = block[r * D + d];
      }
    }
  }
}

// Per-thread copies of one head's keys and values in processing order: K transposed (D x N), V
// gathered (N x D) when the schedule permutes positions. Refilled when a thread moves to another
// head; the buffers stay in cache across the head's query tiles.
struct HeadCache {
  Buffer kt, vp;
  int64_t head = -1;
  bool k_finite = true;  // no key of the head holds a NaN or an infinity
  // Slots (processing order) whose key or value row holds a NaN or an infinity, of head bad_head
  // (find_bad, on demand): bad[i] and the counts bad_before[i] of such slots before i.
  std::vector<uint8_t> bad;
  std::vector<int32_t> bad_before;
  int64_t bad_head = -1;

  void fill(const Schedule& s, const float* k, const float* v, int64_t bh, int64_t N, int64_t D) {
    if (bh == head) return;
    head = bh;
    const int32_t* perm = s.identity ? nullptr : s.perm.data();
    k_finite = true;
    gather_head(k + bh * N * D, perm, N, D, nullptr, kt.data(), &k_finite);
    if (perm) gather_head(v + bh * N * D, perm, N, D, vp.data(), nullptr);
  }
  void find_bad(const Schedule& s, const float* k, const float* v, int64_t N, int64_t D) {
    if (bad_head == head) return;
    bad_head = head;
    bad.resize(N);
    bad_before.resize(N + 1);
    bad_before[0] = 0;
    for (int64_t i = 0; i < N; ++i) {
      const int64_t row = (head * N + (s.identity ? i : s.perm[i])) * D;
      bad[i] = !all_finite(k + row, D) || !all_finite(v + row, D);
      bad_before[i + 1] = bad_before[i] + bad[i];
    }
  }
  const float* values(const Schedule& s, const float* v, int64_t N, int64_t D) const {
    return s.identity ? v + head * N * D : vp.data();
  }
};

struct FwdScratch {
  Buffer S, acc, m, l, qbuf, vrun;
  std::vector<uint8_t> poisoned;
  HeadCache cache;
};

// Forward of query tile qi of head bh (see the file comment). Returns whether every row came out
// finite. Non-finite inputs: a GEMM computes 0 * NaN = NaN, so a masked probability of 0 does not
// keep a NaN or infinite value row out of the rows that may not read it. When a head holds such
// rows (`careful`, with w.cache.find_bad done), each run that contains one multiplies P by a copy
// of its value rows with those rows zeroed (masked scores are -inf already, whatever the key), and
// the rows of the tile that may read one, or whose query is not finite, output NaN (lse NaN).
// Without such rows the tile takes the plain path; a non-finite result there sends the caller here.
bool fwd_query_tile(const Schedule& s, const AttnProblem& p, const float* q, const float* k, const float* v,
                    float* out, float* lse, int64_t bh, int64_t qi, FwdScratch& w, bool careful) {
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
  uint8_t* poisoned = w.poisoned.data();
  if (careful)
    for (int64_t r = 0; r < mq; ++r) poisoned[r] = !all_finite(Q + r * D, D);
  const TileRef* list = s.q_tiles.data();
  for_each_run(list, s.q_ptr[qi], s.q_ptr[qi + 1], max_tiles, [&](Run run) {
    const int64_t k0 = list[run.first].tile * BN;
    const int64_t klen = std::min(run.count * BN, N - k0);
    const float* Vrun = Vh + k0 * D;
    if (careful && w.cache.bad_before[k0 + klen] != w.cache.bad_before[k0]) {
      float* vr = w.vrun.data();
      for (int64_t j = 0; j < klen; ++j) {
        if (!w.cache.bad[k0 + j]) {
          std::memcpy(vr + j * D, Vrun + j * D, D * sizeof(float));
          continue;
        }
        std::fill(vr + j * D, vr + (j + 1) * D, 0.f);
        const TileRef& tr = list[run.first + j / BN];  // the key tile of slot k0 + j
        for (int64_t r = 0; r < mq; ++r)
          if (tr.mask_off < 0 || s.masks[tr.mask_off + r * BN + j % BN]) poisoned[r] = 1;
      }
      Vrun = vr;
    }
    float* Sp = w.S.data();
    gemm(mq, klen, D, Q, D, Kt + k0, N, Sp, klen, false);
    mask_run(s.masks, s.bn, list, run, Sp, mq, klen);
    // online softmax over this run
    for (int64_t r = 0; r < mq; ++r) {
      float* sr = Sp + r * klen;
      // m holds the running max of the raw (unscaled) scores: scale > 0 keeps the order, and
      // subtracting before scaling keeps every exponent <= 0 whatever the scores' magnitude
      const float mx = max_of(sr, klen);  // NaN if a score is NaN: the row's output becomes NaN
      if (mx == NEG_INF) {  // nothing allowed for this row in this run
        std::fill(sr, sr + klen, 0.f);
        continue;
      }
      const float mnew = std::isnan(mx) ? mx : std::max(m[r], mx);
      const float alpha = m[r] == NEG_INF ? 0.f : exp2((m[r] - mnew) * (scale * LOG2E));
      const float sum = exp2_sum(sr, klen, scale * LOG2E, mnew);  // exp(scale * (s - mnew))
      l[r] = l[r] * alpha + sum;
      m[r] = mnew;
      if (alpha != 1.f) scale_by(acc + r * D, D, alpha);
    }
    gemm(mq, D, klen, Sp, klen, Vrun, D, acc, D, true);
  });
  bool finite = true;
  for (int64_t r = 0; r < mq; ++r) {  // write rows back to their sequence positions
    const int64_t pos = perm ? perm[q0 + r] : q0 + r;
    float* O = out + (bh * N + pos) * D;
    if (careful && poisoned[r]) {
      std::fill(O, O + D, std::numeric_limits<float>::quiet_NaN());
      lse[bh * N + pos] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float inv = 1.f / l[r];
    for (int64_t d = 0; d < D; ++d) O[d] = acc[r * D + d] * inv;
    // m * scale rounded on its own (volatile: not fused into the add), as the backward rounds its
    // scaled scores (scale_scores), so that their difference at the max is exact
    volatile float ms = m[r] * scale;
    lse[bh * N + pos] = ms + std::log(l[r]);
    finite = finite && all_finite(O, D) && std::isfinite(lse[bh * N + pos]);
  }
  return finite;
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
    w.vrun.resize(max_tiles * BN * D);
    w.poisoned.resize(BM);
    w.cache.kt.resize(D * N);
    w.cache.vp.resize(s.identity ? 0 : N * D);
    for (int64_t task = next_task(); task < ntasks; task = next_task())
      for (int64_t t = task * tiles_per_task; t < (task + 1) * tiles_per_task; ++t) {
        const int64_t bh = t / s.nq, qi = t % s.nq;
        w.cache.fill(s, k, v, bh, N, D);
        // a non-finite key may give a -inf score, which the plain path would read as masked
        const bool careful = !w.cache.k_finite;
        if (careful) w.cache.find_bad(s, k, v, N, D);
        if (!fwd_query_tile(s, p, q, k, v, out, lse, bh, qi, w, careful) && !careful) {
          w.cache.find_bad(s, k, v, N, D);  // a NaN or an infinity came out: redo the tile
          fwd_query_tile(s, p, q, k, v, out, lse, bh, qi, w, true);
        }
      }
  });
}

namespace {

// S *= scale in place, as its own pass: the scaled scores are rounded exactly as the forward rounds
// its max (m * scale) into lse, so that S - lse cancels exactly at a row's max however large the
// scores are (a fused multiply-subtract would round differently and, at scores of ~1e4 and more,
// put visible error into P).
inline void scale_scores(float* S, int64_t n, float scale) { scale_by(S, n, scale); }

// P = exp(S - lse) (S scaled; masked entries are -inf -> 0) and dS = P * (dP - delta), in place
// (S becomes P, dP becomes dS). lse/delta index rows (query-major) or columns (key-major).
template <bool KEY_MAJOR>
inline void softmax_grad(float* S, float* dP, int64_t rows, int64_t cols, const float* lse,
                         const float* delta) {
  const Vec log2e(LOG2E);
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = S + r * cols;
    float* dr = dP + r * cols;
    for (int64_t c = 0; c < cols; c += VEC) {
      const int64_t n = std::min(VEC, cols - c);
      const Vec l = KEY_MAJOR ? Vec::loadu(lse + c, n) : Vec(lse[r]);
      const Vec dl = KEY_MAJOR ? Vec::loadu(delta + c, n) : Vec(delta[r]);
      const Vec pe = softmax_numerator(Vec::loadu(sr + c, n), l, log2e);
      pe.store(sr + c, n);
      (pe * (Vec::loadu(dr + c, n) - dl)).store(dr + c, n);
    }
  }
}

// One head's backward operands in processing (slot) order: q rows (N x D) and transposed (D x N)
// copies (unscaled: the scores are formed as the forward forms them, then scaled), lse and
// delta = rowsum(grad_out * out) - grad_lse.
struct HeadOperands {
  const float *qs, *qst, *k, *kt, *v, *vt, *go, *got, *lse, *delta;
};

// Storage behind HeadOperands. Row copies of k, v, grad_out and lse are only made when the
// schedule permutes positions (otherwise the operands point into the inputs); vt only when the
// query-tile-major dQ pass needs it.
struct HeadBuffers {
  Buffer qs, qst, k, kt, v, vt, go, got, lse, delta;
  Buffer in_q, in_k, in_v, in_go, in_out, in_lse, in_glse;  // sanitize_head's copies
  HeadOperands ops{};

  void allocate(const Schedule& s, int64_t N, int64_t D, bool need_vt) {
    const int64_t ND = N * D, rowsND = s.identity ? 0 : ND;
    qs.resize(ND), qst.resize(ND), kt.resize(ND), got.resize(ND), delta.resize(N);
    k.resize(rowsND), v.resize(rowsND), go.resize(rowsND), lse.resize(s.identity ? 0 : N);
    vt.resize(need_vt ? ND : 0);
  }
};

// One head's backward inputs in sequence order (rows (N, D), lse and grad_lse (N,) or null):
// pointers into the call's inputs, or into sanitize_head's copies.
struct HeadInputs {
  const float *q, *k, *v, *go, *out, *lse, *glse;
};

inline HeadInputs head_inputs(const AttnProblem& p, const BwdInputs& in, int64_t bh) {
  const int64_t off = bh * p.n * p.d;
  return {in.q + off, in.k + off, in.v + off, in.go + off, in.out + off, in.lse + bh * p.n,
          in.grad_lse ? in.grad_lse + bh * p.n : nullptr};
}

// Head bh has rows the forward output as NaN (lse NaN): rows whose query, or a key or value they
// may read, holds a NaN or an infinity.
inline bool head_has_nan_rows(const AttnProblem& p, const BwdInputs& in, int64_t bh) {
  return !all_finite(in.lse + bh * p.n, p.n);
}

// Copies of head bh's inputs for a head with NaN rows, in which those rows pass no gradient and
// nothing non-finite reaches another row: a NaN row gets query, grad_out, out and grad_lse 0 and
// lse +inf (so its P, dP and dS are exactly 0), and key and value rows holding a NaN or an
// infinity become 0 (only NaN rows may read them; every other row has them masked, where a
// GEMM's 0 * NaN would otherwise leak into its dQ, and dP = dO V^T into its masked dS).
HeadInputs sanitize_head(const AttnProblem& p, const BwdInputs& in, int64_t bh, HeadBuffers& b) {
  const int64_t N = p.n, D = p.d;
  const HeadInputs src = head_inputs(p, in, bh);
  for (Buffer* x : {&b.in_q, &b.in_k, &b.in_v, &b.in_go, &b.in_out}) x->resize(N * D);
  b.in_lse.resize(N);
  b.in_glse.resize(N);
  auto row = [&](const float* from, Buffer& to, int64_t i, bool zero) {
    if (zero)
      std::fill(to.data() + i * D, to.data() + (i + 1) * D, 0.f);
    else
      std::memcpy(to.data() + i * D, from + i * D, D * sizeof(float));
  };
  for (int64_t i = 0; i < N; ++i) {
    const bool nan_row = !std::isfinite(src.lse[i]);
    const bool bad_kv = !all_finite(src.k + i * D, D) || !all_finite(src.v + i * D, D);
    row(src.q, b.in_q, i, nan_row);
    row(src.go, b.in_go, i, nan_row);
    row(src.out, b.in_out, i, nan_row);
    row(src.k, b.in_k, i, bad_kv);
    row(src.v, b.in_v, i, bad_kv);
    b.in_lse[i] = nan_row ? std::numeric_limits<float>::infinity() : src.lse[i];
    b.in_glse[i] = nan_row || !src.glse ? 0.f : src.glse[i];
  }
  return {b.in_q.data(), b.in_k.data(), b.in_v.data(), b.in_go.data(), b.in_out.data(), b.in_lse.data(),
          b.in_glse.data()};
}

inline HeadInputs checked_head_inputs(const AttnProblem& p, const BwdInputs& in, int64_t bh, HeadBuffers& b) {
  return head_has_nan_rows(p, in, bh) ? sanitize_head(p, in, bh, b) : head_inputs(p, in, bh);
}

constexpr int PREP_PARTS = 4;  // q | k | v | grad_out, lse, delta

// Fills part `part` of a head's operands (inputs `in`) into b (allocated) and points b.ops at them.
void prepare_head(const Schedule& s, const AttnProblem& p, const HeadInputs& in, int part, HeadBuffers& b) {
  const int64_t N = p.n, D = p.d;
  const int32_t* perm = s.identity ? nullptr : s.perm.data();
  HeadOperands& h = b.ops;
  switch (part) {
    case 0:
      gather_head(in.q, perm, N, D, b.qs.data(), b.qst.data());
      h.qs = b.qs.data(), h.qst = b.qst.data();
      break;
    case 1:
      gather_head(in.k, perm, N, D, perm ? b.k.data() : nullptr, b.kt.data());
      h.k = perm ? b.k.data() : in.k, h.kt = b.kt.data();
      break;
    case 2:
      if (perm || !b.vt.empty())
        gather_head(in.v, perm, N, D, perm ? b.v.data() : nullptr, b.vt.empty() ? nullptr : b.vt.data());
      h.v = perm ? b.v.data() : in.v, h.vt = b.vt.empty() ? nullptr : b.vt.data();
      break;
    default: {
      gather_head(in.go, perm, N, D, perm ? b.go.data() : nullptr, b.got.data());
      h.go = perm ? b.go.data() : in.go, h.got = b.got.data();
      const float* lse = in.lse;
      const float* glse = in.glse;
      // rowsum(grad_out * out) rounded as the GEMMs round dP = dO V^T: where a row's softmax is one-hot,
      // out is that key's value row and dS = P (dP - delta) cancels exactly, as it does in PyTorch
      // (any other summation order leaves scale x 1 ulp of dP in dS there)
      constexpr int64_t R = 8;
      for (int64_t i0 = 0; i0 < N; i0 += R) {
        const int64_t nr = std::min(R, N - i0);
        const float* g[R];
        const float* o[R];
        float acc[R];
        for (int64_t r = 0; r < R; ++r) {
          const int64_t pos = perm ? perm[i0 + std::min(r, nr - 1)] : i0 + std::min(r, nr - 1);
          g[r] = in.go + pos * D;
          o[r] = in.out + pos * D;
        }
        dots_in_gemm_order<R>(g, o, D, acc);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t pos = perm ? perm[i0 + r] : i0 + r;
          b.delta[i0 + r] = acc[r] - (glse ? glse[pos] : 0.f);
          if (perm) b.lse[i0 + r] = lse[pos];
        }
      }
      h.lse = perm ? b.lse.data() : lse, h.delta = b.delta.data();
    }
  }
}

// Output rows of one head, written at sequence positions (slot i -> row perm[i]).
struct HeadGrads {
  float *dq, *dk, *dv;
  const int32_t* perm;  // nullptr: identity
  int64_t pos(int64_t slot) const { return perm ? perm[slot] : slot; }
};

// Key-tile-major backward of key tile kj of one head, with key-major scores S^T = K Q^T.
// Writes dK, dV of the tile; with dqt (D x N scratch of this head), accumulates dQ^T too.
void bwd_key_tile(const Schedule& s, int64_t N, int64_t D, float scale, const HeadOperands& h, const HeadGrads& g,
                  int64_t kj, float* dqt, float* St, float* dPt, float* dk_acc, float* dv_acc) {
  const int64_t BM = s.bm, BN = s.bn;
  const int64_t k0 = kj * BN, nk = std::min(BN, N - k0);
  const float* K = h.k + k0 * D;
  const float* V = h.v + k0 * D;
  const float* Kt = h.kt + k0;
  std::fill(dk_acc, dk_acc + nk * D, 0.f);
  std::fill(dv_acc, dv_acc + nk * D, 0.f);
  const int64_t max_tiles = std::max<int64_t>(1, RUN_MAX / BM);
  const TileRef* list = s.k_tiles.data();
  for_each_run(list, s.k_ptr[kj], s.k_ptr[kj + 1], max_tiles, [&](Run run) {
    const int64_t q0 = list[run.first].tile * BM;
    const int64_t qlen = std::min(run.count * BM, N - q0);
    gemm(nk, qlen, D, K, D, h.qst + q0, N, St, qlen, false);        // S^T = K Q^T
    mask_run(s.masks_t, s.bm, list, run, St, nk, qlen);
    scale_scores(St, nk * qlen, scale);
    gemm(nk, qlen, D, V, D, h.got + q0, N, dPt, qlen, false);       // dP^T = V dO^T
    softmax_grad<true>(St, dPt, nk, qlen, h.lse + q0, h.delta + q0);
    gemm(nk, D, qlen, St, qlen, h.go + q0 * D, D, dv_acc, D, true);  // dV += P^T dO
    gemm(nk, D, qlen, dPt, qlen, h.qs + q0 * D, D, dk_acc, D, true); // dK += dS^T Q (x scale below)
    if (dqt) gemm(D, qlen, nk, Kt, N, dPt, qlen, dqt + q0, N, true);  // dQ^T += K^T dS^T
  });
  for (int64_t r = 0; r < nk; ++r) {
    const int64_t pos = g.pos(k0 + r);
    float* dk = g.dk + pos * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dk[d] = scale * dk_acc[r * D + d];
    std::copy(dv_acc + r * D, dv_acc + (r + 1) * D, g.dv + pos * D);
  }
}

// Query-tile-major dQ of query tile qi of one head (query-major scores); dq_acc: BM x D scratch.
void bwd_query_tile(const Schedule& s, int64_t N, int64_t D, float scale, const HeadOperands& h,
                    const HeadGrads& g, int64_t qi, float* S, float* dP, float* dq_acc) {
  const int64_t BM = s.bm, BN = s.bn;
  const int64_t q0 = qi * BM, mq = std::min(BM, N - q0);
  std::fill(dq_acc, dq_acc + mq * D, 0.f);
  const int64_t max_tiles = std::max<int64_t>(1, RUN_MAX / BN);
  const TileRef* list = s.q_tiles.data();
  for_each_run(list, s.q_ptr[qi], s.q_ptr[qi + 1], max_tiles, [&](Run run) {
    const int64_t k0 = list[run.first].tile * BN;
    const int64_t klen = std::min(run.count * BN, N - k0);
    gemm(mq, klen, D, h.qs + q0 * D, D, h.kt + k0, N, S, klen, false);  // S = Q K^T
    mask_run(s.masks, s.bn, list, run, S, mq, klen);
    scale_scores(S, mq * klen, scale);
    gemm(mq, klen, D, h.go + q0 * D, D, h.vt + k0, N, dP, klen, false);
    softmax_grad<false>(S, dP, mq, klen, h.lse + q0, h.delta + q0);
    gemm(mq, D, klen, dP, klen, h.k + k0 * D, D, dq_acc, D, true);
  });
  for (int64_t r = 0; r < mq; ++r) {
    float* dst = g.dq + g.pos(q0 + r) * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = scale * dq_acc[r * D + d];
  }
}

}  // namespace

void sparse_attention_backward(const Schedule& s, const AttnProblem& p, const BwdInputs& in, float* dq,
                               float* dk, float* dv) {
  const int64_t N = p.n, D = p.d, ND = N * D;
  const int32_t* perm = s.identity ? nullptr : s.perm.data();
  const int64_t scratch = std::max(RUN_MAX, std::max(s.bm, s.bn)) * std::max(s.bm, s.bn);
  const int64_t nthreads = at::get_num_threads();
  auto grads = [&](int64_t bh) { return HeadGrads{dq + bh * ND, dk + bh * ND, dv + bh * ND, perm}; };
  if (p.bh >= 2 * nthreads || p.bh % nthreads == 0) {
    // One parallel region: each task owns a head, gathers and transposes its operands into the
    // thread's buffers (cache-resident for the whole head), then one key-tile-major pass that also
    // accumulates dQ^T, and writes the gradients back to sequence positions.
    parallel_tasks(p.bh, [&](auto next_task) {
      Buffer St(scratch), dPt(scratch), dka(s.bn * D), dva(s.bn * D), dqt(ND);
      HeadBuffers b;
      b.allocate(s, N, D, /*need_vt=*/false);
      for (int64_t bh = next_task(); bh < p.bh; bh = next_task()) {
        const HeadInputs hin = checked_head_inputs(p, in, bh, b);
        for (int part = 0; part < PREP_PARTS; ++part) prepare_head(s, p, hin, part, b);
        std::fill(dqt.begin(), dqt.end(), 0.f);
        const HeadGrads g = grads(bh);
        for (int64_t kj = 0; kj < s.nk; ++kj)
          bwd_key_tile(s, N, D, p.scale, b.ops, g, kj, dqt.data(), St.data(), dPt.data(), dka.data(), dva.data());
        constexpr int64_t B = 16;  // dQ = scale * (dQ^T)^T, rows to sequence positions
        for (int64_t i0 = 0; i0 < N; i0 += B)
          for (int64_t d0 = 0; d0 < D; d0 += B)
            for (int64_t i = i0; i < std::min(N, i0 + B); ++i) {
              float* dst = g.dq + g.pos(i) * D;
              for (int64_t d = d0; d < std::min(D, d0 + B); ++d) dst[d] = p.scale * dqt[d * N + i];
            }
      }
    });
    return;
  }
  // Few heads: parallelise over tiles. Operands of all heads first (tasks: head x part), then dK/dV
  // (key-tile-major) and dQ (query-tile-major) in separate passes.
  std::vector<HeadBuffers> heads(p.bh);
  for (auto& b : heads) b.allocate(s, N, D, /*need_vt=*/true);
  std::vector<HeadInputs> inputs(p.bh);
  for (int64_t bh = 0; bh < p.bh; ++bh) inputs[bh] = checked_head_inputs(p, in, bh, heads[bh]);
  parallel_tasks(p.bh * PREP_PARTS, [&](auto next_task) {
    for (int64_t t = next_task(); t < p.bh * PREP_PARTS; t = next_task())
      prepare_head(s, p, inputs[t / PREP_PARTS], static_cast<int>(t % PREP_PARTS), heads[t / PREP_PARTS]);
  });
  parallel_tasks(p.bh * s.nk, [&](auto next_task) {
    Buffer St(scratch), dPt(scratch), dka(s.bn * D), dva(s.bn * D);
    for (int64_t t = next_task(); t < p.bh * s.nk; t = next_task())
      bwd_key_tile(s, N, D, p.scale, heads[t / s.nk].ops, grads(t / s.nk), t % s.nk, nullptr, St.data(), dPt.data(),
                   dka.data(), dva.data());
  });
  parallel_tasks(p.bh * s.nq, [&](auto next_task) {
    Buffer S(scratch), dP(scratch), dqa(s.bm * D);
    for (int64_t t = next_task(); t < p.bh * s.nq; t = next_task())
      bwd_query_tile(s, N, D, p.scale, heads[t / s.nq].ops, grads(t / s.nq), t % s.nq, S.data(), dP.data(),
                     dqa.data());
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace dalle_fast
