// Python module init of dalle_fast._C. Importing the module loads the shared library, whose
// static initialisers register the ops (TORCH_LIBRARY / TORCH_LIBRARY_IMPL); it defines no Python
// functions itself. Built by setup.py only (C++ users link the library built by CMake).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
