// CUDA kernel variants of multi-scale deformable attention, selectable beside the default kernels of
// ms_deform_attn_cuda.cu (which stay the default, unchanged). Same contract, same argument checks
// (ms_deform_attn_checks.h) and the same per-sample math (ms_deform_attn_math.h); results differ from
// the default kernels only in float summation order.
//
// "coalesced" forward. An item is a (batch, query, head) triple as in the default kernel, but its D
// channels are cut into 16-byte pieces (4 float, 2 double, 8 bfloat16/half) and lane j of the item's
// `lanes` threads takes pieces j, j + lanes, j + 2 * lanes, ...: one warp-wide load then covers whole
// 32-byte sectors of a value row. (The default kernel gives each float lane 8 consecutive channels read
// with two 16-byte loads, so each load instruction touches half of every sector it reads and the next
// instruction the other half.) A lane holds two pieces for 4- and 8-byte types, one for 16-bit types.
// All corner loads of a sample are issued before they are accumulated. The items of a warp are
// consecutive queries of one head (the default kernel's are the heads of one query): in the encoder
// neighbouring queries sample around neighbouring reference points, so one warp-wide load touches fewer
// distinct sectors (the samples of different heads never share rows).
//
// "tiled" backward. grad_value is summed in shared memory per spatial tile instead of with one global
// float atomic per (sample, corner, channel):
//   1. sample kernel (item-parallel, piece layout and item order as above): grad_locations and
//      grad_weights from the dot products of grad_output with the four corner rows (reduced over the
//      item's lanes with shuffles), and the tile of every sample that reads a corner inside its level: the tile of its
//      cell origin (clamped to 0), counted per tile with integer atomics;
//   2. an exclusive scan of the counts (at::cumsum) and a fill kernel that lists the samples tile by
//      tile (integer atomics on one cursor per tile);
//   3. tile kernel: a block per (tile, split) zeroes a (side+1) x (side+1) x D shared-memory tile of
//      one (batch, head, level) (the extra row and column take the cells that straddle the tile edge),
//      adds attn * bilinear weight * grad_output of its samples with shared-memory atomics (one channel
//      per lane, samples staged per warp), then adds the tile to grad_value: one global atomic per
//      tile element (float4 on sm_90), instead of 4 per sample and channel. A tile's sample list is
//      split over several blocks when the average list is long, so small batches still fill the GPU.
// The scan keeps the launch free of host synchronisation (no counts are read back).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>

#include "ms_deform_attn_checks.h"
#include "ms_deform_attn_math.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define MSDA_VARIANT_VECTOR_ATOMICS 1
#else
#define MSDA_VARIANT_VECTOR_ATOMICS 0
#endif

namespace msda {
namespace variants {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kSharedBytes = 48 * 1024;  // static shared memory of one tile block

template <typename scalar_t>
constexpr int kPieceElems = 16 / static_cast<int>(sizeof(scalar_t));  // elements of a 16-byte piece
template <typename scalar_t>
constexpr int kPieces = sizeof(scalar_t) >= 4 ? 2 : 1;  // pieces per lane and pass

struct Levels {
  int64_t start[kMaxCudaLevels];
  int64_t height[kMaxCudaLevels];
  int64_t width[kMaxCudaLevels];
};

struct Dims {
  int64_t B, Q, S;
  int64_t slots;  // item slots: B * ceil(Q / group) * group * H (the last query group may be partial)
  int H, D, L, P;
  int lane_bits;  // lanes per item = 2^lane_bits
  int passes;     // ceil(pieces / (kPieces * lanes))
  int group;      // items per warp = consecutive queries of one head
};

// The (batch, query, head) of an item slot: slots run over batches, then groups of `group` consecutive
// queries, then heads, then the queries of the group.
struct ItemOf {
  int64_t b, q, h, item;  // item = (b * Q + q) * H + h, the row of loc, attn, out, grad_out
  bool valid;             // false past the last query of a partial group or past the last slot
};
__device__ __forceinline__ ItemOf item_of(int64_t slot, const Dims& d) {
  ItemOf it;
  const int64_t per_group = static_cast<int64_t>(d.group) * d.H;
  const int64_t per_b = (d.Q + d.group - 1) / d.group * per_group;
  it.b = slot / per_b;
  const int64_t r = slot % per_b;
  it.h = r % per_group / d.group;
  it.q = r / per_group * d.group + r % d.group;
  it.valid = slot < d.slots && it.q < d.Q;
  it.item = (it.b * d.Q + it.q) * d.H + it.h;
  return it;
}

// Tiles of the tiled backward: every (batch, head) has `per_bh` tiles, level l's first at offset[l],
// `across[l]` tiles per tile row; tile (ty, tx) of level l owns pixel rows [ty*side, ty*side + side)
// and columns [tx*side, tx*side + side) as cell origins.
struct Tiles {
  int side;
  int splits;                            // blocks per tile
  int64_t per_bh;
  int64_t offset[kMaxCudaLevels + 1];  // offset[L] = per_bh
  int64_t across[kMaxCudaLevels];
};

// ---------------------------------------------------------------------------------------------
// 16-byte pieces
// ---------------------------------------------------------------------------------------------

// dst = the `count` (1 .. kPieceElems) channels at src, zeros beyond; kVec: one aligned 16-byte load
template <typename scalar_t, bool kVec>
__device__ __forceinline__ void load_piece(const scalar_t* __restrict__ src, int count,
                                           at::opmath_type<scalar_t> (&dst)[kPieceElems<scalar_t>]) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = kPieceElems<scalar_t>;
  if constexpr (kVec) {
    alignas(16) scalar_t tmp[V];
    *reinterpret_cast<uint4*>(tmp) = __ldg(reinterpret_cast<const uint4*>(src));
#pragma unroll
    for (int i = 0; i < V; ++i) dst[i] = static_cast<acc_t>(tmp[i]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) dst[i] = i < count ? static_cast<acc_t>(src[i]) : acc_t(0);
  }
}

template <typename scalar_t, bool kVec>
__device__ __forceinline__ void store_piece(scalar_t* __restrict__ dst, int count,
                                            const at::opmath_type<scalar_t> (&src)[kPieceElems<scalar_t>]) {
  constexpr int V = kPieceElems<scalar_t>;
  if constexpr (kVec) {
    alignas(16) scalar_t tmp[V];
#pragma unroll
    for (int i = 0; i < V; ++i) tmp[i] = static_cast<scalar_t>(src[i]);
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(tmp);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (i < count) dst[i] = static_cast<scalar_t>(src[i]);
    }
  }
}

// First channel and channel count of the k-th piece a lane holds in a pass (count <= 0: none).
struct PieceSpan {
  int c0, count;
};
template <typename scalar_t>
__device__ __forceinline__ PieceSpan piece_span(int lane, int lanes, int pass, int k, int D) {
  constexpr int V = kPieceElems<scalar_t>;
  const int c0 = (lane + (pass * kPieces<scalar_t> + k) * lanes) * V;
  return {c0, min(V, D - c0)};
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kThreads)
    coalesced_forward_kernel(const scalar_t* __restrict__ value, const at::opmath_type<scalar_t>* __restrict__ loc,
                             const at::opmath_type<scalar_t>* __restrict__ attn, scalar_t* __restrict__ out,
                             const __grid_constant__ Levels levels, const Dims d) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = kPieceElems<scalar_t>;
  constexpr int NP = kPieces<scalar_t>;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const ItemOf it = item_of(tid >> d.lane_bits, d);
  if (!it.valid) return;  // no warp-collective operations in the forward
  const int lanes = 1 << d.lane_bits;
  const int lane = static_cast<int>(tid & (lanes - 1));
  const int64_t item = it.item, b = it.b, h = it.h;
  const int64_t row_stride = static_cast<int64_t>(d.H) * d.D;
  const scalar_t* v_bh = value + (b * d.S * d.H + h) * d.D;
  const acc_t* loc_i = loc + item * d.L * d.P * 2;
  const acc_t* attn_i = attn + item * d.L * d.P;

  for (int pass = 0; pass < d.passes; ++pass) {
    PieceSpan span[NP];
#pragma unroll
    for (int k = 0; k < NP; ++k) span[k] = piece_span<scalar_t>(lane, lanes, pass, k, d.D);
    if (span[0].count <= 0) break;
    acc_t acc[NP][V];
#pragma unroll
    for (int k = 0; k < NP; ++k) {
#pragma unroll
      for (int i = 0; i < V; ++i) acc[k][i] = acc_t(0);
    }
    for (int l = 0; l < d.L; ++l) {
      const int64_t height = levels.height[l];
      const int64_t width = levels.width[l];
      const scalar_t* v_l = v_bh + levels.start[l] * row_stride;
      for (int p = 0; p < d.P; ++p) {
        const int s = l * d.P + p;
        Corners<acc_t> c;
        if (!bilinear_corners(loc_i[2 * s], loc_i[2 * s + 1], height, width, c)) continue;
        const acc_t a = attn_i[s];
        acc_t v[4][NP][V];
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
#pragma unroll
          for (int k = 0; k < NP; ++k) {
            if (c.inside[corner] && span[k].count > 0) {
              load_piece<scalar_t, kVec>(v_l + c.pos[corner] * row_stride + span[k].c0, span[k].count, v[corner][k]);
            } else {
#pragma unroll
              for (int i = 0; i < V; ++i) v[corner][k][i] = acc_t(0);
            }
          }
        }
        // outside corners add coef * 0, so that NaN weights of a non-finite location reach the output
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          const acc_t coef = a * c.weight[corner];
#pragma unroll
          for (int k = 0; k < NP; ++k) {
#pragma unroll
            for (int i = 0; i < V; ++i) acc[k][i] += coef * v[corner][k][i];
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < NP; ++k) {
      if (span[k].count > 0) store_piece<scalar_t, kVec>(out + item * d.D + span[k].c0, span[k].count, acc[k]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// tiled backward
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ int64_t tile_of_cell(const Tiles& t, int64_t bh, int l, int64_t row0, int64_t col0) {
  const int64_t ty = (row0 < 0 ? 0 : row0) / t.side;
  const int64_t tx = (col0 < 0 ? 0 : col0) / t.side;
  return bh * t.per_bh + t.offset[l] + ty * t.across[l] + tx;
}

// Kernel 1: grad_locations, grad_weights, and the tile of every sample (-1: it scatters nothing).
template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kThreads)
    tiled_sample_kernel(const scalar_t* __restrict__ value, const at::opmath_type<scalar_t>* __restrict__ loc,
                        const at::opmath_type<scalar_t>* __restrict__ attn, const scalar_t* __restrict__ grad_out,
                        at::opmath_type<scalar_t>* __restrict__ grad_loc,
                        at::opmath_type<scalar_t>* __restrict__ grad_attn,
                        int* __restrict__ tile_of, int* __restrict__ counts, const __grid_constant__ Levels levels,
                        const __grid_constant__ Tiles tiles, const Dims d) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = kPieceElems<scalar_t>;
  constexpr int NP = kPieces<scalar_t>;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lanes = 1 << d.lane_bits;
  const int lane = static_cast<int>(tid & (lanes - 1));
  // Threads without an item stay alive: every lane of a warp must reach the shuffles below.
  const ItemOf it = item_of(tid >> d.lane_bits, d);
  const bool active = it.valid;
  const int64_t item = active ? it.item : 0;
  const int64_t b = active ? it.b : 0;
  const int64_t h = active ? it.h : 0;
  const int64_t row_stride = static_cast<int64_t>(d.H) * d.D;
  const scalar_t* v_bh = value + (b * d.S * d.H + h) * d.D;
  const acc_t* loc_i = loc + item * d.L * d.P * 2;
  const acc_t* attn_i = attn + item * d.L * d.P;
  const scalar_t* go_i = grad_out + item * d.D;

  // one pass (D <= 32 lanes' pieces) keeps this lane's grad_output pieces in registers
  acc_t g[NP][V];
#pragma unroll
  for (int k = 0; k < NP; ++k) {
    const PieceSpan span = piece_span<scalar_t>(lane, lanes, 0, k, d.D);
    if (d.passes == 1 && active && span.count > 0) {
      load_piece<scalar_t, kVec>(go_i + span.c0, span.count, g[k]);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) g[k][i] = acc_t(0);
    }
  }

  for (int l = 0; l < d.L; ++l) {
    const int64_t height = levels.height[l];
    const int64_t width = levels.width[l];
    const scalar_t* v_l = v_bh + levels.start[l] * row_stride;
    for (int p = 0; p < d.P; ++p) {
      const int s = l * d.P + p;
      acc_t grad_x = acc_t(0), grad_y = acc_t(0), grad_a = acc_t(0);
      int64_t tile = -1;
      Corners<acc_t> c;
      if (active && bilinear_corners(loc_i[2 * s], loc_i[2 * s + 1], height, width, c)) {
        const acc_t a = attn_i[s];
        acc_t dots[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
        for (int pass = 0; pass < d.passes; ++pass) {
          PieceSpan span[NP];
#pragma unroll
          for (int k = 0; k < NP; ++k) span[k] = piece_span<scalar_t>(lane, lanes, pass, k, d.D);
          if (span[0].count <= 0) break;
          if (d.passes > 1) {
#pragma unroll
            for (int k = 0; k < NP; ++k) {
              if (span[k].count > 0) {
                load_piece<scalar_t, kVec>(go_i + span[k].c0, span[k].count, g[k]);
              } else {
#pragma unroll
                for (int i = 0; i < V; ++i) g[k][i] = acc_t(0);
              }
            }
          }
          acc_t v[4][NP][V];
#pragma unroll
          for (int corner = 0; corner < 4; ++corner) {
#pragma unroll
            for (int k = 0; k < NP; ++k) {
              if (c.inside[corner] && span[k].count > 0) {
                load_piece<scalar_t, kVec>(v_l + c.pos[corner] * row_stride + span[k].c0, span[k].count,
                                           v[corner][k]);
              } else {
#pragma unroll
                for (int i = 0; i < V; ++i) v[corner][k][i] = acc_t(0);
              }
            }
          }
#pragma unroll
          for (int corner = 0; corner < 4; ++corner) {
            acc_t dot = acc_t(0);
#pragma unroll
            for (int k = 0; k < NP; ++k) {
#pragma unroll
              for (int i = 0; i < V; ++i) dot += g[k][i] * v[corner][k][i];
            }
            dots[corner] += dot;
          }
        }
        sample_gradients(c, dots, a, height, width, grad_x, grad_y, grad_a);
        if (c.inside[0] || c.inside[1] || c.inside[2] || c.inside[3]) {
          tile = tile_of_cell(tiles, b * d.H + h, l, c.row0, c.col0);
        }
      }
      // sum the partial gradients over the lanes of this item (an aligned power-of-two segment)
      for (int offset = lanes >> 1; offset > 0; offset >>= 1) {
        grad_x += __shfl_xor_sync(0xffffffffu, grad_x, offset);
        grad_y += __shfl_xor_sync(0xffffffffu, grad_y, offset);
        grad_a += __shfl_xor_sync(0xffffffffu, grad_a, offset);
      }
      if (active && lane == 0) {
        const int64_t o = item * d.L * d.P + s;
        grad_loc[2 * o] = grad_x;
        grad_loc[2 * o + 1] = grad_y;
        grad_attn[o] = grad_a;
        tile_of[o] = static_cast<int>(tile);
        if (tile >= 0) atomicAdd(counts + tile + 1, 1);
      }
    }
  }
}

// Kernel 2: entries[bounds[t] ...] = the samples of tile t (in no particular order).
__global__ void __launch_bounds__(kThreads)
    tiled_fill_kernel(const int* __restrict__ tile_of, int* __restrict__ cursor, int* __restrict__ entries,
                      int64_t samples) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= samples) return;
  const int t = tile_of[i];
  if (t < 0) return;
  entries[atomicAdd(cursor + t, 1)] = static_cast<int>(i);
}

// One sample as the tile kernel stages it for its warp: bit k of `mask` says corner k lies in the tile,
// at shared-memory pixel local0 + {0, 1, pitch, pitch + 1}.
template <typename acc_t>
struct Staged {
  int item;
  int local0;
  int mask;
  acc_t coef[4];
};

template <typename acc_t>
constexpr int kTileBytes = (kSharedBytes - kThreads * static_cast<int>(sizeof(Staged<acc_t>))) / 16 * 16;

// *dst += v for one tile element (the float4 flush of sm_90 is in the kernel)
template <typename acc_t>
__device__ __forceinline__ void flush_element(acc_t* dst, acc_t v) {
  if (v != acc_t(0)) atomicAdd(dst, v);  // zeros (untouched pixels) are skipped
}

// Kernel 3: one block per (tile, split).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    tiled_scatter_kernel(const at::opmath_type<scalar_t>* __restrict__ loc,
                         const at::opmath_type<scalar_t>* __restrict__ attn, const scalar_t* __restrict__ grad_out,
                         const int* __restrict__ entries, const int* __restrict__ bounds,
                         at::opmath_type<scalar_t>* __restrict__ grad_value, const __grid_constant__ Levels levels,
                         const __grid_constant__ Tiles tiles, const Dims d) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kTileElems = kTileBytes<acc_t> / static_cast<int>(sizeof(acc_t));
  __shared__ __align__(16) acc_t tile[kTileElems];
  __shared__ Staged<acc_t> staged[kWarps][32];

  const int64_t t = blockIdx.x / tiles.splits;
  const int split = static_cast<int>(blockIdx.x % tiles.splits);
  const int64_t first = bounds[t];
  const int64_t length = bounds[t + 1] - first;
  const int64_t begin = first + length * split / tiles.splits;
  const int64_t end = first + length * (split + 1) / tiles.splits;
  if (begin == end) return;  // the whole block: no barrier is reached

  // which (batch, head, level, tile row, tile column) this is
  const int64_t bh = t / tiles.per_bh;
  const int64_t rem = t % tiles.per_bh;
  int l = 0;
  while (l + 1 < d.L && tiles.offset[l + 1] <= rem) ++l;
  const int64_t ty = (rem - tiles.offset[l]) / tiles.across[l];
  const int64_t tx = (rem - tiles.offset[l]) % tiles.across[l];
  const int64_t height = levels.height[l];
  const int64_t width = levels.width[l];
  const int pitch = tiles.side + 1;
  const int64_t y0 = ty * tiles.side;
  const int64_t x0 = tx * tiles.side;
  const int rows = static_cast<int>(height - y0 < pitch ? height - y0 : pitch);
  const int cols = static_cast<int>(width - x0 < pitch ? width - x0 : pitch);
  const int64_t b = bh / d.H;
  const int64_t h = bh % d.H;
  const int64_t row_stride = static_cast<int64_t>(d.H) * d.D;
  acc_t* gv_l = grad_value + ((b * d.S + levels.start[l]) * d.H + h) * d.D;

  for (int i = threadIdx.x; i < rows * pitch * d.D; i += blockDim.x) tile[i] = acc_t(0);
  __syncthreads();

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int LP = d.L * d.P;
  for (int64_t base = begin + warp * 32; base < end; base += kWarps * 32) {
    const int n = static_cast<int>(end - base < 32 ? end - base : 32);  // the same for the whole warp
    if (lane < n) {
      const int64_t id = entries[base + lane];
      Staged<acc_t> st;
      st.item = static_cast<int>(id / LP);
      st.mask = 0;
      st.local0 = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) st.coef[k] = acc_t(0);
      Corners<acc_t> c;
      if (bilinear_corners(loc[2 * id], loc[2 * id + 1], height, width, c)) {
        const acc_t a = attn[id];
        const int64_t r = c.row0 - y0;
        const int64_t col = c.col0 - x0;
        st.local0 = static_cast<int>(r * pitch + col);
        constexpr int dr[4] = {0, 0, 1, 1};
        constexpr int dc[4] = {0, 1, 0, 1};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          st.coef[k] = a * c.weight[k];
          if (!c.inside[k]) continue;
          if (r + dr[k] >= 0 && r + dr[k] < rows && col + dc[k] >= 0 && col + dc[k] < cols) {
            st.mask |= 1 << k;
          } else {
            // the sample kernel placed this cell in another tile (a different rounding of its
            // coordinates): add the corner straight to grad_value, channel by channel
            acc_t* dst = gv_l + c.pos[k] * row_stride;
            const scalar_t* go = grad_out + static_cast<int64_t>(st.item) * d.D;
            for (int ch = 0; ch < d.D; ++ch) atomicAdd(dst + ch, st.coef[k] * static_cast<acc_t>(go[ch]));
          }
        }
      }
      staged[warp][lane] = st;
    }
    __syncwarp();
    for (int j0 = 0; j0 < n; j0 += 8) {
      for (int ch = lane; ch < d.D; ch += 32) {
        acc_t g[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {  // eight independent loads in flight before the first atomic
          g[u] = j0 + u < n ? static_cast<acc_t>(grad_out[static_cast<int64_t>(staged[warp][j0 + u].item) * d.D + ch])
                            : acc_t(0);
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          if (j0 + u >= n) break;
          const Staged<acc_t>& st = staged[warp][j0 + u];
          const int corner_offset[4] = {0, 1, pitch, pitch + 1};
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (st.mask & (1 << k)) atomicAdd(tile + (st.local0 + corner_offset[k]) * d.D + ch, st.coef[k] * g[u]);
          }
        }
      }
    }
    __syncwarp();  // every lane has read this round's staged samples before they are overwritten
  }
  __syncthreads();

  // tile -> grad_value; the last row and column overlap the next tiles, hence atomics
#if MSDA_VARIANT_VECTOR_ATOMICS
  if constexpr (std::is_same_v<acc_t, float>) {
    if (d.D % 4 == 0 && reinterpret_cast<uintptr_t>(gv_l) % 16 == 0) {
      const int quads = d.D / 4;
      for (int i = threadIdx.x; i < rows * cols * quads; i += blockDim.x) {
        const int pixel = i / quads;
        const int r = pixel / cols;
        const int col = pixel % cols;
        const float4 v = *reinterpret_cast<const float4*>(tile + (r * pitch + col) * d.D + 4 * (i % quads));
        if (v.x != 0.f || v.y != 0.f || v.z != 0.f || v.w != 0.f) {
          atomicAdd(reinterpret_cast<float4*>(gv_l + ((y0 + r) * width + x0 + col) * row_stride + 4 * (i % quads)), v);
        }
      }
      return;
    }
  }
#endif
  for (int i = threadIdx.x; i < rows * cols * d.D; i += blockDim.x) {
    const int pixel = i / d.D;
    const int r = pixel / cols;
    const int col = pixel % cols;
    flush_element(gv_l + ((y0 + r) * width + x0 + col) * row_stride + i % d.D, tile[(r * pitch + col) * d.D + i % d.D]);
  }
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

void check_int_sizes(const Problem& p) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(p.H <= kMax && p.D <= kMax && p.L * p.P * 2 <= kMax,
              "ms_deform_attn: H, D and L*P*2 must fit in int32 for the CUDA kernel, got H=", p.H, ", D=", p.D,
              ", L=", p.L, ", P=", p.P);
}

Levels make_levels(const Problem& p) {
  TORCH_CHECK(p.L <= kMaxCudaLevels, "ms_deform_attn: the CUDA kernel supports at most ", kMaxCudaLevels,
              " levels, got L = ", p.L);
  Levels t{};
  for (int64_t l = 0; l < p.L; ++l) {
    t.start[l] = p.starts[l];
    t.height[l] = p.heights[l];
    t.width[l] = p.widths[l];
  }
  return t;
}

Dims make_dims(const Problem& p, int piece_elems, int pieces_per_lane) {
  Dims d;
  d.B = p.B;
  d.Q = p.Q;
  d.S = p.S;
  d.H = static_cast<int>(p.H);
  d.D = static_cast<int>(p.D);
  d.L = static_cast<int>(p.L);
  d.P = static_cast<int>(p.P);
  const int64_t pieces = (p.D + piece_elems - 1) / piece_elems;
  const int64_t wanted = (pieces + pieces_per_lane - 1) / pieces_per_lane;
  int lanes = 1;
  d.lane_bits = 0;
  while (lanes < wanted && lanes < 32) {
    lanes <<= 1;
    ++d.lane_bits;
  }
  d.passes = static_cast<int>((pieces + static_cast<int64_t>(pieces_per_lane) * lanes - 1) /
                              (static_cast<int64_t>(pieces_per_lane) * lanes));
  d.group = 32 / lanes;
  d.slots = p.B * ((p.Q + d.group - 1) / d.group) * d.group * p.H;
  return d;
}

unsigned int blocks_for(int64_t threads, const char* what) {
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "ms_deform_attn: problem too large for one launch (",
              threads, " ", what, ")");
  return static_cast<unsigned int>(blocks);
}

// Interior side of the shared-memory tiles for head dim D (0 when not even a 2 x 2 tile fits).
int tile_side(int64_t D, bool is_double) {
  const int64_t budget = is_double ? kTileBytes<double> : kTileBytes<float>;
  const int64_t pixels = D > 0 ? budget / (D * (is_double ? 8 : 4)) : 0;
  int64_t pitch = static_cast<int64_t>(std::sqrt(static_cast<double>(pixels)));
  while ((pitch + 1) * (pitch + 1) <= pixels) ++pitch;
  while (pitch * pitch > pixels) --pitch;
  return static_cast<int>(pitch - 1);
}

}  // namespace

std::string tiled_unsupported(int64_t D, bool is_double, int64_t samples) {
  if (tile_side(D, is_double) < 1) {
    return "head dim D = " + std::to_string(D) + " is too large for a shared-memory tile (at most " +
           std::to_string((is_double ? kTileBytes<double> : kTileBytes<float>) / (4 * (is_double ? 8 : 4))) +
           " for " + (is_double ? "float64" : "float32 accumulation") + ")";
  }
  if (samples > std::numeric_limits<int32_t>::max()) {
    return "B*Q*H*L*P = " + std::to_string(samples) + " samples exceed the int32 sample index";
  }
  return "";
}

namespace {

Tiles make_tiles(const Problem& p, int side, int64_t samples) {
  Tiles t{};
  t.side = side;
  int64_t offset = 0;
  for (int64_t l = 0; l < p.L; ++l) {
    t.offset[l] = offset;
    t.across[l] = (p.widths[l] + side - 1) / side;
    offset += ((p.heights[l] + side - 1) / side) * t.across[l];
  }
  t.offset[p.L] = offset;
  t.per_bh = offset;
  const int64_t tiles = p.B * p.H * offset;
  // split long sample lists (about 1024 samples a block on average) so that small batches fill the GPU
  const int64_t splits = std::min<int64_t>(64, std::max<int64_t>(1, samples / std::max<int64_t>(1, tiles) / 1024));
  t.splits = static_cast<int>(splits);
  TORCH_CHECK(tiles < std::numeric_limits<int32_t>::max() && tiles * splits <= std::numeric_limits<int32_t>::max(),
              "ms_deform_attn: too many tiles for the tiled backward (", tiles, ")");
  return t;
}

template <typename scalar_t, bool kVec>
void launch_forward(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn, at::Tensor& out,
                    const Levels& levels, const Dims& d, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  coalesced_forward_kernel<scalar_t, kVec><<<blocks_for(d.slots << d.lane_bits, "threads"), kThreads, 0, stream>>>(
      value.data_ptr<scalar_t>(), loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), levels, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, bool kVec>
void launch_sample(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn, const at::Tensor& grad_out,
                   at::Tensor& grad_loc, at::Tensor& grad_attn, at::Tensor& tile_of, at::Tensor& counts,
                   const Levels& levels, const Tiles& tiles, const Dims& d, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  tiled_sample_kernel<scalar_t, kVec><<<blocks_for(d.slots << d.lane_bits, "threads"), kThreads, 0, stream>>>(
      value.data_ptr<scalar_t>(), loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), grad_out.data_ptr<scalar_t>(),
      grad_loc.data_ptr<acc_t>(), grad_attn.data_ptr<acc_t>(), tile_of.data_ptr<int>(), counts.data_ptr<int>(), levels,
      tiles, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_fill(const at::Tensor& tile_of, at::Tensor& cursor, at::Tensor& entries, cudaStream_t stream) {
  const int64_t samples = tile_of.numel();
  tiled_fill_kernel<<<blocks_for(samples, "samples"), kThreads, 0, stream>>>(
      tile_of.data_ptr<int>(), cursor.data_ptr<int>(), entries.data_ptr<int>(), samples);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_scatter(const at::Tensor& loc, const at::Tensor& attn, const at::Tensor& grad_out,
                    const at::Tensor& entries, const at::Tensor& bounds, at::Tensor& grad_value_acc,
                    const Levels& levels, const Tiles& tiles, const Dims& d, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto blocks = static_cast<unsigned int>(d.B * d.H * tiles.per_bh * tiles.splits);
  tiled_scatter_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
      loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), grad_out.data_ptr<scalar_t>(), entries.data_ptr<int>(),
      bounds.data_ptr<int>(), grad_value_acc.data_ptr<acc_t>(), levels, tiles, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor forward_coalesced(const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights) {
  const Problem p =
      check_problem(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, c10::kCUDA);
  check_int_sizes(p);
  const Levels levels = make_levels(p);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor out = at::empty({p.B, p.Q, p.H * p.D}, value.options());
  if (out.numel() == 0) return out;
  if (p.L * p.P == 0) return out.zero_();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto dtype = value.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "ms_deform_attn_forward_coalesced", [&] {
    constexpr int V = kPieceElems<scalar_t>;
    const Dims d = make_dims(p, V, kPieces<scalar_t>);
    if (p.D % V == 0 && aligned16(value.data_ptr()) && aligned16(out.data_ptr())) {
      launch_forward<scalar_t, true>(value, sampling_locations, attention_weights, out, levels, d, stream);
    } else {
      launch_forward<scalar_t, false>(value, sampling_locations, attention_weights, out, levels, d, stream);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_tiled(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                              const at::Tensor& level_start_index,
                                                              const at::Tensor& sampling_locations,
                                                              const at::Tensor& attention_weights,
                                                              const at::Tensor& grad_output) {
  const Problem p =
      check_problem(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, c10::kCUDA);
  check_grad_output(p, value, grad_output);
  check_int_sizes(p);
  const Levels levels = make_levels(p);
  const c10::cuda::CUDAGuard guard(value.device());
  // float accumulation buffer for 16-bit values; grad_value itself for float and double
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(p.coord_dtype));
  at::Tensor grad_loc = at::empty_like(sampling_locations);
  at::Tensor grad_attn = at::empty_like(attention_weights);
  const int64_t samples = p.B * p.Q * p.H * p.L * p.P;
  if (samples == 0 || p.D == 0) {
    return {grad_value_acc.to(value.scalar_type()), grad_loc.zero_(), grad_attn.zero_()};
  }
  const bool is_double = value.scalar_type() == at::kDouble;
  const std::string unsupported = tiled_unsupported(p.D, is_double, samples);
  TORCH_CHECK(unsupported.empty(), "ms_deform_attn: the tiled backward does not apply: ", unsupported);
  const Tiles tiles = make_tiles(p, tile_side(p.D, is_double), samples);
  const auto int_options = value.options().dtype(at::kInt);
  at::Tensor tile_of = at::empty({samples}, int_options);
  at::Tensor counts = at::zeros({p.B * p.H * tiles.per_bh + 1}, int_options);
  at::Tensor entries = at::empty({samples}, int_options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_backward_tiled", [&] {
    constexpr int V = kPieceElems<scalar_t>;
    const Dims d = make_dims(p, V, kPieces<scalar_t>);
    if (p.D % V == 0 && aligned16(value.data_ptr()) && aligned16(grad_output.data_ptr())) {
      launch_sample<scalar_t, true>(value, sampling_locations, attention_weights, grad_output, grad_loc, grad_attn,
                                    tile_of, counts, levels, tiles, d, stream);
    } else {
      launch_sample<scalar_t, false>(value, sampling_locations, attention_weights, grad_output, grad_loc, grad_attn,
                                     tile_of, counts, levels, tiles, d, stream);
    }
    const at::Tensor bounds = at::cumsum(counts, 0, at::kInt);  // bounds[t] = first entry of tile t
    at::Tensor cursor = bounds.narrow(0, 0, bounds.numel() - 1).clone();
    launch_fill(tile_of, cursor, entries, stream);
    launch_scatter<scalar_t>(sampling_locations, attention_weights, grad_output, entries, bounds, grad_value_acc,
                             levels, tiles, d, stream);
  });
  return {grad_value_acc.to(value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace variants
}  // namespace msda
