// Gradient of the relative position bias of 2-D neighborhood attention from the logit gradients, shared
// by the CUDA kernels (default and variants); host code (ATen ops), so it runs wherever grad_logits lives.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "neighborhood_attention_checks.h"
#include "neighborhood_attention_math.h"

namespace na {

// grad_logits (B, H, W, heads, K, K) -> grad_rpb (heads, 2K-1, 2K-1): grad_rpb[h, a, c] sums over b, i, j,
// ki, kj with row_bias(i) + ki = a and col_bias(j) + kj = c, as two contractions with one-hot tables
// (deterministic, no atomics).
inline at::Tensor bias_gradient(const Problem& p, const at::Tensor& grad_logits) {
  const int64_t K = p.kernel, R = p.bias_side();
  auto one_hot = [&](int64_t length) {  // (length, K, R): entry [i, k, bias_start(i) + k] = 1
    at::Tensor t = at::zeros({length, K, R}, at::kDouble);
    auto a = t.accessor<double, 3>();
    for (int64_t i = 0; i < length; ++i) {
      const int64_t b = bias_start(i, window_start(i, length, K, p.dilation), K, p.dilation);
      for (int64_t k = 0; k < K; ++k) a[i][k][b + k] = 1.0;
    }
    return t.to(grad_logits.options());
  };
  const at::Tensor summed = grad_logits.view({p.B, p.H, p.W, p.heads, K, K}).sum(0);  // (H, W, heads, K, K)
  return at::einsum("iar,ijhab,jbs->hrs", {one_hot(p.H), summed, one_hot(p.W)});
}

}  // namespace na
