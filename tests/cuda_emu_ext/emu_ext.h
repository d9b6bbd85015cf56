// Project-side additions to the cuda_on_cpu emulator (shared/tools/cuda_on_cpu, which stays unchanged):
// what the kernel variants of csrc/ need beyond the default kernels, included after the emulator's
// own headers by the c10/cuda shadows in shim/.
//
// __shared__: the emulator runs one block at a time per OS thread, all of the block's threads being
// fibers of that thread, so a `static thread_local` variable is exactly one copy per running block:
// every thread of the block sees the same storage, other blocks (on other workers) their own. As on
// a GPU its contents are undefined when a block starts (the previous block's values are left over).
// Barriers and races are the emulator's: a __syncthreads releases when every live thread reached one,
// and a thread runs until its next barrier or warp intrinsic. So a missing barrier shows up as stale data
// when the first shared read after the unsynchronised writes comes before any other synchronising call
// (then the reading thread runs ahead of the writers); a read after another warp intrinsic is not
// checked, since every thread of the block has reached that intrinsic first.
#pragma once

#include "cuda_emu.h"

#undef __shared__
#define __shared__ static thread_local

namespace emu_ext {

// Linear index of the calling thread in its block, and its lane.
inline unsigned linear_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
inline unsigned lane() { return linear_thread() % 32u; }

}  // namespace emu_ext
