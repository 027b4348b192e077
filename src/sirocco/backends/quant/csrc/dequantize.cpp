// Pre-fill with quantized weights: a band of weight rows dequantized into a buffer that the matmul library then
// multiplies (linear.py). One pass over the blocks, rows shared out over the threads:
//
//   dequantize_into(packed (N, K / 32 * block_bytes) uint8, fmt, out (N, K) fp32 or bf16)
//
//   out[n, 32 b + i] = q_i * d     d = the block's fp16 scale as fp32; q_i the int8 (q8_0) or nibble - 8 (q4_0)
//
// one fp32 product per value, exact (an fp16 times a small integer fits fp32's mantissa), so the bits are those of
// formats.dequantize; a bf16 output is that value rounded to nearest even (what .to(torch.bfloat16) does to a
// finite fp32), written in the same pass so that no fp32 copy of the band is made and read again. Worked example, q4_0: a block's 16 quant bytes hold values 0..15 in their low nibbles and
// 16..31 in their high ones, so byte 3 = 0xA2 gives q_3 = 0x2 - 8 = -6 and q_19 = 0xA - 8 = 2.
//
// Read after qlinear.cpp (QK, kQ8, kQ4, block_bytes), in one translation unit (kernels.py).
namespace dequant_kernel {

// 8 fp32 values to out: as they are, or rounded to bf16 (nearest, ties to even: add 0x7FFF plus the lowest kept
// bit, keep the high 16 bits; the values are finite, so no NaN case). Worked example: 1 + 2^-8 + 2^-9 is
// 0x3F80C000; its kept bit 7 is 0, so 0x3F80C000 + 0x7FFF = 0x3F813FFF, high half 0x3F81 = 1 + 2^-7 (rounded up,
// past the tie); 1 + 2^-8 = 0x3F808000 is a tie and stays 0x3F80 = 1.
inline void store8(float* out, __m256 v) { _mm256_storeu_ps(out, v); }
inline void store8(at::BFloat16* out, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i hi = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
  _mm_storeu_si128((__m128i*)out, packed);
}

template <typename T>
inline void block_q8(const uint8_t* blk, T* out) {
  const __m256 d = _mm256_set1_ps(_cvtsh_ss(*(const uint16_t*)blk));
  for (int i = 0; i < QK; i += 8) {
    const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(blk + 2 + i)));
    store8(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
  }
}

template <typename T>
inline void block_q4(const uint8_t* blk, T* out) {
  const __m256 d = _mm256_set1_ps(_cvtsh_ss(*(const uint16_t*)blk));
  const __m256i eight = _mm256_set1_epi32(8), low = _mm256_set1_epi32(0xF);
  for (int i = 0; i < QK / 2; i += 8) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(blk + 2 + i)));
    const __m256i lo = _mm256_sub_epi32(_mm256_and_si256(bytes, low), eight);
    const __m256i hi = _mm256_sub_epi32(_mm256_srli_epi32(bytes, 4), eight);
    store8(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(lo), d));
    store8(out + QK / 2 + i, _mm256_mul_ps(_mm256_cvtepi32_ps(hi), d));
  }
}

// The same blocks to bf16 with AVX512-BF16, 16 values per instruction: vcvtneps2bf16 rounds to nearest even as
// store8 does (it reads denormal inputs as zero, and none arise: an fp16 scale times a quant of at most 127 is a
// normal fp32 or zero), so both paths give the same bits; the AVX2 pass was a large share of a quantized pre-fill
// on CPUs that have AVX512-BF16 (docs/performance.md).
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
BF16_TARGET inline void store16(at::BFloat16* out, __m512 v) {
  _mm256_storeu_si256((__m256i*)out, (__m256i)_mm512_cvtneps_pbh(v));
}

BF16_TARGET inline void block_q8_bf16(const uint8_t* blk, at::BFloat16* out) {
  const __m512 d = _mm512_set1_ps(_cvtsh_ss(*(const uint16_t*)blk));
  for (int i = 0; i < QK; i += 16) {
    const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 2 + i)));
    store16(out + i, _mm512_mul_ps(_mm512_cvtepi32_ps(q), d));
  }
}

BF16_TARGET inline void block_q4_bf16(const uint8_t* blk, at::BFloat16* out) {
  const __m512 d = _mm512_set1_ps(_cvtsh_ss(*(const uint16_t*)blk));
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(blk + 2)));
  const __m512i eight = _mm512_set1_epi32(8);
  const __m512i lo = _mm512_sub_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0xF)), eight);
  const __m512i hi = _mm512_sub_epi32(_mm512_srli_epi32(bytes, 4), eight);
  store16(out, _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d));
  store16(out + QK / 2, _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d));
}

BF16_TARGET void row_bf16(const uint8_t* src, int64_t fmt, int64_t nb, int64_t bb, at::BFloat16* o) {
  for (int64_t b = 0; b < nb; ++b, src += bb, o += QK) {
    if (fmt == kQ8) block_q8_bf16(src, o); else block_q4_bf16(src, o);
  }
}

bool cpu_has_avx512bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

template <typename T>
void rows(const uint8_t* src, int64_t fmt, int64_t nb, int64_t bb, T* dst, int64_t N, bool avx512) {
  const int64_t K = nb * QK;
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (avx512) {
          row_bf16(src + n * nb * bb, fmt, nb, bb, dst + n * K);
          continue;
        }
      }
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = src + n * nb * bb + b * bb;
        T* o = dst + n * K + b * QK;
        if (fmt == kQ8) block_q8(blk, o); else block_q4(blk, o);
      }
    }
  });
}

}  // namespace dequant_kernel

// isa: 0 the best this CPU runs (AVX512-BF16 for bf16 outputs where it has it), 1 AVX2, 2 AVX512-BF16 (an error
// where the CPU lacks it).
void dequantize_into(torch::Tensor packed, int64_t fmt, torch::Tensor out, int64_t isa) {
  TORCH_CHECK(fmt == kQ8 || fmt == kQ4, "dequantize_into: fmt 0 (q8_0) or 1 (q4_0), got ", fmt);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous() && packed.device().is_cpu(),
              "dequantize_into: contiguous uint8 CPU blocks (N, bytes), got ", packed.sizes());
  TORCH_CHECK((out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16) && out.dim() == 2 &&
              out.is_contiguous() && out.size(0) == packed.size(0),
              "dequantize_into: a contiguous fp32 or bf16 output of ", packed.size(0), " rows, got ", out.sizes(), " ",
              out.scalar_type());
  const int64_t bb = fmt == kQ8 ? block_bytes<kQ8>() : block_bytes<kQ4>();
  const int64_t N = packed.size(0), K = out.size(1), nb = K / QK;
  TORCH_CHECK(K % QK == 0 && packed.size(1) == nb * bb, "dequantize_into: blocks of ", packed.size(1),
              " bytes per row do not hold ", K, " values");
  const bool has = dequant_kernel::cpu_has_avx512bf16();
  TORCH_CHECK(isa != 2 || has, "dequantize_into: this CPU has no AVX512-BF16");
  const bool avx512 = isa == 2 || (isa == 0 && has);
  const uint8_t* src = packed.data_ptr<uint8_t>();
  if (out.scalar_type() == at::kFloat)
    dequant_kernel::rows(src, fmt, nb, bb, out.data_ptr<float>(), N, false);
  else
    dequant_kernel::rows(src, fmt, nb, bb, out.data_ptr<at::BFloat16>(), N, avx512);
}
