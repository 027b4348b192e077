// Pre-fill with quantized weights: a band of weight rows dequantized into an fp32 buffer that the matmul library
// then multiplies (linear.py). One pass over the blocks, rows shared out over the threads:
//
//   dequantize_into(packed (N, K / 32 * block_bytes) uint8, fmt, out (N, K) fp32)
//
//   out[n, 32 b + i] = q_i * d     d = the block's fp16 scale as fp32; q_i the int8 (q8_0) or nibble - 8 (q4_0)
//
// one fp32 product per value, exact (an fp16 times a small integer fits fp32's mantissa), so the bits are those of
// formats.dequantize. Worked example, q4_0: a block's 16 quant bytes hold values 0..15 in their low nibbles and
// 16..31 in their high ones, so byte 3 = 0xA2 gives q_3 = 0x2 - 8 = -6 and q_19 = 0xA - 8 = 2.
//
// Read after qlinear.cpp (QK, kQ8, kQ4, block_bytes), in one translation unit (kernels.py).
namespace dequant_kernel {

inline void block_q8(const uint8_t* blk, float* out) {
  const __m256 d = _mm256_set1_ps(_cvtsh_ss(*(const uint16_t*)blk));
  for (int i = 0; i < QK; i += 8) {
    const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(blk + 2 + i)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
  }
}

inline void block_q4(const uint8_t* blk, float* out) {
  const __m256 d = _mm256_set1_ps(_cvtsh_ss(*(const uint16_t*)blk));
  const __m256i eight = _mm256_set1_epi32(8), low = _mm256_set1_epi32(0xF);
  for (int i = 0; i < QK / 2; i += 8) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(blk + 2 + i)));
    const __m256i lo = _mm256_sub_epi32(_mm256_and_si256(bytes, low), eight);
    const __m256i hi = _mm256_sub_epi32(_mm256_srli_epi32(bytes, 4), eight);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(lo), d));
    _mm256_storeu_ps(out + QK / 2 + i, _mm256_mul_ps(_mm256_cvtepi32_ps(hi), d));
  }
}

}  // namespace dequant_kernel

void dequantize_into(torch::Tensor packed, int64_t fmt, torch::Tensor out) {
  TORCH_CHECK(fmt == kQ8 || fmt == kQ4, "dequantize_into: fmt 0 (q8_0) or 1 (q4_0), got ", fmt);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous() && packed.device().is_cpu(),
              "dequantize_into: contiguous uint8 CPU blocks (N, bytes), got ", packed.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.is_contiguous() && out.size(0) == packed.size(0),
              "dequantize_into: a contiguous fp32 output of ", packed.size(0), " rows, got ", out.sizes());
  const int64_t bb = fmt == kQ8 ? block_bytes<kQ8>() : block_bytes<kQ4>();
  const int64_t N = packed.size(0), K = out.size(1), nb = K / QK;
  TORCH_CHECK(K % QK == 0 && packed.size(1) == nb * bb, "dequantize_into: blocks of ", packed.size(1),
              " bytes per row do not hold ", K, " values");
  const uint8_t* src = packed.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = src + n * nb * bb + b * bb;
        float* o = dst + n * K + b * QK;
        if (fmt == kQ8) dequant_kernel::block_q8(blk, o); else dequant_kernel::block_q4(blk, o);
      }
  });
}
