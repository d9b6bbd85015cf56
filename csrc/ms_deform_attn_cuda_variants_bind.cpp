// Python bindings of the CUDA kernel variants (ms_deform_attn_cuda_variants.cu); the default kernels
// have their own extension (ms_deform_attn_cuda_bind.cpp).
#include <torch/extension.h>

#include <string>
#include <tuple>

namespace msda {
namespace variants {
at::Tensor forward_coalesced(const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights);
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_tiled(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                              const at::Tensor& level_start_index,
                                                              const at::Tensor& sampling_locations,
                                                              const at::Tensor& attention_weights,
                                                              const at::Tensor& grad_output);
std::string tiled_unsupported(int64_t D, bool is_double, int64_t samples);
}  // namespace variants
}  // namespace msda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "maskformers multi-scale deformable attention, CUDA kernel variants";
  m.def("forward_coalesced", &msda::variants::forward_coalesced,
        "the 'coalesced' forward: same arguments and result as the default forward", py::arg("value"),
        py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"));
  m.def("backward_tiled", &msda::variants::backward_tiled,
        "the 'tiled' backward: same arguments and results as the default backward", py::arg("value"),
        py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("grad_output"));
  m.def("tiled_unsupported", &msda::variants::tiled_unsupported,
        "why the tiled backward cannot run this problem ('' when it can)", py::arg("head_dim"),
        py::arg("is_double"), py::arg("samples"));
}
