/* The enclave's own write tracker: a SIGSEGV handler that records the first write to a read-only heap
 * chunk and opens the chunk again, as an SGX2 enclave's #PF handler does for a page it restricted itself
 * (EMODPR + EACCEPT, lifted with EMODPE). See constmig/enclave/dirty.py for the protocol around it.
 *
 * The handler touches no Python object and takes no lock: it reads a fixed table of regions, calls
 * mprotect and stores one byte. Everything else (arming, taking the marks, re-protecting) is done from
 * Python through the functions below.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define MAX_REGIONS 8

enum { FREE = 0, ARMED = 1, OPENING = 2 };

typedef struct {
    uintptr_t base;
    size_t size;
    unsigned shift;
    size_t n_chunks;
    uint8_t *marks; /* one byte per chunk, owned by the Python caller (kept alive while registered) */
    int state;
    uint64_t faults;
} region_t;

static region_t regions[MAX_REGIONS];
static struct sigaction previous;

static void on_segv(int sig, siginfo_t *si, void *uctx) {
    uintptr_t a = (uintptr_t)si->si_addr;
    int saved = errno;
    for (int i = 0; i < MAX_REGIONS; i++) {
        region_t *r = &regions[i];
        int state = __atomic_load_n(&r->state, __ATOMIC_ACQUIRE);
        if (state == FREE || a < r->base || a >= r->base + r->size)
            continue;
        size_t c = (a - r->base) >> r->shift;
        /* Open first, then mark: a take() between the two misses nothing, since whatever it re-protects
         * is read after, and a mark made after it is taken next time. */
        if (mprotect((void *)(r->base + (c << r->shift)), (size_t)1 << r->shift, PROT_READ | PROT_WRITE) != 0)
            break;
        if (state == ARMED) {
            __atomic_store_n(&r->marks[c], 1, __ATOMIC_RELEASE);
            __atomic_fetch_add(&r->faults, 1, __ATOMIC_RELAXED);
        }
        errno = saved;
        return; /* the write runs again, now on a writable chunk */
    }
    errno = saved;
    /* Not a tracked heap: whoever handled SIGSEGV before us does, or the default kills the process. */
    if ((previous.sa_flags & SA_SIGINFO) && previous.sa_sigaction != NULL) {
        previous.sa_sigaction(sig, si, uctx);
        return;
    }
    if (!(previous.sa_flags & SA_SIGINFO) && previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
        return;
    }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGSEGV, &dfl, NULL); /* the faulting instruction runs again and the process dies of it */
}

static int install(void) {
    struct sigaction now;
    if (sigaction(SIGSEGV, NULL, &now) != 0)
        return -1;
    if ((now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_segv)
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, &previous) != 0)
        return -1;
    return 0;
}

static region_t *find(uintptr_t base) {
    for (int i = 0; i < MAX_REGIONS; i++)
        if (regions[i].state != FREE && regions[i].base == base)
            return &regions[i];
    return NULL;
}

/* arm(base, size, chunk_size, marks_address, n_chunks): register (or re-arm) the region. The caller
 * write-protects it afterwards; until then every write simply lands. */
static PyObject *py_arm(PyObject *self, PyObject *args) {
    unsigned long long base, size, chunk, marks, n;
    if (!PyArg_ParseTuple(args, "KKKKK", &base, &size, &chunk, &marks, &n))
        return NULL;
    if (chunk == 0 || (chunk & (chunk - 1)) != 0 || size == 0 || size % chunk != 0 || n != size / chunk) {
        PyErr_SetString(PyExc_ValueError, "region must be a whole number of power-of-two chunks");
        return NULL;
    }
    if (install() != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    region_t *r = find((uintptr_t)base);
    if (r == NULL) {
        for (int i = 0; i < MAX_REGIONS && r == NULL; i++)
            if (regions[i].state == FREE)
                r = &regions[i];
        for (int i = 0; i < MAX_REGIONS && r == NULL; i++)
            if (regions[i].state == OPENING) /* tracking ended there long ago; its heap was not forgotten */
                r = &regions[i];
        if (r == NULL) {
            PyErr_SetString(PyExc_RuntimeError, "too many tracked regions in this process");
            return NULL;
        }
    }
    __atomic_store_n(&r->state, FREE, __ATOMIC_RELEASE);
    r->base = (uintptr_t)base;
    r->size = (size_t)size;
    r->shift = (unsigned)__builtin_ctzll(chunk);
    r->n_chunks = (size_t)n;
    r->marks = (uint8_t *)(uintptr_t)marks;
    r->faults = 0;
    __atomic_store_n(&r->state, ARMED, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

/* take(base, out_address): move the marks into out (one byte per chunk), clearing them atomically so a
 * mark set concurrently is either taken now or found next time. Returns how many were set. */
static PyObject *py_take(PyObject *self, PyObject *args) {
    unsigned long long base, out;
    if (!PyArg_ParseTuple(args, "KK", &base, &out))
        return NULL;
    region_t *r = find((uintptr_t)base);
    if (r == NULL || r->state != ARMED) {
        PyErr_SetString(PyExc_RuntimeError, "region is not armed");
        return NULL;
    }
    uint8_t *dst = (uint8_t *)(uintptr_t)out;
    size_t count = 0;
    for (size_t c = 0; c < r->n_chunks; c++) {
        uint8_t v = __atomic_exchange_n(&r->marks[c], 0, __ATOMIC_ACQ_REL);
        dst[c] = v;
        count += v != 0;
    }
    return PyLong_FromSize_t(count);
}

/* opening(base): tracking ends; a write still faulting on a chunk not yet opened is let through. */
static PyObject *py_opening(PyObject *self, PyObject *args) {
    unsigned long long base;
    if (!PyArg_ParseTuple(args, "K", &base))
        return NULL;
    region_t *r = find((uintptr_t)base);
    if (r != NULL)
        __atomic_store_n(&r->state, OPENING, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

/* forget(base): the region is unmapped or handed to other code; a fault there is not ours any more. */
static PyObject *py_forget(PyObject *self, PyObject *args) {
    unsigned long long base;
    if (!PyArg_ParseTuple(args, "K", &base))
        return NULL;
    region_t *r = find((uintptr_t)base);
    if (r != NULL)
        __atomic_store_n(&r->state, FREE, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

/* faults(base): first writes caught since arm (figures). */
static PyObject *py_faults(PyObject *self, PyObject *args) {
    unsigned long long base;
    if (!PyArg_ParseTuple(args, "K", &base))
        return NULL;
    region_t *r = find((uintptr_t)base);
    return PyLong_FromUnsignedLongLong(r == NULL ? 0 : __atomic_load_n(&r->faults, __ATOMIC_RELAXED));
}

static PyMethodDef methods[] = {
    {"arm", py_arm, METH_VARARGS, "Register a heap region for write tracking."},
    {"take", py_take, METH_VARARGS, "Move the chunk marks out, clearing them."},
    {"opening", py_opening, METH_VARARGS, "Tracking ends: let faulting writes through."},
    {"forget", py_forget, METH_VARARGS, "Drop a region."},
    {"faults", py_faults, METH_VARARGS, "First writes caught since arm."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_wtrack", "The enclave's own write-fault handler.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__wtrack(void) { return PyModule_Create(&module); }
