// Multi-scale deformable attention: operator registration and the Python module `freeseg._C`.
//
// The kernels are registered with PyTorch's dispatcher as torch.ops.freeseg.ms_deform_attn_forward
// and torch.ops.freeseg.ms_deform_attn_backward (CPU here, CUDA in ms_deform_attn_cuda.cu when
// it is compiled in); the autograd.Function that ties them together is in
// freeseg/ops/ms_deform_attn.py. The Python module itself is empty apart from `with_cuda`:
// importing it runs the static registrations below. Plain CPython API instead of pybind11 keeps
// the compile short.
#include <Python.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

#ifndef FREESEG_WITH_CUDA
#define FREESEG_WITH_CUDA 0
#endif

TORCH_LIBRARY(freeseg, m) {
  m.def("ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
        "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def("ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
        "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(freeseg, CPU, m) {
  m.impl("ms_deform_attn_forward", &freeseg::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &freeseg::ms_deform_attn_backward_cpu);
}

// The module name comes from the build (`_C` from setup.py, another name from a JIT build).
#define FREESEG_CONCAT_(a, b) a##b
#define FREESEG_CONCAT(a, b) FREESEG_CONCAT_(a, b)

static PyModuleDef freeseg_module = {PyModuleDef_HEAD_INIT, "_C",
                                     "Compiled kernels of freeseg (registered in torch.ops.freeseg).",
                                     -1, nullptr};

PyMODINIT_FUNC FREESEG_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* module = PyModule_Create(&freeseg_module);
  if (module != nullptr && PyModule_AddIntConstant(module, "with_cuda", FREESEG_WITH_CUDA) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
