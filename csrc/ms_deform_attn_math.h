// Per-sample math of multi-scale deformable attention, shared by the CPU and CUDA kernels.
//
// Convention (identical to F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)):
// a normalized location (x, y) on a level of h rows and w columns maps to the pixel coordinate
//   h_im = y * h - 0.5,   w_im = x * w - 0.5
// and reads the four neighbours (floor(h_im) + {0, 1}, floor(w_im) + {0, 1}) with bilinear weights.
// Each corner is bounds-checked on its own; a corner outside the level reads zero. Nothing here
// touches memory: the kernels load the corner rows themselves, which keeps this header usable from
// host and device code alike.
//
// Non-finite locations propagate as in grid_sample: when h_im or w_im is NaN or +-inf no corner is read,
// but the bilinear weights are NaN (their fractions are inf - inf or NaN), so the sample makes its
// (query, head) output row NaN, its attention-weight gradient NaN, and the location gradient of the
// other coordinate NaN (d/dx goes through the y fractions and vice versa; the coordinate's own gradient
// is 0 when the other one is finite). grad_value is untouched (nothing is read, nothing is scattered).
// A finite location outside the level contributes exactly zero, as before.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE inline
#endif

namespace msda {

// Most levels the CUDA kernels accept (the level table travels as a kernel argument).
constexpr int kMaxCudaLevels = 16;

MSDA_HOST_DEVICE float floor_(float v) { return floorf(v); }
MSDA_HOST_DEVICE double floor_(double v) { return floor(v); }
#if defined(__CUDACC__) || defined(__HIPCC__)
MSDA_HOST_DEVICE bool finite_(float v) { return isfinite(v); }
MSDA_HOST_DEVICE bool finite_(double v) { return isfinite(v); }
#else
inline bool finite_(float v) { return std::isfinite(v); }
inline bool finite_(double v) { return std::isfinite(v); }
#endif

// The four bilinear neighbours of one sampling location, in the order
// 0 = (row0, col0), 1 = (row0, col0 + 1), 2 = (row0 + 1, col0), 3 = (row0 + 1, col0 + 1).
template <typename T>
struct Corners {
  int64_t pos[4];   // level-local flat position row * w + col (only meaningful where inside[k])
  T weight[4];      // bilinear weight of each corner
  bool inside[4];   // the corner lies inside the level; outside corners read zero
  T frac_h;         // h_im - floor(h_im)
  T frac_w;         // w_im - floor(w_im)
  int64_t row0;     // floor(h_im), the cell's top row: -1 .. height - 1 (0 for a non-finite location)
  int64_t col0;     // floor(w_im), the cell's left column: -1 .. width - 1 (0 for a non-finite location)
};

// Fill `c` for location (x, y) on an (height, width) level. Returns false when the location is finite
// and no corner can lie inside the level (then the sample contributes nothing and has zero gradient).
// The test keeps h_im == -1 (the corner at row 0 is inside with weight 0 but a non-zero location
// gradient, as in grid_sample). A non-finite coordinate returns true with every corner outside and NaN
// weights (see the top of this file); no float -> integer conversion ever sees NaN, inf or a huge value.
// Callers apply attn * weight[k] to all four corners, reading zeros for the outside ones, so that the
// NaN reaches the output; the gradient of an outside corner is zero before sample_gradients.
template <typename T>
MSDA_HOST_DEVICE bool bilinear_corners(T x, T y, int64_t height, int64_t width, Corners<T>& c) {
  const T h_f = static_cast<T>(height);
  const T w_f = static_cast<T>(width);
  const T h_im = y * h_f - T(0.5);
  const T w_im = x * w_f - T(0.5);
  if (!(finite_(h_im) && finite_(w_im))) {
    const T lh = h_im - floor_(h_im);  // NaN unless finite
    const T lw = w_im - floor_(w_im);
    c.frac_h = lh;
    c.frac_w = lw;
    c.weight[0] = (T(1) - lh) * (T(1) - lw);
    c.weight[1] = (T(1) - lh) * lw;
    c.weight[2] = lh * (T(1) - lw);
    c.weight[3] = lh * lw;
    for (int k = 0; k < 4; ++k) {
      c.pos[k] = 0;
      c.inside[k] = false;
    }
    c.row0 = 0;
    c.col0 = 0;
    return true;
  }
  if (!(h_im >= T(-1) && h_im < h_f && w_im >= T(-1) && w_im < w_f)) {
    return false;
  }
  const T row_f = floor_(h_im);
  const T col_f = floor_(w_im);
  const int64_t row0 = static_cast<int64_t>(row_f);  // in [-1, height - 1]
  const int64_t col0 = static_cast<int64_t>(col_f);  // in [-1, width - 1]
  const T lh = h_im - row_f;
  const T lw = w_im - col_f;
  const T hh = T(1) - lh;
  const T hw = T(1) - lw;
  c.frac_h = lh;
  c.frac_w = lw;
  c.row0 = row0;
  c.col0 = col0;

  const bool row0_in = row0 >= 0;
  const bool row1_in = row0 + 1 < height;
  const bool col0_in = col0 >= 0;
  const bool col1_in = col0 + 1 < width;

  c.pos[0] = row0 * width + col0;
  c.pos[1] = c.pos[0] + 1;
  c.pos[2] = c.pos[0] + width;
  c.pos[3] = c.pos[2] + 1;
  c.weight[0] = hh * hw;
  c.weight[1] = hh * lw;
  c.weight[2] = lh * hw;
  c.weight[3] = lh * lw;
  c.inside[0] = row0_in && col0_in;
  c.inside[1] = row0_in && col1_in;
  c.inside[2] = row1_in && col0_in;
  c.inside[3] = row1_in && col1_in;
  return true;
}

// Chain rule of one sample.
//
// The sample contributes out[d] += attn * sum_k weight[k] * v_k[d]. Given
//   dots[k] = sum_d grad_out[d] * v_k[d]   (zero for corners outside the level)
// over some set of channels, this returns that channel set's share of
//   grad_attn = sum_k weight[k] * dots[k]
//   grad_x    = attn * d(sum_k weight[k] dots[k]) / d w_im * width    (d w_im / d x = width)
//   grad_y    = attn * d(sum_k weight[k] dots[k]) / d h_im * height   (d h_im / d y = height)
// All three are linear in dots, so partial results over disjoint channel sets simply add up
// (the CUDA backward reduces them across the threads of one (batch, query, head)).
template <typename T>
MSDA_HOST_DEVICE void sample_gradients(const Corners<T>& c, const T dots[4], T attn, int64_t height,
                                       int64_t width, T& grad_x, T& grad_y, T& grad_attn) {
  const T lh = c.frac_h;
  const T lw = c.frac_w;
  const T hh = T(1) - lh;
  const T hw = T(1) - lw;
  grad_attn = c.weight[0] * dots[0] + c.weight[1] * dots[1] + c.weight[2] * dots[2] + c.weight[3] * dots[3];
  const T d_w_im = hh * (dots[1] - dots[0]) + lh * (dots[3] - dots[2]);
  const T d_h_im = hw * (dots[2] - dots[0]) + lw * (dots[3] - dots[1]);
  grad_x = attn * d_w_im * static_cast<T>(width);
  grad_y = attn * d_h_im * static_cast<T>(height);
}

}  // namespace msda
