// The pairs (token, choice) of one MoE decode step grouped by expert, and the weighted sum that combines their
// outputs; shared by the decode kernels of the CPU backend (cpu/csrc/moe_experts.cpp, bf16 / fp32 experts) and of
// the quantized one (quant/csrc/qmoe.cpp, q8_0 / q4_0 experts). Read into one translation unit before them.
//
// Worked example: T = 3 tokens, k = 2, ids = [[2, 0], [0, 1], [2, 1]] (E = 3).
//   pairs in expert order, tokens ascending within an expert:  p = 0: (t 0, e 0)  1: (t 1, e 0)
//                                                              2: (t 1, e 1)  3: (t 2, e 1)  4: (t 0, e 2)  5: (t 2, e 2)
//   token = [0, 1, 1, 2, 0, 2];  pair_of (t, j) = [[4, 0], [1, 2], [5, 3]]
//   chunks (expert, first pair, rows) = (0, 0, 2), (1, 2, 2), (2, 4, 2): each expert read once for its 2 tokens.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace moe_plan {

constexpr int64_t kMaxRows = 8;               // the tiles' largest row count: an expert's pairs go in chunks of 8

struct Chunk {
  int64_t expert, first, rows;                // pairs first .. first + rows - 1, all of this expert
};

struct Plan {
  int64_t T = 0, k = 0, P = 0;
  std::vector<int64_t> token;                 // (P): the token of pair p
  std::vector<int64_t> pair_of;               // (T * k): the pair of choice j of token t, at t * k + j
  std::vector<Chunk> chunks;
};

// ids: (T, k) int64, contiguous, every id in [0, E).
inline Plan make(const torch::Tensor& ids, int64_t E) {
  Plan p;
  p.T = ids.size(0);
  p.k = ids.size(1);
  p.P = p.T * p.k;
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t i = 0; i < p.P; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < E, "moe: expert id ", id[i], " out of range for ", E, " experts");
    ++start[id[i] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  p.token.resize(p.P);
  p.pair_of.resize(p.P);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < p.P; ++i) {         // i = t * k + j in order: tokens ascending within each expert
    const int64_t q = fill[id[i]]++;
    p.token[q] = i / p.k;
    p.pair_of[i] = q;
  }
  for (int64_t e = 0; e < E; ++e)
    for (int64_t q = start[e]; q < start[e + 1]; q += kMaxRows)
      p.chunks.push_back({e, q, std::min(kMaxRows, start[e + 1] - q)});
  return p;
}

// out (T, D) = for each token, over its k choices in increasing expert id (ties: in choice order), the sum of
// y[pair] * weight, starting from 0, each product and each sum rounded to T: the order and the roundings of the
// plain module's expert loop (index_add_ of expert(x) * weight into zeros). y: (P, D) in pair order; w: (T, k).
template <typename T>
void combine(const Plan& p, const int64_t* ids, const T* y, const T* w, T* out, int64_t D) {
  std::vector<int64_t> order(p.k);
  for (int64_t t = 0; t < p.T; ++t) {
    for (int64_t j = 0; j < p.k; ++j) order[j] = j;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[t * p.k + a] < ids[t * p.k + b]; });
    T* o = out + t * D;
    for (int64_t d = 0; d < D; ++d) o[d] = T(0);
    for (int64_t j : order) {
      const T* yr = y + p.pair_of[t * p.k + j] * D;
      const T wt = w[t * p.k + j];
      for (int64_t d = 0; d < D; ++d) {
        const T prod = yr[d] * wt;
        o[d] = o[d] + prod;
      }
    }
  }
}

}  // namespace moe_plan
