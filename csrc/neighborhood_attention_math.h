// Index math and softmax steps of 2-D neighborhood attention, shared by the CPU and CUDA kernels.
//
// Semantics of NATTEN 0.17's natten2dqkrpb / natten2dav (non-causal), axis by axis: positions of one
// axis (length L) fall into `dilation` groups by index % dilation. A query attends to `kernel`
// consecutive members of its own group, start + k * dilation for k = 0..kernel-1. In group-local
// coordinates (g = index / dilation, the group has n = ceil((L - index % dilation) / dilation) members)
// the window starts at clamp(g - kernel / 2, 0, n - kernel): centred on the query, shifted inward at
// the borders so it always holds `kernel` positions. Needs L >= kernel * dilation (then n >= kernel).
// The relative position bias table has 2 * kernel - 1 entries per axis, indexed by the neighbour's
// offset from the query in group units plus kernel - 1; the first neighbour's entry is bias_start.
//
// The 2-D neighbourhood is the product of the row and column windows, neighbour n = ki * kernel + kj.
// Nothing here touches memory, so host and device code use the same functions.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NA_HOST_DEVICE inline
#endif

namespace na {

// First window position of query `index` along an axis of `length` positions.
NA_HOST_DEVICE int64_t window_start(int64_t index, int64_t length, int64_t kernel, int64_t dilation) {
  const int64_t group = index % dilation;
  const int64_t g = index / dilation;
  const int64_t members = (length - group + dilation - 1) / dilation;
  int64_t s = g - kernel / 2;
  if (s > members - kernel) s = members - kernel;
  if (s < 0) s = 0;
  return s * dilation + group;
}

// Bias-table entry (0 .. 2 * kernel - 2) of the first neighbour of query `index` whose window starts at
// `start`; neighbour k uses bias_start + k. (start - index) is a multiple of dilation.
NA_HOST_DEVICE int64_t bias_start(int64_t index, int64_t start, int64_t kernel, int64_t dilation) {
  return (start - index) / dilation + kernel - 1;
}

// The queries whose window holds key position `key`, along one axis: candidate c (0 .. 2 * kernel - 2)
// is query key + (c - kernel + 1) * dilation; returns whether it exists and holds the key, and then the
// key's neighbour index k in that query's window. The candidates are visited in increasing query order.
NA_HOST_DEVICE bool query_of_key(int64_t key, int64_t c, int64_t length, int64_t kernel, int64_t dilation,
                                 int64_t& query, int64_t& k) {
  query = key + (c - kernel + 1) * dilation;
  if (query < 0 || query >= length) return false;
  const int64_t start = window_start(query, length, kernel, dilation);
  if (key < start || key > start + (kernel - 1) * dilation) return false;
  k = (key - start) / dilation;
  return true;
}

NA_HOST_DEVICE float exp_(float v) { return expf(v); }
NA_HOST_DEVICE double exp_(double v) { return exp(v); }
NA_HOST_DEVICE float log_(float v) { return logf(v); }
NA_HOST_DEVICE double log_(double v) { return log(v); }

// Streaming softmax over the neighbours of one (query, head): after add(logit) the caller rescales its
// running output by `rescale` and adds `weight` times the neighbour's value row; at the end it divides
// by `sum` and stores lse() for the backward. Exactly the two-pass softmax up to rounding.
template <typename T>
struct OnlineSoftmax {
  T max;
  T sum;
  bool empty = true;

  NA_HOST_DEVICE void add(T logit, T& rescale, T& weight) {
    if (empty) {
      max = logit;
      sum = T(1);
      rescale = T(0);
      weight = T(1);
      empty = false;
      return;
    }
    if (logit > max) {
      rescale = exp_(max - logit);
      weight = T(1);
      sum = sum * rescale + T(1);
      max = logit;
    } else {
      rescale = T(1);
      weight = exp_(logit - max);
      sum += weight;
    }
  }

  NA_HOST_DEVICE T lse() const { return max + log_(sum); }
};

}  // namespace na
