// Multi-scale deformable attention: CPU kernel (forward and backward, float32 and float64).
//
// The arithmetic is in ms_deform_attn_common.h (shared with CUDA); this file only decides how
// work is split over ATen's intra-op threads (at::parallel_for, so torch.set_num_threads
// applies):
//   forward  - over (b, q) pairs: each writes its own output row, no race;
//   backward - over (b, m) pairs: grad_value[b, :, m, :] is only touched by queries of the same
//              (b, m), so every thread scatters into a slice nobody else writes and plain `+=`
//              is safe and deterministic. The cost is that at most B * M threads are busy
//              (8 for one image with 8 heads), which is plenty for the CPUs this path serves.
#include "ms_deform_attn.h"
#include "ms_deform_attn_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace freeseg {
namespace {

// grad_value of one (b, m) slice: pixels `pixel_stride` apart, channels contiguous.
template <typename scalar_t>
struct SliceScatter {
  scalar_t* base;
  int64_t pixel_stride;
  void operator()(int64_t s, scalar_t coef, const scalar_t* grad_out, int64_t D) {
    scalar_t* dst = base + s * pixel_stride;
    for (int64_t d = 0; d < D; ++d) dst[d] += coef * grad_out[d];
  }
};

// Guards the raw pointer arithmetic: every level must lie inside the S flattened tokens.
void check_levels(const at::Tensor& shapes, const at::Tensor& starts, int64_t S) {
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  for (int64_t l = 0; l < shapes.size(0); ++l) {
    TORCH_CHECK(hw[2 * l] > 0 && hw[2 * l + 1] > 0 && st[l] >= 0 && st[l] + hw[2 * l] * hw[2 * l + 1] <= S,
                "ms_deform_attn: level ", l, " (H=", hw[2 * l], ", W=", hw[2 * l + 1], ", start=", st[l],
                ") does not fit in value's S=", S, " tokens");
  }
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const at::Tensor v = value.contiguous(), loc = sampling_locations.contiguous();
  const at::Tensor attn = attention_weights.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const int64_t B = v.size(0), S = v.size(1), M = v.size(2), D = v.size(3);
  const int64_t Lq = loc.size(1), L = loc.size(3), P = loc.size(4);
  check_levels(shapes, starts, S);
  at::Tensor out = at::zeros({B, Lq, M * D}, v.options());

  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const scalar_t* v_ptr = v.data_ptr<scalar_t>();
    const scalar_t* loc_ptr = loc.data_ptr<scalar_t>();
    const scalar_t* attn_ptr = attn.data_ptr<scalar_t>();
    const int64_t* hw = shapes.data_ptr<int64_t>();
    const int64_t* st = starts.data_ptr<int64_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    // A (b, q) row costs M * L * P * 4 * D multiply-adds; 16 rows amortise a task's overhead.
    at::parallel_for(0, B * Lq, 16, [&](int64_t begin, int64_t end) {
      for (int64_t bq = begin; bq < end; ++bq) {
        const int64_t b = bq / Lq;
        for (int64_t m = 0; m < M; ++m) {
          const int64_t bqm = bq * M + m;
          forward_query<scalar_t, scalar_t>(v_ptr + b * S * M * D + m * D, M * D, hw, st, L, P, D,
                                            loc_ptr + bqm * L * P * 2, attn_ptr + bqm * L * P,
                                            out_ptr + bqm * D);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const at::Tensor v = value.contiguous(), loc = sampling_locations.contiguous();
  const at::Tensor attn = attention_weights.contiguous(), grad_out = grad_output.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const int64_t B = v.size(0), S = v.size(1), M = v.size(2), D = v.size(3);
  const int64_t Lq = loc.size(1), L = loc.size(3), P = loc.size(4);
  check_levels(shapes, starts, S);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, Lq, M * D}) && grad_out.scalar_type() == v.scalar_type(),
              "ms_deform_attn: grad_output must be (B, Lq, M*D) = (", B, ", ", Lq, ", ", M * D,
              ") of value's dtype, got ", grad_out.sizes());
  at::Tensor grad_value = at::zeros_like(v);
  // backward_query writes every entry of these two, so no zero fill is needed.
  at::Tensor grad_loc = at::empty_like(loc), grad_attn = at::empty_like(attn);

  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    const scalar_t* v_ptr = v.data_ptr<scalar_t>();
    const scalar_t* loc_ptr = loc.data_ptr<scalar_t>();
    const scalar_t* attn_ptr = attn.data_ptr<scalar_t>();
    const scalar_t* go_ptr = grad_out.data_ptr<scalar_t>();
    const int64_t* hw = shapes.data_ptr<int64_t>();
    const int64_t* st = starts.data_ptr<int64_t>();
    scalar_t* gv_ptr = grad_value.data_ptr<scalar_t>();
    scalar_t* gloc_ptr = grad_loc.data_ptr<scalar_t>();
    scalar_t* gattn_ptr = grad_attn.data_ptr<scalar_t>();
    at::parallel_for(0, B * M, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bm = begin; bm < end; ++bm) {
        const int64_t b = bm / M, m = bm % M;
        SliceScatter<scalar_t> scatter{gv_ptr + b * S * M * D + m * D, M * D};
        for (int64_t q = 0; q < Lq; ++q) {
          const int64_t bqm = (b * Lq + q) * M + m;
          backward_query<scalar_t, scalar_t, scalar_t>(
              v_ptr + b * S * M * D + m * D, M * D, hw, st, L, P, D, loc_ptr + bqm * L * P * 2,
              attn_ptr + bqm * L * P, go_ptr + bqm * D, gloc_ptr + bqm * L * P * 2,
              gattn_ptr + bqm * L * P, scatter);
        }
      }
    });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace freeseg
