/* kvrelay native host library: the CPython binding (module kvrelay._native).
 *
 * Owns: argument conversion and GIL release around the copies in kvcopy.c and chunksum.c.  Must not touch: torch
 * (this is a plain C extension; Python passes raw addresses, lengths and strides, see
 * kvrelay/kernels/native.py, which validates first; kv_validate checks again before any write).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "chunksum.h"
#include "kvcopy.h"
#include "permcopy.h"

#define COPY_NARGS 25

static PyObject *py_copy(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != COPY_NARGS) {
        PyErr_Format(PyExc_TypeError, "_native.copy takes %d int arguments, got %zd", COPY_NARGS, nargs);
        return NULL;
    }
    long long v[COPY_NARGS];
    for (Py_ssize_t i = 0; i < nargs; i++) {
        v[i] = PyLong_AsLongLong(args[i]);
        if (v[i] == -1 && PyErr_Occurred()) return NULL;
    }
    kv_job j;
    int k = 0;
    j.pack = (int)v[k++];
    j.base[0] = (char *)(intptr_t)v[k++]; j.extent[0] = v[k++]; j.offset[0] = v[k++];
    j.base[1] = (char *)(intptr_t)v[k++]; j.extent[1] = v[k++]; j.offset[1] = v[k++];
    j.num_kv = (int)v[k++];
    j.block_stride = v[k++]; j.token_stride = v[k++]; j.head_stride = v[k++]; j.row_bytes = v[k++];
    j.num_blocks = v[k++]; j.block_size = v[k++]; j.cache_heads = v[k++];
    j.ids = (const int64_t *)(intptr_t)v[k++]; j.num_ids = v[k++];
    j.token_start = v[k++]; j.token_end = v[k++];
    j.cache_h0 = v[k++]; j.num_heads = v[k++];
    j.chunk = (char *)(intptr_t)v[k++]; j.chunk_nbytes = v[k++]; j.chunk_heads = v[k++]; j.chunk_h0 = v[k++];
    char err[512];
    int rc;
    int64_t bytes = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = kv_validate(&j, err, sizeof err);
    if (rc == 0) bytes = kv_run(&j);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    return PyLong_FromLongLong(bytes);
}

#define PERM_NARGS 19
/* perm_copy(pack, region, region_nbytes, num_blocks, cache_heads, block_size, head_dim, elem_size, perm_ptr,
 * ids_ptr, num_ids, token_start, tokens, chunk_ptr, chunk_nbytes, chunk_heads, chunk_h0, cache_h0, num_heads)
 * -> bytes (permcopy.h) */
static PyObject *py_perm_copy(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != PERM_NARGS) {
        PyErr_Format(PyExc_TypeError, "_native.perm_copy takes %d int arguments, got %zd", PERM_NARGS, nargs);
        return NULL;
    }
    long long v[PERM_NARGS];
    for (Py_ssize_t i = 0; i < nargs; i++) {
        v[i] = PyLong_AsLongLong(args[i]);
        if (v[i] == -1 && PyErr_Occurred()) return NULL;
    }
    pc_job j;
    int k = 0;
    j.pack = (int)v[k++];
    j.region = (char *)(intptr_t)v[k++]; j.region_nbytes = v[k++];
    j.num_blocks = v[k++]; j.cache_heads = v[k++]; j.block_size = v[k++]; j.head_dim = v[k++];
    j.elem_size = v[k++];
    j.perm = (const int32_t *)(intptr_t)v[k++];
    j.ids = (const int64_t *)(intptr_t)v[k++]; j.num_ids = v[k++];
    j.token_start = v[k++]; j.tokens = v[k++];
    j.chunk = (char *)(intptr_t)v[k++]; j.chunk_nbytes = v[k++]; j.chunk_heads = v[k++]; j.chunk_h0 = v[k++];
    j.cache_h0 = v[k++]; j.num_heads = v[k++];
    char err[512];
    int rc;
    int64_t bytes = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = pc_validate(&j, err, sizeof err);
    if (rc == 0) bytes = pc_run(&j);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    return PyLong_FromLongLong(bytes);
}

static PyObject *py_set_threads(PyObject *self, PyObject *arg) {
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > 256) {
        PyErr_Format(PyExc_ValueError, "native thread count must be in [1, 256], got %ld", n);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kv_set_threads((int)n);
    Py_END_ALLOW_THREADS
    if (rc != 0) { PyErr_SetString(PyExc_ValueError, "could not set the native thread count"); return NULL; }
    Py_RETURN_NONE;
}

static PyObject *py_get_threads(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return PyLong_FromLong(kv_get_threads());
}

static PyObject *py_set_threshold(PyObject *self, PyObject *arg) {
    (void)self;
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    kv_set_parallel_threshold(n);
    Py_RETURN_NONE;
}

static PyObject *py_get_threshold(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return PyLong_FromLongLong(kv_get_parallel_threshold());
}

static PyObject *py_set_stream_threshold(PyObject *self, PyObject *arg) {
    (void)self;
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    kv_set_stream_threshold(n);
    Py_RETURN_NONE;
}

static PyObject *py_get_stream_threshold(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return PyLong_FromLongLong(kv_get_stream_threshold());
}

static PyObject *py_get_backoffs(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return PyLong_FromUnsignedLongLong(kv_get_backoffs());
}

static PyObject *py_set_backoff_ns(PyObject *self, PyObject *arg) {
    (void)self;
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    kv_set_backoff_ns(n);
    Py_RETURN_NONE;
}


/* Buffers (bytes, bytearray, memoryview, numpy arrays: anything C-contiguous with the buffer protocol). */
static int get_buf(PyObject *o, Py_buffer *b, int writable, const char *what) {
    if (PyObject_GetBuffer(o, b, writable ? (PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) : PyBUF_C_CONTIGUOUS) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous%s buffer (bytes, memoryview, numpy array), got %s",
                     what, writable ? " writable" : "", Py_TYPE(o)->tp_name);
        return -1;
    }
    return 0;
}

static PyObject *py_checksum(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer b;
    if (get_buf(arg, &b, 0, "checksum's argument") != 0) return NULL;
    uint64_t h = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ks_checksum(b.buf, (int64_t)b.len, &h);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    if (rc != 0) return PyErr_NoMemory();
    return PyLong_FromUnsignedLongLong(h);
}

/* The copy both bindings run: refuse overlap, copy (with the checksum when `want`) without the GIL, and
 * return the checksum, or None. */
static PyObject *run_copy(char *dst, const char *src, int64_t n, int want, int stream, const char *who) {
    if (n > 0 && dst < src + n && src < dst + n) {
        PyErr_Format(PyExc_ValueError, "%s: dst and src overlap", who);
        return NULL;
    }
    uint64_t h = 0;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    if (want) rc = ks_copy_checksum(dst, src, n, stream, &h);
    else ks_copy(dst, src, n, stream);
    Py_END_ALLOW_THREADS
    if (rc != 0) return PyErr_NoMemory();
    if (!want) Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(h);
}

/* copy_into(dst, src, with_checksum: bool, stream: bool) -> the checksum of the bytes copied, or None. */
static PyObject *py_copy_into(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "_native.copy_into(dst, src, with_checksum, stream) takes 4 arguments, got %zd",
                     nargs);
        return NULL;
    }
    int want = PyObject_IsTrue(args[2]), stream = PyObject_IsTrue(args[3]);
    if (want < 0 || stream < 0) return NULL;
    Py_buffer d, s;
    if (get_buf(args[0], &d, 1, "dst") != 0) return NULL;
    if (get_buf(args[1], &s, 0, "src") != 0) { PyBuffer_Release(&d); return NULL; }
    if (d.len != s.len) {
        PyErr_Format(PyExc_ValueError, "copy_into: dst has %zd bytes, src %zd", d.len, s.len);
        PyBuffer_Release(&d); PyBuffer_Release(&s);
        return NULL;
    }
    PyObject *out = run_copy(d.buf, s.buf, (int64_t)d.len, want, stream, "copy_into");
    PyBuffer_Release(&d); PyBuffer_Release(&s);
    return out;
}

/* copy_addr(dst, src, n, with_checksum, stream): copy_into for raw addresses (the caller owns the bounds:
 * kvrelay/store/datapath.py checks them against the tensor and the pool first).  Saves the buffer
 * conversions of copy_into (about 10 us a call for torch tensors) on the store's pull path. */
static PyObject *py_copy_addr(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "_native.copy_addr(dst, src, n, with_checksum, stream) takes 5 arguments, "
                     "got %zd", nargs);
        return NULL;
    }
    unsigned long long d = PyLong_AsUnsignedLongLong(args[0]), sp = PyLong_AsUnsignedLongLong(args[1]);
    long long n = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    int want = PyObject_IsTrue(args[3]), stream = PyObject_IsTrue(args[4]);
    if (want < 0 || stream < 0) return NULL;
    if (n < 0 || (n > 0 && (d == 0 || sp == 0))) {
        PyErr_Format(PyExc_ValueError, "copy_addr: bad range (dst %#llx, src %#llx, %lld bytes)", d, sp, n);
        return NULL;
    }
    return run_copy((char *)(uintptr_t)d, (const char *)(uintptr_t)sp, n, want, stream, "copy_addr");
}

static PyMethodDef methods[] = {
    {"copy", (PyCFunction)(void (*)(void))py_copy, METH_FASTCALL,
     "copy(pack, base0, extent0, offset0, base1, extent1, offset1, num_kv, block_stride, token_stride, "
     "head_stride, row_bytes, num_blocks, block_size, cache_heads, ids_ptr, num_ids, token_start, token_end, "
     "cache_h0, num_heads, chunk_ptr, chunk_nbytes, chunk_heads, chunk_h0) -> bytes; ValueError on bad bounds"},
    {"perm_copy", (PyCFunction)(void (*)(void))py_perm_copy, METH_FASTCALL,
     "perm_copy(pack, region, region_nbytes, num_blocks, cache_heads, block_size, head_dim, elem_size, perm_ptr, "
     "ids_ptr, num_ids, token_start, tokens, chunk_ptr, chunk_nbytes, chunk_heads, chunk_h0, cache_h0, num_heads) -> "
     "bytes: pack/unpack "
     "through a position map (csrc/permcopy.h); ValueError on bad bounds"},
    {"checksum", py_checksum, METH_O, "checksum(buf) -> int: the chunk checksum (see csrc/chunksum.h)"},
    {"copy_into", (PyCFunction)(void (*)(void))py_copy_into, METH_FASTCALL,
     "copy_into(dst, src, with_checksum, stream) -> checksum or None: a pooled copy, each leaf hashed before its copy; "
     "stream: non-temporal stores (a destination nobody reads soon)"},
    {"copy_addr", (PyCFunction)(void (*)(void))py_copy_addr, METH_FASTCALL,
     "copy_addr(dst, src, n, with_checksum, stream) -> checksum or None: copy_into for raw addresses"},
    {"set_num_threads", py_set_threads, METH_O, "set the copy pool size (threads including the caller)"},
    {"get_num_threads", py_get_threads, METH_NOARGS, "the copy pool size"},
    {"set_parallel_threshold", py_set_threshold, METH_O, "copies smaller than this many bytes run inline"},
    {"get_parallel_threshold", py_get_threshold, METH_NOARGS, "see set_parallel_threshold"},
    {"set_stream_threshold", py_set_stream_threshold, METH_O,
     "copies of at least this many bytes use non-temporal stores (bypass the cache)"},
    {"get_stream_threshold", py_get_stream_threshold, METH_NOARGS, "see set_stream_threshold"},
    {"get_backoffs", py_get_backoffs, METH_NOARGS,
     "times the pool fell back to caller-only copies for 50 ms because a worker lagged (busy cores)"},
    {"set_backoff_ns", py_set_backoff_ns, METH_O, "back-off length in ns (0: never back off)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_native", .m_doc = "kvrelay native host library", .m_size = -1, .m_methods = methods};
PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
