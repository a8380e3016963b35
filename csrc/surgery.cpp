// The op schemas of surgery._C: one TORCH_LIBRARY block; kernels register per device in their own files.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import surgery._C` loads this library, which registers the ops with the dispatcher.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(surgery, m) {
  m.def("prune_neurons_(Tensor(a!)[] fc_in, Tensor(b!)[] fc_in_bias, Tensor(c!) fc_out, Tensor neurons) -> ()");
  m.def("masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor[] masks, int step, float lr, float beta1, float beta2, float eps, float weight_decay) -> ()");
  m.def("sparse_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor[] indices, int step, float lr, float beta1, float beta2, float eps, float weight_decay) -> ()");
}
