// Python module shell for spikingir._C (setup.py builds it; CMake does not).
// Importing it loads the shared library, which runs the TORCH_LIBRARY
// registrations of ops.cpp and the per-device kernel files. Exported: the
// constant `openmp`, 1 when the kernels were compiled with OpenMP, i.e. when
// at::parallel_for (a header template) really runs on torch's threads; and
// `cpu_isa()`, the instruction set the CPU spike_conv2d kernels run with now
// ("avx512", "avx2" or "generic"; cpu/isa.h).
#include <Python.h>

#include "cpu/isa.h"

namespace {
PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(spikingir::isa_name(spikingir::accumulate_isa()));
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set of the CPU spike_conv2d kernels now."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "spikingir compiled ops (registered with torch.library)",
      -1, methods};
  PyObject* m = PyModule_Create(&module_def);
#ifdef _OPENMP
  const long openmp = 1;
#else
  const long openmp = 0;
#endif
  if (m != nullptr && PyModule_AddIntConstant(m, "openmp", openmp) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}
