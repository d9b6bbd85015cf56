// Shadow of CUDA's <mma.h> for the cuda_on_cpu emulator: a portable nvcuda::wmma (warp matrix
// multiply-accumulate) for kernels run on the CPU.
//
// The fragment layout of the real API is opaque (which lane holds which element is unspecified), so
// any consistent layout is faithful for code that only loads, multiplies, stores and applies uniform
// elementwise operations: here every lane holds the whole tile. The warp-collective rules are enforced
// through the emulator's warp rendezvous:
//   * load_matrix_sync / store_matrix_sync / mma_sync must be reached by every live lane of the warp at
//     the same call site with the same arguments (pointer, ldm, layout; checked by comparing with lane
//     0), else the emulator reports a divergent warp intrinsic or this file reports "wmma misuse";
//   * pointers must be 256-bit aligned and ldm a multiple of 16 bytes, as the hardware requires;
//   * a load reads memory before the rendezvous and a store writes after it, each lane writing only its
//     share of the elements (element e by lane e % 32): a kernel that reads a tile before the lanes that
//     wrote it have synchronised reads stale data here, as it could on a GPU.
// Products of 16-bit inputs are exact in float; sums run in float in a fixed order (the hardware's
// order is unspecified, its rounding can differ in the last bits).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda_emu.h"
#include "emu_ext.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

template <typename Use, int M, int N, int K>
struct Shape;
template <int M, int N, int K>
struct Shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct Shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct Shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
template <>
inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

inline void misuse(const char* file, int line, const std::string& what) { emu::device_fault("wmma misuse", file, line, what); }

// Rendezvous of the whole warp at this call site; every lane must pass the same `key`.
inline void collective(const char* file, int line, std::uint64_t key) {
  const std::uint64_t first = emu::warp_sync(file, line, 0xffffffffu, emu::kShflIdx, key, 0, 32);
  if (first != key) misuse(file, line, "lanes of a warp passed different pointers, ldm or layout");
}

template <typename T>
inline void check_args(const T* p, unsigned ldm, const char* file, int line) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) misuse(file, line, "pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0) misuse(file, line, "ldm " + std::to_string(ldm) + " not a multiple of 16 bytes");
}

template <typename T>
inline std::uint64_t key_of(const T* p, unsigned ldm, bool col) {
  return reinterpret_cast<std::uint64_t>(p) ^ (static_cast<std::uint64_t>(ldm) << 48) ^ (col ? 1ull << 63 : 0ull);
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
 public:
  using element_type = T;
  static constexpr int rows = detail::Shape<Use, M, N, K>::rows;
  static constexpr int cols = detail::Shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];  // row-major tile (this emulation's layout; opaque to kernels)
};

#define EMU_WMMA_SITE const char *emu_file = __builtin_FILE(), int emu_line = __builtin_LINE()

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = static_cast<T>(v);
}

// matrix_a / matrix_b: the layout is a template argument of the fragment
template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm, EMU_WMMA_SITE) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load takes a layout_t argument");
  constexpr bool col = std::is_same_v<Layout, col_major>;
  detail::check_args(p, ldm, emu_file, emu_line);
  for (int r = 0; r < f.rows; ++r) {
    for (int c = 0; c < f.cols; ++c) f.x[r * f.cols + c] = col ? p[c * ldm + r] : p[r * ldm + c];
  }
  detail::collective(emu_file, emu_line, detail::key_of(p, ldm, col));
}

template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout,
                             EMU_WMMA_SITE) {
  const bool col = layout == mem_col_major;
  detail::check_args(p, ldm, emu_file, emu_line);
  for (int r = 0; r < f.rows; ++r) {
    for (int c = 0; c < f.cols; ++c) f.x[r * f.cols + c] = col ? p[c * ldm + r] : p[r * ldm + c];
  }
  detail::collective(emu_file, emu_line, detail::key_of(p, ldm, col));
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout,
                              EMU_WMMA_SITE) {
  const bool col = layout == mem_col_major;
  detail::check_args(p, ldm, emu_file, emu_line);
  detail::collective(emu_file, emu_line, detail::key_of(p, ldm, col));
  const int lane = static_cast<int>(emu_ext::lane());
  for (int e = lane; e < f.num_elements; e += 32) {
    const int r = e / f.cols, c = e % f.cols;
    (col ? p[c * ldm + r] : p[r * ldm + c]) = f.x[e];
  }
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c,
                     EMU_WMMA_SITE) {
  static_assert(std::is_same_v<TA, TB>, "wmma: matrix_a and matrix_b must have one element type");
  float out[M * N];
  for (int r = 0; r < M; ++r) {
    for (int col = 0; col < N; ++col) {
      float acc = detail::to_float(c.x[r * N + col]);
      for (int k = 0; k < K; ++k) acc += detail::to_float(a.x[r * K + k]) * detail::to_float(b.x[k * N + col]);
      out[r * N + col] = acc;
    }
  }
  for (int i = 0; i < M * N; ++i) d.x[i] = detail::from_float<TC>(out[i]);
  detail::collective(emu_file, emu_line, 0);
}

#undef EMU_WMMA_SITE

}  // namespace wmma
}  // namespace nvcuda
