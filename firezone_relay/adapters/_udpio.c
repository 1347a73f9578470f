/*
 * Batched UDP I/O for the relay's per-packet path (Linux: recvmmsg/sendmmsg).
 *
 * This module moves no relay logic out of Python: every datagram still goes
 * to the core (Relay.handle_client_input / handle_peer_traffic), which decides
 * what to do with it.  What moves here is the plumbing around that call,
 * which in pure Python costs more than the core itself:
 *
 *   - reading: one recvmmsg() fills up to BATCH datagrams per system call,
 *     each in its own slot of one static buffer, and the sender's address
 *     comes from a hashed cache of (sockaddr -> Python tuple), so a steady
 *     flow allocates no address objects and formats no address strings;
 *   - sending: the Transmit tuples (source_port, family, destination,
 *     payload) the core returns are queued and leave in one sendmmsg() per
 *     run of datagrams on the same socket, with destination tuples turned
 *     into sockaddrs through a hashed cache keyed by object identity.
 *
 * Contract with the Python shell (firezone_relay/adapters/shell.py, which
 * owns ``io``; udp.py registers a socket's ``reader`` as its direct read):
 *
 *   io = IO(now, pump, fds, fallback, send_failed, internal_error)
 *   read = io.reader(fd, owner, entry, port, family, always_view, refused)
 *   read() -> datagrams read
 *   io.send(transmits) -> None
 *
 * A Reader (``read``) reads the socket ``fd``: the UDP transport's direct
 * read of a socket, with no Python function around it.  Each call looks up
 * its ``handler``, ``getattr(owner, entry)``, and its read listener,
 * ``owner.read_listener`` (None or the shell's read listener, the stream
 * transport), so that replacing either on the owner takes effect at the next
 * read.  The listener is told ``begin_read()`` before the read's first call
 * that may write to a stream client (the fallback, the pump) and
 * ``end_read()`` when the read ends, only if it was begun.
 *
 * ``handler`` is the core's entry point.  For the listen port (``port`` is
 * None) it is called as handler(data, addr, now); for an allocation port as
 * handler(data, addr, port, family, now).  ``data`` is a read-only memoryview
 * of the slot when ``always_view`` is true or the datagram is ChannelData
 * (first byte 0x40-0x7F), ``bytes`` otherwise; a view is only valid during
 * the call and until the end of the batch (the slot is reused by the next
 * read), which is the same contract as the pure-Python reader.
 *
 * A returned Transmit whose destination is an (ip, port) pair and whose
 * (family, source_port) has a descriptor in ``fds`` ({family: {port: fd}})
 * is queued; anything else that is not None (a stream client's 3-tuple, a
 * socket that is gone, an address that does not parse) goes to
 * ``fallback(transmit)``, the shell's general send.  After each batch the
 * queue is flushed; then, if any handler returned None (the core may have
 * queued commands or moved a deadline), ``pump()`` runs once.  A failed
 * sendmmsg entry is reported as ``send_failed(errno)`` and the rest of the
 * batch still goes.  An exception from the handler, the fallback or the pump
 * is passed to ``internal_error(where, exc)`` and the batch carries on:
 * nothing a datagram causes escapes the read.  ``refused()`` is called for a
 * pending ECONNREFUSED (an ICMP error) on the socket.
 *
 * ``send`` takes a list of Transmits that did not come from a read (the
 * stream transport collects the ChannelData of one TCP/TLS read this way) and
 * treats each as a read treats a returned one: queued, or passed to the
 * fallback, then everything leaves in sendmmsg calls before it returns.
 * send_failed and internal_error report failures as for a read.  It may run
 * inside a read (the shared queue is simply flushed early, in order).
 *
 * Reentrancy: the buffers are static and the reactor is single-threaded; a
 * nested read (a handler that somehow reads another port) is refused with
 * RuntimeError rather than overwriting slots still in use.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <stddef.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <limits.h>

#define BATCH 64
#define SLOT (65536)
#define ROUNDS 4           /* batches per read() before going back to the reactor */

/* --- static buffers ------------------------------------------------------ */

static unsigned char *slots = NULL; /* BATCH * SLOT bytes, allocated on first use */
static struct mmsghdr rmsgs[BATCH];
static struct iovec riov[BATCH];
static struct sockaddr_storage raddr[BATCH];

typedef struct {
    int fd;
    Py_buffer buf;
    struct sockaddr_storage addr;
    socklen_t addrlen;
} queued_t;

static struct mmsghdr smsgs[BATCH];
static struct iovec siov[BATCH];
static queued_t queue[BATCH];
static int queued = 0;
static int busy = 0;

/* --- address caches ------------------------------------------------------- */

/* Both caches are hash tables of CACHE_SIZE slots, an address looked up in
   the PROBE slots from its hash on: a flow's address is found in a probe or
   two however many flows there are (a relay with 100 paced clients and their
   allocation ports sees more than 100 addresses in turn; a 16-entry table
   scanned in order missed on every datagram then and paid inet_ntop or
   inet_pton and a new tuple each time).  A new address takes an empty slot
   of its PROBE, else replaces one of them in turn. */
#define CACHE_SIZE 1024 /* a power of two */
#define PROBE 8
static unsigned int victim = 0;

typedef struct {
    /* The key: family, port (network order) and the 4 or 16 address bytes. */
    sa_family_t family;
    uint16_t port;
    unsigned char addr[16];
    PyObject *value; /* (ip, port), or NULL for an empty slot */
} recv_entry_t;

static recv_entry_t recv_cache[CACHE_SIZE];

typedef struct {
    PyObject *key; /* the destination tuple itself (strong reference) */
    int family;
    socklen_t addrlen;
    union {
        struct sockaddr_in v4;
        struct sockaddr_in6 v6;
    } addr; /* addrlen bytes of it */
} send_entry_t;

static send_entry_t send_cache[CACHE_SIZE];

static inline uint32_t
mix32(uint32_t h)
{
    h ^= h >> 16;
    h *= 0x7feb352dU;
    h ^= h >> 15;
    h *= 0x846ca68bU;
    h ^= h >> 16;
    return h;
}

/* The first cache slot of a received sockaddr (IPv4 or IPv6), filling its
   key fields into *key (its address bytes, the first 4 for IPv4, and its port
   in network order).  Returns -1 for another family. */
static int
recv_slot(const struct sockaddr_storage *sa, recv_entry_t *key)
{
    uint32_t h;
    memset(key, 0, sizeof(*key));
    key->family = sa->ss_family;
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const void *)sa;
        key->port = a->sin_port;
        memcpy(key->addr, &a->sin_addr, 4);
        h = a->sin_addr.s_addr ^ ((uint32_t)a->sin_port << 16 | a->sin_port);
    } else if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const void *)sa;
        uint32_t w[4];
        key->port = a->sin6_port;
        memcpy(key->addr, &a->sin6_addr, 16);
        memcpy(w, &a->sin6_addr, 16);
        h = w[0] ^ w[1] ^ w[2] ^ w[3] ^ ((uint32_t)a->sin6_port << 16 | a->sin6_port) ^ 0x9e3779b9U;
    } else {
        return -1;
    }
    return (int)(mix32(h) & (CACHE_SIZE - 1));
}

/* A new reference to (ip, port) for a received sockaddr. */
static PyObject *
address_of(const struct sockaddr_storage *sa)
{
    recv_entry_t key;
    int home = recv_slot(sa, &key);
    if (home < 0) {
        PyErr_Format(PyExc_OSError, "unexpected address family %d", (int)sa->ss_family);
        return NULL;
    }
    recv_entry_t *e = NULL; /* the slot a miss fills */
    for (int i = 0; i < PROBE; i++) {
        recv_entry_t *c = &recv_cache[(home + i) & (CACHE_SIZE - 1)];
        if (c->value == NULL) {
            if (e == NULL)
                e = c;
            continue;
        }
        if (c->family == key.family && c->port == key.port && memcmp(c->addr, key.addr, sizeof(key.addr)) == 0) {
            Py_INCREF(c->value);
            return c->value;
        }
    }
    if (e == NULL)
        e = &recv_cache[(home + (victim++ % PROBE)) & (CACHE_SIZE - 1)];
    /* A miss: the tuple from the key's address bytes and port. */
    char text[INET6_ADDRSTRLEN];
    if (inet_ntop(key.family, key.addr, text, sizeof(text)) == NULL)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *value = Py_BuildValue("(si)", text, (int)ntohs(key.port));
    if (value == NULL)
        return NULL;
    key.value = value;
    Py_INCREF(value);
    PyObject *old = e->value;
    *e = key;
    Py_XDECREF(old);
    return value;
}

/* The slot of ``dest`` (and ``family``) in the send cache, or the slot to
   fill for it; *hit says which. */
static send_entry_t *
send_slot(PyObject *dest, int family, int *hit)
{
    uintptr_t p = (uintptr_t)dest >> 4;
    unsigned int home = mix32((uint32_t)p ^ (uint32_t)((uint64_t)p >> 32) ^ (uint32_t)family) & (CACHE_SIZE - 1);
    send_entry_t *empty = NULL;
    for (unsigned int i = 0; i < PROBE; i++) {
        send_entry_t *c = &send_cache[(home + i) & (CACHE_SIZE - 1)];
        if (c->key == dest && c->family == family) {
            *hit = 1;
            return c;
        }
        if (c->key == NULL && empty == NULL)
            empty = c;
    }
    *hit = 0;
    return empty != NULL ? empty : &send_cache[(home + (victim++ % PROBE)) & (CACHE_SIZE - 1)];
}

/* Fill q->addr from an (ip, port) tuple for a socket of ``family``.
   Returns 1 on success, 0 when the tuple does not parse (no exception set). */
static int
sockaddr_of(PyObject *dest, int family, queued_t *q)
{
    int hit;
    send_entry_t *e = send_slot(dest, family, &hit);
    if (hit) {
        memcpy(&q->addr, &e->addr, e->addrlen);
        q->addrlen = e->addrlen;
        return 1;
    }
    PyObject *ip = PyTuple_GET_ITEM(dest, 0), *port_obj = PyTuple_GET_ITEM(dest, 1);
    if (!PyUnicode_Check(ip) || !PyLong_Check(port_obj))
        return 0;
    const char *text = PyUnicode_AsUTF8(ip);
    long port = PyLong_AsLong(port_obj);
    if (text == NULL || port < 0 || port > 65535) {
        PyErr_Clear();
        return 0;
    }
    memset(&q->addr, 0, sizeof(q->addr));
    if (family == 4) {
        struct sockaddr_in *a = (void *)&q->addr;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, text, &a->sin_addr) != 1)
            return 0;
        q->addrlen = sizeof(*a);
    } else {
        struct sockaddr_in6 *a = (void *)&q->addr;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, text, &a->sin6_addr) != 1)
            return 0;
        q->addrlen = sizeof(*a);
    }
    Py_INCREF(dest);
    Py_XSETREF(e->key, dest);
    e->family = family;
    memcpy(&e->addr, &q->addr, q->addrlen);
    e->addrlen = q->addrlen;
    return 1;
}

/* --- references held by the objects ------------------------------------------ */

/* Each type names the references it holds once, in a list REFS(X) that
   applies X to each member: the struct declares them from it, and the
   type's traverse and clear (GC_FUNCTIONS) go through the same list, so a
   new member cannot be left out of either (nor out of IO's init, which sets
   each from its argument). */
#define DECLARE_REF(member) PyObject *member;
#define VISIT_REF(member) Py_VISIT(self->member);
#define CLEAR_REF(member) Py_CLEAR(self->member);
/* self->member = the variable of the same name (the argument that sets it) */
#define SET_REF(member) Py_XSETREF(self->member, Py_NewRef(member));

/* Type##_traverse and Type##_clear of the Type##Object whose references
   REFS lists. */
#define GC_FUNCTIONS(Type, REFS)                                                   \
    static int Type##_traverse(Type##Object *self, visitproc visit, void *arg)     \
    {                                                                              \
        REFS(VISIT_REF)                                                            \
        return 0;                                                                  \
    }                                                                              \
                                                                                   \
    static int Type##_clear(Type##Object *self)                                    \
    {                                                                              \
        REFS(CLEAR_REF)                                                            \
        return 0;                                                                  \
    }

/* The tp_dealloc of both types: untracked, its references dropped (its
   tp_clear), freed. */
static void
gc_dealloc(PyObject *self)
{
    PyObject_GC_UnTrack(self);
    Py_TYPE(self)->tp_clear(self);
    Py_TYPE(self)->tp_free(self);
}

/* --- the IO object ----------------------------------------------------------- */

#define IO_REFS(X)                               \
    X(now)            /* () -> float */          \
    X(pump)           /* () -> None */           \
    X(fds)            /* {family: {port: fd}} */ \
    X(fallback)       /* (transmit) -> None */   \
    X(send_failed)    /* (errno) -> None */      \
    X(internal_error) /* (where, exc) -> None */

typedef struct {
    PyObject_HEAD
    IO_REFS(DECLARE_REF)
    Py_ssize_t batches;       /* recvmmsg calls that returned datagrams */
    Py_ssize_t datagrams;     /* datagrams read */
    Py_ssize_t sent;          /* datagrams sent by sendmmsg */
    Py_ssize_t send_calls;    /* sendmmsg calls */
} IOObject;

static PyObject *str_client, *str_peer, *str_send, *str_pump;

/* The result of a call into Python: 0 with the result dropped, or -1 when
   the call failed (``result`` NULL, an exception set). */
static inline int
drop_result(PyObject *result)
{
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* Hand the current exception, its traceback set on it, to ``callback(arg,
   exc)`` if it is an instance of ``passed`` but not of ``kept`` (NULL: no
   such class).  Returns 0 when handed over (or none was set), -1 when it
   propagates: not such an exception, or the callback failed. */
static int
hand_over(PyObject *callback, PyObject *arg, PyObject *passed, PyObject *kept)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (type == NULL)
        return 0;
    if (!PyErr_GivenExceptionMatches(type, passed) || (kept != NULL && PyErr_GivenExceptionMatches(type, kept))) {
        PyErr_Restore(type, value, tb);
        return -1;
    }
    if (tb != NULL)
        PyException_SetTraceback(value, tb);
    PyObject *r = PyObject_CallFunctionObjArgs(callback, arg, value, NULL);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return drop_result(r);
}

/* Pass the current exception (if an Exception) to internal_error.  Returns 0,
   or -1 when it must propagate (BaseException, or internal_error failed). */
static int
report(IOObject *self, PyObject *where)
{
    return hand_over(self->internal_error, where, PyExc_Exception, NULL);
}

static void
release_queue(void)
{
    for (int i = 0; i < queued; i++)
        PyBuffer_Release(&queue[i].buf);
    queued = 0;
}

/* Send everything queued.  Returns 0, or -1 with an exception set (from
   send_failed; the queue is released either way). */
static int
flush(IOObject *self)
{
    int i = 0, status = 0;
    for (int k = 0; k < queued; k++) {
        siov[k].iov_base = queue[k].buf.buf;
        siov[k].iov_len = (size_t)queue[k].buf.len;
        memset(&smsgs[k], 0, sizeof(smsgs[k]));
        smsgs[k].msg_hdr.msg_name = &queue[k].addr;
        smsgs[k].msg_hdr.msg_namelen = queue[k].addrlen;
        smsgs[k].msg_hdr.msg_iov = &siov[k];
        smsgs[k].msg_hdr.msg_iovlen = 1;
    }
    while (i < queued) {
        int fd = queue[i].fd, j = i + 1;
        while (j < queued && queue[j].fd == fd)
            j++;
        int r = sendmmsg(fd, &smsgs[i], (unsigned int)(j - i), MSG_DONTWAIT); /* non-blocking: GIL held */
        self->send_calls++;
        if (r > 0) {
            self->sent += r;
            i += r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        /* datagram i failed: count it, go on with the next one */
        int err = r < 0 ? errno : EAGAIN;
        i++;
        if (status == 0 && drop_result(PyObject_CallFunction(self->send_failed, "i", err)) < 0)
            status = report(self, str_send);
    }
    release_queue();
    return status;
}

/* The read listener of the read in progress (borrowed, NULL if none) and
   whether its begin_read() has been called.  The listener (the stream
   transport) holds what a read writes to stream clients until end_read():
   it is begun lazily, before the first call into Python that may write to
   a stream client (the fallback, the pump), and ended after the read only
   if it was begun, so a read that only relays over UDP (every paced
   datagram) makes neither call. */
static PyObject *cur_listener = NULL;
static int cur_begun = 0;
static PyObject *str_begin_read, *str_end_read, *str_read_listener;

static int
begin_listener(void)
{
    if (cur_listener == NULL || cur_begun)
        return 0;
    cur_begun = 1;
    return drop_result(PyObject_CallMethodNoArgs(cur_listener, str_begin_read));
}

/* Queue (or hand to the fallback) one Transmit.  Returns 0 or -1. */
static int
transmit(IOObject *self, PyObject *t)
{
    if (PyTuple_CheckExact(t) && PyTuple_GET_SIZE(t) == 4) {
        PyObject *src = PyTuple_GET_ITEM(t, 0), *fam = PyTuple_GET_ITEM(t, 1);
        PyObject *dest = PyTuple_GET_ITEM(t, 2), *payload = PyTuple_GET_ITEM(t, 3);
        if (PyTuple_CheckExact(dest) && PyTuple_GET_SIZE(dest) == 2 && PyLong_CheckExact(fam)) {
            long family = PyLong_AsLong(fam);
            PyObject *ports = PyDict_GetItemWithError(self->fds, fam);
            PyObject *fd_obj = ports != NULL && PyDict_Check(ports) ? PyDict_GetItemWithError(ports, src) : NULL;
            if (PyErr_Occurred())
                return -1;
            if (fd_obj != NULL && (family == 4 || family == 6)) {
                /* fd_obj (and ports) are borrowed from the fds dict, and a
                   flush calls into Python (send_failed, internal_error),
                   which may change that dict and free them: take the C int
                   now and touch neither after the flush. */
                int fd = (int)PyLong_AsLong(fd_obj);
                fd_obj = ports = NULL;
                if (fd < 0 && PyErr_Occurred())
                    return -1;
                if (queued == BATCH && flush(self) < 0)
                    return -1;
                queued_t *q = &queue[queued];
                if (sockaddr_of(dest, (int)family, q)) {
                    if (PyObject_GetBuffer(payload, &q->buf, PyBUF_SIMPLE) < 0) {
                        PyErr_Clear(); /* not a buffer: the fallback says why */
                    } else {
                        q->fd = fd;
                        queued++;
                        return 0;
                    }
                }
            }
        }
    }
    if (begin_listener() < 0 || drop_result(PyObject_CallOneArg(self->fallback, t)) < 0)
        return report(self, str_send);
    return 0;
}

/* The receive headers, set up once (with the slots).  recvmmsg writes only
   msg_len, msg_namelen and msg_flags of the entries it fills; msg_namelen
   is an input too, so ``reset_recv`` puts it back for those entries (and
   the next) after each call (a full set-up of all BATCH entries per read cost more than
   the rest of a one-datagram read). */
static void
setup_recv(void)
{
    for (int i = 0; i < BATCH; i++) {
        riov[i].iov_base = slots + (size_t)i * SLOT;
        riov[i].iov_len = SLOT;
        memset(&rmsgs[i], 0, sizeof(rmsgs[i]));
        rmsgs[i].msg_hdr.msg_name = &raddr[i];
        rmsgs[i].msg_hdr.msg_namelen = sizeof(raddr[i]);
        rmsgs[i].msg_hdr.msg_iov = &riov[i];
        rmsgs[i].msg_hdr.msg_iovlen = 1;
    }
}

static inline void
reset_recv(int n)
{
    for (int i = 0; i < n; i++)
        rmsgs[i].msg_hdr.msg_namelen = sizeof(raddr[i]);
}

/* One read (see the module comment); ``listener`` is None or the read
   listener, begun lazily (``begin_listener``). */
static PyObject *
do_read(IOObject *self, int fd, PyObject *handler, PyObject *port, PyObject *family, int always_view,
        PyObject *refused, PyObject *listener)
{
    int is_peer = port != Py_None;
    PyObject *where = is_peer ? str_peer : str_client;

    if (busy) {
        PyErr_SetString(PyExc_RuntimeError, "_udpio: a read is not reentrant");
        return NULL;
    }
    if (slots == NULL) {
        slots = PyMem_RawMalloc((size_t)BATCH * SLOT);
        if (slots == NULL)
            return PyErr_NoMemory();
        setup_recv();
    }
    busy = 1;
    cur_listener = listener == Py_None ? NULL : listener;
    cur_begun = 0;
    Py_ssize_t total = 0;
    int status = 0;
    for (int round = 0; round < ROUNDS && status == 0; round++) {
        /* Non-blocking (MSG_DONTWAIT): the GIL stays held, as for the
           sendmmsg in flush(); releasing and taking it back cost more than
           the Python work on a datagram, and the relay is one thread. */
        int n = recvmmsg(fd, rmsgs, BATCH, MSG_DONTWAIT, NULL);
        if (n > 0)
            reset_recv(n < BATCH ? n + 1 : n); /* and the entry that found the socket empty */
        if (n < 0) {
            int err = errno;
            if (err == EINTR)
                continue;
            if (err == ECONNREFUSED) {
                if (drop_result(PyObject_CallNoArgs(refused)) < 0)
                    status = report(self, where);
                continue;
            }
            if (err != EAGAIN && err != EWOULDBLOCK) {
                errno = err;
                PyErr_SetFromErrno(PyExc_OSError);
                status = -1;
            }
            break;
        }
        if (n == 0)
            break;
        self->batches++;
        self->datagrams += n;
        total += n;
        PyObject *now = PyObject_CallNoArgs(self->now);
        if (now == NULL) {
            status = -1;
            break;
        }
        int need_pump = 0;
        for (int i = 0; i < n && status == 0; i++) {
            unsigned char *p = riov[i].iov_base;
            Py_ssize_t len = (Py_ssize_t)rmsgs[i].msg_len;
            PyObject *addr = address_of(&raddr[i]);
            if (addr == NULL) {
                status = report(self, where);
                continue;
            }
            PyObject *data;
            if (len > 0 && (always_view || (p[0] >= 0x40 && p[0] < 0x80)))
                data = PyMemoryView_FromMemory((char *)p, len, PyBUF_READ);
            else
                data = PyBytes_FromStringAndSize((const char *)p, len);
            if (data == NULL) {
                Py_DECREF(addr);
                status = -1;
                break;
            }
            PyObject *call_args[5];
            PyObject *t;
            call_args[0] = data;
            call_args[1] = addr;
            if (is_peer) {
                call_args[2] = port;
                call_args[3] = family;
                call_args[4] = now;
                t = PyObject_Vectorcall(handler, call_args, 5, NULL);
            } else {
                call_args[2] = now;
                t = PyObject_Vectorcall(handler, call_args, 3, NULL);
            }
            Py_DECREF(data);
            Py_DECREF(addr);
            if (t == NULL) {
                need_pump = 1; /* the core may have queued commands before failing */
                status = report(self, where);
            } else if (t == Py_None) {
                Py_DECREF(t);
                need_pump = 1;
            } else {
                status = transmit(self, t);
                Py_DECREF(t);
            }
        }
        Py_DECREF(now);
        if (flush(self) < 0 && status == 0)
            status = -1;
        if (need_pump && status == 0 && (begin_listener() < 0 || drop_result(PyObject_CallNoArgs(self->pump)) < 0))
            status = report(self, str_pump);
        if (n < BATCH)
            break; /* the socket is (very likely) empty: back to the reactor */
    }
    release_queue();
    busy = 0;
    if (cur_begun) {
        /* As a ``finally``: ended whatever happened; an exception from
           end_read replaces the read's. */
        PyObject *exc_type, *exc_value, *exc_tb;
        PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
        if (drop_result(PyObject_CallMethodNoArgs(cur_listener, str_end_read)) < 0) {
            Py_XDECREF(exc_type);
            Py_XDECREF(exc_value);
            Py_XDECREF(exc_tb);
            status = -1;
        } else {
            PyErr_Restore(exc_type, exc_value, exc_tb);
        }
    }
    cur_listener = NULL;
    cur_begun = 0;
    if (status < 0)
        return NULL;
    return PyLong_FromSsize_t(total);
}

/* A descriptor argument: >= 0, or -1 with an exception set. */
static int
descriptor_arg(PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    if (fd < 0 || fd > INT_MAX) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, fd < 0 ? "negative descriptor" : "descriptor out of range");
        return -1;
    }
    return (int)fd;
}

/* descriptor_arg as a PyArg_Parse converter ("O&") into an int. */
static int
descriptor_converter(PyObject *arg, void *fd)
{
    *(int *)fd = descriptor_arg(arg);
    return *(int *)fd >= 0;
}

/* --- Reader: one socket's read, callable with no arguments ----------------- */

/* What the UDP transport registers as a socket's direct read (see the module
   comment): ``do_read`` of the socket with the handler and the listener
   looked up on ``owner`` (the shell) per call.  It holds ``io``, the IO it
   reads for, and the objects among io.reader's arguments. */
#define READER_REFS(X) X(io) X(owner) X(entry) X(port) X(family) X(refused)

typedef struct {
    PyObject_HEAD
    READER_REFS(DECLARE_REF)
    int fd;
    int always_view;
    vectorcallfunc vectorcall;
} ReaderObject;

static PyObject *
Reader_vectorcall(ReaderObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 0 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "a Reader takes no arguments");
        return NULL;
    }
    if (self->io == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a cleared Reader");
        return NULL;
    }
    PyObject *handler = PyObject_GetAttr(self->owner, self->entry);
    if (handler == NULL)
        return NULL;
    PyObject *listener = PyObject_GetAttr(self->owner, str_read_listener);
    if (listener == NULL) {
        Py_DECREF(handler);
        return NULL;
    }
    PyObject *r = do_read((IOObject *)self->io, self->fd, handler, self->port, self->family, self->always_view,
                          self->refused, listener);
    Py_DECREF(handler);
    Py_DECREF(listener);
    return r;
}

GC_FUNCTIONS(Reader, READER_REFS)

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "firezone_relay.adapters._udpio.Reader",
    .tp_basicsize = sizeof(ReaderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "io.reader(...)(): one batched read of one socket (see IO.reader).",
    .tp_vectorcall_offset = offsetof(ReaderObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_dealloc = gc_dealloc,
    .tp_traverse = (traverseproc)Reader_traverse,
    .tp_clear = (inquiry)Reader_clear,
};

/* io.reader(fd, owner, entry, port, family, always_view, refused) -> Reader */
static PyObject *
IO_reader(IOObject *self, PyObject *args)
{
    int fd, always_view;
    PyObject *owner, *entry, *port, *family, *refused;
    if (!PyArg_ParseTuple(args, "O&OUOOpO:reader", descriptor_converter, &fd, &owner, &entry, &port, &family,
                          &always_view, &refused))
        return NULL;
    ReaderObject *r = PyObject_GC_New(ReaderObject, &ReaderType);
    if (r == NULL)
        return NULL;
    r->vectorcall = (vectorcallfunc)Reader_vectorcall;
    r->fd = fd;
    r->always_view = always_view;
    r->io = Py_NewRef((PyObject *)self);
    r->owner = Py_NewRef(owner);
    r->entry = Py_NewRef(entry);
    r->port = Py_NewRef(port);
    r->family = Py_NewRef(family);
    r->refused = Py_NewRef(refused);
    PyObject_GC_Track(r);
    return (PyObject *)r;
}

/* io.send(transmits): queue a list of Transmits as a read does with what the
   handler returns (the stream shell's ChannelData towards peers), then flush. */
static PyObject *
IO_send(IOObject *self, PyObject *transmits)
{
    if (!PyList_CheckExact(transmits)) {
        PyErr_SetString(PyExc_TypeError, "send(transmits): a list of Transmit tuples");
        return NULL;
    }
    int status = 0;
    /* The size is read on every turn: a fallback (Python) could change the list. */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(transmits) && status == 0; i++) {
        PyObject *t = PyList_GET_ITEM(transmits, i);
        Py_INCREF(t);
        status = transmit(self, t);
        Py_DECREF(t);
    }
    if (flush(self) < 0 && status == 0)
        status = -1;
    if (status < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int
IO_init(IOObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"now", "pump", "fds", "fallback", "send_failed", "internal_error", NULL};
    PyObject *now, *pump, *fds, *fallback, *send_failed, *internal_error;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO!OOO", kwlist, &now, &pump, &PyDict_Type, &fds, &fallback,
                                     &send_failed, &internal_error))
        return -1;
    IO_REFS(SET_REF) /* self->now = now, ... */
    return 0;
}

GC_FUNCTIONS(IO, IO_REFS)

static PyObject *
IO_stats(IOObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("{snsnsnsn}", "batches", self->batches, "datagrams", self->datagrams, "sent", self->sent,
                         "send_calls", self->send_calls);
}

/* --- poll: epoll_wait, the direct reads dispatched here ---------------------- */

/* _udpio.poll(epfd, timeout, maxevents, selectables, fast, failed[, reactor, end])
       -> int, or a list of (fd, event)

   One epoll_wait(epfd) (the reactor's epoll; ``timeout`` in seconds, < 0 to
   wait indefinitely, rounded up to milliseconds as select.epoll.poll does;
   the GIL is released while it waits; ``maxevents``: at most that many
   events).  Then, in the kernel's order, each event whose selectable
   (``selectables[fd]``; an fd not there is skipped) is of a type in the set
   ``fast``, whose event is EPOLLIN alone and whose ``direct_read`` is not
   None has direct_read() called here; an exception from it (except
   KeyboardInterrupt, which propagates) is passed to ``failed(selectable,
   exc)`` and the next event follows.  At the first event that is not such
   a one, the poll stops and returns it and all the events after it as a
   list of (fd, event) for the caller's own dispatch (adapters/dispatch.py),
   in order.  Otherwise it returns the number of events (0: none before the
   timeout, or a signal interrupted the wait; Python signal handlers have
   run then).

   With ``reactor`` (Twisted's EPollReactor) and ``end`` (the caller's
   deadline, reactor.seconds() time, or None), a poll whose every event was
   dispatched here is followed by the checks of dispatch.doPoll's loop, and
   by another poll while they pass: it returns 0 when the timeout is 0,
   when the reactor has a new timed call (``_newTimedCalls``), a call from a
   thread (``threadCallQueue``) or is stopping (``_justStopped``), or when
   ``end`` or the first pending timed call (``_pendingTimedCalls[0].time``)
   has come; else it waits again until the earlier of the two.  ``maxevents``
   is then the size of ``selectables`` at each poll.  This is dispatch.doPoll
   for the relay's sockets without a Python bytecode per event or per wake-up;
   it calls what that loop calls, in the same order. */

static struct epoll_event *poll_events = NULL;
static int poll_capacity = 0;
static int polling = 0;
static PyObject *str_direct_read, *str_new_timed, *str_thread_queue, *str_just_stopped, *str_pending_timed,
    *str_time, *str_seconds;

static int
timeout_ms_of(double seconds)
{
    if (seconds < 0)
        return -1;
    double ms = seconds * 1000.0;
    if (ms >= (double)INT_MAX)
        return INT_MAX;
    int timeout_ms = (int)ms;
    if ((double)timeout_ms < ms)
        timeout_ms++; /* rounded up, as select.epoll.poll does */
    return timeout_ms;
}

/* 1 if the attribute ``name`` of ``obj`` is true, 0 if not, -1 on error. */
static int
attr_true(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* *value from ``result``, a new reference that it drops (NULL: the call or
   the lookup that gave it failed): 0, or -1 with an exception set. */
static int
float_result(PyObject *result, double *value)
{
    if (result == NULL)
        return -1;
    *value = PyFloat_AsDouble(result);
    Py_DECREF(result);
    return *value == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* doPoll's checks after a poll whose events all went to direct reads: 1 and
   *timeout_ms set to poll again, 0 to return, -1 on error. */
static int
poll_again(PyObject *reactor, double end, int *timeout_ms)
{
    if (*timeout_ms == 0)
        return 0;
    int r;
    if ((r = attr_true(reactor, str_new_timed)) != 0 || (r = attr_true(reactor, str_thread_queue)) != 0 ||
        (r = attr_true(reactor, str_just_stopped)) != 0)
        return r < 0 ? -1 : 0;
    double now;
    if (float_result(PyObject_CallMethodNoArgs(reactor, str_seconds), &now) < 0)
        return -1;
    int bounded = end >= 0;
    double remaining = bounded ? end - now : 0;
    PyObject *pending = PyObject_GetAttr(reactor, str_pending_timed);
    if (pending == NULL)
        return -1;
    if (PyList_Check(pending) && PyList_GET_SIZE(pending) > 0) {
        double due;
        if (float_result(PyObject_GetAttr(PyList_GET_ITEM(pending, 0), str_time), &due) < 0) {
            Py_DECREF(pending);
            return -1;
        }
        due -= now;
        if (!bounded || due < remaining) {
            remaining = due;
            bounded = 1;
        }
    } else if (!PyList_Check(pending)) {
        Py_DECREF(pending);
        PyErr_SetString(PyExc_TypeError, "poll: reactor._pendingTimedCalls is not a list");
        return -1;
    }
    Py_DECREF(pending);
    if (!bounded) {
        *timeout_ms = -1;
        return 1;
    }
    if (remaining <= 0)
        return 0;
    *timeout_ms = timeout_ms_of(remaining);
    return 1;
}

static PyObject *
udpio_poll(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 && nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "poll(epfd, timeout, maxevents, selectables, fast, failed[, reactor, end])");
        return NULL;
    }
    int epfd = descriptor_arg(args[0]);
    if (epfd < 0)
        return NULL;
    double seconds = PyFloat_AsDouble(args[1]);
    if (seconds == -1.0 && PyErr_Occurred())
        return NULL;
    long maxevents = PyLong_AsLong(args[2]);
    if (maxevents == -1 && PyErr_Occurred())
        return NULL;
    PyObject *selectables = args[3], *fast = args[4], *failed = args[5];
    PyObject *reactor = nargs == 8 && args[6] != Py_None ? args[6] : NULL;
    double end = -1.0;
    if (reactor != NULL && args[7] != Py_None) {
        end = PyFloat_AsDouble(args[7]);
        if (end == -1.0 && PyErr_Occurred())
            return NULL;
        if (end < 0)
            end = 0;
    }
    if (!PyDict_Check(selectables) || !PyAnySet_Check(fast)) {
        PyErr_SetString(PyExc_TypeError, "poll: selectables must be a dict and fast a set");
        return NULL;
    }
    if (polling) {
        PyErr_SetString(PyExc_RuntimeError, "_udpio.poll is not reentrant");
        return NULL;
    }
    int timeout_ms = timeout_ms_of(seconds);
    polling = 1;
    PyObject *result = NULL;
    for (;;) {
        if (maxevents < 1 || maxevents > INT_MAX / (int)sizeof(struct epoll_event)) {
            PyErr_Format(PyExc_ValueError, "maxevents must be greater than 0, got %ld", maxevents);
            goto done;
        }
        if (maxevents > poll_capacity) {
            struct epoll_event *grown = PyMem_RawRealloc(poll_events, (size_t)maxevents * sizeof(struct epoll_event));
            if (grown == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            poll_events = grown;
            poll_capacity = (int)maxevents;
        }
        int n;
        Py_BEGIN_ALLOW_THREADS
        n = epoll_wait(epfd, poll_events, (int)maxevents, timeout_ms);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() == 0)
                    result = PyLong_FromLong(0);
                goto done;
            }
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        int i = 0;
        for (; i < n; i++) {
            uint32_t event = poll_events[i].events;
            PyObject *key = PyLong_FromLong((long)poll_events[i].data.fd);
            if (key == NULL)
                goto done;
            PyObject *selectable = PyDict_GetItemWithError(selectables, key);
            Py_DECREF(key);
            if (selectable == NULL) {
                if (PyErr_Occurred())
                    goto done;
                continue;
            }
            if (event != EPOLLIN)
                break;
            int is_fast = PySet_Contains(fast, (PyObject *)Py_TYPE(selectable));
            if (is_fast < 0)
                goto done;
            if (!is_fast)
                break;
            Py_INCREF(selectable); /* the read may drop it from the dict */
            PyObject *direct = PyObject_GetAttr(selectable, str_direct_read);
            if (direct == NULL) {
                Py_DECREF(selectable);
                goto done;
            }
            if (direct == Py_None) {
                Py_DECREF(direct);
                Py_DECREF(selectable);
                break;
            }
            int read_failed = drop_result(PyObject_CallNoArgs(direct));
            Py_DECREF(direct);
            /* as dispatch's loop: all but KeyboardInterrupt go to failed */
            if (read_failed < 0 && hand_over(failed, selectable, PyExc_BaseException, PyExc_KeyboardInterrupt) < 0) {
                Py_DECREF(selectable);
                goto done;
            }
            Py_DECREF(selectable);
        }
        if (i < n) {
            /* The rest, from the first event not dispatched here. */
            result = PyList_New(n - i);
            if (result == NULL)
                goto done;
            for (int k = i; k < n; k++) {
                PyObject *pair = Py_BuildValue("(iI)", poll_events[k].data.fd, (unsigned int)poll_events[k].events);
                if (pair == NULL) {
                    Py_CLEAR(result);
                    goto done;
                }
                PyList_SET_ITEM(result, k - i, pair);
            }
            goto done;
        }
        if (reactor == NULL || n == 0) {
            result = PyLong_FromLong(n);
            goto done;
        }
        int again = poll_again(reactor, end, &timeout_ms);
        if (again <= 0) {
            if (again == 0)
                result = PyLong_FromLong(0);
            goto done;
        }
        maxevents = (long)PyDict_Size(selectables);
    }
done:
    polling = 0;
    return result;
}

static PyMethodDef module_methods[] = {
    {"poll", (PyCFunction)(void (*)(void))udpio_poll, METH_FASTCALL,
     "poll(epfd, timeout, maxevents, selectables, fast, failed[, reactor, end]) -> number of events, or the "
     "list of (fd, event) left for the caller (see the C source)"},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef IO_methods[] = {
    {"reader", (PyCFunction)IO_reader, METH_VARARGS,
     "reader(fd, owner, entry, port, family, always_view, refused) -> a callable that reads the socket fd "
     "and calls getattr(owner, entry) per datagram (see the C source)"},
    {"send", (PyCFunction)IO_send, METH_O,
     "send(transmits) -> None: queue each Transmit of the list (or pass it to the fallback), then sendmmsg"},
    {"stats", (PyCFunction)IO_stats, METH_NOARGS, "counters: batches, datagrams, sent, send_calls"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject IOType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "firezone_relay.adapters._udpio.IO",
    .tp_basicsize = sizeof(IOObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Batched UDP reads and sends for one relay shell (see the module docstring).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)IO_init,
    .tp_dealloc = gc_dealloc,
    .tp_traverse = (traverseproc)IO_traverse,
    .tp_clear = (inquiry)IO_clear,
    .tp_methods = IO_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "firezone_relay.adapters._udpio",
    .m_doc = "Batched UDP I/O (recvmmsg/sendmmsg) for the relay's per-packet path.",
    .m_size = -1,
    .m_methods = module_methods,
};

/* The str_* strings, interned when the module is made. */
static const struct {
    PyObject **str;
    const char *text;
} interned[] = {
    {&str_client, "client"},
    {&str_peer, "peer"},
    {&str_send, "send"},
    {&str_pump, "pump"},
    {&str_begin_read, "begin_read"},
    {&str_end_read, "end_read"},
    {&str_read_listener, "read_listener"},
    {&str_direct_read, "direct_read"},
    {&str_new_timed, "_newTimedCalls"},
    {&str_thread_queue, "threadCallQueue"},
    {&str_just_stopped, "_justStopped"},
    {&str_pending_timed, "_pendingTimedCalls"},
    {&str_time, "time"},
    {&str_seconds, "seconds"},
};

PyMODINIT_FUNC
PyInit__udpio(void)
{
    if (PyType_Ready(&IOType) < 0 || PyType_Ready(&ReaderType) < 0)
        return NULL;
    for (size_t i = 0; i < sizeof(interned) / sizeof(interned[0]); i++) {
        *interned[i].str = PyUnicode_InternFromString(interned[i].text);
        if (*interned[i].str == NULL)
            return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&IOType);
    if (PyModule_AddObject(m, "IO", (PyObject *)&IOType) < 0) {
        Py_DECREF(&IOType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "BATCH", BATCH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
