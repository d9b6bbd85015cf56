// Python bindings of the neighborhood-attention CUDA extension (the kernels live in
// neighborhood_attention_cuda.cu).
#include <torch/extension.h>

#include <tuple>

namespace na {
std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                                const at::Tensor& rpb, int64_t kernel_size, int64_t dilation,
                                                double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& rpb,
    const at::Tensor& lse, const at::Tensor& grad_out, int64_t kernel_size, int64_t dilation, double scale);
}  // namespace na

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "maskformers 2-D neighborhood attention, CUDA kernels";
  m.def("forward", &na::forward_cuda,
        "query, key, value (B,H,W,heads,D), rpb (heads,2K-1,2K-1) or empty, kernel_size, dilation, scale "
        "-> (out (B,H,W,heads,D), lse (B,H,W,heads))",
        py::arg("query"), py::arg("key"), py::arg("value"), py::arg("rpb"), py::arg("kernel_size"),
        py::arg("dilation"), py::arg("scale"));
  m.def("backward", &na::backward_cuda,
        "query, key, value, rpb, lse, grad_out, kernel_size, dilation, scale -> (grad_query, grad_key, "
        "grad_value, grad_rpb (empty without rpb))",
        py::arg("query"), py::arg("key"), py::arg("value"), py::arg("rpb"), py::arg("lse"), py::arg("grad_out"),
        py::arg("kernel_size"), py::arg("dilation"), py::arg("scale"));
}
