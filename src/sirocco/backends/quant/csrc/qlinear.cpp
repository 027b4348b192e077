// Decode products over GGUF-quantized weights: a few activation rows times a q8_0 or q4_0 weight matrix.
//
//   y (M, N) = x (M, K) @ W (N, K)^T     1 <= M <= 8; x fp32 or bf16; W as GGUF blocks of 32 along K, read in place
//
// The activation rows are quantized once per call to blocks of 32 int8 with an fp32 scale each
// (quantize_activations below, mirrored bit for bit by kernels.py's quantize_activations). Then every output is
//
//   y[m, n] = sum over blocks b, in block order, of  float(dot_b) * (d_w[n, b] * d_a[m, b])
//
// with dot_b the exact integer dot product of the block's 32 weight and activation quants (q4_0: nibble - 8),
// each product and sum rounded to fp32 once, no fused multiply-add (built with -ffp-contract=off). The integer
// part is exact whatever the instruction order, so the AVX2 path (_mm256_maddubs_epi16 with the sign trick, then
// _mm256_madd_epi16) and the AVX512-VNNI path (_mm512_dpbusd_epi32) give the same bits, and each output's bits
// depend neither on M, nor on which rows share a tile, nor on the thread count.
//
// Layout of the work: a tile is 8 consecutive weight rows (each read where it is: 8 streams, no repacking). Per
// block, each row's 32 quants are multiplied with the activation block into 8 int32 partial sums; a tree of
// horizontal additions turns the 8 rows' partial sums into one vector of 8 block dots (lane r = row r), which is
// converted to float, scaled and added into 8 accumulators (one per output) in one go. q4_0 holds two rows per
// vector (tile_avx2_q4) and needs three horizontal additions instead of six; with more than 2 activation rows the
// block's weight bytes are staged in L1 rather than registers. The next tile is prefetched into L2 while a tile is
// worked on (NextTile). Tiles are shared out over the threads in contiguous chunks of output rows by
// at::parallel_for (OpenMP).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cfloat>
#include <cmath>
#include <cstring>

namespace {

constexpr int QK = 32;
constexpr int kQ8 = 0, kQ4 = 1;
constexpr int kTile = 8;

template <int FMT> constexpr int64_t block_bytes() { return FMT == kQ8 ? 2 + QK : 2 + QK / 2; }

struct Acts {           // the activation rows as q8 blocks
  const int8_t* q;      // (M, K)
  const float* d;       // (M, nb)
  const int32_t* s8;    // (M, nb): 8 * the sum of the block's quants (q4_0's "- 8" folded into one subtraction)
  int64_t K, nb;
};

// Eight activation values as fp32 (bf16 widened exactly).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// One activation row of K values (fp32 or bf16) -> K int8 quants, nb scales, nb scaled sums, 8 values at a time.
// Per block: d = max |x| / 127 and q = round(x * (1 / d)), ties away from zero, by the exact computation the
// Python side uses (floor(a) + floor(2 (a - floor(a))) on a = |x / d|, the sign put back: every step exact or
// one IEEE rounding, as in scalar code). A block whose scale would not be a normal float (all zeros, or
// magnitudes below 127 * FLT_MIN) quantizes to zeros with scale 0. Vector code because a decode step makes
// this call about a hundred times: the scalar loop cost 20 us per row of 2048, as much as reading a small weight.
template <typename T>
void quantize_row(const T* x, int64_t K, int8_t* q, float* d, int32_t* s8) {
  const __m256 sign = _mm256_set1_ps(-0.0f), two = _mm256_set1_ps(2.0f);
  for (int64_t b = 0; b < K / QK; ++b) {
    __m256 v[4];
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = load8(x + b * QK + 8 * i);
      m = _mm256_max_ps(_mm256_andnot_ps(sign, v[i]), m);      // a NaN value leaves the maximum as it is
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float db = _mm_cvtss_f32(h) / 127.0f;
    if (!(db >= FLT_MIN)) {
      std::memset(q + b * QK, 0, QK);
      d[b] = 0.0f;
      s8[b] = 0;
      continue;
    }
    const __m256 id = _mm256_set1_ps(1.0f / db);
    __m256i qi[4];
    __m256i sum = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      const __m256 t = _mm256_mul_ps(v[i], id);
      const __m256 a = _mm256_andnot_ps(sign, t);
      const __m256 f = _mm256_floor_ps(a);
      const __m256 r = _mm256_add_ps(f, _mm256_floor_ps(_mm256_mul_ps(two, _mm256_sub_ps(a, f))));
      qi[i] = _mm256_cvtps_epi32(_mm256_or_ps(r, _mm256_and_ps(sign, t)));     // integral: exact
      sum = _mm256_add_epi32(sum, qi[i]);
    }
    // packs work within 128-bit lanes: 4-byte groups come out as q0[0:4] q1[0:4] q2[0:4] q3[0:4] q0[4:8] ...
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
    _mm256_storeu_si256((__m256i*)(q + b * QK),
                        _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    d[b] = db;
    s8[b] = 8 * _mm_cvtsi128_si32(s);
  }
}

// Lane r of the result = the sum of the 8 int32 lanes of p[r].
inline __m256i reduce8(const __m256i* p) {
  const __m256i h01 = _mm256_hadd_epi32(p[0], p[1]), h23 = _mm256_hadd_epi32(p[2], p[3]);
  const __m256i h45 = _mm256_hadd_epi32(p[4], p[5]), h67 = _mm256_hadd_epi32(p[6], p[7]);
  const __m256i h0123 = _mm256_hadd_epi32(h01, h23), h4567 = _mm256_hadd_epi32(h45, h67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(h0123, h4567, 0x20),
                          _mm256_permute2x128_si256(h0123, h4567, 0x31));
}

// The 8 rows' fp16 scales of block b, gathered four at a time in a general-purpose register and moved over in
// two: inserting them one by one (_mm_setr_epi16) costs a shuffle-port uop each, which the 8-row tiles are short
// of (measured, 7168 x 2048, 2 threads: q8_0 M=1 14.5 -> 16.0 GB/s, M=8 6.5 -> 8.9 GB/s).
template <int FMT>
inline __m256 row_scales(const uint8_t* const* rp, int64_t b) {
  const int64_t off = b * block_bytes<FMT>();
  auto h = [&](int r) { uint16_t v; std::memcpy(&v, rp[r] + off, 2); return (uint64_t)v; };
  const uint64_t lo = h(0) | h(1) << 16 | h(2) << 32 | h(3) << 48, hi = h(4) | h(5) << 16 | h(6) << 32 | h(7) << 48;
  return _mm256_cvtph_ps(_mm_unpacklo_epi64(_mm_cvtsi64_si128((long long)lo), _mm_cvtsi64_si128((long long)hi)));
}

// acc[m] (lane r = output row r) += float(dot) * (d_w * d_a[m, b]), the offset of unsigned weight quants taken
// off dot first: q4_0's 8 always, q8_0's 128 where the quants were made unsigned (``offset_q8``: the VNNI tile).
template <int FMT, bool offset_q8 = false>
inline __m256 scale_add(__m256 acc, __m256i dot, __m256 dw, const Acts& a, int64_t m, int64_t b) {
  if (FMT == kQ4) dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(a.s8[m * a.nb + b]));
  if (FMT == kQ8 && offset_q8) dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(16 * a.s8[m * a.nb + b]));
  const __m256 s = _mm256_mul_ps(dw, _mm256_set1_ps(a.d[m * a.nb + b]));
  return _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(dot), s));
}

// 32 weight quants of one block as bytes: q8_0's int8 as they are; q4_0's nibbles (0..15) in element order.
template <int FMT>
inline __m256i load_quants(const uint8_t* blk) {
  if (FMT == kQ8) return _mm256_loadu_si256((const __m256i*)(blk + 2));
  const __m128i packed = _mm_loadu_si128((const __m128i*)(blk + 2));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), mask), _mm_and_si128(packed, mask));
}

template <int FMT>
inline __m256i block_dot_avx2(__m256i wq, __m256i aq) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (FMT == kQ8)   // u8 x s8: |w| times a with w's sign; |a| <= 127 so the int16 pair sums cannot saturate
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(aq, wq)), ones);
  return _mm256_madd_epi16(_mm256_maddubs_epi16(wq, aq), ones);
}

// The 8 rows of a tile are contiguous in memory (rows n0 .. n0 + 7), and so is the next tile. While a tile is
// worked through (8 streams advancing block by block), the next one is prefetched into L2 as one linear stream,
// a fixed number of lines per block step (no branch), so that it sits in cache when its turn comes. Measured
// (2048 x 2048, M = 1, one thread, weights cycled beyond L3): q8_0 4.3-5.3 -> 8.1-8.9 GB/s, q4_0 3.5-5.4 ->
// 7.9-8.0 GB/s against 512 bytes ahead in each row stream or no software prefetch; into L1 instead of L2, or
// two tiles ahead, no better.
template <int FMT>
struct NextTile {
  static constexpr int64_t kStep = kTile * block_bytes<FMT>();       // bytes of the tile per block step
  static constexpr int kLines = (kStep + 63) / 64;                    // covers [p, p + kStep) with p's next
  const char* p;
  NextTile(const uint8_t* rows, int64_t row_bytes) : p((const char*)(rows + kTile * row_bytes)) {}
  inline void step() {
    for (int i = 0; i < kLines; ++i) _mm_prefetch(p + 64 * i, _MM_HINT_T1);
    p += kStep;
  }
};

// Outputs y[m, n0 .. n0 + valid) for the M activation rows (rows past the end repeat the last valid one).
template <int FMT, int M>
void tile_avx2(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t valid, const Acts& a, float* y,
               int64_t N) {
  const uint8_t* rp[kTile];
  for (int r = 0; r < kTile; ++r) rp[r] = w + (n0 + std::min<int64_t>(r, valid - 1)) * row_bytes;
  NextTile<FMT> pf(w + n0 * row_bytes, row_bytes);
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < a.nb; ++b) {
    const int64_t off = b * block_bytes<FMT>();
    pf.step();
    const __m256 dw = row_scales<FMT>(rp, b);
    if (M <= 2) {               // weights in registers
      __m256i wq[kTile];
      for (int r = 0; r < kTile; ++r) wq[r] = load_quants<FMT>(rp[r] + off);
      for (int m = 0; m < M; ++m) {
        const __m256i aq = _mm256_loadu_si256((const __m256i*)(a.q + m * a.K + b * QK));
        __m256i p[kTile];
        for (int r = 0; r < kTile; ++r) p[r] = block_dot_avx2<FMT>(wq[r], aq);
        acc[m] = scale_add<FMT>(acc[m], reduce8(p), dw, a, m, b);
      }
    } else {                    // more rows than registers: |w| and w of the block in L1, read per row
      static_assert(FMT == kQ8, "q4_0 has its own tile");
      alignas(32) uint8_t wabs[kTile][QK], wraw[kTile][QK];
      for (int r = 0; r < kTile; ++r) {
        const __m256i v = load_quants<FMT>(rp[r] + off);
        _mm256_store_si256((__m256i*)wraw[r], v);
        _mm256_store_si256((__m256i*)wabs[r], _mm256_abs_epi8(v));
      }
      const __m256i ones = _mm256_set1_epi16(1);
      auto dot = [&](int r, __m256i aq) {
        const __m256i wv = _mm256_load_si256((const __m256i*)wraw[r]);
        return _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_load_si256((const __m256i*)wabs[r]), _mm256_sign_epi8(aq, wv)), ones);
      };
      for (int m = 0; m < M; ++m) {
        const __m256i aq = _mm256_loadu_si256((const __m256i*)(a.q + m * a.K + b * QK));
        const __m256i h0123 = _mm256_hadd_epi32(_mm256_hadd_epi32(dot(0, aq), dot(1, aq)),
                                                _mm256_hadd_epi32(dot(2, aq), dot(3, aq)));
        const __m256i h4567 = _mm256_hadd_epi32(_mm256_hadd_epi32(dot(4, aq), dot(5, aq)),
                                                _mm256_hadd_epi32(dot(6, aq), dot(7, aq)));
        const __m256i sum = _mm256_add_epi32(_mm256_permute2x128_si256(h0123, h4567, 0x20),
                                             _mm256_permute2x128_si256(h0123, h4567, 0x31));
        acc[m] = scale_add<FMT>(acc[m], sum, dw, a, m, b);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    alignas(32) float out[kTile];
    _mm256_store_ps(out, acc[m]);
    for (int r = 0; r < valid; ++r) y[m * N + n0 + r] = out[r];
  }
}

// q4_0 with AVX2, two rows per vector: the 16 packed bytes of rows 2j and 2j + 1 side by side, so one mask gives
// elements 0..15 of both rows and a shift and a mask elements 16..31; they meet the activation's halves broadcast
// to both lanes. The int16 pair sums of the two halves are added (at most 2 * 2 * 15 * 127, no overflow) before
// widening, and three horizontal additions leave the 8 rows' dots in the lane order kQ4Lanes.
constexpr int kQ4Lanes[kTile] = {0, 2, 4, 6, 1, 3, 5, 7};

template <int M>
void tile_avx2_q4(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t valid, const Acts& a, float* y,
                  int64_t N) {
  constexpr int64_t BB = block_bytes<kQ4>();
  const uint8_t* rp[kTile];
  for (int r = 0; r < kTile; ++r) rp[r] = w + (n0 + std::min<int64_t>(r, valid - 1)) * row_bytes;
  NextTile<kQ4> pf(w + n0 * row_bytes, row_bytes);
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < a.nb; ++b) {
    const int64_t off = b * BB;
    pf.step();
    auto h = [&](int r) { uint16_t v; std::memcpy(&v, rp[r] + off, 2); return (short)v; };
    const __m256 dw = _mm256_cvtph_ps(_mm_setr_epi16(h(0), h(2), h(4), h(6), h(1), h(3), h(5), h(7)));
    __m256i lo[kTile / 2], hi[kTile / 2];
    for (int j = 0; j < kTile / 2; ++j) {
      const __m256i v = _mm256_loadu2_m128i((const __m128i*)(rp[2 * j + 1] + off + 2),
                                            (const __m128i*)(rp[2 * j] + off + 2));
      lo[j] = _mm256_and_si256(v, mask);
      hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    }
    for (int m = 0; m < M; ++m) {
      const int8_t* aq = a.q + m * a.K + b * QK;
      const __m256i alo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)aq));
      const __m256i ahi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(aq + 16)));
      __m256i p[kTile / 2];
      for (int j = 0; j < kTile / 2; ++j)
        p[j] = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo[j], alo), _mm256_maddubs_epi16(hi[j], ahi)),
                                 ones);
      const __m256i dot = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
      acc[m] = scale_add<kQ4>(acc[m], dot, dw, a, m, b);
    }
  }
  for (int m = 0; m < M; ++m) {
    alignas(32) float out[kTile];
    _mm256_store_ps(out, acc[m]);
    for (int l = 0; l < kTile; ++l)
      if (kQ4Lanes[l] < valid) y[m * N + n0 + kQ4Lanes[l]] = out[l];
  }
}

// The VNNI tile works on block pairs: one 512-bit vector holds two consecutive blocks of a weight row (lanes 0..7
// block b, lanes 8..15 block b + 1, each int32 lane the sum of 4 products), so one _mm512_dpbusd_epi32 takes a row's
// products for both blocks, and one tree of 14 shuffles (reduce16) turns the 8 rows' vectors into the 16 block dots
// of the pair, half of the shuffles of two 256-bit trees. dpbusd multiplies unsigned by signed bytes: q4_0's
// nibbles are unsigned already; for q8_0 the activation is made unsigned (a + 128, an exclusive or of the sign bit)
// and the product started from -128 times the sum of the lane's 4 weights, so that each lane is exactly the sum of
// w * a (a weight of -128 included), one instruction per row and activation row.
//
// Built with SIROCCO_VNNI_EMULATION (a test-only build, tests/test_quant_kernels.py) the operations of namespace
// v512 are scalar code following Intel's definitions, so that the tile's data flow can be checked on CPUs without
// AVX-512; normally they are the AVX-512 instructions.
#ifndef SIROCCO_VNNI_EMULATION
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
namespace v512 {
using vec = __m512i;
VNNI_TARGET inline vec zero() { return _mm512_setzero_si512(); }
VNNI_TARGET inline vec load(const int8_t* p) { return _mm512_loadu_si512((const void*)p); }
VNNI_TARGET inline __m256i low(vec v) { return _mm512_castsi512_si256(v); }
VNNI_TARGET inline __m256i high(vec v) { return _mm512_extracti64x4_epi64(v, 1); }
// q8_0: the 32 quants at q0 (block b) and at q1 (block b + 1)
VNNI_TARGET inline vec q8_pair(const uint8_t* q0, const uint8_t* q1) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)q0)),
                            _mm256_loadu_si256((const __m256i*)q1), 1);
}
// q4_0: the 16 packed bytes at q0 and at q1 as 64 nibbles in element order (128-bit lanes: q0's low nibbles, q0's
// high nibbles, q1's low, q1's high)
VNNI_TARGET inline vec q4_pair(const uint8_t* q0, const uint8_t* q1) {
  const vec v = _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)q0))),
      _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)q1)), 1);
  return _mm512_and_si512(_mm512_mask_srli_epi16(v, 0xFF00FF00u, v, 4), _mm512_set1_epi8(0x0F));
}
// x + 128: signed bytes as unsigned ones
VNNI_TARGET inline vec flip(vec a) { return _mm512_xor_si512(a, _mm512_set1_epi8((char)0x80)); }
// per int32 lane, acc + the sum of 4 products of unsigned u and signed s bytes
VNNI_TARGET inline vec dpbusd(vec acc, vec u, vec s) { return _mm512_dpbusd_epi32(acc, u, s); }
// lane r (0..7): the sum of p[r]'s int32 lanes 0..7; lane 8 + r: of its lanes 8..15
VNNI_TARGET inline vec pairs(vec x, vec y) {
  return _mm512_add_epi32(_mm512_unpacklo_epi32(x, y), _mm512_unpackhi_epi32(x, y));
}
VNNI_TARGET inline vec quads(vec x, vec y) {
  return _mm512_add_epi32(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y));
}
VNNI_TARGET inline vec reduce16(const vec* p) {
  // per 128-bit lane of u0: the sums of its 4 int32 lanes for rows 0..3; of u1: rows 4..7
  const vec u0 = quads(pairs(p[0], p[1]), pairs(p[2], p[3])), u1 = quads(pairs(p[4], p[5]), pairs(p[6], p[7]));
  const vec first = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0), second = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
  return _mm512_add_epi32(_mm512_permutex2var_epi64(u0, first, u1), _mm512_permutex2var_epi64(u0, second, u1));
}
}  // namespace v512
#else
#define VNNI_TARGET
namespace v512 {
struct vec { int8_t b[64]; };
inline vec zero() { vec v; std::memset(v.b, 0, 64); return v; }
inline vec load(const int8_t* p) { vec v; std::memcpy(v.b, p, 64); return v; }
inline __m256i low(vec v) { return _mm256_loadu_si256((const __m256i*)v.b); }
inline __m256i high(vec v) { return _mm256_loadu_si256((const __m256i*)(v.b + 32)); }
inline void lanes(const vec& v, int32_t* out) { std::memcpy(out, v.b, 64); }
inline vec from_lanes(const int32_t* in) { vec v; std::memcpy(v.b, in, 64); return v; }
inline vec q8_pair(const uint8_t* q0, const uint8_t* q1) {
  vec v; std::memcpy(v.b, q0, 32); std::memcpy(v.b + 32, q1, 32); return v;
}
inline vec q4_pair(const uint8_t* q0, const uint8_t* q1) {
  vec v;
  for (int i = 0; i < 16; ++i) {
    v.b[i] = q0[i] & 0x0F; v.b[16 + i] = q0[i] >> 4; v.b[32 + i] = q1[i] & 0x0F; v.b[48 + i] = q1[i] >> 4;
  }
  return v;
}
inline vec flip(vec a) { for (auto& x : a.b) x = (int8_t)((uint8_t)x ^ 0x80); return a; }
inline vec dpbusd(const vec& acc, const vec& u, const vec& s) {   // _mm512_dpbusd_epi32
  int32_t l[16];
  lanes(acc, l);
  for (int j = 0; j < 16; ++j)
    for (int i = 4 * j; i < 4 * j + 4; ++i) l[j] += (int32_t)(uint8_t)u.b[i] * (int32_t)s.b[i];
  return from_lanes(l);
}
inline vec reduce16(const vec* p) {
  int32_t out[16] = {}, l[16];
  for (int r = 0; r < kTile; ++r) {
    lanes(p[r], l);
    for (int j = 0; j < 8; ++j) { out[r] += l[j]; out[8 + r] += l[8 + j]; }
  }
  return from_lanes(out);
}
}  // namespace v512
#endif

template <int FMT, int M>
VNNI_TARGET void tile_vnni(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t valid, const Acts& a,
                           float* y, int64_t N) {
  constexpr int64_t BB = block_bytes<FMT>();
  const uint8_t* rp[kTile];
  for (int r = 0; r < kTile; ++r) rp[r] = w + (n0 + std::min<int64_t>(r, valid - 1)) * row_bytes;
  NextTile<FMT> pf(w + n0 * row_bytes, row_bytes);
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= a.nb; b += 2) {
    const int64_t off = b * BB;
    pf.step();
    pf.step();
    const __m256 dw0 = row_scales<FMT>(rp, b), dw1 = row_scales<FMT>(rp, b + 1);
    v512::vec wq[kTile];          // unsigned: q4_0's nibbles, q8_0's quants + 128
    for (int r = 0; r < kTile; ++r)
      wq[r] = FMT == kQ8 ? v512::flip(v512::q8_pair(rp[r] + off + 2, rp[r] + off + BB + 2))
                         : v512::q4_pair(rp[r] + off + 2, rp[r] + off + BB + 2);
    for (int m = 0; m < M; ++m) {
      const v512::vec aq = v512::load(a.q + m * a.K + b * QK);
      v512::vec p[kTile];
      for (int r = 0; r < kTile; ++r) p[r] = v512::dpbusd(v512::zero(), wq[r], aq);
      const v512::vec dots = v512::reduce16(p);
      acc[m] = scale_add<FMT, true>(acc[m], v512::low(dots), dw0, a, m, b);
      acc[m] = scale_add<FMT, true>(acc[m], v512::high(dots), dw1, a, m, b + 1);
    }
  }
  for (; b < a.nb; ++b) {                // an odd last block: the 256-bit form of the same dot
    const int64_t off = b * BB;
    const __m256 dw = row_scales<FMT>(rp, b);
    for (int m = 0; m < M; ++m) {
      const __m256i aq = _mm256_loadu_si256((const __m256i*)(a.q + m * a.K + b * QK));
      __m256i p[kTile];
      for (int r = 0; r < kTile; ++r) p[r] = block_dot_avx2<FMT>(load_quants<FMT>(rp[r] + off), aq);
      acc[m] = scale_add<FMT>(acc[m], reduce8(p), dw, a, m, b);
    }
  }
  for (int m = 0; m < M; ++m) {
    alignas(32) float out[kTile];
    _mm256_store_ps(out, acc[m]);
    for (int r = 0; r < valid; ++r) y[m * N + n0 + r] = out[r];
  }
}

using TileFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, const Acts&, float*, int64_t);

template <int FMT>
TileFn pick(int64_t M, bool vnni) {
#define SIROCCO_CASE(m) \
  case m: return vnni ? tile_vnni<FMT, m> : FMT == kQ4 ? tile_avx2_q4<m> : tile_avx2<kQ8, m>;
  switch (M) {
    SIROCCO_CASE(1) SIROCCO_CASE(2) SIROCCO_CASE(3) SIROCCO_CASE(4)
    SIROCCO_CASE(5) SIROCCO_CASE(6) SIROCCO_CASE(7) SIROCCO_CASE(8)
  }
#undef SIROCCO_CASE
  return nullptr;
}

// Rows x (M, K) fp32 quantized as the kernel takes them (quantize_row per row), in buffers it keeps alive.
struct QuantizedRows {
  torch::Tensor q, d, s8;
  Acts acts;
  template <typename T>
  QuantizedRows(const T* x, int64_t M, int64_t K, const torch::TensorOptions& options) {
    const int64_t nb = K / QK;
    q = torch::empty({M * K + 64}, options.dtype(torch::kInt8));    // + 64: room for a 512-bit load
    d = torch::empty({M * nb}, options.dtype(torch::kFloat));
    s8 = torch::empty({M * nb}, options.dtype(torch::kInt));
    for (int64_t m = 0; m < M; ++m)
      quantize_row(x + m * K, K, q.data_ptr<int8_t>() + m * K, d.data_ptr<float>() + m * nb,
                   s8.data_ptr<int32_t>() + m * nb);
    acts = Acts{q.data_ptr<int8_t>(), d.data_ptr<float>(), s8.data_ptr<int32_t>(), K, nb};
  }
  // The activation rows from row m on.
  Acts from(int64_t m) const { return Acts{acts.q + m * acts.K, acts.d + m * acts.nb, acts.s8 + m * acts.nb, acts.K, acts.nb}; }
};

bool cpu_has_vnni() {
#ifdef SIROCCO_VNNI_EMULATION
  return true;
#endif
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

}  // namespace

// "avx512vnni" where this CPU can run the VNNI path, else "avx2".
std::string qlinear_isa() { return cpu_has_vnni() ? "avx512vnni" : "avx2"; }

// (q int8 (M, K), d fp32 (M, K / 32)): the activation quantization the kernel uses, for tests and references.
std::vector<torch::Tensor> quantize_activations(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % QK == 0, "quantize_activations: expected (M, K), K a multiple of 32, got ",
              x.sizes());
  auto xf = x.to(torch::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1);
  auto q = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto d = torch::empty({M, K / QK}, x.options().dtype(torch::kFloat));
  auto s = torch::empty({M, K / QK}, x.options().dtype(torch::kInt));
  for (int64_t m = 0; m < M; ++m)
    quantize_row(xf.data_ptr<float>() + m * K, K, q.data_ptr<int8_t>() + m * K, d.data_ptr<float>() + m * (K / QK),
                 s.data_ptr<int32_t>() + m * (K / QK));
  return {q, d};
}

// ys[i] (M, N_i) in x's dtype = x (M, K) times weight i of N_i rows of K / 32 blocks in format fmt (0 q8_0, 1
// q4_0): the projections that share an input (a layer's wq, wk, wv; w1, w3) in one call. The rows are quantized
// once for all the weights and the tiles of every weight are shared out over the threads in one parallel region
// (one wake-up of the threads instead of one per weight); each output is computed by the same tile as in a call
// with its weight alone, so its bits are the same. isa: 0 the best this CPU runs, 1 AVX2, 2 AVX512-VNNI (an error
// where the CPU lacks it).
std::vector<torch::Tensor> qlinear_many(torch::Tensor x, std::vector<torch::Tensor> ws, int64_t fmt, int64_t isa) {
  TORCH_CHECK(fmt == kQ8 || fmt == kQ4, "qlinear: fmt 0 (q8_0) or 1 (q4_0), got ", fmt);
  TORCH_CHECK(x.dim() == 2 && !ws.empty(), "qlinear: expected x (M, K) and at least one weight, got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t bb = fmt == kQ8 ? block_bytes<kQ8>() : block_bytes<kQ4>();
  TORCH_CHECK(M >= 1 && M <= 8, "qlinear: 1 to 8 rows, got ", M);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "qlinear: fp32 or bf16 rows, got ",
              x.scalar_type());
  for (const auto& w : ws) {
    TORCH_CHECK(w.dim() == 2 && K % QK == 0 && w.size(1) == K / QK * bb, "qlinear: x ", x.sizes(),
                " does not match packed w ", w.sizes(), " (K a multiple of 32, ", bb, " bytes per block)");
    TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.device().is_cpu() && x.device().is_cpu(),
                "qlinear: contiguous uint8 CPU weight blocks and CPU rows only");
  }
  const bool has_vnni = cpu_has_vnni();
  TORCH_CHECK(isa != 2 || has_vnni, "qlinear: this CPU has no AVX512-VNNI");
  const bool vnni = isa == 2 || (isa == 0 && has_vnni);

  // bf16 rows are read and written as they are (no conversion ops around the call: a decode step makes several
  // of these calls per layer, and each extra op costs more than the conversion itself).
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  auto xc = x.contiguous();
  const QuantizedRows rows = bf16 ? QuantizedRows(xc.data_ptr<at::BFloat16>(), M, K, x.options())
                                  : QuantizedRows(xc.data_ptr<float>(), M, K, x.options());
  const Acts& a = rows.acts;
  const TileFn tile = fmt == kQ8 ? pick<kQ8>(M, vnni) : pick<kQ4>(M, vnni);
  const int64_t row_bytes = K / QK * bb;

  // Weight i's tiles are tiles first[i] .. first[i + 1] - 1 of the call.
  const size_t n_w = ws.size();
  std::vector<int64_t> first(n_w + 1, 0), Ns(n_w);
  std::vector<torch::Tensor> yfs, ys;
  std::vector<const uint8_t*> wps(n_w);
  std::vector<float*> yps(n_w);
  std::vector<at::BFloat16*> ybs(n_w, nullptr);
  for (size_t i = 0; i < n_w; ++i) {
    Ns[i] = ws[i].size(0);
    first[i + 1] = first[i] + (Ns[i] + kTile - 1) / kTile;
    yfs.push_back(torch::empty({M, Ns[i]}, x.options().dtype(torch::kFloat)));
    ys.push_back(bf16 ? torch::empty({M, Ns[i]}, x.options()) : yfs.back());
    wps[i] = ws[i].data_ptr<uint8_t>();
    yps[i] = yfs[i].data_ptr<float>();
    if (bf16) ybs[i] = ys[i].data_ptr<at::BFloat16>();
  }
  // Grain: about 64 KiB of weights per task, so that small matrices do not pay for waking a second thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / (kTile * row_bytes));
  at::parallel_for(0, first[n_w], grain, [&](int64_t t0, int64_t t1) {
    size_t i = 0;
    for (int64_t t = t0; t < t1; ++t) {
      while (t >= first[i + 1]) ++i;
      const int64_t N = Ns[i], n0 = (t - first[i]) * kTile, valid = std::min<int64_t>(kTile, N - n0);
      float* yp = yps[i];
      tile(wps[i], row_bytes, n0, valid, a, yp, N);
      if (at::BFloat16* yb = ybs[i])      // rounded to nearest even, as .to(torch.bfloat16)
        for (int64_t m = 0; m < M; ++m)
          for (int64_t r = 0; r < valid; ++r) yb[m * N + n0 + r] = at::BFloat16(yp[m * N + n0 + r]);
    }
  });
  return ys;
}

// y (M, N) in x's dtype = x (M, K) times one weight of N rows: qlinear_many with that weight alone.
torch::Tensor qlinear(torch::Tensor x, torch::Tensor w, int64_t fmt, int64_t isa) {
  return qlinear_many(x, {w}, fmt, isa)[0];
}
