// CPU decode attention: per (row, head) the scores of the allowed keys (decode_index.h), a softmax
// and the weighted values; float32 accumulation. Traffic: each allowed key and value row once
// (T + image keys, not the prefix); q/k_new/v_new once. Work items are (head, rows); candidates
// sharing a prompt's text caches are one item, whose text part (float32) is two small GEMMs.
// Compiled once per instruction set (cpu/kernels.h); the vector code is cpu/vec.h.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/decode_index.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"

namespace dalle_fast {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t CHUNK_ITEMS = 4;  // work items taken at once, at most (fewer when items are few)
constexpr int64_t GROUP_ROWS = 32;  // rows per work item that share one prompt's text caches
// the text part of an item is two GEMMs from this many rows on; below, dot products per row (the
// GEMM's call and kernel lookup cost more than a few rows' dot products over the text keys)
constexpr int64_t GEMM_MIN_ROWS = 4;

// A work item: one head and up to GROUP_ROWS rows. With shared text caches the rows of an item
// share their prompt and text-key count, and for float32 the text part of all of them is two GEMMs
// (scores = Q K_text^T, out = P V_text) on the prompt's cache instead of one dot product per row
// and key: the text keys dominate image decoding (T = 256 of ~290 keys at the paper's shape).
struct Item {
  int64_t head;
  int64_t first, count;  // rows order[first .. first + count)
};

template <typename T>
void run(const DecodeArgs& a) {
  const int64_t B = a.batch, H = a.heads, D = a.head_dim;
  const LayoutParams& L = a.layout;
  const float qscale = a.scale * LOG2E;  // scores in log2 units
  const bool shared = a.text_k.data != nullptr;
  constexpr bool kGemm = std::is_same<T, float>::value;
  // key positions of each row (the same for all heads), max_keys per row: the most keys a row of
  // this call reads (not the layout's maximum, which can be the whole sequence)
  std::vector<int64_t> n_keys(B), n_text(B);
  int64_t max_keys = 1;
  for (int64_t b = 0; b < B; ++b) {
    const DecodeKeys dk = decode_keys(L, a.pos[b * a.pos_stride]);
    n_keys[b] = dk.total();
    n_text[b] = dk.n_text;
    max_keys = std::max(max_keys, dk.total());
  }
  std::vector<int64_t> key_pos(static_cast<size_t>(B * max_keys));
  for (int64_t b = 0; b < B; ++b) {
    const DecodeKeys dk = decode_keys(L, a.pos[b * a.pos_stride]);
    for (int64_t j = 0; j < dk.total(); ++j) key_pos[b * max_keys + j] = dk.position(j);
  }
  // rows ordered by (prompt, text keys) when the text caches are shared, cut into items
  std::vector<int64_t> order(B);
  for (int64_t b = 0; b < B; ++b) order[b] = b;
  const bool grouped = shared && kGemm;
  if (grouped)
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
      const int64_t px = a.prompt_index[x], py = a.prompt_index[y];
      return px != py ? px < py : n_text[x] < n_text[y];
    });
  std::vector<Item> items;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < B;) {
      int64_t j = i + 1;
      if (grouped)
        while (j < B && j - i < GROUP_ROWS && a.prompt_index[order[j]] == a.prompt_index[order[i]] &&
               n_text[order[j]] == n_text[order[i]])
          ++j;
      items.push_back(Item{h, i, j - i});
      i = j;
    }
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t m_max = grouped ? GROUP_ROWS : 1;
  const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_items));
  // each thread takes a few chunks: with 4 items (4 heads x 16 rows of one prompt) and chunks of
  // CHUNK_ITEMS the first thread took them all
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(CHUNK_ITEMS, n_items / (4 * n_threads)));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n_threads, 1, [&](int64_t, int64_t) {
    Buffer scores(static_cast<size_t>(m_max * max_keys));
    Buffer qf(static_cast<size_t>(m_max * D)), acc(static_cast<size_t>(m_max * D));
    Buffer sums(static_cast<size_t>(m_max));
    std::vector<uint8_t> nan_row(static_cast<size_t>(m_max));
    bool used_gemm = false;
    Buffer qt(grouped ? static_cast<size_t>(D * m_max) : 0);
    Buffer st(grouped ? static_cast<size_t>(m_max * max_keys) : 0);
    for (;;) {
    const int64_t begin = next.fetch_add(chunk, std::memory_order_relaxed);
    if (begin >= n_items) break;
    const int64_t end = std::min(n_items, begin + chunk);
    for (int64_t it = begin; it < end; ++it) {
      const Item& item = items[it];
      const int64_t h = item.head, m = item.count;
      const int64_t b0 = order[item.first];
      // text keys done by GEMM for the whole item (grouped) or per row below
      const int64_t gemm_text = grouped && m >= GEMM_MIN_ROWS ? n_text[b0] : 0;
      used_gemm = used_gemm || gemm_text > 0;
      const T* tk0 = nullptr;
      const T* tv0 = nullptr;
      if (shared) {
        tk0 = static_cast<const T*>(a.text_k.data) + a.prompt_index[b0] * a.text_k.s0 + h * a.text_k.s1;
        tv0 = static_cast<const T*>(a.text_v.data) + a.prompt_index[b0] * a.text_v.s0 + h * a.text_v.s1;
      }
      // 1. append the new keys/values, scaled queries
      for (int64_t r = 0; r < m; ++r) {
        const int64_t b = order[item.first + r];
        const int64_t slot = a.pos[b * a.pos_stride] - a.cache_offset;
        const int64_t row = b * H + h;
        T* kc = static_cast<T*>(a.k_cache.data) + b * a.k_cache.s0 + h * a.k_cache.s1;
        T* vc = static_cast<T*>(a.v_cache.data) + b * a.v_cache.s0 + h * a.v_cache.s1;
        std::memcpy(kc + slot * a.k_cache.s2, static_cast<const T*>(a.k_new) + row * D, D * sizeof(T));
        std::memcpy(vc + slot * a.v_cache.s2, static_cast<const T*>(a.v_new) + row * D, D * sizeof(T));
        const T* qp = static_cast<const T*>(a.q) + row * D;
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = static_cast<float>(qp[d]) * qscale;
      }
      // 2. text scores of all rows: S^T (nt x m) = K_text Q^T, then S[r, 0:nt]
      if constexpr (kGemm) {
        if (gemm_text > 0) {
          for (int64_t r = 0; r < m; ++r)
            for (int64_t d = 0; d < D; ++d) qt[d * m + r] = qf[r * D + d];
          at::native::cpublas::brgemm(gemm_text, m, D, a.text_k.s2, m, m, false, tk0, qt.data(), st.data(),
                                      /*is_vnni=*/false);
          for (int64_t j = 0; j < gemm_text; ++j)
            for (int64_t r = 0; r < m; ++r) scores[r * max_keys + j] = st[j * m + r];
        }
      }
      // 3. per row: the other scores (dot products) and the softmax
      for (int64_t r = 0; r < m; ++r) {
        const int64_t b = order[item.first + r];
        T* kc = static_cast<T*>(a.k_cache.data) + b * a.k_cache.s0 + h * a.k_cache.s1;
        const int64_t n = n_keys[b];
        const int64_t* kp = key_pos.data() + b * max_keys;
        float* sc = scores.data() + r * max_keys;
        int64_t j = gemm_text;
        if (shared)
          for (; j < n_text[b]; ++j) sc[j] = dot(qf.data() + r * D, tk0 + j * a.text_k.s2, D);
        for (; j < n; ++j) sc[j] = dot(qf.data() + r * D, kc + (kp[j] - a.cache_offset) * a.k_cache.s2, D);
        // a NaN or an infinity in the query or a key it reads makes a score non-finite, and a -inf
        // score would pass for a masked one: the row is NaN (as in sparse_attention)
        nan_row[r] = !all_finite(sc, n);
        sums[r] = exp2_sum(sc, n, 1.f, max_of(sc, n));
      }
      // 4. text part of the output of all rows: O (m x D) = P_text V_text
      bool acc_set = false;
      if constexpr (kGemm) {
        if (gemm_text > 0) {
          at::native::cpublas::brgemm(m, D, gemm_text, max_keys, a.text_v.s2, D, false, scores.data(), tv0,
                                      acc.data(), /*is_vnni=*/false);
          acc_set = true;
        }
      }
      if (!acc_set) std::fill(acc.begin(), acc.begin() + m * D, 0.f);
      // 5. per row: the other weighted values, normalise, write
      for (int64_t r = 0; r < m; ++r) {
        const int64_t b = order[item.first + r];
        const T* vc = static_cast<const T*>(a.v_cache.data) + b * a.v_cache.s0 + h * a.v_cache.s1;
        const int64_t n = n_keys[b];
        const int64_t* kp = key_pos.data() + b * max_keys;
        const float* sc = scores.data() + r * max_keys;
        float* ac = acc.data() + r * D;
        int64_t j = gemm_text;
        for (; j < n; ++j) {
          const T* vr = shared && j < n_text[b] ? tv0 + j * a.text_v.s2
                                                : vc + (kp[j] - a.cache_offset) * a.v_cache.s2;
          axpy(ac, sc[j], vr, D);
        }
        float* o = a.out + (b * H + h) * D;
        const float inv = 1.f / sums[r];
        for (int64_t d = 0; d < D; ++d) o[d] = ac[d] * inv;
        if (nan_row[r] || !all_finite(o, D)) std::fill(o, o + D, std::numeric_limits<float>::quiet_NaN());
      }
    }
    }
    if (used_gemm) at::native::cpublas::brgemm_release(false);
  });
}

}  // namespace

void decode_attention(const DecodeArgs& a) {
  switch (a.dtype) {
    case kF32: run<float>(a); break;
    case kBF16: run<c10::BFloat16>(a); break;
    case kF16: run<c10::Half>(a); break;
    default: break;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace dalle_fast
