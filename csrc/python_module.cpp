// Python module init of dalle_fast._C. Importing the module loads the shared library, whose
// static initialisers register the ops (TORCH_LIBRARY / TORCH_LIBRARY_IMPL); it defines no Python
// functions itself, only the CPU kernels' tile sizes. Built by setup.py only (C++ users link the
// library built by CMake).
#include <Python.h>

#include "cpu/sparse_attention.h"

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "CPU_TILE_M", dalle_fast::cpu::TILE_M) < 0 ||
      PyModule_AddIntConstant(m, "CPU_TILE_N", dalle_fast::cpu::TILE_N) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
