// The products of a decode step on CPU: a few rows times a weight matrix stored as nn.Linear stores it.
//
//   y (M, N) = x (M, K) @ w (N, K)^T        1 <= M <= 8; bf16 or fp32; fp32 accumulation; y in x's dtype
//
// A decode step reads every weight once and multiplies it by one row per running sequence, so it is bound by
// memory (M = 1) or by memory and arithmetic together (M = 8). oneDNN's small-M path streams the weights at about
// half the rate the machine can read them; this kernel keeps the weights in their layout (no second copy) and
// works through them row by row in order:
//
//   - a tile is R consecutive weight rows; per step of k it loads R weight vectors and each input row once, and
//     multiplies every pair. R by measurement (bf16, 7168 x 2048, 2 threads): R = 1 for M = 1 (one stream,
//     35-42 GB/s; R = 2 or 4 gave 26-34); R = 4 otherwise (M = 8: 31 GB/s, against 21 with R = 3 or 5);
//   - bf16 uses _mm512_dpbf16_ps (32 bf16 pairs multiplied and added into 16 fp32 lanes in one instruction);
//     fp32 uses _mm512_fmadd_ps (16 lanes);
//   - for M > 1 the weights are prefetched into L2 16 KiB ahead: the core is busy with arithmetic and would
//     otherwise wait on memory (measured: 17 -> 22 GB/s at M = 8 with R = 3);
//   - tiles are shared out over the threads by at::parallel_for, so each thread streams a contiguous range.
//
// Every output (m, n) has one accumulator that runs over k in order, then a horizontal sum: its bits do not
// depend on M, R or the thread count, so a sequence decodes the same tokens alone or packed with others.
// Built at run time by torch.utils.cpp_extension (kernels.py), which falls back to other paths when the CPU lacks
// AVX-512 (or AVX512-BF16 for bf16) or no compiler is available.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

using bf16 = at::BFloat16;

// One vector step of k for each element type: how many elements, and acc += x . w over them.
struct BF16Step {
  using T = bf16;
  static constexpr int width = 32;
  static inline __m512 fma(__m512 acc, const T* x, const T* w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x), (__m512bh)_mm512_loadu_si512(w));
  }
};

struct F32Step {
  using T = float;
  static constexpr int width = 16;
  static inline __m512 fma(__m512 acc, const T* x, const T* w) {
    return _mm512_fmadd_ps(_mm512_loadu_ps(x), _mm512_loadu_ps(w), acc);
  }
};

constexpr int64_t kPrefetchBytes = 16384;

// Outputs y[m, n .. n+R) for all M rows of x.
template <typename S, int M, int R>
inline void tile(const typename S::T* x, const typename S::T* w, typename S::T* y, int64_t N, int64_t K,
                 int64_t n) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const typename S::T* rows = w + n * K;
  for (int64_t k = 0; k < K; k += S::width) {
    if (M > 1)
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(rows + r * K + k) + kPrefetchBytes, _MM_HINT_T1);
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = S::fma(acc[m][r], x + m * K + k, rows + r * K + k);
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) y[m * N + n + r] = typename S::T(_mm512_reduce_add_ps(acc[m][r]));
}

template <typename S, int M>
void rows_times_matrix(const typename S::T* x, const typename S::T* w, typename S::T* y, int64_t N, int64_t K) {
  constexpr int R = M == 1 ? 1 : 4;
  const int64_t tiles = N / R;
  // Grain: about 64 KiB of weights per task, so small matrices do not pay for a second thread's start.
  const int64_t grain = std::max<int64_t>(1, 65536 / (R * K * (int64_t)sizeof(typename S::T)));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) tile<S, M, R>(x, w, y, N, K, t * R);
    if (t1 == tiles)                                    // the rows left over when R does not divide N
      for (int64_t n = tiles * R; n < N; ++n) tile<S, M, 1>(x, w, y, N, K, n);
  });
}

template <typename S>
void dispatch(const typename S::T* x, const typename S::T* w, typename S::T* y, int64_t M, int64_t N, int64_t K) {
  switch (M) {
    case 1: return rows_times_matrix<S, 1>(x, w, y, N, K);
    case 2: return rows_times_matrix<S, 2>(x, w, y, N, K);
    case 3: return rows_times_matrix<S, 3>(x, w, y, N, K);
    case 4: return rows_times_matrix<S, 4>(x, w, y, N, K);
    case 5: return rows_times_matrix<S, 5>(x, w, y, N, K);
    case 6: return rows_times_matrix<S, 6>(x, w, y, N, K);
    case 7: return rows_times_matrix<S, 7>(x, w, y, N, K);
    case 8: return rows_times_matrix<S, 8>(x, w, y, N, K);
  }
}

}  // namespace

torch::Tensor small_m_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "small_m_linear: expected x (M, K) and w (N, K), got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "small_m_linear: 1 to 8 rows, got ", x.size(0));
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "small_m_linear: x is ", x.scalar_type(), ", w is ",
              w.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && x.is_contiguous() && w.is_contiguous(),
              "small_m_linear: contiguous CPU tensors only");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(K % BF16Step::width == 0, "small_m_linear: bf16 needs K a multiple of 32, got ", K);
    dispatch<BF16Step>(x.data_ptr<bf16>(), w.data_ptr<bf16>(), y.data_ptr<bf16>(), M, N, K);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "small_m_linear: bf16 or fp32 only, got ", x.scalar_type());
    TORCH_CHECK(K % F32Step::width == 0, "small_m_linear: fp32 needs K a multiple of 16, got ", K);
    dispatch<F32Step>(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), M, N, K);
  }
  return y;
}
