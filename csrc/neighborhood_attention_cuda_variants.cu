// CUDA kernel variants of 2-D neighborhood attention, selectable beside the default kernels of
// neighborhood_attention_cuda.cu (which stay the default, unchanged). Same contract and argument checks
// (neighborhood_attention_checks.h), same window and bias rules (neighborhood_attention_math.h).
//
// "tensor_core" forward (bfloat16 / float16, head dim 16, 32 or 64): the logits and the weighted sum are
// dense tile products on tensor cores (nvcuda::wmma 16x16x16, float accumulation) instead of one dot
// product per (pixel, neighbour) on the CUDA cores.
//   * A block takes an 8 x 8 tile of query pixels of one dilation group of one (batch, head). Window
//     starts grow monotonically along an axis, so the union of the 64 windows is one rectangle of at
//     most (8 + K - 1)^2 keys of that group: the key region.
//   * The region is visited in chunks of KC keys (row-major over the region): the chunk's keys and
//     values are staged in shared memory, each warp multiplies its 16 queries with the chunk's keys
//     (S = Q K^T), turns its rows of S into probabilities with a streaming softmax (scale, relative
//     position bias, -inf outside the query's own K x K window), and adds P V to its rows of the output
//     (kept in shared memory in float, rescaled when a row's maximum grows), all on warp-private rows.
//   * The output is divided by the softmax sum at the end; the log-sum-exp per (pixel, head) is written
//     for the default backward, which this variant shares.
// Half of the region's keys fall outside a given query's window (K^2 of (8 + K - 1)^2): tensor cores do
// that wasted work faster than CUDA cores do the useful work alone. P is rounded to the input dtype
// before P V, as in flash attention.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

#include "neighborhood_attention_checks.h"
#include "neighborhood_attention_math.h"

namespace na {
namespace variants {
namespace {

constexpr int kTile = 8;              // query tile side (pixels of one dilation group)
constexpr int kQueries = kTile * kTile;
constexpr int kWarps = kQueries / 16;  // one warp per 16 queries
constexpr int kThreads = 32 * kWarps;

// the wmma element type of a 16-bit ATen type (same bits)
template <typename scalar_t>
struct Wmma;
template <>
struct Wmma<at::BFloat16> {
  using type = __nv_bfloat16;
  static __device__ __forceinline__ type from_float(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Wmma<at::Half> {
  using type = __half;
  static __device__ __forceinline__ type from_float(float v) { return __float2half_rn(v); }
};

template <int D>
constexpr int kChunk = D >= 64 ? 32 : 64;  // keys per chunk: shared memory stays under 48 KiB

// One query of a block's tile: where its window lies in the key region, where its bias entries start,
// where its row is in (B, H, W, heads, D) tensors.
struct RowInfo {
  int64_t own;
  int win_r, win_c, bias_r, bias_c;
  bool valid;
};

struct Dims {
  int64_t H, W;
  int heads, K, dilation;
  int tiles_r, tiles_c;  // query tiles per dilation group along rows / columns (of the largest group)
};

// Offset of the row (pixel (b, r, c), head h) in a (B, H, W, heads, D) tensor.
__device__ __forceinline__ int64_t row_offset(const Dims& d, int D, int64_t b, int64_t r, int64_t c, int64_t h) {
  return (((b * d.H + r) * d.W + c) * d.heads + h) * D;
}

// Copy `count` rows of D 16-bit numbers (16-byte pieces when aligned) from global memory into a
// shared-memory tile; rows with `valid(i) == false` are zero.
template <int D, typename T, typename RowOf>
__device__ __forceinline__ void stage_rows(T* __restrict__ dst, const T* __restrict__ src, int count, bool vec,
                                           RowOf row_of) {
  if (vec) {
    constexpr int kPer = 8;  // 16 bytes
    for (int i = threadIdx.x; i < count * (D / kPer); i += blockDim.x) {
      const int row = i / (D / kPer), part = i % (D / kPer);
      const int64_t at = row_of(row);
      uint4 bits = make_uint4(0u, 0u, 0u, 0u);
      if (at >= 0) bits = __ldg(reinterpret_cast<const uint4*>(src + at + part * kPer));
      *reinterpret_cast<uint4*>(dst + row * D + part * kPer) = bits;
    }
  } else {
    for (int i = threadIdx.x; i < count * D; i += blockDim.x) {
      const int row = i / D, ch = i % D;
      const int64_t at = row_of(row);
      unsigned short bits = 0;
      if (at >= 0) bits = reinterpret_cast<const unsigned short*>(src)[at + ch];
      reinterpret_cast<unsigned short*>(dst)[row * D + ch] = bits;
    }
  }
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kThreads)
    tensor_core_forward_kernel(const scalar_t* __restrict__ query, const scalar_t* __restrict__ key,
                               const scalar_t* __restrict__ value, const scalar_t* __restrict__ rpb,
                               scalar_t* __restrict__ out, float* __restrict__ lse, const Dims d, const float scale,
                               const bool vec) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using T = typename Wmma<scalar_t>::type;
  constexpr int KC = kChunk<D>;
  __shared__ __align__(32) T q_s[kQueries * D];
  __shared__ __align__(32) T k_s[KC * D];
  __shared__ __align__(32) T v_s[KC * D];
  __shared__ __align__(32) float s_s[kQueries * KC];
  __shared__ __align__(32) T p_s[kQueries * KC];
  __shared__ __align__(32) float o_s[kQueries * D];
  __shared__ RowInfo info[kQueries];
  __shared__ float m_s[kQueries];
  __shared__ float l_s[kQueries];

  // which tile: blockIdx.x = (row group, row tile) x (column group, column tile)
  const int across = d.dilation * d.tiles_c;
  const int rt = blockIdx.x / across, ct = blockIdx.x % across;
  const int ga = rt / d.tiles_r, gc = ct / d.tiles_c;  // dilation group (row, column)
  const int64_t g0_r = static_cast<int64_t>(rt % d.tiles_r) * kTile;  // first query, group-local
  const int64_t g0_c = static_cast<int64_t>(ct % d.tiles_c) * kTile;
  const int64_t n_r = (d.H - ga + d.dilation - 1) / d.dilation;  // members of the groups
  const int64_t n_c = (d.W - gc + d.dilation - 1) / d.dilation;
  const int q_rows = static_cast<int>(n_r - g0_r < kTile ? n_r - g0_r : kTile);
  const int q_cols = static_cast<int>(n_c - g0_c < kTile ? n_c - g0_c : kTile);
  if (q_rows <= 0 || q_cols <= 0) return;  // the whole block: this group has fewer members
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int K = d.K, dil = d.dilation;
  const int R = 2 * K - 1;

  // key region, group-local: rows [r_lo, r_lo + RH), columns [c_lo, c_lo + RW)
  auto local_start = [&](int64_t g, int64_t group, int64_t length) {
    return (window_start(g * dil + group, length, K, dil) - group) / dil;
  };
  const int64_t r_lo = local_start(g0_r, ga, d.H);
  const int64_t c_lo = local_start(g0_c, gc, d.W);
  const int RH = static_cast<int>(local_start(g0_r + q_rows - 1, ga, d.H) + K - r_lo);
  const int RW = static_cast<int>(local_start(g0_c + q_cols - 1, gc, d.W) + K - c_lo);
  const int region = RH * RW;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float kNegInf = -std::numeric_limits<float>::infinity();

  // per query: its window's first row / column within the region, its first bias entries, its running
  // softmax maximum and sum
  for (int i = threadIdx.x; i < kQueries; i += blockDim.x) {
    const int qi = i / kTile, qj = i % kTile;
    RowInfo ri{};
    ri.valid = qi < q_rows && qj < q_cols;
    if (ri.valid) {
      const int64_t pix_r = (g0_r + qi) * dil + ga, pix_c = (g0_c + qj) * dil + gc;
      const int64_t sr = window_start(pix_r, d.H, K, dil), sc = window_start(pix_c, d.W, K, dil);
      ri.win_r = static_cast<int>((sr - ga) / dil - r_lo);
      ri.win_c = static_cast<int>((sc - gc) / dil - c_lo);
      ri.bias_r = static_cast<int>(bias_start(pix_r, sr, K, dil));
      ri.bias_c = static_cast<int>(bias_start(pix_c, sc, K, dil));
      ri.own = row_offset(d, D, b, pix_r, pix_c, h);
    }
    info[i] = ri;
    m_s[i] = kNegInf;
    l_s[i] = 0.f;
  }

  // query tile (invalid queries: zero rows) and the output accumulator
  stage_rows<D>(q_s, reinterpret_cast<const T*>(query), kQueries, vec, [&](int i) -> int64_t {
    const int qi = i / kTile, qj = i % kTile;
    if (qi >= q_rows || qj >= q_cols) return -1;
    return row_offset(d, D, b, (g0_r + qi) * dil + ga, (g0_c + qj) * dil + gc, h);
  });
  for (int i = threadIdx.x; i < kQueries * D; i += blockDim.x) o_s[i] = 0.f;

  for (int base = 0; base < region; base += KC) {
    __syncthreads();  // the previous chunk's keys and values are no longer read (and q_s / o_s are ready)
    auto key_row = [&](int i) -> int64_t {
      const int idx = base + i;
      if (idx >= region) return -1;
      return row_offset(d, D, b, (r_lo + idx / RW) * dil + ga, (c_lo + idx % RW) * dil + gc, h);
    };
    stage_rows<D>(k_s, reinterpret_cast<const T*>(key), KC, vec, key_row);
    stage_rows<D>(v_s, reinterpret_cast<const T*>(value), KC, vec, key_row);
    __syncthreads();

    // S = Q K^T for this warp's 16 queries
    for (int j = 0; j < KC / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
        // the chunk's keys are read first: on the CPU emulator a missing barrier after their staging then
        // reads stale rows (a read after another warp-collective call would hide it)
        wmma::load_matrix_sync(bt, k_s + j * 16 * D + kk * 16, D);
        wmma::load_matrix_sync(a, q_s + warp * 16 * D + kk * 16, D);
        wmma::mma_sync(acc, a, bt, acc);
      }
      wmma::store_matrix_sync(s_s + warp * 16 * KC + j * 16, acc, KC, wmma::mem_row_major);
    }
    __syncwarp();

    // streaming softmax over this warp's rows, one row at a time, the lanes over the chunk's columns
    for (int r = 0; r < 16; ++r) {
      const int row = warp * 16 + r;
      const RowInfo ri = info[row];
      float logit[KC / 32];
      float chunk_max = kNegInf;
#pragma unroll
      for (int u = 0; u < KC / 32; ++u) {
        const int idx = base + lane + 32 * u;
        const int kr = idx / RW - ri.win_r, kc = idx % RW - ri.win_c;  // offset in the query's window
        logit[u] = kNegInf;
        if (ri.valid && idx < region && kr >= 0 && kr < K && kc >= 0 && kc < K) {
          logit[u] = s_s[row * KC + lane + 32 * u] * scale;
          if (rpb != nullptr) logit[u] += static_cast<float>(rpb[(h * R + ri.bias_r + kr) * R + ri.bias_c + kc]);
          chunk_max = fmaxf(chunk_max, logit[u]);
        }
      }
      for (int offset = 16; offset > 0; offset >>= 1) {
        chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, offset));
      }
      const float m_old = m_s[row];
      const float m_new = fmaxf(m_old, chunk_max);
      const float rescale = m_new == kNegInf ? 1.f : expf(m_old - m_new);
      float sum = 0.f;
#pragma unroll
      for (int u = 0; u < KC / 32; ++u) {
        const float p = logit[u] == kNegInf ? 0.f : expf(logit[u] - m_new);
        sum += p;
        p_s[row * KC + lane + 32 * u] = Wmma<scalar_t>::from_float(p);
      }
      for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
      for (int c = lane; c < D; c += 32) o_s[row * D + c] *= rescale;
      const float l_old = l_s[row];
      __syncwarp();  // every lane has read m_s[row] and l_s[row] before lane 0 replaces them
      if (lane == 0) {
        m_s[row] = m_new;
        l_s[row] = l_old * rescale + sum;
      }
    }
    __syncwarp();

    // O += P V for this warp's 16 queries
#pragma unroll
    for (int j = 0; j < D / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, o_s + warp * 16 * D + j * 16, D, wmma::mem_row_major);
      for (int kk = 0; kk < KC / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v;
        wmma::load_matrix_sync(a, p_s + warp * 16 * KC + kk * 16, KC);
        wmma::load_matrix_sync(v, v_s + kk * 16 * D + j * 16, D);
        wmma::mma_sync(acc, a, v, acc);
      }
      wmma::store_matrix_sync(o_s + warp * 16 * D + j * 16, acc, D, wmma::mem_row_major);
    }
    __syncwarp();
  }

  // out = O / sum, lse = max + log(sum), row by row (lanes over channels)
  for (int r = 0; r < 16; ++r) {
    const int row = warp * 16 + r;
    const RowInfo ri = info[row];
    if (!ri.valid) continue;
    const float l = l_s[row];
    for (int c = lane; c < D; c += 32) out[ri.own + c] = static_cast<scalar_t>(o_s[row * D + c] / l);
    if (lane == 0) lse[ri.own / D] = m_s[row] + logf(l);
  }
#endif
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename scalar_t, int D>
void launch_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const scalar_t* bias,
                    at::Tensor& out, at::Tensor& lse, const Dims& d, float scale, bool vec, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(d.dilation * d.tiles_r * d.dilation * d.tiles_c),
                  static_cast<unsigned int>(d.heads), static_cast<unsigned int>(query.size(0)));
  tensor_core_forward_kernel<scalar_t, D><<<grid, kThreads, 0, stream>>>(
      query.data_ptr<scalar_t>(), key.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), bias,
      out.data_ptr<scalar_t>(), lse.data_ptr<float>(), d, scale, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::string tensor_core_unsupported(const at::Tensor& query) {
  const c10::ScalarType dtype = query.scalar_type();
  const int64_t head_dim = query.dim() == 5 ? query.size(4) : -1;
  if (dtype != at::kBFloat16 && dtype != at::kHalf) {
    return std::string("dtype ") + c10::toString(dtype) + " (the tensor-core kernel takes bfloat16 and float16)";
  }
  if (head_dim != 16 && head_dim != 32 && head_dim != 64) {
    return "head dim " + std::to_string(head_dim) + " (the tensor-core kernel takes 16, 32 and 64)";
  }
  return "";
}

std::tuple<at::Tensor, at::Tensor> forward_tensor_core(const at::Tensor& query, const at::Tensor& key,
                                                       const at::Tensor& value, const at::Tensor& rpb,
                                                       int64_t kernel_size, int64_t dilation, double scale) {
  const Problem p = check_problem(query, key, value, rpb, kernel_size, dilation, c10::kCUDA);
  const std::string unsupported = tensor_core_unsupported(query);
  TORCH_CHECK(unsupported.empty(), "neighborhood_attention_2d: the tensor-core forward does not apply: ", unsupported);
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor out = at::empty_like(query);
  at::Tensor lse = at::empty({p.B, p.H, p.W, p.heads}, query.options().dtype(at::kFloat));
  if (p.pixels() * p.heads == 0) return {out, lse};
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  Dims d;
  d.H = p.H;
  d.W = p.W;
  d.heads = static_cast<int>(p.heads);
  d.K = static_cast<int>(p.kernel);
  d.dilation = static_cast<int>(p.dilation);
  const int64_t tiles_r = ((p.H + p.dilation - 1) / p.dilation + kTile - 1) / kTile;
  const int64_t tiles_c = ((p.W + p.dilation - 1) / p.dilation + kTile - 1) / kTile;
  TORCH_CHECK(p.dilation * tiles_r * p.dilation * tiles_c <= kMax && p.heads <= 65535 && p.B <= 65535,
              "neighborhood_attention_2d: problem too large for the tensor-core kernel's grid (H = ", p.H,
              ", W = ", p.W, ", heads = ", p.heads, ", B = ", p.B, ")");
  d.tiles_r = static_cast<int>(tiles_r);
  d.tiles_c = static_cast<int>(tiles_c);
  const bool vec = aligned16(query.data_ptr()) && aligned16(key.data_ptr()) && aligned16(value.data_ptr());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_SWITCH(query.scalar_type(), "neighborhood_attention_forward_tensor_core",
                     AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       const scalar_t* bias = p.has_bias ? rpb.data_ptr<scalar_t>() : nullptr;
                       if (p.D == 16) launch_forward<scalar_t, 16>(query, key, value, bias, out, lse, d, scale, vec, stream);
                       if (p.D == 32) launch_forward<scalar_t, 32>(query, key, value, bias, out, lse, d, scale, vec, stream);
                       if (p.D == 64) launch_forward<scalar_t, 64>(query, key, value, bias, out, lse, d, scale, vec, stream);
                     }) AT_DISPATCH_CASE(at::kHalf, [&] {
                       const scalar_t* bias = p.has_bias ? rpb.data_ptr<scalar_t>() : nullptr;
                       if (p.D == 16) launch_forward<scalar_t, 16>(query, key, value, bias, out, lse, d, scale, vec, stream);
                       if (p.D == 32) launch_forward<scalar_t, 32>(query, key, value, bias, out, lse, d, scale, vec, stream);
                       if (p.D == 64) launch_forward<scalar_t, 64>(query, key, value, bias, out, lse, d, scale, vec, stream);
                     }));
  return {out, lse};
}

}  // namespace variants
}  // namespace na
