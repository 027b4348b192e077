// The vector operations decode_attention.cpp and norm_rope.cpp are written in, for each build (kernels.py builds
// the sources once per instruction set, this file first):
//
//   default        AVX-512F/BW: vec = __m512, 16 fp32 lanes (the instructions those kernels were first written in)
//   SIROCCO_AVX2   AVX2 + FMA: vec = __m256, 8 fp32 lanes
//
// A kernel written over kLanes and these functions has one source for both builds; only the sum of a vector's
// lanes (and so the order of a dot product's additions) differs between them.
#include <torch/extension.h>
#include <immintrin.h>

#include <cstdint>

namespace simd {

using bf16 = at::BFloat16;

#ifdef SIROCCO_AVX2

using vec = __m256;
constexpr int kLanes = 8;
inline vec load(const float* p) { return _mm256_loadu_ps(p); }
inline vec load(const bf16* p) {                 // 8 bf16 -> 8 fp32 (a bf16 is the top half of an fp32)
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline void store(float* p, vec x) { _mm256_storeu_ps(p, x); }
inline void store_aligned(float* p, vec x) { _mm256_store_ps(p, x); }
inline vec zero() { return _mm256_setzero_ps(); }
inline vec set1(float v) { return _mm256_set1_ps(v); }
inline vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float sum(vec v) {                        // (j + j+4), then pairs, then the last two
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
// fp32 -> bf16, round to nearest even, NaN -> 0x7fc0: the rounding of at::BFloat16(float), 8 lanes at once.
inline void store_rounded(bf16* p, vec x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128((__m128i*)p, packed);
}
// RoPE's lane shuffles: c[0..kLanes/2) to lanes (2i, 2i+1); (x[2i+1], x[2i]); (-s_i, s_i).
inline vec pairs(const float* c) {
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(c)), _mm256_set_epi32(3, 3, 2, 2, 1, 1, 0, 0));
}
inline vec swap_pairs(vec v) { return _mm256_permute_ps(v, 0xB1); }
inline vec negate_even(vec v) {
  const __m256i m = _mm256_set_epi32(0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN);
  return _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(v), m));
}

#else  // AVX-512

using vec = __m512;
constexpr int kLanes = 16;
inline vec load(const float* p) { return _mm512_loadu_ps(p); }
inline vec load(const bf16* p) {                 // 16 bf16 -> 16 fp32 (a bf16 is the top half of an fp32)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline void store(float* p, vec x) { _mm512_storeu_ps(p, x); }
inline void store_aligned(float* p, vec x) { _mm512_store_ps(p, x); }
inline vec zero() { return _mm512_setzero_ps(); }
inline vec set1(float v) { return _mm512_set1_ps(v); }
inline vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float sum(vec v) { return _mm512_reduce_add_ps(v); }
// fp32 -> bf16, round to nearest even, NaN -> 0x7fc0: the rounding of at::BFloat16(float), 16 lanes at once.
inline void store_rounded(bf16* p, vec x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(r));
}
inline vec pairs(const float* c) {
  const __m512i idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  return _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(_mm256_loadu_ps(c)));
}
inline vec swap_pairs(vec v) { return _mm512_permute_ps(v, 0xB1); }
inline vec negate_even(vec v) {
  const __m512i m = _mm512_set_epi32(0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0,
                                     INT32_MIN, 0, INT32_MIN, 0, INT32_MIN);
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), m));
}

#endif

inline void store_rounded(float* p, vec x) { store(p, x); }

}  // namespace simd
