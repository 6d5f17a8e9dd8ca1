/* An importable module, gin_adapter._native, so that Python finds the built library (editable installs too);
 * its functions (the other .c files here) are called through ctypes (gin_adapter/native_library.py). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "_native", "gin_adapter's compiled CPU kernels (called through ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }
