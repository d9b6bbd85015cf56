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
//     for the backward (either backward kernel).
// Most of the region's keys fall outside a given query's window (K^2 of up to (8 + K - 1)^2): tensor
// cores do that wasted work faster than CUDA cores do the useful work alone. P is rounded to the input
// dtype before P V, as in flash attention.
//
// "tensor_core_bwd" backward (same dtypes and head dims): flash-attention's backward on the same tiles,
// in two kernels so that no gradient needs atomics. With delta = rowsum(dO * O) (computed by the caller),
// P = exp(scale q.k + bias - lse) and dS = P (dO.v - delta):
//   * query kernel (8 x 8 query tiles, chunks of their key region): S = Q K^T and dP = dO V^T, dS, then
//     dQ += scale dS K; dS of every (query, neighbour) is also written out for the bias gradient;
//   * key kernel (8 x 8 key tiles of one dilation group, chunks of the queries whose windows reach them,
//     again a rectangle): S^T = K Q^T and dP^T = V dO^T, then dV += P^T dO and dK += scale dS^T Q.
// The accumulators stay in wmma fragments (no rescaling in the backward); P and dS are rounded to the
// input dtype for their products, as in flash attention. The bias gradient sums dS per (head, offset)
// with the default kernels' one-hot contractions (neighborhood_attention_bias.h).
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
#include <type_traits>

#include "neighborhood_attention_bias.h"
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

// One axis of a block's tile: dilation group, first member (group-local) and member count of the tile.
struct AxisTile {
  int group;
  int64_t first;
  int count;  // <= 0: the group has no members here
};
__device__ __forceinline__ AxisTile axis_tile(int t, int tiles, int dilation, int64_t length) {
  AxisTile a;
  a.group = t / tiles;
  a.first = static_cast<int64_t>(t % tiles) * kTile;
  const int64_t members = (length - a.group + dilation - 1) / dilation;
  a.count = static_cast<int>(members - a.first < kTile ? members - a.first : kTile);
  return a;
}

// Group-local first window position of the group-local query g of dilation group `group`.
__device__ __forceinline__ int64_t local_window_start(int64_t g, int group, int64_t length, int K, int dilation) {
  return (window_start(g * dilation + group, length, K, dilation) - group) / dilation;
}

// Write this warp's 16 rows x D accumulator (D / 16 fragments) to rows of a global tensor, converted, through
// a per-warp 16 x 16 float scratch tile; row_of(i) gives the offset of the warp's row i, or -1 to skip it.
template <typename scalar_t, int D, typename Frag, typename RowOf>
__device__ __forceinline__ void write_rows(Frag (&acc)[D / 16], float* scratch, scalar_t* __restrict__ dst,
                                           RowOf row_of) {
  namespace wmma = nvcuda::wmma;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < D / 16; ++j) {
    wmma::store_matrix_sync(scratch, acc[j], 16, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int64_t at = row_of(e / 16);
      if (at >= 0) dst[at + j * 16 + e % 16] = static_cast<scalar_t>(scratch[e]);
    }
    __syncwarp();  // read before the next fragment overwrites the scratch tile
  }
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

// out (16 x N, row-major, leading dimension N) = A (this warp's 16 rows of D) x B^T (N rows of D), tiles of
// 16, fp32 accumulation; A and B are row-major shared-memory tiles with rows of D. B is read first: on the CPU
// emulator a missing barrier after B's staging then reads stale rows (a read after another warp-collective
// call would hide it).
template <typename T, int D, int N>
__device__ __forceinline__ void warp_a_bt(const T* a, const T* b, float* out) {
  namespace wmma = nvcuda::wmma;
#pragma unroll
  for (int j = 0; j < N / 16; ++j) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
      wmma::load_matrix_sync(fb, b + j * 16 * D + kk * 16, D);
      wmma::load_matrix_sync(fa, a + kk * 16, D);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(out + j * 16, acc, N, wmma::mem_row_major);
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
  const AxisTile tr = axis_tile(blockIdx.x / (d.dilation * d.tiles_c), d.tiles_r, d.dilation, d.H);
  const AxisTile tc = axis_tile(blockIdx.x % (d.dilation * d.tiles_c), d.tiles_c, d.dilation, d.W);
  if (tr.count <= 0 || tc.count <= 0) return;  // the whole block: this group has fewer members
  const int ga = tr.group, gc = tc.group;
  const int64_t g0_r = tr.first, g0_c = tc.first;
  const int q_rows = tr.count, q_cols = tc.count;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int K = d.K, dil = d.dilation;
  const int R = 2 * K - 1;

  // key region, group-local: rows [r_lo, r_lo + RH), columns [c_lo, c_lo + RW)
  const int64_t r_lo = local_window_start(g0_r, ga, d.H, K, dil);
  const int64_t c_lo = local_window_start(g0_c, gc, d.W, K, dil);
  const int RH = static_cast<int>(local_window_start(g0_r + q_rows - 1, ga, d.H, K, dil) + K - r_lo);
  const int RW = static_cast<int>(local_window_start(g0_c + q_cols - 1, gc, d.W, K, dil) + K - c_lo);
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
    warp_a_bt<T, D, KC>(q_s + warp * 16 * D, k_s, s_s + warp * 16 * KC);
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

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

constexpr int kChunkBwd = 32;  // keys per chunk of the query kernel
template <int D>
constexpr int kQueryChunk = D >= 64 ? 16 : 32;  // queries per chunk of the key kernel

// One query of a key tile's current chunk: its window (group-local), its first bias entries, its
// log-sum-exp and delta, where its row is.
struct QueryInfo {
  int64_t own;
  int win_r, win_c, bias_r, bias_c;
  float lse, delta;
  bool valid;
};

// One key of a key tile: group-local position and where its row is.
struct KeyInfo {
  int64_t own;
  int r, c;
  bool valid;
};

// Group-local queries g whose window [start(g), start(g) + K) meets the keys [k0, k0 + n): a contiguous
// range (window starts grow with g), within K - 1 of the keys (a window holds its own query).
__device__ __forceinline__ void query_range(int64_t k0, int n, int group, int64_t length, int K, int dilation,
                                            int64_t& lo, int64_t& hi) {
  const int64_t members = (length - group + dilation - 1) / dilation;
  lo = -1;
  hi = -2;
  const int64_t first = k0 - (K - 1) < 0 ? 0 : k0 - (K - 1);
  const int64_t last = k0 + n - 1 + (K - 1) < members - 1 ? k0 + n - 1 + (K - 1) : members - 1;
  for (int64_t g = first; g <= last; ++g) {
    const int64_t s = local_window_start(g, group, length, K, dilation);
    if (s <= k0 + n - 1 && s + K - 1 >= k0) {
      if (lo < 0) lo = g;
      hi = g;
    }
  }
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kThreads)
    tensor_core_backward_query_kernel(const scalar_t* __restrict__ query, const scalar_t* __restrict__ key,
                                      const scalar_t* __restrict__ value, const scalar_t* __restrict__ rpb,
                                      const float* __restrict__ lse, const float* __restrict__ delta,
                                      const scalar_t* __restrict__ grad_out, scalar_t* __restrict__ grad_query,
                                      float* __restrict__ grad_logits, const Dims d, const float scale,
                                      const bool vec) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using T = typename Wmma<scalar_t>::type;
  constexpr int KC = kChunkBwd;
  __shared__ __align__(32) T q_s[kQueries * D];
  __shared__ __align__(32) T do_s[kQueries * D];
  __shared__ __align__(32) T k_s[KC * D];
  __shared__ __align__(32) T v_s[KC * D];
  __shared__ __align__(32) float s_s[kQueries * KC];   // S, then scratch of the epilogue
  __shared__ __align__(32) float dp_s[kQueries * KC];  // dO V^T
  __shared__ __align__(32) T ds_s[kQueries * KC];      // scale * dS, rounded
  __shared__ RowInfo info[kQueries];
  __shared__ float lse_s[kQueries];
  __shared__ float delta_s[kQueries];

  const AxisTile tr = axis_tile(blockIdx.x / (d.dilation * d.tiles_c), d.tiles_r, d.dilation, d.H);
  const AxisTile tc = axis_tile(blockIdx.x % (d.dilation * d.tiles_c), d.tiles_c, d.dilation, d.W);
  if (tr.count <= 0 || tc.count <= 0) return;  // the whole block
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int K = d.K, dil = d.dilation, R = 2 * K - 1;
  const int64_t r_lo = local_window_start(tr.first, tr.group, d.H, K, dil);
  const int64_t c_lo = local_window_start(tc.first, tc.group, d.W, K, dil);
  const int RH = static_cast<int>(local_window_start(tr.first + tr.count - 1, tr.group, d.H, K, dil) + K - r_lo);
  const int RW = static_cast<int>(local_window_start(tc.first + tc.count - 1, tc.group, d.W, K, dil) + K - c_lo);
  const int region = RH * RW;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int i = threadIdx.x; i < kQueries; i += blockDim.x) {
    const int qi = i / kTile, qj = i % kTile;
    RowInfo ri{};
    ri.valid = qi < tr.count && qj < tc.count;
    if (ri.valid) {
      const int64_t pix_r = (tr.first + qi) * dil + tr.group, pix_c = (tc.first + qj) * dil + tc.group;
      const int64_t sr = window_start(pix_r, d.H, K, dil), sc = window_start(pix_c, d.W, K, dil);
      ri.win_r = static_cast<int>((sr - tr.group) / dil - r_lo);
      ri.win_c = static_cast<int>((sc - tc.group) / dil - c_lo);
      ri.bias_r = static_cast<int>(bias_start(pix_r, sr, K, dil));
      ri.bias_c = static_cast<int>(bias_start(pix_c, sc, K, dil));
      ri.own = row_offset(d, D, b, pix_r, pix_c, h);
    }
    info[i] = ri;
    lse_s[i] = ri.valid ? lse[ri.own / D] : 0.f;
    delta_s[i] = ri.valid ? delta[ri.own / D] : 0.f;
  }
  auto query_row = [&](int i) -> int64_t {
    const int qi = i / kTile, qj = i % kTile;
    if (qi >= tr.count || qj >= tc.count) return -1;
    return row_offset(d, D, b, (tr.first + qi) * dil + tr.group, (tc.first + qj) * dil + tc.group, h);
  };
  stage_rows<D>(q_s, reinterpret_cast<const T*>(query), kQueries, vec, query_row);
  stage_rows<D>(do_s, reinterpret_cast<const T*>(grad_out), kQueries, vec, query_row);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dq[D / 16];
#pragma unroll
  for (int j = 0; j < D / 16; ++j) wmma::fill_fragment(dq[j], 0.f);

  for (int base = 0; base < region; base += KC) {
    __syncthreads();  // the previous chunk's keys and values are no longer read (q_s, do_s, info ready)
    auto key_row = [&](int i) -> int64_t {
      const int idx = base + i;
      if (idx >= region) return -1;
      return row_offset(d, D, b, (r_lo + idx / RW) * dil + tr.group, (c_lo + idx % RW) * dil + tc.group, h);
    };
    stage_rows<D>(k_s, reinterpret_cast<const T*>(key), KC, vec, key_row);
    stage_rows<D>(v_s, reinterpret_cast<const T*>(value), KC, vec, key_row);
    __syncthreads();

    // S = Q K^T and dP = dO V^T for this warp's 16 queries
    warp_a_bt<T, D, KC>(q_s + warp * 16 * D, k_s, s_s + warp * 16 * KC);
    warp_a_bt<T, D, KC>(do_s + warp * 16 * D, v_s, dp_s + warp * 16 * KC);
    __syncwarp();

    // dS row by row, one column per lane
    for (int r = 0; r < 16; ++r) {
      const int row = warp * 16 + r;
      const RowInfo ri = info[row];
      const int idx = base + lane;
      const int kr = idx / RW - ri.win_r, kc = idx % RW - ri.win_c;  // offset in the query's window
      float ds = 0.f;
      if (ri.valid && idx < region && kr >= 0 && kr < K && kc >= 0 && kc < K) {
        float logit = s_s[row * KC + lane] * scale;
        if (rpb != nullptr) logit += static_cast<float>(rpb[(h * R + ri.bias_r + kr) * R + ri.bias_c + kc]);
        const float p = expf(logit - lse_s[row]);
        ds = p * (dp_s[row * KC + lane] - delta_s[row]);
        if (grad_logits != nullptr) grad_logits[(ri.own / D) * K * K + kr * K + kc] = ds;
      }
      ds_s[row * KC + lane] = Wmma<scalar_t>::from_float(ds * scale);
    }
    __syncwarp();

    // dQ += (scale dS) K
#pragma unroll
    for (int j = 0; j < D / 16; ++j) {
#pragma unroll
      for (int kk = 0; kk < KC / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> kb;
        wmma::load_matrix_sync(kb, k_s + kk * 16 * D + j * 16, D);
        wmma::load_matrix_sync(a, ds_s + warp * 16 * KC + kk * 16, KC);
        wmma::mma_sync(dq[j], a, kb, dq[j]);
      }
    }
  }
  __syncthreads();  // every warp is done with s_s: it becomes the epilogue's scratch
  write_rows<scalar_t, D>(dq, s_s + warp * 256, grad_query, [&](int i) { return query_row(warp * 16 + i); });
#endif
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kThreads)
    tensor_core_backward_key_kernel(const scalar_t* __restrict__ query, const scalar_t* __restrict__ key,
                                    const scalar_t* __restrict__ value, const scalar_t* __restrict__ rpb,
                                    const float* __restrict__ lse, const float* __restrict__ delta,
                                    const scalar_t* __restrict__ grad_out, scalar_t* __restrict__ grad_key,
                                    scalar_t* __restrict__ grad_value, const Dims d, const float scale,
                                    const bool vec) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using T = typename Wmma<scalar_t>::type;
  constexpr int QC = kQueryChunk<D>;
  __shared__ __align__(32) T k_s[kQueries * D];
  __shared__ __align__(32) T v_s[kQueries * D];
  __shared__ __align__(32) T q_s[QC * D];
  __shared__ __align__(32) T do_s[QC * D];
  __shared__ __align__(32) float st_s[kQueries * QC];   // S^T
  __shared__ __align__(32) float dpt_s[kQueries * QC];  // dP^T
  __shared__ __align__(32) T pt_s[kQueries * QC];       // P^T, rounded
  __shared__ __align__(32) T dst_s[kQueries * QC];      // scale * dS^T, rounded
  __shared__ __align__(32) float scratch[kWarps * 256];
  __shared__ KeyInfo kinfo[kQueries];
  __shared__ QueryInfo qinfo[QC];

  const AxisTile tr = axis_tile(blockIdx.x / (d.dilation * d.tiles_c), d.tiles_r, d.dilation, d.H);
  const AxisTile tc = axis_tile(blockIdx.x % (d.dilation * d.tiles_c), d.tiles_c, d.dilation, d.W);
  if (tr.count <= 0 || tc.count <= 0) return;  // the whole block
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int K = d.K, dil = d.dilation, R = 2 * K - 1;
  // the queries whose windows reach this tile's keys: group-local rows [qr_lo, qr_hi], columns [qc_lo, qc_hi]
  int64_t qr_lo, qr_hi, qc_lo, qc_hi;
  query_range(tr.first, tr.count, tr.group, d.H, K, dil, qr_lo, qr_hi);
  query_range(tc.first, tc.count, tc.group, d.W, K, dil, qc_lo, qc_hi);
  const int QW = static_cast<int>(qc_hi - qc_lo + 1);
  const int queries = static_cast<int>(qr_hi - qr_lo + 1) * QW;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int i = threadIdx.x; i < kQueries; i += blockDim.x) {
    KeyInfo ki{};
    ki.valid = i / kTile < tr.count && i % kTile < tc.count;
    ki.r = static_cast<int>(tr.first + i / kTile);
    ki.c = static_cast<int>(tc.first + i % kTile);
    if (ki.valid) ki.own = row_offset(d, D, b, static_cast<int64_t>(ki.r) * dil + tr.group,
                                      static_cast<int64_t>(ki.c) * dil + tc.group, h);
    kinfo[i] = ki;
  }
  auto key_row = [&](int i) -> int64_t {
    const int kr = i / kTile, kc = i % kTile;
    if (kr >= tr.count || kc >= tc.count) return -1;
    return row_offset(d, D, b, (tr.first + kr) * dil + tr.group, (tc.first + kc) * dil + tc.group, h);
  };
  stage_rows<D>(k_s, reinterpret_cast<const T*>(key), kQueries, vec, key_row);
  stage_rows<D>(v_s, reinterpret_cast<const T*>(value), kQueries, vec, key_row);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk[D / 16], dv[D / 16];
#pragma unroll
  for (int j = 0; j < D / 16; ++j) {
    wmma::fill_fragment(dk[j], 0.f);
    wmma::fill_fragment(dv[j], 0.f);
  }

  for (int base = 0; base < queries; base += QC) {
    __syncthreads();  // the previous chunk's queries are no longer read (k_s, v_s, kinfo ready)
    auto chunk_row = [&](int i) -> int64_t {
      const int idx = base + i;
      if (idx >= queries) return -1;
      return row_offset(d, D, b, (qr_lo + idx / QW) * dil + tr.group, (qc_lo + idx % QW) * dil + tc.group, h);
    };
    for (int i = threadIdx.x; i < QC; i += blockDim.x) {
      QueryInfo qi{};
      const int idx = base + i;
      qi.valid = idx < queries;
      if (qi.valid) {
        const int64_t pix_r = (qr_lo + idx / QW) * dil + tr.group, pix_c = (qc_lo + idx % QW) * dil + tc.group;
        const int64_t sr = window_start(pix_r, d.H, K, dil), sc = window_start(pix_c, d.W, K, dil);
        qi.win_r = static_cast<int>((sr - tr.group) / dil);
        qi.win_c = static_cast<int>((sc - tc.group) / dil);
        qi.bias_r = static_cast<int>(bias_start(pix_r, sr, K, dil));
        qi.bias_c = static_cast<int>(bias_start(pix_c, sc, K, dil));
        qi.own = row_offset(d, D, b, pix_r, pix_c, h);
        qi.lse = lse[qi.own / D];
        qi.delta = delta[qi.own / D];
      }
      qinfo[i] = qi;
    }
    stage_rows<D>(q_s, reinterpret_cast<const T*>(query), QC, vec, chunk_row);
    stage_rows<D>(do_s, reinterpret_cast<const T*>(grad_out), QC, vec, chunk_row);
    __syncthreads();

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys
    warp_a_bt<T, D, QC>(k_s + warp * 16 * D, q_s, st_s + warp * 16 * QC);
    warp_a_bt<T, D, QC>(v_s + warp * 16 * D, do_s, dpt_s + warp * 16 * QC);
    __syncwarp();

    // P^T and dS^T row by row (a key per row), the lanes over the chunk's queries
    for (int r = 0; r < 16; ++r) {
      const int row = warp * 16 + r;
      const KeyInfo ki = kinfo[row];
      for (int col = lane; col < QC; col += 32) {
        const QueryInfo qi = qinfo[col];
        const int kr = ki.r - qi.win_r, kc = ki.c - qi.win_c;  // the key's offset in the query's window
        float p = 0.f, ds = 0.f;
        if (ki.valid && qi.valid && kr >= 0 && kr < K && kc >= 0 && kc < K) {
          float logit = st_s[row * QC + col] * scale;
          if (rpb != nullptr) logit += static_cast<float>(rpb[(h * R + qi.bias_r + kr) * R + qi.bias_c + kc]);
          p = expf(logit - qi.lse);
          ds = p * (dpt_s[row * QC + col] - qi.delta);
        }
        pt_s[row * QC + col] = Wmma<scalar_t>::from_float(p);
        dst_s[row * QC + col] = Wmma<scalar_t>::from_float(ds * scale);
      }
    }
    __syncwarp();

    // dV += P^T dO and dK += (scale dS^T) Q
#pragma unroll
    for (int j = 0; j < D / 16; ++j) {
#pragma unroll
      for (int kk = 0; kk < QC / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> m;
        wmma::load_matrix_sync(m, do_s + kk * 16 * D + j * 16, D);
        wmma::load_matrix_sync(a, pt_s + warp * 16 * QC + kk * 16, QC);
        wmma::mma_sync(dv[j], a, m, dv[j]);
        wmma::load_matrix_sync(m, q_s + kk * 16 * D + j * 16, D);
        wmma::load_matrix_sync(a, dst_s + warp * 16 * QC + kk * 16, QC);
        wmma::mma_sync(dk[j], a, m, dk[j]);
      }
    }
  }
  auto own_row = [&](int i) -> int64_t {
    const KeyInfo ki = kinfo[warp * 16 + i];
    return ki.valid ? ki.own : -1;
  };
  write_rows<scalar_t, D>(dk, scratch + warp * 256, grad_key, own_row);
  write_rows<scalar_t, D>(dv, scratch + warp * 256, grad_value, own_row);
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

template <typename scalar_t, int D>
void launch_backward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const scalar_t* bias,
                     const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& grad_out, at::Tensor& grad_q,
                     at::Tensor& grad_k, at::Tensor& grad_v, float* grad_logits, const Dims& d, float scale, bool vec,
                     cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(d.dilation * d.tiles_r * d.dilation * d.tiles_c),
                  static_cast<unsigned int>(d.heads), static_cast<unsigned int>(query.size(0)));
  tensor_core_backward_query_kernel<scalar_t, D><<<grid, kThreads, 0, stream>>>(
      query.data_ptr<scalar_t>(), key.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), bias, lse.data_ptr<float>(),
      delta.data_ptr<float>(), grad_out.data_ptr<scalar_t>(), grad_q.data_ptr<scalar_t>(), grad_logits, d, scale, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  tensor_core_backward_key_kernel<scalar_t, D><<<grid, kThreads, 0, stream>>>(
      query.data_ptr<scalar_t>(), key.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), bias, lse.data_ptr<float>(),
      delta.data_ptr<float>(), grad_out.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(),
      d, scale, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// f(std::integral_constant<int, D>{}) for the head dims the tensor-core kernels take
template <typename F>
void for_head_dim(int64_t D, F&& f) {
  if (D == 16) f(std::integral_constant<int, 16>{});
  if (D == 32) f(std::integral_constant<int, 32>{});
  if (D == 64) f(std::integral_constant<int, 64>{});
}

Dims make_dims(const Problem& p) {
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
              "neighborhood_attention_2d: problem too large for the tensor-core kernels' grid (H = ", p.H,
              ", W = ", p.W, ", heads = ", p.heads, ", B = ", p.B, ")");
  d.tiles_r = static_cast<int>(tiles_r);
  d.tiles_c = static_cast<int>(tiles_c);
  return d;
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
  const Dims d = make_dims(p);
  const bool vec = aligned16(query.data_ptr()) && aligned16(key.data_ptr()) && aligned16(value.data_ptr());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    const scalar_t* bias = p.has_bias ? rpb.data_ptr<scalar_t>() : nullptr;
    for_head_dim(p.D, [&](auto dim) {
      launch_forward<scalar_t, decltype(dim)::value>(query, key, value, bias, out, lse, d, scale, vec, stream);
    });
  };
  if (query.scalar_type() == at::kBFloat16) launch(at::BFloat16{});
  if (query.scalar_type() == at::kHalf) launch(at::Half{});
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_tensor_core(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& rpb,
    const at::Tensor& lse, const at::Tensor& grad_out, const at::Tensor& delta, int64_t kernel_size, int64_t dilation,
    double scale) {
  const Problem p = check_problem(query, key, value, rpb, kernel_size, dilation, c10::kCUDA);
  check_backward_inputs(p, query, lse, grad_out);
  TORCH_CHECK(delta.sizes() == lse.sizes() && delta.scalar_type() == at::kFloat && delta.device() == query.device() &&
                  delta.is_contiguous(),
              "neighborhood_attention_2d: expected delta = sum(grad_out * out, -1), contiguous float32 of shape ",
              shape_str(lse), " on ", query.device(), ", got ", shape_str(delta), " ", delta.scalar_type());
  const std::string unsupported = tensor_core_unsupported(query);
  TORCH_CHECK(unsupported.empty(), "neighborhood_attention_2d: the tensor-core backward does not apply: ",
              unsupported);
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor grad_q = at::empty_like(query), grad_k = at::empty_like(key), grad_v = at::empty_like(value);
  if (p.pixels() * p.heads == 0) {
    return {grad_q, grad_k, grad_v, p.has_bias ? at::zeros_like(rpb) : at::empty({0}, query.options())};
  }
  const Dims d = make_dims(p);
  at::Tensor grad_logits;  // dS of every (query, neighbour), only for the bias gradient
  if (p.has_bias) grad_logits = at::empty({p.B, p.H, p.W, p.heads, p.neighbours()}, query.options().dtype(at::kFloat));
  const bool vec = aligned16(query.data_ptr()) && aligned16(key.data_ptr()) && aligned16(value.data_ptr()) &&
                   aligned16(grad_out.data_ptr());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  float* logits = p.has_bias ? grad_logits.data_ptr<float>() : nullptr;
  const float s = static_cast<float>(scale);
  auto launch = [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    const scalar_t* bias = p.has_bias ? rpb.data_ptr<scalar_t>() : nullptr;
    for_head_dim(p.D, [&](auto dim) {
      launch_backward<scalar_t, decltype(dim)::value>(query, key, value, bias, lse, delta, grad_out, grad_q, grad_k,
                                                      grad_v, logits, d, s, vec, stream);
    });
  };
  if (query.scalar_type() == at::kBFloat16) launch(at::BFloat16{});
  if (query.scalar_type() == at::kHalf) launch(at::Half{});
  at::Tensor grad_rpb = p.has_bias ? bias_gradient(p, grad_logits).to(rpb.scalar_type())
                                   : at::empty({0}, query.options());
  return {grad_q, grad_k, grad_v, grad_rpb};
}

}  // namespace variants
}  // namespace na
