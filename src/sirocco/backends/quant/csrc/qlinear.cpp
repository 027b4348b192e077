// Decode products over GGUF-quantized weights: a few activation rows times a weight matrix of one of the types of
// blocks.h. This file: the activations, the 32-value types (q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl) and the entry
// points; qlinear_k.cpp: the 256-value types (q2_K .. q6_K, iq4_xs).
//
//   y (M, N) = x (M, K) @ W (N, K)^T     1 <= M <= 8; x fp32 or bf16; W as GGUF blocks along K, read in place
//
// The activation rows are quantized once per call to blocks of int8 with an fp32 scale each, blocks of 32 for the
// 32-value types and of 256 for the others (quantize_row, mirrored bit for bit by kernels.py's
// quantize_activations). For the 32-value types every output is
//
//   y[m, n] = sum over blocks b, in block order, of  float(dot_b) * (d_w[n, b] * d_a[m, b])
//                                                    [+ m_w[n, b] * (d_a[m, b] * float(sum_a[m, b]))]
//
// with dot_b the exact integer dot product of the block's 32 weight quants (q4_0: nibble - 8; q5_0: 5 bits - 16;
// q4_1, q5_1: the unsigned quants; iq4_nl: the codebook's values) and activation quants, the bracket only for q4_1
// and q5_1 (m_w their fp16 offset, sum_a the activation block's quants summed; the two products are added, then
// the sum to the accumulator), each product and sum rounded to fp32 once, no fused multiply-add (built with
// -ffp-contract=off). The integer
// part is exact whatever the instruction order, so the AVX2 path (_mm256_maddubs_epi16 with the sign trick, then
// _mm256_madd_epi16) and the AVX512-VNNI path (_mm512_dpbusd_epi32) give the same bits, and each output's bits
// depend neither on M, nor on which rows share a tile, nor on the thread count.
//
// Layout of the work: a tile is consecutive weight rows, each read where it is in the file's layout (a weight the
// conversion pass interleaved is read by qlinear_x16.cpp's tiles instead: interleave.py). In the
// AVX2 tiles (8 rows), per block each row's 32 quants are multiplied with the activation block into 8 int32
// partial sums; a tree of horizontal additions turns the 8 rows' partial sums into one vector of 8 block dots
// (lane r = row r), which is converted to float, scaled and added into 8 accumulators (one per output) in one go.
// q4_0 holds two rows per vector (tile_avx2_q4) and needs three horizontal additions instead of six; with more than
// 2 activation rows the block's weight bytes are staged in L1 rather than registers. The AVX512-VNNI tile (16 rows)
// transposes the block's rows in registers instead, so that its dots need no horizontal sums (see tile_vnni). The
// next tile is prefetched into L2 while a tile is worked on (NextTile). Tiles are shared out over the threads in
// contiguous chunks of output rows by at::parallel_for (OpenMP).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <cmath>
#include <cstring>

namespace {

constexpr int kTile = 8;

// The activation rows as int8 blocks (QuantizedRows), for the 32-value types (blocks of 32) or the others (blocks
// of 256); the fields a kind does not use are null.
struct Acts {
  const int8_t* q;          // (M, K): the quants; for the 256-value types in the tile's order (kChunkOrder)
  const float* d;           // (M, nb): the scale of each block (of 32 or of 256)
  const int32_t* s8;        // (M, nb), blocks of 32: 8 * the sum of the block's quants (q4_0's "- 8" in one step)
  const int32_t* start[3];  // (M, nb) each, blocks of 32: where the VNNI tile's dots start: -128, -8 and -16 times
                            // the sum (q8_0 and iq4_nl, q4_0, q5_0)
  const float* das;         // (M, nb), blocks of 32: d * float(sum), the activations' side of q4_1's and q5_1's m
  const int16_t* bsum;      // (M, K / 16), blocks of 256: the sums of each 16 quants, in natural order
  const int16_t* bsum32;    // (M, K / 32), blocks of 256: the sums of each 32
  int64_t K, nb;
  const int32_t* pairs = nullptr;   // (M, nb, 8), blocks of 256 for the interleaved tiles: two sums as int16 in
                                    // each int32 (qlinear_x16.cpp, sum_pairs)
};

// Eight activation values as fp32 (bf16 widened exactly).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// One activation row of K values (fp32 or bf16) -> K int8 quants, K / QA scales, and for blocks of 32 the scaled
// sums, 8 values at a time.
// Per block of QA: d = max |x| / 127 and q = round(x * (1 / d)), ties away from zero, by the exact computation the
// Python side uses (floor(a) + floor(2 (a - floor(a))) on a = |x / d|, the sign put back: every step exact or
// one IEEE rounding, as in scalar code). A block whose scale would not be a normal float (all zeros, or
// magnitudes below 127 * FLT_MIN) quantizes to zeros with scale 0. Vector code because a decode step makes
// this call about a hundred times: the scalar loop cost as much as reading a small weight (docs/performance.md).
template <int QA, typename T>
void quantize_row(const T* x, int64_t K, int8_t* q, float* d, int32_t* s8) {
  const __m256 sign = _mm256_set1_ps(-0.0f), two = _mm256_set1_ps(2.0f);
  for (int64_t b = 0; b < K / QA; ++b) {
    const T* xb = x + b * QA;
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < QA / 8; ++i)
      m = _mm256_max_ps(_mm256_andnot_ps(sign, load8(xb + 8 * i)), m);   // a NaN value leaves the maximum as it is
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float db = _mm_cvtss_f32(h) / 127.0f;
    if (!(db >= FLT_MIN)) {
      std::memset(q + b * QA, 0, QA);
      d[b] = 0.0f;
      if (s8) s8[b] = 0;
      continue;
    }
    const __m256 id = _mm256_set1_ps(1.0f / db);
    __m256i sum = _mm256_setzero_si256();
    for (int c = 0; c < QA / QK; ++c) {
      __m256i qi[4];
      for (int i = 0; i < 4; ++i) {
        const __m256 t = _mm256_mul_ps(load8(xb + QK * c + 8 * i), id);
        const __m256 a = _mm256_andnot_ps(sign, t);
        const __m256 f = _mm256_floor_ps(a);
        const __m256 r = _mm256_add_ps(f, _mm256_floor_ps(_mm256_mul_ps(two, _mm256_sub_ps(a, f))));
        qi[i] = _mm256_cvtps_epi32(_mm256_or_ps(r, _mm256_and_ps(sign, t)));     // integral: exact
        sum = _mm256_add_epi32(sum, qi[i]);
      }
      // packs work within 128-bit lanes: 4-byte groups come out as q0[0:4] q1[0:4] q2[0:4] q3[0:4] q0[4:8] ...
      const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
      _mm256_storeu_si256((__m256i*)(q + b * QA + QK * c),
                          _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    }
    d[b] = db;
    if (s8) {
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
      s8[b] = 8 * _mm_cvtsi128_si32(s);
    }
  }
}

// The sums of each 16 quants of a row of K (a multiple of 32): 16 sums per 256 values, as int16 (at most
// 16 * 127 in magnitude). The bytes are made unsigned (+128) for a sum of absolute differences against zero, which
// adds 8 of them into each 64-bit lane; 16 * 128 is taken off again.
inline void sums16(const int8_t* q, int64_t K, int16_t* out) {
  const __m256i flip = _mm256_set1_epi8((char)0x80);
  for (int64_t i = 0; i < K; i += 32) {
    const __m256i sad = _mm256_sad_epu8(_mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(q + i)), flip),
                                        _mm256_setzero_si256());
    alignas(32) int64_t l[4];
    _mm256_store_si256((__m256i*)l, sad);
    out[i / 16] = (int16_t)(l[0] + l[1] - 16 * 128);
    out[i / 16 + 1] = (int16_t)(l[2] + l[3] - 16 * 128);
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
// of (measured at 1 and 8 rows: docs/performance.md).
inline __m256 row_scales(const uint8_t* const* rp, int64_t off) {
  auto h = [&](int r) { uint16_t v; std::memcpy(&v, rp[r] + off, 2); return (uint64_t)v; };
  const uint64_t lo = h(0) | h(1) << 16 | h(2) << 32 | h(3) << 48, hi = h(4) | h(5) << 16 | h(6) << 32 | h(7) << 48;
  return _mm256_cvtph_ps(_mm_unpacklo_epi64(_mm_cvtsi64_si128((long long)lo), _mm_cvtsi64_si128((long long)hi)));
}

// Where a 32-value type keeps its parts within a block: the 16 bytes of nibbles, the fifth bits (q5_0, q5_1), the
// fp16 offset m (q4_1, q5_1, right after d).
template <int FMT> constexpr int64_t qs_at() { return FMT == kQ41 ? 4 : FMT == kQ50 ? 6 : FMT == kQ51 ? 8 : 2; }
template <int FMT> constexpr int64_t qh_at() { return FMT == kQ50 ? 2 : 4; }
template <int FMT> constexpr bool has_m() { return FMT == kQ41 || FMT == kQ51; }
template <int FMT> constexpr bool has_qh() { return FMT == kQ50 || FMT == kQ51; }

// acc[m] (one lane per output row) += float(dot) * (d_w * d_a[m, b]), the offset of q4_0's (8) or q5_0's (16)
// unsigned quants taken off dot first; for q4_1 and q5_1 the two products float(dot) * (d_w * d_a) and
// m_w * (d_a * float(sum_a)) are added first.
template <int FMT>
inline __m256 scale_add(__m256 acc, __m256i dot, __m256 dw, const Acts& a, int64_t m, int64_t b,
                        __m256 mw = _mm256_setzero_ps()) {
  const int64_t i = m * a.nb + b;
  if (FMT == kQ4) dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(a.s8[i]));
  if (FMT == kQ50) dot = _mm256_add_epi32(dot, _mm256_set1_epi32(a.start[2][i]));
  const __m256 s = _mm256_mul_ps(dw, _mm256_set1_ps(a.d[i]));
  __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), s);
  if (has_m<FMT>()) p = _mm256_add_ps(p, _mm256_mul_ps(mw, _mm256_set1_ps(a.das[i])));
  return _mm256_add_ps(acc, p);
}

// 32 bits -> 32 bytes, byte i 0x10 where bit i is set: the fifth bits of q5_0's and q5_1's quants. Each byte gets
// its bit's byte of the word (a shuffle within 128-bit lanes, every dword holding the word), then compares its bit.
inline __m256i fifth_bits(uint32_t bits) {
  const __m256i which = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                         2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  const __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), which), bit);
  return _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(0x10));
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
// against 512 bytes ahead in each row stream and against no software prefetch, it reads faster than both; into
// L1 instead of L2, or two tiles ahead, is no better (docs/performance.md); the 256-value types' VNNI tile, which
// works on one row at a time, prefetches into L1 (HINT), a piece per row (qlinear_k.cpp).
template <int FMT, int ROWS = kTile, _mm_hint HINT = _MM_HINT_T1>
struct NextTile {
  static constexpr int64_t kStep = ROWS * block_bytes<FMT>();       // bytes of the tile per block step
  static constexpr int kLines = (kStep + 63) / 64;                    // covers [p, p + kStep) with p's next
  const char* p;
  NextTile(const uint8_t* rows, int64_t row_bytes) : p((const char*)(rows + ROWS * row_bytes)) {}
  inline void step() {
    for (int i = 0; i < kLines; ++i) _mm_prefetch(p + 64 * i, HINT);
    p += kStep;
  }
  // The same step in PARTS pieces spread among other work, piece i of them; then advance().
  template <int PARTS> inline void piece(int i) const {
    constexpr int per = (kLines + PARTS - 1) / PARTS;
    for (int j = 0; j < per; ++j) _mm_prefetch(p + 64 * (per * i + j), HINT);
  }
  inline void advance() { p += kStep; }
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
    const __m256 dw = row_scales(rp, off);
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

// The nibble types (q4_0, q4_1, q5_0, q5_1, iq4_nl) with AVX2, two rows per vector: the 16 packed bytes of rows 2j
// and 2j + 1 side by side, so one mask gives elements 0..15 of both rows and a shift and a mask elements 16..31
// (q5_0 and q5_1 add their fifth bits, as 16 more); they meet the activation's halves broadcast to both lanes.
// The int16 pair sums of the two halves are added (at most 2 * 2 * 31 * 127, no overflow) before widening, and
// three horizontal additions leave the 8 rows' dots in the lane order kQ4Lanes. iq4_nl's codebook values are
// signed: their magnitudes meet the activations with the values' signs (the sign trick of q8_0), and each half is
// widened by itself (two halves of up to 2 * 127 * 127 would overflow int16).
constexpr int kQ4Lanes[kTile] = {0, 2, 4, 6, 1, 3, 5, 7};

template <int FMT, int M>
void tile_avx2_nib(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t valid, const Acts& a, float* y,
                   int64_t N) {
  constexpr int64_t BB = block_bytes<FMT>();
  constexpr int64_t QS = qs_at<FMT>();
  const uint8_t* rp[kTile];
  for (int r = 0; r < kTile; ++r) rp[r] = w + (n0 + std::min<int64_t>(r, valid - 1)) * row_bytes;
  NextTile<FMT> pf(w + n0 * row_bytes, row_bytes);
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < a.nb; ++b) {
    const int64_t off = b * BB;
    pf.step();
    auto h = [&](int r, int at) { uint16_t v; std::memcpy(&v, rp[r] + off + at, 2); return (short)v; };
    const __m256 dw = _mm256_cvtph_ps(_mm_setr_epi16(h(0, 0), h(2, 0), h(4, 0), h(6, 0), h(1, 0), h(3, 0), h(5, 0),
                                                     h(7, 0)));
    __m256 mw = _mm256_setzero_ps();
    if (has_m<FMT>())
      mw = _mm256_cvtph_ps(_mm_setr_epi16(h(0, 2), h(2, 2), h(4, 2), h(6, 2), h(1, 2), h(3, 2), h(5, 2), h(7, 2)));
    __m256i lo[kTile / 2], hi[kTile / 2], slo[kTile / 2], shi[kTile / 2];
    for (int j = 0; j < kTile / 2; ++j) {
      const __m256i v = _mm256_loadu2_m128i((const __m128i*)(rp[2 * j + 1] + off + QS),
                                            (const __m128i*)(rp[2 * j] + off + QS));
      lo[j] = _mm256_and_si256(v, mask);
      hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
      if (has_qh<FMT>()) {     // lo: elements 0..15 of row 2j, then of row 2j + 1; hi: elements 16..31
        uint32_t qa, qb;
        std::memcpy(&qa, rp[2 * j] + off + qh_at<FMT>(), 4);
        std::memcpy(&qb, rp[2 * j + 1] + off + qh_at<FMT>(), 4);
        lo[j] = _mm256_or_si256(lo[j], fifth_bits((qa & 0xFFFFu) | (qb << 16)));
        hi[j] = _mm256_or_si256(hi[j], fifth_bits((qa >> 16) | (qb & 0xFFFF0000u)));
      }
      if (FMT == kIQ4NL) {
        const __m256i values = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)kIQ4Values));
        const __m256i mags = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)kIQ4Abs));
        slo[j] = _mm256_shuffle_epi8(values, lo[j]);
        shi[j] = _mm256_shuffle_epi8(values, hi[j]);
        lo[j] = _mm256_shuffle_epi8(mags, lo[j]);
        hi[j] = _mm256_shuffle_epi8(mags, hi[j]);
      }
    }
    for (int m = 0; m < M; ++m) {
      const int8_t* aq = a.q + m * a.K + b * QK;
      const __m256i alo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)aq));
      const __m256i ahi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(aq + 16)));
      __m256i p[kTile / 2];
      for (int j = 0; j < kTile / 2; ++j) {
        if (FMT == kIQ4NL)
          p[j] = _mm256_add_epi32(
              _mm256_madd_epi16(_mm256_maddubs_epi16(lo[j], _mm256_sign_epi8(alo, slo[j])), ones),
              _mm256_madd_epi16(_mm256_maddubs_epi16(hi[j], _mm256_sign_epi8(ahi, shi[j])), ones));
        else
          p[j] = _mm256_madd_epi16(
              _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], alo), _mm256_maddubs_epi16(hi[j], ahi)), ones);
      }
      const __m256i dot = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
      acc[m] = scale_add<FMT>(acc[m], dot, dw, a, m, b, mw);
    }
  }
  for (int m = 0; m < M; ++m) {
    alignas(32) float out[kTile];
    _mm256_store_ps(out, acc[m]);
    for (int l = 0; l < kTile; ++l)
      if (kQ4Lanes[l] < valid) y[m * N + n0 + kQ4Lanes[l]] = out[l];
  }
}

// The VNNI tile: 16 weight rows, one block at a time, the rows transposed in registers so that no horizontal sum
// is needed. A row's block is 8 groups of 4 quants (q8_0: 32 bytes; q4_0: 16 bytes whose low nibbles are groups
// 0..3 and high nibbles groups 4..7). The block's 16 rows are loaded and transposed so that vector j holds group j
// of every row (int32 lane r = row r): one _mm512_dpbusd_epi32 of vector j against group j of the activation block,
// broadcast to every lane, adds 4 products to each of the 16 rows' dots, and after 8 of them the 16 block dots sit
// in one vector, lane r = row r, to be scaled and added in one go with scale_add's arithmetic (so the bits are the
// AVX2 tiles'). The transposition is paid once per block and shared by the M activation rows; each row then costs
// 8 dpbusd and 6 other operations for 16 outputs, where the 8-row tile spent about 4 shuffles and scalings per
// dpbusd on the per-block horizontal sums, so that at 8 rows it was compute-bound (docs/performance.md).
// dpbusd multiplies unsigned by signed bytes: q4_0's nibbles are unsigned already (w + 8), q8_0's quants are made
// unsigned (w + 128, an exclusive or of the sign bit), and each dot starts from -8 or -128 times the activation
// block's sum (Acts::start, broadcast from memory), which leaves it exactly the sum of w * a.
//
// Built with SIROCCO_VNNI_EMULATION (a test-only build, tests/test_quant_kernels.py) the operations of namespace
// v512 are scalar code following Intel's definitions, so that the tile's data flow can be checked on CPUs without
// AVX-512; normally they are the AVX-512 instructions.
constexpr int kTileVnni = 16;

#ifndef SIROCCO_VNNI_EMULATION
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
namespace v512 {
using vec = __m512i;
using fvec = __m512;
// The tile's 16 row pointers (rows past the end repeat the last valid one) and their offsets from the first, as
// int32 lanes for the gather of the scales.
struct Rows16 {
  const uint8_t* rp[kTileVnni];
  vec offsets;
  VNNI_TARGET Rows16(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t valid) {
    alignas(64) int32_t o[kTileVnni];
    for (int r = 0; r < kTileVnni; ++r) {
      rp[r] = w + (n0 + std::min<int64_t>(r, valid - 1)) * row_bytes;
      o[r] = (int32_t)(rp[r] - rp[0]);
    }
    offsets = _mm512_load_si512((const void*)o);
  }
};
VNNI_TARGET inline vec zero() { return _mm512_setzero_si512(); }
VNNI_TARGET inline vec add(vec x, vec y) { return _mm512_add_epi32(x, y); }
VNNI_TARGET inline vec bcast(const int32_t* p) { return _mm512_set1_epi32(*p); }
// the 4 bytes at p in every int32 lane
VNNI_TARGET inline vec bcast4(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
// per int32 lane, acc + the sum of 4 products of unsigned u and signed s bytes
VNNI_TARGET inline vec dpbusd(vec acc, vec u, vec s) { return _mm512_dpbusd_epi32(acc, u, s); }
// The 16 rows' fp16 scales at offset off of each row, as fp32 (lane r = row r).
VNNI_TARGET inline fvec scales(const Rows16& rows, int64_t off) {
  const vec g = _mm512_i32gather_epi32(rows.offsets, (const void*)(rows.rp[0] + off), 1);
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
}
// In-lane steps of the transpositions: per 128-bit lane, {x0 y0 x1 y1}, {x2 y2 x3 y3}; then {x0 x1 y0 y1} style.
VNNI_TARGET inline void unpack32(vec x, vec y, vec& lo, vec& hi) {
  lo = _mm512_unpacklo_epi32(x, y); hi = _mm512_unpackhi_epi32(x, y);
}
VNNI_TARGET inline void unpack64(vec x, vec y, vec& lo, vec& hi) {
  lo = _mm512_unpacklo_epi64(x, y); hi = _mm512_unpackhi_epi64(x, y);
}
// q8_0: g[j] lane r = quants 4j..4j+3 of row r (the 32 bytes at rp[r] + off) + 128.
VNNI_TARGET inline void q8_groups(const Rows16& rows, int64_t off, vec* g) {
  vec v[8], t[8], s[8];
  for (int i = 0; i < 8; ++i)         // 256-bit halves: row i, row i + 8
    v[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(rows.rp[i] + off))),
                              _mm256_loadu_si256((const __m256i*)(rows.rp[i + 8] + off)), 1);
  // an 8 x 8 transposition of int32 lanes in each 256-bit half: within 128-bit lanes first, which leaves s[x]
  // (x < 4) with group x of rows 0..3 | group 4 + x of rows 0..3 | group x of rows 8..11 | group 4 + x of rows
  // 8..11, and s[4 + x] the same for rows 4..7 and 12..15; then whole 128-bit lanes are interleaved.
  for (int i = 0; i < 8; i += 2) unpack32(v[i], v[i + 1], t[i], t[i + 1]);
  for (int h = 0; h < 8; h += 4) {
    unpack64(t[h], t[h + 2], s[h], s[h + 1]);
    unpack64(t[h + 1], t[h + 3], s[h + 2], s[h + 3]);
  }
  const vec first = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0), second = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
  const vec flip = _mm512_set1_epi8((char)0x80);
  for (int x = 0; x < 4; ++x) {
    g[x] = _mm512_xor_si512(_mm512_permutex2var_epi64(s[x], first, s[4 + x]), flip);
    g[4 + x] = _mm512_xor_si512(_mm512_permutex2var_epi64(s[x], second, s[4 + x]), flip);
  }
}
// q4_0: g[j] lane r = nibbles of row r's 16 packed bytes at rp[r] + off: j < 4 the low nibbles of bytes 4j..4j+3
// (elements 4j..4j+3), j >= 4 the high nibbles of bytes 4(j-4).. (elements 16 + 4(j-4)..).
VNNI_TARGET inline void q4_groups(const Rows16& rows, int64_t off, vec* g) {
  vec v[4], t[4], o[4];
  auto row = [&](int r) { return _mm_loadu_si128((const __m128i*)(rows.rp[r] + off)); };
  for (int i = 0; i < 4; ++i)         // 128-bit lanes: rows i, 4 + i, 8 + i, 12 + i
    v[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(row(4 + i), row(i))),
                              _mm256_set_m128i(row(12 + i), row(8 + i)), 1);
  // a 4 x 4 transposition within 128-bit lanes: lane L of o[j] = group j of rows 4L .. 4L + 3
  unpack32(v[0], v[1], t[0], t[1]);
  unpack32(v[2], v[3], t[2], t[3]);
  unpack64(t[0], t[2], o[0], o[1]);
  unpack64(t[1], t[3], o[2], o[3]);
  const vec mask = _mm512_set1_epi8(0x0F);
  for (int j = 0; j < 4; ++j) {
    g[j] = _mm512_and_si512(o[j], mask);
    g[4 + j] = _mm512_and_si512(_mm512_srli_epi16(o[j], 4), mask);
  }
}
VNNI_TARGET inline fvec fzero() { return _mm512_setzero_ps(); }
// acc + float(dot) * (dw * da), lane by lane: scale_add's arithmetic on 16 lanes
VNNI_TARGET inline fvec scale_add(fvec acc, vec dot, fvec dw, float da) {
  const fvec s = _mm512_mul_ps(dw, _mm512_set1_ps(da));
  return _mm512_add_ps(acc, _mm512_mul_ps(_mm512_cvtepi32_ps(dot), s));
}
VNNI_TARGET inline void store(fvec v, float* out) { _mm512_storeu_ps(out, v); }
// --- Operations of the other tiles (the 32-value types' extra steps, and qlinear_k.cpp), each one instruction:
// loads (64 bytes; 32 bytes into both halves; 16 bytes into all four 128-bit lanes), zero extension of a 256-bit
// value, a 128-bit value in all four lanes, constants, bitwise and shift operations (per 16-bit lane, by a constant or by each lane's count), the
// three-input bitwise function (vpternlogd: bit = imm[4 a + 2 b + c]), byte shuffles within 128-bit lanes, word
// and dword permutations across the vector, u8 x s8 pair products (vpmaddubsw), int16 pair products accumulated
// into int32 (vpdpwssd), a byte test into a mask and a masked byte addition, 128-bit lane shuffles, a gather of 32
// bits from each row.
VNNI_TARGET inline vec loadu(const void* p) { return _mm512_loadu_si512(p); }
VNNI_TARGET inline vec load_x2(const void* p) { return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)p)); }
VNNI_TARGET inline vec load_x4(const void* p) { return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)p)); }
VNNI_TARGET inline vec from256(__m256i v) { return _mm512_zextsi256_si512(v); }
VNNI_TARGET inline vec bcast128(__m128i v) { return _mm512_broadcast_i32x4(v); }
VNNI_TARGET inline vec from128x4(__m128i a, __m128i b, __m128i c, __m128i d) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(b, a)), _mm256_set_m128i(d, c), 1);
}
VNNI_TARGET inline vec set1_8(int v) { return _mm512_set1_epi8((char)v); }
VNNI_TARGET inline vec set1_32(int v) { return _mm512_set1_epi32(v); }
VNNI_TARGET inline vec and_(vec a, vec b) { return _mm512_and_si512(a, b); }
VNNI_TARGET inline vec sub32(vec a, vec b) { return _mm512_sub_epi32(a, b); }
VNNI_TARGET inline vec mullo32(vec a, vec b) { return _mm512_mullo_epi32(a, b); }
template <int N> VNNI_TARGET inline vec srli16(vec a) { return _mm512_srli_epi16(a, N); }
VNNI_TARGET inline vec srlv16(vec a, vec n) { return _mm512_srlv_epi16(a, n); }
VNNI_TARGET inline vec sllv16(vec a, vec n) { return _mm512_sllv_epi16(a, n); }
template <int IMM> VNNI_TARGET inline vec ternlog(vec a, vec b, vec c) { return _mm512_ternarylogic_epi32(a, b, c, IMM); }
VNNI_TARGET inline vec shuffle8(vec table, vec idx) { return _mm512_shuffle_epi8(table, idx); }
VNNI_TARGET inline vec permw(vec idx, vec table) { return _mm512_permutexvar_epi16(idx, table); }
VNNI_TARGET inline vec permd(vec idx, vec table) { return _mm512_permutexvar_epi32(idx, table); }
VNNI_TARGET inline vec maddubs(vec u, vec s) { return _mm512_maddubs_epi16(u, s); }
VNNI_TARGET inline vec dpwssd(vec acc, vec a, vec b) { return _mm512_dpwssd_epi32(acc, a, b); }
VNNI_TARGET inline uint64_t test8(vec a, vec b) { return _mm512_test_epi8_mask(a, b); }
VNNI_TARGET inline vec mask_add8(vec src, uint64_t k, vec a, vec b) { return _mm512_mask_add_epi8(src, k, a, b); }
template <int IMM> VNNI_TARGET inline vec shuf128(vec a, vec b) { return _mm512_shuffle_i32x4(a, b, IMM); }
// lane r = the 32 bits at rp[r] + off
VNNI_TARGET inline vec gather32(const Rows16& rows, int64_t off) {
  return _mm512_i32gather_epi32(rows.offsets, (const void*)(rows.rp[0] + off), 1);
}
// the fp16 in the low / high 16 bits of each lane, as fp32
VNNI_TARGET inline fvec half_lo(vec g) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g)); }
VNNI_TARGET inline fvec half_hi(vec g) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16))); }
// acc + (float(dot) * (dw * da) + mw * das): q4_1's and q5_1's arithmetic (scale_add on 8 lanes) on 16 lanes
VNNI_TARGET inline fvec scale_add_m(fvec acc, vec dot, fvec dw, float da, fvec mw, float das) {
  const fvec p = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, _mm512_set1_ps(da)));
  return _mm512_add_ps(acc, _mm512_add_ps(p, _mm512_mul_ps(mw, _mm512_set1_ps(das))));
}
// acc + (float(isum) * (dw * da) - float(msum) * (dmin * da)): the K types with mins (qlinear_k.cpp)
VNNI_TARGET inline fvec scale_add_min(fvec acc, vec isum, fvec dw, float da, vec msum, fvec dmin) {
  const fvec p = _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, _mm512_set1_ps(da)));
  const fvec q = _mm512_mul_ps(_mm512_cvtepi32_ps(msum), _mm512_mul_ps(dmin, _mm512_set1_ps(da)));
  return _mm512_add_ps(acc, _mm512_sub_ps(p, q));
}
// --- Operations of the interleaved tiles (qlinear_x16.cpp): 16 fp16 at p as fp32; 16 uint16 at p zero-extended to
// int32 lanes; shifts of 32-bit lanes by a constant (logical, arithmetic) and of 16-bit lanes (left, arithmetic
// right); a subtraction of 16-bit lanes; a 64-bit mask read from memory.
VNNI_TARGET inline fvec halves(const void* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
VNNI_TARGET inline vec words32(const void* p) { return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)); }
template <int N> VNNI_TARGET inline vec srli32(vec a) { return _mm512_srli_epi32(a, N); }
template <int N> VNNI_TARGET inline vec slli32(vec a) { return _mm512_slli_epi32(a, N); }
template <int N> VNNI_TARGET inline vec srai32(vec a) { return _mm512_srai_epi32(a, N); }
template <int N> VNNI_TARGET inline vec slli16(vec a) { return _mm512_slli_epi16(a, N); }
template <int N> VNNI_TARGET inline vec srai16(vec a) { return _mm512_srai_epi16(a, N); }
VNNI_TARGET inline vec sub16(vec a, vec b) { return _mm512_sub_epi16(a, b); }
inline uint64_t mask_at(const void* p) { uint64_t k; std::memcpy(&k, p, 8); return k; }
}  // namespace v512
#else
#define VNNI_TARGET
namespace v512 {
struct vec { int32_t l[16]; };
struct fvec { float f[16]; };
struct Rows16 {
  const uint8_t* rp[kTileVnni];
  Rows16(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t valid) {
    for (int r = 0; r < kTileVnni; ++r) rp[r] = w + (n0 + std::min<int64_t>(r, valid - 1)) * row_bytes;
  }
};
inline vec zero() { vec v; std::memset(v.l, 0, sizeof v.l); return v; }
inline vec add(vec x, const vec& y) { for (int i = 0; i < 16; ++i) x.l[i] += y.l[i]; return x; }
inline vec bcast4(const int8_t* p) { vec v; for (auto& x : v.l) std::memcpy(&x, p, 4); return v; }
inline vec bcast(const int32_t* p) { vec v; for (auto& x : v.l) x = *p; return v; }
inline vec dpbusd(vec acc, const vec& u, const vec& s) {   // _mm512_dpbusd_epi32
  const uint8_t* ub = (const uint8_t*)u.l;
  const int8_t* sb = (const int8_t*)s.l;
  for (int j = 0; j < 16; ++j)
    for (int i = 4 * j; i < 4 * j + 4; ++i) acc.l[j] += (int32_t)ub[i] * (int32_t)sb[i];
  return acc;
}
inline fvec scales(const Rows16& rows, int64_t off) {
  fvec v;
  for (int r = 0; r < 16; ++r) { uint16_t h; std::memcpy(&h, rows.rp[r] + off, 2); v.f[r] = _cvtsh_ss(h); }
  return v;
}
inline void q8_groups(const Rows16& rows, int64_t off, vec* g) {
  for (int j = 0; j < 8; ++j)
    for (int r = 0; r < 16; ++r) {
      uint8_t b[4];
      for (int i = 0; i < 4; ++i) b[i] = rows.rp[r][off + 4 * j + i] ^ 0x80;
      std::memcpy(&g[j].l[r], b, 4);
    }
}
inline void q4_groups(const Rows16& rows, int64_t off, vec* g) {
  for (int j = 0; j < 4; ++j)
    for (int r = 0; r < 16; ++r) {
      uint8_t lo[4], hi[4];
      for (int i = 0; i < 4; ++i) {
        lo[i] = rows.rp[r][off + 4 * j + i] & 0x0F;
        hi[i] = rows.rp[r][off + 4 * j + i] >> 4;
      }
      std::memcpy(&g[j].l[r], lo, 4);
      std::memcpy(&g[4 + j].l[r], hi, 4);
    }
}
inline fvec fzero() { fvec v; for (auto& x : v.f) x = 0.0f; return v; }
inline fvec scale_add(fvec acc, const vec& dot, const fvec& dw, float da) {
  for (int r = 0; r < 16; ++r) {
    const float s = dw.f[r] * da;
    acc.f[r] = acc.f[r] + (float)dot.l[r] * s;
  }
  return acc;
}
inline void store(const fvec& v, float* out) { std::memcpy(out, v.f, sizeof v.f); }
// The other tiles' operations (see the AVX-512 definitions above), byte by byte, word by word, lane by lane.
inline uint8_t& byte(vec& v, int i) { return ((uint8_t*)v.l)[i]; }
inline uint8_t byte(const vec& v, int i) { return ((const uint8_t*)v.l)[i]; }
inline int16_t word(const vec& v, int i) { int16_t x; std::memcpy(&x, (const char*)v.l + 2 * i, 2); return x; }
inline void set_word(vec& v, int i, int x) { const int16_t w = (int16_t)x; std::memcpy((char*)v.l + 2 * i, &w, 2); }
inline vec loadu(const void* p) { vec v; std::memcpy(v.l, p, 64); return v; }
inline vec load_x2(const void* p) { vec v; std::memcpy(v.l, p, 32); std::memcpy(v.l + 8, p, 32); return v; }
inline vec load_x4(const void* p) { vec v; for (int i = 0; i < 4; ++i) std::memcpy(v.l + 4 * i, p, 16); return v; }
inline vec from256(__m256i x) { vec v = zero(); std::memcpy(v.l, &x, 32); return v; }
inline vec bcast128(__m128i x) { vec v; for (int i = 0; i < 4; ++i) std::memcpy(v.l + 4 * i, &x, 16); return v; }
inline vec from128x4(__m128i a, __m128i b, __m128i c, __m128i d) {
  vec v;
  std::memcpy(v.l, &a, 16); std::memcpy(v.l + 4, &b, 16); std::memcpy(v.l + 8, &c, 16); std::memcpy(v.l + 12, &d, 16);
  return v;
}
inline vec set1_8(int c) { vec v; std::memset(v.l, c & 0xFF, 64); return v; }
inline vec set1_32(int c) { vec v; for (auto& x : v.l) x = c; return v; }
inline vec and_(vec a, const vec& b) { for (int i = 0; i < 16; ++i) a.l[i] &= b.l[i]; return a; }
inline vec sub32(vec a, const vec& b) { for (int i = 0; i < 16; ++i) a.l[i] -= b.l[i]; return a; }
inline vec mullo32(vec a, const vec& b) {
  for (int i = 0; i < 16; ++i) a.l[i] = (int32_t)((uint32_t)a.l[i] * (uint32_t)b.l[i]);
  return a;
}
template <int N> inline vec srli16(vec a) {
  for (int i = 0; i < 32; ++i) set_word(a, i, (uint16_t)word(a, i) >> N);
  return a;
}
inline vec srlv16(vec a, const vec& n) {
  for (int i = 0; i < 32; ++i) { const int c = (uint16_t)word(n, i); set_word(a, i, c > 15 ? 0 : (uint16_t)word(a, i) >> c); }
  return a;
}
inline vec sllv16(vec a, const vec& n) {
  for (int i = 0; i < 32; ++i) { const int c = (uint16_t)word(n, i); set_word(a, i, c > 15 ? 0 : (uint16_t)word(a, i) << c); }
  return a;
}
template <int IMM> inline vec ternlog(const vec& a, const vec& b, const vec& c) {
  vec r;
  for (int i = 0; i < 16; ++i) {
    uint32_t out = 0;
    for (int k = 0; k < 32; ++k) {
      const int idx = (((uint32_t)a.l[i] >> k) & 1) << 2 | (((uint32_t)b.l[i] >> k) & 1) << 1 | (((uint32_t)c.l[i] >> k) & 1);
      out |= (uint32_t)((IMM >> idx) & 1) << k;
    }
    r.l[i] = (int32_t)out;
  }
  return r;
}
inline vec shuffle8(const vec& table, const vec& idx) {
  vec r;
  for (int i = 0; i < 64; ++i) {
    const uint8_t k = byte(idx, i);
    byte(r, i) = (k & 0x80) ? 0 : byte(table, (i & ~15) | (k & 15));
  }
  return r;
}
inline vec permw(const vec& idx, const vec& table) {
  vec r;
  for (int i = 0; i < 32; ++i) set_word(r, i, word(table, word(idx, i) & 31));
  return r;
}
inline vec permd(const vec& idx, const vec& table) {
  vec r;
  for (int i = 0; i < 16; ++i) r.l[i] = table.l[idx.l[i] & 15];
  return r;
}
inline vec maddubs(const vec& u, const vec& s) {   // saturated to int16
  vec r;
  for (int i = 0; i < 32; ++i) {
    const int v = (int)byte(u, 2 * i) * (int8_t)byte(s, 2 * i) + (int)byte(u, 2 * i + 1) * (int8_t)byte(s, 2 * i + 1);
    set_word(r, i, std::max(-32768, std::min(32767, v)));
  }
  return r;
}
inline vec dpwssd(vec acc, const vec& a, const vec& b) {
  for (int j = 0; j < 16; ++j)
    acc.l[j] = (int32_t)((uint32_t)acc.l[j] +
                         (uint32_t)((int64_t)word(a, 2 * j) * word(b, 2 * j) + (int64_t)word(a, 2 * j + 1) * word(b, 2 * j + 1)));
  return acc;
}
inline uint64_t test8(const vec& a, const vec& b) {
  uint64_t k = 0;
  for (int i = 0; i < 64; ++i) k |= (uint64_t)((byte(a, i) & byte(b, i)) != 0) << i;
  return k;
}
inline vec mask_add8(vec src, uint64_t k, const vec& a, const vec& b) {
  for (int i = 0; i < 64; ++i)
    if ((k >> i) & 1) byte(src, i) = (uint8_t)(byte(a, i) + byte(b, i));
  return src;
}
inline void unpack32(const vec& x, const vec& y, vec& lo, vec& hi) {
  vec l, h;
  for (int L = 0; L < 4; ++L) {
    const int b = 4 * L;
    l.l[b] = x.l[b]; l.l[b + 1] = y.l[b]; l.l[b + 2] = x.l[b + 1]; l.l[b + 3] = y.l[b + 1];
    h.l[b] = x.l[b + 2]; h.l[b + 1] = y.l[b + 2]; h.l[b + 2] = x.l[b + 3]; h.l[b + 3] = y.l[b + 3];
  }
  lo = l; hi = h;
}
inline void unpack64(const vec& x, const vec& y, vec& lo, vec& hi) {
  vec l, h;
  for (int L = 0; L < 4; ++L) {
    const int b = 4 * L;
    l.l[b] = x.l[b]; l.l[b + 1] = x.l[b + 1]; l.l[b + 2] = y.l[b]; l.l[b + 3] = y.l[b + 1];
    h.l[b] = x.l[b + 2]; h.l[b + 1] = x.l[b + 3]; h.l[b + 2] = y.l[b + 2]; h.l[b + 3] = y.l[b + 3];
  }
  lo = l; hi = h;
}
template <int IMM> inline vec shuf128(const vec& a, const vec& b) {
  vec r;
  const int sel[4] = {IMM & 3, (IMM >> 2) & 3, (IMM >> 4) & 3, (IMM >> 6) & 3};
  for (int L = 0; L < 4; ++L) std::memcpy(r.l + 4 * L, (L < 2 ? a : b).l + 4 * sel[L], 16);
  return r;
}
inline vec gather32(const Rows16& rows, int64_t off) {
  vec v;
  for (int r = 0; r < 16; ++r) std::memcpy(&v.l[r], rows.rp[r] + off, 4);
  return v;
}
inline fvec half_lo(const vec& g) { fvec v; for (int r = 0; r < 16; ++r) v.f[r] = _cvtsh_ss((uint16_t)g.l[r]); return v; }
inline fvec half_hi(const vec& g) {
  fvec v;
  for (int r = 0; r < 16; ++r) v.f[r] = _cvtsh_ss((uint16_t)((uint32_t)g.l[r] >> 16));
  return v;
}
inline fvec scale_add_m(fvec acc, const vec& dot, const fvec& dw, float da, const fvec& mw, float das) {
  for (int r = 0; r < 16; ++r) {
    const float p = (float)dot.l[r] * (dw.f[r] * da), q = mw.f[r] * das;
    acc.f[r] = acc.f[r] + (p + q);
  }
  return acc;
}
inline fvec scale_add_min(fvec acc, const vec& isum, const fvec& dw, float da, const vec& msum, const fvec& dmin) {
  for (int r = 0; r < 16; ++r) {
    const float p = (float)isum.l[r] * (dw.f[r] * da), q = (float)msum.l[r] * (dmin.f[r] * da);
    acc.f[r] = acc.f[r] + (p - q);
  }
  return acc;
}
inline fvec halves(const void* p) {
  fvec v;
  for (int r = 0; r < 16; ++r) { uint16_t h; std::memcpy(&h, (const char*)p + 2 * r, 2); v.f[r] = _cvtsh_ss(h); }
  return v;
}
inline vec words32(const void* p) {
  vec v;
  for (int r = 0; r < 16; ++r) { uint16_t h; std::memcpy(&h, (const char*)p + 2 * r, 2); v.l[r] = h; }
  return v;
}
template <int N> inline vec srli32(vec a) { for (auto& x : a.l) x = (int32_t)((uint32_t)x >> N); return a; }
template <int N> inline vec slli32(vec a) { for (auto& x : a.l) x = (int32_t)((uint32_t)x << N); return a; }
template <int N> inline vec srai32(vec a) { for (auto& x : a.l) x >>= N; return a; }
template <int N> inline vec slli16(vec a) {
  for (int i = 0; i < 32; ++i) set_word(a, i, (uint16_t)((uint16_t)word(a, i) << N));
  return a;
}
template <int N> inline vec srai16(vec a) { for (int i = 0; i < 32; ++i) set_word(a, i, word(a, i) >> N); return a; }
inline vec sub16(vec a, const vec& b) { for (int i = 0; i < 32; ++i) set_word(a, i, word(a, i) - word(b, i)); return a; }
inline uint64_t mask_at(const void* p) { uint64_t k; std::memcpy(&k, p, 8); return k; }
}  // namespace v512
#endif

namespace v512 {
// A 64-byte constant made of byte(i) for i = 0..63.
template <typename F> VNNI_TARGET inline vec bytes(F byte) {
  alignas(64) uint8_t t[64];
  for (int i = 0; i < 64; ++i) t[i] = (uint8_t)byte(i);
  return loadu(t);
}
// lane r = the sum of the 16 lanes of p[r], r = 0..15: pairs of rows interleaved and added within 128-bit lanes
// (two steps: lane 4L + j of u[i] holds 128-bit lane L's sum of row 4i + j), then the four 128-bit lanes of each
// u[i] added and put in place by two steps of 128-bit lane shuffles.
VNNI_TARGET inline vec reduce16(const vec* p) {
  vec t[8], u[4];
  for (int i = 0; i < 8; ++i) {
    vec lo, hi;
    unpack32(p[2 * i], p[2 * i + 1], lo, hi);
    t[i] = add(lo, hi);
  }
  for (int i = 0; i < 4; ++i) {
    vec lo, hi;
    unpack64(t[2 * i], t[2 * i + 1], lo, hi);
    u[i] = add(lo, hi);
  }
  const vec s01 = add(shuf128<0x88>(u[0], u[1]), shuf128<0xDD>(u[0], u[1]));   // lanes 0+1, 2+3 of u0, u1
  const vec s23 = add(shuf128<0x88>(u[2], u[3]), shuf128<0xDD>(u[2], u[3]));
  return add(shuf128<0x88>(s01, s23), shuf128<0xDD>(s01, s23));
}
// lane r = the sum of the four int32 in 128-bit lane r % 4 of v[r / 4] (four rows per vector, one per 128-bit
// lane): the same two in-lane steps leave lane 4L + i = row 4i + L, and a permutation puts row r in lane r.
VNNI_TARGET inline vec reduce_rows4(const vec* v) {
  vec lo, hi, a, b, c;
  unpack32(v[0], v[1], lo, hi);
  a = add(lo, hi);
  unpack32(v[2], v[3], lo, hi);
  b = add(lo, hi);
  unpack64(a, b, lo, hi);
  c = add(lo, hi);
  return permd(bytes([](int i) { const int lane = i / 4; return i % 4 ? 0 : 4 * (lane % 4) + lane / 4; }), c);
}
// q5_0 / q5_1: g[j] (q4_groups: lane r = elements 4j..4j+3 of row r) += 16 where the element's fifth bit is set,
// from qh (lane r = row r's 32 fifth bits): each byte of lane r gets byte j / 2 of qh (a shuffle), then tests its
// bit 4 (j % 2) + (byte index % 4).
VNNI_TARGET inline void fifth_bits(vec qh, vec* g) {
  const vec sixteen = set1_8(16);
  for (int j = 0; j < 8; ++j) {
    const vec spread = shuffle8(qh, bytes([j](int i) { return 4 * ((i % 16) / 4) + j / 2; }));
    const uint64_t k = test8(spread, bytes([j](int i) { return 1 << (4 * (j % 2) + i % 4); }));
    g[j] = mask_add8(g[j], k, g[j], sixteen);
  }
}
}  // namespace v512

// Outputs y[m, n0 .. n0 + valid) (valid <= 16) for the M activation rows.
template <int FMT, int M>
VNNI_TARGET void tile_vnni(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t valid, const Acts& a,
                           float* y, int64_t N) {
  constexpr int64_t BB = block_bytes<FMT>();
  const v512::Rows16 rows(w, row_bytes, n0, valid);
  NextTile<FMT, kTileVnni> pf(w + n0 * row_bytes, row_bytes);
  v512::fvec acc[M];
  for (int m = 0; m < M; ++m) acc[m] = v512::fzero();
  for (int64_t b = 0; b < a.nb; ++b) {
    const int64_t off = b * BB;
    pf.step();
    v512::fvec dw, mw;
    if (has_m<FMT>()) {
      const v512::vec h = v512::gather32(rows, off);          // d, then m
      dw = v512::half_lo(h);
      mw = v512::half_hi(h);
    } else {
      dw = v512::scales(rows, off);
    }
    v512::vec g[8];                    // g[j] pairs with the activation's quants 4j .. 4j + 3
    if (FMT == kQ8) v512::q8_groups(rows, off + 2, g);
    else v512::q4_groups(rows, off + qs_at<FMT>(), g);
    if (has_qh<FMT>()) v512::fifth_bits(v512::gather32(rows, off + qh_at<FMT>()), g);
    if (FMT == kIQ4NL) {               // the codebook's values + 128, unsigned for dpbusd
      const v512::vec values = v512::load_x4(kIQ4Plus128);
      for (int j = 0; j < 8; ++j) g[j] = v512::shuffle8(values, g[j]);
    }
    // where each dot starts: minus the activation block's sum times the weights' offset (128, 8, 16), or 0
    constexpr int start = FMT == kQ8 || FMT == kIQ4NL ? 0 : FMT == kQ4 ? 1 : FMT == kQ50 ? 2 : -1;
    for (int m = 0; m < M; ++m) {
      const int64_t i = m * a.nb + b;
      const int8_t* aq = a.q + m * a.K + b * QK;
      // two chains of dpbusd where few rows are in flight, so that their latency is hidden
      v512::vec d0 = start >= 0 ? v512::bcast(a.start[start >= 0 ? start : 0] + i) : v512::zero(), d1 = v512::zero();
      for (int j = 0; j < 8; j += 2) {
        d0 = v512::dpbusd(d0, g[j], v512::bcast4(aq + 4 * j));
        if (M <= 2) d1 = v512::dpbusd(d1, g[j + 1], v512::bcast4(aq + 4 * j + 4));
        else d0 = v512::dpbusd(d0, g[j + 1], v512::bcast4(aq + 4 * j + 4));
      }
      const v512::vec dot = M <= 2 ? v512::add(d0, d1) : d0;
      if (has_m<FMT>()) acc[m] = v512::scale_add_m(acc[m], dot, dw, a.d[i], mw, a.das[i]);
      else acc[m] = v512::scale_add(acc[m], dot, dw, a.d[i]);
    }
  }
  for (int m = 0; m < M; ++m) {
    alignas(64) float out[kTileVnni];
    v512::store(acc[m], out);
    for (int r = 0; r < valid; ++r) y[m * N + n0 + r] = out[r];
  }
}

// Output rows per tile: 16 for the VNNI tile, 8 for the AVX2 ones. The VNNI tile gathers its scales at int32
// offsets of up to 15 rows, so a weight's rows must be short enough for that (K up to about 130 million).
inline int64_t tile_rows(bool vnni, int64_t row_bytes) {
  TORCH_CHECK(kTileVnni * row_bytes < INT32_MAX, "quantized kernels: rows of ", row_bytes, " bytes are too long");
  return vnni ? kTileVnni : kTile;
}

using TileFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, const Acts&, float*, int64_t);

template <int FMT, int M>
TileFn tile_32(bool vnni) {
  if (vnni) return tile_vnni<FMT, M>;
  if constexpr (FMT == kQ8) return tile_avx2<kQ8, M>;
  else return tile_avx2_nib<FMT, M>;
}

// The tile of a 32-value type for M activation rows.
template <int FMT>
TileFn pick(int64_t M, bool vnni) {
#define SIROCCO_CASE(m) \
  case m: return tile_32<FMT, m>(vnni);
  switch (M) {
    SIROCCO_CASE(1) SIROCCO_CASE(2) SIROCCO_CASE(3) SIROCCO_CASE(4)
    SIROCCO_CASE(5) SIROCCO_CASE(6) SIROCCO_CASE(7) SIROCCO_CASE(8)
  }
#undef SIROCCO_CASE
  return nullptr;
}

// The activations' sums the interleaved K tiles take in pairs (two int16 in an int32, the first in the low half),
// for blocks of 256 (S blocks in all): q4_K and q5_K, sums of 32 (b32) as (0, 2), (1, 3), (4, 6), (5, 7), the order
// in which those tiles hold their mins; q2_K, q3_K and q6_K, sums of 16 (b16) as (4i, 4i + 2), (4i + 1, 4i + 3)
// for i = 0..3; 8 pairs per block, unused ones 0.
inline void sum_pairs(int fmt, const int16_t* b16, const int16_t* b32, int64_t S, int32_t* out) {
  auto pair = [](int16_t lo, int16_t hi) { return (int32_t)((uint32_t)(uint16_t)lo | (uint32_t)(uint16_t)hi << 16); };
  for (int64_t s = 0; s < S; ++s) {
    int32_t* o = out + 8 * s;
    std::memset(o, 0, 8 * sizeof(int32_t));
    if (fmt == kQ4K || fmt == kQ5K) {
      const int16_t* b = b32 + 8 * s;
      o[0] = pair(b[0], b[2]); o[1] = pair(b[1], b[3]); o[2] = pair(b[4], b[6]); o[3] = pair(b[5], b[7]);
    } else if (fmt == kQ2K || fmt == kQ3K || fmt == kQ6K) {
      const int16_t* b = b16 + 16 * s;
      for (int i = 0; i < 4; ++i) {
        o[2 * i] = pair(b[4 * i], b[4 * i + 2]);
        o[2 * i + 1] = pair(b[4 * i + 1], b[4 * i + 3]);
      }
    }
  }
}

// Rows x (M, K) quantized as the kernel of format fmt takes them (quantize_row per row), in buffers it keeps alive:
// blocks of 32 with their sums for the 32-value types; blocks of 256 with the sums of each 16 and 32 quants for
// the others, the quants then put in the order of the tile that reads them (activation_order, kChunkOrder).
struct QuantizedRows {
  torch::Tensor q, d, ints, floats, sums;
  Acts acts;
  template <typename T>
  QuantizedRows(const T* x, int64_t M, int64_t K, const torch::TensorOptions& options, int64_t fmt, bool vnni,
                bool inter = false) {
    q = torch::empty({M * K + 64}, options.dtype(torch::kInt8));    // + 64: room for a 512-bit load
    int8_t* qp = q.data_ptr<int8_t>();
    if (!is_super(fmt)) {
      const int64_t nb = K / QK;
      d = torch::empty({M * nb}, options.dtype(torch::kFloat));
      ints = torch::empty({4, M * nb}, options.dtype(torch::kInt));    // s8, then the three starts: one allocation
      floats = torch::empty({M * nb}, options.dtype(torch::kFloat));
      float *dp = d.data_ptr<float>(), *das = floats.data_ptr<float>();
      int32_t *s = ints.data_ptr<int32_t>(), *q8 = s + M * nb, *q4 = q8 + M * nb, *q5 = q4 + M * nb;
      for (int64_t m = 0; m < M; ++m) quantize_row<QK>(x + m * K, K, qp + m * K, dp + m * nb, s + m * nb);
      for (int64_t i = 0; i < M * nb; ++i) {
        q8[i] = -16 * s[i]; q4[i] = -s[i]; q5[i] = -2 * s[i];
        das[i] = dp[i] * (float)(s[i] / 8);
      }
      acts = Acts{qp, dp, s, {q8, q4, q5}, das, nullptr, nullptr, K, nb};
    } else {
      const int64_t nb = K / QKK;
      d = torch::empty({M * nb}, options.dtype(torch::kFloat));
      sums = torch::empty({M * (K / 16 + K / 32)}, options.dtype(torch::kShort));
      float* dp = d.data_ptr<float>();
      int16_t *b16 = sums.data_ptr<int16_t>(), *b32 = b16 + M * K / 16;
      const int order = inter ? 0 : activation_order((int)fmt, vnni);
      torch::Tensor natural = order ? torch::empty({M * K}, options.dtype(torch::kInt8)) : q;
      int8_t* np = natural.data_ptr<int8_t>();
      for (int64_t m = 0; m < M; ++m) {
        quantize_row<QKK>(x + m * K, K, np + m * K, dp + m * nb, nullptr);
        sums16(np + m * K, K, b16 + m * K / 16);
      }
      for (int64_t i = 0; i < M * K / 32; ++i) b32[i] = (int16_t)(b16[2 * i] + b16[2 * i + 1]);
      if (order)
        for (int64_t c = 0; c < M * K / 16; ++c)        // chunk c of 16 bytes: chunk (c % 16) of its block of 256
          std::memcpy(qp + 16 * c, np + 16 * (c - c % 16 + kChunkOrder[order][c % 16]), 16);
      acts = Acts{qp, dp, nullptr, {nullptr, nullptr, nullptr}, nullptr, b16, b32, K, nb};
      if (inter) {
        pairs_ = torch::empty({M * nb * 8}, options.dtype(torch::kInt));
        sum_pairs((int)fmt, b16, b32, M * nb, pairs_.data_ptr<int32_t>());
        acts.pairs = pairs_.data_ptr<int32_t>();
      }
    }
  }
  torch::Tensor pairs_;
  // The activation rows from row m on.
  Acts from(int64_t m) const {
    auto at = [m](auto* p, int64_t per_row) { return p ? p + m * per_row : p; };
    const Acts& a = acts;
    return Acts{at(a.q, a.K), at(a.d, a.nb), at(a.s8, a.nb), {at(a.start[0], a.nb), at(a.start[1], a.nb),
                at(a.start[2], a.nb)}, at(a.das, a.nb), at(a.bsum, a.K / 16), at(a.bsum32, a.K / 32), a.K, a.nb,
                at(a.pairs, 8 * a.nb)};
  }
};

// The tile of format fmt for M activation rows (qlinear_k.cpp, after the 256-value types' tiles), and the tile of
// the interleaved layout (qlinear_x16.cpp; AVX512-VNNI only).
TileFn pick_tile(int64_t fmt, int64_t M, bool vnni);
TileFn pick_tile_x16(int64_t fmt, int64_t M);
inline TileFn pick_tile(int64_t fmt, int64_t M, bool vnni, bool inter) {
  return inter ? pick_tile_x16(fmt, M) : pick_tile(fmt, M, vnni);
}

// Checks of the interleaved layout where it is asked for (layout 1; 0 is the file's): only the VNNI path reads it,
// and only weights of a multiple of 16 rows have it.
inline bool interleaved(int64_t layout, bool vnni, int64_t rows, const char* who) {
  TORCH_CHECK(layout == 0 || layout == 1, who, ": unknown layout code ", layout, " (0 file, 1 interleaved)");
  if (layout == 0) return false;
  TORCH_CHECK(vnni, who, ": the interleaved layout is read by the AVX512-VNNI path only");
  TORCH_CHECK(rows % 16 == 0, who, ": interleaved weights have a multiple of 16 rows, got ", rows);
  return true;
}

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

// (q int8 (M, K), d fp32 (M, K / block)): the activation quantization the kernels use, in blocks of 32 or 256,
// the quants in natural order; for tests and references.
std::vector<torch::Tensor> quantize_activations(torch::Tensor x, int64_t block) {
  TORCH_CHECK(block == QK || block == QKK, "quantize_activations: blocks of 32 or 256, got ", block);
  TORCH_CHECK(x.dim() == 2 && x.size(1) % block == 0, "quantize_activations: expected (M, K), K a multiple of ",
              block, ", got ", x.sizes());
  auto xf = x.to(torch::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), nb = K / block;
  auto q = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto d = torch::empty({M, nb}, x.options().dtype(torch::kFloat));
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = xf.data_ptr<float>() + m * K;
    int8_t* qr = q.data_ptr<int8_t>() + m * K;
    float* dr = d.data_ptr<float>() + m * nb;
    if (block == QK) quantize_row<QK>(xr, K, qr, dr, nullptr);
    else quantize_row<QKK>(xr, K, qr, dr, nullptr);
  }
  return {q, d};
}

// ys[i] (M, N_i) in x's dtype = x (M, K) times weight i of N_i rows of K / values blocks in format fmt (a code of
// blocks.h): the projections that share an input (a layer's wq, wk, wv; w1, w3) in one call. The rows are quantized
// once for all the weights and the tiles of every weight are shared out over the threads in one parallel region
// (one wake-up of the threads instead of one per weight); each output is computed by the same tile as in a call
// with its weight alone, so its bits are the same. isa: 0 the best this CPU runs, 1 AVX2, 2 AVX512-VNNI (an error
// where the CPU lacks it).
std::vector<torch::Tensor> qlinear_many_layout(torch::Tensor x, std::vector<torch::Tensor> ws, int64_t fmt, int64_t isa,
                                               int64_t layout) {
  check_format(fmt, "qlinear");
  TORCH_CHECK(x.dim() == 2 && !ws.empty(), "qlinear: expected x (M, K) and at least one weight, got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t bb = kBlockBytes[fmt], V = block_values((int)fmt);
  TORCH_CHECK(M >= 1 && M <= 8, "qlinear: 1 to 8 rows, got ", M);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "qlinear: fp32 or bf16 rows, got ",
              x.scalar_type());
  for (const auto& w : ws) {
    TORCH_CHECK(w.dim() == 2 && K % V == 0 && w.size(1) == K / V * bb, "qlinear: x ", x.sizes(),
                " does not match packed ", kNames[fmt], " w ", w.sizes(), " (K a multiple of ", V, ", ", bb,
                " bytes per block)");
    TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.device().is_cpu() && x.device().is_cpu(),
                "qlinear: contiguous uint8 CPU weight blocks and CPU rows only");
  }
  const bool has_vnni = cpu_has_vnni();
  TORCH_CHECK(isa != 2 || has_vnni, "qlinear: this CPU has no AVX512-VNNI");
  const bool vnni = isa == 2 || (isa == 0 && has_vnni);
  bool inter = false;
  for (const auto& w : ws) inter = interleaved(layout, vnni, w.size(0), "qlinear");

  // bf16 rows are read and written as they are (no conversion ops around the call: a decode step makes several
  // of these calls per layer, and each extra op costs more than the conversion itself).
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  auto xc = x.contiguous();
  const QuantizedRows rows = bf16 ? QuantizedRows(xc.data_ptr<at::BFloat16>(), M, K, x.options(), fmt, vnni, inter)
                                  : QuantizedRows(xc.data_ptr<float>(), M, K, x.options(), fmt, vnni, inter);
  const Acts& a = rows.acts;
  const TileFn tile = pick_tile(fmt, M, vnni, inter);
  const int64_t row_bytes = K / V * bb, rows_per_tile = tile_rows(vnni, row_bytes);

  // Weight i's tiles are tiles first[i] .. first[i + 1] - 1 of the call.
  const size_t n_w = ws.size();
  std::vector<int64_t> first(n_w + 1, 0), Ns(n_w);
  std::vector<torch::Tensor> yfs, ys;
  std::vector<const uint8_t*> wps(n_w);
  std::vector<float*> yps(n_w);
  std::vector<at::BFloat16*> ybs(n_w, nullptr);
  for (size_t i = 0; i < n_w; ++i) {
    Ns[i] = ws[i].size(0);
    first[i + 1] = first[i] + (Ns[i] + rows_per_tile - 1) / rows_per_tile;
    yfs.push_back(torch::empty({M, Ns[i]}, x.options().dtype(torch::kFloat)));
    ys.push_back(bf16 ? torch::empty({M, Ns[i]}, x.options()) : yfs.back());
    wps[i] = ws[i].data_ptr<uint8_t>();
    yps[i] = yfs[i].data_ptr<float>();
    if (bf16) ybs[i] = ys[i].data_ptr<at::BFloat16>();
  }
  // Grain: about 64 KiB of weights per task, so that small matrices do not pay for waking a second thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / (rows_per_tile * row_bytes));
  at::parallel_for(0, first[n_w], grain, [&](int64_t t0, int64_t t1) {
    size_t i = 0;
    for (int64_t t = t0; t < t1; ++t) {
      while (t >= first[i + 1]) ++i;
      const int64_t N = Ns[i], n0 = (t - first[i]) * rows_per_tile;
      const int64_t valid = std::min<int64_t>(rows_per_tile, N - n0);
      float* yp = yps[i];
      tile(wps[i], row_bytes, n0, valid, a, yp, N);
      if (at::BFloat16* yb = ybs[i])      // rounded to nearest even, as .to(torch.bfloat16)
        for (int64_t m = 0; m < M; ++m)
          for (int64_t r = 0; r < valid; ++r) yb[m * N + n0 + r] = at::BFloat16(yp[m * N + n0 + r]);
    }
  });
  return ys;
}

// The same over weights in the file's layout (qlinear_many_layout's layout 0).
std::vector<torch::Tensor> qlinear_many(torch::Tensor x, std::vector<torch::Tensor> ws, int64_t fmt, int64_t isa) {
  return qlinear_many_layout(x, ws, fmt, isa, 0);
}

// y (M, N) in x's dtype = x (M, K) times one weight of N rows: qlinear_many with that weight alone (layout 0: the
// file's; 1: interleaved, interleave.py).
torch::Tensor qlinear_layout(torch::Tensor x, torch::Tensor w, int64_t fmt, int64_t isa, int64_t layout) {
  return qlinear_many_layout(x, {w}, fmt, isa, layout)[0];
}
torch::Tensor qlinear(torch::Tensor x, torch::Tensor w, int64_t fmt, int64_t isa) {
  return qlinear_layout(x, w, fmt, isa, 0);
}
