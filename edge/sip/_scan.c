/* edge.sip._scan: the two byte scans of the SIP fast path (edge/sip/fastpath.py) in C.
 *
 * Optional: without it fastpath.py runs the same scans with `re` and bytes methods, which cost
 * about 20 instructions per byte of head (valgrind) against a few here. Both are held to the
 * same results by tests/sip/test_sip_fastpath.py (hypothesis, random bytes).
 *
 *   split_head(head: bytes) -> tuple[list[bytes], bytes] | None
 *       head.split(b"\r\n") and the layout: for every line after the first, the bytes before
 *       its first ':' (the header name as written), joined by ':'; None if the head is not
 *       ASCII or a header line has no ':' (or CR/LF before it).
 *   match_via(value: bytes) -> tuple[bytes, bytes, bytes] | None
 *       fastpath._VIA_RE.match(value).groups(): transport, host[:port], parameter text.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static unsigned char token_chars[256];
static unsigned char pvalue_chars[256];
static unsigned char host_chars[256];

static void init_tables(void) {
    const char *token = "-.!%*_+`'~";
    for (int c = 0; c < 256; c++) {
        int alnum = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
        token_chars[c] = alnum || (c && strchr(token, c) != NULL);
        pvalue_chars[c] = token_chars[c] || (c && strchr("[]/:&$", c) != NULL);
        host_chars[c] = alnum || c == '-' || c == '.' || c == ':';
    }
}

static int is_ascii(const unsigned char *p, Py_ssize_t n) {
    Py_ssize_t i = 0;
    uint64_t acc = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        acc |= w;
    }
    for (; i < n; i++)
        acc |= p[i];
    return (acc & 0x8080808080808080ULL) == 0;
}

static PyObject *split_head(PyObject *self, PyObject *arg) {
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "split_head() wants bytes");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    if (!is_ascii(p, n))
        Py_RETURN_NONE;
    PyObject *lines = PyList_New(0);
    PyObject *out = NULL;
    /* the layout key: every header name as written, joined by ':' (no name holds one) */
    char small[512];
    char *key = small;
    Py_ssize_t key_len = 0, key_cap = (Py_ssize_t)sizeof(small), nnames = 0;
    if (lines == NULL)
        return NULL;
    Py_ssize_t start = 0;
    for (;;) {
        /* the next CRLF: a LF right after a CR (memchr is the word-at-a-time search) */
        Py_ssize_t end = n, from = start;
        while (from < n) {
            const unsigned char *lf = memchr(p + from, '\n', (size_t)(n - from));
            if (lf == NULL)
                break;
            Py_ssize_t j = lf - p;
            if (j > start && p[j - 1] == '\r') {
                end = j - 1;
                break;
            }
            from = j + 1;
        }
        PyObject *line = PyBytes_FromStringAndSize((const char *)p + start, end - start);
        if (line == NULL || PyList_Append(lines, line) < 0) {
            Py_XDECREF(line);
            goto done;
        }
        Py_DECREF(line);
        if (start > 0) { /* a header line: its name is what precedes the first ':' */
            Py_ssize_t c = start;
            while (c < end && p[c] != ':' && p[c] != '\r' && p[c] != '\n')
                c++;
            if (c == end || p[c] != ':') {
                out = Py_None;
                Py_INCREF(out);
                goto done;
            }
            /* a ':' between every two names, even empty ones, as b":".join(names) */
            Py_ssize_t len = c - start + (nnames ? 1 : 0);
            if (key_len + len > key_cap) {
                Py_ssize_t cap = 2 * (key_len + len);
                char *grown = PyMem_Malloc((size_t)cap);
                if (grown == NULL) {
                    PyErr_NoMemory();
                    goto done;
                }
                memcpy(grown, key, (size_t)key_len);
                if (key != small)
                    PyMem_Free(key);
                key = grown;
                key_cap = cap;
            }
            if (nnames++)
                key[key_len++] = ':';
            memcpy(key + key_len, p + start, (size_t)(c - start));
            key_len += c - start;
        }
        if (end == n)
            break;
        start = end + 2;
    }
    out = Py_BuildValue("(Oy#)", lines, key, key_len);
done:
    if (key != small)
        PyMem_Free(key);
    Py_DECREF(lines);
    return out;
}

static PyObject *match_via(PyObject *self, PyObject *arg) {
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "match_via() wants bytes");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    if (n < 8 || memcmp(p, "SIP/2.0/", 8) != 0)
        Py_RETURN_NONE;
    Py_ssize_t i = 8, t0 = 8;
    while (i < n && ((p[i] >= 'A' && p[i] <= 'Z') || (p[i] >= 'a' && p[i] <= 'z')))
        i++;
    Py_ssize_t t1 = i;
    if (t1 == t0 || i >= n || p[i] != ' ')
        Py_RETURN_NONE;
    Py_ssize_t h0 = ++i;
    while (i < n && host_chars[p[i]])
        i++;
    Py_ssize_t h1 = i;
    if (h1 == h0)
        Py_RETURN_NONE;
    Py_ssize_t p0 = i;
    while (i < n) { /* (;token(=pvalue)?)* up to the end */
        if (p[i] != ';')
            Py_RETURN_NONE;
        Py_ssize_t k = ++i;
        while (i < n && token_chars[p[i]])
            i++;
        if (i == k)
            Py_RETURN_NONE;
        if (i < n && p[i] == '=') {
            k = ++i;
            while (i < n && pvalue_chars[p[i]])
                i++;
            if (i == k)
                Py_RETURN_NONE;
        }
    }
    return Py_BuildValue("(y#y#y#)", p + t0, t1 - t0, p + h0, h1 - h0, p + p0, n - p0);
}

static PyMethodDef methods[] = {
    {"split_head", split_head, METH_O, "Split a SIP head into lines and header names (or None)."},
    {"match_via", match_via, METH_O, "(transport, hostport, params) of a plain Via value, or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "edge.sip._scan", "Byte scans of the SIP fast path.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__scan(void) {
    init_tables();
    return PyModule_Create(&module);
}
