// Python bindings of the CUDA kernel variants of neighborhood attention
// (neighborhood_attention_cuda_variants.cu); the default kernels have their own extension.
#include <torch/extension.h>

#include <string>
#include <tuple>

namespace na {
namespace variants {
std::tuple<at::Tensor, at::Tensor> forward_tensor_core(const at::Tensor& query, const at::Tensor& key,
                                                       const at::Tensor& value, const at::Tensor& rpb,
                                                       int64_t kernel_size, int64_t dilation, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_tensor_core(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& rpb,
    const at::Tensor& lse, const at::Tensor& grad_out, const at::Tensor& delta, int64_t kernel_size, int64_t dilation,
    double scale);
std::string tensor_core_unsupported(const at::Tensor& query);
}  // namespace variants
}  // namespace na

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "maskformers neighborhood attention, CUDA kernel variants";
  m.def("forward_tensor_core", &na::variants::forward_tensor_core,
        "the 'tensor_core' forward (bfloat16/float16, head dim 16/32/64): same arguments and results as the "
        "default forward",
        py::arg("query"), py::arg("key"), py::arg("value"), py::arg("rpb"), py::arg("kernel_size"),
        py::arg("dilation"), py::arg("scale"));
  m.def("backward_tensor_core_bwd", &na::variants::backward_tensor_core,
        "the 'tensor_core_bwd' backward: the default backward's arguments plus delta = sum(grad_out * out, -1) "
        "(float32, (B, H, W, heads)) -> (grad_query, grad_key, grad_value, grad_rpb)",
        py::arg("query"), py::arg("key"), py::arg("value"), py::arg("rpb"), py::arg("lse"), py::arg("grad_out"),
        py::arg("delta"), py::arg("kernel_size"), py::arg("dilation"), py::arg("scale"));
  m.def("tensor_core_unsupported", &na::variants::tensor_core_unsupported,
        "why the tensor-core kernels cannot run for this query's dtype and head dim ('' when it can)",
        py::arg("query"));
}
