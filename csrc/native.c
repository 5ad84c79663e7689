/* kvrelay native host library (placeholder module body; the kernels work fills it in). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyMethodDef methods[] = {{NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "kvrelay native host library", -1, methods};
PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
