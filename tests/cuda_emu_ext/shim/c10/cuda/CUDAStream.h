// Shadow of <c10/cuda/CUDAStream.h> for kernels run on the cuda_on_cpu emulator with this project's extensions:
// the emulator's own shadow first, then emu_ext.h (block-shared __shared__ variables).
#pragma once
#include_next <c10/cuda/CUDAStream.h>
#include <emu_ext.h>
