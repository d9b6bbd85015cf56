// Python bindings of the CUDA extension (the kernels live in ms_deform_attn_cuda.cu).
#include <torch/extension.h>

#include <tuple>

namespace msda {
at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                        const at::Tensor& sampling_locations, const at::Tensor& attention_weights);
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                             const at::Tensor& level_start_index,
                                                             const at::Tensor& sampling_locations,
                                                             const at::Tensor& attention_weights,
                                                             const at::Tensor& grad_output);
}  // namespace msda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "maskformers multi-scale deformable attention, CUDA kernels";
  m.def("forward", &msda::forward_cuda,
        "value (B,S,H,D), spatial_shapes (L,2) int64 CPU, level_start_index (L,) int64 CPU, "
        "sampling_locations (B,Q,H,L,P,2), attention_weights (B,Q,H,L,P) -> out (B,Q,H*D)",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"));
  m.def("backward", &msda::backward_cuda,
        "same inputs + grad_output (B,Q,H*D) -> (grad_value, grad_locations, grad_weights)", py::arg("value"),
        py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("grad_output"));
}
