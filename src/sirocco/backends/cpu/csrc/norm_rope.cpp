// RMSNorm and RoPE on CPU, each one pass over its input instead of PyTorch's eight to twelve small operations.
//
//   rms_norm(x (T, D), w (D), eps) -> (T, D):   round(x * r) * w with r = 1 / sqrt(mean(x^2) + eps), in fp32
//   rope(x (T, H, D), cos, sin (T, D/2) fp32) -> (T, H, D):
//       (x[2i], x[2i+1]) -> (x[2i] c_i - x[2i+1] s_i, x[2i] s_i + x[2i+1] c_i), in fp32
//
// In a decode step every operation of PyTorch costs a few microseconds whatever its size, and a 16-layer model
// spends about 40 of them per layer on these two, a share of the step worth saving (docs/performance.md, "CPU
// backend"). The results round as model.py's
// ``RMSNorm`` and ``apply_rope`` do (fp32 products, round to nearest even into bf16), without fused multiply-add,
// so ``rope`` gives the same bits as ``apply_rope`` and ``rms_norm`` differs only in the order of the sum of
// squares. Each row depends on its own inputs only.
// Written over simd.h's vectors (kLanes fp32 lanes: 16 in the AVX-512 build, 8 in the AVX2 one).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace norm_rope {   // named: the sources are compiled as one file, beside decode_attention's helpers

using simd::kLanes;
using simd::vec;

inline vec round_trip(vec x, at::BFloat16*) {      // what storing to bf16 and loading back gives
  alignas(64) at::BFloat16 tmp[kLanes];
  simd::store_rounded(tmp, x);
  return simd::load(tmp);
}
inline vec round_trip(vec x, float*) { return x; }

template <typename T>
void rms_norm_rows(const T* x, const T* w, T* out, int64_t rows, int64_t D, float eps) {
  for (int64_t t = 0; t < rows; ++t) {
    const T* xr = x + t * D;
    vec acc = simd::zero();
    for (int64_t d = 0; d < D; d += kLanes) {
      const vec v = simd::load(xr + d);
      acc = simd::add(acc, simd::mul(v, v));
    }
    const vec r = simd::set1(1.0f / std::sqrt(simd::sum(acc) / static_cast<float>(D) + eps));
    for (int64_t d = 0; d < D; d += kLanes) {
      const vec normed = round_trip(simd::mul(simd::load(xr + d), r), out);
      simd::store_rounded(out + t * D + d, simd::mul(normed, simd::load(w + d)));
    }
  }
}

template <typename T>
void rope_rows(const T* x, const float* cos, const float* sin, T* out, int64_t t0, int64_t t1, int64_t H,
               int64_t D) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t d = 0; d < D; d += kLanes) {
      const vec c = simd::pairs(cos + t * D / 2 + d / 2);                              // c_i to lanes 2i, 2i+1
      const vec s = simd::negate_even(simd::pairs(sin + t * D / 2 + d / 2));           // (-s_i, s_i)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t at = (t * H + h) * D + d;
        const vec v = simd::load(x + at);
        const vec swapped = simd::swap_pairs(v);                                       // (x[2i+1], x[2i])
        simd::store_rounded(out + at, simd::add(simd::mul(v, c), simd::mul(swapped, s)));
      }
    }
  }
}

void check_dtype(const torch::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              what, ": CPU bf16 or fp32 only, got ", x.scalar_type(), " on ", x.device());
}

}  // namespace norm_rope

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  norm_rope::check_dtype(x, "rms_norm");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1),
              "rms_norm: expected x (T, D) and weight (D), got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "rms_norm: x is ", x.scalar_type(), ", weight is ",
              w.scalar_type());
  TORCH_CHECK(x.size(1) % simd::kLanes == 0, "rms_norm: D must be a multiple of ", simd::kLanes, ", got ",
              x.size(1));
  x = x.contiguous();
  w = w.contiguous();
  auto out = torch::empty_like(x);
  const int64_t T = x.size(0), D = x.size(1);
  const int64_t grain = std::max<int64_t>(1, 32768 / D);          // rows per task: a few decode rows stay on one
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
      if constexpr (std::is_same_v<scalar_t, double>) {
        TORCH_CHECK(false, "rms_norm: fp64 is not served");
      } else {
        norm_rope::rms_norm_rows(xp + t0 * D, wp, op + t0 * D, t1 - t0, D, static_cast<float>(eps));
      }
    });
  });
  return out;
}

torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  norm_rope::check_dtype(x, "rope");
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) &&
              cos.size(1) * 2 == x.size(2),
              "rope: expected x (T, H, D) and cos, sin (T, D/2), got ", x.sizes(), ", ", cos.sizes(), " and ",
              sin.sizes());
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "rope: cos and sin must be fp32");
  TORCH_CHECK(x.size(2) % simd::kLanes == 0, "rope: head_dim must be a multiple of ", simd::kLanes, ", got ",
              x.size(2));
  x = x.contiguous();
  cos = cos.contiguous();
  sin = sin.contiguous();
  auto out = torch::empty_like(x);
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2);
  const int64_t grain = std::max<int64_t>(1, 32768 / (H * D));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rope", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
      if constexpr (std::is_same_v<scalar_t, double>) {
        TORCH_CHECK(false, "rope: fp64 is not served");
      } else {
        norm_rope::rope_rows(xp, cos.data_ptr<float>(), sin.data_ptr<float>(), op, t0, t1, H, D);
      }
    });
  });
  return out;
}
