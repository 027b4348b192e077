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
// The other types (block_other): each block is unpacked to its signed quants (layouts.py's integer form) and, per
// sub-block of 16 or 32 values, the factor dl = d * scale and the term ml = dmin * min (q2_K, q4_K, q5_K:
// subtracted) or m (q4_1, q5_1: added), each an fp32 product as the gguf package computes them; then every value is
// dl * q, minus or plus that term, one rounding each: the bits of layouts.dequantize. Worked example, q6_K: value
// 70 is the high nibble of ql byte 6 with bits 4-5 of qh byte 6 above it, minus 32, times d * scale 4.
//
// Interleaved blocks (interleave.py) are put back in the file's layout 16 rows at a time in a scratch buffer
// (deinterleave_group), then dequantized as above.
//
// Read after qlinear.cpp and qlinear_k.cpp (the format constants, the scale unpacking of the K types), in one
// translation unit (kernels.py).
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

// -- the other types
struct Unpacked {
  alignas(32) int8_t q[QKK];
  float dl[16], ml[16];
};

template <int FMT> constexpr int sub_values() { return FMT == kQ2K || FMT == kQ3K || FMT == kQ6K ? 16 : 32; }
template <int FMT> constexpr int term() {                  // -1: minus ml, +1: plus m, 0: none
  return FMT == kQ2K || FMT == kQ4K || FMT == kQ5K ? -1 : FMT == kQ41 || FMT == kQ51 ? 1 : 0;
}
inline float half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return _cvtsh_ss(h); }

// The quants are built 32 at a time with the byte operations of the decode tiles (masks and shifts of 16-bit
// lanes, vpshufb for the codebook), in natural order, as int8; dl and ml per sub-block in scalar code.
template <int FMT>
inline void unpack(const uint8_t* b, Unpacked& u) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
  auto load32 = [](const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); };
  auto put = [&](int at, __m256i v) { _mm256_store_si256((__m256i*)(u.q + at), v); };
  auto shr = [](__m256i v, int n) { return _mm256_srl_epi16(v, _mm_cvtsi32_si128(n)); };
  auto nibbles = [&](const uint8_t* p) {          // 16 bytes -> their low nibbles, then their high nibbles
    const __m128i v = _mm_loadu_si128((const __m128i*)p), m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
  };
  const __m256i codebook = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)kIQ4Values));
  if constexpr (FMT == kQ41 || FMT == kQ50 || FMT == kQ51 || FMT == kIQ4NL) {
    __m256i q = nibbles(b + qs_at<FMT>());
    if (FMT == kIQ4NL) q = _mm256_shuffle_epi8(codebook, q);
    if (has_qh<FMT>()) {
      uint32_t qh;
      std::memcpy(&qh, b + qh_at<FMT>(), 4);
      q = _mm256_or_si256(q, fifth_bits(qh));
    }
    if (FMT == kQ50) q = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
    put(0, q);
    u.dl[0] = half(b);                           // d * 1
    if (has_m<FMT>()) u.ml[0] = half(b + 2);
  } else if constexpr (FMT == kQ2K) {
    const float d = half(b + 80), dmin = half(b + 82);
    for (int i = 0; i < 16; ++i) {
      u.dl[i] = d * (float)(b[i] & 15);
      u.ml[i] = dmin * (float)(b[i] >> 4);
    }
    for (int h = 0; h < 2; ++h) {
      const __m256i q = load32(b + 16 + 32 * h);
      for (int t = 0; t < 4; ++t) put(128 * h + 32 * t, _mm256_and_si256(shr(q, 2 * t), three));
    }
  } else if constexpr (FMT == kQ3K) {
    const float d = half(b + 108);
    uint64_t lo8, hi8;
    ktile::q3_scales(b + 96, lo8, hi8);
    for (int i = 0; i < 16; ++i) u.dl[i] = d * (float)((int)(((i < 8 ? lo8 : hi8) >> (8 * (i % 8))) & 0xFF) - 32);
    const __m256i hm = load32(b), four = _mm256_set1_epi8(4);
    for (int h = 0; h < 2; ++h) {
      const __m256i q = load32(b + 32 + 32 * h);
      for (int t = 0; t < 4; ++t) {              // q - 4 where the hmask bit is clear
        const __m256i high = _mm256_slli_epi16(_mm256_and_si256(shr(hm, 4 * h + t), one), 2);
        put(128 * h + 32 * t, _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(shr(q, 2 * t), three), high), four));
      }
    }
  } else if constexpr (FMT == kQ4K || FMT == kQ5K) {
    const float d = half(b), dmin = half(b + 2);
    uint64_t sc8, mn8;
    ktile::k_scales(b + 4, sc8, mn8);
    for (int j = 0; j < 8; ++j) {
      u.dl[j] = d * (float)((sc8 >> (8 * j)) & 0xFF);
      u.ml[j] = dmin * (float)((mn8 >> (8 * j)) & 0xFF);
    }
    const uint8_t* qs = b + (FMT == kQ5K ? 48 : 16);
    const __m256i qh = FMT == kQ5K ? load32(b + 16) : _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      const __m256i v = load32(qs + 32 * j);
      __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      if (FMT == kQ5K) {
        lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(shr(qh, 2 * j), one), 4));
        hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(shr(qh, 2 * j + 1), one), 4));
      }
      put(64 * j, lo);
      put(64 * j + 32, hi);
    }
  } else if constexpr (FMT == kQ6K) {
    const float d = half(b + 208);
    for (int i = 0; i < 16; ++i) u.dl[i] = d * (float)(int8_t)b[192 + i];
    const __m256i top = _mm256_set1_epi8(0x30), off = _mm256_set1_epi8(32);
    for (int h = 0; h < 2; ++h) {
      const __m256i A = load32(b + 64 * h), B = load32(b + 64 * h + 32), H = load32(b + 128 + 32 * h);
      const __m256i c[4] = {
          _mm256_or_si256(_mm256_and_si256(A, low4), _mm256_and_si256(_mm256_slli_epi16(H, 4), top)),
          _mm256_or_si256(_mm256_and_si256(B, low4), _mm256_and_si256(_mm256_slli_epi16(H, 2), top)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(A, 4), low4), _mm256_and_si256(H, top)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(B, 4), low4),
                          _mm256_and_si256(_mm256_srli_epi16(H, 2), top))};
      for (int t = 0; t < 4; ++t) put(128 * h + 32 * t, _mm256_sub_epi8(c[t], off));
    }
  } else {
    static_assert(FMT == kIQ4XS, "a type of blocks.h");
    const float d = half(b);
    const uint64_t ls = ktile::xs_scales(b);
    for (int j = 0; j < 8; ++j) u.dl[j] = d * (float)((int)((ls >> (8 * j)) & 0xFF) - 32);
    for (int j = 0; j < 8; ++j) put(32 * j, _mm256_shuffle_epi8(codebook, nibbles(b + 8 + 16 * j)));
  }
}

template <int FMT, typename T>
void row_other(const uint8_t* src, int64_t nb, T* out) {
  constexpr int V = (int)block_values(FMT), S = sub_values<FMT>();
  for (int64_t blk = 0; blk < nb; ++blk, src += block_bytes<FMT>(), out += V) {
    Unpacked u;
    unpack<FMT>(src, u);
    for (int j = 0; j < V / S; ++j) {
      const __m256 dl = _mm256_set1_ps(u.dl[j]), ml = term<FMT>() ? _mm256_set1_ps(u.ml[j]) : _mm256_setzero_ps();
      for (int i = 0; i < S; i += 8) {
        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(u.q + j * S + i))));
        __m256 v = _mm256_mul_ps(dl, q);
        if (term<FMT>() < 0) v = _mm256_sub_ps(v, ml);
        if (term<FMT>() > 0) v = _mm256_add_ps(v, ml);
        store8(out + j * S + i, v);
      }
    }
  }
}

template <typename T>
using RowFn = void (*)(const uint8_t*, int64_t, T*);

template <typename T>
RowFn<T> other_row(int64_t fmt) {
  switch (fmt) {
    case kQ41: return row_other<kQ41, T>;
    case kQ50: return row_other<kQ50, T>;
    case kQ51: return row_other<kQ51, T>;
    case kIQ4NL: return row_other<kIQ4NL, T>;
    case kQ2K: return row_other<kQ2K, T>;
    case kQ3K: return row_other<kQ3K, T>;
    case kQ4K: return row_other<kQ4K, T>;
    case kQ5K: return row_other<kQ5K, T>;
    case kQ6K: return row_other<kQ6K, T>;
    case kIQ4XS: return row_other<kIQ4XS, T>;
  }
  return nullptr;
}

BF16_TARGET void row_bf16(const uint8_t* src, int64_t fmt, int64_t nb, int64_t bb, at::BFloat16* o) {
  for (int64_t b = 0; b < nb; ++b, src += bb, o += QK) {
    if (fmt == kQ8) block_q8_bf16(src, o); else block_q4_bf16(src, o);
  }
}

// The other types' bf16 tiles with AVX512-BF16: the same unpacking, then 16 values per instruction (the values
// are multiples of 2^-24 and so never fp32 subnormals, which vcvtneps2bf16 would read as zero).
template <int FMT>
BF16_TARGET void row_other_bf16(const uint8_t* src, int64_t nb, at::BFloat16* out) {
  constexpr int V = (int)block_values(FMT), S = sub_values<FMT>();
  for (int64_t blk = 0; blk < nb; ++blk, src += block_bytes<FMT>(), out += V) {
    Unpacked u;
    unpack<FMT>(src, u);
    for (int j = 0; j < V / S; ++j) {
      const __m512 dl = _mm512_set1_ps(u.dl[j]), ml = term<FMT>() ? _mm512_set1_ps(u.ml[j]) : _mm512_setzero_ps();
      for (int i = 0; i < S; i += 16) {
        const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i*)(u.q + j * S + i))));
        __m512 v = _mm512_mul_ps(dl, q);
        if (term<FMT>() < 0) v = _mm512_sub_ps(v, ml);
        if (term<FMT>() > 0) v = _mm512_add_ps(v, ml);
        store16(out + j * S + i, v);
      }
    }
  }
}

RowFn<at::BFloat16> other_row_bf16(int64_t fmt) {
  switch (fmt) {
    case kQ41: return row_other_bf16<kQ41>;
    case kQ50: return row_other_bf16<kQ50>;
    case kQ51: return row_other_bf16<kQ51>;
    case kIQ4NL: return row_other_bf16<kIQ4NL>;
    case kQ2K: return row_other_bf16<kQ2K>;
    case kQ3K: return row_other_bf16<kQ3K>;
    case kQ4K: return row_other_bf16<kQ4K>;
    case kQ5K: return row_other_bf16<kQ5K>;
    case kQ6K: return row_other_bf16<kQ6K>;
    case kIQ4XS: return row_other_bf16<kIQ4XS>;
  }
  return nullptr;
}

bool cpu_has_avx512bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

// -- the interleaved layout (interleave.py): a group of 16 rows back to the file's rows, block by block, in the
// order of the parts of interleave.py's PARTS (kind, offset in the file block, bytes): h the 16 rows' fp16 at the
// offset; w words (x: q8_0's, sign bits flipped), vector k lane r = bytes 4k .. 4k + 3 of row r; b, K, 3 the masks
// of q5_0 / q5_1's, q5_K's and q3_K's bits (bit 4r + i of mask j).
struct Part { char kind; int at, n; };
constexpr Part kParts[kFormats][5] = {
    {{'h', 0, 2}, {'x', 2, 32}},                                      // q8_0
    {{'h', 0, 2}, {'w', 2, 16}},                                      // q4_0
    {{'h', 0, 2}, {'h', 2, 2}, {'w', 4, 16}},                         // q4_1
    {{'h', 0, 2}, {'b', 2, 4}, {'w', 6, 16}},                         // q5_0
    {{'h', 0, 2}, {'h', 2, 2}, {'b', 4, 4}, {'w', 8, 16}},            // q5_1
    {{'h', 0, 2}, {'w', 2, 16}},                                      // iq4_nl
    {{'h', 80, 2}, {'h', 82, 2}, {'w', 0, 16}, {'w', 16, 64}},        // q2_K
    {{'h', 108, 2}, {'w', 96, 12}, {'3', 0, 32}, {'w', 32, 64}},      // q3_K
    {{'h', 0, 2}, {'h', 2, 2}, {'w', 4, 12}, {'w', 16, 128}},         // q4_K
    {{'h', 0, 2}, {'h', 2, 2}, {'w', 4, 12}, {'K', 16, 32}, {'w', 48, 128}},   // q5_K
    {{'h', 208, 2}, {'w', 192, 16}, {'w', 0, 128}, {'w', 128, 64}},   // q6_K
    {{'h', 0, 2}, {'h', 2, 2}, {'w', 4, 4}, {'w', 8, 128}},           // iq4_xs
};

// Rows r = 0..15 of dst (row_bytes apart) = the file's bytes of the group at src (nb blocks of 16 * bb bytes).
// Worked example, q4_0: byte 32 + 64k + 4r + i of a group's block is byte 2 + 4k + i of row r's block.
inline void deinterleave_group(int64_t fmt, const uint8_t* src, int64_t nb, int64_t bb, uint8_t* dst,
                               int64_t row_bytes) {
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* g = src + b * 16 * bb;
    uint8_t* out = dst + b * bb;
    for (const Part& part : kParts[fmt]) {
      if (!part.n) break;
      uint8_t* o = out + part.at;
      if (part.kind == 'h') {
        for (int r = 0; r < 16; ++r) std::memcpy(o + r * row_bytes, g + 2 * r, 2);
        g += 32;
      } else if (part.kind == 'w' || part.kind == 'x') {
        for (int k = 0; k < part.n / 4; ++k)
          for (int r = 0; r < 16; ++r) {
            uint32_t v;
            std::memcpy(&v, g + 64 * k + 4 * r, 4);
            if (part.kind == 'x') v ^= 0x80808080u;
            std::memcpy(o + r * row_bytes + 4 * k, &v, 4);
          }
        g += 16 * part.n;
      } else {
        // Bits 4r .. 4r + 3 of mask j (row r's nibble) go, without a branch per bit:
        //   b  (element 4j + i): bits 4(j % 2) + i of byte j / 2, the nibble shifted as it is;
        //   K  (mask 16c + 2t + h: bit 2c + h of byte 4t + i) and
        //   3  (mask 32h + 4u + t: bit 4h + t of byte 4u + i): bit i of the nibble to one bit of each of 4
        //      consecutive bytes, spread as bit 8i of a 32-bit word (nibble * 0x00204081: its copies shifted by
        //      0, 7, 14 and 21 bits do not overlap, so bits 0, 8, 16, 24 are the nibble's bits 0..3).
        const int masks = part.kind == 'b' ? 8 : 64;
        for (int r = 0; r < 16; ++r) std::memset(o + r * row_bytes, 0, part.n);
        for (int j = 0; j < masks; ++j) {
          uint64_t k;
          std::memcpy(&k, g + 8 * j, 8);
          if (part.kind == 'b') {
            for (int r = 0; r < 16; ++r)
              o[r * row_bytes + j / 2] |= (uint8_t)(((k >> (4 * r)) & 0xF) << (4 * (j % 2)));
            continue;
          }
          const int byte = part.kind == 'K' ? 4 * ((j % 16) / 2) : 4 * ((j % 32) / 4);
          const int bit = part.kind == 'K' ? 2 * (j / 16) + j % 2 : 4 * (j / 32) + j % 4;
          for (int r = 0; r < 16; ++r) {
            const uint32_t nibble = (uint32_t)((k >> (4 * r)) & 0xF);
            const uint32_t spread = ((nibble * 0x00204081u) & 0x01010101u) << bit;
            uint32_t word;
            std::memcpy(&word, o + r * row_bytes + byte, 4);
            word |= spread;
            std::memcpy(o + r * row_bytes + byte, &word, 4);
          }
        }
        g += 8 * masks;
      }
    }
  }
}

template <typename T>
void rows(const uint8_t* src, int64_t fmt, int64_t nb, int64_t bb, T* dst, int64_t N, bool avx512,
          bool inter = false) {
  const int64_t K = nb * block_values((int)fmt);
  RowFn<T> other = fmt == kQ8 || fmt == kQ4 ? nullptr : other_row<T>(fmt);
  if constexpr (std::is_same_v<T, at::BFloat16>)
    if (other && avx512) other = other_row_bf16(fmt);
  auto row = [&](const uint8_t* s, T* d) {
    if (other) {
      other(s, nb, d);
      return;
    }
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      if (avx512) {
        row_bf16(s, fmt, nb, bb, d);
        return;
      }
    }
    for (int64_t b = 0; b < nb; ++b) {
      if (fmt == kQ8) block_q8(s + b * bb, d + b * QK); else block_q4(s + b * bb, d + b * QK);
    }
  };
  if (inter) {          // a group at a time: its rows in the file's layout in a scratch buffer, then as above
    const int64_t row_bytes = nb * bb;
    at::parallel_for(0, N / 16, 1, [&](int64_t g0, int64_t g1) {
      std::vector<uint8_t> scratch(16 * row_bytes);
      for (int64_t g = g0; g < g1; ++g) {
        deinterleave_group(fmt, src + g * 16 * row_bytes, nb, bb, scratch.data(), row_bytes);
        for (int r = 0; r < 16; ++r) row(scratch.data() + r * row_bytes, dst + (16 * g + r) * K);
      }
    });
    return;
  }
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) row(src + n * nb * bb, dst + n * K);
  });
}

}  // namespace dequant_kernel

// isa: 0 the best this CPU runs (AVX512-BF16 for bf16 outputs where it has it), 1 AVX2, 2 AVX512-BF16 (an error
// where the CPU lacks it).
// layout: 0 the file's, 1 interleaved (interleave.py; N a multiple of 16).
void dequantize_into_layout(torch::Tensor packed, int64_t fmt, torch::Tensor out, int64_t isa, int64_t layout) {
  check_format(fmt, "dequantize_into");
  TORCH_CHECK(layout == 0 || layout == 1, "dequantize_into: unknown layout code ", layout, " (0 file, 1 interleaved)");
  TORCH_CHECK(layout == 0 || packed.size(0) % 16 == 0, "dequantize_into: interleaved blocks have a multiple of 16 "
              "rows, got ", packed.size(0));
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous() && packed.device().is_cpu(),
              "dequantize_into: contiguous uint8 CPU blocks (N, bytes), got ", packed.sizes());
  TORCH_CHECK((out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16) && out.dim() == 2 &&
              out.is_contiguous() && out.size(0) == packed.size(0),
              "dequantize_into: a contiguous fp32 or bf16 output of ", packed.size(0), " rows, got ", out.sizes(), " ",
              out.scalar_type());
  const int64_t bb = kBlockBytes[fmt], V = block_values((int)fmt);
  const int64_t N = packed.size(0), K = out.size(1), nb = K / V;
  TORCH_CHECK(K % V == 0 && packed.size(1) == nb * bb, "dequantize_into: ", kNames[fmt], " blocks of ",
              packed.size(1), " bytes per row do not hold ", K, " values");
  const bool has = dequant_kernel::cpu_has_avx512bf16();
  TORCH_CHECK(isa != 2 || has, "dequantize_into: this CPU has no AVX512-BF16");
  const bool avx512 = isa == 2 || (isa == 0 && has);
  const uint8_t* src = packed.data_ptr<uint8_t>();
  if (out.scalar_type() == at::kFloat)
    dequant_kernel::rows(src, fmt, nb, bb, out.data_ptr<float>(), N, false, layout == 1);
  else
    dequant_kernel::rows(src, fmt, nb, bb, out.data_ptr<at::BFloat16>(), N, avx512, layout == 1);
}

void dequantize_into(torch::Tensor packed, int64_t fmt, torch::Tensor out, int64_t isa) {
  dequantize_into_layout(packed, fmt, out, isa, 0);
}
