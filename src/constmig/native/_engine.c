/* The native data plane, step 1 (issue 34; docs/native.md): CHUNK records sealed and opened without the
 * interpreter, and streams of them sent and received on a socket with the GIL released.
 *
 * The record format, nonces and associated data are exactly wire/records.py's, aead.py's and
 * channel.py's, so a record sealed here opens in Python and the other way round:
 *   header  = "CMG1" | kind u8 | flags u8 | reserved u16 (0) | length u32 | seq u64 | arg u64 (big-endian)
 *   nonce   = direction u32 || seq u64 (big-endian)
 *   aad     = header (28 bytes) || migration id (16 bytes)
 *   payload = AES-256-GCM(chunk) || tag (16), or for FLAG_ZERO AES-256-GCM(u32 length) || tag.
 *
 * The crypto is OpenSSL's EVP AES-256-GCM and nothing else. Like aead.py, callers never choose a nonce:
 * a Sealer or Opener numbers its records itself from the seq it was started at, an Opener takes only
 * the next seq, and any failure (a bad tag, a wrong seq, a malformed header, a short read) poisons it
 * for good. An Opener decrypts into its own scratch buffer and copies into the caller's memory only
 * after the tag checked, so nothing unverified ever reaches a heap the app can see.
 *
 * Not thread-safe by design, but safe: an object in use by one thread (GIL released) refuses a second.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HEADER_SIZE 28
#define TAG_SIZE 16
#define KEY_SIZE 32
#define MID_SIZE 16
#define AAD_SIZE (HEADER_SIZE + MID_SIZE)
#define ZERO_PAYLOAD 4
#define MAX_CHUNK (4u << 20)
#define CHUNK_MARGIN 256
#define MAX_HANDSHAKE_PAYLOAD (1u << 20)
#define MAX_CONTROL_PAYLOAD (1u << 20)
#define KIND_HANDSHAKE 1
#define KIND_CONTROL 2
#define KIND_CHUNK 3
#define FLAG_DEMAND 0x01
#define FLAG_ZERO 0x02
#define MSG_LEN 256

static PyObject *IntegrityError, *ProtocolError, *ChannelClosed;

/* What went wrong inside a GIL-free section, raised once the GIL is back. */
typedef enum { E_NONE = 0, E_INTEGRITY, E_PROTOCOL, E_CLOSED, E_INTERNAL } err_kind;
typedef struct {
    err_kind kind;
    char msg[MSG_LEN];
} err_t;

static void set_err(err_t *e, err_kind kind, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_err(err_t *e, err_kind kind, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    e->kind = kind;
    vsnprintf(e->msg, MSG_LEN, fmt, ap);
    va_end(ap);
}

static PyObject *raise_err(const err_t *e) {
    PyObject *type = e->kind == E_INTEGRITY ? IntegrityError
                     : e->kind == E_PROTOCOL ? ProtocolError
                     : e->kind == E_CLOSED   ? ChannelClosed
                                             : PyExc_RuntimeError;
    PyErr_SetString(type, e->msg);
    return NULL;
}

static inline void put32(uint8_t *p, uint32_t v) {
    for (int i = 3; i >= 0; i--, v >>= 8) p[i] = (uint8_t)v;
}
static inline void put64(uint8_t *p, uint64_t v) {
    for (int i = 7; i >= 0; i--, v >>= 8) p[i] = (uint8_t)v;
}
static inline uint32_t get32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline uint64_t get64(const uint8_t *p) { return ((uint64_t)get32(p) << 32) | get32(p + 4); }

/* ------------------------------------------------------------------------------------------------ */
/* The shared object: one direction's key, counter and (for an opener) poison.                       */

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *ctx;
    uint32_t direction;
    uint64_t next_seq;
    int exhausted;        /* the record with seq 2**64-1 went: the key is spent */
    int busy;             /* a call is running with the GIL released */
    int dead;             /* detached, or a send failed midway: refuses everything */
    char failed[MSG_LEN]; /* non-empty once a failure poisoned it (why) */
    uint8_t mid[MID_SIZE];
    uint8_t *scratch; /* opener: header + body of one record; sealer: one whole record */
    size_t scratch_len;
} Cipher;

static int cipher_init(Cipher *self, PyObject *args, PyObject *kwds, int encrypt) {
    static char *kwlist[] = {"key", "direction", "migration_id", "start_seq", NULL};
    Py_buffer key, mid;
    PyObject *dir_obj, *seq_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*Oy*O", kwlist, &key, &dir_obj, &mid, &seq_obj))
        return -1;
    int rc = -1;
    unsigned long long dir, seq;
    if (key.len != KEY_SIZE) {
        PyErr_Format(PyExc_ValueError, "AES-256-GCM needs a %d-byte key, got %zd bytes", KEY_SIZE, key.len);
        goto out;
    }
    if (mid.len != MID_SIZE) {
        PyErr_Format(PyExc_ValueError, "migration id must be %d bytes, got %zd", MID_SIZE, mid.len);
        goto out;
    }
    if (!PyLong_Check(dir_obj) || PyBool_Check(dir_obj) || !PyLong_Check(seq_obj) || PyBool_Check(seq_obj)) {
        PyErr_SetString(PyExc_TypeError, "direction and start_seq must be ints");
        goto out;
    }
    dir = PyLong_AsUnsignedLongLong(dir_obj);
    if ((dir == (unsigned long long)-1 && PyErr_Occurred()) || dir > UINT32_MAX) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "direction must fit in 32 bits");
        goto out;
    }
    seq = PyLong_AsUnsignedLongLong(seq_obj);
    if (seq == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "start seq must be an int in 0..2**64-1");
        goto out;
    }
    if (self->ctx != NULL) { /* a second __init__ would reset the counter and the poison */
        PyErr_SetString(PyExc_RuntimeError, "native sealer/opener is already initialised");
        goto out;
    }
    if ((self->ctx = EVP_CIPHER_CTX_new()) == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    if ((encrypt ? EVP_EncryptInit_ex(self->ctx, EVP_aes_256_gcm(), NULL, key.buf, NULL)
                 : EVP_DecryptInit_ex(self->ctx, EVP_aes_256_gcm(), NULL, key.buf, NULL)) != 1) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not set up AES-256-GCM");
        goto out;
    }
    self->direction = (uint32_t)dir;
    self->next_seq = seq;
    self->exhausted = self->busy = self->dead = 0;
    self->failed[0] = 0;
    memcpy(self->mid, mid.buf, MID_SIZE);
    rc = 0;
out:
    PyBuffer_Release(&key);
    PyBuffer_Release(&mid);
    return rc;
}

static void cipher_dealloc(Cipher *self) {
    if (self->ctx) EVP_CIPHER_CTX_free(self->ctx); /* frees (and cleanses) the key schedule */
    if (self->scratch) {
        OPENSSL_cleanse(self->scratch, self->scratch_len);
        PyMem_RawFree(self->scratch);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Room for one sealed record of a chunk of n bytes: a zero chunk shorter than its 4-byte length record
 * makes a longer record than the chunk itself would. */
static size_t record_room(size_t n) { return HEADER_SIZE + (n > ZERO_PAYLOAD ? n : ZERO_PAYLOAD) + TAG_SIZE; }

static int ensure_scratch(Cipher *self, size_t n) {
    if (self->scratch_len >= n) return 0;
    uint8_t *p = PyMem_RawRealloc(self->scratch, n);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->scratch = p;
    self->scratch_len = n;
    return 0;
}

/* Take the object for one call (GIL held): refuses a second thread, a dead object and a poisoned opener. */
static int enter(Cipher *self) {
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "native sealer/opener is in use by another thread");
        return -1;
    }
    if (self->dead) {
        if (self->failed[0])
            PyErr_Format(ProtocolError, "native sealer is unusable after an earlier failure (%s)", self->failed);
        else
            PyErr_SetString(ProtocolError, "native sealer/opener was handed back (detached)");
        return -1;
    }
    if (self->failed[0]) {
        PyErr_Format(IntegrityError, "record opener is unusable after an earlier failure (%s)", self->failed);
        return -1;
    }
    if (self->ctx == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "native sealer/opener was not initialised");
        return -1;
    }
    self->busy = 1;
    return 0;
}

static PyObject *next_seq_get(Cipher *self, void *closure) {
    if (self->exhausted) {
        PyObject *one = PyLong_FromLong(1), *s = PyLong_FromLong(64);
        PyObject *r = (one && s) ? PyNumber_Lshift(one, s) : NULL;
        Py_XDECREF(one);
        Py_XDECREF(s);
        return r;
    }
    return PyLong_FromUnsignedLongLong(self->next_seq);
}

static PyObject *failed_get(Cipher *self, void *closure) {
    if (!self->failed[0]) Py_RETURN_NONE;
    return PyUnicode_FromString(self->failed);
}

static PyObject *direction_get(Cipher *self, void *closure) { return PyLong_FromUnsignedLong(self->direction); }

/* Give the position back (for a Python sealer/opener to continue from) and refuse all further use. */
static PyObject *cipher_detach(Cipher *self, PyObject *unused) {
    if (enter(self) < 0) return NULL;
    self->busy = 0;
    PyObject *seq = next_seq_get(self, NULL);
    if (seq) self->dead = 1;
    return seq;
}

static void make_nonce(uint8_t nonce[12], uint32_t direction, uint64_t seq) {
    put32(nonce, direction);
    put64(nonce + 4, seq);
}

static void pack_header(uint8_t *h, uint8_t kind, uint8_t flags, uint32_t length, uint64_t seq, uint64_t arg) {
    memcpy(h, "CMG1", 4);
    h[4] = kind;
    h[5] = flags;
    h[6] = h[7] = 0;
    put32(h + 8, length);
    put64(h + 12, seq);
    put64(h + 20, arg);
}

static int all_zero(const uint8_t *p, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        if (w) return 0;
    }
    for (; i < n; i++)
        if (p[i]) return 0;
    return 1;
}

/* ------------------------------------------------------------------------------------------------ */
/* Sealer                                                                                             */

static int sealer_init(Cipher *self, PyObject *args, PyObject *kwds) { return cipher_init(self, args, kwds, 1); }

/* Seal the chunk at src (n bytes) as record next_seq into out (room for HEADER + n + TAG); no Python.
 * Returns the record's length, or 0 with e set. */
static size_t seal_one(Cipher *self, uint64_t index, int demand, const uint8_t *src, size_t n, uint8_t *out,
                       uint8_t *tag_out, int *zero_out, err_t *e) {
    if (self->exhausted) {
        set_err(e, E_PROTOCOL, "record sequence numbers of this key are exhausted; a new handshake is needed");
        return 0;
    }
    uint8_t flags = demand ? FLAG_DEMAND : 0, zlen[ZERO_PAYLOAD], nonce[12], aad[AAD_SIZE];
    const uint8_t *plain = src;
    size_t plen = n;
    int zero = all_zero(src, n);
    if (zero) {
        put32(zlen, (uint32_t)n);
        plain = zlen;
        plen = ZERO_PAYLOAD;
        flags |= FLAG_ZERO;
    }
    uint64_t seq = self->next_seq;
    pack_header(out, KIND_CHUNK, flags, (uint32_t)(plen + TAG_SIZE), seq, index);
    memcpy(aad, out, HEADER_SIZE);
    memcpy(aad + HEADER_SIZE, self->mid, MID_SIZE);
    make_nonce(nonce, self->direction, seq);
    uint8_t *ct = out + HEADER_SIZE;
    int l1 = 0, l2 = 0;
    if (EVP_EncryptInit_ex(self->ctx, NULL, NULL, NULL, nonce) != 1 ||
        EVP_EncryptUpdate(self->ctx, NULL, &l1, aad, AAD_SIZE) != 1 ||
        EVP_EncryptUpdate(self->ctx, ct, &l1, plain, (int)plen) != 1 ||
        EVP_EncryptFinal_ex(self->ctx, ct + l1, &l2) != 1 || (size_t)(l1 + l2) != plen ||
        EVP_CIPHER_CTX_ctrl(self->ctx, EVP_CTRL_GCM_GET_TAG, TAG_SIZE, ct + plen) != 1) {
        set_err(e, E_INTERNAL, "OpenSSL failed to seal record seq %llu", (unsigned long long)seq);
        return 0;
    }
    if (tag_out) memcpy(tag_out, ct + plen, TAG_SIZE);
    if (zero_out) *zero_out = zero;
    if (seq == UINT64_MAX)
        self->exhausted = 1;
    else
        self->next_seq = seq + 1;
    return HEADER_SIZE + plen + TAG_SIZE;
}

static int index_arg(PyObject *obj, uint64_t *out) {
    if (!PyLong_Check(obj) || PyBool_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "chunk index must be an int");
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "chunk index must be an int in 0..2**64-1");
        return -1;
    }
    *out = v;
    return 0;
}

/* seal(index, data, demand) -> (record bytes, tag bytes, zero bool) */
static PyObject *sealer_seal(Cipher *self, PyObject *args) {
    PyObject *idx_obj;
    Py_buffer data;
    int demand;
    uint64_t index;
    if (!PyArg_ParseTuple(args, "Oy*p", &idx_obj, &data, &demand)) return NULL;
    PyObject *result = NULL;
    if (index_arg(idx_obj, &index) < 0) goto out;
    if (data.len < 1 || (size_t)data.len > MAX_CHUNK) {
        PyErr_Format(PyExc_ValueError, "chunk must be 1..%u bytes, got %zd", MAX_CHUNK, data.len);
        goto out;
    }
    if (enter(self) < 0) goto out;
    if (ensure_scratch(self, record_room((size_t)data.len)) < 0) {
        self->busy = 0;
        goto out;
    }
    err_t e = {E_NONE, ""};
    uint8_t tag[TAG_SIZE];
    int zero = 0;
    size_t n;
    Py_BEGIN_ALLOW_THREADS
    n = seal_one(self, index, demand, data.buf, (size_t)data.len, self->scratch, tag, &zero, &e);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (n == 0) {
        raise_err(&e);
        goto out;
    }
    result = Py_BuildValue("(y#y#O)", (const char *)self->scratch, (Py_ssize_t)n, (const char *)tag,
                           (Py_ssize_t)TAG_SIZE, zero ? Py_True : Py_False);
out:
    PyBuffer_Release(&data);
    return result;
}

/* Wait until fd is ready for `events`; timeout_ms < 0: forever. 0 ready, 1 timed out, -1 errno. */
static int wait_fd(int fd, short events, int timeout_ms) {
    struct pollfd p = {fd, events, 0};
    for (;;) {
        int r = poll(&p, 1, timeout_ms);
        if (r > 0) return 0;
        if (r == 0) return 1;
        if (errno != EINTR) return -1;
    }
}

static int send_all(int fd, const uint8_t *p, size_t n, int timeout_ms, err_t *e) {
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int r = wait_fd(fd, POLLOUT, timeout_ms);
            if (r == 0) continue;
            if (r == 1) {
                set_err(e, E_CLOSED, "peer stopped reading: send timed out");
                return -1;
            }
        }
        set_err(e, E_CLOSED, "connection lost while sending: %s", strerror(errno));
        return -1;
    }
    return 0;
}

/* send(fd, heap, chunk_size, indexes, tags_out, demand, timeout_ms) -> zero chunks sent.
 * Seals each listed chunk of `heap` straight from it and sends it; tags_out gets 16 bytes per chunk. */
static PyObject *sealer_send(Cipher *self, PyObject *args) {
    int fd, demand, timeout_ms;
    Py_buffer heap, idx, tags;
    Py_ssize_t chunk_size;
    if (!PyArg_ParseTuple(args, "iy*ny*w*pi", &fd, &heap, &chunk_size, &idx, &tags, &demand, &timeout_ms))
        return NULL;
    PyObject *result = NULL;
    size_t count = (size_t)idx.len / sizeof(int64_t);
    if (chunk_size < 1 || (size_t)chunk_size > MAX_CHUNK || heap.len % chunk_size) {
        PyErr_Format(PyExc_ValueError, "chunk size must be 1..%u and divide the heap's %zd bytes", MAX_CHUNK,
                     heap.len);
        goto out;
    }
    if (idx.len % sizeof(int64_t) || (size_t)tags.len != count * TAG_SIZE) {
        PyErr_SetString(PyExc_ValueError, "indexes must be int64 and tags_out 16 bytes per index");
        goto out;
    }
    uint64_t n_chunks = (uint64_t)(heap.len / chunk_size);
    const int64_t *ix = idx.buf;
    for (size_t k = 0; k < count; k++) /* all checked before a single byte goes */
        if (ix[k] < 0 || (uint64_t)ix[k] >= n_chunks) {
            PyErr_Format(PyExc_ValueError, "chunk index %lld is outside the heap's 0..%llu", (long long)ix[k],
                         (unsigned long long)n_chunks - 1);
            goto out;
        }
    if (enter(self) < 0) goto out;
    if (ensure_scratch(self, record_room((size_t)chunk_size)) < 0) {
        self->busy = 0;
        goto out;
    }
    err_t e = {E_NONE, ""};
    size_t zeros = 0;
    Py_BEGIN_ALLOW_THREADS
    for (size_t k = 0; k < count; k++) {
        int zero = 0;
        int64_t i = ix[k]; /* read once: the array is the caller's and not locked while the GIL is out */
        if (i < 0 || (uint64_t)i >= n_chunks) {
            set_err(&e, E_INTERNAL, "chunk index %lld changed to outside the heap during the send", (long long)i);
            break;
        }
        const uint8_t *src = (const uint8_t *)heap.buf + (size_t)i * (size_t)chunk_size;
        size_t n = seal_one(self, (uint64_t)i, demand, src, (size_t)chunk_size, self->scratch,
                            (uint8_t *)tags.buf + k * TAG_SIZE, &zero, &e);
        if (n == 0 || send_all(fd, self->scratch, n, timeout_ms, &e) < 0) break;
        zeros += (size_t)zero;
    }
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (e.kind != E_NONE) {
        /* part of a record may be on the wire: the stream position is unknown, so nothing more goes */
        self->dead = 1;
        snprintf(self->failed, MSG_LEN, "%s", e.msg);
        raise_err(&e);
        goto out;
    }
    result = PyLong_FromSize_t(zeros);
out:
    PyBuffer_Release(&heap);
    PyBuffer_Release(&idx);
    PyBuffer_Release(&tags);
    return result;
}

/* ------------------------------------------------------------------------------------------------ */
/* Opener                                                                                             */

static int opener_init(Cipher *self, PyObject *args, PyObject *kwds) { return cipher_init(self, args, kwds, 0); }

static const char *kind_name(uint8_t k) {
    return k == KIND_HANDSHAKE ? "HANDSHAKE" : k == KIND_CONTROL ? "CONTROL" : "CHUNK";
}

/* Validate a header as records.parse_header does, then as a CHUNK record of this opener's stream (its
 * seq next, as RecordOpener.check_seq). Returns 0, or -1 with e set. */
static int check_header(Cipher *self, const uint8_t *h, err_t *e) {
    if (memcmp(h, "CMG1", 4) != 0) {
        set_err(e, E_PROTOCOL, "bad record magic (expected 'CMG1'): not a constmig stream");
        return -1;
    }
    uint8_t kind = h[4], flags = h[5];
    uint32_t length = get32(h + 8);
    uint64_t seq = get64(h + 12), arg = get64(h + 20);
    if (kind < KIND_HANDSHAKE || kind > KIND_CHUNK) {
        set_err(e, E_PROTOCOL, "unknown record kind %u", kind);
        return -1;
    }
    if (h[6] || h[7]) {
        set_err(e, E_PROTOCOL, "record header reserved field is 0x%02x%02x, must be 0", h[6], h[7]);
        return -1;
    }
    uint8_t allowed = kind == KIND_CHUNK ? (FLAG_DEMAND | FLAG_ZERO) : 0;
    uint32_t lo = kind == KIND_HANDSHAKE ? 0 : kind == KIND_CONTROL ? TAG_SIZE : TAG_SIZE + 1;
    uint32_t hi = kind == KIND_HANDSHAKE ? MAX_HANDSHAKE_PAYLOAD
                  : kind == KIND_CONTROL ? MAX_CONTROL_PAYLOAD + TAG_SIZE
                                         : MAX_CHUNK + TAG_SIZE + CHUNK_MARGIN;
    if (flags & ~allowed) {
        set_err(e, E_PROTOCOL, "%s record has unknown flags 0x%02x", kind_name(kind), flags);
        return -1;
    }
    if (length < lo || length > hi) {
        set_err(e, E_PROTOCOL, "%s record length %u is outside %u..%u", kind_name(kind), length, lo, hi);
        return -1;
    }
    if ((flags & FLAG_ZERO) && length != ZERO_PAYLOAD + TAG_SIZE) {
        set_err(e, E_PROTOCOL, "zero CHUNK record length %u is not %d", length, ZERO_PAYLOAD + TAG_SIZE);
        return -1;
    }
    if (kind != KIND_CHUNK && arg != 0) {
        set_err(e, E_PROTOCOL, "%s record has nonzero arg %llu", kind_name(kind), (unsigned long long)arg);
        return -1;
    }
    if (kind != KIND_CHUNK) {
        set_err(e, E_PROTOCOL, "%s record arrived where the native receiver takes only CHUNK records",
                kind_name(kind));
        return -1;
    }
    if (self->exhausted) {
        set_err(e, E_INTEGRITY, "record sequence numbers of this key are exhausted");
        return -1;
    }
    if (seq != self->next_seq) {
        set_err(e, E_INTEGRITY, "record seq %llu arrived where %llu was expected (%s)", (unsigned long long)seq,
                (unsigned long long)self->next_seq,
                seq < self->next_seq ? "replayed or duplicated" : "reordered, or records were dropped");
        return -1;
    }
    return 0;
}

/* Decrypt the record in self->scratch (header, then its body) in place and check its tag; the seq moves on
 * only after the tag checked. A zero record's claimed length is checked for range. Returns 0, or -1 with
 * e set (the body is cleansed on a bad tag: nothing unverified is left anywhere). */
static int open_in_scratch(Cipher *self, err_t *e) {
    const uint8_t *h = self->scratch;
    uint8_t flags = h[5];
    uint32_t length = get32(h + 8);
    uint64_t seq = get64(h + 12);
    uint8_t *body = self->scratch + HEADER_SIZE;
    size_t plen = length - TAG_SIZE;
    uint8_t nonce[12], aad[AAD_SIZE];
    memcpy(aad, h, HEADER_SIZE);
    memcpy(aad + HEADER_SIZE, self->mid, MID_SIZE);
    make_nonce(nonce, self->direction, seq);
    int l1 = 0, l2 = 0;
    if (EVP_DecryptInit_ex(self->ctx, NULL, NULL, NULL, nonce) != 1 ||
        EVP_DecryptUpdate(self->ctx, NULL, &l1, aad, AAD_SIZE) != 1 ||
        EVP_DecryptUpdate(self->ctx, body, &l1, body, (int)plen) != 1 ||
        EVP_CIPHER_CTX_ctrl(self->ctx, EVP_CTRL_GCM_SET_TAG, TAG_SIZE, body + plen) != 1 ||
        EVP_DecryptFinal_ex(self->ctx, body + l1, &l2) != 1) {
        OPENSSL_cleanse(body, plen);
        set_err(e, E_INTEGRITY,
                "record seq %llu failed authentication (tampered, forged, or sealed with another key or for "
                "another position)",
                (unsigned long long)seq);
        return -1;
    }
    if (seq == UINT64_MAX)
        self->exhausted = 1;
    else
        self->next_seq = seq + 1;
    if (flags & FLAG_ZERO) {
        uint32_t claim = get32(body);
        if (claim < 1 || claim > MAX_CHUNK) {
            set_err(e, E_PROTOCOL, "zero chunk record claims %u bytes, outside 1..%u", claim, MAX_CHUNK);
            return -1;
        }
    }
    return 0;
}

/* Open the record in self->scratch and put its chunk at dst (dst_len bytes, which it must be). Nothing
 * reaches dst before the tag checked. */
static int open_one(Cipher *self, uint8_t *dst, size_t dst_len, uint8_t *tag_out, err_t *e) {
    if (open_in_scratch(self, e) < 0) return -1;
    const uint8_t *h = self->scratch, *body = self->scratch + HEADER_SIZE;
    size_t plen = get32(h + 8) - TAG_SIZE;
    if (h[5] & FLAG_ZERO) {
        uint32_t claim = get32(body);
        if (claim != dst_len) {
            set_err(e, E_PROTOCOL, "chunk record %llu carries %u bytes where %zu were expected",
                    (unsigned long long)get64(h + 20), claim, dst_len);
            return -1;
        }
        memset(dst, 0, dst_len);
    } else {
        memcpy(dst, body, plen);
    }
    memcpy(tag_out, body + plen, TAG_SIZE);
    return 0;
}

/* A non-zero record must carry exactly dst_len bytes: refused before its body is read or opened. */
static int check_length(const uint8_t *h, size_t dst_len, err_t *e) {
    uint32_t length = get32(h + 8);
    if (!(h[5] & FLAG_ZERO) && (size_t)length - TAG_SIZE != dst_len) {
        set_err(e, E_PROTOCOL, "chunk record %llu carries %u bytes where %zu were expected",
                (unsigned long long)get64(h + 20), length - TAG_SIZE, dst_len);
        return -1;
    }
    return 0;
}

static void poison(Cipher *self, const err_t *e) { snprintf(self->failed, MSG_LEN, "%s", e->msg); }

/* open(record, out) -> (index, flags, tag): one whole record (header + payload) into `out`. */
static PyObject *opener_open(Cipher *self, PyObject *args) {
    Py_buffer rec, out;
    if (!PyArg_ParseTuple(args, "y*w*", &rec, &out)) return NULL;
    PyObject *result = NULL;
    if (enter(self) < 0) goto done;
    err_t e = {E_NONE, ""};
    uint8_t tag[TAG_SIZE];
    if (ensure_scratch(self, (size_t)rec.len) < 0) {
        self->busy = 0;
        goto done;
    }
    if (rec.len < HEADER_SIZE)
        set_err(&e, E_PROTOCOL, "record is %zd bytes, shorter than its %d-byte header", rec.len, HEADER_SIZE);
    else if (check_header(self, rec.buf, &e) < 0)
        ;
    else if ((size_t)rec.len != HEADER_SIZE + (size_t)get32((const uint8_t *)rec.buf + 8))
        set_err(&e, E_PROTOCOL, "record is %zd bytes where its header says %zu", rec.len,
                HEADER_SIZE + (size_t)get32((const uint8_t *)rec.buf + 8));
    else if (check_length(rec.buf, (size_t)out.len, &e) == 0) {
        memcpy(self->scratch, rec.buf, (size_t)rec.len);
        Py_BEGIN_ALLOW_THREADS
        open_one(self, out.buf, (size_t)out.len, tag, &e);
        Py_END_ALLOW_THREADS
    }
    self->busy = 0;
    if (e.kind != E_NONE) {
        poison(self, &e);
        raise_err(&e);
        goto done;
    }
    const uint8_t *h = rec.buf;
    result = Py_BuildValue("(KBy#)", (unsigned long long)get64(h + 20), h[5], (const char *)tag, (Py_ssize_t)TAG_SIZE);
done:
    PyBuffer_Release(&rec);
    PyBuffer_Release(&out);
    return result;
}

/* Read exactly n bytes; `what` names the part for a short read. */
static int recv_all(int fd, uint8_t *p, size_t n, int timeout_ms, const char *what, int first, err_t *e) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, p + got, n - got, 0);
        if (r > 0) {
            got += (size_t)r;
            continue;
        }
        if (r == 0) {
            if (first && got == 0)
                set_err(e, E_CLOSED, "peer closed the connection");
            else
                set_err(e, E_CLOSED, "peer closed the connection mid-record (%zu of %zu %s bytes)", got, n, what);
            return -1;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            int w = wait_fd(fd, POLLIN, timeout_ms);
            if (w == 0) continue;
            if (w == 1) {
                set_err(e, E_CLOSED, "peer silent for %d ms mid-stream (%zu of %zu %s bytes)", timeout_ms, got, n,
                        what);
                return -1;
            }
        }
        set_err(e, E_CLOSED, "connection lost: %s", strerror(errno));
        return -1;
    }
    return 0;
}

/* recv(fd, heap, chunk_size, idx_out, flags_out, tags_out, timeout_ms) -> None: as many CHUNK records as
 * idx_out has room for, each opened into its chunk of `heap`. */
static PyObject *opener_recv(Cipher *self, PyObject *args) {
    int fd, timeout_ms;
    Py_buffer heap, idx, fl, tags;
    Py_ssize_t chunk_size;
    if (!PyArg_ParseTuple(args, "iw*nw*w*w*i", &fd, &heap, &chunk_size, &idx, &fl, &tags, &timeout_ms)) return NULL;
    PyObject *result = NULL;
    size_t count = (size_t)idx.len / sizeof(int64_t);
    if (chunk_size < 1 || (size_t)chunk_size > MAX_CHUNK || heap.len % chunk_size) {
        PyErr_Format(PyExc_ValueError, "chunk size must be 1..%u and divide the heap's %zd bytes", MAX_CHUNK,
                     heap.len);
        goto out;
    }
    if (idx.len % sizeof(int64_t) || (size_t)fl.len != count || (size_t)tags.len != count * TAG_SIZE) {
        PyErr_SetString(PyExc_ValueError, "idx_out must be int64, flags_out 1 byte and tags_out 16 bytes per record");
        goto out;
    }
    if (enter(self) < 0) goto out;
    if (ensure_scratch(self, record_room((size_t)chunk_size)) < 0) {
        self->busy = 0;
        goto out;
    }
    uint64_t n_chunks = (uint64_t)(heap.len / chunk_size);
    err_t e = {E_NONE, ""};
    Py_BEGIN_ALLOW_THREADS
    for (size_t k = 0; k < count; k++) {
        uint8_t *h = self->scratch;
        if (recv_all(fd, h, HEADER_SIZE, timeout_ms, "header", 1, &e) < 0 || check_header(self, h, &e) < 0) break;
        uint64_t index = get64(h + 20);
        if (index >= n_chunks) {
            set_err(&e, E_PROTOCOL, "chunk record index %llu is outside the heap's 0..%llu",
                    (unsigned long long)index, (unsigned long long)n_chunks - 1);
            break;
        }
        if (check_length(h, (size_t)chunk_size, &e) < 0 ||
            recv_all(fd, h + HEADER_SIZE, get32(h + 8), timeout_ms, "CHUNK record", 0, &e) < 0)
            break;
        uint8_t *dst = (uint8_t *)heap.buf + (size_t)index * (size_t)chunk_size;
        if (open_one(self, dst, (size_t)chunk_size, (uint8_t *)tags.buf + k * TAG_SIZE, &e) < 0) break;
        ((int64_t *)idx.buf)[k] = (int64_t)index;
        ((uint8_t *)fl.buf)[k] = h[5];
    }
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (e.kind != E_NONE) {
        poison(self, &e);
        raise_err(&e);
        goto out;
    }
    result = Py_NewRef(Py_None);
out:
    PyBuffer_Release(&heap);
    PyBuffer_Release(&idx);
    PyBuffer_Release(&fl);
    PyBuffer_Release(&tags);
    return result;
}

/* recv_one(fd, out, idle_ms, timeout_ms) -> None | header (28 bytes) | (index, flags, length, tag).
 * The receive thread's step of the post-copy stream (step 2b): waits up to idle_ms for a record to begin
 * (None: nothing came, nothing read, the position is unchanged), reads its header, and
 *   - hands a record that is not a CHUNK back as its header bytes, its body unread and the position
 *     unchanged, so the channel's Python side reads and judges it (a CONTROL record: an ABORT, say);
 *   - reads a CHUNK record of at most len(out) bytes (refused before its body is read otherwise), opens
 *     it in the opener's own scratch and, only once the tag checked, copies the chunk to the start of
 *     `out` (a zero record writes nothing: its length is the verified claim). `length` is the chunk's.
 * timeout_ms bounds each wait once a record began (past it the stream is given up: ChannelClosed). */
static PyObject *opener_recv_one(Cipher *self, PyObject *args) {
    int fd, idle_ms, timeout_ms;
    Py_buffer out;
    if (!PyArg_ParseTuple(args, "iw*ii", &fd, &out, &idle_ms, &timeout_ms)) return NULL;
    PyObject *result = NULL;
    if (out.len < 1 || (size_t)out.len > MAX_CHUNK) {
        PyErr_Format(PyExc_ValueError, "out must be 1..%u bytes, got %zd", MAX_CHUNK, out.len);
        goto out;
    }
    if (enter(self) < 0) goto out;
    if (ensure_scratch(self, record_room((size_t)out.len)) < 0) {
        self->busy = 0;
        goto out;
    }
    err_t e = {E_NONE, ""};
    enum { R_ERROR, R_IDLE, R_FOREIGN, R_CHUNK } got = R_ERROR;
    uint8_t *h = self->scratch;
    uint32_t length = 0;
    Py_BEGIN_ALLOW_THREADS
    int w = wait_fd(fd, POLLIN, idle_ms);
    if (w == 1)
        got = R_IDLE;
    else if (w < 0)
        set_err(&e, E_CLOSED, "connection lost: %s", strerror(errno));
    else if (recv_all(fd, h, HEADER_SIZE, timeout_ms, "header", 1, &e) < 0)
        ;
    else if (h[4] != KIND_CHUNK)
        got = R_FOREIGN;
    else if (check_header(self, h, &e) < 0)
        ;
    else if (!(h[5] & FLAG_ZERO) && (size_t)get32(h + 8) - TAG_SIZE > (size_t)out.len)
        set_err(&e, E_PROTOCOL, "chunk record %llu carries %u bytes, more than a chunk's %zd",
                (unsigned long long)get64(h + 20), get32(h + 8) - TAG_SIZE, out.len);
    else if (recv_all(fd, h + HEADER_SIZE, get32(h + 8), timeout_ms, "CHUNK record", 0, &e) < 0)
        ;
    else if (open_in_scratch(self, &e) == 0) {
        const uint8_t *body = h + HEADER_SIZE;
        size_t plen = get32(h + 8) - TAG_SIZE;
        if (h[5] & FLAG_ZERO) {
            length = get32(body);
        } else {
            memcpy(out.buf, body, plen);
            length = (uint32_t)plen;
        }
        got = R_CHUNK;
    }
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (got == R_IDLE) {
        result = Py_NewRef(Py_None);
    } else if (got == R_FOREIGN) {
        result = PyBytes_FromStringAndSize((const char *)h, HEADER_SIZE);
    } else if (got == R_CHUNK) {
        size_t plen = get32(h + 8) - TAG_SIZE;
        result = Py_BuildValue("(KBIy#)", (unsigned long long)get64(h + 20), h[5], length,
                               (const char *)h + HEADER_SIZE + plen, (Py_ssize_t)TAG_SIZE);
    } else {
        if (e.kind == E_NONE) set_err(&e, E_INTERNAL, "native receive ended without a result");
        poison(self, &e);
        raise_err(&e);
    }
out:
    PyBuffer_Release(&out);
    return result;
}

/* ------------------------------------------------------------------------------------------------ */

static PyGetSetDef cipher_getset[] = {
    {"next_seq", (getter)next_seq_get, NULL, "The seq of the next record (2**64 once the key is spent).", NULL},
    {"failed", (getter)failed_get, NULL, "Why this object refuses everything, or None.", NULL},
    {"direction", (getter)direction_get, NULL, "The direction in every nonce.", NULL},
    {NULL},
};

static PyMethodDef sealer_methods[] = {
    {"seal", (PyCFunction)sealer_seal, METH_VARARGS, "seal(index, data, demand) -> (record, tag, zero)"},
    {"send", (PyCFunction)sealer_send, METH_VARARGS,
     "send(fd, heap, chunk_size, indexes_i64, tags_out, demand, timeout_ms) -> zero records sent"},
    {"detach", (PyCFunction)cipher_detach, METH_NOARGS, "Hand the position back: next seq; unusable after."},
    {NULL},
};

static PyMethodDef opener_methods[] = {
    {"open", (PyCFunction)opener_open, METH_VARARGS, "open(record, out) -> (index, flags, tag)"},
    {"recv", (PyCFunction)opener_recv, METH_VARARGS,
     "recv(fd, heap, chunk_size, idx_out, flags_out, tags_out, timeout_ms) -> None"},
    {"recv_one", (PyCFunction)opener_recv_one, METH_VARARGS,
     "recv_one(fd, out, idle_ms, timeout_ms) -> None | header bytes | (index, flags, length, tag)"},
    {"detach", (PyCFunction)cipher_detach, METH_NOARGS, "Hand the position back: next seq; unusable after."},
    {NULL},
};

static PyTypeObject SealerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "constmig.native._engine.Sealer",
    .tp_basicsize = sizeof(Cipher),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Seals one direction's CHUNK records (AES-256-GCM via OpenSSL EVP).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)sealer_init,
    .tp_dealloc = (destructor)cipher_dealloc,
    .tp_methods = sealer_methods,
    .tp_getset = cipher_getset,
};

static PyTypeObject OpenerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "constmig.native._engine.Opener",
    .tp_basicsize = sizeof(Cipher),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Opens one direction's CHUNK records strictly in order; poisoned by any failure.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)opener_init,
    .tp_dealloc = (destructor)cipher_dealloc,
    .tp_methods = opener_methods,
    .tp_getset = cipher_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_engine", "The native data plane (docs/native.md).", -1,
                                    NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__engine(void) {
    PyObject *errors = PyImport_ImportModule("constmig.errors");
    if (errors == NULL) return NULL;
    IntegrityError = PyObject_GetAttrString(errors, "IntegrityError");
    ProtocolError = PyObject_GetAttrString(errors, "ProtocolError");
    ChannelClosed = PyObject_GetAttrString(errors, "ChannelClosed");
    Py_DECREF(errors);
    if (!IntegrityError || !ProtocolError || !ChannelClosed) return NULL;
    if (PyType_Ready(&SealerType) < 0 || PyType_Ready(&OpenerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Sealer", (PyObject *)&SealerType) < 0 ||
        PyModule_AddObjectRef(m, "Opener", (PyObject *)&OpenerType) < 0 ||
        PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
