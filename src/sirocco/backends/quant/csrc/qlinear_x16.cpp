// Decode tiles over the interleaved layout (interleave.py): a weight's rows in groups of 16, each group stored block
// by block with the 16 rows' pieces side by side, so that one 64-byte load gives 4 bytes of every row (int32 lane r
// = row r) and one 32-byte load the 16 rows' fp16 scales. A tile is one group: one stream through memory, no gather,
// no transposition. Read after qlinear.cpp and qlinear_k.cpp (Acts, the v512 operations, the format constants), in
// one translation unit (kernels.py); AVX512-VNNI only (or its scalar emulation in the test build).
//
// The arithmetic is the other tiles', so the bits are theirs (qlinear.cpp for the 32-value types, qlinear_k.cpp for
// the others): an exact integer per block or super-block, then the same fp32 steps. Here the integer of a
// super-block is built as
//
//   I = sum over sub-blocks j of scale_j * dot_j   [- c * sum over j of scale_j * asum_j]
//
// dot_j the sub-block's dot product of unsigned quants (q3_K's q + 4, q6_K's q + 32, iq4_xs's codebook + 128) and
// activation quants, one vpdpbusd per 4 values of the 16 rows against those 4 activations broadcast; scale_j times
// it by vpmulld; the offset term c * scale * asum (asum the activations' sum over the sub-block, q3_K's c = 4,
// q6_K's 32) by vpdpwssd of scale pairs and activation-sum pairs (Acts::pairs), as are q2_K's, q4_K's and q5_K's
// mins. Every part is an exact int32, so I is the same integer whatever the order.
//
// Worked example, q4_K: vector 8c + t of a super-block's quants holds bytes 32c + 4t .. 32c + 4t + 3 of each row,
// whose low nibbles are values 64c + 4t .. + 3 (sub-block 2c) and high nibbles values 64c + 32 + 4t .. (sub-block
// 2c + 1); so with c = 1, t = 2 one load feeds the products of values 72..75 and 104..107 of all 16 rows.

namespace {
namespace x16 {

constexpr int64_t kGroup = 16;

// How far ahead of the block being read the group's stream is prefetched into L1, in bytes: one stream per tile,
// which the hardware prefetchers follow too (docs/performance.md, "Interleaved tiles").
#ifndef SIROCCO_X16_PREFETCH
#define SIROCCO_X16_PREFETCH 8192
#endif

// Prefetch into L1 of the group's stream at p + ahead, ahead at least one step (GB bytes); piece i
// of PARTS of those lines, so that the prefetches are spread over the step's work (a burst of them queued ahead of
// the step's own loads held those back, as in the file-layout K tiles).
template <int64_t GB, int PARTS = 1>
inline void prefetch(const uint8_t* p, int i = 0) {
  constexpr int64_t ahead = GB > SIROCCO_X16_PREFETCH ? GB : SIROCCO_X16_PREFETCH;
  constexpr int64_t lines = (GB + 63) / 64, per = (lines + PARTS - 1) / PARTS;
  if constexpr (SIROCCO_X16_PREFETCH > 0)
    for (int64_t j = per * i; j < per * i + per && j < lines; ++j)
      _mm_prefetch((const char*)p + ahead + 64 * j, _MM_HINT_T0);
}

// Where a 32-value type's parts sit in a group's block: the 16 d (0), q4_1's and q5_1's 16 m (32), q5's 8 masks of
// fifth bits, the 4 (q8_0: 8) vectors of quants.
template <int FMT> constexpr int64_t masks_at() { return has_m<FMT>() ? 64 : 32; }
template <int FMT> constexpr int64_t quants_at() { return masks_at<FMT>() + (has_qh<FMT>() ? 64 : 0); }

template <int M>
VNNI_TARGET inline void store(const v512::fvec* acc, int64_t valid, float* y, int64_t n0, int64_t N) {
  for (int m = 0; m < M; ++m) {
    alignas(64) float out[kGroup];
    v512::store(acc[m], out);
    for (int r = 0; r < valid; ++r) y[m * N + n0 + r] = out[r];
  }
}

// The 32-value types: per block, g[j] lane r = quants 4j .. 4j + 3 of row r (unsigned: q8_0's + 128, q5's fifth bits
// added as 16, iq4_nl's codebook + 128), then tile_vnni's products and float step.
template <int FMT, int M>
VNNI_TARGET void tile32(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t valid, const Acts& a, float* y,
                        int64_t N) {
  using namespace v512;
  constexpr int64_t GB = kGroup * block_bytes<FMT>();
  const uint8_t* p = w + n0 * row_bytes;
  const vec low4 = set1_8(0x0F), sixteen = set1_8(16), table = load_x4(kIQ4Plus128);
  fvec acc[M];
  for (int m = 0; m < M; ++m) acc[m] = fzero();
  for (int64_t b = 0; b < a.nb; ++b, p += GB) {
    prefetch<GB>(p);
    const fvec dw = halves(p);
    const fvec mw = has_m<FMT>() ? halves(p + 32) : fzero();
    vec g[8];
    if constexpr (FMT == kQ8) {
      for (int j = 0; j < 8; ++j) g[j] = loadu(p + 32 + 64 * j);
    } else {
      for (int j = 0; j < 4; ++j) {
        const vec v = loadu(p + quants_at<FMT>() + 64 * j);
        g[j] = and_(v, low4);
        g[4 + j] = and_(srli16<4>(v), low4);
      }
    }
    if constexpr (has_qh<FMT>())
      for (int j = 0; j < 8; ++j) g[j] = mask_add8(g[j], mask_at(p + masks_at<FMT>() + 8 * j), g[j], sixteen);
    if constexpr (FMT == kIQ4NL)
      for (int j = 0; j < 8; ++j) g[j] = shuffle8(table, g[j]);
    constexpr int start = FMT == kQ8 || FMT == kIQ4NL ? 0 : FMT == kQ4 ? 1 : FMT == kQ50 ? 2 : -1;
    for (int m = 0; m < M; ++m) {
      const int64_t i = m * a.nb + b;
      const int8_t* aq = a.q + m * a.K + b * QK;
      vec d0 = start >= 0 ? bcast(a.start[start >= 0 ? start : 0] + i) : zero(), d1 = zero();
      for (int j = 0; j < 8; j += 2) {
        d0 = dpbusd(d0, g[j], bcast4(aq + 4 * j));
        if (M <= 2) d1 = dpbusd(d1, g[j + 1], bcast4(aq + 4 * j + 4));
        else d0 = dpbusd(d0, g[j + 1], bcast4(aq + 4 * j + 4));
      }
      const vec dot = M <= 2 ? add(d0, d1) : d0;
      if constexpr (has_m<FMT>()) acc[m] = scale_add_m(acc[m], dot, dw, a.d[i], mw, a.das[i]);
      else acc[m] = scale_add(acc[m], dot, dw, a.d[i]);
    }
  }
  store<M>(acc, valid, y, n0, N);
}

// vpshufb controls putting byte k of each int32 lane into its low byte, zeros above (k = 0..3).
VNNI_TARGET inline v512::vec lane_byte(int k) {
  return v512::bytes([k](int i) { return i % 4 ? 0x80 : (i & ~3) + k; });
}

// Sign-extended int16 halves of each int32 lane as int32: the low half, the high half.
VNNI_TARGET inline v512::vec low_half(v512::vec p) { return v512::srai32<16>(v512::slli32<16>(p)); }
VNNI_TARGET inline v512::vec high_half(v512::vec p) { return v512::srai32<16>(p); }

// Sub-blocks of 16 values with int8 scales (q2_K, q3_K, q6_K): from the scale pairs P[2i] = (scale 4i, 4i + 2),
// P[2i + 1] = (4i + 1, 4i + 3), sc[j] = scale j in every int32 lane.
VNNI_TARGET inline void scales16(const v512::vec* P, v512::vec* sc) {
  for (int i = 0; i < 4; ++i) {
    sc[4 * i] = low_half(P[2 * i]);
    sc[4 * i + 1] = low_half(P[2 * i + 1]);
    sc[4 * i + 2] = high_half(P[2 * i]);
    sc[4 * i + 3] = high_half(P[2 * i + 1]);
  }
}

// sum over q < n of the int16 pairs w[q] times the activation pairs of block s (Acts::pairs): min or offset terms.
template <int n>
VNNI_TARGET inline v512::vec pair_dots(const v512::vec* w, const int32_t* pairs) {
  v512::vec t = v512::zero();
  for (int q = 0; q < n; ++q) t = v512::dpwssd(t, w[q], v512::bcast(pairs + q));
  return t;
}

// q2_K, q3_K and q6_K: value 128h + 32t + 4u + i of row r is byte 4r + i of value vector (h, t, u), sub-block
// 8h + 2t + u / 4; value<FMT, T>(p, h, u) makes vector (h, T, u) from the group's block p (unsigned quants: q3_K's
// q + 4, q6_K's q + 32).
template <int FMT, int T>
VNNI_TARGET inline v512::vec value(const uint8_t* p, int h, int u) {
  using namespace v512;
  const vec low4 = set1_8(0x0F), top2 = set1_8(0x30), three = set1_8(3), four = set1_8(4);
  if constexpr (FMT == kQ6K) {
    // 32 vectors of low nibbles at 288 (ql bytes 64h + 32 (t % 2) + 4u: nibble t / 2), 16 of high bits at 2336
    // (qh bytes 32h + 4u: bits 2t, 2t + 1), both put together by (a & c) | b
    const vec L = loadu(p + 288 + 64 * (16 * h + 8 * (T % 2) + u)), H = loadu(p + 2336 + 64 * (8 * h + u));
    vec high;
    if constexpr (T < 2) high = slli16<4 - 2 * T>(H);
    else if constexpr (T == 2) high = H;
    else high = srli16<2>(H);
    return ternlog<0xEC>(T < 2 ? L : srli16<4>(L), and_(high, top2), low4);
  } else {
    // 16 vectors of 2-bit planes (qs bytes 32h + 4u: bits 2t, 2t + 1) at 736 (q3_K) or 320 (q2_K); q3_K's high
    // bits as 64 masks at 224, mask 32h + 4u + t
    const vec Q = loadu(p + (FMT == kQ3K ? 736 : 320) + 64 * (8 * h + u));
    vec z = and_(T ? srli16<2 * T>(Q) : Q, three);
    if constexpr (FMT == kQ3K) z = mask_add8(z, mask_at(p + 224 + 8 * (32 * h + 4 * u + T)), z, four);
    return z;
  }
}

// Sub-block 8h + 2T + half for every activation row: its 4 value vectors, one dot chain per row.
template <int FMT, int M, int T>
VNNI_TARGET inline void plane(const uint8_t* p, const int8_t* aq, int64_t K, const v512::vec* sc, v512::vec* isum,
                              int h, int half) {
  using namespace v512;
  vec d[M];
  for (int m = 0; m < M; ++m) d[m] = zero();
  for (int u = 4 * half; u < 4 * half + 4; ++u) {
    const vec z = value<FMT, T>(p, h, u);
    for (int m = 0; m < M; ++m) d[m] = dpbusd(d[m], z, bcast4(aq + m * K + 128 * h + 32 * T + 4 * u));
  }
  for (int m = 0; m < M; ++m) isum[m] = add(isum[m], mullo32(d[m], sc[8 * h + 2 * T + half]));
}

// isum[m] += the sum over the super-block's 16 sub-blocks of sc[j] * dot_j. Up to 2 activation rows, the 4 value
// vectors of (h, u) are made together and 4 sub-blocks per row are open at once (4 or 8 dot chains); with more rows,
// one sub-block per row (M chains), so that the accumulators stay in registers.
template <int FMT, int M>
VNNI_TARGET inline void planes(const uint8_t* p, const int8_t* aq, int64_t K, const v512::vec* sc, v512::vec* isum) {
  using namespace v512;
  constexpr int64_t GB = kGroup * block_bytes<FMT>();
  if constexpr (M <= 2) {
    for (int h = 0; h < 2; ++h)
      for (int half = 0; half < 2; ++half) {
        vec d[M][4];
        for (int m = 0; m < M; ++m)
          for (int t = 0; t < 4; ++t) d[m][t] = zero();
        for (int u = 4 * half; u < 4 * half + 4; ++u) {
          prefetch<GB, 16>(p, 8 * h + u);
          const vec z[4] = {value<FMT, 0>(p, h, u), value<FMT, 1>(p, h, u), value<FMT, 2>(p, h, u),
                            value<FMT, 3>(p, h, u)};
          for (int m = 0; m < M; ++m)
            for (int t = 0; t < 4; ++t) d[m][t] = dpbusd(d[m][t], z[t], bcast4(aq + m * K + 128 * h + 32 * t + 4 * u));
        }
        for (int m = 0; m < M; ++m)
          for (int t = 0; t < 4; ++t) isum[m] = add(isum[m], mullo32(d[m][t], sc[8 * h + 2 * t + half]));
      }
  } else {
    for (int h = 0; h < 2; ++h)
      for (int half = 0; half < 2; ++half) {
        prefetch<GB, 4>(p, 2 * h + half);
        plane<FMT, M, 0>(p, aq, K, sc, isum, h, half);
        plane<FMT, M, 1>(p, aq, K, sc, isum, h, half);
        plane<FMT, M, 2>(p, aq, K, sc, isum, h, half);
        plane<FMT, M, 3>(p, aq, K, sc, isum, h, half);
      }
  }
}

// iq4_xs: scale j of each row (scale + 32: nibble j of the 4 scales_l bytes, bits 2j, 2j + 1 of scales_h above it)
template <int J>
VNNI_TARGET inline void xs_scale(v512::vec SL, v512::vec SH, v512::vec* sc) {
  using namespace v512;
  vec hi;
  if constexpr (2 * J < 4) hi = slli32<4 - 2 * J>(SH);
  else hi = srli32<2 * J - 4>(SH);
  sc[J] = sub32(ternlog<0xEC>(srli32<4 * J>(SL), and_(hi, set1_32(0x30)), set1_32(0x0F)), set1_32(32));
  if constexpr (J < 7) xs_scale<J + 1>(SL, SH, sc);
}

// q4_K / q5_K: the low (H = 0) or high (H = 1) nibbles of quant vector 8c + t (at 256, q5_K at 768), q5_K's fifth
// bits added as 16 (masks at 256, mask 16c + 2t + H): values 64c + 32H + 4t .. + 3 of each row, sub-block 2c + H.
template <int FMT, int H>
VNNI_TARGET inline v512::vec quants45(const uint8_t* p, int c, int t) {
  using namespace v512;
  const vec low4 = set1_8(0x0F);
  const vec v = loadu(p + (FMT == kQ5K ? 768 : 256) + 64 * (8 * c + t));
  vec q = and_(H ? srli16<4>(v) : v, low4);
  if constexpr (FMT == kQ5K) q = mask_add8(q, mask_at(p + 256 + 8 * (16 * c + 2 * t + H)), q, set1_8(16));
  return q;
}

// Sub-block 2c + H for every activation row: one dot chain per row over its 8 vectors.
template <int FMT, int M, int H>
VNNI_TARGET inline void sub45(const uint8_t* p, const int8_t* aq, int64_t K, int c, const v512::vec* sc,
                              v512::vec* isum) {
  using namespace v512;
  vec d[M];
  for (int m = 0; m < M; ++m) d[m] = zero();
  for (int t = 0; t < 8; ++t) {
    const vec q = quants45<FMT, H>(p, c, t);
    for (int m = 0; m < M; ++m) d[m] = dpbusd(d[m], q, bcast4(aq + m * K + 64 * c + 32 * H + 4 * t));
  }
  for (int m = 0; m < M; ++m) isum[m] = add(isum[m], mullo32(d[m], sc[2 * c + H]));
}

// iq4_xs: the codebook values + 128 of the low (H = 0) or high (H = 1) nibbles of index vector 4j + k (at 128):
// values 32j + 16H + 4k .. + 3 of each row.
template <int H>
VNNI_TARGET inline v512::vec xs_values(const uint8_t* p, int j, int k) {
  using namespace v512;
  const vec v = loadu(p + 128 + 64 * (4 * j + k));
  return shuffle8(load_x4(kIQ4Plus128), and_(H ? srli16<4>(v) : v, set1_8(0x0F)));
}

template <int FMT, int M>
VNNI_TARGET void tile_k(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t valid, const Acts& a, float* y,
                        int64_t N) {
  using namespace v512;
  constexpr int64_t GB = kGroup * block_bytes<FMT>();
  const uint8_t* p = w + n0 * row_bytes;
  const vec low4 = set1_8(0x0F), six = set1_8(0x3F), top2 = set1_8(0x30), three = set1_8(3), four = set1_8(4);
  const vec sixteen = set1_8(16), low_bytes = set1_32(0x00FF00FF), low_nib16 = set1_32(0x000F000F);
  const vec thirty_two16 = set1_32(0x00200020), table = load_x4(kIQ4Plus128);
  static const vec pick[4] = {lane_byte(0), lane_byte(1), lane_byte(2), lane_byte(3)};   // made once
  fvec acc[M];
  for (int m = 0; m < M; ++m) acc[m] = fzero();
  for (int64_t s = 0; s < a.nb; ++s, p += GB) {
    const fvec dw = halves(p);
    vec isum[M], msum[M];
    for (int m = 0; m < M; ++m) isum[m] = msum[m] = zero();
    const int8_t* aq = a.q + s * QKK;
    if constexpr (FMT == kQ4K || FMT == kQ5K) {
      // d 0, dmin 32, the 12 scale bytes as 3 vectors at 64, q5_K's 64 masks at 256, 32 vectors of quants
      const vec S0 = loadu(p + 64), S1 = loadu(p + 128), S2 = loadu(p + 192);
      const vec sc03 = and_(S0, six), sc47 = ternlog<0xEC>(S2, and_(srli32<2>(S0), top2), low4);   // (a & c) | b
      const vec mn03 = and_(S1, six), mn47 = ternlog<0xEC>(srli32<4>(S2), and_(srli32<2>(S1), top2), low4);
      vec sc[8];
      for (int j = 0; j < 8; ++j) sc[j] = shuffle8(j < 4 ? sc03 : sc47, pick[j % 4]);
      const vec mp[4] = {and_(mn03, low_bytes), srli16<8>(mn03), and_(mn47, low_bytes), srli16<8>(mn47)};
      for (int m = 0; m < M; ++m) msum[m] = pair_dots<4>(mp, a.pairs + (m * a.nb + s) * 8);
      for (int c = 0; c < 4; ++c) {
        if constexpr (M <= 2) {                    // the two sub-blocks of vector 8c + t together
          vec dl[M], dh[M];
          for (int m = 0; m < M; ++m) dl[m] = dh[m] = zero();
          for (int t = 0; t < 8; ++t) {
            prefetch<GB, 32>(p, 8 * c + t);
            const vec lo = quants45<FMT, 0>(p, c, t), hi = quants45<FMT, 1>(p, c, t);
            for (int m = 0; m < M; ++m) {
              const int8_t* am = aq + m * a.K + 64 * c + 4 * t;
              dl[m] = dpbusd(dl[m], lo, bcast4(am));
              dh[m] = dpbusd(dh[m], hi, bcast4(am + 32));
            }
          }
          for (int m = 0; m < M; ++m)
            isum[m] = add(isum[m], add(mullo32(dl[m], sc[2 * c]), mullo32(dh[m], sc[2 * c + 1])));
        } else {                                   // one sub-block at a time: one chain per activation row
          prefetch<GB, 4>(p, c);
          sub45<FMT, M, 0>(p, aq, a.K, c, sc, isum);
          sub45<FMT, M, 1>(p, aq, a.K, c, sc, isum);
        }
      }
      const fvec dmin = halves(p + 32);
      for (int m = 0; m < M; ++m) acc[m] = scale_add_min(acc[m], isum[m], dw, a.d[m * a.nb + s], msum[m], dmin);
    } else if constexpr (FMT == kQ6K) {
      // d 0, 16 int8 scales as 4 vectors at 32, 32 vectors of low nibbles at 288, 16 of high bits at 2336
      vec P[8];
      for (int i = 0; i < 4; ++i) {
        const vec S = loadu(p + 32 + 64 * i);
        P[2 * i] = srai16<8>(slli16<8>(S));
        P[2 * i + 1] = srai16<8>(S);
      }
      vec sc[16], off[8];
      scales16(P, sc);
      for (int q = 0; q < 8; ++q) off[q] = slli16<5>(P[q]);                        // 32 * scale
      for (int m = 0; m < M; ++m) msum[m] = pair_dots<8>(off, a.pairs + (m * a.nb + s) * 8);
      planes<kQ6K, M>(p, aq, a.K, sc, isum);
      for (int m = 0; m < M; ++m) acc[m] = scale_add(acc[m], sub32(isum[m], msum[m]), dw, a.d[m * a.nb + s]);
    } else if constexpr (FMT == kQ3K) {
      // d 0, the 12 scale bytes as 3 vectors at 32, 64 masks of high bits at 224, 16 vectors of 2-bit planes at 736
      const vec S0 = loadu(p + 32), S1 = loadu(p + 96), S2 = loadu(p + 160);
      const vec X[4] = {ternlog<0xEC>(S0, and_(slli32<4>(S2), top2), low4),             // scales 0..3, + 32
                        ternlog<0xEC>(S1, and_(slli32<2>(S2), top2), low4),             // 4..7
                        ternlog<0xEC>(srli32<4>(S0), and_(S2, top2), low4),             // 8..11
                        ternlog<0xEC>(srli32<4>(S1), and_(srli32<2>(S2), top2), low4)}; // 12..15
      vec P[8], sc[16], off[8];
      for (int i = 0; i < 4; ++i) {
        P[2 * i] = sub16(and_(X[i], low_bytes), thirty_two16);
        P[2 * i + 1] = sub16(srli16<8>(X[i]), thirty_two16);
      }
      scales16(P, sc);
      for (int q = 0; q < 8; ++q) off[q] = slli16<2>(P[q]);                        // 4 * scale
      for (int m = 0; m < M; ++m) msum[m] = pair_dots<8>(off, a.pairs + (m * a.nb + s) * 8);
      planes<kQ3K, M>(p, aq, a.K, sc, isum);
      for (int m = 0; m < M; ++m) acc[m] = scale_add(acc[m], sub32(isum[m], msum[m]), dw, a.d[m * a.nb + s]);
    } else if constexpr (FMT == kQ2K) {
      // d 0, dmin 32, the 16 scale | min << 4 bytes as 4 vectors at 64, 16 vectors of 2-bit planes at 320
      vec S[4], sc[16], mp[8];
      for (int i = 0; i < 4; ++i) S[i] = loadu(p + 64 + 64 * i);
      for (int j = 0; j < 16; ++j) sc[j] = shuffle8(and_(S[j / 4], low4), pick[j % 4]);
      for (int i = 0; i < 4; ++i) {
        mp[2 * i] = and_(srli16<4>(S[i]), low_nib16);                                // (min 4i, min 4i + 2)
        mp[2 * i + 1] = srli16<12>(S[i]);                                            // (min 4i + 1, min 4i + 3)
      }
      for (int m = 0; m < M; ++m) msum[m] = pair_dots<8>(mp, a.pairs + (m * a.nb + s) * 8);
      planes<kQ2K, M>(p, aq, a.K, sc, isum);
      const fvec dmin = halves(p + 32);
      for (int m = 0; m < M; ++m) acc[m] = scale_add_min(acc[m], isum[m], dw, a.d[m * a.nb + s], msum[m], dmin);
    } else {
      static_assert(FMT == kIQ4XS, "a 256-value type");
      // d 0, the 16 scales_h at 32, scales_l as a vector at 64, 32 vectors of indices at 128: vector 4j + k holds
      // block j's values 4k .. 4k + 3 (low nibbles) and 16 + 4k .. (high nibbles)
      const vec SL = loadu(p + 64), SH = words32(p + 32);
      vec sc[8];
      xs_scale<0>(SL, SH, sc);
      for (int j = 0; j < 8; ++j) {
        vec d[M];
        if constexpr (M <= 2) {                    // low and high nibbles in two chains per row
          vec dh[M];
          for (int m = 0; m < M; ++m) d[m] = dh[m] = zero();
          for (int k = 0; k < 4; ++k) {
            prefetch<GB, 32>(p, 4 * j + k);
            const vec lo = xs_values<0>(p, j, k), hi = xs_values<1>(p, j, k);
            for (int m = 0; m < M; ++m) {
              const int8_t* am = aq + m * a.K + 32 * j + 4 * k;
              d[m] = dpbusd(d[m], lo, bcast4(am));
              dh[m] = dpbusd(dh[m], hi, bcast4(am + 16));
            }
          }
          for (int m = 0; m < M; ++m) d[m] = add(d[m], dh[m]);
        } else {
          prefetch<GB, 8>(p, j);
          for (int m = 0; m < M; ++m) d[m] = zero();
          for (int k = 0; k < 4; ++k) {
            const vec lo = xs_values<0>(p, j, k);
            for (int m = 0; m < M; ++m) d[m] = dpbusd(d[m], lo, bcast4(aq + m * a.K + 32 * j + 4 * k));
          }
          for (int k = 0; k < 4; ++k) {
            const vec hi = xs_values<1>(p, j, k);
            for (int m = 0; m < M; ++m) d[m] = dpbusd(d[m], hi, bcast4(aq + m * a.K + 32 * j + 16 + 4 * k));
          }
        }
        for (int m = 0; m < M; ++m) {
          const int32_t off = 128 * a.bsum32[m * (a.K / 32) + 8 * s + j];
          isum[m] = add(isum[m], mullo32(sub32(d[m], bcast(&off)), sc[j]));
        }
      }
      for (int m = 0; m < M; ++m) acc[m] = scale_add(acc[m], isum[m], dw, a.d[m * a.nb + s]);
    }
  }
  store<M>(acc, valid, y, n0, N);
}

template <int FMT>
TileFn pick(int64_t M) {
#define SIROCCO_CASE(m) \
  case m: if constexpr (is_super(FMT)) return tile_k<FMT, m>; else return tile32<FMT, m>;
  switch (M) {
    SIROCCO_CASE(1) SIROCCO_CASE(2) SIROCCO_CASE(3) SIROCCO_CASE(4)
    SIROCCO_CASE(5) SIROCCO_CASE(6) SIROCCO_CASE(7) SIROCCO_CASE(8)
  }
#undef SIROCCO_CASE
  return nullptr;
}

}  // namespace x16

// The interleaved tile of format fmt for M activation rows.
TileFn pick_tile_x16(int64_t fmt, int64_t M) {
  switch (fmt) {
    case kQ8: return x16::pick<kQ8>(M);
    case kQ4: return x16::pick<kQ4>(M);
    case kQ41: return x16::pick<kQ41>(M);
    case kQ50: return x16::pick<kQ50>(M);
    case kQ51: return x16::pick<kQ51>(M);
    case kIQ4NL: return x16::pick<kIQ4NL>(M);
    case kQ2K: return x16::pick<kQ2K>(M);
    case kQ3K: return x16::pick<kQ3K>(M);
    case kQ4K: return x16::pick<kQ4K>(M);
    case kQ5K: return x16::pick<kQ5K>(M);
    case kQ6K: return x16::pick<kQ6K>(M);
    case kIQ4XS: return x16::pick<kIQ4XS>(M);
  }
  return nullptr;
}

}  // namespace
