// One MoE layer's experts in a decode step, over bf16 / fp32 weights stacked per layer, in one call:
//
//   moe_experts(x (T, D), ids (T, k) int64, weights (T, k), w1 (E, H, D), w3 (E, H, D), w2 (E, D, H)) -> (T, D)
//
//   out[t] = sum over the k choices j of token t of  weights[t, j] * w2[e] (silu(w1[e] x_t) * w3[e] x_t),  e = ids[t, j]
//
// Each chosen expert's rows are read where they are in the stacked tensors (any stride between experts, rows
// contiguous): no gather and no copy of weights. The pairs (token, choice) are grouped by expert (moe_plan.h), so
// an expert that several tokens of the step chose is read once for all of them, up to 8 rows per tile: the tile
// of small_m_linear.cpp (each build's own: AVX-512 with _mm512_dpbf16_ps / 16-lane FMA, or SIROCCO_AVX2 with
// 8-lane FMA), so each product has small_m_linear's bits. Two passes, each shared out over the threads by
// at::parallel_for in contiguous ranges of output rows (all chunks' rows end to end): w1 and w3 rows into the
// hidden activations, then w2 rows into the outputs.
//
// The roundings are those of the plain module (model/transformer.py, FeedForward and MoeFeedForward's loop) over
// the CPU backend's linears, which run small_m_linear for 1 to 8 rows: w1 x and w3 x rounded to x's dtype, silu
// of the first (ATen's, on each pair's row by itself), times the second, w2 of that rounded to x's dtype, then
// moe_plan::combine. Every output's bits depend on its own token's inputs only: not on the other tokens of the
// step, nor on the thread count.
//
// Read after small_m_linear.cpp (its tile) and moe_plan.h, in one translation unit (kernels.py's BUILDS).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace moe_kernel {

using elem_bf16 = at::BFloat16;

#ifdef SIROCCO_AVX2
// The tile takes its input rows in fp32 (row stride K: moe_experts asks D and H to be multiples of 8).
template <typename T>
using In = float;
template <int M>
constexpr int rows_per_tile() { return M <= 2 ? 4 : 3; }          // small_m_linear's R for the avx2 build
template <typename T, int M, int R>
inline void tile_rows(const float* x, const T* w, T* y, int64_t N, int64_t K, int64_t n) {
  tile<T, M, R>(x, K, w, y, N, K, n);
}
#else
template <typename T>
struct StepOf;
template <>
struct StepOf<elem_bf16> { using S = BF16Step; };
template <>
struct StepOf<float> { using S = F32Step; };
template <typename T>
using In = T;
template <int M>
constexpr int rows_per_tile() { return M == 1 ? 1 : 4; }          // small_m_linear's R for the avx512 build
template <typename T, int M, int R>
inline void tile_rows(const T* x, const T* w, T* y, int64_t N, int64_t K, int64_t n) {
  tile<typename StepOf<T>::S, M, R>(x, w, y, N, K, n);
}
#endif

// Outputs y[m, n0 .. n1) for the M rows of x (row stride K) against weight rows w + n * K; y's row stride N.
template <typename T, int M>
void rows_block(const In<T>* x, const T* w, T* y, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  constexpr int R = rows_per_tile<M>();
  int64_t n = n0;
  for (; n + R <= n1; n += R) tile_rows<T, M, R>(x, w, y, N, K, n);
  for (; n < n1; ++n) tile_rows<T, M, 1>(x, w, y, N, K, n);
}

template <typename T>
using BlockFn = void (*)(const In<T>*, const T*, T*, int64_t, int64_t, int64_t, int64_t);

template <typename T>
BlockFn<T> pick(int64_t M) {
  switch (M) {
    case 1: return rows_block<T, 1>;
    case 2: return rows_block<T, 2>;
    case 3: return rows_block<T, 3>;
    case 4: return rows_block<T, 4>;
    case 5: return rows_block<T, 5>;
    case 6: return rows_block<T, 6>;
    case 7: return rows_block<T, 7>;
    case 8: return rows_block<T, 8>;
  }
  TORCH_CHECK(false, "moe_experts: 1 to 8 rows per tile, got ", M);
}

constexpr int64_t kBlockRows = 48;            // output rows per task of the thread pool (a multiple of R = 3 and 4)

// For every chunk of the plan: y rows [first, first + rows) (row length N) = its rows of x (row length K) times the
// N rows of its expert's matrix w + expert * stride (and the same with w_b into y_b, if given: w1 and w3 in one
// pass). Tasks are blocks of kBlockRows output rows, chunk after chunk.
template <typename T>
void products(const moe_plan::Plan& plan, const In<T>* x, int64_t N, int64_t K, const T* w, int64_t stride, T* y,
              const T* w_b = nullptr, int64_t stride_b = 0, T* y_b = nullptr) {
  const int64_t per_chunk = (N + kBlockRows - 1) / kBlockRows;
  const int64_t tasks = (int64_t)plan.chunks.size() * per_chunk;
  const int64_t matrices = w_b ? 2 : 1;
  // Grain: about 64 KiB of weights per task, so that small matrices do not pay for waking a second thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / (matrices * kBlockRows * K * (int64_t)sizeof(T)));
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const moe_plan::Chunk& c = plan.chunks[t / per_chunk];
      const int64_t n0 = (t % per_chunk) * kBlockRows, n1 = std::min(N, n0 + kBlockRows);
      const BlockFn<T> block = pick<T>(c.rows);
      block(x + c.first * K, w + c.expert * stride, y + c.first * N, N, K, n0, n1);
      if (w_b) block(x + c.first * K, w_b + c.expert * stride_b, y_b + c.first * N, N, K, n0, n1);
    }
  });
}

// Row r of dst = row index[r] of src (index null: row r), converted to the tile's input type (exact).
template <typename T>
void rows_as(const T* src, const std::vector<int64_t>* index, int64_t rows, int64_t K, In<T>* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + (index ? (*index)[r] : r) * K;
    for (int64_t i = 0; i < K; ++i) dst[r * K + i] = In<T>(s[i]);
  }
}

template <typename T>
torch::Tensor experts(const torch::Tensor& x, const torch::Tensor& ids, const torch::Tensor& weights,
                      const torch::Tensor& w1, const torch::Tensor& w3, const torch::Tensor& w2) {
  const int64_t D = x.size(1), E = w1.size(0), H = w1.size(1);
  const moe_plan::Plan plan = moe_plan::make(ids, E);
  const at::TensorOptions in_opt = x.options().dtype(c10::CppTypeToScalarType<In<T>>::value);

  torch::Tensor xs = torch::empty({plan.P, D}, in_opt);                   // the inputs in pair order
  rows_as<T>(x.data_ptr<T>(), &plan.token, plan.P, D, xs.data_ptr<In<T>>());
  auto g = torch::empty({plan.P, H}, x.options()), u = torch::empty({plan.P, H}, x.options());
  products<T>(plan, xs.data_ptr<In<T>>(), H, D, w1.data_ptr<T>(), w1.stride(0), g.data_ptr<T>(), w3.data_ptr<T>(),
              w3.stride(0), u.data_ptr<T>());

  for (int64_t p = 0; p < plan.P; ++p) {                          // row by row: each row's bits its own
    auto row = g.select(0, p);
    at::silu_(row);
  }
  g.mul_(u);

  torch::Tensor hs = torch::empty({plan.P, H}, in_opt);
  rows_as<T>(g.data_ptr<T>(), nullptr, plan.P, H, hs.data_ptr<In<T>>());
  auto y = torch::empty({plan.P, D}, x.options());
  products<T>(plan, hs.data_ptr<In<T>>(), D, H, w2.data_ptr<T>(), w2.stride(0), y.data_ptr<T>());

  auto out = torch::empty({plan.T, D}, x.options());
  moe_plan::combine<T>(plan, ids.data_ptr<int64_t>(), y.data_ptr<T>(), weights.data_ptr<T>(), out.data_ptr<T>(), D);
  return out;
}

}  // namespace moe_kernel

torch::Tensor moe_experts(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor w1,
                          torch::Tensor w3, torch::Tensor w2) {
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && weights.sizes() == ids.sizes() && ids.size(0) == x.size(0),
              "moe_experts: expected x (T, D), ids and weights (T, k), got ", x.sizes(), ", ", ids.sizes(), ", ",
              weights.sizes());
  TORCH_CHECK(w1.dim() == 3 && w1.sizes() == w3.sizes() && w2.dim() == 3 && w2.size(0) == w1.size(0) &&
                  w1.size(2) == x.size(1) && w2.size(1) == x.size(1) && w2.size(2) == w1.size(1),
              "moe_experts: expected w1, w3 (E, H, D) and w2 (E, D, H) for x (T, D), got ", w1.sizes(), ", ",
              w3.sizes(), ", ", w2.sizes(), " for ", x.sizes());
  for (const auto& w : {w1, w3, w2})
    TORCH_CHECK(w.stride(2) == 1 && w.stride(1) == w.size(2),
                "moe_experts: each expert's rows must be contiguous, got strides ", w.strides());
  TORCH_CHECK(x.scalar_type() == w1.scalar_type() && w1.scalar_type() == w3.scalar_type() &&
                  w3.scalar_type() == w2.scalar_type() && weights.scalar_type() == x.scalar_type(),
              "moe_experts: x, weights and the experts must share one dtype");
  TORCH_CHECK(ids.scalar_type() == at::kLong, "moe_experts: ids must be int64");
  TORCH_CHECK(x.device().is_cpu() && w1.device().is_cpu() && w3.device().is_cpu() && w2.device().is_cpu(),
              "moe_experts: CPU tensors only");
  auto xc = x.contiguous(), idc = ids.contiguous(), wc = weights.contiguous();
  const int64_t D = x.size(1), H = w1.size(1);
#ifdef SIROCCO_AVX2
  const int64_t width = 8;                    // whole vectors of the fp32 input rows
#else
  const int64_t width = x.scalar_type() == at::kBFloat16 ? 32 : 16;
#endif
  TORCH_CHECK(D % width == 0 && H % width == 0, "moe_experts: this build needs D and H multiples of ", width,
              ", got ", D, " and ", H);
  if (x.scalar_type() == at::kBFloat16)
    return moe_kernel::experts<moe_kernel::elem_bf16>(xc, idc, wc, w1, w3, w2);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "moe_experts: bf16 or fp32 only, got ", x.scalar_type());
  return moe_kernel::experts<float>(xc, idc, wc, w1, w3, w2);
}
