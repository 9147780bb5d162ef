/* The enclave's own write tracker: a SIGSEGV handler that records the first write to a read-only heap
 * chunk and opens the chunk again, as an SGX2 enclave's #PF handler does for a page it restricted itself
 * (EMODPR + EACCEPT, lifted with EMODPE). See constmig/enclave/dirty.py for the protocol around it.
 *
 * The handler touches no Python object and takes no lock: it reads a fixed table of regions, calls
 * mprotect and stores one byte. Everything else (arming, taking the marks, re-protecting) is done from
 * Python through the functions below.
 *
 * It fails safe. Opening one chunk inside a read-only run splits the heap's mapping, and once the process
 * holds vm.max_map_count mappings mprotect fails (ENOMEM); a scattered write pattern over many small
 * chunks gets there. Then the handler gives tracking up rather than the app: it marks every chunk written,
 * opens the whole heap (one mprotect that only merges mappings), and records why in `lost`, which Python
 * reads at its next scan (the rounds end; everything goes at the stop). It never passes such a fault on
 * to the default action, which would kill the only copy of the enclave.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
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
    int lost;      /* 0 while tracking holds; else the errno of the chunk mprotect that failed (sticky until arm) */
    int lost_heap; /* the errno of the whole-heap mprotect too, if that failed: writes then wait for it */
} region_t;

static region_t regions[MAX_REGIONS];
static struct sigaction previous;

/* A chunk could not be opened (mprotect failed, normally ENOMEM at vm.max_map_count): tracking is lost,
 * not the app. Every chunk counts as written, then the whole heap is opened in one mprotect: over the
 * heap's own mappings (MAP_NORESERVE: no ordinary neighbour merges with them) it only merges, so it needs no
 * mapping more and succeeds where the chunk's split could not. If it fails all the same, no write may land
 * untracked and none may kill the app: the faulting thread pauses 1 ms (poll is async-signal-safe) and its
 * write faults again, trying again, until memory can be opened (Python's close() opens it, too). */
static void lose(region_t *r, int state, int err) {
    int expected = 0;
    __atomic_compare_exchange_n(&r->lost, &expected, err != 0 ? err : EIO, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    if (state == ARMED) /* marks belong to a live tracker only while armed */
        for (size_t i = 0; i < r->n_chunks; i++)
            __atomic_store_n(&r->marks[i], 1, __ATOMIC_RELEASE);
    if (mprotect((void *)r->base, r->size, PROT_READ | PROT_WRITE) == 0) {
        __atomic_store_n(&r->lost_heap, 0, __ATOMIC_RELEASE);
        return;
    }
    int why = errno;
    __atomic_store_n(&r->lost_heap, why != 0 ? why : EIO, __ATOMIC_RELEASE);
    poll(NULL, 0, 1);
}

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
        if (mprotect((void *)(r->base + (c << r->shift)), (size_t)1 << r->shift, PROT_READ | PROT_WRITE) != 0) {
            if (si->si_code != SEGV_ACCERR)
                break; /* nothing mapped there (the heap went away under us): a bug, not a tracked write */
            lose(r, state, errno);
            errno = saved;
            return; /* the write runs again: on a writable heap, or into this handler after the pause */
        }
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
static PyObject *py_arm(PyObject *Py_UNUSED(self), PyObject *args) {
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
    r->lost = 0;
    r->lost_heap = 0;
    __atomic_store_n(&r->state, ARMED, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

/* take(base, out_address): move the marks into out (one byte per chunk), clearing them atomically so a
 * mark set concurrently is either taken now or found next time. Returns how many were set. */
static PyObject *py_take(PyObject *Py_UNUSED(self), PyObject *args) {
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
static PyObject *py_opening(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long base;
    if (!PyArg_ParseTuple(args, "K", &base))
        return NULL;
    region_t *r = find((uintptr_t)base);
    if (r != NULL)
        __atomic_store_n(&r->state, OPENING, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

/* forget(base): the region is unmapped or handed to other code; a fault there is not ours any more. */
static PyObject *py_forget(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long base;
    if (!PyArg_ParseTuple(args, "K", &base))
        return NULL;
    region_t *r = find((uintptr_t)base);
    if (r != NULL)
        __atomic_store_n(&r->state, FREE, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

/* faults(base): first writes caught since arm (figures). */
static PyObject *py_faults(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long base;
    if (!PyArg_ParseTuple(args, "K", &base))
        return NULL;
    region_t *r = find((uintptr_t)base);
    return PyLong_FromUnsignedLongLong(r == NULL ? 0 : __atomic_load_n(&r->faults, __ATOMIC_RELAXED));
}

/* lost(base): (errno of the chunk mprotect that failed, errno of the whole-heap one or 0), or (0, 0) while
 * tracking holds. Once lost, every chunk was marked written and tracking stays lost until the next arm. */
static PyObject *py_lost(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long base;
    if (!PyArg_ParseTuple(args, "K", &base))
        return NULL;
    region_t *r = find((uintptr_t)base);
    if (r == NULL)
        return Py_BuildValue("(ii)", 0, 0);
    return Py_BuildValue("(ii)", __atomic_load_n(&r->lost, __ATOMIC_ACQUIRE),
                         __atomic_load_n(&r->lost_heap, __ATOMIC_ACQUIRE));
}

static PyMethodDef methods[] = {
    {"arm", py_arm, METH_VARARGS, "Register a heap region for write tracking."},
    {"take", py_take, METH_VARARGS, "Move the chunk marks out, clearing them."},
    {"opening", py_opening, METH_VARARGS, "Tracking ends: let faulting writes through."},
    {"forget", py_forget, METH_VARARGS, "Drop a region."},
    {"faults", py_faults, METH_VARARGS, "First writes caught since arm."},
    {"lost", py_lost, METH_VARARGS, "Whether tracking was lost since arm: (chunk errno, whole-heap errno)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_wtrack", "The enclave's own write-fault handler.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__wtrack(void) { return PyModule_Create(&module); }
