/* TLS records read and written without the GIL's round trip: ``tls_read`` and ``tls_write``,
 * functions of the wire's C module (_wire.c), used by upstream/tls_protocol.py.
 *
 * ``ssl.SSLObject``'s C object (``_ssl._SSLSocket``) gives the GIL up around every
 * ``SSL_read_ex`` and ``SSL_write_ex``, as a socket's read must. Over memory BIOs nothing
 * blocks: the GIL went and came back for nothing, two round trips an exchange on each side of
 * a TLS hop, with the call's wrapper ~1.7k instructions of an exchange's 53k (callgrind, the
 * tiny mTLS pair's inbound side). Here the same OpenSSL calls are made with the GIL held.
 *
 * What ``_ssl`` does and this does not: it writes the call's error into its object (read
 * again only by its own next failing call, which writes it first), checks the signals after
 * each call (the event loop does), and raises after a read or write that worked an exception
 * a callback stored on the object: only a message callback (``SSLContext._msg_callback``, a
 * debugging hook) stores one after the handshake, and tls_protocol calls the methods for a
 * context that has one. What it does alike: a read asks for ``n`` bytes and cuts them to
 * what came (``_PyBytes_Resize``); a close_notify read is ``b""``. Only objects over memory
 * BIOs (``wrap_bio``'s): a socket's may block, and is left to its methods.
 *
 * Anything but a read or a write that worked, or a close_notify, is left to ``_ssl``: the
 * call is made again through the object's own method, which raises what it always raised.
 * Again is the same answer: a record that is not whole yet is still not whole (want read),
 * a close seen is still seen, and after a fatal error OpenSSL's state machine answers -1
 * without a new error, so ``_ssl`` reads the first one from the error queue, which nothing
 * here clears.
 *
 * The ``SSL *``: CPython's ``PySSLSocket`` holds it right after the object header and the
 * socket's weak reference, the context after it (3.8 to 3.13 alike), and ``_ssl`` makes the
 * object the SSL's app data (``SSL_set_app_data``). OpenSSL's functions come from the libssl
 * ``_ssl`` itself is linked to (``dlsym`` through its handle, as certs/chain_building.py
 * does). The first call checks the layout on a live object: its context where the layout
 * says, and the object as its SSL's app data. Every call checks the type, and the app data
 * before using the SSL. Where anything does not hold (another interpreter, an ``_ssl`` with
 * OpenSSL built in), every call is the object's own method, and ``tls_records()`` says why.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stddef.h>

#include "_tls_records.h"

typedef struct ssl_st SSL;

/* openssl/ssl.h */
#define TLS_ERROR_ZERO_RETURN 6
#define TLS_RECEIVED_SHUTDOWN 2

static int (*ssl_read_ex)(SSL *, void *, size_t, size_t *);
static int (*ssl_write_ex)(SSL *, const void *, size_t, size_t *);
static int (*ssl_get_error)(const SSL *, int);
static int (*ssl_get_shutdown)(const SSL *);
static void *(*ssl_get_ex_data)(const SSL *, int);

/* the start of CPython's PySSLSocket (Modules/_ssl.c) */
typedef struct {
    PyObject_HEAD
    PyObject *socket;
    SSL *ssl;
    PyObject *ctx;
} SslSocketHead;

static enum { UNCHECKED, USABLE, REFUSED } state = UNCHECKED;
static PyTypeObject *socket_type;  /* _ssl._SSLSocket, checked */
static char refused[200];

static void
refuse(const char *why)
{
    state = REFUSED;
    PyOS_snprintf(refused, sizeof(refused), "%s", why);
}

/* Resolve OpenSSL's functions and check the layout on ``obj``, an _SSLSocket: the state is
 * then USABLE or REFUSED for good (another object leaves it UNCHECKED). Returns -1 only for
 * a Python error (which the caller raises). */
static int
check(PyObject *obj)
{
    PyObject *ssl_module = PyImport_ImportModule("_ssl");
    if (ssl_module == NULL)
        return -1;
    PyObject *type = PyObject_GetAttrString(ssl_module, "_SSLSocket");
    PyObject *file = PyObject_GetAttrString(ssl_module, "__file__");
    Py_DECREF(ssl_module);
    if (type == NULL || file == NULL) {
        Py_XDECREF(type);
        Py_XDECREF(file);
        PyErr_Clear();
        refuse("_ssl has no _SSLSocket or no file");
        return 0;
    }
    const char *path = PyUnicode_Check(file) ? PyUnicode_AsUTF8(file) : NULL;
    void *handle = path != NULL ? dlopen(path, RTLD_NOW | RTLD_NOLOAD) : NULL;
    PyErr_Clear();
    Py_DECREF(file);
    if (handle != NULL) {
        *(void **)&ssl_read_ex = dlsym(handle, "SSL_read_ex");
        *(void **)&ssl_write_ex = dlsym(handle, "SSL_write_ex");
        *(void **)&ssl_get_error = dlsym(handle, "SSL_get_error");
        *(void **)&ssl_get_shutdown = dlsym(handle, "SSL_get_shutdown");
        *(void **)&ssl_get_ex_data = dlsym(handle, "SSL_get_ex_data");
        dlclose(handle);  /* (NOLOAD: the module stays loaded, as it was) */
    }
    if (!PyType_Check(type)) {
        Py_DECREF(type);
        refuse("_ssl's _SSLSocket is not a type");
        return 0;
    }
    if (Py_TYPE(obj) != (PyTypeObject *)type) {  /* not one to check the layout on: undecided */
        Py_DECREF(type);
        return 0;
    }
    if (ssl_read_ex == NULL || ssl_write_ex == NULL || ssl_get_error == NULL
            || ssl_get_shutdown == NULL || ssl_get_ex_data == NULL) {
        Py_DECREF(type);
        refuse("OpenSSL's functions are not reachable through _ssl");
        return 0;
    }
    if (((PyTypeObject *)type)->tp_basicsize < (Py_ssize_t)sizeof(SslSocketHead)) {
        Py_DECREF(type);
        refuse("_ssl's _SSLSocket is smaller than the layout read");
        return 0;
    }
    PyObject *context = PyObject_GetAttrString(obj, "context");
    if (context == NULL) {
        Py_DECREF(type);
        PyErr_Clear();
        refuse("the object has no context");
        return 0;
    }
    SslSocketHead *head = (SslSocketHead *)obj;
    int same = head->ctx == context;
    Py_DECREF(context);
    /* the context in its place says the SSL is in its own; then its app data is the object
     * (a socket's object is laid out alike: ``usable`` leaves it to its methods) */
    if (!same || head->ssl == NULL || ssl_get_ex_data(head->ssl, 0) != (void *)obj) {
        Py_DECREF(type);
        refuse("_ssl's _SSLSocket is not laid out as read (the context, the SSL's app data)");
        return 0;
    }
    socket_type = (PyTypeObject *)type;  /* (kept: a module's type, alive as long as _ssl) */
    state = USABLE;
    return 0;
}

/* the object's SSL when this module may use it, else NULL (and *error set with a Python
 * error). Only over memory BIOs: a socket's object (``ssl.SSLSocket``'s) has its SSL read the
 * socket, which may block, and ``_ssl`` then waits for it with the GIL given up. */
static SSL *
usable(PyObject *obj, int *error)
{
    *error = 0;
    if (state == UNCHECKED && check(obj) < 0) {
        *error = 1;
        return NULL;
    }
    if (state != USABLE || Py_TYPE(obj) != socket_type)
        return NULL;
    SslSocketHead *head = (SslSocketHead *)obj;
    if (head->socket != NULL)
        return NULL;
    SSL *ssl = head->ssl;
    return ssl != NULL && ssl_get_ex_data(ssl, 0) == (void *)obj ? ssl : NULL;
}

PyObject *
tls_read(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "tls_read(sslobj, n: int)");
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    int error = 0;
    SSL *ssl = n > 0 ? usable(args[0], &error) : NULL;
    if (ssl == NULL)
        return error ? NULL : PyObject_CallMethod(args[0], "read", "n", n);
    PyObject *data = PyBytes_FromStringAndSize(NULL, n);
    if (data == NULL)
        return NULL;
    size_t count = 0;
    int done = ssl_read_ex(ssl, PyBytes_AS_STRING(data), (size_t)n, &count);
    if (!done) {
        Py_DECREF(data);
        if (ssl_get_error(ssl, done) == TLS_ERROR_ZERO_RETURN
                && ssl_get_shutdown(ssl) == TLS_RECEIVED_SHUTDOWN)
            return PyBytes_FromStringAndSize(NULL, 0);  /* the peer's close_notify, as _ssl */
        return PyObject_CallMethod(args[0], "read", "n", n);
    }
    if ((Py_ssize_t)count != n && _PyBytes_Resize(&data, (Py_ssize_t)count) < 0)
        return NULL;
    return data;
}

PyObject *
tls_write(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "tls_write(sslobj, data)");
        return NULL;
    }
    int error;
    SSL *ssl = usable(args[0], &error);
    if (ssl == NULL)
        return error ? NULL : PyObject_CallMethod(args[0], "write", "O", args[1]);
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    size_t count = 0;
    /* (no partial write: _ssl does not ask for them, and a memory BIO takes every byte;
     * nothing to write is left to _ssl, as OpenSSL's answer to it) */
    int done = view.len > 0 && ssl_write_ex(ssl, view.buf, (size_t)view.len, &count);
    PyBuffer_Release(&view);
    if (!done)
        return PyObject_CallMethod(args[0], "write", "O", args[1]);
    return PyLong_FromSize_t(count);
}

PyObject *
tls_records(PyObject *Py_UNUSED(module), PyObject *obj)
{
    int error;
    SSL *ssl = usable(obj, &error);
    if (error)
        return NULL;
    return PyUnicode_FromString(ssl != NULL ? "" : state == REFUSED ? refused
                                : "not an _ssl._SSLSocket over memory BIOs: its methods are called");
}
