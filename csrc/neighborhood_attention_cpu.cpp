// CPU kernels of 2-D neighborhood attention and the CPU extension module.
//
// Layouts: query, key, value, out and their gradients (B, H, W, heads, D), one pixel's heads*D = C
// channels contiguous; rpb (heads, 2K-1, 2K-1); lse (B, H, W, heads) in the accumulation type. 16-bit
// inputs are converted to float once up front; all arithmetic is in float (double for double).
//
// Forward, fused per pixel (b, i, j) for all heads at once, at::parallel_for over pixels: one pass over
// the K*K neighbouring key rows (C contiguous numbers each) gives heads*K*K logits (+ bias), a softmax per
// head turns them into probabilities, one pass over the value rows accumulates the output. Only those
// heads*K*K numbers per thread exist at a time: no (B, H, W, heads, K*K) tensor in the forward.
//
// Backward, deterministic and without atomics:
//   pass 1 over query pixels: recompute the probabilities P from the logits and lse, dP = dO . v,
//          dS = P * (dP - sum_n P dP), grad_query = scale * sum_n dS k_n; keep P and dS (B, H, W, heads, K*K);
//   pass 2 over key pixels: grad_key = scale * sum dS q and grad_value = sum P dO over the queries whose
//          windows hold the key (na::query_of_key), in a fixed order;
//   bias:  grad_rpb[h, bias_i + ki, bias_j + kj] = sum over batch and pixels of dS, one head per task.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "neighborhood_attention_checks.h"
#include "neighborhood_attention_math.h"

namespace na {
namespace {

// Independent partial sums in a dot product: a fixed-width inner loop vectorizes without
// reassociation flags and keeps the summation order independent of the thread count.
template <typename T>
constexpr int64_t kLanes = 32 / static_cast<int64_t>(sizeof(T));

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  constexpr int64_t W = kLanes<T>;
  T part[W] = {};
  int64_t d0 = 0;
  for (; d0 + W <= n; d0 += W) {
    for (int64_t j = 0; j < W; ++j) part[j] += a[d0 + j] * b[d0 + j];
  }
  for (int64_t j = 0; d0 + j < n; ++j) part[j] += a[d0 + j] * b[d0 + j];
  for (int64_t w = W / 2; w > 0; w /= 2) {
    for (int64_t j = 0; j < w; ++j) part[j] += part[j + w];
  }
  return part[0];
}

template <typename T>
inline void axpy(T* __restrict y, T a, const T* __restrict x, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

// Window start and bias start of every position of one axis.
struct Axis {
  std::vector<int64_t> start, bias;
  Axis(int64_t length, int64_t kernel, int64_t dilation) : start(length), bias(length) {
    for (int64_t i = 0; i < length; ++i) {
      start[i] = window_start(i, length, kernel, dilation);
      bias[i] = bias_start(i, start[i], kernel, dilation);
    }
  }
};

// logits[h * KK + n] = scale * q_h . k_{n,h} (+ rpb) for the K*K neighbours of pixel (b, i, j);
// `scaled_q` holds the pixel's query row times scale.
template <typename T>
void pixel_logits(const Problem& p, const Axis& rows, const Axis& cols, int64_t b, int64_t i, int64_t j,
                  const T* scaled_q, const T* key, const T* rpb, T* logits) {
  const int64_t C = p.channels(), D = p.D, K = p.kernel, KK = p.neighbours(), R = p.bias_side();
  const int64_t si = rows.start[i], sj = cols.start[j];
  for (int64_t ki = 0; ki < K; ++ki) {
    const int64_t r = si + ki * p.dilation;
    for (int64_t kj = 0; kj < K; ++kj) {
      const int64_t n = ki * K + kj;
      const T* krow = key + ((b * p.H + r) * p.W + sj + kj * p.dilation) * C;
      for (int64_t h = 0; h < p.heads; ++h) logits[h * KK + n] = dot(scaled_q + h * D, krow + h * D, D);
    }
  }
  if (rpb != nullptr) {
    const int64_t bi = rows.bias[i], bj = cols.bias[j];
    for (int64_t h = 0; h < p.heads; ++h) {
      for (int64_t ki = 0; ki < K; ++ki) {
        const T* bias_row = rpb + (h * R + bi + ki) * R + bj;
        for (int64_t kj = 0; kj < K; ++kj) logits[h * KK + ki * K + kj] += bias_row[kj];
      }
    }
  }
}

int64_t grain_for(const Problem& p) {
  const int64_t cost = std::max<int64_t>(1, p.neighbours() * p.channels() * 4);
  return std::max<int64_t>(1, 131072 / cost);
}

template <typename T, typename out_t>
void forward_kernel(const Problem& p, const T* query, const T* key, const T* value, const T* rpb, T scale,
                    out_t* out, T* lse) {
  const int64_t C = p.channels(), D = p.D, K = p.kernel, KK = p.neighbours();
  const Axis rows(p.H, K, p.dilation), cols(p.W, K, p.dilation);
  at::parallel_for(0, p.pixels(), grain_for(p), [&](int64_t begin, int64_t end) {
    std::vector<T> q(C), acc(C), logits(p.heads * KK);
    for (int64_t pix = begin; pix < end; ++pix) {
      const int64_t j = pix % p.W, i = (pix / p.W) % p.H, b = pix / (p.W * p.H);
      for (int64_t c = 0; c < C; ++c) q[c] = query[pix * C + c] * scale;
      pixel_logits(p, rows, cols, b, i, j, q.data(), key, rpb, logits.data());
      for (int64_t h = 0; h < p.heads; ++h) {  // softmax per head, in place
        T* l = logits.data() + h * KK;
        const T m = *std::max_element(l, l + KK);
        T sum = T(0);
        for (int64_t n = 0; n < KK; ++n) {
          l[n] = exp_(l[n] - m);
          sum += l[n];
        }
        for (int64_t n = 0; n < KK; ++n) l[n] /= sum;
        lse[pix * p.heads + h] = m + log_(sum);
      }
      std::fill(acc.begin(), acc.end(), T(0));
      const int64_t si = rows.start[i], sj = cols.start[j];
      for (int64_t ki = 0; ki < K; ++ki) {
        for (int64_t kj = 0; kj < K; ++kj) {
          const int64_t n = ki * K + kj;
          const T* vrow = value + ((b * p.H + si + ki * p.dilation) * p.W + sj + kj * p.dilation) * C;
          for (int64_t h = 0; h < p.heads; ++h) axpy(acc.data() + h * D, logits[h * KK + n], vrow + h * D, D);
        }
      }
      for (int64_t c = 0; c < C; ++c) out[pix * C + c] = static_cast<out_t>(acc[c]);
    }
  });
}

// Pass 1: probabilities and logit gradients of every (pixel, head, neighbour), and grad_query.
template <typename T>
void backward_queries(const Problem& p, const Axis& rows, const Axis& cols, const T* query, const T* key,
                      const T* value, const T* rpb, const T* lse, const T* grad_out, T scale, T* probs,
                      T* grad_logits, T* grad_query) {
  const int64_t C = p.channels(), D = p.D, K = p.kernel, KK = p.neighbours();
  at::parallel_for(0, p.pixels(), grain_for(p), [&](int64_t begin, int64_t end) {
    std::vector<T> q(C);
    for (int64_t pix = begin; pix < end; ++pix) {
      const int64_t j = pix % p.W, i = (pix / p.W) % p.H, b = pix / (p.W * p.H);
      for (int64_t c = 0; c < C; ++c) q[c] = query[pix * C + c] * scale;
      T* P = probs + pix * p.heads * KK;
      T* dS = grad_logits + pix * p.heads * KK;
      pixel_logits(p, rows, cols, b, i, j, q.data(), key, rpb, P);
      const T* go = grad_out + pix * C;
      const int64_t si = rows.start[i], sj = cols.start[j];
      for (int64_t ki = 0; ki < K; ++ki) {  // dS <- dP = dO . v_n
        for (int64_t kj = 0; kj < K; ++kj) {
          const int64_t n = ki * K + kj;
          const T* vrow = value + ((b * p.H + si + ki * p.dilation) * p.W + sj + kj * p.dilation) * C;
          for (int64_t h = 0; h < p.heads; ++h) dS[h * KK + n] = dot(go + h * D, vrow + h * D, D);
        }
      }
      for (int64_t h = 0; h < p.heads; ++h) {
        T* Ph = P + h * KK;
        T* dSh = dS + h * KK;
        const T l = lse[pix * p.heads + h];
        T delta = T(0);
        for (int64_t n = 0; n < KK; ++n) {
          Ph[n] = exp_(Ph[n] - l);
          delta += Ph[n] * dSh[n];
        }
        for (int64_t n = 0; n < KK; ++n) dSh[n] = Ph[n] * (dSh[n] - delta);
      }
      T* gq = grad_query + pix * C;
      std::fill(gq, gq + C, T(0));
      for (int64_t ki = 0; ki < K; ++ki) {
        for (int64_t kj = 0; kj < K; ++kj) {
          const int64_t n = ki * K + kj;
          const T* krow = key + ((b * p.H + si + ki * p.dilation) * p.W + sj + kj * p.dilation) * C;
          for (int64_t h = 0; h < p.heads; ++h) axpy(gq + h * D, scale * dS[h * KK + n], krow + h * D, D);
        }
      }
    }
  });
}

// Pass 2: grad_key and grad_value of every key pixel, gathered from the queries that attend to it.
template <typename T>
void backward_keys(const Problem& p, const T* query, const T* grad_out, const T* probs, const T* grad_logits,
                   T scale, T* grad_key, T* grad_value) {
  const int64_t C = p.channels(), D = p.D, K = p.kernel, KK = p.neighbours();
  at::parallel_for(0, p.pixels(), grain_for(p), [&](int64_t begin, int64_t end) {
    for (int64_t pix = begin; pix < end; ++pix) {
      const int64_t mj = pix % p.W, mi = (pix / p.W) % p.H, b = pix / (p.W * p.H);
      T* gk = grad_key + pix * C;
      T* gv = grad_value + pix * C;
      std::fill(gk, gk + C, T(0));
      std::fill(gv, gv + C, T(0));
      for (int64_t ci = 0; ci < 2 * K - 1; ++ci) {
        int64_t i, ki;
        if (!query_of_key(mi, ci, p.H, K, p.dilation, i, ki)) continue;
        for (int64_t cj = 0; cj < 2 * K - 1; ++cj) {
          int64_t j, kj;
          if (!query_of_key(mj, cj, p.W, K, p.dilation, j, kj)) continue;
          const int64_t qpix = (b * p.H + i) * p.W + j;
          const int64_t n = ki * K + kj;
          for (int64_t h = 0; h < p.heads; ++h) {
            const int64_t o = (qpix * p.heads + h) * KK + n;
            axpy(gk + h * D, scale * grad_logits[o], query + qpix * C + h * D, D);
            axpy(gv + h * D, probs[o], grad_out + qpix * C + h * D, D);
          }
        }
      }
    }
  });
}

template <typename T>
void backward_bias(const Problem& p, const Axis& rows, const Axis& cols, const T* grad_logits, T* grad_rpb) {
  const int64_t K = p.kernel, KK = p.neighbours(), R = p.bias_side();
  at::parallel_for(0, p.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      T* g = grad_rpb + h * R * R;
      for (int64_t pix = 0; pix < p.pixels(); ++pix) {
        const int64_t j = pix % p.W, i = (pix / p.W) % p.H;
        const T* dS = grad_logits + (pix * p.heads + h) * KK;
        for (int64_t ki = 0; ki < K; ++ki) {
          T* g_row = g + (rows.bias[i] + ki) * R + cols.bias[j];
          for (int64_t kj = 0; kj < K; ++kj) g_row[kj] += dS[ki * K + kj];
        }
      }
    }
  });
}

at::Tensor acc_tensor(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                               const at::Tensor& value, const at::Tensor& rpb, int64_t kernel_size,
                                               int64_t dilation, double scale) {
  const Problem p = check_problem(query, key, value, rpb, kernel_size, dilation, c10::kCPU);
  at::Tensor out = at::empty_like(query);
  at::Tensor lse = at::empty({p.B, p.H, p.W, p.heads}, query.options().dtype(p.acc_dtype));
  if (p.pixels() == 0 || p.heads == 0) return {out, lse};
  const at::Tensor q = acc_tensor(query, p.acc_dtype), k = acc_tensor(key, p.acc_dtype);
  const at::Tensor v = acc_tensor(value, p.acc_dtype);
  const at::Tensor bias = p.has_bias ? acc_tensor(rpb, p.acc_dtype) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "neighborhood_attention_forward_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<acc_t, scalar_t>(p, q.data_ptr<acc_t>(), k.data_ptr<acc_t>(), v.data_ptr<acc_t>(),
                                    p.has_bias ? bias.data_ptr<acc_t>() : nullptr, static_cast<acc_t>(scale),
                                    out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& rpb,
    const at::Tensor& lse, const at::Tensor& grad_out, int64_t kernel_size, int64_t dilation, double scale) {
  const Problem p = check_problem(query, key, value, rpb, kernel_size, dilation, c10::kCPU);
  check_backward_inputs(p, query, lse, grad_out);
  const auto acc_options = query.options().dtype(p.acc_dtype);
  at::Tensor grad_q = at::zeros(query.sizes(), acc_options);
  at::Tensor grad_k = at::zeros(query.sizes(), acc_options);
  at::Tensor grad_v = at::zeros(query.sizes(), acc_options);
  at::Tensor grad_rpb = p.has_bias ? at::zeros(rpb.sizes(), acc_options) : at::empty({0}, query.options());
  if (p.pixels() > 0 && p.heads > 0) {
    const at::Tensor q = acc_tensor(query, p.acc_dtype), k = acc_tensor(key, p.acc_dtype);
    const at::Tensor v = acc_tensor(value, p.acc_dtype), go = acc_tensor(grad_out, p.acc_dtype);
    const at::Tensor bias = p.has_bias ? acc_tensor(rpb, p.acc_dtype) : at::Tensor();
    // (B, H, W, heads, K*K): probabilities and logit gradients, shared by the two passes
    at::Tensor probs = at::empty({p.B, p.H, p.W, p.heads, p.neighbours()}, acc_options);
    at::Tensor grad_logits = at::empty_like(probs);
    const Axis rows(p.H, p.kernel, p.dilation), cols(p.W, p.kernel, p.dilation);
    AT_DISPATCH_FLOATING_TYPES(p.acc_dtype, "neighborhood_attention_backward_cpu", [&] {
      using T = scalar_t;
      const T s = static_cast<T>(scale);
      backward_queries<T>(p, rows, cols, q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(),
                          p.has_bias ? bias.data_ptr<T>() : nullptr, lse.data_ptr<T>(), go.data_ptr<T>(), s,
                          probs.data_ptr<T>(), grad_logits.data_ptr<T>(), grad_q.data_ptr<T>());
      backward_keys<T>(p, q.data_ptr<T>(), go.data_ptr<T>(), probs.data_ptr<T>(), grad_logits.data_ptr<T>(), s,
                       grad_k.data_ptr<T>(), grad_v.data_ptr<T>());
      if (p.has_bias) backward_bias<T>(p, rows, cols, grad_logits.data_ptr<T>(), grad_rpb.data_ptr<T>());
    });
  }
  const auto dt = query.scalar_type();
  return {grad_q.to(dt), grad_k.to(dt), grad_v.to(dt), p.has_bias ? grad_rpb.to(rpb.scalar_type()) : grad_rpb};
}

}  // namespace
}  // namespace na

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "maskformers 2-D neighborhood attention, CPU kernels";
  m.def("forward", &na::forward_cpu,
        "query, key, value (B,H,W,heads,D), rpb (heads,2K-1,2K-1) or empty, kernel_size, dilation, scale "
        "-> (out (B,H,W,heads,D), lse (B,H,W,heads))",
        py::arg("query"), py::arg("key"), py::arg("value"), py::arg("rpb"), py::arg("kernel_size"),
        py::arg("dilation"), py::arg("scale"), py::call_guard<py::gil_scoped_release>());
  m.def("backward", &na::backward_cpu,
        "query, key, value, rpb, lse, grad_out, kernel_size, dilation, scale -> (grad_query, grad_key, "
        "grad_value, grad_rpb (empty without rpb))",
        py::arg("query"), py::arg("key"), py::arg("value"), py::arg("rpb"), py::arg("lse"), py::arg("grad_out"),
        py::arg("kernel_size"), py::arg("dilation"), py::arg("scale"), py::call_guard<py::gil_scoped_release>());
}
