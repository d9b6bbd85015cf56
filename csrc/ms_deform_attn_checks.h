// Host-side argument checks of the native ms_deform_attn entry points (CPU and CUDA).
//
// The Python layer already validates its inputs, but the extension functions can be called
// directly, so every shape, dtype, device and level-table property the kernels rely on to stay in
// bounds is checked again here. Errors name the argument and the values.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace msda {

// Sizes of one problem plus the level table read from the CPU tensors.
struct Problem {
  int64_t B = 0, S = 0, Q = 0, H = 0, D = 0, L = 0, P = 0;
  std::vector<int64_t> heights, widths, starts;
  at::ScalarType coord_dtype = at::kFloat;
};

inline at::ScalarType coord_dtype_for(at::ScalarType value_dtype) {
  return value_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    s += std::to_string(t.size(i));
    if (i + 1 < t.dim() || t.dim() == 1) s += ",";
    if (i + 1 < t.dim()) s += " ";
  }
  return s + ")";
}

// Check the five forward inputs; `device_type` is the device the kernel runs on.
inline Problem check_problem(const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights, c10::DeviceType device_type) {
  Problem p;
  const auto dev_name = c10::DeviceTypeName(device_type, /*lower_case=*/true);

  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: expected value (B, S, H, D), got shape ", shape_str(value));
  const auto vt = value.scalar_type();
  TORCH_CHECK(vt == at::kFloat || vt == at::kDouble || vt == at::kBFloat16 || vt == at::kHalf,
              "ms_deform_attn: value must be float32, float64, bfloat16 or float16, got ", vt);
  TORCH_CHECK(value.device().type() == device_type, "ms_deform_attn: the ", dev_name,
              " kernel needs value on ", dev_name, ", got ", value.device());
  TORCH_CHECK(value.is_contiguous(), "ms_deform_attn: value must be contiguous (B, S, H, D)");
  p.B = value.size(0);
  p.S = value.size(1);
  p.H = value.size(2);
  p.D = value.size(3);
  p.coord_dtype = coord_dtype_for(vt);

  // level table: CPU int64 tensors, read here and handed to the kernels as plain numbers
  TORCH_CHECK(spatial_shapes.device().is_cpu() && level_start_index.device().is_cpu(),
              "ms_deform_attn: spatial_shapes and level_start_index must be CPU tensors, got ",
              spatial_shapes.device(), " and ", level_start_index.device());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64, got ",
              spatial_shapes.scalar_type(), " and ", level_start_index.scalar_type());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2 && spatial_shapes.size(0) >= 1,
              "ms_deform_attn: expected spatial_shapes (L, 2) with L >= 1, got shape ", shape_str(spatial_shapes));
  p.L = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == p.L,
              "ms_deform_attn: expected level_start_index (", p.L, ",), got shape ", shape_str(level_start_index));
  const auto shapes = spatial_shapes.accessor<int64_t, 2>();
  const auto starts = level_start_index.accessor<int64_t, 1>();
  constexpr int64_t kMaxSide = std::numeric_limits<int32_t>::max();
  int64_t offset = 0;
  for (int64_t l = 0; l < p.L; ++l) {
    const int64_t h = shapes[l][0], w = shapes[l][1];
    TORCH_CHECK(h >= 1 && w >= 1 && h <= kMaxSide && w <= kMaxSide, "ms_deform_attn: spatial_shapes[", l,
                "] = (", h, ", ", w, "): every level needs 1 <= h, w < 2^31");
    TORCH_CHECK(starts[l] == offset, "ms_deform_attn: level_start_index[", l, "] = ", starts[l],
                " but the levels before it cover ", offset, " positions");
    TORCH_CHECK(h * w <= p.S - offset, "ms_deform_attn: spatial_shapes cover more positions than value has (S = ",
                p.S, "); level ", l, " = (", h, ", ", w, ") starts at ", offset);
    p.heights.push_back(h);
    p.widths.push_back(w);
    p.starts.push_back(offset);
    offset += h * w;
  }
  TORCH_CHECK(offset == p.S, "ms_deform_attn: spatial_shapes cover sum(h*w) = ", offset,
              " positions but value has S = ", p.S);

  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(0) == p.B &&
                  sampling_locations.size(2) == p.H && sampling_locations.size(3) == p.L &&
                  sampling_locations.size(5) == 2,
              "ms_deform_attn: expected sampling_locations (B, Q, H, L, P, 2) with B=", p.B, ", H=", p.H,
              ", L=", p.L, ", got shape ", shape_str(sampling_locations));
  p.Q = sampling_locations.size(1);
  p.P = sampling_locations.size(4);
  TORCH_CHECK(attention_weights.dim() == 5 && attention_weights.size(0) == p.B &&
                  attention_weights.size(1) == p.Q && attention_weights.size(2) == p.H &&
                  attention_weights.size(3) == p.L && attention_weights.size(4) == p.P,
              "ms_deform_attn: expected attention_weights (B, Q, H, L, P) = (", p.B, ", ", p.Q, ", ", p.H, ", ",
              p.L, ", ", p.P, "), got shape ", shape_str(attention_weights));
  for (const auto& pair : {std::make_pair("sampling_locations", &sampling_locations),
                           std::make_pair("attention_weights", &attention_weights)}) {
    const at::Tensor& t = *pair.second;
    TORCH_CHECK(t.scalar_type() == p.coord_dtype, "ms_deform_attn: ", pair.first, " must be ", p.coord_dtype,
                " for ", vt, " values, got ", t.scalar_type());
    TORCH_CHECK(t.device() == value.device(), "ms_deform_attn: ", pair.first, " is on ", t.device(),
                " but value is on ", value.device());
    TORCH_CHECK(t.is_contiguous(), "ms_deform_attn: ", pair.first, " must be contiguous");
  }
  return p;
}

inline void check_grad_output(const Problem& p, const at::Tensor& value, const at::Tensor& grad_output) {
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == p.B && grad_output.size(1) == p.Q &&
                  grad_output.size(2) == p.H * p.D,
              "ms_deform_attn: expected grad_output (B, Q, H*D) = (", p.B, ", ", p.Q, ", ", p.H * p.D,
              "), got shape ", shape_str(grad_output));
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), "ms_deform_attn: grad_output must be ",
              value.scalar_type(), " like value, got ", grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == value.device(), "ms_deform_attn: grad_output is on ", grad_output.device(),
              " but value is on ", value.device());
  TORCH_CHECK(grad_output.is_contiguous(), "ms_deform_attn: grad_output must be contiguous");
}

}  // namespace msda
