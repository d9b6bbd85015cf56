// CUDA kernels of multi-scale deformable attention (forward and backward).
//
// Thread mapping: one "item" is a (batch, query, head) triple. Its D channels are cut into chunks of
// CPT consecutive channels; `lanes` = next power of two of the chunk count (at most 32) consecutive
// threads serve one item, lane j taking chunks j, j + lanes, ... So the per-sample work (location
// and weight loads, bilinear corners from ms_deform_attn_math.h) is done once per CPT channels, not
// once per channel, and the lanes of an item sit in one aligned segment of a warp.
//
// Loads: value rows (S, H, D) are contiguous per (position, head); when D is a multiple of CPT and the
// pointers are aligned, a chunk is read with 16-byte (or 8-byte) vector loads, otherwise element by
// element with a bound check (any D works). Accumulation is in float for 16-bit inputs (double for
// double). The level table (at most kMaxCudaLevels levels) travels as a kernel argument.
//
// Backward: grad_value is accumulated with atomics into a float buffer for 16-bit inputs (cast at the
// end) or into grad_value itself for float/double; float4 vector atomics on sm_90+. The location and
// weight gradients of a sample are partial sums over an item's lanes, reduced with warp shuffles
// (blocks of 256 threads, no shared memory, no __syncthreads).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <utility>
#include <type_traits>

#include "ms_deform_attn_checks.h"
#include "ms_deform_attn_math.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define MSDA_VECTOR_ATOMICS 1
#else
#define MSDA_VECTOR_ATOMICS 0
#endif

namespace msda {
namespace {

constexpr int kThreads = 256;

struct LevelTable {
  int64_t start[kMaxCudaLevels];
  int64_t height[kMaxCudaLevels];
  int64_t width[kMaxCudaLevels];
};

struct Dims {
  int64_t items;  // B * Q * H
  int64_t QH;     // Q * H
  int64_t S;
  int H, D, L, P;
  int chunks;     // ceil(D / CPT)
  int lane_bits;  // log2(lanes)
};

template <int Bytes>
struct Piece;
template <>
struct Piece<16> {
  using type = uint4;
};
template <>
struct Piece<8> {
  using type = uint2;
};
template <>
struct Piece<4> {
  using type = unsigned int;
};
template <>
struct Piece<2> {
  using type = unsigned short;
};

// dst[i] = src[i] for i < N (kVec: aligned, all N present) or i < count (scalar path, zeros beyond)
template <typename scalar_t, int N, bool kVec>
__device__ __forceinline__ void load_chunk(const scalar_t* __restrict__ src, int count,
                                           at::opmath_type<scalar_t> (&dst)[N]) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (kVec) {
    constexpr int kBytes = N * static_cast<int>(sizeof(scalar_t));
    constexpr int kPieceBytes = kBytes < 16 ? kBytes : 16;
    constexpr int kPer = kPieceBytes / static_cast<int>(sizeof(scalar_t));
    using piece_t = typename Piece<kPieceBytes>::type;
    alignas(16) scalar_t tmp[N];
#pragma unroll
    for (int i = 0; i < N / kPer; ++i) {
      *reinterpret_cast<piece_t*>(tmp + i * kPer) = __ldg(reinterpret_cast<const piece_t*>(src + i * kPer));
    }
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = static_cast<acc_t>(tmp[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = i < count ? static_cast<acc_t>(src[i]) : acc_t(0);
  }
}

template <typename scalar_t, int N, bool kVec>
__device__ __forceinline__ void store_chunk(scalar_t* __restrict__ dst, int count,
                                            const at::opmath_type<scalar_t> (&src)[N]) {
  if constexpr (kVec) {
    constexpr int kBytes = N * static_cast<int>(sizeof(scalar_t));
    constexpr int kPieceBytes = kBytes < 16 ? kBytes : 16;
    constexpr int kPer = kPieceBytes / static_cast<int>(sizeof(scalar_t));
    using piece_t = typename Piece<kPieceBytes>::type;
    alignas(16) scalar_t tmp[N];
#pragma unroll
    for (int i = 0; i < N; ++i) tmp[i] = static_cast<scalar_t>(src[i]);
#pragma unroll
    for (int i = 0; i < N / kPer; ++i) {
      *reinterpret_cast<piece_t*>(dst + i * kPer) = *reinterpret_cast<const piece_t*>(tmp + i * kPer);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (i < count) dst[i] = static_cast<scalar_t>(src[i]);
    }
  }
}

// dst[i] += v[i] atomically (same i-range rules as load_chunk)
template <typename acc_t, int N, bool kVec>
__device__ __forceinline__ void atomic_add_chunk(acc_t* dst, int count, const acc_t (&v)[N]) {
  constexpr bool kFloat4 = MSDA_VECTOR_ATOMICS && kVec && std::is_same_v<acc_t, float> && N % 4 == 0;
  if constexpr (kFloat4) {
#if MSDA_VECTOR_ATOMICS
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      atomicAdd(reinterpret_cast<float4*>(dst) + i, make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]));
    }
#endif
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (kVec || i < count) atomicAdd(dst + i, v[i]);
    }
  }
}

template <typename scalar_t, int CPT, bool kVec>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ value, const at::opmath_type<scalar_t>* __restrict__ loc,
                   const at::opmath_type<scalar_t>* __restrict__ attn, scalar_t* __restrict__ out,
                   const __grid_constant__ LevelTable levels, const Dims dims) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t item = tid >> dims.lane_bits;
  if (item >= dims.items) return;  // no warp-collective operations in the forward
  const int lanes = 1 << dims.lane_bits;
  const int lane = static_cast<int>(tid & (lanes - 1));
  const int64_t b = item / dims.QH;
  const int64_t h = item % dims.H;
  const int64_t row_stride = static_cast<int64_t>(dims.H) * dims.D;
  const scalar_t* v_bh = value + (b * dims.S * dims.H + h) * dims.D;
  const acc_t* loc_i = loc + item * dims.L * dims.P * 2;
  const acc_t* attn_i = attn + item * dims.L * dims.P;

  for (int chunk = lane; chunk < dims.chunks; chunk += lanes) {
    const int c0 = chunk * CPT;
    const int count = min(CPT, dims.D - c0);
    acc_t acc[CPT];
#pragma unroll
    for (int i = 0; i < CPT; ++i) acc[i] = acc_t(0);
    for (int l = 0; l < dims.L; ++l) {
      const int64_t height = levels.height[l];
      const int64_t width = levels.width[l];
      const scalar_t* v_l = v_bh + levels.start[l] * row_stride + c0;
      for (int p = 0; p < dims.P; ++p) {
        const int s = l * dims.P + p;
        Corners<acc_t> c;
        if (!bilinear_corners(loc_i[2 * s], loc_i[2 * s + 1], height, width, c)) continue;
        const acc_t a = attn_i[s];
        acc_t v[4][CPT];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (c.inside[k]) {
            load_chunk<scalar_t, CPT, kVec>(v_l + c.pos[k] * row_stride, count, v[k]);
          } else {
#pragma unroll
            for (int i = 0; i < CPT; ++i) v[k][i] = acc_t(0);
          }
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const acc_t coef = a * c.weight[k];
#pragma unroll
          for (int i = 0; i < CPT; ++i) acc[i] += coef * v[k][i];
        }
      }
    }
    store_chunk<scalar_t, CPT, kVec>(out + item * dims.D + c0, count, acc);
  }
}

template <typename scalar_t, int CPT, bool kVec>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ value, const at::opmath_type<scalar_t>* __restrict__ loc,
                    const at::opmath_type<scalar_t>* __restrict__ attn, const scalar_t* __restrict__ grad_out,
                    at::opmath_type<scalar_t>* __restrict__ grad_value, at::opmath_type<scalar_t>* __restrict__ grad_loc,
                    at::opmath_type<scalar_t>* __restrict__ grad_attn, const __grid_constant__ LevelTable levels,
                    const Dims dims) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lanes = 1 << dims.lane_bits;
  const int lane = static_cast<int>(tid & (lanes - 1));
  // Threads past the last item stay alive: every lane of a warp must reach the shuffles below.
  const bool active = (tid >> dims.lane_bits) < dims.items;
  const int64_t item = active ? (tid >> dims.lane_bits) : 0;
  const int64_t b = item / dims.QH;
  const int64_t h = item % dims.H;
  const int64_t row_stride = static_cast<int64_t>(dims.H) * dims.D;
  const int64_t bh_offset = (b * dims.S * dims.H + h) * dims.D;
  const scalar_t* v_bh = value + bh_offset;
  acc_t* gv_bh = grad_value + bh_offset;
  const acc_t* loc_i = loc + item * dims.L * dims.P * 2;
  const acc_t* attn_i = attn + item * dims.L * dims.P;
  const scalar_t* go_i = grad_out + item * dims.D;
  const int passes = (dims.chunks + lanes - 1) / lanes;

  // the common case (one chunk per lane) keeps this lane's grad_output chunk in registers
  acc_t g[CPT];
#pragma unroll
  for (int i = 0; i < CPT; ++i) g[i] = acc_t(0);
  if (passes == 1 && active && lane < dims.chunks) {
    load_chunk<scalar_t, CPT, kVec>(go_i + lane * CPT, min(CPT, dims.D - lane * CPT), g);
  }

  for (int l = 0; l < dims.L; ++l) {
    const int64_t height = levels.height[l];
    const int64_t width = levels.width[l];
    const int64_t level_offset = levels.start[l] * row_stride;
    for (int p = 0; p < dims.P; ++p) {
      const int s = l * dims.P + p;
      acc_t grad_x = acc_t(0), grad_y = acc_t(0), grad_a = acc_t(0);
      Corners<acc_t> c;
      if (active && bilinear_corners(loc_i[2 * s], loc_i[2 * s + 1], height, width, c)) {
        const acc_t a = attn_i[s];
        acc_t dots[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
        for (int pass = 0; pass < passes; ++pass) {
          const int chunk = lane + pass * lanes;
          if (chunk >= dims.chunks) break;
          const int c0 = chunk * CPT;
          const int count = min(CPT, dims.D - c0);
          if (passes > 1) load_chunk<scalar_t, CPT, kVec>(go_i + c0, count, g);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (!c.inside[k]) continue;
            const int64_t offset = level_offset + c.pos[k] * row_stride + c0;
            acc_t v[CPT];
            load_chunk<scalar_t, CPT, kVec>(v_bh + offset, count, v);
            const acc_t coef = a * c.weight[k];
            acc_t upd[CPT];
            acc_t dot = acc_t(0);
#pragma unroll
            for (int i = 0; i < CPT; ++i) {
              dot += g[i] * v[i];
              upd[i] = coef * g[i];
            }
            dots[k] += dot;
            atomic_add_chunk<acc_t, CPT, kVec>(gv_bh + offset, count, upd);
          }
        }
        sample_gradients(c, dots, a, height, width, grad_x, grad_y, grad_a);
      }
      // sum the partial gradients over the lanes of this item (an aligned power-of-two segment)
      for (int offset = lanes >> 1; offset > 0; offset >>= 1) {
        grad_x += __shfl_xor_sync(0xffffffffu, grad_x, offset);
        grad_y += __shfl_xor_sync(0xffffffffu, grad_y, offset);
        grad_a += __shfl_xor_sync(0xffffffffu, grad_a, offset);
      }
      if (active && lane == 0) {
        const int64_t o = item * dims.L * dims.P + s;
        grad_loc[2 * o] = grad_x;
        grad_loc[2 * o + 1] = grad_y;
        grad_attn[o] = grad_a;
      }
    }
  }
}

bool aligned(const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Channels per thread and whether vector loads are safe for these pointers.
template <typename scalar_t>
std::pair<int, bool> chunk_config(int64_t D, std::initializer_list<const void*> ptrs) {
  // 16-byte aligned base pointers and D % CPT == 0 make every chunk start aligned to its load width
  bool ok = true;
  for (const void* ptr : ptrs) ok = ok && aligned(ptr, 16);
  if (ok && D % 8 == 0) return {8, true};
  if (ok && D % 4 == 0) return {4, true};
  return {4, false};
}

Dims make_dims(const Problem& p, int cpt) {
  Dims d;
  d.items = p.B * p.Q * p.H;
  d.QH = p.Q * p.H;
  d.S = p.S;
  d.H = static_cast<int>(p.H);
  d.D = static_cast<int>(p.D);
  d.L = static_cast<int>(p.L);
  d.P = static_cast<int>(p.P);
  d.chunks = static_cast<int>((p.D + cpt - 1) / cpt);
  int lanes = 1;
  d.lane_bits = 0;
  while (lanes < d.chunks && lanes < 32) {
    lanes <<= 1;
    ++d.lane_bits;
  }
  return d;
}

LevelTable make_levels(const Problem& p) {
  TORCH_CHECK(p.L <= kMaxCudaLevels, "ms_deform_attn: the CUDA kernel supports at most ", kMaxCudaLevels,
              " levels, got L = ", p.L);
  LevelTable t{};
  for (int64_t l = 0; l < p.L; ++l) {
    t.start[l] = p.starts[l];
    t.height[l] = p.heights[l];
    t.width[l] = p.widths[l];
  }
  return t;
}

void check_int_sizes(const Problem& p) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(p.H <= kMax && p.D <= kMax && p.L * p.P * 2 <= kMax,
              "ms_deform_attn: H, D and L*P*2 must fit in int32 for the CUDA kernel, got H=", p.H, ", D=", p.D,
              ", L=", p.L, ", P=", p.P);
}

unsigned int grid_for(const Dims& d) {
  const int64_t threads = d.items << d.lane_bits;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "ms_deform_attn: problem too large for one launch (",
              d.items, " (batch, query, head) items)");
  return static_cast<unsigned int>(blocks);
}

template <typename scalar_t, int CPT, bool kVec>
void launch_forward(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn, at::Tensor& out,
                    const LevelTable& levels, const Dims& dims, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  forward_kernel<scalar_t, CPT, kVec><<<grid_for(dims), kThreads, 0, stream>>>(
      value.data_ptr<scalar_t>(), loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), levels,
      dims);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int CPT, bool kVec>
void launch_backward(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn,
                     const at::Tensor& grad_out, at::Tensor& grad_value_acc, at::Tensor& grad_loc,
                     at::Tensor& grad_attn, const LevelTable& levels, const Dims& dims, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  backward_kernel<scalar_t, CPT, kVec><<<grid_for(dims), kThreads, 0, stream>>>(
      value.data_ptr<scalar_t>(), loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), grad_out.data_ptr<scalar_t>(),
      grad_value_acc.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(), grad_attn.data_ptr<acc_t>(), levels, dims);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                        const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Problem p =
      check_problem(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, c10::kCUDA);
  check_int_sizes(p);
  const LevelTable levels = make_levels(p);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor out = at::empty({p.B, p.Q, p.H * p.D}, value.options());
  if (out.numel() == 0) return out;
  if (p.L * p.P == 0) return out.zero_();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    const auto [cpt, vec] = chunk_config<scalar_t>(p.D, {value.data_ptr(), out.data_ptr()});
    const Dims dims = make_dims(p, cpt);
    if (cpt == 8) {
      launch_forward<scalar_t, 8, true>(value, sampling_locations, attention_weights, out, levels, dims, stream);
    } else if (vec) {
      launch_forward<scalar_t, 4, true>(value, sampling_locations, attention_weights, out, levels, dims, stream);
    } else {
      launch_forward<scalar_t, 4, false>(value, sampling_locations, attention_weights, out, levels, dims, stream);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                             const at::Tensor& level_start_index,
                                                             const at::Tensor& sampling_locations,
                                                             const at::Tensor& attention_weights,
                                                             const at::Tensor& grad_output) {
  const Problem p =
      check_problem(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, c10::kCUDA);
  check_grad_output(p, value, grad_output);
  check_int_sizes(p);
  const LevelTable levels = make_levels(p);
  const c10::cuda::CUDAGuard guard(value.device());
  // float accumulation buffer for 16-bit values; grad_value itself for float and double
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(p.coord_dtype));
  at::Tensor grad_loc = at::empty_like(sampling_locations);
  at::Tensor grad_attn = at::empty_like(attention_weights);
  if (p.B * p.Q * p.H * p.L * p.P == 0 || p.D == 0) {
    return {grad_value_acc.to(value.scalar_type()), grad_loc.zero_(), grad_attn.zero_()};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    const auto [cpt, vec] =
        chunk_config<scalar_t>(p.D, {value.data_ptr(), grad_output.data_ptr(), grad_value_acc.data_ptr()});
    const Dims dims = make_dims(p, cpt);
    if (cpt == 8) {
      launch_backward<scalar_t, 8, true>(value, sampling_locations, attention_weights, grad_output, grad_value_acc,
                                         grad_loc, grad_attn, levels, dims, stream);
    } else if (vec) {
      launch_backward<scalar_t, 4, true>(value, sampling_locations, attention_weights, grad_output, grad_value_acc,
                                         grad_loc, grad_attn, levels, dims, stream);
    } else {
      launch_backward<scalar_t, 4, false>(value, sampling_locations, attention_weights, grad_output, grad_value_acc,
                                          grad_loc, grad_attn, levels, dims, stream);
    }
  });
  return {grad_value_acc.to(value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace msda
