// One MoE layer's experts in a decode step, over GGUF blocks of any type of blocks.h stacked per layer, in one call:
//
//   qmoe(x (T, D), ids (T, k) int64, weights (T, k), q1 (E, H, bytes), q3 (E, H, bytes), q2 (E, D, bytes'),
//        fmt, isa) -> (T, D)
//
//   out[t] = sum over the k choices j of token t of  weights[t, j] * w2[e] (silu(w1[e] x_t) * w3[e] x_t),  e = ids[t, j]
//
// q1, q3 and q2 are the experts' GGUF blocks (a GGUF file's ffn_gate_exps / ffn_up_exps / ffn_down_exps as they
// are, or the quantize-at-load pass's stacked buffers): each chosen expert's rows are read where they are (any
// stride between experts, rows contiguous), no gather and no copy. The pairs (token, choice) are grouped by expert
// (moe_plan.h), so an expert several tokens chose is read once for them all, up to 8 rows per tile: the tiles of
// qlinear.cpp (AVX2, or AVX512-VNNI; or over experts interleaved in place, each expert's rows by itself, the tiles of
// qlinear_x16.cpp), with the activations quantized as qlinear quantizes them. Two passes shared
// out over the threads by at::parallel_for in contiguous ranges of output tiles (all chunks' tiles end to end):
// w1 and w3 into the hidden activations, then w2 into the outputs.
//
// The arithmetic is the per-expert QuantLinear path's: each product is qlinear's, rounded to x's dtype; silu
// (ATen's, each pair's row by itself) of the first times the second; w2 of that quantized again and rounded to x's
// dtype; then moe_plan::combine, the plain module's weighted sum. So its bits are those of the plain MoE module
// over QuantLinear experts (when ATen's silu gives a row the same bits alone as in the expert's batch), and every
// output's bits depend on its own token's inputs only.
//
// Read after qlinear.cpp (its tiles, QuantizedRows, pick) and moe_plan.h, in one translation unit (kernels.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace qmoe_kernel {

// For every chunk of the plan: y rows [first, first + rows) (row length N) = the activation rows of the chunk times
// the N rows of its expert's blocks w + expert * stride (and the same with w_b into y_b if given). Tasks are tiles
// of output rows (tile_rows), chunk after chunk.
void products(const moe_plan::Plan& plan, const QuantizedRows& a, int64_t fmt, bool vnni, bool inter, int64_t N,
              int64_t row_bytes, const uint8_t* w, int64_t stride, float* y, const uint8_t* w_b = nullptr,
              int64_t stride_b = 0, float* y_b = nullptr) {
  const int64_t rows_per_tile = tile_rows(vnni, row_bytes), per_chunk = (N + rows_per_tile - 1) / rows_per_tile;
  const int64_t tasks = (int64_t)plan.chunks.size() * per_chunk;
  const int64_t matrices = w_b ? 2 : 1;
  // Grain: about 64 KiB of weights per task, so that small matrices do not pay for waking a second thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / (matrices * rows_per_tile * row_bytes));
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const moe_plan::Chunk& c = plan.chunks[t / per_chunk];
      const int64_t n0 = (t % per_chunk) * rows_per_tile, valid = std::min<int64_t>(rows_per_tile, N - n0);
      const TileFn tile = pick_tile(fmt, c.rows, vnni, inter);
      const Acts acts = a.from(c.first);
      tile(w + c.expert * stride, row_bytes, n0, valid, acts, y + c.first * N, N);
      if (w_b) tile(w_b + c.expert * stride_b, row_bytes, n0, valid, acts, y_b + c.first * N, N);
    }
  });
}

torch::Tensor run(const torch::Tensor& x, const torch::Tensor& ids, const torch::Tensor& weights,
                  const torch::Tensor& q1, const torch::Tensor& q3, const torch::Tensor& q2, int64_t fmt, bool vnni,
                  bool inter) {
  const int64_t D = x.size(1), E = q1.size(0), H = q1.size(1);
  const moe_plan::Plan plan = moe_plan::make(ids, E);
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  const at::ScalarType dtype = x.scalar_type();

  auto xf = x.to(at::kFloat).contiguous();
  auto xs = torch::empty({plan.P, D}, f32);                       // the inputs in pair order
  for (int64_t p = 0; p < plan.P; ++p)
    std::memcpy(xs.data_ptr<float>() + p * D, xf.data_ptr<float>() + plan.token[p] * D, D * sizeof(float));
  const QuantizedRows xa(xs.data_ptr<float>(), plan.P, D, x.options(), fmt, vnni, inter);
  auto g = torch::empty({plan.P, H}, f32), u = torch::empty({plan.P, H}, f32);
  products(plan, xa, fmt, vnni, inter, H, q1.size(2), q1.data_ptr<uint8_t>(), q1.stride(0), g.data_ptr<float>(),
                q3.data_ptr<uint8_t>(), q3.stride(0), u.data_ptr<float>());

  auto h = g.to(dtype);                                           // the QuantLinear path's roundings, in x's dtype
  for (int64_t p = 0; p < plan.P; ++p) {                          // row by row: each row's bits its own
    auto row = h.select(0, p);
    at::silu_(row);
  }
  h.mul_(u.to(dtype));

  auto hf = h.to(at::kFloat).contiguous();
  const QuantizedRows ha(hf.data_ptr<float>(), plan.P, H, x.options(), fmt, vnni, inter);
  auto y = torch::empty({plan.P, D}, f32);
  products(plan, ha, fmt, vnni, inter, D, q2.size(2), q2.data_ptr<uint8_t>(), q2.stride(0), y.data_ptr<float>());

  auto yt = y.to(dtype);
  auto out = torch::empty({plan.T, D}, x.options());
  if (dtype == at::kFloat)
    moe_plan::combine<float>(plan, ids.data_ptr<int64_t>(), yt.data_ptr<float>(), weights.data_ptr<float>(),
                             out.data_ptr<float>(), D);
  else
    moe_plan::combine<at::BFloat16>(plan, ids.data_ptr<int64_t>(), yt.data_ptr<at::BFloat16>(),
                                    weights.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), D);
  return out;
}

}  // namespace qmoe_kernel

torch::Tensor qmoe_layout(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor q1,
                          torch::Tensor q3, torch::Tensor q2, int64_t fmt, int64_t isa, int64_t layout) {
  check_format(fmt, "qmoe");
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && weights.sizes() == ids.sizes() && ids.size(0) == x.size(0),
              "qmoe: expected x (T, D), ids and weights (T, k), got ", x.sizes(), ", ", ids.sizes(), ", ",
              weights.sizes());
  const int64_t bb = kBlockBytes[fmt], V = block_values((int)fmt);
  const int64_t D = x.size(1);
  TORCH_CHECK(q1.dim() == 3 && q1.sizes() == q3.sizes() && q2.dim() == 3 && q2.size(0) == q1.size(0),
              "qmoe: expected q1, q3 (E, H, bytes) and q2 (E, D, bytes), got ", q1.sizes(), ", ", q3.sizes(), ", ",
              q2.sizes());
  const int64_t H = q1.size(1);
  TORCH_CHECK(D % V == 0 && H % V == 0 && q1.size(2) == D / V * bb && q2.size(1) == D && q2.size(2) == H / V * bb,
              "qmoe: ", kNames[fmt], " blocks ", q1.sizes(), ", ", q2.sizes(), " do not hold experts of (", H, ", ", D,
              ") with ", bb, " bytes per block of ", V);
  for (const auto& q : {q1, q3, q2})
    TORCH_CHECK(q.scalar_type() == at::kByte && q.device().is_cpu() && q.stride(2) == 1 && q.stride(1) == q.size(2),
                "qmoe: uint8 CPU blocks, each expert's rows contiguous, got strides ", q.strides());
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  weights.scalar_type() == x.scalar_type() && x.device().is_cpu(),
              "qmoe: fp32 or bf16 CPU rows, and weights of the same dtype");
  TORCH_CHECK(ids.scalar_type() == at::kLong, "qmoe: ids must be int64");
  const bool has_vnni = cpu_has_vnni();
  TORCH_CHECK(isa != 2 || has_vnni, "qmoe: this CPU has no AVX512-VNNI");
  const bool vnni = isa == 2 || (isa == 0 && has_vnni);
  const bool inter = interleaved(layout, vnni, H, "qmoe") && interleaved(layout, vnni, D, "qmoe");
  auto xc = x.contiguous(), idc = ids.contiguous(), wc = weights.contiguous();
  return qmoe_kernel::run(xc, idc, wc, q1, q3, q2, fmt, vnni, inter);
}

// The same over experts in the file's layout (qmoe_layout's layout 0).
torch::Tensor qmoe(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor q1, torch::Tensor q3,
                   torch::Tensor q2, int64_t fmt, int64_t isa) {
  return qmoe_layout(x, ids, weights, q1, q3, q2, fmt, isa, 0);
}
