/* The HTTP/1.1 wire in C, where a Python call a header line was the cost: heads read through
 * llhttp with their header lines gathered (Parser), and heads written (head); and the TLS
 * records under them read and written without giving the GIL up (_tls_records.c).
 * Part of the hot path's compiled form (sidecar/compiled.py builds it); sidecar/http/wire.py
 * says which the modules use, and the pure-Python form has neither.
 *
 * Parser: through httptools, every header line of a head is a Python call (httptools'
 * Cython callback, then our ``on_header``): ~1.4k instructions a line, 19k of the 29.5k a
 * realistic request head costs to parse (bench/README.md). Here the lines are gathered in C,
 * as the (name, value) pairs ``on_header`` made, and handed over once, with the request's
 * target or the response's reason gathered as well: ``on_headers_complete(headers, start,
 * codes)`` instead of ``on_header`` a line and ``on_url`` / ``on_status`` a piece (``codes``:
 * which of the parser's Names each line's name is, a byte a line). A start longer than
 * ``max_start`` goes to ``on_url`` / ``on_status`` as soon as it is (it is refused there), and
 * the head then gets None. Every other callback is httptools': the same names, the same
 * arguments, the same return values to llhttp, and the same exceptions (httptools' own
 * classes), so ``RequestParser`` and ``ResponseParser`` read both parsers alike.
 *
 * Which llhttp: our copy of the one httptools carries (llhttp/, llhttp 9.4.3, unchanged;
 * llhttp/README.md), built into this module. httptools' wheels build it without SSE4.2, and
 * with SSE4.2 llhttp scans a header value 16 bytes a step: sidecar/compiled.py builds its
 * parser so (_llhttp_parser.c, that file only) where the CPU has it, and a module built so
 * refuses to load on a CPU without it (the parsers then call httptools per header, and the
 * sidecar warns). The exceptions are httptools' own classes.
 *
 * The block: given ``special`` (a Names), a line whose name is none of them in any case and has
 * no underscore (what the parser's module reads or drops itself, or must look at) is not a
 * pair: it is written, as the writer would write it (``name: value\r\n``, the name lower-cased
 * when ``lower_block``, the value's trailing OWS dropped when ``strip_trailing_ows``), onto one
 * buffer, handed over as one bytes object. Such a line cost a value object, a pair, a look-up
 * and a place in the writer's loop (~400 instructions, callgrind); in the block it is a copy.
 * Lines of a name all go the same way, so the order of a name's lines is kept; the block comes
 * before the pairs when a head is written (see message.py).
 *
 * Bounds: a head's lines (pairs and the block's) are kept up to ``max_headers``; past it they are dropped, so the
 * caller (whose limit is one less) sees more than its limit and refuses the head, and a head
 * of many tiny lines costs no more memory than its limit. Trailers (header lines after a chunked body) are not
 * kept: neither parser forwards them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stddef.h>
#include <stdlib.h>

#include "llhttp/llhttp.h"
#include "_tls_records.h"

#define LLHTTP_VERSION_TEXT_(a, b, c) #a "." #b "." #c
#define LLHTTP_VERSION_TEXT(a, b, c) LLHTTP_VERSION_TEXT_(a, b, c)
#define LLHTTP_VERSION LLHTTP_VERSION_TEXT(LLHTTP_VERSION_MAJOR, LLHTTP_VERSION_MINOR, LLHTTP_VERSION_PATCH)

/* the SIMD llhttp's header values were built for (_llhttp_parser.c): a fact of the build,
 * shown by the module; for SSE4.2 the import checks the CPU first */
#if defined(PAKE_LLHTTP_SSE42) && defined(__GNUC__) && !defined(__clang__) \
    && (defined(__x86_64__) || defined(__i386__))
#define LLHTTP_SSE42 1
#define LLHTTP_SIMD "sse4.2"
#define WIRE_NO_SSE42 "sidecar.http._wire was built for SSE4.2 and this CPU has none: " \
    "rebuild it here (python -m sidecar.compiled build)"
#include <cpuid.h>
#elif defined(__ARM_NEON__) || defined(__ARM_NEON)
#define LLHTTP_SIMD "neon"
#else
#define LLHTTP_SIMD ""
#endif


/* httptools' exception classes, raised as httptools raises them */
static PyObject *HttpParserError, *HttpParserCallbackError, *HttpParserInvalidStatusError,
    *HttpParserInvalidMethodError, *HttpParserInvalidURLError, *HttpParserUpgrade;

/* one bytes object per method llhttp knows, made on first use: get_method() allocates none */
#define METHODS 64
static PyObject *method_names[METHODS];

/* --- names -------------------------------------------------------------------------------- */

/* Header names as a peer commonly spells them, each one bytes object: a line whose name is one
 * of them gets that object, not a new one (an allocation and a free less a line), and its hash,
 * once computed, is kept. Made once by a parser's module and shared by its parsers. A head
 * also says which of them each line's name is (its code: the name's place in the tuple plus
 * one, 0 for any other name), so the parser's module finds what it knows of a name by index
 * instead of looking the name up (~90 instructions a line, callgrind). */
#define NAME_MAX_LENGTH 64
#define NAME_MAX_CODE 255  /* a code is a byte: names past the 255th are given, not coded */

typedef struct {
    PyObject_HEAD
    PyObject *names;                                /* the tuple given */
    PyObject **by_length[NAME_MAX_LENGTH + 1];      /* borrowed from names */
    unsigned char *codes_by_length[NAME_MAX_LENGTH + 1];  /* each one's code */
    Py_ssize_t count[NAME_MAX_LENGTH + 1];
} Names;

static PyObject *
Names_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *names;
    if (!PyArg_ParseTuple(args, "O!:Names", &PyTuple_Type, &names))
        return NULL;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Names(names): no keywords");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(names);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        if (!PyBytes_CheckExact(name) || PyBytes_GET_SIZE(name) < 1
                || PyBytes_GET_SIZE(name) > NAME_MAX_LENGTH) {
            PyErr_Format(PyExc_ValueError, "Names: item %zd must be bytes of 1 to %d, got %R",
                         i, NAME_MAX_LENGTH, name);
            return NULL;
        }
    }
    Names *self = (Names *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->names = Py_NewRef(names);
    for (Py_ssize_t i = 0; i < n; i++)
        self->count[PyBytes_GET_SIZE(PyTuple_GET_ITEM(names, i))]++;
    for (int length = 1; length <= NAME_MAX_LENGTH; length++) {
        if (self->count[length] == 0)
            continue;
        self->by_length[length] = PyMem_Malloc(sizeof(PyObject *) * (size_t)self->count[length]);
        self->codes_by_length[length] = PyMem_Malloc((size_t)self->count[length]);
        if (self->by_length[length] == NULL || self->codes_by_length[length] == NULL) {
            Py_DECREF(self);
            return PyErr_NoMemory();
        }
        self->count[length] = 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        Py_ssize_t length = PyBytes_GET_SIZE(name);
        self->codes_by_length[length][self->count[length]] = i < NAME_MAX_CODE ? (unsigned char)(i + 1) : 0;
        self->by_length[length][self->count[length]++] = name;
    }
    return (PyObject *)self;
}

static void
Names_dealloc(Names *self)
{
    for (int length = 0; length <= NAME_MAX_LENGTH; length++) {
        PyMem_Free(self->by_length[length]);
        PyMem_Free(self->codes_by_length[length]);
    }
    Py_XDECREF(self->names);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* the object for these bytes, a new reference, and its code; NULL (no error) when they are
 * none of them */
static PyObject *
names_find(Names *self, const char *at, size_t length, unsigned char *code)
{
    if (length == 0 || length > NAME_MAX_LENGTH)
        return NULL;
    PyObject **row = self->by_length[length];
    for (Py_ssize_t i = 0, n = self->count[length]; i < n; i++) {
        const char *name = PyBytes_AS_STRING(row[i]);
        if (name[0] == at[0] && memcmp(name, at, length) == 0) {
            *code = self->codes_by_length[length][i];
            return Py_NewRef(row[i]);
        }
    }
    return NULL;
}

/* one of them, in any case (ASCII letters) */
static int
names_has_any_case(Names *self, const char *at, size_t length)
{
    if (length == 0 || length > NAME_MAX_LENGTH)
        return 0;
    PyObject **row = self->by_length[length];
    for (Py_ssize_t i = 0, n = self->count[length]; i < n; i++) {
        const unsigned char *name = (const unsigned char *)PyBytes_AS_STRING(row[i]);
        size_t k = 0;
        for (; k < length; k++) {
            unsigned char a = name[k], b = (unsigned char)at[k];
            if (a != b && (a | 0x20) != (b | 0x20))
                break;
            if (a != b && !((a | 0x20) >= 'a' && (a | 0x20) <= 'z'))
                break;  /* (only letters differ by case) */
        }
        if (k == length)
            return 1;
    }
    return 0;
}

static PyTypeObject NamesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sidecar.http._wire.Names",
    .tp_doc = "Names(names: tuple[bytes, ...]): header names a parser gives as these objects.",
    .tp_basicsize = sizeof(Names),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Names_new,
    .tp_dealloc = (destructor)Names_dealloc,
};

/* --- the parser ---------------------------------------------------------------------------- */

#define INLINE_PAIRS 24  /* a head's pairs kept in the parser before any allocation */

typedef struct {
    PyObject_HEAD
    llhttp_t parser;
    llhttp_settings_t settings;
    /* the protocol's bound methods (NULL: the protocol has none) */
    PyObject *on_message_begin, *on_url, *on_status, *on_headers_complete, *on_body,
        *on_message_complete, *on_chunk_header;
    Names *names;             /* or NULL */
    /* the head's pairs so far, handed over as a list of exactly their number (a list
     * appended to grows by reallocation, ~1k instructions a realistic head) */
    PyObject **pairs;         /* inline, or allocated past INLINE_PAIRS */
    unsigned char *codes;     /* each pair's name's code (Names); as many as pairs' room, or more */
    Py_ssize_t count, room;
    PyObject *name, *value;   /* the line being read, in pieces as they arrived */
    unsigned char name_code;  /* the code of name: 0 unless it is one of names, whole */
    /* the block: the head's plain lines as written (NULL special: none, every line a pair) */
    Names *special;           /* names never in the block, in any case */
    /* by a known name's code (names): 0 not in the block, 1 in it as it is, 2 lower-cased */
    unsigned char plain_codes[NAME_MAX_CODE + 1];
    int lower_block;          /* the block's names lower-cased */
    char *block;              /* PyMem, kept from head to head (freed past BLOCK_KEPT) */
    Py_ssize_t block_len, block_room, block_lines;
    Py_ssize_t value_at;      /* where the block's line being read has its value */
    int in_block;             /* the line being read goes to the block */
    /* the request's target or the response's reason, handed over with the head: past
     * max_start (0: no bound) it goes to on_url / on_status instead, once (which refuses it) */
    PyObject *start;
    Py_ssize_t max_start;
    int start_handed;
    int response;
    PyObject *last_error;     /* what a callback raised, for the error feed_data raises */
    Py_ssize_t max_headers;
    int in_head;
    int strip;                /* drop the values' trailing OWS (requests: RFC 9110 §5.5) */
    /* llhttp_execute is running: a feed from inside it (a callback, or a finalizer that an
     * allocation's garbage collection ran) would change the pairs under it */
    int busy;
    PyObject *inline_pairs[INLINE_PAIRS];
    unsigned char inline_codes[INLINE_PAIRS];
} Parser;

#define PARSER(p) ((Parser *)((char *)(p) - offsetof(Parser, parser)))

/* A callback raised: keep the exception for feed_data, tell llhttp to stop. */
static int
failed(Parser *self, const char *reason)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    Py_XSETREF(self->last_error, value);
    if (reason != NULL) {
        llhttp_set_error_reason(&self->parser, reason);
        return HPE_USER;
    }
    return -1;
}

static int
call0(Parser *self, PyObject *method)
{
    PyObject *result = PyObject_CallNoArgs(method);
    if (result == NULL)
        return failed(self, NULL);
    Py_DECREF(result);
    return 0;
}

static int
call1(Parser *self, PyObject *method, PyObject *arg, const char *reason)
{
    PyObject *result = PyObject_CallOneArg(method, arg);
    if (result == NULL)
        return failed(self, reason);
    Py_DECREF(result);
    return 0;
}

static int
call_data(Parser *self, PyObject *method, const char *at, size_t length, const char *reason)
{
    PyObject *data = PyBytes_FromStringAndSize(at, (Py_ssize_t)length);
    if (data == NULL)
        return failed(self, reason);
    int err = call1(self, method, data, reason);
    Py_DECREF(data);
    return err;
}

/* piece: appended to *slot (a new bytes object, or the one so far made longer) */
static int
add_piece(PyObject **slot, const char *at, size_t length)
{
    if (*slot == NULL) {
        *slot = PyBytes_FromStringAndSize(at, (Py_ssize_t)length);
        return *slot == NULL ? -1 : 0;
    }
    /* a new object, not _PyBytes_Resize: a piece of one byte (or none) is the interpreter's
     * shared object for it */
    Py_ssize_t had = PyBytes_GET_SIZE(*slot);
    PyObject *joined = PyBytes_FromStringAndSize(NULL, had + (Py_ssize_t)length);
    if (joined == NULL)
        return -1;
    memcpy(PyBytes_AS_STRING(joined), PyBytes_AS_STRING(*slot), (size_t)had);
    memcpy(PyBytes_AS_STRING(joined) + had, at, length);
    Py_SETREF(*slot, joined);
    return 0;
}

/* ``items`` (``count`` of them, ``size`` bytes each) in a buffer of ``room``: the same one
 * reallocated, or a new one when they are in the parser's own (``inline_items``, never freed);
 * NULL with MemoryError set */
static void *
grown(void *items, void *inline_items, Py_ssize_t count, size_t size, Py_ssize_t room)
{
    void *out = items == inline_items ? PyMem_Malloc(size * (size_t)room)
                                      : PyMem_Realloc(items, size * (size_t)room);
    if (out == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    if (items == inline_items)
        memcpy(out, inline_items, size * (size_t)count);
    return out;
}

#define BLOCK_KEPT 16384  /* a block's buffer larger than this is freed with its head */

/* the block emptied, its buffer freed when it grew past BLOCK_KEPT (one long head does not
 * keep its memory for the connection's life) */
static void
block_reset(Parser *self)
{
    self->block_len = self->block_lines = 0;
    self->in_block = 0;
    if (self->block_room > BLOCK_KEPT) {
        PyMem_Free(self->block);
        self->block = NULL;
        self->block_room = 0;
    }
}

/* room for ``length`` more bytes at the block's end, where they are to be written (the caller
 * adds them to block_len); NULL with MemoryError set */
static char *
block_room_for(Parser *self, size_t length)
{
    if ((Py_ssize_t)length > self->block_room - self->block_len) {
        if ((Py_ssize_t)length > PY_SSIZE_T_MAX / 2 - self->block_len) {
            PyErr_NoMemory();
            return NULL;
        }
        Py_ssize_t room = self->block_room ? self->block_room : 512;
        while (room - self->block_len < (Py_ssize_t)length)
            room *= 2;
        char *grown_block = PyMem_Realloc(self->block, (size_t)room);
        if (grown_block == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        self->block = grown_block;
        self->block_room = room;
    }
    return self->block + self->block_len;
}

/* bytes onto the block; -1 with MemoryError set */
static int
block_add(Parser *self, const char *at, size_t length)
{
    char *to = block_room_for(self, length);
    if (to == NULL)
        return -1;
    memcpy(to, at, length);
    self->block_len += (Py_ssize_t)length;
    return 0;
}

/* The line whose name was read, at its value's first piece: onto the block (its name and
 * ": " written, name dropped) when it is plain and the head has room for it; 1 if so. */
static int
block_begin(Parser *self)
{
    PyObject *name = self->name;
    if (self->special == NULL || name == NULL || self->count + self->block_lines >= self->max_headers)
        return 0;
    const char *at = PyBytes_AS_STRING(name);
    Py_ssize_t n = PyBytes_GET_SIZE(name);
    int lower = self->lower_block;
    if (self->name_code) {  /* known: decided when the parser was made */
        unsigned char plain = self->plain_codes[self->name_code];
        if (!plain)
            return 0;
        lower = lower && plain == 2;
    } else if (n == 0 || memchr(at, '_', (size_t)n) != NULL
               || names_has_any_case(self->special, at, (size_t)n)) {
        return 0;
    }
    char *to = block_room_for(self, (size_t)n + 2);  /* the name and ": " */
    if (to == NULL)
        return -1;
    if (lower) {
        for (Py_ssize_t i = 0; i < n; i++)
            to[i] = at[i] >= 'A' && at[i] <= 'Z' ? (char)(at[i] + ('a' - 'A')) : at[i];
    } else {
        memcpy(to, at, (size_t)n);
    }
    to[n] = ':';
    to[n + 1] = ' ';
    self->block_len += n + 2;
    self->value_at = self->block_len;
    self->in_block = 1;
    self->name_code = 0;
    Py_CLEAR(self->name);
    return 1;
}

/* The block's line being read ends (as end_line's pair). */
static int
block_end(Parser *self)
{
    self->in_block = 0;
    if (self->strip) {
        while (self->block_len > self->value_at
               && (self->block[self->block_len - 1] == ' ' || self->block[self->block_len - 1] == '\t'))
            self->block_len--;
    }
    char *to = block_room_for(self, 2);
    if (to == NULL)
        return -1;
    to[0] = '\r';
    to[1] = '\n';
    self->block_len += 2;
    self->block_lines++;
    return 0;
}

/* The head's block handed over (b"" when it has none), and the buffer ready for the next. */
static PyObject *
block_take(Parser *self)
{
    PyObject *out = PyBytes_FromStringAndSize(self->block_len ? self->block : "", self->block_len);
    block_reset(self);
    return out;
}

/* The line read so far becomes a pair of the head (as httptools calls on_header: when the
 * next line begins, or the head ends). */
static int
end_line(Parser *self)
{
    if (self->in_block)
        return block_end(self);
    PyObject *name = self->name, *value = self->value;
    unsigned char code = self->name_code;
    if (value == NULL)
        return 0;
    self->name = self->value = NULL;
    self->name_code = 0;
    if (name == NULL)
        name = PyBytes_FromStringAndSize("", 0);
    if (name == NULL || !self->in_head || self->count + self->block_lines >= self->max_headers) {
        Py_XDECREF(name);
        Py_DECREF(value);
        return name == NULL ? -1 : 0;
    }
    if (self->count == self->room) {
        Py_ssize_t room = self->room * 2 < self->max_headers ? self->room * 2 : self->max_headers;
        /* the codes first: grown while the pairs fail to, they are only roomier than needed */
        unsigned char *codes = grown(self->codes, self->inline_codes, self->count, 1, room);
        if (codes != NULL)
            self->codes = codes;
        PyObject **pairs = codes == NULL ? NULL
            : grown(self->pairs, self->inline_pairs, self->count, sizeof(PyObject *), room);
        if (pairs == NULL) {
            Py_DECREF(name);
            Py_DECREF(value);
            return -1;
        }
        self->pairs = pairs;
        self->room = room;
    }
    if (self->strip) {
        Py_ssize_t n = PyBytes_GET_SIZE(value);
        const char *s = PyBytes_AS_STRING(value);
        Py_ssize_t end = n;
        while (end > 0 && (s[end - 1] == ' ' || s[end - 1] == '\t'))
            end--;
        if (end < n) {
            PyObject *stripped = PyBytes_FromStringAndSize(s, end);
            Py_DECREF(value);
            if (stripped == NULL) {
                Py_DECREF(name);
                return -1;
            }
            value = stripped;
        }
    }
    PyObject *pair = PyTuple_New(2);
    if (pair == NULL) {
        Py_DECREF(name);
        Py_DECREF(value);
        return -1;
    }
    PyTuple_SET_ITEM(pair, 0, name);
    PyTuple_SET_ITEM(pair, 1, value);
    self->codes[self->count] = code;
    self->pairs[self->count++] = pair;
    return 0;
}

static void
drop_pairs(Parser *self)
{
    for (Py_ssize_t i = 0; i < self->count; i++)
        Py_DECREF(self->pairs[i]);
    self->count = 0;
}

/* --- llhttp's callbacks ---------------------------------------------------------------- */

static int
cb_message_begin(llhttp_t *p)
{
    Parser *self = PARSER(p);
    Py_CLEAR(self->name);
    Py_CLEAR(self->value);
    self->name_code = 0;
    drop_pairs(self);  /* (of a head a callback refused) */
    block_reset(self);
    Py_CLEAR(self->start);
    self->start_handed = 0;
    self->in_head = 1;
    return self->on_message_begin == NULL ? 0 : call0(self, self->on_message_begin);
}

static int
cb_start(llhttp_t *p, const char *at, size_t length)
{
    Parser *self = PARSER(p);
    const char *reason = self->response ? "`on_status` callback error" : "`on_url` callback error";
    if (self->start_handed)
        return 0;
    if (add_piece(&self->start, at, length) < 0)
        return failed(self, reason);
    if (self->max_start && PyBytes_GET_SIZE(self->start) > self->max_start) {
        self->start_handed = 1;
        PyObject *start = self->start, *method = self->response ? self->on_status : self->on_url;
        self->start = NULL;
        int err = method == NULL ? 0 : call1(self, method, start, reason);
        Py_DECREF(start);
        return err;
    }
    return 0;
}

static int
cb_header_field(llhttp_t *p, const char *at, size_t length)
{
    Parser *self = PARSER(p);
    if (!self->in_head)
        return 0;  /* a trailer */
    if (end_line(self) < 0)
        return failed(self, "`on_header_field` callback error");
    if (self->name == NULL && self->names != NULL
            && (self->name = names_find(self->names, at, length, &self->name_code)) != NULL)
        return 0;
    self->name_code = 0;  /* (a known name's object, made longer, is another name) */
    if (add_piece(&self->name, at, length) < 0)
        return failed(self, "`on_header_field` callback error");
    return 0;
}

static int
cb_header_value(llhttp_t *p, const char *at, size_t length)
{
    Parser *self = PARSER(p);
    if (!self->in_head)
        return 0;
    if (!self->in_block && self->value == NULL) {
        int begun = block_begin(self);
        if (begun < 0)
            return failed(self, "`on_header_value` callback error");
    }
    if (self->in_block ? block_add(self, at, length) < 0 : add_piece(&self->value, at, length) < 0)
        return failed(self, "`on_header_value` callback error");
    return 0;
}

static int
cb_headers_complete(llhttp_t *p)
{
    Parser *self = PARSER(p);
    if (end_line(self) < 0)
        return failed(self, NULL);
    self->in_head = 0;
    /* each made only when the one before was (no call with an error set) */
    PyObject *headers = PyList_New(self->count);
    PyObject *codes = headers == NULL ? NULL
        : PyBytes_FromStringAndSize((const char *)self->codes, self->count);
    PyObject *lines = codes == NULL ? NULL : PyLong_FromSsize_t(self->block_lines);
    PyObject *block = lines == NULL ? NULL : block_take(self);
    if (block == NULL) {
        Py_XDECREF(headers);
        Py_XDECREF(codes);
        Py_XDECREF(lines);
        drop_pairs(self);
        block_reset(self);
        return failed(self, NULL);
    }
    for (Py_ssize_t i = 0; i < self->count; i++)
        PyList_SET_ITEM(headers, i, self->pairs[i]);  /* the list takes the references */
    self->count = 0;
    /* the start, or None when on_url / on_status had it */
    PyObject *start = self->start_handed ? Py_NewRef(Py_None)
        : self->start != NULL ? self->start : PyBytes_FromStringAndSize("", 0);
    self->start = NULL;
    if (start == NULL) {
        Py_DECREF(headers);
        Py_DECREF(codes);
        Py_DECREF(lines);
        Py_DECREF(block);
        return failed(self, NULL);
    }
    PyObject *result = NULL, *call[] = {headers, start, codes, block, lines};
    if (self->on_headers_complete != NULL)
        result = PyObject_Vectorcall(self->on_headers_complete, call, 5, NULL);
    Py_DECREF(headers);
    Py_DECREF(start);
    Py_DECREF(codes);
    Py_DECREF(block);
    Py_DECREF(lines);
    if (self->on_headers_complete != NULL) {
        if (result == NULL)
            return failed(self, NULL);
        Py_DECREF(result);
    }
    return llhttp_get_upgrade(p) ? 1 : 0;
}

static int
cb_body(llhttp_t *p, const char *at, size_t length)
{
    Parser *self = PARSER(p);
    return call_data(self, self->on_body, at, length, "`on_body` callback error");
}

static int
cb_message_complete(llhttp_t *p)
{
    Parser *self = PARSER(p);
    self->in_head = 0;
    return self->on_message_complete == NULL ? 0 : call0(self, self->on_message_complete);
}

static int
cb_chunk_header(llhttp_t *p)
{
    Parser *self = PARSER(p);
    return call0(self, self->on_chunk_header);
}

/* --- the type -------------------------------------------------------------------------- */

static PyObject *
optional_method(PyObject *protocol, const char *name)
{
    PyObject *method = PyObject_GetAttrString(protocol, name);
    if (method == NULL && PyErr_ExceptionMatches(PyExc_AttributeError))
        PyErr_Clear();  /* NULL without an error: the protocol has none */
    return method;
}

static int Parser_clear(Parser *self);

static int
Parser_init(Parser *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"protocol", "response", "max_headers", "strip_trailing_ows", "names",
                               "max_start", "special", "lower_block", NULL};
    PyObject *protocol, *names = Py_None, *special = Py_None;
    int response, strip, lower_block = 0;
    Py_ssize_t max_headers, max_start = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Opnp|OnOp:Parser", keywords, &protocol, &response,
                                     &max_headers, &strip, &names, &max_start, &special, &lower_block))
        return -1;
    if (max_start < 0) {
        PyErr_SetString(PyExc_ValueError, "max_start must be >= 0");
        return -1;
    }
    if (names != Py_None && !PyObject_TypeCheck(names, &NamesType)) {
        PyErr_Format(PyExc_TypeError, "Parser: names must be a Names or None, got %T", names);
        return -1;
    }
    if (special != Py_None && !PyObject_TypeCheck(special, &NamesType)) {
        PyErr_Format(PyExc_TypeError, "Parser: special must be a Names or None, got %T", special);
        return -1;
    }
    if (max_headers < 0) {
        PyErr_SetString(PyExc_ValueError, "max_headers must be >= 0");
        return -1;
    }
    if (self->settings.on_headers_complete != NULL || self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Parser is initialised once");
        return -1;
    }
    Parser_clear(self);  /* what an __init__ that failed half-way took */
    self->max_headers = max_headers;
    self->strip = strip;
    self->names = names == Py_None ? NULL : (Names *)Py_NewRef(names);
    self->special = special == Py_None ? NULL : (Names *)Py_NewRef(special);
    self->lower_block = lower_block;
    memset(self->plain_codes, 0, sizeof(self->plain_codes));
    if (self->special != NULL && self->names != NULL) {
        PyObject *known = self->names->names;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(known) && i < NAME_MAX_CODE; i++) {
            const char *name = PyBytes_AS_STRING(PyTuple_GET_ITEM(known, i));
            size_t length = (size_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(known, i));
            if (memchr(name, '_', length) != NULL || names_has_any_case(self->special, name, length))
                continue;
            int upper = 0;
            for (size_t k = 0; k < length; k++)
                upper |= name[k] >= 'A' && name[k] <= 'Z';
            self->plain_codes[i + 1] = upper ? 2 : 1;
        }
    }
    self->response = response;
    self->max_start = max_start;
    self->pairs = self->inline_pairs;
    self->codes = self->inline_codes;
    self->count = 0;
    self->room = INLINE_PAIRS;
    const char *callbacks[] = {"on_message_begin", "on_url", "on_status", "on_headers_complete",
                           "on_body", "on_message_complete", "on_chunk_header"};
    PyObject **slots[] = {&self->on_message_begin, &self->on_url, &self->on_status,
                          &self->on_headers_complete, &self->on_body, &self->on_message_complete,
                          &self->on_chunk_header};
    for (size_t i = 0; i < sizeof(callbacks) / sizeof(callbacks[0]); i++) {
        if ((*slots[i] = optional_method(protocol, callbacks[i])) == NULL && PyErr_Occurred())
            return -1;
    }
    llhttp_settings_init(&self->settings);
    self->settings.on_message_begin = cb_message_begin;
    self->settings.on_header_field = cb_header_field;
    self->settings.on_header_value = cb_header_value;
    self->settings.on_headers_complete = cb_headers_complete;
    self->settings.on_message_complete = cb_message_complete;
    if (response)
        self->settings.on_status = cb_start;
    else
        self->settings.on_url = cb_start;
    if (self->on_body != NULL)
        self->settings.on_body = cb_body;
    if (self->on_chunk_header != NULL)
        self->settings.on_chunk_header = cb_chunk_header;
    llhttp_init(&self->parser, response ? HTTP_RESPONSE : HTTP_REQUEST, &self->settings);
    return 0;
}

static int
Parser_traverse(Parser *self, visitproc visit, void *arg)
{
    Py_VISIT(self->on_message_begin);
    Py_VISIT(self->on_url);
    Py_VISIT(self->on_status);
    Py_VISIT(self->on_headers_complete);
    Py_VISIT(self->on_body);
    Py_VISIT(self->on_message_complete);
    Py_VISIT(self->on_chunk_header);
    Py_VISIT(self->names);
    Py_VISIT(self->special);
    for (Py_ssize_t i = 0; i < self->count; i++)
        Py_VISIT(self->pairs[i]);
    Py_VISIT(self->last_error);
    return 0;
}

static int
Parser_clear(Parser *self)
{
    /* a cleared parser parses nothing: llhttp would call back into what is gone */
    memset(&self->settings, 0, sizeof(self->settings));
    Py_CLEAR(self->on_message_begin);
    Py_CLEAR(self->on_url);
    Py_CLEAR(self->on_status);
    Py_CLEAR(self->on_headers_complete);
    Py_CLEAR(self->on_body);
    Py_CLEAR(self->on_message_complete);
    Py_CLEAR(self->on_chunk_header);
    Py_CLEAR(self->names);
    Py_CLEAR(self->special);
    drop_pairs(self);
    PyMem_Free(self->block);
    self->block = NULL;
    self->block_len = self->block_room = self->block_lines = 0;
    self->in_block = 0;
    if (self->pairs != NULL && self->pairs != self->inline_pairs) {
        PyMem_Free(self->pairs);
        self->pairs = self->inline_pairs;
        self->room = INLINE_PAIRS;
    }
    if (self->codes != NULL && self->codes != self->inline_codes) {
        PyMem_Free(self->codes);
        self->codes = self->inline_codes;
    }
    Py_CLEAR(self->name);
    Py_CLEAR(self->value);
    Py_CLEAR(self->start);
    Py_CLEAR(self->last_error);
    return 0;
}

static void
Parser_dealloc(Parser *self)
{
    PyObject_GC_UnTrack(self);
    Parser_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
parse_error(Parser *self, llhttp_errno_t err)
{
    PyObject *cls;
    switch (err) {
    case HPE_CB_MESSAGE_BEGIN: case HPE_CB_HEADERS_COMPLETE: case HPE_CB_MESSAGE_COMPLETE:
    case HPE_CB_CHUNK_HEADER: case HPE_CB_CHUNK_COMPLETE: case HPE_USER:
        cls = HttpParserCallbackError;
        break;
    case HPE_INVALID_STATUS:
        cls = HttpParserInvalidStatusError;
        break;
    case HPE_INVALID_METHOD:
        cls = HttpParserInvalidMethodError;
        break;
    case HPE_INVALID_URL:
        cls = HttpParserInvalidURLError;
        break;
    default:
        cls = HttpParserError;
    }
    const char *reason = llhttp_get_error_reason(&self->parser);
    PyObject *text = PyUnicode_DecodeLatin1(reason ? reason : "", reason ? (Py_ssize_t)strlen(reason) : 0,
                                            NULL);
    if (text == NULL)
        return NULL;
    PyObject *exc = PyObject_CallOneArg(cls, text);
    Py_DECREF(text);
    if (exc == NULL)
        return NULL;
    if (cls == HttpParserCallbackError && self->last_error != NULL) {
        PyException_SetContext(exc, self->last_error);  /* steals the reference */
        self->last_error = NULL;
    }
    PyErr_SetObject(cls, exc);
    Py_DECREF(exc);
    return NULL;
}

static PyObject *
Parser_feed_data(Parser *self, PyObject *data)
{
    Py_buffer view;
    const char *buf;
    Py_ssize_t len;
    int owned = 0;
    if (self->settings.on_headers_complete == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Parser.__init__ was not called");
        return NULL;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Parser.feed_data while it parses (from a callback)");
        return NULL;
    }
    if (PyBytes_CheckExact(data)) {
        buf = PyBytes_AS_STRING(data);
        len = PyBytes_GET_SIZE(data);
    } else {
        if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
            return NULL;
        owned = 1;
        buf = view.buf;
        len = view.len;
    }
    self->busy = 1;
    llhttp_errno_t err = llhttp_execute(&self->parser, buf, (size_t)len);
    self->busy = 0;
    if (err == HPE_PAUSED_UPGRADE && llhttp_get_upgrade(&self->parser)) {
        /* as httptools: the offset of the bytes after the head, and the parser freed from
         * its paused state */
        Py_ssize_t at = (Py_ssize_t)(llhttp_get_error_pos(&self->parser) - buf);
        llhttp_resume_after_upgrade(&self->parser);
        if (owned)
            PyBuffer_Release(&view);
        PyObject *offset = PyLong_FromSsize_t(at);
        if (offset != NULL) {
            PyErr_SetObject(HttpParserUpgrade, offset);
            Py_DECREF(offset);
        }
        return NULL;
    }
    if (owned)
        PyBuffer_Release(&view);
    if (err != HPE_OK)
        return parse_error(self, llhttp_get_errno(&self->parser));
    Py_RETURN_NONE;
}

static PyObject *
Parser_should_keep_alive(Parser *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(llhttp_should_keep_alive(&self->parser));
}

static PyObject *
Parser_should_upgrade(Parser *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(llhttp_get_upgrade(&self->parser));
}

static PyObject *
Parser_get_method(Parser *self, PyObject *Py_UNUSED(ignored))
{
    unsigned method = llhttp_get_method(&self->parser);
    if (method < METHODS && method_names[method] != NULL)
        return Py_NewRef(method_names[method]);
    PyObject *name = PyBytes_FromString(llhttp_method_name((llhttp_method_t)method));
    if (name != NULL && method < METHODS)
        method_names[method] = Py_NewRef(name);
    return name;
}

static PyObject *
Parser_get_http_version(Parser *self, PyObject *Py_UNUSED(ignored))
{
    return PyUnicode_FromFormat("%u.%u", (unsigned)llhttp_get_http_major(&self->parser),
                                (unsigned)llhttp_get_http_minor(&self->parser));
}

static PyObject *
Parser_get_status_code(Parser *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(llhttp_get_status_code(&self->parser));
}

static PyObject *
Parser_head_lines(Parser *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(self->in_head ? self->count + self->block_lines : 0);
}

static PyMethodDef Parser_methods[] = {
    {"feed_data", (PyCFunction)Parser_feed_data, METH_O,
     "Parse bytes (or any buffer); raises httptools' errors as httptools does."},
    {"should_keep_alive", (PyCFunction)Parser_should_keep_alive, METH_NOARGS, NULL},
    {"should_upgrade", (PyCFunction)Parser_should_upgrade, METH_NOARGS, NULL},
    {"get_method", (PyCFunction)Parser_get_method, METH_NOARGS, NULL},
    {"get_http_version", (PyCFunction)Parser_get_http_version, METH_NOARGS, NULL},
    {"get_status_code", (PyCFunction)Parser_get_status_code, METH_NOARGS, NULL},
    {"head_lines", (PyCFunction)Parser_head_lines, METH_NOARGS,
     "Lines of the head being read that are whole so far (as many as httptools would have "
     "passed to on_header): 0 while its first line is read."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ParserType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sidecar.http._wire.Parser",
    .tp_doc = "Parser(protocol, response, max_headers, strip_trailing_ows, names=None, max_start=0, "
              "special=None, lower_block=False): httptools' HttpRequestParser or HttpResponseParser, "
              "but a head's header lines and its target (or reason) reach "
              "protocol.on_headers_complete(headers, start, codes, block, block_lines) as one list "
              "of (name, value) pairs, one bytes object, a byte a pair (its name's place in names "
              "plus one, or 0), and the lines of names not in special as written (b'' without "
              "special) with their number.",
    .tp_basicsize = sizeof(Parser),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Parser_init,
    .tp_dealloc = (destructor)Parser_dealloc,
    .tp_traverse = (traverseproc)Parser_traverse,
    .tp_clear = (inquiry)Parser_clear,
    .tp_methods = Parser_methods,
};

/* --- import ---------------------------------------------------------------------------- */

static int
find_errors(void)
{
    PyObject *errors = PyImport_ImportModule("httptools.parser.errors");
    if (errors == NULL)
        return -1;
    struct { PyObject **slot; const char *name; } wanted[] = {
        {&HttpParserError, "HttpParserError"},
        {&HttpParserCallbackError, "HttpParserCallbackError"},
        {&HttpParserInvalidStatusError, "HttpParserInvalidStatusError"},
        {&HttpParserInvalidMethodError, "HttpParserInvalidMethodError"},
        {&HttpParserInvalidURLError, "HttpParserInvalidURLError"},
        {&HttpParserUpgrade, "HttpParserUpgrade"},
    };
    size_t n = sizeof(wanted) / sizeof(wanted[0]);
    for (size_t i = 0; i < n; i++) {
        Py_XSETREF(*wanted[i].slot, PyObject_GetAttrString(errors, wanted[i].name));
        if (*wanted[i].slot == NULL) {
            for (size_t j = 0; j < i; j++)  /* a failed import keeps none of them */
                Py_CLEAR(*wanted[j].slot);
            Py_DECREF(errors);
            return -1;
        }
    }
    Py_DECREF(errors);
    return 0;
}

/* --- heads written ---------------------------------------------------------------------- */

/* head(headers, extra, tail, *parts): parts, then b"name: value\r\n" a pair of headers, then
 * extra's lines, then tail, as one bytes object: sized once and copied once, where the
 * writer's list of pieces grew by reallocation (~180 instructions an append) and was joined. */
static int
add_size(Py_ssize_t *size, Py_ssize_t more)
{
    if (more > PY_SSIZE_T_MAX - *size) {
        PyErr_SetString(PyExc_OverflowError, "head: too long for a bytes object");
        return -1;
    }
    *size += more;
    return 0;
}

static PyObject *
head(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 3 || !PyList_Check(args[0]) || !PyList_Check(args[1]) || !PyBytes_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "head(headers: list[tuple[bytes, bytes]], extra: list[bytes], tail: bytes, *parts: bytes)");
        return NULL;
    }
    PyObject *headers = args[0], *extra = args[1];
    Py_ssize_t size = PyBytes_GET_SIZE(args[2]);
    for (Py_ssize_t i = 3; i < nargs; i++) {
        if (!PyBytes_Check(args[i])) {
            PyErr_Format(PyExc_TypeError, "head: part %zd is not bytes: %R", i - 3, args[i]);
            return NULL;
        }
        if (add_size(&size, PyBytes_GET_SIZE(args[i])) < 0)
            return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(headers);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PyList_GET_ITEM(headers, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2
                || !PyBytes_Check(PyTuple_GET_ITEM(pair, 0)) || !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))) {
            PyErr_Format(PyExc_TypeError, "head: header %zd is not a (bytes, bytes) pair: %R", i, pair);
            return NULL;
        }
        if (add_size(&size, PyBytes_GET_SIZE(PyTuple_GET_ITEM(pair, 0))) < 0
                || add_size(&size, PyBytes_GET_SIZE(PyTuple_GET_ITEM(pair, 1))) < 0
                || add_size(&size, 4) < 0)
            return NULL;
    }
    Py_ssize_t m = PyList_GET_SIZE(extra);
    for (Py_ssize_t i = 0; i < m; i++) {
        PyObject *line = PyList_GET_ITEM(extra, i);
        if (!PyBytes_Check(line)) {
            PyErr_Format(PyExc_TypeError, "head: extra line %zd is not bytes: %R", i, line);
            return NULL;
        }
        if (add_size(&size, PyBytes_GET_SIZE(line)) < 0)
            return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL)
        return NULL;
    char *at = PyBytes_AS_STRING(out);
#define COPY(obj) do { \
        memcpy(at, PyBytes_AS_STRING(obj), (size_t)PyBytes_GET_SIZE(obj)); \
        at += PyBytes_GET_SIZE(obj); \
    } while (0)
    for (Py_ssize_t i = 3; i < nargs; i++)
        COPY(args[i]);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PyList_GET_ITEM(headers, i);
        COPY(PyTuple_GET_ITEM(pair, 0));
        *at++ = ':';
        *at++ = ' ';
        COPY(PyTuple_GET_ITEM(pair, 1));
        *at++ = '\r';
        *at++ = '\n';
    }
    for (Py_ssize_t i = 0; i < m; i++)
        COPY(PyList_GET_ITEM(extra, i));
    COPY(args[2]);
#undef COPY
    return out;
}

/* --- visible ASCII --------------------------------------------------------------------------- */

/* visible(value): every byte a visible ASCII character (0x21-0x7E): a request id worth keeping
 * (headers.is_valid_request_id). A UUID went through a compiled loop by index: ~1k instructions. */
static PyObject *
visible(PyObject *Py_UNUSED(module), PyObject *value)
{
    if (!PyBytes_Check(value)) {
        PyErr_Format(PyExc_TypeError, "visible: bytes, not %T", value);
        return NULL;
    }
    const unsigned char *at = (const unsigned char *)PyBytes_AS_STRING(value);
    for (Py_ssize_t i = 0, n = PyBytes_GET_SIZE(value); i < n; i++) {
        if ((unsigned char)(at[i] - 0x21) > 0x7E - 0x21)
            Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

/* --- where heads end --------------------------------------------------------------------- */

static PyObject *
head_ends(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "head_ends(buf: bytes, at: int, end: int, heads: int)");
        return NULL;
    }
    Py_ssize_t at = PyLong_AsSsize_t(args[1]), end = PyLong_AsSsize_t(args[2]);
    Py_ssize_t heads = PyLong_AsSsize_t(args[3]);
    if ((at == -1 || end == -1 || heads == -1) && PyErr_Occurred())
        return NULL;
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    if (at < 0 || end > size || at > end || heads < 1) {
        PyErr_Format(PyExc_ValueError, "head_ends: at %zd, end %zd of %zd bytes, %zd heads",
                     at, end, size, heads);
        return NULL;
    }
    const char *buf = PyBytes_AS_STRING(args[0]);
    const char *p = buf + at, *stop = buf + end;
    /* as the Python scan: fewer than two newlines a head means fewer heads (each ends with a
     * "\n\r\n" of its own), and the answer is the end; counted no further than needed */
    Py_ssize_t newlines = 0;
    for (const char *q = p; newlines < 2 * heads && q < stop
            && (q = memchr(q, '\n', (size_t)(stop - q))) != NULL; q++)
        newlines++;
    if (newlines < 2 * heads)
        return PyLong_FromSsize_t(end);
    while (p < stop && (p = memchr(p, '\n', (size_t)(stop - p))) != NULL) {
        if (stop - p >= 3 && p[1] == '\r' && p[2] == '\n' && --heads == 0)
            return PyLong_FromSsize_t(p + 3 - buf);
        p++;
    }
    return PyLong_FromSsize_t(end);
}

static PyMethodDef module_functions[] = {
    {"visible", visible, METH_O,
     "visible(value): every byte of value is visible ASCII (0x21-0x7E); True for b''."},
    {"head_ends", (PyCFunction)(void (*)(void))head_ends, METH_FASTCALL,
     "head_ends(buf, at, end, heads): where in buf[:end] the heads-th \"\\n\\r\\n\" from at "
     "ends, or end when fewer are there (RequestParser.head_room's scan)."},
    {"head", (PyCFunction)(void (*)(void))head, METH_FASTCALL,
     "head(headers, extra, tail, *parts): parts, a b'name: value\\r\\n' line a (name, value) "
     "pair of headers, extra's lines, tail: one bytes object (writer's heads)."},
    {"tls_read", (PyCFunction)(void (*)(void))tls_read, METH_FASTCALL,
     "tls_read(sslobj, n): sslobj.read(n) (an _ssl._SSLSocket over memory BIOs), OpenSSL "
     "called with the GIL held (_tls_records.c)."},
    {"tls_write", (PyCFunction)(void (*)(void))tls_write, METH_FASTCALL,
     "tls_write(sslobj, data): sslobj.write(data), OpenSSL called with the GIL held."},
    {"tls_records", tls_records, METH_O,
     "tls_records(sslobj): '' when tls_read and tls_write call OpenSSL themselves for it, "
     "else why they call its methods."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "sidecar.http._wire",
    .m_doc = "The HTTP/1.1 wire in C: heads read through llhttp with their header "
             "lines gathered, and heads written.",
    .m_size = -1,
    .m_methods = module_functions,
};

PyMODINIT_FUNC
PyInit__wire(void)
{
#ifdef LLHTTP_SSE42
    /* built where the CPU has SSE4.2, loaded where it may not (a copied install): refuse here,
     * not with SIGILL at the first header value. cpuid.h's inline function: no libgcc. */
    unsigned int eax, ebx, ecx, edx;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_SSE4_2) || !(ecx & bit_POPCNT)) {
        PyErr_SetString(PyExc_ImportError, WIRE_NO_SSE42);
        return NULL;
    }
#endif
    if (find_errors() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddStringConstant(m, "LLHTTP_VERSION", LLHTTP_VERSION) < 0
            || PyModule_AddStringConstant(m, "LLHTTP_SIMD", LLHTTP_SIMD) < 0
            || PyType_Ready(&NamesType) < 0
            || PyModule_AddObjectRef(m, "Names", (PyObject *)&NamesType) < 0
            || PyType_Ready(&ParserType) < 0
            || PyModule_AddObjectRef(m, "Parser", (PyObject *)&ParserType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
