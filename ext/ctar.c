/*
 * layerfs._ctar: streaming tar parser, the C twin of layerfs/tar/_pyreader.py.
 *
 * The pure-Python module is the reference and its docstring the API spec: both
 * backends must yield byte-identical event streams for the same input and
 * raise layerfs.tar._pyreader.TarError for the same bad input.
 *
 * Every byte parsed here may be hostile.  Rules kept throughout:
 *   - sizes are carried as uint64_t/size_t and every sum or product that could
 *     wrap is checked first; a size that does not fit int64 is refused with
 *     TarError where the size is used (file data, extended header length);
 *   - the 512-byte header is copied out of the input buffer before anything
 *     else is read, because a refill may move or reallocate that buffer;
 *   - every error path drops the references it owns (the parser then stops
 *     like a Python generator that raised: later next() calls give
 *     StopIteration).
 *
 * Being a twin means copying the reference's quirks too: octal fields are read
 * the way int(text, 8) reads them (sign, "0o", underscores, whitespace), and
 * values the twin passes through as unbounded Python ints (a 12-byte base-256
 * or 12-digit octal mtime, PAX mtime/uid/gid past 64 bits) are built as Python
 * ints on a slow path instead of being refused.
 *
 * Differences from the twin, all on input that fails in both: a regular file
 * whose size does not fit int64 is refused before its EV_ENTRY event (the twin
 * yields the entry and fails on the truncated data); PAX decimal numbers with
 * more digits than sys.get_int_max_str_digits() give TarError (the twin leaks a
 * ValueError from int()).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include <openssl/evp.h>

#define BLOCK 512
#define MAX_EXT (1 << 20)   /* extended headers above this are refused */
#define READ_SIZE (1 << 20) /* read(max(READ_SIZE, need)) from the callable */
#define NOGIL_HASH_MIN (16 * 1024)
#define NS_PER_SEC 1000000000LL

#define EV_ENTRY 0
#define EV_DATA 1
#define EV_END 2

/* layerfs.tar._pyreader.TarError, shared with the twin (strong reference). */
static PyObject *TarError = NULL;

#if OPENSSL_VERSION_NUMBER >= 0x30000000L
/* Fetched once: EVP_DigestInit_ex with EVP_sha256() would re-fetch the
 * implementation for every file, which costs more than hashing 1 KiB. */
static EVP_MD *sha256_fetched = NULL;
#endif
static const EVP_MD *sha256_md = NULL;

enum { ST_HEADER, ST_DATA, ST_DONE };

typedef struct {
    PyObject_HEAD
    PyObject *read;          /* the read(n) callable; NULL once cleared by the GC */
    Py_ssize_t chunk_size;   /* > 0 */
    unsigned char *buf;      /* input buffer: bytes [pos, len) are unparsed */
    size_t cap, len, pos;
    uint64_t total_read;     /* bytes read() has returned so far */
    uint64_t final_offset;   /* the offset once finished (the buffer is gone then) */
    int eof;                 /* read() returned a false value */
    int state;               /* ST_* */
    int busy;                /* inside __next__ (guards re-entry and threads) */
    uint64_t file_size;      /* current regular file: size (<= INT64_MAX) */
    uint64_t file_left;      /* ... and data bytes not yet returned */
    EVP_MD_CTX *md;
    PyObject *pax;           /* dict bytes -> bytes, from 'x' headers, next entry only */
    PyObject *long_name;     /* bytes from an 'L' header, or NULL */
    PyObject *long_link;     /* bytes from a 'K' header, or NULL */
    uint64_t ext_pending;    /* bytes of x/L/K headers since the last entry */
} TarParser;

/* A numeric header field as the twin's _number() sees it.  Octal fields always
 * fit; a 12-byte base-256 field may not, then big is set and v is unusable. */
typedef struct {
    int64_t v;
    int big;
    int neg;
} Num;

/* ------------------------------------------------------------------------ */
/* Buffered input                                                           */
/* ------------------------------------------------------------------------ */

static int
buf_append(TarParser *self, const void *data, size_t n)
{
    if (n > self->cap - self->len) {
        size_t want, cap;
        if (n > (size_t)PY_SSIZE_T_MAX - self->len) {
            PyErr_NoMemory();
            return -1;
        }
        want = self->len + n;
        cap = self->cap ? self->cap : 4096;
        while (cap < want) {
            if (cap > (size_t)PY_SSIZE_T_MAX / 2) {
                cap = want;
                break;
            }
            cap *= 2;
        }
        unsigned char *nb = PyMem_Realloc(self->buf, cap);
        if (nb == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->buf = nb;
        self->cap = cap;
    }
    memcpy(self->buf + self->len, data, n);
    self->len += n;
    return 0;
}

/* Make `need` bytes available from pos (the twin's _fill).  Returns 1 when they
 * are, 0 at EOF with fewer, -1 with an exception set. */
static int
fill(TarParser *self, size_t need)
{
    while (self->len - self->pos < need && !self->eof) {
        PyObject *read, *arg, *data;
        Py_buffer view;
        int truth, rc;

        if (self->pos) {
            memmove(self->buf, self->buf + self->pos, self->len - self->pos);
            self->len -= self->pos;
            self->pos = 0;
        }
        if (self->read == NULL) {
            PyErr_SetString(PyExc_ValueError, "TarParser: read callable was cleared");
            return -1;
        }
        arg = PyLong_FromSize_t(need > READ_SIZE ? need : READ_SIZE);
        if (arg == NULL)
            return -1;
        read = self->read;
        Py_INCREF(read);
        data = PyObject_CallOneArg(read, arg);
        Py_DECREF(read);
        Py_DECREF(arg);
        if (data == NULL)
            return -1;
        /* the twin tests `if not data`: any false value is EOF */
        truth = PyObject_IsTrue(data);
        if (truth <= 0) {
            Py_DECREF(data);
            if (truth < 0)
                return -1;
            self->eof = 1;
            continue;
        }
        if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
            Py_DECREF(data);
            return -1;
        }
        rc = buf_append(self, view.buf, (size_t)view.len);
        if (rc == 0)
            self->total_read += (uint64_t)view.len;
        PyBuffer_Release(&view);
        Py_DECREF(data);
        if (rc < 0)
            return -1;
    }
    return self->len - self->pos >= need;
}

/* Consume n > 0 bytes; *out points at them until the next fill(). */
static int
take(TarParser *self, size_t n, const char *what, const unsigned char **out)
{
    int r = fill(self, n);
    if (r < 0)
        return -1;
    if (r == 0) {
        PyErr_Format(TarError, "truncated tar stream in %s", what);
        return -1;
    }
    if (out != NULL)
        *out = self->buf + self->pos;
    self->pos += n;
    return 0;
}

static size_t
padding(uint64_t size)
{
    return (size_t)((BLOCK - size % BLOCK) % BLOCK);
}

/* ------------------------------------------------------------------------ */
/* Numbers                                                                  */
/* ------------------------------------------------------------------------ */

static int
is_pyspace(unsigned char c)
{
    /* Py_ISSPACE: what int() skips around the digits */
    return c == ' ' || (c >= '\t' && c <= '\r');
}

/* int(s[:n], 8) exactly as CPython parses it (whitespace, sign, "0o" prefix,
 * single underscores between digits).  0 on success, -1 when int() would raise
 * ValueError.  Tar fields are at most 12 bytes, so the value always fits. */
static int
py_int_base8(const unsigned char *s, size_t n, int64_t *out)
{
#define CH(k) ((k) < n ? s[k] : 0)
    size_t i = 0, start;
    uint64_t acc = 0;
    unsigned char prev = 0;
    int neg = 0;

    while (i < n && is_pyspace(s[i]))
        i++;
    if (CH(i) == '+') {
        i++;
    }
    else if (CH(i) == '-') {
        neg = 1;
        i++;
    }
    if (CH(i) == '0' && (CH(i + 1) == 'o' || CH(i + 1) == 'O')) {
        i += 2;
        if (CH(i) == '_')
            i++;
    }
    if (CH(i) == '_')
        return -1;
    start = i;
    for (;;) {
        unsigned char c = CH(i);
        if (c >= '0' && c <= '7') {
            if (acc > ((uint64_t)INT64_MAX >> 3))
                return -1; /* unreachable for tar fields; never wrap */
            acc = acc * 8 + (uint64_t)(c - '0');
        }
        else if (c == '_') {
            if (prev == '_')
                return -1;
        }
        else {
            break;
        }
        prev = c;
        i++;
    }
    if (prev == '_' || i == start)
        return -1;
    while (i < n && is_pyspace(s[i]))
        i++;
    if (i != n)
        return -1;
    *out = neg ? -(int64_t)acc : (int64_t)acc;
    return 0;
#undef CH
}

/* The twin's _number(field, what). */
static int
parse_number(const unsigned char *f, size_t n, const char *what, Num *out)
{
    out->v = 0;
    out->big = 0;
    out->neg = 0;
    if (n && (f[0] & 0x80)) {
        /* base-256: big-endian two's complement, 0x80 marks it, 0x40 = negative.
         * Accumulate the magnitude C (value = C or ~C) while it fits int64. */
        int neg = (f[0] & 0x40) != 0;
        uint64_t acc = 0;
        size_t i;
        for (i = 0; i < n; i++) {
            unsigned char b = neg ? (unsigned char)~f[i] : f[i];
            if (i == 0)
                b &= 0x7f;
            if (acc > ((uint64_t)INT64_MAX >> 8)) {
                out->big = 1;
                break;
            }
            acc = (acc << 8) | b;
        }
        out->neg = neg;
        if (!out->big)
            out->v = neg ? -(int64_t)acc - 1 : (int64_t)acc;
        return 0;
    }
    else {
        const unsigned char *nul = memchr(f, 0, n);
        size_t a = 0, b = nul ? (size_t)(nul - f) : n;
        while (a < b && f[a] == ' ')
            a++;
        while (b > a && f[b - 1] == ' ')
            b--;
        if (a == b)
            return 0;
        if (py_int_base8(f + a, b - a, &out->v) < 0) {
            PyObject *field = PyBytes_FromStringAndSize((const char *)f, (Py_ssize_t)n);
            if (field != NULL) {
                PyErr_Format(TarError, "invalid octal number in %s field: %R", what, field);
                Py_DECREF(field);
            }
            return -1;
        }
        out->neg = out->v < 0;
        return 0;
    }
}

/* A base-256 field too large for int64, as a Python int (only for values the
 * twin passes through, e.g. mtime, and for error messages). */
static PyObject *
base256_pylong(const unsigned char *f, size_t n)
{
    unsigned char tmp[16];
    int neg = (f[0] & 0x40) != 0;
    PyObject *c, *r;
    size_t i;

    if (n > sizeof(tmp)) {
        PyErr_SetString(PyExc_SystemError, "base-256 field too long");
        return NULL;
    }
    for (i = 0; i < n; i++)
        tmp[i] = neg ? (unsigned char)~f[i] : f[i];
    tmp[0] &= 0x7f;
    c = PyObject_CallMethod((PyObject *)&PyLong_Type, "from_bytes", "y#s",
                            (const char *)tmp, (Py_ssize_t)n, "big");
    if (c == NULL || !neg)
        return c;
    r = PyNumber_Invert(c); /* ~C == -C - 1 */
    Py_DECREF(c);
    return r;
}

static PyObject *
num_pylong(const Num *num, const unsigned char *f, size_t n)
{
    if (num->big)
        return base256_pylong(f, n);
    return PyLong_FromLongLong(num->v);
}

/* Decimal digits -> uint64; returns 1 on overflow (value then unusable). */
static int
dec_u64(const char *s, size_t n, uint64_t *out)
{
    uint64_t acc = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        unsigned d = (unsigned)(s[i] - '0');
        if (acc > (UINT64_MAX - d) / 10)
            return 1;
        acc = acc * 10 + d;
    }
    *out = acc;
    return 0;
}

static int
all_digits(const char *s, size_t n)
{
    size_t i;
    if (n == 0)
        return 0;
    for (i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return 0;
    return 1;
}

/* seconds * 10**9 + extra (0 <= extra < 10**9), negated if neg, as a Python
 * int; the multiplication falls back to Python ints when int64 is too small. */
static PyObject *
ns_from_pylong_sec(PyObject *sec, int64_t extra, int neg)
{
    PyObject *billion = NULL, *t = NULL, *e = NULL, *r = NULL;
    billion = PyLong_FromLongLong(NS_PER_SEC);
    if (billion == NULL)
        goto done;
    t = PyNumber_Multiply(sec, billion);
    if (t == NULL)
        goto done;
    if (extra) {
        e = PyLong_FromLongLong(extra);
        if (e == NULL)
            goto done;
        r = PyNumber_Add(t, e);
        if (r == NULL)
            goto done;
        Py_SETREF(t, r);
        r = NULL;
    }
    if (neg)
        r = PyNumber_Negative(t);
    else {
        r = t;
        t = NULL;
    }
done:
    Py_XDECREF(billion);
    Py_XDECREF(t);
    Py_XDECREF(e);
    return r;
}

/* mtime field (seconds) -> ns as a Python int. */
static PyObject *
header_mtime_ns(const Num *num, const unsigned char *f, size_t n)
{
    const int64_t lim = INT64_MAX / NS_PER_SEC;
    PyObject *sec, *r;
    if (!num->big && num->v <= lim && num->v >= -lim)
        return PyLong_FromLongLong(num->v * NS_PER_SEC);
    sec = num_pylong(num, f, n);
    if (sec == NULL)
        return NULL;
    r = ns_from_pylong_sec(sec, 0, 0);
    Py_DECREF(sec);
    return r;
}

/* The twin's _pax_time_ns(value). */
static PyObject *
pax_time_ns(PyObject *value)
{
    const char *s = PyBytes_AS_STRING(value);
    size_t n = (size_t)PyBytes_GET_SIZE(value);
    size_t i = 0, wlen, flen = 0;
    const char *whole, *frac = NULL, *dot;
    int neg = n > 0 && s[0] == '-';
    int64_t extra = 0;
    uint64_t w;
    size_t k;

    while (i < n && s[i] == '-') /* str.lstrip("-") */
        i++;
    whole = s + i;
    dot = memchr(whole, '.', n - i);
    if (dot != NULL) {
        wlen = (size_t)(dot - whole);
        frac = dot + 1;
        flen = n - i - wlen - 1;
    }
    else {
        wlen = n - i;
    }
    if (!all_digits(whole, wlen) || (flen && !all_digits(frac, flen)))
        goto invalid;
    for (k = 0; k < 9; k++)
        extra = extra * 10 + (k < flen ? frac[k] - '0' : 0);
    if (!dec_u64(whole, wlen, &w) && w <= (uint64_t)((INT64_MAX - extra) / NS_PER_SEC)) {
        int64_t ns = (int64_t)w * NS_PER_SEC + extra;
        return PyLong_FromLongLong(neg ? -ns : ns);
    }
    else {
        /* beyond int64: Python ints, int() limits included */
        PyObject *sec, *r;
        char *tmp = PyMem_Malloc(wlen + 1);
        if (tmp == NULL)
            return PyErr_NoMemory();
        memcpy(tmp, whole, wlen);
        tmp[wlen] = '\0';
        sec = PyLong_FromString(tmp, NULL, 10);
        PyMem_Free(tmp);
        if (sec == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_ValueError))
                return NULL;
            PyErr_Clear();
            goto invalid;
        }
        r = ns_from_pylong_sec(sec, extra, neg);
        Py_DECREF(sec);
        return r;
    }
invalid:
    PyErr_Format(TarError, "invalid PAX mtime %R", value);
    return NULL;
}

/* The twin's _pax_int(value, key) as a Python int (uid, gid). */
static PyObject *
pax_int(PyObject *value, const char *key)
{
    const char *s = PyBytes_AS_STRING(value);
    size_t n = (size_t)PyBytes_GET_SIZE(value);
    uint64_t v;
    PyObject *r;
    if (!all_digits(s, n))
        goto invalid;
    if (!dec_u64(s, n, &v))
        return PyLong_FromUnsignedLongLong(v);
    r = PyLong_FromString(s, NULL, 10); /* bytes objects are NUL-terminated */
    if (r != NULL || !PyErr_ExceptionMatches(PyExc_ValueError))
        return r;
    PyErr_Clear();
invalid:
    PyErr_Format(TarError, "invalid PAX %s %R", key, value);
    return NULL;
}

/* PAX size -> Num (big when above int64). */
static int
pax_size(PyObject *value, Num *out)
{
    const char *s = PyBytes_AS_STRING(value);
    size_t n = (size_t)PyBytes_GET_SIZE(value);
    uint64_t v = 0;
    if (!all_digits(s, n)) {
        PyErr_Format(TarError, "invalid PAX %s %R", "size", value);
        return -1;
    }
    out->neg = 0;
    out->big = dec_u64(s, n, &v) || v > (uint64_t)INT64_MAX;
    out->v = out->big ? 0 : (int64_t)v;
    if (out->big) {
        /* only refused if used (regular file), but over-long digit strings
         * are refused like int() does for uid/gid */
        PyObject *r = pax_int(value, "size");
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Extended headers                                                         */
/* ------------------------------------------------------------------------ */

/* The twin's _parse_pax(data), records stored straight into target (a later
 * record for the same key keeps the key's first position, like dict.update). */
static int
parse_pax(const unsigned char *d, size_t n, PyObject *target)
{
    size_t pos = 0;
    while (pos < n) {
        const unsigned char *sp, *content, *eq;
        size_t space, i, clen;
        uint64_t length = 0;
        int over = 0;
        PyObject *key, *value;
        int rc;

        if (d[pos] == 0) /* NUL padding after the last record */
            break;
        sp = memchr(d + pos, ' ', n - pos);
        if (sp == NULL || (size_t)(sp - d) == pos)
            goto bad_length;
        space = (size_t)(sp - d);
        for (i = pos; i < space; i++) {
            unsigned dg = (unsigned)(d[i] - '0');
            if (dg > 9)
                goto bad_length;
            if (!over) {
                if (length > (UINT64_MAX - dg) / 10)
                    over = 1;
                else
                    length = length * 10 + dg;
            }
        }
        /* record: "<length> <key>=<value>\n", length counting itself */
        if (over || length <= (uint64_t)(space - pos + 1) || length > (uint64_t)(n - pos)
            || d[pos + (size_t)length - 1] != '\n') {
            PyErr_SetString(TarError, "malformed PAX record");
            return -1;
        }
        content = d + space + 1;
        clen = pos + (size_t)length - 1 - (space + 1);
        eq = memchr(content, '=', clen);
        if (eq == NULL) {
            PyErr_SetString(TarError, "malformed PAX record: no '='");
            return -1;
        }
        key = PyBytes_FromStringAndSize((const char *)content, (Py_ssize_t)(eq - content));
        if (key == NULL)
            return -1;
        value = PyBytes_FromStringAndSize((const char *)eq + 1,
                                          (Py_ssize_t)(content + clen - (eq + 1)));
        if (value == NULL) {
            Py_DECREF(key);
            return -1;
        }
        rc = PyDict_SetItem(target, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (rc < 0)
            return -1;
        pos += (size_t)length;
    }
    return 0;
bad_length:
    PyErr_SetString(TarError, "malformed PAX record length");
    return -1;
}

/* Extended header size check (the twin's _ext_data prologue). */
static int
check_ext_size(const Num *size, const unsigned char *block, const char *what)
{
    PyObject *s;
    if (!size->big && size->v <= MAX_EXT)
        return 0;
    s = num_pylong(size, block + 124, 12);
    if (s != NULL) {
        PyErr_Format(TarError, "%s of %S bytes exceeds the %d-byte limit", what, s, MAX_EXT);
        Py_DECREF(s);
    }
    return -1;
}

/* 'x' / 'g': read the records into target. */
static int
read_pax(TarParser *self, const Num *size, const unsigned char *block, PyObject *target)
{
    const char *what = "PAX header";
    const unsigned char *data = NULL;
    unsigned char *copy = NULL;
    size_t n, pad;
    int rc;

    if (check_ext_size(size, block, what) < 0)
        return -1;
    n = (size_t)size->v;
    pad = padding(n);
    if (n && take(self, n, what, &data) < 0)
        return -1;
    if (pad) {
        if (self->len - self->pos < pad) {
            /* the refill may move the buffer: keep the records first */
            copy = PyMem_Malloc(n ? n : 1);
            if (copy == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            if (n)
                memcpy(copy, data, n);
            data = copy;
        }
        if (take(self, pad, what, NULL) < 0) {
            PyMem_Free(copy);
            return -1;
        }
    }
    rc = n ? parse_pax(data, n, target) : 0;
    PyMem_Free(copy);
    return rc;
}

/* 'L' / 'K': returns the name (up to the first NUL) as bytes. */
static PyObject *
read_long_name(TarParser *self, const Num *size, const unsigned char *block)
{
    const char *what = "GNU long name";
    const unsigned char *data = NULL, *nul;
    PyObject *name;
    size_t n;

    if (check_ext_size(size, block, what) < 0)
        return NULL;
    n = (size_t)size->v;
    if (n && take(self, n, what, &data) < 0)
        return NULL;
    nul = n ? memchr(data, 0, n) : NULL;
    name = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)(nul ? (size_t)(nul - data) : n));
    if (name == NULL)
        return NULL;
    if (padding(n) && take(self, padding(n), what, NULL) < 0) {
        Py_DECREF(name);
        return NULL;
    }
    return name;
}

/* ------------------------------------------------------------------------ */
/* Headers                                                                  */
/* ------------------------------------------------------------------------ */

static PyObject *
cstr(const unsigned char *f, size_t n)
{
    const unsigned char *nul = memchr(f, 0, n);
    return PyBytes_FromStringAndSize((const char *)f, (Py_ssize_t)(nul ? (size_t)(nul - f) : n));
}

/* Sum of the block's bytes (the all-zero test) and how many are above 127. */
static void
block_sums(const unsigned char *b, size_t n, uint32_t *total, uint32_t *high)
{
    uint32_t t = 0, h = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        t += b[i];
        h += b[i] >> 7;
    }
    *total = t;
    *high = h;
}

/* The twin's _check_sum(): the checksum field counts as 8 spaces; the stored
 * value may be the unsigned or the (historic) signed byte sum. */
static int
check_sum(const unsigned char *block, uint32_t total, uint32_t high)
{
    Num stored;
    uint32_t ftotal, fhigh;
    int64_t usum, ssum;
    if (parse_number(block + 148, 8, "checksum", &stored) < 0)
        return -1;
    block_sums(block + 148, 8, &ftotal, &fhigh);
    usum = (int64_t)total - ftotal + 8 * 0x20;
    ssum = usum - 256 * ((int64_t)high - fhigh);
    if (stored.v != usum && stored.v != ssum) {
        PyErr_SetString(TarError, "tar header checksum mismatch (not a tar stream, or corrupt)");
        return -1;
    }
    return 0;
}

static int
key_is(PyObject *key, const char *lit, size_t litlen)
{
    return (size_t)PyBytes_GET_SIZE(key) == litlen && memcmp(PyBytes_AS_STRING(key), lit, litlen) == 0;
}

static int
key_startswith(PyObject *key, const char *lit, size_t litlen)
{
    return (size_t)PyBytes_GET_SIZE(key) >= litlen && memcmp(PyBytes_AS_STRING(key), lit, litlen) == 0;
}

#define KEY_IS(k, s) key_is((k), (s), sizeof(s) - 1)
#define KEY_STARTSWITH(k, s) key_startswith((k), (s), sizeof(s) - 1)

#define XATTR_PREFIX "SCHILY.xattr."

/* The twin's _header(): the 13-tuple for one member.  `fields` (borrowed, may
 * be NULL) is the PAX dict of the member's x header.  On success *file_size is the data size for
 * a regular file, or -1 for other types. */
static PyObject *
build_header(const unsigned char *block, int typ, const Num *block_size, PyObject *fields,
             PyObject *long_name, PyObject *long_link, int64_t *file_size)
{
    PyObject *name = NULL, *linkname = NULL, *uid = NULL, *gid = NULL, *mtime = NULL;
    PyObject *uname = NULL, *gname = NULL, *xattrs = NULL, *header = NULL, *t;
    Num mode, uidn, gidn, mtimen, devmajor, devminor, size = *block_size;
    Py_ssize_t it;
    PyObject *key, *value;
    int sparse;

    if (typ == 0 || typ == '7')
        typ = '0';
    sparse = typ == 'S';
    if (!sparse && fields != NULL) {
        it = 0;
        while (PyDict_Next(fields, &it, &key, &value)) {
            if (KEY_STARTSWITH(key, "GNU.sparse.")) {
                sparse = 1;
                break;
            }
        }
    }
    if (sparse) {
        PyErr_SetString(TarError, "sparse files are not supported");
        return NULL;
    }
    if (typ < '0' || typ > '6') {
        PyObject *c = PyUnicode_FromOrdinal(typ);
        if (c != NULL) {
            PyErr_Format(TarError, "unsupported tar entry type %R", c);
            Py_DECREF(c);
        }
        return NULL;
    }

    /* an empty GNU long name or PAX path counts as none, as in Go's archive/tar */
    if (long_name != NULL && PyBytes_GET_SIZE(long_name) == 0)
        long_name = NULL;
    if (long_link != NULL && PyBytes_GET_SIZE(long_link) == 0)
        long_link = NULL;
    if (long_name != NULL) {
        name = long_name;
        Py_INCREF(name);
    }
    else {
        const unsigned char *nul = memchr(block, 0, 100);
        size_t nlen = nul ? (size_t)(nul - block) : 100, plen = 0;
        if (memcmp(block + 257, "ustar\0", 6) == 0) { /* POSIX ustar: prefix */
            nul = memchr(block + 345, 0, 155);
            plen = nul ? (size_t)(nul - (block + 345)) : 155;
        }
        if (plen) {
            name = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(plen + 1 + nlen));
            if (name == NULL)
                goto error;
            memcpy(PyBytes_AS_STRING(name), block + 345, plen);
            PyBytes_AS_STRING(name)[plen] = '/';
            memcpy(PyBytes_AS_STRING(name) + plen + 1, block, nlen);
        }
        else {
            name = PyBytes_FromStringAndSize((const char *)block, (Py_ssize_t)nlen);
            if (name == NULL)
                goto error;
        }
    }
    if (long_link != NULL) {
        linkname = long_link;
        Py_INCREF(linkname);
    }
    else if ((linkname = cstr(block + 157, 100)) == NULL) {
        goto error;
    }
    /* same order as the twin, so the first bad field is the one reported */
    if (parse_number(block + 100, 8, "mode", &mode) < 0
        || parse_number(block + 108, 8, "uid", &uidn) < 0
        || parse_number(block + 116, 8, "gid", &gidn) < 0
        || parse_number(block + 136, 12, "mtime", &mtimen) < 0
        || parse_number(block + 329, 8, "devmajor", &devmajor) < 0
        || parse_number(block + 337, 8, "devminor", &devminor) < 0)
        goto error;
    if ((uid = PyLong_FromLongLong(uidn.v)) == NULL
        || (gid = PyLong_FromLongLong(gidn.v)) == NULL
        || (uname = cstr(block + 265, 32)) == NULL
        || (gname = cstr(block + 297, 32)) == NULL
        || (xattrs = PyDict_New()) == NULL)
        goto error;

    if (fields != NULL) {
        it = 0;
        while (PyDict_Next(fields, &it, &key, &value)) {
            /* a GNU long name or link wins over the PAX record, as in Go's archive/tar */
            if (KEY_IS(key, "path")) {
                if (long_name == NULL && PyBytes_GET_SIZE(value) > 0) {
                    Py_INCREF(value);
                    Py_SETREF(name, value);
                }
            }
            else if (KEY_IS(key, "linkpath")) {
                if (long_link == NULL && PyBytes_GET_SIZE(value) > 0) {
                    Py_INCREF(value);
                    Py_SETREF(linkname, value);
                }
            }
            else if (KEY_IS(key, "size")) {
                if (pax_size(value, &size) < 0)
                    goto error;
            }
            else if (KEY_IS(key, "uid")) {
                if ((t = pax_int(value, "uid")) == NULL)
                    goto error;
                Py_SETREF(uid, t);
            }
            else if (KEY_IS(key, "gid")) {
                if ((t = pax_int(value, "gid")) == NULL)
                    goto error;
                Py_SETREF(gid, t);
            }
            else if (KEY_IS(key, "uname")) {
                Py_INCREF(value);
                Py_SETREF(uname, value);
            }
            else if (KEY_IS(key, "gname")) {
                Py_INCREF(value);
                Py_SETREF(gname, value);
            }
            else if (KEY_IS(key, "mtime")) {
                if ((t = pax_time_ns(value)) == NULL)
                    goto error;
                Py_XSETREF(mtime, t);
            }
            else if (KEY_STARTSWITH(key, XATTR_PREFIX)) {
                Py_ssize_t plen = (Py_ssize_t)(sizeof(XATTR_PREFIX) - 1);
                PyObject *xname = PyBytes_FromStringAndSize(PyBytes_AS_STRING(key) + plen,
                                                            PyBytes_GET_SIZE(key) - plen);
                int rc;
                if (xname == NULL)
                    goto error;
                rc = PyDict_SetItem(xattrs, xname, value);
                Py_DECREF(xname);
                if (rc < 0)
                    goto error;
            }
        }
    }
    if (mtime == NULL && (mtime = header_mtime_ns(&mtimen, block + 136, 12)) == NULL)
        goto error;

    if (typ == '0') {
        if (size.big) {
            /* the twin would announce the entry, then hit the end of the input */
            PyErr_SetString(TarError, "file size too large in tar header");
            goto error;
        }
        *file_size = size.v; /* >= 0: negative sizes were refused by the caller */
    }
    else {
        *file_size = -1; /* HEADER_ONLY_TYPES: size reported as 0, no data */
    }

    header = PyTuple_New(13);
    if (header == NULL)
        goto error;
    PyTuple_SET_ITEM(header, 0, name);
    PyTuple_SET_ITEM(header, 1, linkname);
    PyTuple_SET_ITEM(header, 4, uid);
    PyTuple_SET_ITEM(header, 5, gid);
    PyTuple_SET_ITEM(header, 7, mtime);
    PyTuple_SET_ITEM(header, 10, uname);
    PyTuple_SET_ITEM(header, 11, gname);
    PyTuple_SET_ITEM(header, 12, xattrs);
    /* the tuple owns them now; its dealloc copes with the NULL slots below */
    if ((t = PyLong_FromLong(typ)) == NULL)
        goto error_tuple;
    PyTuple_SET_ITEM(header, 2, t);
    if ((t = PyLong_FromLongLong((int64_t)((uint64_t)mode.v & 07777))) == NULL)
        goto error_tuple;
    PyTuple_SET_ITEM(header, 3, t);
    if ((t = PyLong_FromLongLong(*file_size < 0 ? 0 : *file_size)) == NULL)
        goto error_tuple;
    PyTuple_SET_ITEM(header, 6, t);
    if ((t = PyLong_FromLongLong(devmajor.v)) == NULL)
        goto error_tuple;
    PyTuple_SET_ITEM(header, 8, t);
    if ((t = PyLong_FromLongLong(devminor.v)) == NULL)
        goto error_tuple;
    PyTuple_SET_ITEM(header, 9, t);
    return header;

error_tuple:
    Py_DECREF(header);
    return NULL;
error:
    Py_XDECREF(name);
    Py_XDECREF(linkname);
    Py_XDECREF(uid);
    Py_XDECREF(gid);
    Py_XDECREF(mtime);
    Py_XDECREF(uname);
    Py_XDECREF(gname);
    Py_XDECREF(xattrs);
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* The event stream                                                         */
/* ------------------------------------------------------------------------ */

static PyObject *
make_event(int kind, PyObject *payload /* stolen */)
{
    PyObject *ev, *k;
    if (payload == NULL)
        return NULL;
    ev = PyTuple_New(2);
    k = PyLong_FromLong(kind);
    if (ev == NULL || k == NULL) {
        Py_XDECREF(ev);
        Py_XDECREF(k);
        Py_DECREF(payload);
        return NULL;
    }
    PyTuple_SET_ITEM(ev, 0, k);
    PyTuple_SET_ITEM(ev, 1, payload);
    return ev;
}

static int
digest_update(TarParser *self, const char *data, size_t n)
{
    int ok;
    if (n >= NOGIL_HASH_MIN) {
        /* `data` belongs to an immutable bytes object we hold, and `busy`
         * keeps other threads out of this parser meanwhile */
        Py_BEGIN_ALLOW_THREADS
        ok = EVP_DigestUpdate(self->md, data, n);
        Py_END_ALLOW_THREADS
    }
    else {
        ok = EVP_DigestUpdate(self->md, data, n);
    }
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL SHA-256 update failed");
        return -1;
    }
    return 0;
}

/* ST_DATA: the next piece of the current regular file, or its EV_END. */
static PyObject *
next_data(TarParser *self)
{
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int dlen = 0;
    size_t pad;

    if (self->file_left) {
        size_t n = self->file_left < (uint64_t)self->chunk_size ? (size_t)self->file_left
                                                                : (size_t)self->chunk_size;
        const unsigned char *p;
        PyObject *piece;
        if (take(self, n, "file data", &p) < 0)
            return NULL;
        piece = PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n);
        if (piece == NULL)
            return NULL;
        self->file_left -= n;
        if (digest_update(self, PyBytes_AS_STRING(piece), n) < 0) {
            Py_DECREF(piece);
            return NULL;
        }
        return make_event(EV_DATA, piece);
    }
    pad = padding(self->file_size);
    if (pad && take(self, pad, "file data", NULL) < 0)
        return NULL;
    if (!EVP_DigestFinal_ex(self->md, digest, &dlen)) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL SHA-256 final failed");
        return NULL;
    }
    self->state = ST_HEADER;
    return make_event(EV_END, PyBytes_FromStringAndSize((const char *)digest, (Py_ssize_t)dlen));
}

/* ST_HEADER: headers up to the next member's EV_ENTRY; NULL without an
 * exception at the end of the archive. */
static PyObject *
next_header(TarParser *self)
{
    unsigned char block[BLOCK];
    for (;;) {
        const unsigned char *p;
        PyObject *fields, *header;
        Num size;
        int typ, r;
        int64_t file_size = -1;
        uint32_t total, high;

        r = fill(self, BLOCK);
        if (r < 0)
            return NULL;
        if (r == 0) {
            if (self->pos != self->len) {
                PyErr_SetString(TarError, "truncated tar stream in header");
                return NULL;
            }
            if (PyDict_GET_SIZE(self->pax) || self->long_name != NULL || self->long_link != NULL) {
                PyErr_SetString(TarError, "truncated tar stream after extended header");
                return NULL;
            }
            return NULL; /* EOF without the zero-block trailer: accepted */
        }
        p = self->buf + self->pos;
        self->pos += BLOCK;
        memcpy(block, p, BLOCK); /* later reads may move the buffer */
        block_sums(block, BLOCK, &total, &high);
        if (total == 0)
            return NULL; /* end-of-archive marker; the rest is padding */
        if (check_sum(block, total, high) < 0)
            return NULL;
        typ = block[156];
        if (parse_number(block + 124, 12, "size", &size) < 0)
            return NULL;
        if (size.neg) {
            PyErr_SetString(TarError, "negative size in tar header");
            return NULL;
        }
        if ((typ == 'x' || typ == 'L' || typ == 'K') && !size.big && size.v <= MAX_EXT) {
            /* each header is capped by check_ext_size; many of them add up */
            if (self->ext_pending + (uint64_t)size.v > MAX_EXT) {
                PyErr_Format(TarError, "extended headers exceed the %d-byte limit in total", MAX_EXT);
                return NULL;
            }
            self->ext_pending += (uint64_t)size.v;
        }
        if (typ == 'x') {
            /* a later x header replaces an earlier one, as in Go's archive/tar */
            PyDict_Clear(self->pax);
            if (read_pax(self, &size, block, self->pax) < 0)
                return NULL;
            continue;
        }
        if (typ == 'g') {
            /* A global header applies to no member, as in Go's archive/tar (docker,
             * containerd): an entry of its own, which they skip, taking the x/L/K
             * headers read before it along.  Its records are read (and checked) into
             * the emptied pax dict, then dropped. */
            PyDict_Clear(self->pax);
            if (read_pax(self, &size, block, self->pax) < 0)
                return NULL;
            PyDict_Clear(self->pax);
            Py_CLEAR(self->long_name);
            Py_CLEAR(self->long_link);
            self->ext_pending = 0;
            continue;
        }
        if (typ == 'L' || typ == 'K') {
            PyObject *name = read_long_name(self, &size, block);
            if (name == NULL)
                return NULL;
            if (typ == 'L')
                Py_XSETREF(self->long_name, name);
            else
                Py_XSETREF(self->long_link, name);
            continue;
        }

        fields = PyDict_GET_SIZE(self->pax) ? self->pax : NULL;
        Py_XINCREF(fields);
        header = build_header(block, typ, &size, fields, self->long_name, self->long_link, &file_size);
        Py_XDECREF(fields);
        if (header == NULL)
            return NULL;
        PyDict_Clear(self->pax);
        Py_CLEAR(self->long_name);
        Py_CLEAR(self->long_link);
        self->ext_pending = 0;
        if (file_size >= 0) {
            if (!EVP_DigestInit_ex(self->md, sha256_md, NULL)) {
                Py_DECREF(header);
                PyErr_SetString(PyExc_RuntimeError, "OpenSSL SHA-256 init failed");
                return NULL;
            }
            self->file_size = (uint64_t)file_size;
            self->file_left = (uint64_t)file_size;
            self->state = ST_DATA;
        }
        return make_event(EV_ENTRY, header);
    }
}

static PyObject *
TarParser_iternext(TarParser *self)
{
    PyObject *ev;
    if (self->state == ST_DONE)
        return NULL;
    if (self->busy) {
        PyErr_SetString(PyExc_ValueError, "TarParser already executing");
        return NULL;
    }
    self->busy = 1;
    ev = self->state == ST_DATA ? next_data(self) : next_header(self);
    self->busy = 0;
    if (ev == NULL) {
        /* end or error: finished for good, like a generator; drop the buffer */
        self->state = ST_DONE;
        self->final_offset = self->total_read - (self->len - self->pos);
        PyMem_Free(self->buf);
        self->buf = NULL;
        self->cap = self->len = self->pos = 0;
        PyDict_Clear(self->pax);
        Py_CLEAR(self->long_name);
        Py_CLEAR(self->long_link);
    }
    return ev;
}

/* ------------------------------------------------------------------------ */
/* Type boilerplate                                                         */
/* ------------------------------------------------------------------------ */

static int
TarParser_traverse(TarParser *self, visitproc visit, void *arg)
{
    Py_VISIT(self->read);
    Py_VISIT(self->pax);
    Py_VISIT(self->long_name);
    Py_VISIT(self->long_link);
    return 0;
}

static int
TarParser_clear(TarParser *self)
{
    /* only `read` can lead back to this object; the rest holds bytes */
    Py_CLEAR(self->read);
    return 0;
}

static void
TarParser_dealloc(TarParser *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->read);
    Py_CLEAR(self->pax);
    Py_CLEAR(self->long_name);
    Py_CLEAR(self->long_link);
    PyMem_Free(self->buf);
    self->buf = NULL;
    if (self->md != NULL)
        EVP_MD_CTX_free(self->md);
    self->md = NULL;
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
TarParser_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"read", "chunk_size", NULL};
    PyObject *read, *chunk_obj = NULL, *idx;
    long long chunk = 65536;
    int overflow = 0;
    TarParser *self;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:TarParser", kwlist, &read, &chunk_obj))
        return NULL;
    if (chunk_obj != NULL) {
        idx = PyNumber_Index(chunk_obj);
        if (idx == NULL)
            return NULL;
        chunk = PyLong_AsLongLongAndOverflow(idx, &overflow);
        Py_DECREF(idx);
        if (chunk == -1 && PyErr_Occurred())
            return NULL;
        if (overflow > 0 || chunk > PY_SSIZE_T_MAX)
            chunk = PY_SSIZE_T_MAX; /* larger than any size: one piece per file */
        else if (overflow < 0)
            chunk = 0;
    }
    if (chunk < 1) {
        PyErr_SetString(PyExc_ValueError, "chunk_size must be positive");
        return NULL;
    }
    self = (TarParser *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(read);
    self->read = read;
    self->chunk_size = (Py_ssize_t)chunk;
    self->state = ST_HEADER;
    self->md = EVP_MD_CTX_new();
    self->pax = PyDict_New();
    if (self->md == NULL || self->pax == NULL) {
        Py_DECREF(self);
        return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    }
    return (PyObject *)self;
}

PyDoc_STRVAR(TarParser_doc,
"TarParser(read, chunk_size=65536)\n"
"--\n"
"\n"
"Iterate over a tar stream read with read(n), yielding (EV_ENTRY, header),\n"
"(EV_DATA, bytes) and (EV_END, sha256_digest) events.  C twin of\n"
"layerfs.tar._pyreader.TarParser; see that module for the full contract.");

static PyObject *
TarParser_offset(TarParser *self, void *closure)
{
    (void)closure;
    if (self->state == ST_DONE)
        return PyLong_FromUnsignedLongLong(self->final_offset);
    return PyLong_FromUnsignedLongLong(self->total_read - (self->len - self->pos));
}

static PyGetSetDef TarParser_getset[] = {
    {"offset", (getter)TarParser_offset, NULL,
     "Bytes of the stream parsed so far: after an EV_ENTRY event, where the member's data starts.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TarParserType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "layerfs._ctar.TarParser",
    .tp_basicsize = sizeof(TarParser),
    .tp_dealloc = (destructor)TarParser_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = TarParser_doc,
    .tp_traverse = (traverseproc)TarParser_traverse,
    .tp_clear = (inquiry)TarParser_clear,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)TarParser_iternext,
    .tp_getset = TarParser_getset,
    .tp_new = TarParser_new,
};

PyDoc_STRVAR(module_doc,
"Streaming tar parser in C: the twin of layerfs.tar._pyreader (same API,\n"
"same events, same TarError).");

static struct PyModuleDef ctar_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "layerfs._ctar",
    .m_doc = module_doc,
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__ctar(void)
{
    PyObject *m, *twin, *err;

    twin = PyImport_ImportModule("layerfs.tar._pyreader");
    if (twin == NULL)
        return NULL;
    err = PyObject_GetAttrString(twin, "TarError");
    Py_DECREF(twin);
    if (err == NULL)
        return NULL;
    Py_XSETREF(TarError, err);

    if (sha256_md == NULL) {
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
        sha256_fetched = EVP_MD_fetch(NULL, "SHA256", NULL);
        sha256_md = sha256_fetched != NULL ? sha256_fetched : EVP_sha256();
#else
        sha256_md = EVP_sha256();
#endif
        if (sha256_md == NULL) {
            PyErr_SetString(PyExc_ImportError, "OpenSSL has no SHA-256");
            return NULL;
        }
    }

    if (PyType_Ready(&TarParserType) < 0)
        return NULL;
    m = PyModule_Create(&ctar_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&TarParserType);
    if (PyModule_AddObject(m, "TarParser", (PyObject *)&TarParserType) < 0) {
        Py_DECREF(&TarParserType);
        goto error;
    }
    Py_INCREF(TarError);
    if (PyModule_AddObject(m, "TarError", TarError) < 0) {
        Py_DECREF(TarError);
        goto error;
    }
    if (PyModule_AddIntConstant(m, "EV_ENTRY", EV_ENTRY) < 0
        || PyModule_AddIntConstant(m, "EV_DATA", EV_DATA) < 0
        || PyModule_AddIntConstant(m, "EV_END", EV_END) < 0
        || PyModule_AddIntConstant(m, "BLOCK", BLOCK) < 0
        || PyModule_AddIntConstant(m, "MAX_EXT", MAX_EXT) < 0
        || PyModule_AddIntConstant(m, "READ_SIZE", READ_SIZE) < 0)
        goto error;
    return m;
error:
    Py_DECREF(m);
    return NULL;
}
