// The GGUF block types the quantized kernels read, as codes shared with kernels.py (FMT_CODES), and what each
// one's decode product needs of the activations. First in the translation unit (kernels.py's SOURCES).
//
//   code  type    values  bytes   activations
//   0     q8_0    32      34      blocks of 32 (fp32 scale, int8 quants, sums)
//   1     q4_0    32      18      blocks of 32
//   2     q4_1    32      20      blocks of 32
//   3     q5_0    32      22      blocks of 32
//   4     q5_1    32      24      blocks of 32
//   5     iq4_nl  32      18      blocks of 32
//   6     q2_K    256     84      blocks of 256 (fp32 scale, int8 quants, int16 sums per 16 and per 32)
//   7     q3_K    256     110     blocks of 256
//   8     q4_K    256     144     blocks of 256
//   9     q5_K    256     176     blocks of 256
//   10    q6_K    256     210     blocks of 256
//   11    iq4_xs  256     136     blocks of 256
//
// Byte layouts: layouts.py's table (as ggml defines them).
#include <torch/extension.h>

#include <cstdint>

namespace {

constexpr int QK = 32;                  // values per block of the 32-value types and of their activations
constexpr int QKK = 256;                // values per super-block of the K types and iq4_xs, and of their activations
constexpr int kQ8 = 0, kQ4 = 1, kQ41 = 2, kQ50 = 3, kQ51 = 4, kIQ4NL = 5;
constexpr int kQ2K = 6, kQ3K = 7, kQ4K = 8, kQ5K = 9, kQ6K = 10, kIQ4XS = 11;
constexpr int kFormats = 12;

constexpr int64_t kBlockBytes[kFormats] = {34, 18, 20, 22, 24, 18, 84, 110, 144, 176, 210, 136};
constexpr const char* kNames[kFormats] = {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl",
                                          "q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "iq4_xs"};

template <int FMT> constexpr int64_t block_bytes() { return kBlockBytes[FMT]; }
constexpr bool is_super(int fmt) { return fmt >= kQ2K; }          // 256-value blocks, activations in blocks of 256
constexpr int64_t block_values(int fmt) { return is_super(fmt) ? QKK : QK; }

inline void check_format(int64_t fmt, const char* who) {
  TORCH_CHECK(fmt >= 0 && fmt < kFormats, who, ": unknown format code ", fmt, " (0 to ", kFormats - 1, ")");
}

// The order in which a K-type tile reads a super-block's activation quants, so that its loads of weight quants and
// of activation quants line up without shuffles: destination chunk i of 16 bytes is source chunk kChunkOrder[p][i].
// 0: as they are; 1: q4_K / q5_K in 512-bit vectors, whose low and high nibbles of 64 quant bytes are sub-blocks
// (2j, 2j + 2) and (2j + 1, 2j + 3) of 32 values; 2 and 3: iq4_xs in 256- and 512-bit vectors, whose low nibbles of
// 2 or 4 blocks of 16 bytes are the first 16 values of each block, the high nibbles the last 16.
// Worked example (order 1): activation bytes 32..63 (sub-block 1) move to 64..95, and 64..95 (sub-block 2) to 32..63.
constexpr int kChunkOrder[4][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15},
    {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15},
    {0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15},
};

inline int activation_order(int fmt, bool vnni) {
  if (fmt == kQ4K || fmt == kQ5K) return vnni ? 1 : 0;
  if (fmt == kIQ4XS) return vnni ? 3 : 2;
  return 0;
}

// iq4_nl's and iq4_xs's codebook, and the same plus 128 (unsigned bytes for vpdpbusd) and its magnitudes.
alignas(16) constexpr int8_t kIQ4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
alignas(16) constexpr uint8_t kIQ4Plus128[16] = {1, 24, 45, 63, 79, 93, 106, 118, 129, 141, 153, 166, 181, 197, 217, 241};
alignas(16) constexpr uint8_t kIQ4Abs[16] = {127, 104, 83, 65, 49, 35, 22, 10, 1, 13, 25, 38, 53, 69, 89, 113};

}  // namespace
