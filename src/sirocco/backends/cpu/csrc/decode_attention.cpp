// Decode attention on CPU: one new query per sequence over its row of the cache, read in place.
//
//   scores (B, H, L) fp32 = q (B, H, D) . k (B, G, L, D) * scale, -inf where valid (B, L) is false
//   out (B, H, D)         = probs (B, H, L) fp32 @ v (B, G, L, D), accumulated in fp32, in v's dtype
//
// with softmax in between (PyTorch's, in fp32). Query head h reads kv head h / (H / G), as in attention.py.
// The matmul path there multiplies bf16 blocks of 4 queries by up to thousands of keys, where PyTorch takes slow
// small-matrix paths and adds fp32 copies and a masked_fill per layer, several times the time of these kernels in
// bf16 and fp32 (docs/performance.md, "Decode attention"). Each (sequence, kv head) block is one task: each key
// is loaded once for up to 4 query heads, each value row is converted once and kept in registers with 4 x 4 sums,
// slots past a sequence's fill are skipped (probability 0), and every sum runs in order over d or over the slots,
// so a sequence's bits do not depend on the other sequences in the step.
//
// decode_scores_at / decode_values_at are the same arithmetic over a whole layer cache (R, G, S, D): query b reads
// row rows[b], and its l-th key is slot slots[b, l] of that row (the plan's canonical order, oldest residue first:
// plan.py), so several queries may share a row (a draft's positions, each masked to its own) and a ring of more
// slots than the window gives the bits of a ring of exactly the window. Only the addresses differ from
// decode_scores / decode_values: with rows = 0..B-1 and slots[b, l] = l the results are the same bits.
//
// Written over simd.h's vectors (kLanes fp32 lanes: 16 in the AVX-512 build, 8 in the AVX2 one). bf16 scores
// use _mm512_dpbf16_ps in the AVX-512 build; the AVX2 build converts the queries to fp32 once per call and each
// key vector once (a shift), then multiplies and adds in fp32, and takes 4 query heads x 2 vectors of values at a
// time (16 registers).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <limits>
#include <type_traits>

namespace {

using simd::kLanes;
using simd::vec;

inline void store_vec(at::BFloat16* p, vec x) {
  alignas(64) float tmp[kLanes];
  simd::store_aligned(tmp, x);
  for (int i = 0; i < kLanes; ++i) p[i] = at::BFloat16(tmp[i]);
}
inline void store_vec(float* p, vec x) { simd::store(p, x); }

#ifdef SIROCCO_AVX2
constexpr int kValueVectors = 2;     // vectors of values per query head at a time: 4 x 2 sums + 2 rows
constexpr bool kDotBF16 = false;
#else
constexpr int kValueVectors = 4;
constexpr bool kDotBF16 = true;      // _mm512_dpbf16_ps for bf16 queries times bf16 keys
#endif

// indexed: kv is a whole layer cache (R, G, S, D) read through rows and slots, else one row per query (B, G, L, D).
void check(const torch::Tensor& q, const torch::Tensor& kv, const char* name, bool indexed = false) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 4 && (indexed || kv.size(0) == q.size(0)) && kv.size(3) == q.size(2) &&
              q.size(1) % kv.size(1) == 0,
              "decode attention: expected q (B, H, D) and ", name, indexed ? " (R, G, S, D)" : " (B, G, L, D)",
              " with G dividing H, got ", q.sizes(), " and ", kv.sizes());
  TORCH_CHECK(kv.stride(3) == 1 && kv.stride(2) == kv.size(3), "decode attention: ", name,
              " needs each (sequence, kv head) block of L x D contiguous");
  TORCH_CHECK(q.scalar_type() == kv.scalar_type() && q.device().is_cpu() && kv.device().is_cpu(),
              "decode attention: q and ", name, " must be CPU tensors of one dtype");
  const int64_t width = q.scalar_type() == at::kBFloat16 && kDotBF16 ? 2 * kLanes : kLanes;
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat,
              "decode attention: bf16 or fp32 only");
  TORCH_CHECK(q.size(2) % width == 0, "decode attention: head_dim must be a multiple of ", width);
}

// Scores of JN query heads against one key: the key is loaded once per step of d for all JN heads, and the JN
// dot products run as independent chains. Q is the queries' type (fp32 or, with dpbf16, bf16), T the keys'.
template <typename Q, typename T, int JN>
inline void key_scores(const Q* q, int64_t D, const T* key, float scale, float* out, int64_t stride) {
  vec acc[JN];
  for (int j = 0; j < JN; ++j) acc[j] = simd::zero();
#ifndef SIROCCO_AVX2
  if constexpr (std::is_same_v<Q, at::BFloat16>) {
    for (int64_t d = 0; d < D; d += 32) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(key + d);
      for (int j = 0; j < JN; ++j)
        acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(q + j * D + d), kv);
    }
  } else
#endif
  {
    for (int64_t d = 0; d < D; d += kLanes) {
      const vec kv = simd::load(key + d);
      for (int j = 0; j < JN; ++j) acc[j] = simd::fmadd(simd::load(q + j * D + d), kv, acc[j]);
    }
  }
  for (int j = 0; j < JN; ++j) out[j * stride] = simd::sum(acc[j]) * scale;
}

// slots: the slot of each of the L keys (nullptr: slot l), read only where valid.
template <typename Q, typename T, int JN>
void block_scores(const Q* q, const T* keys, const bool* valid, const int64_t* slots, int64_t L, int64_t D,
                  float scale, float* out) {
  for (int64_t l = 0; l < L; ++l) {
    if (valid[l]) {
      key_scores<Q, T, JN>(q, D, keys + (slots ? slots[l] : l) * D, scale, out + l, L);
    } else {
      for (int j = 0; j < JN; ++j) out[j * L + l] = -std::numeric_limits<float>::infinity();
    }
  }
}

// rows (B) and slots (B, L): query b's cache row and the slot of each of its keys (nullptr: row b, slot l).
template <typename Q, typename T>
void scores_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& valid, float scale,
                 torch::Tensor& out, const int64_t* rows = nullptr, const int64_t* slots = nullptr) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), G = k.size(1), L = valid.size(1), g = H / G;
  const Q* qp = q.data_ptr<Q>();
  const T* kp = k.data_ptr<T>();
  const bool* vp = valid.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * G, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / G, kvh = t % G;
      const T* keys = kp + (rows ? rows[b] : b) * k.stride(0) + kvh * k.stride(1);
      const int64_t* sb = slots ? slots + b * L : nullptr;
      for (int64_t j0 = 0; j0 < g; j0 += 4) {               // query heads of this kv head, up to 4 at a time
        const Q* qj = qp + (b * H + kvh * g + j0) * D;
        float* oj = op + (b * H + kvh * g + j0) * L;
        switch (std::min<int64_t>(4, g - j0)) {
          case 4: block_scores<Q, T, 4>(qj, keys, vp + b * L, sb, L, D, scale, oj); break;
          case 3: block_scores<Q, T, 3>(qj, keys, vp + b * L, sb, L, D, scale, oj); break;
          case 2: block_scores<Q, T, 2>(qj, keys, vp + b * L, sb, L, D, scale, oj); break;
          default: block_scores<Q, T, 1>(qj, keys, vp + b * L, sb, L, D, scale, oj);
        }
      }
    }
  });
}

// out[j, d0 : d0 + kLanes NC] for JN query heads: each value row's NC vectors are converted once and multiplied by
// the JN probabilities; the JN x NC sums stay in registers over all slots, in order.
template <typename T, int JN, int NC>
void block_values(const float* p, int64_t L, const T* values, const int64_t* slots, int64_t D, int64_t d0,
                  T* out) {
  vec acc[JN][NC];
  for (int j = 0; j < JN; ++j)
    for (int c = 0; c < NC; ++c) acc[j][c] = simd::zero();
  for (int64_t l = 0; l < L; ++l) {
    bool any = false;
    for (int j = 0; j < JN; ++j) any |= p[j * L + l] != 0.0f;
    if (!any) continue;                                      // a masked slot (probability 0) adds nothing
    vec row[NC];
    const T* value = values + (slots ? slots[l] : l) * D;
    for (int c = 0; c < NC; ++c) row[c] = simd::load(value + d0 + kLanes * c);
    for (int j = 0; j < JN; ++j) {
      const vec w = simd::set1(p[j * L + l]);
      for (int c = 0; c < NC; ++c) acc[j][c] = simd::fmadd(w, row[c], acc[j][c]);
    }
  }
  for (int j = 0; j < JN; ++j)
    for (int c = 0; c < NC; ++c) store_vec(out + j * D + d0 + kLanes * c, acc[j][c]);
}

template <typename T, int JN>
void head_values(const float* p, int64_t L, const T* values, const int64_t* slots, int64_t D, T* out) {
  for (int64_t d0 = 0; d0 < D; d0 += kValueVectors * kLanes) {
    switch (std::min<int64_t>(kValueVectors, (D - d0) / kLanes)) {
      case 4: if constexpr (kValueVectors >= 4) block_values<T, JN, 4>(p, L, values, slots, D, d0, out); break;
      case 3: if constexpr (kValueVectors >= 3) block_values<T, JN, 3>(p, L, values, slots, D, d0, out); break;
      case 2: block_values<T, JN, 2>(p, L, values, slots, D, d0, out); break;
      default: block_values<T, JN, 1>(p, L, values, slots, D, d0, out);
    }
  }
}

template <typename T>
void values_impl(const torch::Tensor& probs, const torch::Tensor& v, torch::Tensor& out,
                 const int64_t* rows = nullptr, const int64_t* slots = nullptr) {
  const int64_t B = out.size(0), H = out.size(1), D = out.size(2), G = v.size(1), L = probs.size(2), g = H / G;
  const float* pp = probs.data_ptr<float>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * G, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / G, kvh = t % G;
      const T* values = vp + (rows ? rows[b] : b) * v.stride(0) + kvh * v.stride(1);
      const int64_t* sb = slots ? slots + b * L : nullptr;
      for (int64_t j0 = 0; j0 < g; j0 += 4) {
        const float* p = pp + (b * H + kvh * g + j0) * L;
        T* o = op + (b * H + kvh * g + j0) * D;
        switch (std::min<int64_t>(4, g - j0)) {
          case 4: head_values<T, 4>(p, L, values, sb, D, o); break;
          case 3: head_values<T, 3>(p, L, values, sb, D, o); break;
          case 2: head_values<T, 2>(p, L, values, sb, D, o); break;
          default: head_values<T, 1>(p, L, values, sb, D, o);
        }
      }
    }
  });
}

}  // namespace

torch::Tensor decode_scores(torch::Tensor q, torch::Tensor k, torch::Tensor valid, double scale) {
  check(q, k, "k");
  TORCH_CHECK(q.is_contiguous() && valid.is_contiguous() && valid.scalar_type() == at::kBool &&
              valid.dim() == 2 && valid.size(0) == q.size(0) && valid.size(1) == k.size(2),
              "decode attention: q contiguous and valid a (B, L) bool tensor, got ", valid.sizes());
  auto out = torch::empty({q.size(0), q.size(1), k.size(2)}, q.options().dtype(torch::kFloat32));
  if (q.scalar_type() != at::kBFloat16) scores_impl<float, float>(q, k, valid, (float)scale, out);
  else if (kDotBF16) scores_impl<at::BFloat16, at::BFloat16>(q, k, valid, (float)scale, out);
  else scores_impl<float, at::BFloat16>(q.to(torch::kFloat), k, valid, (float)scale, out);   // queries once
  return out;
}

torch::Tensor decode_values(torch::Tensor probs, torch::Tensor v) {
  TORCH_CHECK(probs.dim() == 3 && probs.scalar_type() == at::kFloat && probs.is_contiguous() &&
              v.dim() == 4 && probs.size(0) == v.size(0) && probs.size(2) == v.size(2) &&
              probs.size(1) % v.size(1) == 0,
              "decode attention: expected probs (B, H, L) fp32 and v (B, G, L, D), got ", probs.sizes(), " and ",
              v.sizes());
  auto out = torch::empty({probs.size(0), probs.size(1), v.size(3)}, v.options());
  check(out, v, "v");
  if (v.scalar_type() == at::kBFloat16) values_impl<at::BFloat16>(probs, v, out);
  else values_impl<float>(probs, v, out);
  return out;
}

namespace {

// rows (B,) int64 in [0, R) and slots (B, L) int64 in [0, S) (entries under an invalid key are never read).
void check_index(const torch::Tensor& rows, const torch::Tensor& slots, const torch::Tensor& kv, int64_t B, int64_t L) {
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == B && rows.scalar_type() == at::kLong && rows.is_contiguous() &&
              slots.dim() == 2 && slots.size(0) == B && slots.size(1) == L && slots.scalar_type() == at::kLong &&
              slots.is_contiguous(),
              "decode attention: expected rows (B,) and slots (B, L) contiguous int64 tensors for B = ", B,
              " queries and L = ", L, " keys, got ", rows.sizes(), " and ", slots.sizes());
  // A plain loop: a few hundred integers per call, where tensor reductions would cost more than the check.
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(r[b] >= 0 && r[b] < kv.size(0), "decode attention: rows must lie in [0, ", kv.size(0), "), got ",
                r[b]);
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * L; ++i)
    TORCH_CHECK(sl[i] >= 0 && sl[i] < kv.size(2), "decode attention: slots must lie in [0, ", kv.size(2),
                "), got ", sl[i]);
}

}  // namespace

torch::Tensor decode_scores_at(torch::Tensor q, torch::Tensor k, torch::Tensor rows, torch::Tensor slots,
                               torch::Tensor valid, double scale) {
  check(q, k, "k", true);
  TORCH_CHECK(q.is_contiguous() && valid.is_contiguous() && valid.scalar_type() == at::kBool && valid.dim() == 2 &&
              valid.size(0) == q.size(0),
              "decode attention: q contiguous and valid a (B, L) bool tensor, got ", valid.sizes());
  check_index(rows, slots, k, q.size(0), valid.size(1));
  auto out = torch::empty({q.size(0), q.size(1), valid.size(1)}, q.options().dtype(torch::kFloat32));
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  if (q.scalar_type() != at::kBFloat16) scores_impl<float, float>(q, k, valid, (float)scale, out, rp, sp);
  else if (kDotBF16) scores_impl<at::BFloat16, at::BFloat16>(q, k, valid, (float)scale, out, rp, sp);
  else scores_impl<float, at::BFloat16>(q.to(torch::kFloat), k, valid, (float)scale, out, rp, sp);
  return out;
}

torch::Tensor decode_values_at(torch::Tensor probs, torch::Tensor v, torch::Tensor rows, torch::Tensor slots) {
  TORCH_CHECK(probs.dim() == 3 && probs.scalar_type() == at::kFloat && probs.is_contiguous() && v.dim() == 4 &&
              probs.size(1) % v.size(1) == 0,
              "decode attention: expected probs (B, H, L) fp32 and v (R, G, S, D), got ", probs.sizes(), " and ",
              v.sizes());
  auto out = torch::empty({probs.size(0), probs.size(1), v.size(3)}, v.options());
  check(out, v, "v", true);
  check_index(rows, slots, v, probs.size(0), probs.size(2));
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  if (v.scalar_type() == at::kBFloat16) values_impl<at::BFloat16>(probs, v, out, rp, sp);
  else values_impl<float>(probs, v, out, rp, sp);
  return out;
}
