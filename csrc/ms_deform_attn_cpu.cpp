// CPU kernels of multi-scale deformable attention and the CPU extension module.
//
// Layouts: value (B, S, H, D), sampling_locations (B, Q, H, L, P, 2), attention_weights (B, Q, H, L, P),
// output / grad_output (B, Q, H*D). One "item" is a (batch, query, head) triple; its output row is
// D contiguous numbers and every corner it reads is D contiguous numbers of value at stride H*D.
//
// Forward: at::parallel_for over items; per sample the bilinear corners and weights are computed once
// (ms_deform_attn_math.h) and applied to the four D-rows in one vectorizable pass.
//
// Backward without races on grad_value: the work is split into units (batch, block of heads, query
// group). A unit writes only grad_value[b, :, heads of its block, :] of its group's buffer, so no two
// threads ever write the same memory and no atomics are needed. Head blocks are as large as an even
// split over the threads allows (a unit walks all its heads for each query, which keeps its memory
// accesses close together); with B*H >= threads there is one query group and grad_value is written
// in place. With fewer (batch, head) pairs than threads the queries are cut into G groups, each with
// a private float buffer of value's size, summed at the end. So every thread stays busy for any thread
// count (units >= threads) at the cost of G - 1 extra value-sized buffers only when B*H is small, and
// the result is deterministic for a given thread count.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "ms_deform_attn_checks.h"
#include "ms_deform_attn_math.h"

namespace msda {
namespace {

// Independent partial sums per dot product in the backward: a fixed-width inner loop over them
// vectorizes without reassociation flags and keeps the summation order deterministic.
template <typename acc_t>
constexpr int64_t kDotLanes = 64 / static_cast<int64_t>(sizeof(acc_t));

// How the kernels read a corner row of value: in place, except float16 rows, which are converted to
// float into a scratch row first (8 lanes at a time with F16C) because the element-wise half -> float
// conversion does not vectorize. bfloat16 converts by a shift, which vectorizes in place.
template <typename scalar_t>
struct RowReader {
  using row_t = scalar_t;
  explicit RowReader(int64_t) {}
  const row_t* read(const scalar_t* row, int) { return row; }
};

template <>
struct RowReader<c10::Half> {
  using row_t = float;
  explicit RowReader(int64_t D) : D_(D), scratch_(4 * D) {}
  const float* read(const c10::Half* row, int k) {
    float* dst = scratch_.data() + k * D_;
    int64_t d = 0;
#if defined(__F16C__)
    for (; d + 8 <= D_; d += 8) {
      _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d))));
    }
#endif
    for (; d < D_; ++d) dst[d] = static_cast<float>(row[d]);
    return dst;
  }

 private:
  int64_t D_;
  std::vector<float> scratch_;
};

// acc[d] += sum_k coef[k] * rows[k][d] for d < D (all four rows readable; unused corners point to zeros)
template <typename scalar_t, typename acc_t>
inline void gather_corners(acc_t* __restrict acc, const scalar_t* __restrict r0, const scalar_t* __restrict r1,
                           const scalar_t* __restrict r2, const scalar_t* __restrict r3, const acc_t coef[4],
                           int64_t D) {
  const acc_t c0 = coef[0], c1 = coef[1], c2 = coef[2], c3 = coef[3];
  for (int64_t d = 0; d < D; ++d) {
    acc[d] += c0 * static_cast<acc_t>(r0[d]) + c1 * static_cast<acc_t>(r1[d]) + c2 * static_cast<acc_t>(r2[d]) +
              c3 * static_cast<acc_t>(r3[d]);
  }
}

// dots[k] = sum_d g[d] * rows[k][d] and grows[k][d] += coef[k] * g[d]; the eight rows never alias
template <typename scalar_t, typename acc_t>
inline void scatter_corners(const acc_t* __restrict g, const scalar_t* __restrict r0, const scalar_t* __restrict r1,
                            const scalar_t* __restrict r2, const scalar_t* __restrict r3, acc_t* __restrict w0,
                            acc_t* __restrict w1, acc_t* __restrict w2, acc_t* __restrict w3, const acc_t coef[4],
                            int64_t D, acc_t dots[4]) {
  constexpr int64_t W = kDotLanes<acc_t>;
  const acc_t c0 = coef[0], c1 = coef[1], c2 = coef[2], c3 = coef[3];
  acc_t p0[W] = {}, p1[W] = {}, p2[W] = {}, p3[W] = {};
  int64_t d0 = 0;
  for (; d0 + W <= D; d0 += W) {
    for (int64_t j = 0; j < W; ++j) {
      const int64_t d = d0 + j;
      const acc_t gd = g[d];
      p0[j] += gd * static_cast<acc_t>(r0[d]);
      p1[j] += gd * static_cast<acc_t>(r1[d]);
      p2[j] += gd * static_cast<acc_t>(r2[d]);
      p3[j] += gd * static_cast<acc_t>(r3[d]);
      w0[d] += c0 * gd;
      w1[d] += c1 * gd;
      w2[d] += c2 * gd;
      w3[d] += c3 * gd;
    }
  }
  for (int64_t j = 0; d0 + j < D; ++j) {  // tail (D not a multiple of W)
    const int64_t d = d0 + j;
    const acc_t gd = g[d];
    p0[j] += gd * static_cast<acc_t>(r0[d]);
    p1[j] += gd * static_cast<acc_t>(r1[d]);
    p2[j] += gd * static_cast<acc_t>(r2[d]);
    p3[j] += gd * static_cast<acc_t>(r3[d]);
    w0[d] += c0 * gd;
    w1[d] += c1 * gd;
    w2[d] += c2 * gd;
    w3[d] += c3 * gd;
  }
  for (int64_t width = W / 2; width > 0; width /= 2) {  // pairwise (tree) sum of the lanes
    for (int64_t j = 0; j < width; ++j) {
      p0[j] += p0[j + width];
      p1[j] += p1[j + width];
      p2[j] += p2[j + width];
      p3[j] += p3[j + width];
    }
  }
  dots[0] = p0[0];
  dots[1] = p1[0];
  dots[2] = p2[0];
  dots[3] = p3[0];
}

template <typename scalar_t>
void forward_kernel(const Problem& p, const scalar_t* value, const at::opmath_type<scalar_t>* loc,
                    const at::opmath_type<scalar_t>* attn, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = p.B, S = p.S, Q = p.Q, H = p.H, D = p.D, L = p.L, P = p.P;
  const int64_t items = B * Q * H;
  const int64_t row_stride = H * D;  // elements between two positions of one head
  const int64_t cost = std::max<int64_t>(1, L * P * (4 * D + 32));
  const int64_t grain = std::max<int64_t>(1, 65536 / cost);

  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    using row_t = typename RowReader<scalar_t>::row_t;
    RowReader<scalar_t> reader(D);
    std::vector<acc_t> acc(D);
    const std::vector<row_t> zeros(D, row_t(0));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item % H;
      const int64_t b = item / (Q * H);
      const scalar_t* v_bh = value + (b * S * H + h) * D;
      const acc_t* loc_i = loc + item * L * P * 2;
      const acc_t* attn_i = attn + item * L * P;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t l = 0; l < L; ++l) {
        const int64_t height = p.heights[l], width = p.widths[l];
        const scalar_t* v_l = v_bh + p.starts[l] * row_stride;
        for (int64_t pt = 0; pt < P; ++pt) {
          const int64_t s = l * P + pt;
          Corners<acc_t> c;
          if (!bilinear_corners(loc_i[2 * s], loc_i[2 * s + 1], height, width, c)) continue;
          const acc_t a = attn_i[s];
          const row_t* rows[4];
          acc_t coef[4];
          for (int k = 0; k < 4; ++k) {  // outside corners read zeros; NaN weights still reach acc
            rows[k] = c.inside[k] ? reader.read(v_l + c.pos[k] * row_stride, k) : zeros.data();
            coef[k] = a * c.weight[k];
          }
          gather_corners(acc.data(), rows[0], rows[1], rows[2], rows[3], coef, D);
        }
      }
      scalar_t* o = out + item * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
    }
  });
}

// How the backward splits its work (see the file comment): units are (batch, block of heads, query
// group). A unit owns the grad_value rows of its heads in its group's buffer.
struct Partition {
  int64_t heads_per_block = 1;
  int64_t head_blocks = 1;
  int64_t groups = 1;
};

Partition backward_partition(int64_t B, int64_t H, int64_t Q, int64_t buffer_bytes) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  Partition part;
  // Largest head blocks (a unit then walks all its heads per query: neighbouring memory) that still
  // give every thread the same number of units; otherwise one head per unit.
  part.heads_per_block = 1;
  for (int64_t hpb = H; hpb >= 1; --hpb) {
    if (H % hpb != 0) continue;
    const int64_t units = B * (H / hpb);
    if (units >= threads && (units % threads == 0 || units >= 4 * threads)) {
      part.heads_per_block = hpb;
      break;
    }
  }
  part.head_blocks = H / part.heads_per_block;
  const int64_t pairs = B * part.head_blocks;
  if (threads <= 1 || pairs >= threads || Q <= 1) return part;
  // Fewer (batch, head block) pairs than threads: split the queries into groups with private buffers.
  int64_t g = (threads + pairs - 1) / pairs;
  while ((pairs * g) % threads != 0 && pairs * g < 4 * threads) ++g;
  constexpr int64_t kMaxBytes = int64_t(1) << 30;  // cap on the extra memory of the private buffers
  while (g > 1 && g * buffer_bytes > std::max(kMaxBytes, buffer_bytes)) --g;
  part.groups = std::max<int64_t>(1, std::min(g, Q));
  return part;
}

template <typename scalar_t>
void backward_kernel(const Problem& p, const scalar_t* value, const at::opmath_type<scalar_t>* loc,
                     const at::opmath_type<scalar_t>* attn, const scalar_t* grad_out,
                     at::opmath_type<scalar_t>* grad_value_groups, const Partition& part,
                     at::opmath_type<scalar_t>* grad_loc, at::opmath_type<scalar_t>* grad_attn) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = p.B, S = p.S, Q = p.Q, H = p.H, D = p.D, L = p.L, P = p.P;
  const int64_t row_stride = H * D;
  const int64_t group_stride = B * S * H * D;  // one private grad_value buffer
  const int64_t groups = part.groups;
  const int64_t queries_per_group = (Q + groups - 1) / groups;
  const int64_t units = B * part.head_blocks * groups;

  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    using row_t = typename RowReader<scalar_t>::row_t;
    RowReader<scalar_t> reader(D);
    std::vector<acc_t> g(D);
    std::vector<acc_t> sink(4 * D);  // written by corners outside the level, never read
    const std::vector<row_t> zeros(D, row_t(0));
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t group = unit % groups;
      const int64_t block = (unit / groups) % part.head_blocks;
      const int64_t b = unit / (groups * part.head_blocks);
      const int64_t h_begin = block * part.heads_per_block;
      const int64_t h_end = h_begin + part.heads_per_block;
      const int64_t q_end = std::min(Q, (group + 1) * queries_per_group);
      for (int64_t q = group * queries_per_group; q < q_end; ++q) {
        for (int64_t h = h_begin; h < h_end; ++h) {
          const int64_t item = (b * Q + q) * H + h;
          const scalar_t* v_bh = value + (b * S * H + h) * D;
          acc_t* gv_bh = grad_value_groups + group * group_stride + (b * S * H + h) * D;
          const scalar_t* go = grad_out + item * D;
          for (int64_t d = 0; d < D; ++d) g[d] = static_cast<acc_t>(go[d]);
          const acc_t* loc_i = loc + item * L * P * 2;
          const acc_t* attn_i = attn + item * L * P;
          acc_t* gloc_i = grad_loc + item * L * P * 2;
          acc_t* gattn_i = grad_attn + item * L * P;
          for (int64_t l = 0; l < L; ++l) {
            const int64_t height = p.heights[l], width = p.widths[l];
            const scalar_t* v_l = v_bh + p.starts[l] * row_stride;
            acc_t* gv_l = gv_bh + p.starts[l] * row_stride;
            for (int64_t pt = 0; pt < P; ++pt) {
              const int64_t s = l * P + pt;
              Corners<acc_t> c;
              if (!bilinear_corners(loc_i[2 * s], loc_i[2 * s + 1], height, width, c)) {
                gloc_i[2 * s] = gloc_i[2 * s + 1] = gattn_i[s] = acc_t(0);
                continue;
              }
              const acc_t a = attn_i[s];
              const row_t* rows[4];
              acc_t* grows[4];
              acc_t coef[4];
              for (int k = 0; k < 4; ++k) {
                rows[k] = c.inside[k] ? reader.read(v_l + c.pos[k] * row_stride, k) : zeros.data();
                grows[k] = c.inside[k] ? gv_l + c.pos[k] * row_stride : sink.data() + k * D;
                coef[k] = c.inside[k] ? a * c.weight[k] : acc_t(0);
              }
              acc_t dots[4];
              scatter_corners(g.data(), rows[0], rows[1], rows[2], rows[3], grows[0], grows[1], grows[2], grows[3],
                              coef, D, dots);
              for (int k = 0; k < 4; ++k) {
                if (!c.inside[k]) dots[k] = acc_t(0);
              }
              sample_gradients(c, dots, a, height, width, gloc_i[2 * s], gloc_i[2 * s + 1], gattn_i[s]);
            }
          }
        }
      }
    }
  });
}

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Problem p =
      check_problem(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, c10::kCPU);
  at::Tensor out = at::empty({p.B, p.Q, p.H * p.D}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t>(p, value.data_ptr<scalar_t>(), sampling_locations.data_ptr<acc_t>(),
                             attention_weights.data_ptr<acc_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                     const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                     const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  const Problem p =
      check_problem(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, c10::kCPU);
  check_grad_output(p, value, grad_output);
  at::Tensor grad_loc = at::empty_like(sampling_locations);
  at::Tensor grad_attn = at::empty_like(attention_weights);
  if (p.B * p.Q * p.H * p.L * p.P == 0 || p.D == 0) {
    return {at::zeros_like(value), grad_loc.zero_(), grad_attn.zero_()};
  }
  const auto acc_options = value.options().dtype(p.coord_dtype);
  const int64_t acc_bytes = p.coord_dtype == at::kDouble ? 8 : 4;
  const Partition part = backward_partition(p.B, p.H, p.Q, value.numel() * acc_bytes);
  // (G, B, S, H, D): one private accumulation buffer per query group
  at::Tensor buffers = at::zeros({part.groups, p.B, p.S, p.H, p.D}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t>(p, value.data_ptr<scalar_t>(), sampling_locations.data_ptr<acc_t>(),
                              attention_weights.data_ptr<acc_t>(), grad_output.data_ptr<scalar_t>(),
                              buffers.data_ptr<acc_t>(), part, grad_loc.data_ptr<acc_t>(),
                              grad_attn.data_ptr<acc_t>());
  });
  at::Tensor grad_value = part.groups == 1 ? buffers.select(0, 0) : buffers.sum(0);
  return {grad_value.to(value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace
}  // namespace msda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "maskformers multi-scale deformable attention, CPU kernels";
  m.def("forward", &msda::forward_cpu, "value (B,S,H,D), spatial_shapes (L,2), level_start_index (L,), "
        "sampling_locations (B,Q,H,L,P,2), attention_weights (B,Q,H,L,P) -> out (B,Q,H*D)",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::call_guard<py::gil_scoped_release>());
  m.def("backward", &msda::backward_cpu, "same inputs + grad_output (B,Q,H*D) -> (grad_value, grad_locations, "
        "grad_weights)",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("grad_output"), py::call_guard<py::gil_scoped_release>());
}
