// Multi-scale deformable attention: the arithmetic shared by the CPU and CUDA kernels.
//
// Deformable DETR (Zhu et al., ICLR 2021), Eq. 3. Everything that decides *what number comes
// out* lives here, written once: where a sampling location lands on a level (pixel-centre
// convention, x = loc_x * W - 0.5, identical to grid_sample with align_corners=False), which of
// its four bilinear corners lie inside the map (the others contribute zero, like grid_sample's
// zeros padding), the bilinear weights, and the per-query forward and backward bodies. The CPU
// file only decides how queries are spread over threads and the CUDA file over GPU threads.
//
// Memory layout (all contiguous, axis legend as in freeseg/ops/ms_deform_attn.py):
//   value (B, S, M, D): for a fixed (b, m) the D channels of pixel s start at s * M * D, so a
//   kernel passes `value + b*S*M*D + m*D` and `pixel_stride = M * D`.
//   sampling_locations (B, Lq, M, L, P, 2) and attention_weights (B, Lq, M, L, P): for a fixed
//   (b, q, m) the L * P entries are contiguous.
#pragma once

#include <cmath>
#include <cstdint>

// Functions here are compiled for the host and, under nvcc, for the device too.
#ifdef __CUDACC__
#define FREESEG_HD __host__ __device__ __forceinline__
#else
#define FREESEG_HD inline
#endif

namespace freeseg {

FREESEG_HD float floor_(float x) { return floorf(x); }
FREESEG_HD double floor_(double x) { return floor(x); }

// Where one sampling location lands on an H x W map: the four corners (y0,x0) (y0,x1)
// (y1,x0) (y1,x1) as pixel indices inside the level (-1 when the corner is outside) and the
// fractional parts that make up the bilinear weights.
template <typename acc_t>
struct Bilinear {
  int64_t index[4];
  acc_t lx, ly;  // distance from the (y0, x0) corner; hx = 1 - lx, hy = 1 - ly
  bool any;      // false when all four corners are outside: no contribution, no gradient
};

template <typename acc_t>
FREESEG_HD Bilinear<acc_t> bilinear_corners(acc_t loc_x, acc_t loc_y, int64_t H, int64_t W) {
  Bilinear<acc_t> c;
  // Pixel centres sit at integer coordinates: loc 0 is the left edge of pixel 0, i.e. -0.5.
  const acc_t x = loc_x * static_cast<acc_t>(W) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(H) - acc_t(0.5);
  // Written so that NaN also lands in the "nothing to sample" branch; it also keeps the
  // float -> int conversion below in range for locations far outside [0, 1].
  c.any = x > acc_t(-1) && x < static_cast<acc_t>(W) && y > acc_t(-1) && y < static_cast<acc_t>(H);
  if (!c.any) {
    c.lx = c.ly = acc_t(0);
    c.index[0] = c.index[1] = c.index[2] = c.index[3] = -1;
    return c;
  }
  const acc_t fx = floor_(x), fy = floor_(y);
  const int64_t x0 = static_cast<int64_t>(fx), y0 = static_cast<int64_t>(fy);
  const int64_t x1 = x0 + 1, y1 = y0 + 1;
  c.lx = x - fx;
  c.ly = y - fy;
  const bool in_x0 = x0 >= 0, in_x1 = x1 <= W - 1, in_y0 = y0 >= 0, in_y1 = y1 <= H - 1;
  c.index[0] = (in_y0 && in_x0) ? y0 * W + x0 : -1;
  c.index[1] = (in_y0 && in_x1) ? y0 * W + x1 : -1;
  c.index[2] = (in_y1 && in_x0) ? y1 * W + x0 : -1;
  c.index[3] = (in_y1 && in_x1) ? y1 * W + x1 : -1;
  return c;
}

// Bilinear weights of the four corners, in the order of Bilinear::index.
template <typename acc_t>
FREESEG_HD void bilinear_weights(const Bilinear<acc_t>& c, acc_t w[4]) {
  const acc_t hx = acc_t(1) - c.lx, hy = acc_t(1) - c.ly;
  w[0] = hy * hx;
  w[1] = hy * c.lx;
  w[2] = c.ly * hx;
  w[3] = c.ly * c.lx;
}

// One channel: the four corner values (zero outside the map), read from `v` whose pixels are
// `pixel_stride` elements apart.
template <typename scalar_t, typename acc_t>
FREESEG_HD void load_corners(const scalar_t* v, int64_t pixel_stride, const Bilinear<acc_t>& c,
                             acc_t out[4]) {
  for (int k = 0; k < 4; ++k) {
    out[k] = c.index[k] >= 0 ? static_cast<acc_t>(v[c.index[k] * pixel_stride]) : acc_t(0);
  }
}

// Derivatives of the four bilinear weights with respect to the pixel coordinates x and y
// (w0 = hy*hx, w1 = hy*lx, w2 = ly*hx, w3 = ly*lx with lx = x - x0, hx = 1 - lx, likewise y).
// The gradient of a sample with respect to x is then sum_k dwdx[k] * corner_k.
template <typename acc_t>
FREESEG_HD void bilinear_weight_grads(const Bilinear<acc_t>& c, acc_t dwdx[4], acc_t dwdy[4]) {
  const acc_t hx = acc_t(1) - c.lx, hy = acc_t(1) - c.ly;
  dwdx[0] = -hy;
  dwdx[1] = hy;
  dwdx[2] = -c.ly;
  dwdx[3] = c.ly;
  dwdy[0] = -hx;
  dwdy[1] = -c.lx;
  dwdy[2] = hx;
  dwdy[3] = c.lx;
}

// sum_d a[d] * b[d] over contiguous channels. Eight partial sums instead of one: a single
// running sum makes every add wait for the previous one (a ~4-cycle chain per channel; the CPU
// backward was 25% slower with it), while independent sums pipeline and vectorise (CPU) or give
// instruction-level parallelism (GPU). Accumulates in acc_t (float for half types).
template <typename scalar_t, typename acc_t>
FREESEG_HD acc_t dot_channels(const scalar_t* a, const scalar_t* b, int64_t D) {
  constexpr int kLanes = 8;
  acc_t partial[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int j = 0; j < kLanes; ++j) partial[j] += static_cast<acc_t>(a[d + j]) * static_cast<acc_t>(b[d + j]);
  }
  for (; d < D; ++d) partial[0] += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  acc_t sum = acc_t(0);
  for (int j = 0; j < kLanes; ++j) sum += partial[j];
  return sum;
}

// Forward for one output channel of one (b, q, m): sum over levels and points of
// attention_weight * bilinear sample. `value` points at channel d of pixel 0 for this (b, m);
// `loc` at (L, P, 2) and `attn` at (L, P) for this (b, q, m). The CUDA kernel runs one thread
// per (b, q, m, d) through this function.
template <typename scalar_t, typename acc_t>
FREESEG_HD acc_t forward_channel(const scalar_t* value, int64_t pixel_stride, const int64_t* shapes,
                                 const int64_t* starts, int64_t L, int64_t P, const scalar_t* loc,
                                 const scalar_t* attn) {
  acc_t sum = acc_t(0);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    const scalar_t* v = value + starts[l] * pixel_stride;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t lp = l * P + p;
      const Bilinear<acc_t> c = bilinear_corners<acc_t>(static_cast<acc_t>(loc[2 * lp]),
                                                        static_cast<acc_t>(loc[2 * lp + 1]), H, W);
      if (!c.any) continue;
      acc_t w[4], corner[4];
      bilinear_weights(c, w);
      load_corners(v, pixel_stride, c, corner);
      sum += static_cast<acc_t>(attn[lp]) * (w[0] * corner[0] + w[1] * corner[1] + w[2] * corner[2] + w[3] * corner[3]);
    }
  }
  return sum;
}

// Forward for one (b, q, m), all D channels at once, accumulated into `out` (D values, zeroed by
// the caller). Same sum as forward_channel, ordered corner by corner so that the innermost loop
// runs over contiguous channels (what a CPU thread vectorises well); the corners are computed
// once per point instead of once per channel.
template <typename scalar_t, typename acc_t>
FREESEG_HD void forward_query(const scalar_t* value, int64_t pixel_stride, const int64_t* shapes,
                              const int64_t* starts, int64_t L, int64_t P, int64_t D,
                              const scalar_t* loc, const scalar_t* attn, acc_t* out) {
  for (int64_t l = 0; l < L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    const scalar_t* v = value + starts[l] * pixel_stride;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t lp = l * P + p;
      const Bilinear<acc_t> c = bilinear_corners<acc_t>(static_cast<acc_t>(loc[2 * lp]),
                                                        static_cast<acc_t>(loc[2 * lp + 1]), H, W);
      if (!c.any) continue;
      acc_t w[4];
      bilinear_weights(c, w);
      const acc_t a = static_cast<acc_t>(attn[lp]);
      for (int k = 0; k < 4; ++k) {
        if (c.index[k] < 0) continue;
        const acc_t coef = a * w[k];
        const scalar_t* corner = v + c.index[k] * pixel_stride;
        for (int64_t d = 0; d < D; ++d) out[d] += coef * static_cast<acc_t>(corner[d]);
      }
    }
  }
}

// Backward for one (b, q, m), all D channels. Writes the gradients of this query's (L, P, 2)
// locations and (L, P) weights (owned by the caller, no race) and hands each corner's grad_value
// contribution, coef * grad_out[0:D], to `scatter(pixel_index_in_S, coef, grad_out, D)`, which is
// where backends differ: plain `+=` when CPU threads own disjoint (b, m) slices, atomicAdd on CUDA.
// Corner by corner, everything a corner contributes to the location and weight gradients goes
// through one dot product g . corner over the D channels (all three are linear in the corner
// values), so the inner loops are a dot product and an axpy over contiguous channels.
template <typename scalar_t, typename acc_t, typename grad_t, typename Scatter>
FREESEG_HD void backward_query(const scalar_t* value, int64_t pixel_stride, const int64_t* shapes,
                               const int64_t* starts, int64_t L, int64_t P, int64_t D,
                               const scalar_t* loc, const scalar_t* attn, const scalar_t* grad_out,
                               grad_t* grad_loc, grad_t* grad_attn, Scatter& scatter) {
  for (int64_t l = 0; l < L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    const scalar_t* v = value + starts[l] * pixel_stride;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t lp = l * P + p;
      const Bilinear<acc_t> c = bilinear_corners<acc_t>(static_cast<acc_t>(loc[2 * lp]),
                                                        static_cast<acc_t>(loc[2 * lp + 1]), H, W);
      acc_t g_attn = acc_t(0), g_x = acc_t(0), g_y = acc_t(0);
      const acc_t a = static_cast<acc_t>(attn[lp]);
      if (c.any) {
        acc_t w[4], dwdx[4], dwdy[4];
        bilinear_weights(c, w);
        bilinear_weight_grads(c, dwdx, dwdy);
        for (int k = 0; k < 4; ++k) {
          if (c.index[k] < 0) continue;
          const scalar_t* corner = v + c.index[k] * pixel_stride;
          const acc_t dot = dot_channels<scalar_t, acc_t>(grad_out, corner, D);
          g_attn += w[k] * dot;
          g_x += dwdx[k] * dot;
          g_y += dwdy[k] * dot;
          scatter(starts[l] + c.index[k], a * w[k], grad_out, D);
        }
      }
      grad_attn[lp] = static_cast<grad_t>(g_attn);
      // Chain rule through x = loc_x * W - 0.5 (and y likewise).
      grad_loc[2 * lp] = static_cast<grad_t>(g_x * a * static_cast<acc_t>(W));
      grad_loc[2 * lp + 1] = static_cast<grad_t>(g_y * a * static_cast<acc_t>(H));
    }
  }
}

}  // namespace freeseg
