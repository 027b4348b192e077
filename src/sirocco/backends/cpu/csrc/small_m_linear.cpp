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
//     multiplies every pair. R by measurement (docs/performance.md, "small_m_linear's tile"): R = 1 for M = 1
//     (one stream reads fastest), R = 4 otherwise (3 or 5 were slower at M = 8);
//   - bf16 uses _mm512_dpbf16_ps (32 bf16 pairs multiplied and added into 16 fp32 lanes in one instruction);
//     fp32 uses _mm512_fmadd_ps (16 lanes);
//   - for M > 1 the weights are prefetched into L2 16 KiB ahead: the core is busy with arithmetic and would
//     otherwise wait on memory (measured at M = 8: docs/performance.md);
//   - tiles are shared out over the threads by at::parallel_for, so each thread streams a contiguous range.
//
// Every output (m, n) has one accumulator that runs over k in order, then a horizontal sum: its bits do not
// depend on M, R or the thread count, so a sequence decodes the same tokens alone or packed with others.
//
// The same source built with SIROCCO_AVX2 (and -mavx2 -mfma -mf16c) gives the path for CPUs without AVX-512,
// or without AVX512-BF16 for bf16 weights:
//
//   - one 8-lane fp32 accumulator per output; lane j sums the products at k = j mod 8 in order of k, then a
//     fixed tree adds the lanes (hsum8). bf16 weights become fp32 by a 16-bit shift of the zero-extended halves;
//     the input rows are converted to fp32 once per call (zero-padded to a multiple of 8, as the last weight
//     vector of each row is, so any K is served);
//   - AVX2 has 16 vector registers, so the rows of x are taken in groups of at most 4 against R = 3 weight rows
//     (12 accumulators, 3 weight vectors), R = 4 for 1 or 2 rows; with more than 4 rows each group runs over a
//     chunk of 512 values of k in turn, the accumulators kept in L1 between chunks, so the chunk of weights is
//     read from memory once (at 8 rows faster than one weight row against all 8 rows, whose 8 accumulators
//     leave the input rows to be re-read from L2 for every weight vector; docs/performance.md);
//   - no software prefetch: it measured slower at 1 and 8 rows.
//
// The bf16 products here are exact in fp32 and rounded once per fused multiply-add, where _mm512_dpbf16_ps
// rounds differently: the two paths agree to rounding, not bit for bit; each alone keeps the invariants above.
// Built at run time by torch.utils.cpp_extension (kernels.py), which falls back to other paths when no compiler
// is available.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

using bf16 = at::BFloat16;

#ifndef SIROCCO_AVX2

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

#else  // SIROCCO_AVX2

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {        // 8 bf16 -> 8 fp32 (a bf16 is the top half of an fp32)
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// The last n < 8 values of a row, zero-padded to a vector.
template <typename T>
inline __m256 load_tail(const T* p, int64_t n) {
  alignas(32) T tmp[8];
  for (int64_t i = 0; i < 8; ++i) tmp[i] = i < n ? p[i] : T(0.0f);
  return load8(tmp);
}

// The sum of the 8 lanes, always in this order: (j + j+4), then pairs, then the last two.
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

constexpr int64_t kChunk = 512;         // values of k per pass of a group of rows (a multiple of 8)

// acc (MG x R, in memory) += rows [0, MG) of x (fp32, row stride KP) times weight rows [0, R) over k in [k0, k1),
// k1 - k0 a multiple of 8; with TAIL, one more vector at k1 holding the row's last K - k1 values.
template <typename T, int MG, int R, bool TAIL>
inline void run(__m256* acc_mem, const float* x, int64_t KP, const T* rows, int64_t K, int64_t k0, int64_t k1) {
  __m256 acc[MG][R];
  for (int m = 0; m < MG; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = acc_mem[m * R + r];
  for (int64_t k = k0; k < k1; k += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load8(rows + r * K + k);
    for (int m = 0; m < MG; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * KP + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  if (TAIL) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_tail(rows + r * K + k1, K - k1);
    for (int m = 0; m < MG; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * KP + k1);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MG; ++m)
    for (int r = 0; r < R; ++r) acc_mem[m * R + r] = acc[m][r];
}

// Outputs y[m, n .. n+R) for all M rows: rows 0..3 of x, then rows 4..M-1, chunk by chunk of k.
template <typename T, int M, int R>
inline void tile(const float* x, int64_t KP, const T* w, T* y, int64_t N, int64_t K, int64_t n) {
  constexpr int MA = M < 4 ? M : 4, MB = M - MA;
  alignas(32) __m256 acc[M * R];
  for (int i = 0; i < M * R; ++i) acc[i] = _mm256_setzero_ps();
  const T* rows = w + n * K;
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t k0 = 0; k0 < K8; k0 += kChunk) {
    const int64_t k1 = std::min(K8, k0 + kChunk);
    run<T, MA, R, false>(acc, x, KP, rows, K, k0, k1);
    if constexpr (MB > 0) run<T, MB, R, false>(acc + MA * R, x + MA * KP, KP, rows, K, k0, k1);
  }
  if (K8 < K) {
    run<T, MA, R, true>(acc, x, KP, rows, K, K8, K8);
    if constexpr (MB > 0) run<T, MB, R, true>(acc + MA * R, x + MA * KP, KP, rows, K, K8, K8);
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) y[m * N + n + r] = T(hsum8(acc[m * R + r]));
}

template <typename T, int M>
void rows_times_matrix(const float* x, int64_t KP, const T* w, T* y, int64_t N, int64_t K) {
  constexpr int R = M <= 2 ? 4 : 3;
  const int64_t tiles = N / R;
  // Grain: about 64 KiB of weights per task, so small matrices do not pay for a second thread's start.
  const int64_t grain = std::max<int64_t>(1, 65536 / (R * K * (int64_t)sizeof(T)));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) tile<T, M, R>(x, KP, w, y, N, K, t * R);
    if (t1 == tiles)                                    // the rows left over when R does not divide N
      for (int64_t n = tiles * R; n < N; ++n) tile<T, M, 1>(x, KP, w, y, N, K, n);
  });
}

template <typename T>
void dispatch(const float* x, int64_t KP, const T* w, T* y, int64_t M, int64_t N, int64_t K) {
  switch (M) {
    case 1: return rows_times_matrix<T, 1>(x, KP, w, y, N, K);
    case 2: return rows_times_matrix<T, 2>(x, KP, w, y, N, K);
    case 3: return rows_times_matrix<T, 3>(x, KP, w, y, N, K);
    case 4: return rows_times_matrix<T, 4>(x, KP, w, y, N, K);
    case 5: return rows_times_matrix<T, 5>(x, KP, w, y, N, K);
    case 6: return rows_times_matrix<T, 6>(x, KP, w, y, N, K);
    case 7: return rows_times_matrix<T, 7>(x, KP, w, y, N, K);
    case 8: return rows_times_matrix<T, 8>(x, KP, w, y, N, K);
  }
}

#endif  // SIROCCO_AVX2

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
#ifdef SIROCCO_AVX2
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "small_m_linear: bf16 or fp32 only, got ", x.scalar_type());
  TORCH_CHECK(K >= 1, "small_m_linear: empty rows");
  const int64_t KP = (K + 7) & ~int64_t(7);         // x in fp32, zero-padded to whole vectors
  auto xf = x.to(torch::kFloat);
  if (KP != K) xf = torch::constant_pad_nd(xf, {0, KP - K});
  xf = xf.contiguous();
  if (x.scalar_type() == at::kBFloat16)
    dispatch<bf16>(xf.data_ptr<float>(), KP, w.data_ptr<bf16>(), y.data_ptr<bf16>(), M, N, K);
  else
    dispatch<float>(xf.data_ptr<float>(), KP, w.data_ptr<float>(), y.data_ptr<float>(), M, N, K);
#else
  if (x.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(K % BF16Step::width == 0, "small_m_linear: bf16 needs K a multiple of 32, got ", K);
    dispatch<BF16Step>(x.data_ptr<bf16>(), w.data_ptr<bf16>(), y.data_ptr<bf16>(), M, N, K);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "small_m_linear: bf16 or fp32 only, got ", x.scalar_type());
    TORCH_CHECK(K % F32Step::width == 0, "small_m_linear: fp32 needs K a multiple of 16, got ", K);
    dispatch<F32Step>(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), M, N, K);
  }
#endif
  return y;
}

// Which path this build holds: "avx2" or "avx512".
std::string small_m_linear_isa() {
#ifdef SIROCCO_AVX2
  return "avx2";
#else
  return "avx512";
#endif
}
