// Multi-scale deformable attention: CUDA kernel (forward and backward; float, double, half,
// bfloat16). The arithmetic is in ms_deform_attn_common.h, the same code the CPU kernel runs;
// this file only maps it onto GPU threads:
//   forward  - one thread per output element (b, q, m, d), so neighbouring threads read
//              neighbouring channels of the same corner pixel (coalesced loads);
//   backward - one thread per (b, q, m): it owns the gradients of its locations and weights
//              (sums over d stay in registers) and atomically adds into grad_value, which many
//              queries share.
// Half types accumulate in float (at::opmath_type) and their gradients are summed in float
// buffers, cast back at the end: atomicAdd on half loses too much to rounding.
// Only c10/cuda headers are included (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS and
// cuSPARSE headers that a bare CUDA toolkit may lack).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "ms_deform_attn.h"
#include "ms_deform_attn_common.h"

namespace freeseg {
namespace {

constexpr int kThreads = 256;

int64_t num_blocks(int64_t n) {
  // Grid-stride loops below cover any n; cap the grid at a size every device accepts.
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                               const scalar_t* loc, const scalar_t* attn, scalar_t* out, int64_t B,
                               int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P) {
  const int64_t n = B * Lq * M * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t d = i % D, bqm = i / D;  // output index = (bqm, d) in (B*Lq*M, D)
    const int64_t m = bqm % M, b = bqm / (M * Lq);
    const acc_t sum = forward_channel<scalar_t, acc_t>(value + b * S * M * D + m * D + d, M * D, shapes,
                                                       starts, L, P, loc + bqm * L * P * 2, attn + bqm * L * P);
    out[i] = static_cast<scalar_t>(sum);
  }
}

// grad_value of one (b, m) slice, shared by all queries of that slice: atomic adds.
template <typename acc_t>
struct AtomicScatter {
  acc_t* base;
  int64_t pixel_stride;
  template <typename scalar_t>
  __device__ void operator()(int64_t s, acc_t coef, const scalar_t* grad_out, int64_t D) {
    acc_t* dst = base + s * pixel_stride;
    for (int64_t d = 0; d < D; ++d) atomicAdd(dst + d, coef * static_cast<acc_t>(grad_out[d]));
  }
};

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                                const scalar_t* loc, const scalar_t* attn, const scalar_t* grad_out,
                                acc_t* grad_value, acc_t* grad_loc, acc_t* grad_attn, int64_t B, int64_t S,
                                int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P) {
  const int64_t n = B * Lq * M;
  for (int64_t bqm = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; bqm < n; bqm += int64_t(blockDim.x) * gridDim.x) {
    const int64_t m = bqm % M, b = bqm / (M * Lq);
    const int64_t slice = b * S * M * D + m * D;
    AtomicScatter<acc_t> scatter{grad_value + slice, M * D};
    backward_query<scalar_t, acc_t, acc_t>(value + slice, M * D, shapes, starts, L, P, D, loc + bqm * L * P * 2,
                                           attn + bqm * L * P, grad_out + bqm * D, grad_loc + bqm * L * P * 2,
                                           grad_attn + bqm * L * P, scatter);
  }
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor v = value.contiguous(), loc = sampling_locations.contiguous();
  const at::Tensor attn = attention_weights.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const int64_t B = v.size(0), S = v.size(1), M = v.size(2), D = v.size(3);
  const int64_t Lq = loc.size(1), L = loc.size(3), P = loc.size(4);
  at::Tensor out = at::empty({B, Lq, M * D}, v.options());
  const int64_t n = B * Lq * M * D;
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<num_blocks(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(),
        attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, S, M, D, Lq, L, P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor v = value.contiguous(), loc = sampling_locations.contiguous();
  const at::Tensor attn = attention_weights.contiguous(), grad_out = grad_output.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const int64_t B = v.size(0), S = v.size(1), M = v.size(2), D = v.size(3);
  const int64_t Lq = loc.size(1), L = loc.size(3), P = loc.size(4);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, Lq, M * D}) && grad_out.scalar_type() == v.scalar_type(),
              "ms_deform_attn: grad_output must be (B, Lq, M*D) = (", B, ", ", Lq, ", ", M * D,
              ") of value's dtype, got ", grad_out.sizes());
  // Gradient buffers in the accumulation dtype (float for half and bfloat16).
  const auto acc_dtype = at::toOpMathType(v.scalar_type());
  at::Tensor grad_value = at::zeros(v.sizes(), v.options().dtype(acc_dtype));
  at::Tensor grad_loc = at::empty(loc.sizes(), loc.options().dtype(acc_dtype));
  at::Tensor grad_attn = at::empty(attn.sizes(), attn.options().dtype(acc_dtype));
  const int64_t n = B * Lq * M;
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t><<<num_blocks(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(),
          attn.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(), grad_value.data_ptr<acc_t>(),
          grad_loc.data_ptr<acc_t>(), grad_attn.data_ptr<acc_t>(), B, S, M, D, Lq, L, P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_value.to(v.scalar_type()), grad_loc.to(v.scalar_type()), grad_attn.to(v.scalar_type())};
}

}  // namespace freeseg

TORCH_LIBRARY_IMPL(freeseg, CUDA, m) {
  m.impl("ms_deform_attn_forward", &freeseg::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &freeseg::ms_deform_attn_backward_cuda);
}
