// Decode tiles of the 256-value types: q2_K, q3_K, q4_K, q5_K, q6_K (llama.cpp's K-quants) and iq4_xs, and the
// dispatch of every type's tile (pick_tile). Read after qlinear.cpp (Acts, NextTile, reduce8, row_scales, the
// v512 operations), in one translation unit (kernels.py).
//
// The activation rows come quantized in blocks of 256 (QuantizedRows: an fp32 scale d_a per block, int8 quants in
// the tile's order, int16 sums of each 16 and each 32 quants). A weight super-block s of row n holds, per sub-block
// of 16 or 32 values, an integer scale and for some types an integer min, and one or two fp16 factors (d, dmin).
// Every output is
//
//   y[m, n] = sum over super-blocks s, in order, of   float(I) * (d[n, s] * d_a[m, s])
//                                                      [- float(Mn) * (dmin[n, s] * d_a[m, s])]
//
//   I  = sum over sub-blocks j of scale_j * (sum over the sub-block's values of q * a)      (exact, int32)
//   Mn = sum over sub-blocks j of min_j * (sum of the sub-block's activation quants)        (q2_K, q4_K, q5_K)
//
// with q the signed quant of layouts.py's integer form (q3_K's q - 4, q6_K's q - 32, iq4_xs's codebook value), the
// two products subtracted and the difference added to the accumulator, each step rounded to fp32 once, no fused
// multiply-add. I and Mn are exact integers whatever the instruction order, so both paths below give the same
// bits, an output's bits do not depend on the rows beside it, and kernels.py's definition mirrors them.
//
// The tiles work row by row: a row's super-block is unpacked into unsigned quants (0..63, or the codebook + 128)
// laid out to meet the activation quants as loaded, and its integer scales broadcast per sub-block; the products
// are u8 x s8 pairs summed to int16 (vpmaddubsw), then multiplied by the sub-block's scale and summed to int32 in
// one step (AVX2: vpmaddwd; AVX512-VNNI: vpdpwssd), so scales cost nothing per value. The offsets of the unsigned
// quants (q3_K: 4, q6_K: 32) come off as scale * the activations' sums of 16; iq4_xs (vpdpbusd per 4 values, one
// vpmulld per block of 32) takes off 128 * scale * the sums of 32. After the tile's rows, one tree of additions per
// activation row turns their partial sums into one vector (lane r = row r) for the float step. AVX2: 8 rows,
// 32 values per vector; AVX512-VNNI: 16 rows, 64 values per vector. No horizontal sum is paid per sub-block.

namespace {
namespace ktile {

template <int I, int N, typename F> inline void static_for(F&& f) {
  if constexpr (I < N) {
    f(std::integral_constant<int, I>{});
    static_for<I + 1, N>(f);
  }
}

template <int FMT> constexpr bool has_min() { return FMT == kQ2K || FMT == kQ4K || FMT == kQ5K; }
// Where the fp16 d (and dmin) of a super-block sit.
template <int FMT> constexpr int64_t d_at() {
  return FMT == kQ2K ? 80 : FMT == kQ3K ? 108 : FMT == kQ6K ? 208 : 0;
}
template <int FMT> constexpr int64_t dmin_at() { return FMT == kQ2K ? 82 : 2; }

// q4_K / q5_K: the 12 bytes of 6-bit scales and mins -> byte j of sc8 / mn8 = sub-block j's scale / min (layouts.py).
inline void k_scales(const uint8_t* s, uint64_t& sc8, uint64_t& mn8) {
  uint32_t lo, mi, hi;
  std::memcpy(&lo, s, 4); std::memcpy(&mi, s + 4, 4); std::memcpy(&hi, s + 8, 4);
  const uint32_t sc_hi = (hi & 0x0F0F0F0Fu) | ((lo >> 2) & 0x30303030u);
  const uint32_t mn_hi = ((hi >> 4) & 0x0F0F0F0Fu) | ((mi >> 2) & 0x30303030u);
  sc8 = (lo & 0x3F3F3F3Fu) | (uint64_t)sc_hi << 32;
  mn8 = (mi & 0x3F3F3F3Fu) | (uint64_t)mn_hi << 32;
}

// q3_K: the 12 bytes of sixteen 6-bit scales -> bytes of lo8 (scales 0..7) and hi8 (8..15), unsigned (scale + 32).
// Low 4 bits: scales 0..7 in the low nibbles of bytes 0..7, 8..15 in their high nibbles; high 2 bits: scale 4t + k in
// bits 2t, 2t + 1 of byte 8 + k.
inline void q3_scales(const uint8_t* s, uint64_t& lo8, uint64_t& hi8) {
  uint64_t low;
  uint32_t h;
  std::memcpy(&low, s, 8); std::memcpy(&h, s + 8, 4);
  const uint64_t h01 = (uint64_t)(h & 0x03030303u) | (uint64_t)((h >> 2) & 0x03030303u) << 32;
  const uint64_t h23 = (uint64_t)((h >> 4) & 0x03030303u) | (uint64_t)((h >> 6) & 0x03030303u) << 32;
  lo8 = (low & 0x0F0F0F0F0F0F0F0FULL) | h01 << 4;
  hi8 = ((low >> 4) & 0x0F0F0F0F0F0F0F0FULL) | h23 << 4;
}

// iq4_xs: byte j = block j's 6-bit scale (unsigned, scale + 32): low 4 bits from nibble j of the 4 bytes at 4, high
// 2 bits from bits 2j, 2j + 1 of the uint16 at 2, each spread over 8 bytes by three shift-or-mask steps.
inline uint64_t xs_scales(const uint8_t* blk) {
  uint16_t sh;
  uint32_t sl;
  std::memcpy(&sh, blk + 2, 2); std::memcpy(&sl, blk + 4, 4);
  uint64_t lo = sl, hi = sh;
  lo = (lo | lo << 16) & 0x0000FFFF0000FFFFULL;       // bytes b0 b1 . . b2 b3 . .
  lo = (lo | lo << 8) & 0x00FF00FF00FF00FFULL;        // b0 . b1 . b2 . b3 .
  lo = (lo | lo << 4) & 0x0F0F0F0F0F0F0F0FULL;        // nibble j in byte j
  hi = (hi | hi << 24) & 0x000000FF000000FFULL;       // fields 0..3 in byte 0, 4..7 in byte 4
  hi = (hi | hi << 12) & 0x000F000F000F000FULL;       // two fields in each of bytes 0, 2, 4, 6
  hi = (hi | hi << 6) & 0x0303030303030303ULL;        // field j in byte j
  return lo | hi << 4;
}

// ---------------------------------------------------------------------------------------------------- AVX2 (8 rows)

inline __m256i load32(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
// A vpshufb control giving every 16-bit lane of the low 128-bit lane word a, of the high one word b (of each lane).
inline __m256i words(int a, int b) {
  return _mm256_setr_m128i(_mm_set1_epi16((short)(2 * a | (2 * a + 1) << 8)),
                           _mm_set1_epi16((short)(2 * b | (2 * b + 1) << 8)));
}
// Bit FROM of each byte moved to bit TO, the other bits cleared (shifts of 16-bit lanes: what crosses between
// the two bytes of a lane lands on other bits, cleared by the mask).
template <int FROM, int TO> inline __m256i move_bit(__m256i v) {
  __m256i t = v;
  if constexpr (FROM < TO) t = _mm256_slli_epi16(v, TO - FROM);
  if constexpr (FROM > TO) t = _mm256_srli_epi16(v, FROM - TO);
  return _mm256_and_si256(t, _mm256_set1_epi8((char)(1 << TO)));
}
// 16 pairs of u8 q x s8 activation products summed to int16, times the int16 scales and summed in pairs to int32
// (at most 2 * 2 * 127 * 127 * 128 in magnitude).
inline __m256i scaled_dot(__m256i q, __m256i act, __m256i sc) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(q, act), sc);
}
// lane r = the sum of the 4 int32 of p[r], r = 0..7
inline __m256i reduce8x4(const __m128i* p) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(_mm256_set_m128i(p[1], p[0]), _mm256_set_m128i(p[3], p[2])),
                                      _mm256_hadd_epi32(_mm256_set_m128i(p[5], p[4]), _mm256_set_m128i(p[7], p[6])));
  return _mm256_permutevar8x32_epi32(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));   // rows 0 2 4 6 | 1 3 5 7
}

// One row's super-block s against the M activation rows: part[m] (8 int32 summing to I) and, for the types with
// mins, mins[m] (4 int32 summing to Mn).
template <int FMT, int M>
inline void row_avx2(const uint8_t* blk, const Acts& a, int64_t s, __m256i* part, __m128i* mins) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  auto act = [&](int m, int at) { return load32(a.q + m * a.K + s * QKK + at); };
  auto sums16 = [&](int m) { return load32(a.bsum + m * (a.K / 16) + 16 * s); };
  auto sums32 = [&](int m) { return _mm_loadu_si128((const __m128i*)(a.bsum32 + m * (a.K / 32) + 8 * s)); };
  if constexpr (FMT == kQ4K || FMT == kQ5K) {
    // 32-byte group j of the quants: low nibbles sub-block 2j, high nibbles 2j + 1 (q5_K: fifth bits 2j, 2j + 1
    // of the 32 qh bytes)
    uint64_t sc8, mn8;
    k_scales(blk + 4, sc8, mn8);
    const __m256i sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)sc8)));
    const __m128i mn = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)mn8));
    const uint8_t* qs = blk + (FMT == kQ5K ? 48 : 16);
    const __m256i qh = FMT == kQ5K ? load32(blk + 16) : _mm256_setzero_si256();
    for (int m = 0; m < M; ++m) {
      part[m] = _mm256_setzero_si256();
      mins[m] = _mm_madd_epi16(mn, sums32(m));
    }
    static_for<0, 4>([&](auto jc) {
      constexpr int j = decltype(jc)::value;
      const __m256i v = load32(qs + 32 * j);
      __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      if constexpr (FMT == kQ5K) {
        lo = _mm256_or_si256(lo, move_bit<2 * j, 4>(qh));
        hi = _mm256_or_si256(hi, move_bit<2 * j + 1, 4>(qh));
      }
      const __m256i s0 = _mm256_shuffle_epi8(sc, words(2 * j, 2 * j)), s1 = _mm256_shuffle_epi8(sc, words(2 * j + 1, 2 * j + 1));
      for (int m = 0; m < M; ++m)
        part[m] = _mm256_add_epi32(part[m], _mm256_add_epi32(scaled_dot(lo, act(m, 64 * j), s0),
                                                             scaled_dot(hi, act(m, 64 * j + 32), s1)));
    });
  } else if constexpr (FMT == kQ6K) {
    // half h (128 values): low nibbles of ql bytes 64h + 0..63, then their high nibbles, the top two bits from
    // bits 0-1, 2-3, 4-5, 6-7 of qh bytes 32h + 0..31 for the four groups of 32
    const __m256i sc = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(blk + 192)));   // s0..7 | s8..15
    const __m256i off = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(sc, 5));   // -32 * scale
    for (int m = 0; m < M; ++m) part[m] = _mm256_madd_epi16(off, sums16(m));
    const __m256i top = _mm256_set1_epi8(0x30);
    static_for<0, 2>([&](auto hc) {
      constexpr int h = decltype(hc)::value;
      const __m256i half = _mm256_permute2x128_si256(sc, sc, h ? 0x11 : 0x00);
      const __m256i A = load32(blk + 64 * h), B = load32(blk + 64 * h + 32), H = load32(blk + 128 + 32 * h);
      const __m256i c[4] = {
          _mm256_or_si256(_mm256_and_si256(A, low4), _mm256_and_si256(_mm256_slli_epi16(H, 4), top)),
          _mm256_or_si256(_mm256_and_si256(B, low4), _mm256_and_si256(_mm256_slli_epi16(H, 2), top)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(A, 4), low4), _mm256_and_si256(H, top)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(B, 4), low4),
                          _mm256_and_si256(_mm256_srli_epi16(H, 2), top))};
      for (int t = 0; t < 4; ++t) {
        const __m256i st = _mm256_shuffle_epi8(half, words(2 * t, 2 * t + 1));
        for (int m = 0; m < M; ++m)
          part[m] = _mm256_add_epi32(part[m], scaled_dot(c[t], act(m, 128 * h + 32 * t), st));
      }
    });
  } else if constexpr (FMT == kQ3K) {
    // half h: plane t (bits 2t, 2t + 1 of qs bytes 32 + 32h + 0..31) is values 128h + 32t + 0..31, their third
    // bit bit 4h + t of the hmask bytes
    uint64_t lo8, hi8;
    q3_scales(blk + 96, lo8, hi8);
    const __m256i sc = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_set_epi64x((long long)hi8, (long long)lo8)),
                                        _mm256_set1_epi16(32));
    const __m256i off = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(sc, 2));   // -4 * scale
    for (int m = 0; m < M; ++m) part[m] = _mm256_madd_epi16(off, sums16(m));
    const __m256i hm = load32(blk), three = _mm256_set1_epi8(3);
    static_for<0, 2>([&](auto hc) {
      constexpr int h = decltype(hc)::value;
      const __m256i half = _mm256_permute2x128_si256(sc, sc, h ? 0x11 : 0x00);
      const __m256i q = load32(blk + 32 + 32 * h);
      static_for<0, 4>([&](auto tc) {
        constexpr int t = decltype(tc)::value;
        const __m256i c = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 2 * t), three),
                                          move_bit<4 * h + t, 2>(hm));
        const __m256i st = _mm256_shuffle_epi8(half, words(2 * t, 2 * t + 1));
        for (int m = 0; m < M; ++m)
          part[m] = _mm256_add_epi32(part[m], scaled_dot(c, act(m, 128 * h + 32 * t), st));
      });
    });
  } else if constexpr (FMT == kQ2K) {
    // as q3_K's planes, 2 bits only; scale and min of sub-block j in the low and high nibble of byte j
    const __m128i raw = _mm_loadu_si128((const __m128i*)blk);
    const __m128i nib = _mm_set1_epi8(0x0F);
    const __m256i sc = _mm256_cvtepu8_epi16(_mm_and_si128(raw, nib));
    const __m256i mn = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), nib));
    for (int m = 0; m < M; ++m) {
      const __m256i p = _mm256_madd_epi16(mn, sums16(m));
      mins[m] = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
      part[m] = _mm256_setzero_si256();
    }
    const __m256i three = _mm256_set1_epi8(3);
    static_for<0, 2>([&](auto hc) {
      constexpr int h = decltype(hc)::value;
      const __m256i half = _mm256_permute2x128_si256(sc, sc, h ? 0x11 : 0x00);
      const __m256i q = load32(blk + 16 + 32 * h);
      static_for<0, 4>([&](auto tc) {
        constexpr int t = decltype(tc)::value;
        const __m256i c = _mm256_and_si256(_mm256_srli_epi16(q, 2 * t), three);
        const __m256i st = _mm256_shuffle_epi8(half, words(2 * t, 2 * t + 1));
        for (int m = 0; m < M; ++m)
          part[m] = _mm256_add_epi32(part[m], scaled_dot(c, act(m, 128 * h + 32 * t), st));
      });
    });
  } else {
    static_assert(FMT == kIQ4XS, "a 256-value type");
    // 32 quant bytes = blocks 2p, 2p + 1: low nibbles their values 0..15, high nibbles 16..31, met by the
    // activations in that order (activation_order 2); codebook values signed: magnitudes times signed activations
    const __m256i sc = _mm256_broadcastsi128_si256(
        _mm_sub_epi16(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)xs_scales(blk))), _mm_set1_epi16(32)));
    const __m256i values = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)kIQ4Values));
    const __m256i mags = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)kIQ4Abs));
    for (int m = 0; m < M; ++m) part[m] = _mm256_setzero_si256();
    for (int p = 0; p < 4; ++p) {
      const __m256i v = load32(blk + 8 + 32 * p);
      const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      const __m256i slo = _mm256_shuffle_epi8(values, lo), shi = _mm256_shuffle_epi8(values, hi);
      const __m256i mlo = _mm256_shuffle_epi8(mags, lo), mhi = _mm256_shuffle_epi8(mags, hi);
      const __m256i sp = _mm256_shuffle_epi8(sc, words(2 * p, 2 * p + 1));
      for (int m = 0; m < M; ++m)
        part[m] = _mm256_add_epi32(
            part[m], _mm256_add_epi32(scaled_dot(mlo, _mm256_sign_epi8(act(m, 64 * p), slo), sp),
                                      scaled_dot(mhi, _mm256_sign_epi8(act(m, 64 * p + 32), shi), sp)));
    }
  }
}

template <int FMT, int M>
void tile_k_avx2(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t valid, const Acts& a, float* y,
                 int64_t N) {
  constexpr int64_t BB = block_bytes<FMT>();
  const uint8_t* rp[kTile];
  for (int r = 0; r < kTile; ++r) rp[r] = w + (n0 + std::min<int64_t>(r, valid - 1)) * row_bytes;
  NextTile<FMT> pf(w + n0 * row_bytes, row_bytes);
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t s = 0; s < a.nb; ++s) {
    pf.step();
    __m256i part[M][kTile];
    __m128i mins[M][kTile];
    for (int r = 0; r < kTile; ++r) {
      __m256i pr[M];
      __m128i mr[M];
      row_avx2<FMT, M>(rp[r] + s * BB, a, s, pr, mr);
      for (int m = 0; m < M; ++m) {
        part[m][r] = pr[m];
        if (has_min<FMT>()) mins[m][r] = mr[m];
      }
    }
    const __m256 dw = row_scales(rp, s * BB + d_at<FMT>());
    const __m256 dmin = has_min<FMT>() ? row_scales(rp, s * BB + dmin_at<FMT>()) : _mm256_setzero_ps();
    for (int m = 0; m < M; ++m) {
      const __m256 da = _mm256_set1_ps(a.d[m * a.nb + s]);
      __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(reduce8(part[m])), _mm256_mul_ps(dw, da));
      if (has_min<FMT>())
        p = _mm256_sub_ps(p, _mm256_mul_ps(_mm256_cvtepi32_ps(reduce8x4(mins[m])), _mm256_mul_ps(dmin, da)));
      acc[m] = _mm256_add_ps(acc[m], p);
    }
  }
  for (int m = 0; m < M; ++m) {
    alignas(32) float out[kTile];
    _mm256_store_ps(out, acc[m]);
    for (int r = 0; r < valid; ++r) y[m * N + n0 + r] = out[r];
  }
}

// -------------------------------------------------------------------------------------------- AVX512-VNNI (16 rows)

// The constants of a type's 512-bit row step, made once per tile.
struct Consts512 {
  v512::vec low4, three, four, sixteen, top2, table;
  v512::vec scale_words[4];     // vpshufb / vpermw controls placing each sub-block's scale over its values
  v512::vec shifts[2];          // per-16-bit-lane shift counts of the two halves
  v512::vec bits[2][2];         // per-byte bit masks of the two halves
  VNNI_TARGET explicit Consts512(int fmt) {
    using v512::bytes;
    low4 = v512::set1_8(0x0F); three = v512::set1_8(3); four = v512::set1_8(4); sixteen = v512::set1_8(16);
    top2 = v512::set1_8(0x30);
    table = v512::load_x4(kIQ4Plus128);
    if (fmt == kQ4K || fmt == kQ5K) {
      // chunk c of 64 quants: sub-blocks (0, 2), (1, 3), (4, 6), (5, 7) in its two halves; the scales are 8
      // int16 repeated in each 128-bit lane, so a vpshufb picks them
      const int sub[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};
      for (int c = 0; c < 4; ++c) {
        scale_words[c] = bytes([&](int i) { return 2 * sub[c][i / 32] + i % 2; });
        bits[c / 2][c % 2] = bytes([&](int i) { return 1 << sub[c][i / 32]; });
      }
    } else {
      // chunk k of 64 values: sub-blocks 4k .. 4k + 3 of 16, one per 128-bit lane (vpermw over the 16 scales)
      for (int k = 0; k < 4; ++k) scale_words[k] = bytes([&](int i) { return i % 2 ? 0 : 4 * k + i / 16; });
      if (fmt == kQ6K) {            // left shifts 4 | 2 and right shifts 0 | 2 of the halves (see row_vnni)
        shifts[0] = bytes([](int i) { return i % 2 ? 0 : i < 32 ? 4 : 2; });
        shifts[1] = bytes([](int i) { return i % 2 ? 0 : i < 32 ? 0 : 2; });
      } else {                      // right shifts 4u | 4u + 2: planes 2u and 2u + 1
        for (int u = 0; u < 2; ++u) shifts[u] = bytes([&](int i) { return i % 2 ? 0 : 4 * u + (i < 32 ? 0 : 2); });
        for (int h = 0; h < 2; ++h)
          for (int u = 0; u < 2; ++u) bits[h][u] = bytes([&](int i) { return 1 << (4 * h + 2 * u + (i < 32 ? 0 : 1)); });
      }
    }
    if (fmt == kIQ4XS)              // dword lane i: block i / 4 of the first half, 4 + i / 4 of the second
      for (int g = 0; g < 2; ++g) shifts[g] = bytes([&](int i) { return i % 4 ? 0 : 4 * g + i / 16; });
  }
};

// One row's super-block s against the M activation rows: part[m] (16 int32 summing to I) and, for the types with
// mins, mins[m] (4 int32 summing to Mn).
template <int FMT, int M>
VNNI_TARGET inline void row_vnni(const uint8_t* blk, const Acts& a, int64_t s, const Consts512& k, v512::vec* part,
                                 __m128i* mins) {
  using namespace v512;
  auto act = [&](int m, int at) { return loadu(a.q + m * a.K + s * QKK + at); };
  auto sums16 = [&](int m) { return _mm256_loadu_si256((const __m256i*)(a.bsum + m * (a.K / 16) + 16 * s)); };
  auto sums32 = [&](int m) { return _mm_loadu_si128((const __m128i*)(a.bsum32 + m * (a.K / 32) + 8 * s)); };
  if constexpr (FMT == kQ4K || FMT == kQ5K) {
    // 64 quant bytes at a time: low nibbles sub-blocks (2j, 2j + 2) of 32, high nibbles (2j + 1, 2j + 3), met by
    // the activations in that order (activation_order 1)
    uint64_t sc8, mn8;
    k_scales(blk + 4, sc8, mn8);
    const __m128i sc16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)sc8));
    const vec sc = bcast128(sc16);
    const __m128i mn = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)mn8));
    const uint8_t* qs = blk + (FMT == kQ5K ? 48 : 16);
    const vec v0 = loadu(qs), v1 = loadu(qs + 64);
    vec q[4] = {and_(v0, k.low4), and_(srli16<4>(v0), k.low4), and_(v1, k.low4), and_(srli16<4>(v1), k.low4)};
    if constexpr (FMT == kQ5K) {
      const vec qh = load_x2(blk + 16);
      for (int c = 0; c < 4; ++c) q[c] = mask_add8(q[c], test8(qh, k.bits[c / 2][c % 2]), q[c], k.sixteen);
    }
    vec sw[4];
    for (int c = 0; c < 4; ++c) sw[c] = shuffle8(sc, k.scale_words[c]);
    for (int m = 0; m < M; ++m) {
      vec t = zero();
      for (int c = 0; c < 4; ++c) t = dpwssd(t, maddubs(q[c], act(m, 64 * c)), sw[c]);
      part[m] = t;
      mins[m] = _mm_madd_epi16(mn, sums32(m));
    }
  } else if constexpr (FMT == kQ6K) {
    // half h: ql bytes 64h + 0..63, low nibbles values 128h + 0..63 with qh bits 0-1 | 2-3, high nibbles values
    // 128h + 64..127 with qh bits 4-5 | 6-7 (the 32 qh bytes in both 256-bit halves, shifted to bits 4-5)
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(blk + 192)));
    const vec sc = from256(sc16);
    const vec off = from256(_mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(sc16, 5)));
    vec sw[4];
    for (int c = 0; c < 4; ++c) sw[c] = permw(k.scale_words[c], sc);
    vec z[4];
    for (int h = 0; h < 2; ++h) {
      const vec ql = loadu(blk + 64 * h), qh = load_x2(blk + 128 + 32 * h);
      z[2 * h] = ternlog<0xEC>(ql, and_(sllv16(qh, k.shifts[0]), k.top2), k.low4);            // (a & c) | b
      z[2 * h + 1] = ternlog<0xEC>(srli16<4>(ql), and_(srlv16(qh, k.shifts[1]), k.top2), k.low4);
    }
    for (int m = 0; m < M; ++m) {
      vec t = dpwssd(zero(), off, from256(sums16(m)));
      for (int c = 0; c < 4; ++c) t = dpwssd(t, maddubs(z[c], act(m, 64 * c)), sw[c]);
      part[m] = t;
    }
  } else if constexpr (FMT == kQ3K || FMT == kQ2K) {
    // half h, pair u: the 32 qs bytes of the half in both 256-bit halves, shifted right by 4u | 4u + 2: planes 2u
    // and 2u + 1, values 128h + 64u + 0..63; q3_K's third bits from hmask bits 4h + 2u | 4h + 2u + 1
    __m256i sc16;
    const uint8_t* qs;
    if constexpr (FMT == kQ3K) {
      uint64_t lo8, hi8;
      q3_scales(blk + 96, lo8, hi8);
      sc16 = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_set_epi64x((long long)hi8, (long long)lo8)),
                              _mm256_set1_epi16(32));
      qs = blk + 32;
    } else {
      const __m128i raw = _mm_loadu_si128((const __m128i*)blk);
      sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(raw, _mm_set1_epi8(0x0F)));
      const __m256i mn = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F)));
      for (int m = 0; m < M; ++m) {
        const __m256i p = _mm256_madd_epi16(mn, sums16(m));
        mins[m] = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
      }
      qs = blk + 16;
    }
    const vec sc = from256(sc16);
    vec sw[4];
    for (int c = 0; c < 4; ++c) sw[c] = permw(k.scale_words[c], sc);
    vec z[4];
    const vec hm = FMT == kQ3K ? load_x2(blk) : zero();
    for (int h = 0; h < 2; ++h) {
      const vec q = load_x2(qs + 32 * h);
      for (int u = 0; u < 2; ++u) {
        vec c = and_(srlv16(q, k.shifts[u]), k.three);
        if constexpr (FMT == kQ3K) c = mask_add8(c, test8(hm, k.bits[h][u]), c, k.four);
        z[2 * h + u] = c;
      }
    }
    const vec off = FMT == kQ3K ? from256(_mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(sc16, 2)))
                                : zero();     // q3_K: -4 * scale
    for (int m = 0; m < M; ++m) {
      vec t = FMT == kQ3K ? dpwssd(zero(), off, from256(sums16(m))) : zero();
      for (int c = 0; c < 4; ++c) t = dpwssd(t, maddubs(z[c], act(m, 64 * c)), sw[c]);
      part[m] = t;
    }
  } else {
    static_assert(FMT == kIQ4XS, "a 256-value type");
    // 64 quant bytes = blocks 4g .. 4g + 3, one per 128-bit lane: low nibbles their values 0..15, high nibbles
    // 16..31 (activation_order 3); codebook + 128 as unsigned bytes, vpdpbusd per 4 values, the block's scale
    // per dword, and -128 * scale * the activations' sums of 32 to take the 128 off again
    const __m128i sc16 = _mm_sub_epi16(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)xs_scales(blk))),
                                       _mm_set1_epi16(32));
    const vec sc32 = from256(_mm256_cvtepi16_epi32(sc16));
    const vec sg[2] = {permd(k.shifts[0], sc32), permd(k.shifts[1], sc32)};
    const __m128i off = _mm_sub_epi16(_mm_setzero_si128(), _mm_slli_epi16(sc16, 7));
    vec lo[2], hi[2];
    for (int g = 0; g < 2; ++g) {
      const vec v = loadu(blk + 8 + 64 * g);
      lo[g] = shuffle8(k.table, and_(v, k.low4));
      hi[g] = shuffle8(k.table, and_(srli16<4>(v), k.low4));
    }
    for (int m = 0; m < M; ++m) {
      const __m128i z = _mm_setzero_si128();
      vec t = from128x4(_mm_madd_epi16(off, sums32(m)), z, z, z);
      for (int g = 0; g < 2; ++g)
        t = add(t, mullo32(dpbusd(dpbusd(zero(), lo[g], act(m, 128 * g)), hi[g], act(m, 128 * g + 64)), sg[g]));
      part[m] = t;
    }
  }
}

template <int FMT, int M>
VNNI_TARGET void tile_k_vnni(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t valid, const Acts& a,
                             float* y, int64_t N) {
  constexpr int64_t BB = block_bytes<FMT>();
  const v512::Rows16 rows(w, row_bytes, n0, valid);
  const Consts512 k(FMT);
  // The next tile into L1 rather than L2, a sixteenth of each step's lines before each row rather than all at
  // once: this tile works on one row at a time, a few cache lines each, and a burst of prefetches for the whole
  // step queued ahead of those rows' loads held them back (both choices measured in docs/performance.md).
  NextTile<FMT, kTileVnni, _MM_HINT_T0> pf(w + n0 * row_bytes, row_bytes);
  v512::fvec acc[M];
  for (int m = 0; m < M; ++m) acc[m] = v512::fzero();
  // d (and dmin) of the 16 rows, gathered as 32 bits that stay inside the block: at d for q2_K, q4_K, q5_K,
  // iq4_xs (d in the low half), 2 bytes before it for q3_K and q6_K, whose d ends the block (in the high half)
  constexpr bool d_last = FMT == kQ3K || FMT == kQ6K;
  constexpr int64_t gather_at = d_last ? d_at<FMT>() - 2 : d_at<FMT>();
  for (int64_t s = 0; s < a.nb; ++s) {
    v512::vec part[M][kTileVnni];
    __m128i mins[M][kTileVnni];
    for (int r = 0; r < kTileVnni; ++r) {
      pf.template piece<kTileVnni>(r);
      v512::vec pr[M];
      __m128i mr[M];
      row_vnni<FMT, M>(rows.rp[r] + s * BB, a, s, k, pr, mr);
      for (int m = 0; m < M; ++m) {
        part[m][r] = pr[m];
        if (has_min<FMT>()) mins[m][r] = mr[m];
      }
    }
    pf.advance();
    const v512::vec g = v512::gather32(rows, s * BB + gather_at);
    const v512::fvec dw = d_last ? v512::half_hi(g) : v512::half_lo(g);
    for (int m = 0; m < M; ++m) {
      const float da = a.d[m * a.nb + s];
      const v512::vec isum = v512::reduce16(part[m]);
      if constexpr (has_min<FMT>()) {
        const __m128i* mp = mins[m];
        const v512::vec mv[4] = {v512::from128x4(mp[0], mp[1], mp[2], mp[3]), v512::from128x4(mp[4], mp[5], mp[6], mp[7]),
                                 v512::from128x4(mp[8], mp[9], mp[10], mp[11]),
                                 v512::from128x4(mp[12], mp[13], mp[14], mp[15])};
        acc[m] = v512::scale_add_min(acc[m], isum, dw, da, v512::reduce_rows4(mv), v512::half_hi(g));
      } else {
        acc[m] = v512::scale_add(acc[m], isum, dw, da);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    alignas(64) float out[kTileVnni];
    v512::store(acc[m], out);
    for (int r = 0; r < valid; ++r) y[m * N + n0 + r] = out[r];
  }
}

template <int FMT>
TileFn pick(int64_t M, bool vnni) {
#define SIROCCO_CASE(m) \
  case m: return vnni ? tile_k_vnni<FMT, m> : tile_k_avx2<FMT, m>;
  switch (M) {
    SIROCCO_CASE(1) SIROCCO_CASE(2) SIROCCO_CASE(3) SIROCCO_CASE(4)
    SIROCCO_CASE(5) SIROCCO_CASE(6) SIROCCO_CASE(7) SIROCCO_CASE(8)
  }
#undef SIROCCO_CASE
  return nullptr;
}

}  // namespace ktile

TileFn pick_tile(int64_t fmt, int64_t M, bool vnni) {
  switch (fmt) {
    case kQ8: return pick<kQ8>(M, vnni);
    case kQ4: return pick<kQ4>(M, vnni);
    case kQ41: return pick<kQ41>(M, vnni);
    case kQ50: return pick<kQ50>(M, vnni);
    case kQ51: return pick<kQ51>(M, vnni);
    case kIQ4NL: return pick<kIQ4NL>(M, vnni);
    case kQ2K: return ktile::pick<kQ2K>(M, vnni);
    case kQ3K: return ktile::pick<kQ3K>(M, vnni);
    case kQ4K: return ktile::pick<kQ4K>(M, vnni);
    case kQ5K: return ktile::pick<kQ5K>(M, vnni);
    case kQ6K: return ktile::pick<kQ6K>(M, vnni);
    case kIQ4XS: return ktile::pick<kIQ4XS>(M, vnni);
  }
  return nullptr;
}

}  // namespace
