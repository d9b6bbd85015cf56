// Host-side argument checks of the native neighborhood-attention entry points (CPU and CUDA).
//
// The Python layer validates its inputs first, but the extension functions can be called directly, so
// every property the kernels rely on to stay in bounds is checked again. Errors name the argument and
// the values.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <string>

namespace na {

struct Problem {
  int64_t B = 0, H = 0, W = 0, heads = 0, D = 0, kernel = 0, dilation = 0;
  bool has_bias = false;
  at::ScalarType acc_dtype = at::kFloat;
  int64_t channels() const { return heads * D; }
  int64_t pixels() const { return B * H * W; }
  int64_t neighbours() const { return kernel * kernel; }
  int64_t bias_side() const { return 2 * kernel - 1; }
};

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    s += std::to_string(t.size(i));
    if (i + 1 < t.dim() || t.dim() == 1) s += ",";
    if (i + 1 < t.dim()) s += " ";
  }
  return s + ")";
}

// query, key, value (B, H, W, heads, D) contiguous, one dtype; rpb (heads, 2K-1, 2K-1) in that dtype
// or an empty tensor for "no bias"; odd kernel >= 1, dilation >= 1, H and W >= kernel * dilation.
inline Problem check_problem(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                             const at::Tensor& rpb, int64_t kernel, int64_t dilation, c10::DeviceType device_type) {
  Problem p;
  const auto dev_name = c10::DeviceTypeName(device_type, /*lower_case=*/true);
  TORCH_CHECK(query.dim() == 5, "neighborhood_attention_2d: expected query (B, H, W, heads, D), got shape ",
              shape_str(query));
  const auto dt = query.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "neighborhood_attention_2d: query must be float32, float64, bfloat16 or float16, got ", dt);
  for (const auto& pair : {std::make_pair("key", &key), std::make_pair("value", &value)}) {
    const at::Tensor& t = *pair.second;
    TORCH_CHECK(t.sizes() == query.sizes(), "neighborhood_attention_2d: expected ", pair.first,
                " of the query's shape ", shape_str(query), ", got ", shape_str(t));
    TORCH_CHECK(t.scalar_type() == dt, "neighborhood_attention_2d: ", pair.first, " must be ", dt,
                " like query, got ", t.scalar_type());
    TORCH_CHECK(t.device() == query.device(), "neighborhood_attention_2d: ", pair.first, " is on ", t.device(),
                " but query is on ", query.device());
    TORCH_CHECK(t.is_contiguous(), "neighborhood_attention_2d: ", pair.first, " must be contiguous");
  }
  TORCH_CHECK(query.device().type() == device_type, "neighborhood_attention_2d: the ", dev_name,
              " kernel needs query on ", dev_name, ", got ", query.device());
  TORCH_CHECK(query.is_contiguous(), "neighborhood_attention_2d: query must be contiguous");
  p.B = query.size(0);
  p.H = query.size(1);
  p.W = query.size(2);
  p.heads = query.size(3);
  p.D = query.size(4);
  p.kernel = kernel;
  p.dilation = dilation;
  p.acc_dtype = dt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(kernel >= 1 && kernel % 2 == 1, "neighborhood_attention_2d: kernel_size must be odd and >= 1, got ",
              kernel);
  TORCH_CHECK(dilation >= 1, "neighborhood_attention_2d: dilation must be >= 1, got ", dilation);
  constexpr int64_t kMaxSide = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(kernel <= kMaxSide && dilation <= kMaxSide / kernel,
              "neighborhood_attention_2d: kernel_size * dilation too large (", kernel, " * ", dilation, ")");
  TORCH_CHECK(p.H >= kernel * dilation && p.W >= kernel * dilation,
              "neighborhood_attention_2d: the map (H, W) = (", p.H, ", ", p.W,
              ") must be at least kernel_size * dilation = ", kernel * dilation, " on both sides");
  p.has_bias = rpb.defined() && rpb.numel() > 0;
  if (p.has_bias) {
    TORCH_CHECK(rpb.dim() == 3 && rpb.size(0) == p.heads && rpb.size(1) == 2 * kernel - 1 &&
                    rpb.size(2) == 2 * kernel - 1,
                "neighborhood_attention_2d: expected rpb (heads, 2K-1, 2K-1) = (", p.heads, ", ", 2 * kernel - 1,
                ", ", 2 * kernel - 1, "), got ", shape_str(rpb));
    TORCH_CHECK(rpb.scalar_type() == dt, "neighborhood_attention_2d: rpb must be ", dt, " like query, got ",
                rpb.scalar_type());
    TORCH_CHECK(rpb.device() == query.device(), "neighborhood_attention_2d: rpb is on ", rpb.device(),
                " but query is on ", query.device());
    TORCH_CHECK(rpb.is_contiguous(), "neighborhood_attention_2d: rpb must be contiguous");
  }
  return p;
}

inline void check_backward_inputs(const Problem& p, const at::Tensor& query, const at::Tensor& lse,
                                  const at::Tensor& grad_out) {
  TORCH_CHECK(grad_out.sizes() == query.sizes(), "neighborhood_attention_2d: expected grad_out of the query's shape ",
              shape_str(query), ", got ", shape_str(grad_out));
  TORCH_CHECK(grad_out.scalar_type() == query.scalar_type(), "neighborhood_attention_2d: grad_out must be ",
              query.scalar_type(), " like query, got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == query.device() && grad_out.is_contiguous(),
              "neighborhood_attention_2d: grad_out must be contiguous on ", query.device());
  TORCH_CHECK(lse.dim() == 4 && lse.size(0) == p.B && lse.size(1) == p.H && lse.size(2) == p.W &&
                  lse.size(3) == p.heads,
              "neighborhood_attention_2d: expected lse (B, H, W, heads) = (", p.B, ", ", p.H, ", ", p.W, ", ",
              p.heads, "), got ", shape_str(lse));
  TORCH_CHECK(lse.scalar_type() == p.acc_dtype && lse.device() == query.device() && lse.is_contiguous(),
              "neighborhood_attention_2d: lse must be contiguous ", p.acc_dtype, " on ", query.device(), ", got ",
              lse.scalar_type(), " on ", lse.device());
}

}  // namespace na
