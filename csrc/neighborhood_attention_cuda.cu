// CUDA kernels of 2-D neighborhood attention: a fused forward and a two-kernel backward.
//
// Thread mapping (forward and backward kernel 1): one "item" is a (pixel, head) pair; its D channels are
// cut into chunks of CPT = 8 consecutive channels and `lanes` = next power of two of the chunk count (at
// most 32, so D <= 256) consecutive threads serve one item, lane c owning chunk c. A neighbour's logit is
// the lanes' partial dot products summed with warp shuffles; every lane then holds it.
//
// Forward: per neighbour, logit (+ bias) -> streaming softmax (na::OnlineSoftmax) -> the lane's output
// chunk is rescaled and the value chunk added. Nothing per neighbour is stored: out and the log-sum-exp
// per item (for the backward) are the only writes.
// Backward kernel 1 (items = queries): P = exp(logit - lse), dP = dO . v_n for every neighbour (stored,
// (B, H, W, heads, K*K) in the accumulation type), delta = sum P dP, grad_query = scale * sum dS k_n, and
// dS = P (dP - delta) written over dP. Backward kernel 2 (items = keys): grad_key = scale * sum dS q and
// grad_value = sum P dO over the queries whose windows hold the key (na::query_of_key), no atomics. The
// bias gradient sums dS per (head, relative offset) with two one-hot contractions (deterministic).
//
// Loads: rows (pixel, head) are D contiguous numbers; with D % 8 == 0 and 16-byte aligned base pointers a
// chunk is read with vector loads, otherwise element by element with a bound check. Accumulation in
// float for 16-bit inputs (double for double).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "neighborhood_attention_bias.h"
#include "neighborhood_attention_checks.h"
#include "neighborhood_attention_math.h"

namespace na {
namespace {

constexpr int kThreads = 256;
constexpr int kCPT = 8;  // channels per thread
constexpr int kMaxHeadDim = 32 * kCPT;

struct Dims {
  int64_t items;  // B * H * W * heads
  int64_t H, W;
  int heads, D, K, dilation;
  int lane_bits;
};

// dst[i] = src[i] for the i < count channels a chunk holds (zeros beyond); kVec: 16-byte pieces.
template <typename scalar_t, bool kVec>
__device__ __forceinline__ void load_chunk(const scalar_t* __restrict__ src, int count,
                                           at::opmath_type<scalar_t> (&dst)[kCPT]) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (kVec) {
    constexpr int kPer = 16 / static_cast<int>(sizeof(scalar_t));
    alignas(16) scalar_t tmp[kCPT];
#pragma unroll
    for (int i = 0; i < kCPT / kPer; ++i) {
      *reinterpret_cast<uint4*>(tmp + i * kPer) = __ldg(reinterpret_cast<const uint4*>(src + i * kPer));
    }
#pragma unroll
    for (int i = 0; i < kCPT; ++i) dst[i] = static_cast<acc_t>(tmp[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kCPT; ++i) dst[i] = i < count ? static_cast<acc_t>(src[i]) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_chunk(scalar_t* __restrict__ dst, int count, const acc_t (&src)[kCPT]) {
#pragma unroll
  for (int i = 0; i < kCPT; ++i) {
    if (i < count) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t lane_sum(acc_t v, int lanes) {
  for (int offset = lanes >> 1; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Where an item's rows start and which neighbours it has.
struct Item {
  int64_t b, i, j, h;
  int64_t row_start, col_start, row_bias, col_bias;
};

__device__ __forceinline__ Item make_item(int64_t item, const Dims& d) {
  Item it;
  it.h = item % d.heads;
  const int64_t pix = item / d.heads;
  it.j = pix % d.W;
  it.i = (pix / d.W) % d.H;
  it.b = pix / (d.W * d.H);
  it.row_start = window_start(it.i, d.H, d.K, d.dilation);
  it.col_start = window_start(it.j, d.W, d.K, d.dilation);
  it.row_bias = bias_start(it.i, it.row_start, d.K, d.dilation);
  it.col_bias = bias_start(it.j, it.col_start, d.K, d.dilation);
  return it;
}

// Offset of the row (pixel (b, r, c), head h) in a (B, H, W, heads, D) tensor.
__device__ __forceinline__ int64_t row_offset(const Dims& d, int64_t b, int64_t r, int64_t c, int64_t h) {
  return (((b * d.H + r) * d.W + c) * d.heads + h) * d.D;
}

template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ query, const scalar_t* __restrict__ key,
                   const scalar_t* __restrict__ value, const scalar_t* __restrict__ rpb, scalar_t* __restrict__ out,
                   at::opmath_type<scalar_t>* __restrict__ lse, const Dims d, const at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lanes = 1 << d.lane_bits;
  const int lane = static_cast<int>(tid & (lanes - 1));
  // Threads past the last item stay alive without touching memory: every lane must reach the shuffles.
  const bool active = (tid >> d.lane_bits) < d.items;
  const Item it = make_item(active ? (tid >> d.lane_bits) : 0, d);
  const int c0 = lane * kCPT;
  const int count = active ? min(kCPT, d.D - c0) : 0;
  const bool loads = count > 0;
  const int R = 2 * d.K - 1;

  acc_t q[kCPT], acc[kCPT], row[kCPT];
#pragma unroll
  for (int c = 0; c < kCPT; ++c) acc[c] = acc_t(0);
  if (loads) {
    load_chunk<scalar_t, kVec>(query + row_offset(d, it.b, it.i, it.j, it.h) + c0, count, q);
  } else {
#pragma unroll
    for (int c = 0; c < kCPT; ++c) q[c] = acc_t(0);
  }
#pragma unroll
  for (int c = 0; c < kCPT; ++c) q[c] *= scale;

  OnlineSoftmax<acc_t> softmax;
  for (int ki = 0; ki < d.K; ++ki) {
    const int64_t r = it.row_start + static_cast<int64_t>(ki) * d.dilation;
    for (int kj = 0; kj < d.K; ++kj) {
      const int64_t offset = row_offset(d, it.b, r, it.col_start + static_cast<int64_t>(kj) * d.dilation, it.h) + c0;
      acc_t partial = acc_t(0);
      if (loads) {
        load_chunk<scalar_t, kVec>(key + offset, count, row);
#pragma unroll
        for (int c = 0; c < kCPT; ++c) partial += q[c] * row[c];
      }
      acc_t logit = lane_sum(partial, lanes);
      if (rpb != nullptr && active) {
        logit += static_cast<acc_t>(rpb[(it.h * R + it.row_bias + ki) * R + it.col_bias + kj]);
      }
      acc_t rescale, weight;
      softmax.add(logit, rescale, weight);
      if (loads) {
        load_chunk<scalar_t, kVec>(value + offset, count, row);
#pragma unroll
        for (int c = 0; c < kCPT; ++c) acc[c] = acc[c] * rescale + weight * row[c];
      }
    }
  }
  if (!active) return;
  if (loads) {
#pragma unroll
    for (int c = 0; c < kCPT; ++c) acc[c] /= softmax.sum;
    store_chunk(out + row_offset(d, it.b, it.i, it.j, it.h) + c0, count, acc);
  }
  if (lane == 0) lse[tid >> d.lane_bits] = softmax.lse();
}

template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kThreads)
    backward_query_kernel(const scalar_t* __restrict__ query, const scalar_t* __restrict__ key,
                          const scalar_t* __restrict__ value, const scalar_t* __restrict__ rpb,
                          const at::opmath_type<scalar_t>* __restrict__ lse, const scalar_t* __restrict__ grad_out,
                          at::opmath_type<scalar_t>* __restrict__ probs,
                          at::opmath_type<scalar_t>* __restrict__ grad_logits,
                          scalar_t* __restrict__ grad_query, const Dims d, const at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lanes = 1 << d.lane_bits;
  const int lane = static_cast<int>(tid & (lanes - 1));
  const bool active = (tid >> d.lane_bits) < d.items;
  const int64_t item = active ? (tid >> d.lane_bits) : 0;
  const Item it = make_item(item, d);
  const int c0 = lane * kCPT;
  const int count = active ? min(kCPT, d.D - c0) : 0;
  const bool loads = count > 0;
  const int R = 2 * d.K - 1;
  const int KK = d.K * d.K;
  acc_t* P = probs + item * KK;
  acc_t* dS = grad_logits + item * KK;

  acc_t q[kCPT], go[kCPT], row[kCPT];
  const int64_t own = row_offset(d, it.b, it.i, it.j, it.h) + c0;
  if (loads) {
    load_chunk<scalar_t, kVec>(query + own, count, q);
    load_chunk<scalar_t, kVec>(grad_out + own, count, go);
  } else {
#pragma unroll
    for (int c = 0; c < kCPT; ++c) q[c] = go[c] = acc_t(0);
  }
#pragma unroll
  for (int c = 0; c < kCPT; ++c) q[c] *= scale;
  const acc_t l = active ? lse[item] : acc_t(0);

  // pass 1: P and dP of every neighbour (lane 0 stores them), delta = sum P dP
  acc_t delta = acc_t(0);
  for (int ki = 0; ki < d.K; ++ki) {
    const int64_t r = it.row_start + static_cast<int64_t>(ki) * d.dilation;
    for (int kj = 0; kj < d.K; ++kj) {
      const int64_t offset = row_offset(d, it.b, r, it.col_start + static_cast<int64_t>(kj) * d.dilation, it.h) + c0;
      acc_t qk = acc_t(0), gv = acc_t(0);
      if (loads) {
        load_chunk<scalar_t, kVec>(key + offset, count, row);
#pragma unroll
        for (int c = 0; c < kCPT; ++c) qk += q[c] * row[c];
        load_chunk<scalar_t, kVec>(value + offset, count, row);
#pragma unroll
        for (int c = 0; c < kCPT; ++c) gv += go[c] * row[c];
      }
      acc_t logit = lane_sum(qk, lanes);
      const acc_t dp = lane_sum(gv, lanes);
      if (rpb != nullptr && active) {
        logit += static_cast<acc_t>(rpb[(it.h * R + it.row_bias + ki) * R + it.col_bias + kj]);
      }
      const acc_t p = exp_(logit - l);
      delta += p * dp;
      if (active && lane == 0) {
        P[ki * d.K + kj] = p;
        dS[ki * d.K + kj] = dp;
      }
    }
  }
  __syncwarp();  // lane 0's stores are read by every lane below

  // pass 2: grad_query = scale * sum_n P (dP - delta) k_n
  acc_t gq[kCPT];
#pragma unroll
  for (int c = 0; c < kCPT; ++c) gq[c] = acc_t(0);
  if (loads) {
    for (int ki = 0; ki < d.K; ++ki) {
      const int64_t r = it.row_start + static_cast<int64_t>(ki) * d.dilation;
      for (int kj = 0; kj < d.K; ++kj) {
        const int n = ki * d.K + kj;
        const acc_t ds = P[n] * (dS[n] - delta) * scale;
        load_chunk<scalar_t, kVec>(
            key + row_offset(d, it.b, r, it.col_start + static_cast<int64_t>(kj) * d.dilation, it.h) + c0, count, row);
#pragma unroll
        for (int c = 0; c < kCPT; ++c) gq[c] += ds * row[c];
      }
    }
    store_chunk(grad_query + own, count, gq);
  }
  __syncwarp();  // every lane has read dP before lane 0 overwrites it with dS
  if (active && lane == 0) {
    for (int n = 0; n < KK; ++n) dS[n] = P[n] * (dS[n] - delta);
  }
}

template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kThreads)
    backward_key_kernel(const scalar_t* __restrict__ query, const scalar_t* __restrict__ grad_out,
                        const at::opmath_type<scalar_t>* __restrict__ probs,
                        const at::opmath_type<scalar_t>* __restrict__ grad_logits, scalar_t* __restrict__ grad_key,
                        scalar_t* __restrict__ grad_value, const Dims d, const at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lanes = 1 << d.lane_bits;
  const int lane = static_cast<int>(tid & (lanes - 1));
  if ((tid >> d.lane_bits) >= d.items) return;  // no warp-collective operations here
  const Item key_item = make_item(tid >> d.lane_bits, d);
  const int c0 = lane * kCPT;
  const int count = min(kCPT, d.D - c0);
  if (count <= 0) return;
  const int KK = d.K * d.K;

  acc_t gk[kCPT], gv[kCPT], row[kCPT];
#pragma unroll
  for (int c = 0; c < kCPT; ++c) gk[c] = gv[c] = acc_t(0);
  for (int ci = 0; ci < 2 * d.K - 1; ++ci) {
    int64_t i, ki;
    if (!query_of_key(key_item.i, ci, d.H, d.K, d.dilation, i, ki)) continue;
    for (int cj = 0; cj < 2 * d.K - 1; ++cj) {
      int64_t j, kj;
      if (!query_of_key(key_item.j, cj, d.W, d.K, d.dilation, j, kj)) continue;
      const int64_t query_row = row_offset(d, key_item.b, i, j, key_item.h);
      const int64_t o = (query_row / d.D) * KK + ki * d.K + kj;
      const acc_t ds = grad_logits[o] * scale;
      const acc_t p = probs[o];
      load_chunk<scalar_t, kVec>(query + query_row + c0, count, row);
#pragma unroll
      for (int c = 0; c < kCPT; ++c) gk[c] += ds * row[c];
      load_chunk<scalar_t, kVec>(grad_out + query_row + c0, count, row);
#pragma unroll
      for (int c = 0; c < kCPT; ++c) gv[c] += p * row[c];
    }
  }
  const int64_t own = row_offset(d, key_item.b, key_item.i, key_item.j, key_item.h) + c0;
  store_chunk(grad_key + own, count, gk);
  store_chunk(grad_value + own, count, gv);
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

Dims make_dims(const Problem& p) {
  TORCH_CHECK(p.D <= kMaxHeadDim, "neighborhood_attention_2d: the CUDA kernel supports head dims up to ", kMaxHeadDim,
              ", got D = ", p.D);
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(p.heads <= kMax && p.kernel * p.kernel <= kMax, "neighborhood_attention_2d: heads and kernel_size^2 "
              "must fit in int32 for the CUDA kernel, got heads = ", p.heads, ", kernel_size = ", p.kernel);
  Dims d;
  d.items = p.pixels() * p.heads;
  d.H = p.H;
  d.W = p.W;
  d.heads = static_cast<int>(p.heads);
  d.D = static_cast<int>(p.D);
  d.K = static_cast<int>(p.kernel);
  d.dilation = static_cast<int>(p.dilation);
  const int chunks = static_cast<int>((p.D + kCPT - 1) / kCPT);
  int lanes = 1;
  d.lane_bits = 0;
  while (lanes < chunks) {
    lanes <<= 1;
    ++d.lane_bits;
  }
  return d;
}

unsigned int grid_for(const Dims& d) {
  const int64_t blocks = ((d.items << d.lane_bits) + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "neighborhood_attention_2d: problem too large for one "
              "launch (", d.items, " (pixel, head) items)");
  return static_cast<unsigned int>(blocks);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                                const at::Tensor& rpb, int64_t kernel_size, int64_t dilation,
                                                double scale) {
  const Problem p = check_problem(query, key, value, rpb, kernel_size, dilation, c10::kCUDA);
  const Dims d = make_dims(p);
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor out = at::empty_like(query);
  at::Tensor lse = at::empty({p.B, p.H, p.W, p.heads}, query.options().dtype(p.acc_dtype));
  if (d.items == 0) return {out, lse};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "neighborhood_attention_forward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* bias = p.has_bias ? rpb.data_ptr<scalar_t>() : nullptr;
    const bool vec = p.D % kCPT == 0 && aligned16(query.data_ptr()) && aligned16(key.data_ptr()) &&
                     aligned16(value.data_ptr());
    if (vec) {
      forward_kernel<scalar_t, true><<<grid_for(d), kThreads, 0, stream>>>(
          query.data_ptr<scalar_t>(), key.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), bias,
          out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), d, static_cast<acc_t>(scale));
    } else {
      forward_kernel<scalar_t, false><<<grid_for(d), kThreads, 0, stream>>>(
          query.data_ptr<scalar_t>(), key.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), bias,
          out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), d, static_cast<acc_t>(scale));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& rpb,
    const at::Tensor& lse, const at::Tensor& grad_out, int64_t kernel_size, int64_t dilation, double scale) {
  const Problem p = check_problem(query, key, value, rpb, kernel_size, dilation, c10::kCUDA);
  check_backward_inputs(p, query, lse, grad_out);
  const Dims d = make_dims(p);
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor grad_q = at::empty_like(query), grad_k = at::empty_like(key), grad_v = at::empty_like(value);
  if (d.items == 0 || p.D == 0) {
    grad_q.zero_(), grad_k.zero_(), grad_v.zero_();
    return {grad_q, grad_k, grad_v, p.has_bias ? at::zeros_like(rpb) : at::empty({0}, query.options())};
  }
  const auto acc_options = query.options().dtype(p.acc_dtype);
  at::Tensor probs = at::empty({p.B, p.H, p.W, p.heads, p.neighbours()}, acc_options);
  at::Tensor grad_logits = at::empty_like(probs);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "neighborhood_attention_backward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* bias = p.has_bias ? rpb.data_ptr<scalar_t>() : nullptr;
    const acc_t s = static_cast<acc_t>(scale);
    const bool vec = p.D % kCPT == 0 && aligned16(query.data_ptr()) && aligned16(key.data_ptr()) &&
                     aligned16(value.data_ptr()) && aligned16(grad_out.data_ptr());
    if (vec) {
      backward_query_kernel<scalar_t, true><<<grid_for(d), kThreads, 0, stream>>>(
          query.data_ptr<scalar_t>(), key.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), bias, lse.data_ptr<acc_t>(),
          grad_out.data_ptr<scalar_t>(), probs.data_ptr<acc_t>(), grad_logits.data_ptr<acc_t>(),
          grad_q.data_ptr<scalar_t>(), d, s);
    } else {
      backward_query_kernel<scalar_t, false><<<grid_for(d), kThreads, 0, stream>>>(
          query.data_ptr<scalar_t>(), key.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), bias, lse.data_ptr<acc_t>(),
          grad_out.data_ptr<scalar_t>(), probs.data_ptr<acc_t>(), grad_logits.data_ptr<acc_t>(),
          grad_q.data_ptr<scalar_t>(), d, s);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (vec) {
      backward_key_kernel<scalar_t, true><<<grid_for(d), kThreads, 0, stream>>>(
          query.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(), probs.data_ptr<acc_t>(),
          grad_logits.data_ptr<acc_t>(), grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(), d, s);
    } else {
      backward_key_kernel<scalar_t, false><<<grid_for(d), kThreads, 0, stream>>>(
          query.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(), probs.data_ptr<acc_t>(),
          grad_logits.data_ptr<acc_t>(), grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(), d, s);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor grad_rpb = p.has_bias ? bias_gradient(p, grad_logits).to(rpb.scalar_type())
                                   : at::empty({0}, query.options());
  return {grad_q, grad_k, grad_v, grad_rpb};
}

}  // namespace na
