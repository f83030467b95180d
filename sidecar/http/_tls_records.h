/* _tls_records.c's functions, in the wire's C module (_wire.c's table). */
#ifndef PAKE_TLS_RECORDS_H
#define PAKE_TLS_RECORDS_H

#include <Python.h>

PyObject *tls_read(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
PyObject *tls_write(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
PyObject *tls_records(PyObject *module, PyObject *obj);

#endif
