// Python module shell for spikingir._C (setup.py builds it; CMake does not).
// Importing it loads the shared library, which runs the TORCH_LIBRARY
// registrations of ops.cpp and the per-device kernel files; nothing is exported.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "spikingir compiled ops (registered with torch.library)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}
