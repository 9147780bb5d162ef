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
 *
 * The same handler serves the Access Tracker's guard (constmig/enclave/tracker/untracked.py): after an
 * incoming post-copy migration's COMMIT the chunks still missing are PROT_NONE, and an access the
 * instrumentation missed (np.asarray(heap_array), ctypes, a C function's out=) faults on one. The faulting
 * thread notes the chunk in a lock-free slot (one byte per chunk, and the offset it touched), wakes the
 * tracker's watcher thread through an eventfd (write(2) is async-signal-safe), and waits on a futex word
 * the installer bumps after every chunk it installs, until the chunk is restored (installed, verified and
 * readable), then returns: the access runs again and reads the verified bytes. Why this is safe with the
 * GIL, and what it assumes, is written out at serve_guarded() below.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/futex.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

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

static int in_tracked_region(uintptr_t a) {
    for (int i = 0; i < MAX_REGIONS; i++)
        if (__atomic_load_n(&regions[i].state, __ATOMIC_ACQUIRE) != FREE && a >= regions[i].base &&
            a < regions[i].base + regions[i].size)
            return 1;
    return 0;
}

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


/* -- the Access Tracker's guard ----------------------------------------------------------------------- */

#define MAX_GUARDS 4
#define NOTE_SIZE 512

enum { G_FREE = 0, G_SERVING = 1, G_FAILED = 2 };

typedef struct {
    uintptr_t base;
    size_t size;
    unsigned shift;
    size_t n_chunks;
    const uint8_t *missing; /* the tracker's bitmap (numpy bool, Python's): 1 until the chunk is restored */
    uint8_t *wanted;        /* the handler sets a byte, the watcher takes it (both Python-owned buffers) */
    uint32_t *where;        /* offset in the chunk of the access that wanted it: that piece comes first */
    int wake_fd;            /* eventfd the watcher thread reads */
    int state;
    uint32_t seq;           /* futex word: bumped after every install, failure and release */
    int64_t timeout_ns;     /* the tracker's access timeout */
    uint64_t accesses;      /* untracked accesses that faulted on a missing chunk (figures) */
    uint64_t waiting_ns;    /* their time waiting, summed */
    char note[NOTE_SIZE];   /* why the migration stopped (failed, paused): the last line before a death */
} guard_t;

static guard_t guards[MAX_GUARDS];

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* async-signal-safe */
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Readable now, asked of the kernel (process_vm_readv fails with EFAULT instead of faulting). */
static int readable(uintptr_t a) {
    char byte;
    struct iovec local = {&byte, 1}, remote = {(void *)a, 1};
    return syscall(SYS_process_vm_readv, getpid(), &local, 1, &remote, 1, 0) == 1;
}

static void say(const char *s) {
    size_t n = strlen(s);
    while (n > 0) {
        ssize_t w = write(2, s, n);
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

static void say_num(uint64_t v) {
    char buf[24];
    int i = sizeof buf - 1;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0 && i > 0);
    say(buf + i);
}

/* The access cannot be served: one clear line on stderr (the agent logs the enclave's death), then the
 * caller passes the fault on and the process dies of it. Never zeros, never a hang. */
static void give_up(guard_t *g, size_t c, int64_t waited_ns, const char *why) {
    say("constmig enclave: an access the Access Tracker's instrumentation missed touched heap chunk ");
    say_num(c);
    say(", which has not arrived; ");
    say(why);
    say(" after ");
    say_num((uint64_t)(waited_ns / 1000000));
    say(" ms");
    if (g->note[0] != 0) {
        say(" (");
        say(g->note);
        say(")");
    }
    say(": the enclave stops here rather than read bytes that were never verified\n");
}

/* A fault inside guard g. Returns 1 when the access may run again (its chunk is restored, or was
 * installed between the fault and now), 0 when it is not ours to serve (the caller passes it on).
 *
 * Why the wait is safe with the GIL. The faulting thread usually holds it (numpy code); the chunk comes
 * through Python threads (the receiver, the watcher) that need it, so the handler releases it for the wait
 * (PyEval_SaveThread) and takes it back after (PyEval_RestoreThread), as if the interrupted C code had
 * been Py_BEGIN/END_ALLOW_THREADS around the access. Neither function is async-signal-safe in POSIX's
 * sense. In CPython 3.11 (Python/ceval.c, ceval_gil.h) PyEval_SaveThread is _PyThreadState_Swap(NULL)
 * then drop_gil: lock the GIL's pthread mutex, clear `locked`, signal its condition variable, unlock
 * (and, with a drop request pending, wait on switch_cond until another thread took it); RestoreThread
 * is take_gil (the same mutex and a timed condition wait; errno saved and restored; a daemon thread
 * exits there if the interpreter is finalizing) then the swap back. No allocation, no other lock. That
 * is sound from this handler because SIGSEGV on a guarded chunk is synchronous and raised only by an
 * access to the heap, and the GIL machinery never touches the heap, so the interrupted code cannot be
 * inside it holding its mutex. Whether this thread holds the GIL is asked as
 * "is the thread state that holds it this thread's own?" (PyGILState_Check would answer 1 whenever
 * GIL-state checking is off), so a thread with no Python state (a BLAS worker) just waits.
 * What the release lends: other Python threads run while the interrupted C code is paused mid-way. In
 * the enclave every thread that touches the app's objects takes the app lock (ECALLs, checkpoints, the
 * stop), which the faulting ECALL holds; the others (receiver, watcher, status, sessions) touch only
 * their own objects. The wait is bounded by the tracker's access timeout; a failed migration, or the
 * timeout (a paused stream included), ends it with give_up. */
static int serve_guarded(guard_t *g, uintptr_t a) {
    size_t c = (a - g->base) >> g->shift;
    if (!__atomic_load_n(&g->missing[c], __ATOMIC_ACQUIRE))
        return readable(a); /* installed since the fault: run again; else not a guard's fault */
    if (__atomic_load_n(&g->state, __ATOMIC_ACQUIRE) != G_SERVING) {
        give_up(g, c, 0, "the incoming migration failed");
        return 0;
    }
    g->where[c] = (uint32_t)((a - g->base) & (((uintptr_t)1 << g->shift) - 1));
    __atomic_store_n(&g->wanted[c], 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    if (write(g->wake_fd, &one, sizeof one) != sizeof one) {
        /* the eventfd is full or gone: the watcher polls the slots anyway */
    }
    __atomic_fetch_add(&g->accesses, 1, __ATOMIC_RELAXED); /* counted as it faults: figures read at the
                                                             * last install see every access it served */
    PyThreadState *held = NULL;
    if (Py_IsInitialized()) {
        PyThreadState *me = PyGILState_GetThisThreadState();
        if (me != NULL && _PyThreadState_UncheckedGet() == me)
            held = PyEval_SaveThread();
    }
    int64_t t0 = now_ns(), deadline = t0 + g->timeout_ns;
    int ok = 0;
    for (;;) {
        uint32_t seq = __atomic_load_n(&g->seq, __ATOMIC_ACQUIRE);
        if (!__atomic_load_n(&g->missing[c], __ATOMIC_ACQUIRE)) {
            ok = 1;
            break;
        }
        int state = __atomic_load_n(&g->state, __ATOMIC_ACQUIRE);
        int64_t now = now_ns();
        if (state == G_FAILED) {
            give_up(g, c, now - t0, "the incoming migration failed");
            break;
        }
        if (state == G_FREE) {
            give_up(g, c, now - t0, "the tracker was closed");
            break;
        }
        if (now >= deadline) {
            give_up(g, c, now - t0, "the access timed out");
            break;
        }
        int64_t left = deadline - now;
        if (left > 100000000LL)
            left = 100000000LL; /* look again every 100 ms: a missed wake costs no more than that */
        struct timespec ts = {(time_t)(left / 1000000000LL), (long)(left % 1000000000LL)};
        syscall(SYS_futex, &g->seq, FUTEX_WAIT_PRIVATE, seq, &ts, NULL, 0);
    }
    __atomic_fetch_add(&g->waiting_ns, (uint64_t)(now_ns() - t0), __ATOMIC_RELAXED);
    if (held != NULL)
        PyEval_RestoreThread(held);
    return ok;
}

static void pass_on(int sig, siginfo_t *si, void *uctx);

/* The same address faulting again and again on a readable page is no install race but a write to a page
 * something else left read-only: after SPIN_LIMIT retries in a row it is passed on (a crash, not a spin). */
#define SPIN_LIMIT 1000
static uintptr_t spin_addr;
static unsigned spins;

static int spinning(uintptr_t a) {
    if (__atomic_exchange_n(&spin_addr, a, __ATOMIC_RELAXED) != a) {
        __atomic_store_n(&spins, 0, __ATOMIC_RELAXED);
        return 0;
    }
    return __atomic_add_fetch(&spins, 1, __ATOMIC_RELAXED) > SPIN_LIMIT;
}

static void on_segv(int sig, siginfo_t *si, void *uctx) {
    uintptr_t a = (uintptr_t)si->si_addr;
    int saved = errno;
    for (int i = 0; i < MAX_GUARDS; i++) {
        guard_t *g = &guards[i];
        if (__atomic_load_n(&g->state, __ATOMIC_ACQUIRE) == G_FREE || a < g->base || a >= g->base + g->size)
            continue;
        if (!__atomic_load_n(&g->missing[(a - g->base) >> g->shift], __ATOMIC_ACQUIRE))
            break; /* not a missing chunk: the write tracker's, if any, or nobody's */
        int ok = serve_guarded(g, a);
        errno = saved;
        if (ok)
            return; /* the access runs again, on the restored chunk */
        pass_on(sig, si, uctx); /* given up: a crash, with the line give_up wrote */
        return;
    }
    /* Installed between the fault and the check above (the guard may even have been dropped since, the
     * heap being whole): a guarded heap's chunk is either PROT_NONE or open, so readable now means the
     * access will succeed when it runs again. */
    for (int i = 0; i < MAX_GUARDS; i++) {
        guard_t *g = &guards[i];
        if (g->size != 0 && a >= g->base && a < g->base + g->size && !in_tracked_region(a) && readable(a) &&
            !spinning(a)) {
            errno = saved;
            return;
        }
    }
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
    pass_on(sig, si, uctx);
}

/* Not a tracked heap: whoever handled SIGSEGV before us does, or the default kills the process. */
static void pass_on(int sig, siginfo_t *si, void *uctx) {
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

/* Move n one-byte marks into dst, clearing each atomically, so a mark set concurrently is either taken
 * now or found next time; returns how many were set. */
static size_t take_marks(uint8_t *marks, uint8_t *dst, size_t n) {
    size_t count = 0;
    for (size_t c = 0; c < n; c++) {
        uint8_t v = __atomic_exchange_n(&marks[c], 0, __ATOMIC_ACQ_REL);
        dst[c] = v;
        count += v != 0;
    }
    return count;
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
    return PyLong_FromSize_t(take_marks(r->marks, (uint8_t *)(uintptr_t)out, r->n_chunks));
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


/* -- the guard's Python side (constmig/enclave/tracker/untracked.py) ------------------------------------ */

static guard_t *find_guard(uintptr_t base) {
    for (int i = 0; i < MAX_GUARDS; i++)
        if (guards[i].state != G_FREE && guards[i].base == base)
            return &guards[i];
    return NULL;
}

static void wake_guard(guard_t *g) {
    __atomic_fetch_add(&g->seq, 1, __ATOMIC_ACQ_REL);
    syscall(SYS_futex, &g->seq, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
}

/* guard(base, size, chunk_size, missing, wanted, where, n_chunks, wake_fd, timeout_s): serve the accesses
 * that fault on missing chunks of this heap. The three buffers are the caller's (kept alive while it
 * serves): missing (one byte per chunk, nonzero until restored), wanted (one byte per chunk), where (one
 * uint32 per chunk). */
static PyObject *py_guard(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long base, size, chunk, missing, wanted, where, n;
    int fd;
    double timeout;
    if (!PyArg_ParseTuple(args, "KKKKKKKid", &base, &size, &chunk, &missing, &wanted, &where, &n, &fd, &timeout))
        return NULL;
    if (chunk == 0 || (chunk & (chunk - 1)) != 0 || size == 0 || size % chunk != 0 || n != size / chunk) {
        PyErr_SetString(PyExc_ValueError, "region must be a whole number of power-of-two chunks");
        return NULL;
    }
    if (!(timeout > 0)) {
        PyErr_SetString(PyExc_ValueError, "the access timeout must be positive");
        return NULL;
    }
    if (install() != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    guard_t *g = find_guard((uintptr_t)base);
    for (int i = 0; i < MAX_GUARDS && g == NULL; i++)
        if (guards[i].state == G_FREE)
            g = &guards[i];
    if (g == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "too many guarded heaps in this process");
        return NULL;
    }
    __atomic_store_n(&g->state, G_FREE, __ATOMIC_RELEASE);
    g->base = (uintptr_t)base;
    g->size = (size_t)size;
    g->shift = (unsigned)__builtin_ctzll(chunk);
    g->n_chunks = (size_t)n;
    g->missing = (const uint8_t *)(uintptr_t)missing;
    g->wanted = (uint8_t *)(uintptr_t)wanted;
    g->where = (uint32_t *)(uintptr_t)where;
    g->wake_fd = fd;
    g->timeout_ns = (int64_t)(timeout * 1e9);
    g->accesses = 0;
    g->waiting_ns = 0;
    g->note[0] = 0;
    __atomic_store_n(&g->state, G_SERVING, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

/* guard_take(base, out): move the wanted marks into out (one byte per chunk); returns how many. */
static PyObject *py_guard_take(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long base, out;
    if (!PyArg_ParseTuple(args, "KK", &base, &out))
        return NULL;
    guard_t *g = find_guard((uintptr_t)base);
    if (g == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "heap is not guarded");
        return NULL;
    }
    return PyLong_FromSize_t(take_marks(g->wanted, (uint8_t *)(uintptr_t)out, g->n_chunks));
}

/* guard_wake(base): a chunk was restored: waiting accesses look again. */
static PyObject *py_guard_wake(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long base;
    if (!PyArg_ParseTuple(args, "K", &base))
        return NULL;
    guard_t *g = find_guard((uintptr_t)base);
    if (g != NULL)
        wake_guard(g);
    Py_RETURN_NONE;
}

/* guard_note(base, text): why the stream stopped (paused, failed), for the line a given-up access
 * writes; "" clears it. Written while no access gives up, or torn in that one line at worst. */
static PyObject *py_guard_note(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long base;
    const char *text;
    Py_ssize_t len;
    if (!PyArg_ParseTuple(args, "Ks#", &base, &text, &len))
        return NULL;
    guard_t *g = find_guard((uintptr_t)base);
    if (g != NULL) {
        size_t n = (size_t)len < NOTE_SIZE - 1 ? (size_t)len : NOTE_SIZE - 1;
        memcpy(g->note, text, n);
        g->note[n] = 0;
    }
    Py_RETURN_NONE;
}

/* guard_fail(base): the migration cannot finish: waiting accesses give up now, later ones at once. */
static PyObject *py_guard_fail(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long base;
    if (!PyArg_ParseTuple(args, "K", &base))
        return NULL;
    guard_t *g = find_guard((uintptr_t)base);
    if (g != NULL) {
        __atomic_store_n(&g->state, G_FAILED, __ATOMIC_RELEASE);
        wake_guard(g);
    }
    Py_RETURN_NONE;
}

/* guard_figures(base): (untracked accesses, seconds they waited in all), also after forget_guard. */
static PyObject *py_guard_figures(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long base;
    if (!PyArg_ParseTuple(args, "K", &base))
        return NULL;
    guard_t *g = NULL;
    for (int i = 0; i < MAX_GUARDS && g == NULL; i++)
        if (guards[i].base == (uintptr_t)base)
            g = &guards[i];
    if (g == NULL)
        return Py_BuildValue("(Kd)", 0ULL, 0.0);
    return Py_BuildValue("(Kd)", (unsigned long long)__atomic_load_n(&g->accesses, __ATOMIC_RELAXED),
                         (double)__atomic_load_n(&g->waiting_ns, __ATOMIC_RELAXED) / 1e9);
}

static void forget_guard(uintptr_t base) {
    guard_t *g = find_guard(base);
    if (g != NULL) {
        __atomic_store_n(&g->state, G_FREE, __ATOMIC_RELEASE);
        wake_guard(g);
    }
}

/* forget_guard(base): stop serving (the heap is whole, or goes away); a waiting access gives up. */
static PyObject *py_forget_guard(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long base;
    if (!PyArg_ParseTuple(args, "K", &base))
        return NULL;
    forget_guard((uintptr_t)base);
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
    forget_guard((uintptr_t)base); /* and its guard: a waiting access gives up (the heap goes away) */
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
    {"guard", py_guard, METH_VARARGS, "Serve accesses that fault on a heap's missing (guarded) chunks."},
    {"guard_take", py_guard_take, METH_VARARGS, "Move the chunks faulting accesses wait for out, clearing them."},
    {"guard_wake", py_guard_wake, METH_VARARGS, "A chunk was restored: waiting accesses look again."},
    {"guard_note", py_guard_note, METH_VARARGS, "Why the stream stopped, for the line a given-up access writes."},
    {"guard_fail", py_guard_fail, METH_VARARGS, "The migration failed: waiting accesses give up."},
    {"forget_guard", py_forget_guard, METH_VARARGS, "Stop serving a heap's guarded chunks."},
    {"guard_figures", py_guard_figures, METH_VARARGS, "(untracked accesses served, seconds they waited)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_wtrack", "The enclave's own fault handler: write tracking and the Access Tracker's guard.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__wtrack(void) { return PyModule_Create(&module); }
