/*
 * layerfs._cfuse: the FUSE request path in C, on the kernel's low-level (inode-based) protocol.
 *
 * It speaks /dev/fuse directly rather than through libfuse: Debian bookworm's libfuse (3.14)
 * predates FUSE passthrough (3.16), and the protocol needs no library to negotiate INIT flags,
 * answer READDIRPLUS or send invalidation notices.  The kernel ABI is <linux/fuse.h>; what our
 * build headers may lack is defined below.
 *
 * What lives here: the dispatch loop, the inode table (one kernel inode per object: the view's
 * inode number is the node id, so hardlink names share a node; lookup counts and FORGET honoured),
 * a dentry table (parent, name) -> node that gives every node a path for the path-based union
 * view, READDIRPLUS (a directory's listing and attributes in one request), and reads and writes of
 * upper-directory files on their host descriptors without the GIL.  The union rules (lookup order,
 * whiteouts, copy-up) stay in Python: the ops object (layerfs/fuse/lowlevel.py) is called with
 * paths and returns attribute tuples.
 *
 * Threading: one thread serves the device; the GIL is held only while Python is called.
 * All bytes from the kernel are checked against the request length before use.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fuse.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/xattr.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include "filecache.h"
#include "fusestore.h"

#ifndef FUSE_MAX_PAGES
#define FUSE_MAX_PAGES (1 << 22)
#endif
#ifndef FUSE_CACHE_SYMLINKS
#define FUSE_CACHE_SYMLINKS (1 << 23)
#endif

#define OP_TMPFILE 51 /* FUSE_TMPFILE (protocol 7.37), newer than some build headers */

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

/* FUSE passthrough (kernel 6.9, protocol 7.40), newer than the build's <linux/fuse.h> may be */
#define PT_INIT_EXT (1u << 30)
#define PT_FLAG2 (1u << 5) /* FUSE_PASSTHROUGH >> 32 */
#define PT_FOPEN (1u << 7) /* FOPEN_PASSTHROUGH */
#define NO_EXPORT_FLAG2 (1u << 6) /* FUSE_NO_EXPORT_SUPPORT >> 32 (kernel 6.10, protocol 7.40) */
struct pt_backing_map {
    int32_t fd;
    uint32_t flags;
    uint64_t padding;
};
#define PT_BACKING_OPEN _IOW(229, 1, struct pt_backing_map)
#define PT_BACKING_CLOSE _IOW(229, 2, uint32_t)

#define ROOT_ID 1
#define MAX_WRITE (1u << 20)          /* 1 MiB requests: a quarter of the round trips of 128 KiB */
#define BUF_SIZE (MAX_WRITE + 65536)  /* the kernel wants room for the headers as well */
#define ATTR_TUPLE_LEN 11
#define CAPS_XATTR "security.capability"

/* ---- the inode and dentry tables ------------------------------------------------------- */

struct node;

struct dentry {                 /* one name of a node: (parent node id, name) */
    struct dentry *hnext;       /* the dentry hash chain */
    struct dentry *nnext;       /* the node's other names */
    struct node *node;
    uint64_t parent;
    uint32_t hash;
    uint32_t len;
    char name[];
};

/* (Packed: a walk of 100k entries keeps 100k of them, and the daemon stays under 50 MB.) */
struct node {
    struct node *hnext;
    struct dentry *names;
    uint64_t id;
    uint64_t nlookup;           /* the kernel's references (LOOKUP, READDIRPLUS, CREATE, ...) */
    /* layerfs-overlay (lower layers that are host directories): the layers a `lower` node's
     * entries come from, bit i the i-th lowerdir from the top: its own for a file, every one
     * whose directory merges into it for a directory (Stack._layers_of_dir) */
    uint64_t layers;
    /* an O_TMPFILE file without a name yet: its handle, through which a LINK names it */
    struct handle *anon;
    /* an upper directory's union state as Python last told it (union_dir), valid while dir_gen
     * is the session's union_gen: DIR_UPPER (only the upper directory's names count in it) or
     * DIR_MERGED (and the lower directory dir_lower's, unless whited out); else DIR_PYTHON */
    uint64_t dir_gen;
    uint64_t dir_lower;
    struct fuse_attr attr;      /* the last attributes sent: what is left once every name is gone */
    uint32_t children;          /* dentries naming this node as parent: it must outlive them */
    uint32_t opens;             /* open handles: an unlinked open file keeps its node */
    uint32_t cached_opens;      /* opens through the page cache: the kernel refuses passthrough then */
    /* passthrough: the kernel takes one backing file per inode at a time (a second one is
     * EBUSY), so every passthrough open of a node shares the first one's backing */
    uint32_t pt_opens;
    /* passthrough opens for reading and writing: a shared writable mapping changes the host
     * file (and its times) with no request, so its attributes are not cached meanwhile */
    uint32_t pt_rdwr;
    int backing_id;
    unsigned char backing_mode; /* O_RDONLY, O_WRONLY or O_RDWR */
    unsigned char dir_state;
    unsigned backing_copy : 1;  /* the backing is a file cache copy (else an upper file) */
    unsigned has_attr : 1;
    /* known to have no security.capability: the kernel asks before every write (to drop it),
     * a round trip into Python each time; only SETXATTR/REMOVEXATTR through us can add one */
    unsigned no_caps : 1;
    /* the upper directory has nothing at this node's path (a directory: nothing below it
     * either), so the node and all below it are the lower layers' as they are: served from
     * them without Python (rw_fast; a stored image's: its id is the index's inode) until a
     * change through the mount clears it */
    unsigned lower : 1;
    unsigned dir_plain : 1; /* ... and neither setgid nor with a default ACL: upper_create may make files */
    unsigned pushed : 1;    /* its contents were stored into the kernel's page cache (push_lower) */
};

enum { DIR_PYTHON, DIR_UPPER, DIR_MERGED };

struct table {
    struct node **nodes;
    size_t nnodes, nodecap;
    struct dentry **dentries;
    size_t ndentries, dentcap;
};

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

static uint32_t name_hash(uint64_t parent, const char *name, size_t len)
{
    uint64_t h = mix64(parent) ^ 1469598103934665603ULL;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)name[i]) * 1099511628211ULL;
    return (uint32_t)(h ^ (h >> 32));
}

static int table_init(struct table *t)
{
    t->nodecap = 1024;
    t->dentcap = 1024;
    t->nodes = calloc(t->nodecap, sizeof(*t->nodes));
    t->dentries = calloc(t->dentcap, sizeof(*t->dentries));
    t->nnodes = t->ndentries = 0;
    return t->nodes && t->dentries ? 0 : -1;
}

static struct node *node_get(struct table *t, uint64_t id)
{
    for (struct node *n = t->nodes[mix64(id) & (t->nodecap - 1)]; n; n = n->hnext)
        if (n->id == id)
            return n;
    return NULL;
}

static void node_rehash(struct table *t)
{
    size_t cap = t->nodecap * 2;
    struct node **nn = calloc(cap, sizeof(*nn));
    if (!nn)
        return; /* keep the old (longer) chains */
    for (size_t i = 0; i < t->nodecap; i++) {
        struct node *n = t->nodes[i];
        while (n) {
            struct node *next = n->hnext;
            size_t b = mix64(n->id) & (cap - 1);
            n->hnext = nn[b];
            nn[b] = n;
            n = next;
        }
    }
    free(t->nodes);
    t->nodes = nn;
    t->nodecap = cap;
}

static struct node *node_make(struct table *t, uint64_t id)
{
    struct node *n = node_get(t, id);
    if (n)
        return n;
    n = calloc(1, sizeof(*n));
    if (!n)
        return NULL;
    n->id = id;
    if (t->nnodes + 1 > t->nodecap)
        node_rehash(t);
    size_t b = mix64(id) & (t->nodecap - 1);
    n->hnext = t->nodes[b];
    t->nodes[b] = n;
    t->nnodes++;
    return n;
}

static struct dentry *dentry_get(struct table *t, uint64_t parent, const char *name, size_t len)
{
    uint32_t h = name_hash(parent, name, len);
    for (struct dentry *d = t->dentries[h & (t->dentcap - 1)]; d; d = d->hnext)
        if (d->hash == h && d->parent == parent && d->len == len && memcmp(d->name, name, len) == 0)
            return d;
    return NULL;
}

static void dentry_rehash(struct table *t)
{
    size_t cap = t->dentcap * 2;
    struct dentry **nd = calloc(cap, sizeof(*nd));
    if (!nd)
        return;
    for (size_t i = 0; i < t->dentcap; i++) {
        struct dentry *d = t->dentries[i];
        while (d) {
            struct dentry *next = d->hnext;
            d->hnext = nd[d->hash & (cap - 1)];
            nd[d->hash & (cap - 1)] = d;
            d = next;
        }
    }
    free(t->dentries);
    t->dentries = nd;
    t->dentcap = cap;
}

static void node_maybe_free(struct table *t, struct node *n);

static void dentry_unhash(struct table *t, struct dentry *d)
{
    struct dentry **p = &t->dentries[d->hash & (t->dentcap - 1)];
    while (*p && *p != d)
        p = &(*p)->hnext;
    if (*p)
        *p = d->hnext;
    struct dentry **q = &d->node->names;
    while (*q && *q != d)
        q = &(*q)->nnext;
    if (*q)
        *q = d->nnext;
    t->ndentries--;
}

/* Forget one name; frees the node (and, in turn, its parent) once nothing refers to it. */
static void dentry_drop(struct table *t, struct dentry *d)
{
    struct node *node = d->node;
    struct node *parent = node_get(t, d->parent);
    dentry_unhash(t, d);
    free(d);
    if (parent) {
        parent->children--;
        node_maybe_free(t, parent);
    }
    node_maybe_free(t, node);
}

static void node_maybe_free(struct table *t, struct node *n)
{
    /* iterative: a chain of parents freed one after another must not recurse per level */
    while (n && n->id != ROOT_ID && n->nlookup == 0 && n->children == 0 && n->opens == 0) {
        struct node *parent = NULL;
        while (n->names) {
            struct dentry *d = n->names;
            struct node *p = node_get(t, d->parent);
            dentry_unhash(t, d);
            free(d);
            if (p) {
                p->children--;
                parent = p; /* a node rarely has two parents (hardlinks); the rest wait */
                if (n->names)
                    node_maybe_free(t, p);
            }
        }
        struct node **pp = &t->nodes[mix64(n->id) & (t->nodecap - 1)];
        while (*pp && *pp != n)
            pp = &(*pp)->hnext;
        if (*pp)
            *pp = n->hnext;
        t->nnodes--;
        free(n);
        n = parent;
    }
}

/* Record that (parent, name) names node: moves the name from whatever node had it before. */
static int dentry_set(struct table *t, uint64_t parent, const char *name, size_t len, struct node *node)
{
    struct dentry *d = dentry_get(t, parent, name, len);
    if (d) {
        if (d->node == node)
            return 0;
        dentry_drop(t, d);
    }
    struct node *p = node_get(t, parent);
    if (!p)
        return -1;
    d = malloc(sizeof(*d) + len + 1);
    if (!d)
        return -1;
    d->parent = parent;
    d->len = (uint32_t)len;
    memcpy(d->name, name, len);
    d->name[len] = 0;
    d->hash = name_hash(parent, name, len);
    d->node = node;
    if (t->ndentries + 1 > t->dentcap)
        dentry_rehash(t);
    d->hnext = t->dentries[d->hash & (t->dentcap - 1)];
    t->dentries[d->hash & (t->dentcap - 1)] = d;
    d->nnext = node->names;
    node->names = d;
    t->ndentries++;
    p->children++;
    return 0;
}

static void dentry_forget(struct table *t, uint64_t parent, const char *name, size_t len)
{
    struct dentry *d = dentry_get(t, parent, name, len);
    if (d)
        dentry_drop(t, d);
}

/* The path of a node relative to the root ("" for the root), built leaf first into a growing
 * buffer and reversed: no recursion, whatever the depth.  Returns a new bytes object, or NULL
 * with errno ESTALE when the node has no name left. */
struct pathbuf {
    char *p;
    size_t len, cap;
};

static int pb_reserve(struct pathbuf *b, size_t more)
{
    if (b->len + more <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int node_path(struct table *t, uint64_t id, struct pathbuf *out)
{
    /* segments are collected leaf first, each stored reversed, then the whole is reversed */
    out->len = 0;
    size_t guard = 0;
    while (id != ROOT_ID) {
        struct node *n = node_get(t, id);
        if (!n || !n->names || ++guard > (1u << 24))
            return -ESTALE;
        struct dentry *d = n->names;
        if (pb_reserve(out, d->len + 1))
            return -ENOMEM;
        if (out->len)
            out->p[out->len++] = '/';
        for (size_t i = 0; i < d->len; i++)
            out->p[out->len++] = d->name[d->len - 1 - i];
        id = d->parent;
    }
    for (size_t i = 0, j = out->len ? out->len - 1 : 0; i < j; i++, j--) {
        char c = out->p[i];
        out->p[i] = out->p[j];
        out->p[j] = c;
    }
    return 0;
}

/* ---- handles ------------------------------------------------------------------------------ */

/* A lower directory's merged listing (layerfs-overlay), as Stack.readdir gives it: every name
 * once, in the order of first appearance from the top layer down, without whiteouts and the
 * names they hide.  `layer`: where the name was found (the layers above have nothing of it). */
struct stack_item {
    uint64_t ino;
    uint32_t mode;
    uint32_t len;
    size_t name; /* where in `names` */
    int layer;
    int hidden; /* (while listing) a whiteout's name: not shown, and hides the layers below */
};

struct stack_listing {
    struct stack_item *items;
    size_t n, cap;
    struct pathbuf names; /* the names one after another */
    uint32_t *slots; /* (while listing) the names so far: item index + 1, open addressing */
    size_t nslots;
};

static void stack_listing_free(struct stack_listing *l)
{
    if (!l)
        return;
    free(l->items);
    free(l->names.p);
    free(l->slots);
    free(l);
}

struct handle {
    PyObject *pyfh;             /* the ops object's handle (None for C-only handles) */
    int fd;                     /* a host descriptor read and written here, or -1 */
    int passthrough;            /* the kernel reads and writes its node's backing (counted) */
    int counted_rdwr;           /* ... opened O_RDWR: counted in its node's pt_rdwr */
    int owns_fd;                /* fd is ours to close (a file cache copy), not the view's */
    /* fd is a lower file's copy in the file cache: a backing for readers only, which a writer
     * (of the copied-up file, the same node) must never share: it waits for them (copy_busy) */
    int lower_copy;
    /* fd is a lower layer's own file (layerfs-overlay): never a backing, since a writer of the
     * node (the file once copied up) could not wait as for a copy: readers and writers share
     * the kernel's page cache instead, and both see the copy-up's writes */
    int lower_file;
    /* ... and the node, copied up since, is read from its copy: this descriptor (follow_copy_up) */
    int followed, followed_fd;
    int want_copy;              /* at RELEASE, have the file cache fill copy_id */
    unsigned char copy_id[32];
    uint64_t copy_size;
    int counted_cached;         /* counted in its node's cached_opens */
    uint64_t lower_ino;         /* > 0: a lower file read from the store (the index's inode) */
    uint64_t node;
    /* made by upper_create: fd is ours to close until the ops adopt it (adopt_pending: queued
     * in the session's adopt list, adopted before the next call into Python) */
    int c_fd;
    int adopt_pending;
    int fd_rdwr; /* fd is open for reading and writing whatever the open asked (a backing to share) */
    /* directories: the listing taken at the first READDIR, served by offset after that */
    PyObject *listing;
    struct stack_listing *stack; /* ... or, a lower directory of layerfs-overlay, C's own */
    /* directories read from the store: where the last reply stopped, to resume there */
    int from_store;             /* this listing comes from the store (rw_fast) */
    int from_upper;             /* ... from an upper directory whose names are its own (upper_readdir) */
    int relist;                 /* ... came: Python lists the directory afresh */
    uint64_t last_off;
    size_t last_len;
    char last_name[256];
};

/* ---- the session ------------------------------------------------------------------------------ */

/* A thread serving the device: its own buffer (request, then reply area) and store reader. */
struct worker {
    struct Session *s;
    char *buf;
    struct fs_store *store;
    pthread_t thread;
    int started;
};

/* Writable mounts of a stored image: a second thread serves a large READ of a lower file from
 * the store while the serving thread goes on to the next request.  A sequential reader has the
 * kernel's next read-ahead READ in flight while it waits on this one, so zstd runs on two CPUs,
 * as a read-only mount's threads run it. */
struct reader {
    pthread_t thread;
    int started, stop, busy;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t unique, ino; /* the READ handed over, while busy */
    struct fuse_read_in in;
    struct fs_store *st; /* its own snapshot and decompression context */
    char *buf;
};

#define MAX_LAYERS 63 /* a bit per layer in struct node's `layers`, which Python sends as an int64 */
#define DIR_SLOTS 32 /* upper directories the C create and copy-up paths keep open */

typedef struct Session {
    PyObject_HEAD
    int fd;
    PyObject *ops;
    int writable;
    int debug;
    double entry_timeout, attr_timeout, negative_timeout;
    struct table t;
    struct pathbuf pb, pb2;
    char *buf;
    int passthrough;            /* the kernel took FUSE_PASSTHROUGH at INIT */
    int setxattr_ext;           /* ... and FUSE_SETXATTR_EXT: SETXATTR carries setxattr_flags */
    int try_passthrough;        /* offer it (writable mounts of a privileged daemon) */
    char label[256];            /* the image, for messages */
    uint64_t generation;
    uint64_t requests;
    uint64_t fast_requests;
    struct fs_store *store;     /* read-only mounts of a stored image: served from it in C */
    struct fs_store *lower_reader; /* writable mounts of one: lower files read from it in C */
    struct fc *cache;           /* ... or from their decompressed copies (ext/filecache.h) */
    struct fs_store *fill_reader; /* the file cache's thread reads the store through this one */
    struct reader *reader;      /* ... and large READs of lower files go to this thread */
    struct fuse_statfs_out statfs;
    /* more threads serve a read-only mount from the store (none of them calls Python); they
     * read under pin_lock, which renewing the Python-held pinning transaction takes for writing */
    struct worker *workers;
    int nworkers;
    pthread_rwlock_t pin_lock;
    long long last_pin_ns;
    /* writable mounts of a stored image: new files made in upper directories without Python
     * (upper_create).  upper_fd is the upper directory (O_PATH), upper_ino what the view adds
     * to a host inode number to number an upper object; union_gen is bumped by every change
     * that may hide or show lower names (a node's dir_state holds while it is unchanged). */
    int upper_fd;
    int work_fd;                /* the work directory (O_PATH): copies are made there, then renamed */
    uint64_t copies;            /* ... named copyup-<pid>-c<n> (the view's are copyup-<pid>-<n>) */
    uint64_t upper_ino;
    uint64_t union_gen;
    /* what Python learns before its next call: handles to adopt, host inodes made here */
    struct handle **adopt;
    size_t nadopt, adoptcap;
    uint64_t *made; /* (host inode, number) pairs */
    size_t nmade, madecap;
    /* upper directories kept open, by node id modulo DIR_SLOTS, while union_gen stays */
    struct dir_slot {
        uint64_t id, gen;
        int fd;
    } dirs[DIR_SLOTS];
    /* the last name upper_lookup found free: the CREATE that mostly follows need not look
     * again unless something changed meanwhile (change_seq) */
    uint64_t change_seq, free_parent, free_seq;
    size_t free_len;
    char free_name[256];
    /* layerfs-overlay's lower layers (host directories, O_PATH), topmost first: `lower` nodes
     * are answered from them without Python (the stack_* functions) */
    int nlayers;
    int layer_fd[MAX_LAYERS];
    /* large READs of host files go through this pipe (reply_splice); pipe[0] -1: not made yet,
     * -2: not available.  The serving thread's alone: a stored image's extra threads read no
     * host file. */
    int pipe[2];
    size_t pipe_cap;
} Session;

/* A reply of `len` bytes in iov[1..1+n) (iov[0] is for the header), or of error `error`. */
static void reply_iov(Session *s, uint64_t unique, int error, struct iovec *iov, int n, size_t len)
{
    struct fuse_out_header h = {(uint32_t)(sizeof(h) + (error ? 0 : len)), error, unique};
    iov[0].iov_base = &h;
    iov[0].iov_len = sizeof(h);
    /* ENOENT: the request was interrupted and the kernel no longer waits for it */
    if (writev(s->fd, iov, error ? 1 : n + 1) < 0 && errno != ENOENT && s->debug)
        fprintf(stderr, "layerfs: reply to %llu failed: %s\n", (unsigned long long)unique, strerror(errno));
}

static int reply(Session *s, uint64_t unique, int error, const void *data, size_t len)
{
    struct iovec iov[2] = {{NULL, 0}, {(void *)data, len}};
    reply_iov(s, unique, error, iov, len ? 1 : 0, len);
    return 0;
}

static int reply_err(Session *s, uint64_t unique, int err)
{
    return reply(s, unique, -err, NULL, 0);
}

static void split_timeout(double t, uint64_t *sec, uint32_t *nsec)
{
    if (t < 0)
        t = 0;
    *sec = (uint64_t)t;
    *nsec = (uint32_t)((t - (double)*sec) * 1e9);
}

/* The errno of the pending Python exception (cleared): OSError's errno, else EIO after
 * printing the traceback to the daemon's log. */
static int py_errno(void)
{
    PyObject *type, *value, *tb;
    int err = EIO;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value && PyErr_GivenExceptionMatches(type, PyExc_OSError)) {
        PyObject *e = PyObject_GetAttrString(value, "errno");
        if (e && PyLong_Check(e)) {
            long v = PyLong_AsLong(e);
            if (v > 0 && v < 4096)
                err = (int)v;
        }
        Py_XDECREF(e);
        PyErr_Clear();
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return err;
    }
    PyErr_Restore(type, value, tb);
    PyErr_Print();
    return EIO;
}

/* (ino, mode, nlink, uid, gid, rdev, size, blocks, atime_ns, mtime_ns, ctime_ns[, lower]):
 * a 12th item, not 0, marks a node of the lower layers alone (struct node's `lower`): 1 for a
 * stored image, the node's `layers` for layerfs-overlay's. */
/* Nanoseconds since the epoch as seconds and nanoseconds, floored (before 1970 too). */
static void split_ns(long long t, int64_t *sec, uint32_t *nsec)
{
    long long s_ = t / 1000000000LL, ns = t % 1000000000LL;
    if (ns < 0) {
        ns += 1000000000LL;
        s_ -= 1;
    }
    *sec = s_;
    *nsec = (uint32_t)ns;
}

/* A time in nanoseconds (a Python int) as seconds and nanoseconds.  Past 2262 the nanoseconds
 * no longer fit 64 bits (ext4 keeps times up to 2446, and a file can carry one): split in
 * Python then. */
static int time_from_ns(PyObject *o, int64_t *sec, uint32_t *nsec)
{
    int overflow;
    long long ns = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (!overflow) {
        if (ns == -1 && PyErr_Occurred())
            return -1;
        split_ns(ns, sec, nsec);
        return 0;
    }
    PyObject *billion = PyLong_FromLong(1000000000L), *qr = billion ? PyNumber_Divmod(o, billion) : NULL;
    Py_XDECREF(billion);
    if (!qr)
        return -1;
    long long q = PyLong_AsLongLong(PyTuple_GET_ITEM(qr, 0));
    long r = PyLong_AsLong(PyTuple_GET_ITEM(qr, 1));
    Py_DECREF(qr);
    if (PyErr_Occurred())
        return -1;
    *sec = q;
    *nsec = (uint32_t)r;
    return 0;
}

/* Seconds and nanoseconds as nanoseconds, a Python int (of any size: see time_from_ns). */
static PyObject *ns_from_time(uint64_t sec, uint32_t nsec)
{
    if ((int64_t)sec >= 0 && sec < (uint64_t)(LLONG_MAX / 1000000000LL) - 1)
        return PyLong_FromLongLong((long long)sec * 1000000000LL + nsec);
    PyObject *s_ = PyLong_FromLongLong((long long)sec), *billion = PyLong_FromLong(1000000000L), *n = NULL;
    PyObject *scaled = s_ && billion ? PyNumber_Multiply(s_, billion) : NULL;
    PyObject *frac = scaled ? PyLong_FromUnsignedLong(nsec) : NULL;
    if (frac)
        n = PyNumber_Add(scaled, frac);
    Py_XDECREF(s_);
    Py_XDECREF(billion);
    Py_XDECREF(scaled);
    Py_XDECREF(frac);
    return n;
}

static int attr_from_tuple(PyObject *tup, struct fuse_attr *a, uint64_t *lower)
{
    if (!PyTuple_Check(tup) || PyTuple_GET_SIZE(tup) < ATTR_TUPLE_LEN) {
        PyErr_SetString(PyExc_TypeError, "attributes must be an 11-tuple");
        return -1;
    }
    unsigned long long v[ATTR_TUPLE_LEN];
    int64_t secs[3];
    uint32_t nsecs[3];
    for (int i = 0; i < ATTR_TUPLE_LEN; i++) {
        PyObject *o = PyTuple_GET_ITEM(tup, i);
        if (i >= 8) {
            if (time_from_ns(o, &secs[i - 8], &nsecs[i - 8]) < 0)
                return -1;
            continue;
        }
        v[i] = PyLong_AsUnsignedLongLongMask(o);
        if (PyErr_Occurred())
            return -1;
    }
    if (lower) {
        *lower = 0;
        if (PyTuple_GET_SIZE(tup) > ATTR_TUPLE_LEN) {
            *lower = PyLong_AsUnsignedLongLongMask(PyTuple_GET_ITEM(tup, ATTR_TUPLE_LEN));
            if (PyErr_Occurred())
                return -1;
        }
    }
    memset(a, 0, sizeof(*a));
    a->ino = v[0];
    a->mode = (uint32_t)v[1];
    a->nlink = (uint32_t)v[2];
    a->uid = (uint32_t)v[3];
    a->gid = (uint32_t)v[4];
    a->rdev = (uint32_t)v[5];
    a->size = v[6];
    a->blocks = v[7];
    a->blksize = 4096;
    a->atime = (uint64_t)secs[0];
    a->mtime = (uint64_t)secs[1];
    a->ctime = (uint64_t)secs[2];
    a->atimensec = nsecs[0];
    a->mtimensec = nsecs[1];
    a->ctimensec = nsecs[2];
    return 0;
}

/* How long the kernel may keep a node's attributes: the mount's timeout, but not at all while a
 * passthrough O_RDWR open may have a shared mapping, whose writes change the host file's times
 * with no request (the kernel overlay's stat reads the host inode each time). */
static double attr_timeout_of(Session *s, uint64_t id)
{
    if (s->passthrough) {
        struct node *n = node_get(&s->t, id);
        if (n && n->pt_rdwr)
            return 0;
    }
    return s->attr_timeout;
}

static void fill_entry(Session *s, struct fuse_entry_out *e, const struct fuse_attr *a)
{
    memset(e, 0, sizeof(*e));
    e->nodeid = a->ino;
    e->generation = s->generation;
    split_timeout(s->entry_timeout, &e->entry_valid, &e->entry_valid_nsec);
    split_timeout(attr_timeout_of(s, a->ino), &e->attr_valid, &e->attr_valid_nsec);
    e->attr = *a;
}

/* A node the kernel now holds one more reference to, named (parent, name); `lower` as the
 * struct's field (honoured where the store can answer). */
static int remember(Session *s, uint64_t parent, const char *name, size_t len, const struct fuse_attr *a,
                    uint64_t lower)
{
    struct node *n = node_make(&s->t, a->ino);
    if (!n)
        return -ENOMEM;
    if (dentry_set(&s->t, parent, name, len, n) < 0) {
        node_maybe_free(&s->t, n);
        return -ESTALE;
    }
    n->nlookup++;
    n->attr = *a;
    n->has_attr = 1;
    n->lower = lower && (s->lower_reader || s->nlayers);
    n->layers = lower;
    return 0;
}

/* A change through the mount may put something at the node's path in the upper directory:
 * the node and its ancestors (along the path Python is given: first names, as node_path) are
 * the image's alone no longer. */
static void unmark_lower(Session *s, uint64_t id)
{
    size_t guard = 0;
    for (struct node *n = node_get(&s->t, id); n && ++guard < (1u << 24);) {
        n->lower = 0;
        if (!n->names)
            break;
        n = node_get(&s->t, n->names->parent);
    }
}

/* ... and the node named (parent, name), which the change removes or replaces. */
static void unmark_child(Session *s, uint64_t parent, const char *name, size_t len)
{
    struct dentry *d = dentry_get(&s->t, parent, name, len);
    if (d)
        d->node->lower = 0;
    unmark_lower(s, parent);
}

/* A directory moved: the nodes below it now have other paths.  Rare enough to start over. */
static void unmark_all(Session *s)
{
    for (size_t i = 0; i < s->t.nodecap; i++)
        for (struct node *n = s->t.nodes[i]; n; n = n->hnext)
            n->lower = 0;
}

static PyObject *path_bytes(Session *s, uint64_t id, struct pathbuf *pb, int *err)
{
    int r = node_path(&s->t, id, pb);
    if (r < 0) {
        *err = -r;
        return NULL;
    }
    return PyBytes_FromStringAndSize(pb->p, (Py_ssize_t)pb->len);
}

static PyObject *child_path(Session *s, uint64_t parent, const char *name, size_t len, struct pathbuf *pb,
                            int *err)
{
    int r = node_path(&s->t, parent, pb);
    if (r < 0) {
        *err = -r;
        return NULL;
    }
    if (pb_reserve(pb, len + 1)) {
        *err = ENOMEM;
        return NULL;
    }
    if (pb->len)
        pb->p[pb->len++] = '/';
    memcpy(pb->p + pb->len, name, len);
    pb->len += len;
    return PyBytes_FromStringAndSize(pb->p, (Py_ssize_t)pb->len);
}

/* ---- request handlers (called with the GIL held) ----------------------------------------- */

/* The path of node `id` for a call into Python; NULL once the error is answered. */
static PyObject *path_or_reply(Session *s, uint64_t unique, uint64_t id)
{
    int err = 0;
    PyObject *path = path_bytes(s, id, &s->pb, &err);
    if (!path)
        reply_err(s, unique, err);
    return path;
}

static PyObject *child_or_reply(Session *s, uint64_t unique, uint64_t parent, const char *name, size_t len,
                                struct pathbuf *pb)
{
    int err = 0;
    PyObject *path = child_path(s, parent, name, len, pb, &err);
    if (!path)
        reply_err(s, unique, err);
    return path;
}

/* Reply with an entry for an attribute tuple the ops returned for (parent, name). */
static void reply_entry_from(Session *s, uint64_t unique, uint64_t parent, const char *name, size_t len,
                             PyObject *res)
{
    struct fuse_attr a;
    struct fuse_entry_out e;
    uint64_t lower;
    if (!res || attr_from_tuple(res, &a, &lower) < 0) {
        reply_err(s, unique, py_errno());
        return;
    }
    int r = remember(s, parent, name, len, &a, lower);
    if (r < 0) {
        reply_err(s, unique, -r);
        return;
    }
    fill_entry(s, &e, &a);
    reply(s, unique, 0, &e, sizeof(e));
}

static void do_lookup(Session *s, uint64_t unique, uint64_t parent, const char *name, size_t len)
{
    PyObject *path = child_or_reply(s, unique, parent, name, len, &s->pb);
    if (!path)
        return;
    PyObject *res = PyObject_CallMethod(s->ops, "lookup", "O", path);
    Py_DECREF(path);
    if (!res) {
        int err = py_errno();
        if (err == ENOENT) {
            /* a negative entry the kernel may cache: node id 0 with a timeout */
            struct fuse_entry_out e;
            memset(&e, 0, sizeof(e));
            split_timeout(s->negative_timeout, &e.entry_valid, &e.entry_valid_nsec);
            dentry_forget(&s->t, parent, name, len);
            reply(s, unique, 0, &e, sizeof(e));
            return;
        }
        reply_err(s, unique, err);
        return;
    }
    reply_entry_from(s, unique, parent, name, len, res);
    Py_DECREF(res);
}

static void forget_one(Session *s, uint64_t id, uint64_t count)
{
    struct node *n = node_get(&s->t, id);
    if (!n)
        return;
    n->nlookup = n->nlookup > count ? n->nlookup - count : 0;
    node_maybe_free(&s->t, n);
}

static void reply_attr(Session *s, uint64_t unique, uint64_t id, PyObject *res)
{
    struct fuse_attr_out o;
    uint64_t lower;
    memset(&o, 0, sizeof(o));
    if (!res || attr_from_tuple(res, &o.attr, &lower) < 0) {
        reply_err(s, unique, py_errno());
        return;
    }
    struct node *n = node_get(&s->t, id);
    if (n) {
        n->attr = o.attr;
        n->has_attr = 1;
        n->lower = lower && (s->lower_reader || s->nlayers);
        n->layers = lower;
    }
    split_timeout(attr_timeout_of(s, id), &o.attr_valid, &o.attr_valid_nsec);
    reply(s, unique, 0, &o, sizeof(o));
}

/* A node whose every name is gone (unlinked, or a directory renamed over) but which the kernel
 * still holds, open: as the kernel's own file systems, it is still there with no links. */
static int reply_orphan(Session *s, uint64_t unique, uint64_t id)
{
    struct node *n = node_get(&s->t, id);
    if (!n || !n->has_attr || n->names)
        return 0;
    struct fuse_attr_out o;
    memset(&o, 0, sizeof(o));
    o.attr = n->attr;
    o.attr.nlink = 0;
    reply(s, unique, 0, &o, sizeof(o));
    return 1;
}

static struct handle *handle_new(PyObject *pyfh, int fd, uint64_t node)
{
    struct handle *h = calloc(1, sizeof(*h));
    if (!h)
        return NULL;
    Py_XINCREF(pyfh);
    h->pyfh = pyfh;
    h->fd = fd;
    h->node = node;
    return h;
}

static void do_getattr(Session *s, uint64_t unique, uint64_t id, const struct fuse_getattr_in *in)
{
    PyObject *res;
    if (in && (in->getattr_flags & FUSE_GETATTR_FH) && in->fh) {
        struct handle *h = (struct handle *)(uintptr_t)in->fh;
        /* (a lower layer's file opened to read is that file still when the node has been
         * copied up since: its name says what the node is now) */
        if (h->pyfh && h->pyfh != Py_None && !h->lower_file && !h->lower_copy) {
            res = PyObject_CallMethod(s->ops, "fgetattr", "O", h->pyfh);
            reply_attr(s, unique, id, res);
            Py_XDECREF(res);
            return;
        }
    }
    int err = 0;
    PyObject *path = path_bytes(s, id, &s->pb, &err);
    if (!path) {
        struct node *n = node_get(&s->t, id);
        if (n && n->anon) { /* an O_TMPFILE file: its open handle knows it */
            res = PyObject_CallMethod(s->ops, "fgetattr", "O", n->anon->pyfh);
            reply_attr(s, unique, id, res);
            Py_XDECREF(res);
            return;
        }
        if (!reply_orphan(s, unique, id))
            reply_err(s, unique, err);
        return;
    }
    res = PyObject_CallMethod(s->ops, "getattr", "O", path);
    Py_DECREF(path);
    reply_attr(s, unique, id, res);
    Py_XDECREF(res);
}

/* A lower file being read through its cached copy: the kernel would pass a writer through to
 * the same copy (one backing per inode), so changing its contents waits until they close. */
static void handle_close(Session *s, struct handle *h, int dir);

static int copy_busy(Session *s, uint64_t id)
{
    struct node *n = node_get(&s->t, id);
    return n && n->pt_opens && n->backing_copy;
}

static void do_setattr(Session *s, uint64_t unique, uint64_t id, const struct fuse_setattr_in *in)
{
    int err = 0;
    if ((in->valid & FATTR_SIZE) && copy_busy(s, id)) {
        reply_err(s, unique, ETXTBSY);
        return;
    }
    unmark_lower(s, id);
    PyObject *path = path_bytes(s, id, &s->pb, &err);
    PyObject *pyfh = Py_None;
    if ((in->valid & FATTR_FH) && in->fh) {
        struct handle *h = (struct handle *)(uintptr_t)in->fh;
        if (h->pyfh)
            pyfh = h->pyfh;
    }
    struct node *n = node_get(&s->t, id);
    if (!path && pyfh == Py_None && n && n->anon) /* an O_TMPFILE file: through its handle */
        pyfh = n->anon->pyfh;
    if (!path) {
        if (pyfh == Py_None) {
            reply_err(s, unique, err);
            return;
        }
        path = Py_None;
        Py_INCREF(path);
    }
    /* -1: leave alone, -2: now; else nanoseconds (a Python int: past 2262 they exceed 64 bits) */
    PyObject *atime = in->valid & FATTR_ATIME_NOW ? PyLong_FromLong(-2)
                      : in->valid & FATTR_ATIME   ? ns_from_time(in->atime, in->atimensec)
                                                  : PyLong_FromLong(-1);
    PyObject *mtime = in->valid & FATTR_MTIME_NOW ? PyLong_FromLong(-2)
                      : in->valid & FATTR_MTIME   ? ns_from_time(in->mtime, in->mtimensec)
                                                  : PyLong_FromLong(-1);
    PyObject *res = NULL;
    if (atime && mtime)
        res = PyObject_CallMethod(s->ops, "setattr", "OOiLLLLOO", path, pyfh,
                                  (int)(in->valid & (FATTR_MODE | FATTR_UID | FATTR_GID | FATTR_SIZE)),
                                  (long long)in->mode, (long long)in->uid, (long long)in->gid, (long long)in->size,
                                  atime, mtime);
    Py_XDECREF(atime);
    Py_XDECREF(mtime);
    Py_DECREF(path);
    reply_attr(s, unique, id, res);
    Py_XDECREF(res);
}

static void do_readlink(Session *s, uint64_t unique, uint64_t id)
{
    PyObject *path = path_or_reply(s, unique, id);
    if (!path)
        return;
    PyObject *res = PyObject_CallMethod(s->ops, "readlink", "O", path);
    Py_DECREF(path);
    if (!res || !PyBytes_Check(res)) {
        if (res)
            PyErr_SetString(PyExc_TypeError, "readlink must return bytes");
        reply_err(s, unique, py_errno());
        Py_XDECREF(res);
        return;
    }
    reply(s, unique, 0, PyBytes_AS_STRING(res), (size_t)PyBytes_GET_SIZE(res));
    Py_DECREF(res);
}

/* mkdir, mknod, symlink and link all answer with the new entry */
static void do_make(Session *s, uint64_t unique, uint64_t parent, const char *name, size_t len, const char *method,
                    const char *fmt, PyObject *a1, long long a2, long long a3, unsigned umask,
                    const struct fuse_in_header *ih)
{
    unmark_child(s, parent, name, len);
    PyObject *path = child_or_reply(s, unique, parent, name, len, &s->pb);
    if (!path)
        return;
    PyObject *res;
    if (!strcmp(fmt, "mode"))
        res = PyObject_CallMethod(s->ops, method, "OLLIII", path, a2, a3, ih->uid, ih->gid, umask);
    else if (!strcmp(fmt, "symlink"))
        res = PyObject_CallMethod(s->ops, method, "OOII", path, a1, ih->uid, ih->gid);
    else /* link: a1 is the existing path */
        res = PyObject_CallMethod(s->ops, method, "OO", a1, path);
    Py_DECREF(path);
    reply_entry_from(s, unique, parent, name, len, res);
    Py_XDECREF(res);
}

static void do_unlink(Session *s, uint64_t unique, uint64_t parent, const char *name, size_t len, const char *method)
{
    unmark_child(s, parent, name, len);
    PyObject *path = child_or_reply(s, unique, parent, name, len, &s->pb);
    if (!path)
        return;
    PyObject *res = PyObject_CallMethod(s->ops, method, "O", path);
    Py_DECREF(path);
    if (!res) {
        reply_err(s, unique, py_errno());
        return;
    }
    Py_DECREF(res);
    dentry_forget(&s->t, parent, name, len);
    reply_err(s, unique, 0);
}

static void do_rename(Session *s, uint64_t unique, uint64_t olddir, const char *oldname, size_t oldlen,
                      uint64_t newdir, const char *newname, size_t newlen, uint32_t flags)
{
    int err = 0;
    struct dentry *moved = dentry_get(&s->t, olddir, oldname, oldlen);
    struct dentry *over = dentry_get(&s->t, newdir, newname, newlen);
    if ((moved && S_ISDIR(moved->node->attr.mode)) || (over && S_ISDIR(over->node->attr.mode)))
        unmark_all(s);
    unmark_child(s, olddir, oldname, oldlen);
    unmark_child(s, newdir, newname, newlen);
    PyObject *oldp = child_path(s, olddir, oldname, oldlen, &s->pb, &err);
    if (!oldp) {
        reply_err(s, unique, err);
        return;
    }
    PyObject *newp = child_path(s, newdir, newname, newlen, &s->pb2, &err);
    if (!newp) {
        Py_DECREF(oldp);
        reply_err(s, unique, err);
        return;
    }
    PyObject *res = PyObject_CallMethod(s->ops, "rename", "OOI", oldp, newp, flags);
    Py_DECREF(oldp);
    Py_DECREF(newp);
    if (!res) {
        reply_err(s, unique, py_errno());
        return;
    }
    Py_DECREF(res);
    struct dentry *src = dentry_get(&s->t, olddir, oldname, oldlen);
    struct dentry *dst = dentry_get(&s->t, newdir, newname, newlen);
    struct node *srcnode = src ? src->node : NULL;
    struct node *dstnode = dst ? dst->node : NULL;
    if (flags & RENAME_EXCHANGE) {
        if (srcnode)
            srcnode->nlookup++; /* hold both while their names are swapped */
        if (dstnode)
            dstnode->nlookup++;
        if (src)
            dentry_drop(&s->t, src);
        if (dst)
            dentry_drop(&s->t, dst);
        if (srcnode) {
            dentry_set(&s->t, newdir, newname, newlen, srcnode);
            srcnode->nlookup--;
        }
        if (dstnode) {
            dentry_set(&s->t, olddir, oldname, oldlen, dstnode);
            dstnode->nlookup--;
        }
        node_maybe_free(&s->t, srcnode);
        node_maybe_free(&s->t, dstnode);
    } else if (srcnode) {
        srcnode->nlookup++;
        dentry_drop(&s->t, src);
        dentry_set(&s->t, newdir, newname, newlen, srcnode); /* drops the replaced name too */
        srcnode->nlookup--;
        node_maybe_free(&s->t, srcnode);
    } else if (dst) {
        dentry_drop(&s->t, dst);
    }
    reply_err(s, unique, 0);
}

/* How the kernel is to do I/O on a newly opened file (`flags`: the open's): open flags, or
 * -errno.  Passthrough to the host file where it can (sets *backing_id), else through its page
 * cache, kept across opens since every change goes through this mount.  The kernel takes one
 * backing file per inode, and while an inode has passthrough opens it refuses any open that is
 * not one (EINVAL): later opens share the first one's backing, which for upper files is opened
 * read-write for that; the rare open that cannot share it gets ETXTBSY, as a write to a running
 * program does.  It refuses passthrough while an inode has page-cache opens, so those count. */
/* Tell the kernel to drop what it caches of a node's attributes (FUSE_NOTIFY_INVAL_INODE with
 * offset -1: its pages stay).  Safe while a request of that node waits for its reply: the kernel
 * takes no lock of the inode for it. */
static void notify_inval_attr(Session *s, uint64_t id)
{
    struct {
        struct fuse_out_header h;
        struct fuse_notify_inval_inode_out o;
    } msg = {
        .h = {.len = sizeof(msg), .error = FUSE_NOTIFY_INVAL_INODE, .unique = 0},
        .o = {.ino = id, .off = -1, .len = 0},
    };
    if (write(s->fd, &msg, sizeof(msg)) < 0 && s->debug)
        fprintf(stderr, "layerfs: invalidating inode %llu: %s\n", (unsigned long long)id, strerror(errno));
}

/* A passthrough open of `n`: an O_RDWR one may map the file shared and write it unseen, so from
 * the first such open on, attributes are not cached (attr_timeout_of), nor kept from before. */
static void count_passthrough(Session *s, struct handle *h, struct node *n, uint32_t flags)
{
    n->pt_opens++;
    h->passthrough = 1;
    if ((flags & O_ACCMODE) == O_RDWR) {
        h->counted_rdwr = 1;
        if (n->pt_rdwr++ == 0)
            notify_inval_attr(s, n->id);
    }
}

static int open_mode(Session *s, struct handle *h, struct node *n, uint32_t flags, uint32_t *backing_id)
{
    int mode = (int)(flags & O_ACCMODE);
    if (n && n->pt_opens > 0) {
        /* a reader may share a copy's backing even once the file is copied up: its contents
         * cannot have changed (copy_busy) */
        if (n->backing_mode == O_RDWR || n->backing_mode == mode) {
            count_passthrough(s, h, n, flags);
            *backing_id = (uint32_t)n->backing_id;
            return PT_FOPEN;
        }
        return -ETXTBSY; /* the kernel refuses any other kind of open beside passthrough ones */
    }
    if (s->passthrough && n && h->fd >= 0 && n->cached_opens == 0 && !h->lower_file) {
        int fd = h->fd, reopened = -1;
        if (h->fd_rdwr) {
            mode = O_RDWR;
        } else if (!h->lower_copy && mode != O_RDWR) { /* an upper file: a backing later writers can share */
            char path[64];
            snprintf(path, sizeof(path), "/proc/self/fd/%d", h->fd);
            if ((reopened = open(path, O_RDWR | O_CLOEXEC)) >= 0) {
                fd = reopened;
                mode = O_RDWR;
            }
        }
        struct pt_backing_map map = {.fd = fd};
        int id = ioctl(s->fd, PT_BACKING_OPEN, &map);
        int err = errno;
        if (reopened >= 0)
            close(reopened); /* the backing holds its own reference */
        if (id > 0) {
            n->backing_id = id;
            n->backing_mode = mode;
            n->backing_copy = h->lower_copy;
            count_passthrough(s, h, n, flags);
            *backing_id = (uint32_t)id;
            return PT_FOPEN;
        }
        if (err == EPERM || err == ENOTTY || err == EINVAL)
            s->passthrough = 0; /* not ours to use: stop asking */
    }
    if (n) {
        n->cached_opens++;
        h->counted_cached = 1;
    }
    return FOPEN_KEEP_CACHE;
}

/* A lower file's decompressed copy in the file cache, opened for reading; or -1, and `h` is
 * marked to have it filled once closed: a cold first read streams from the store, and the copy
 * (decompressing the file a second time) does not compete with it. */
static int cached_copy(Session *s, uint64_t ino, struct handle *h)
{
    struct fs_inode n;
    int fd = -1;
    if (fs_store_begin(s->lower_reader) == 0) {
        int ok = fs_store_inode(s->lower_reader, ino, &n) == 0 && S_ISREG(n.mode) && n.content;
        if (ok) {
            memcpy(h->copy_id, n.content, 32);
            h->copy_size = n.size;
        }
        fs_store_end(s->lower_reader);
        if (ok && (fd = fc_lookup(s->cache, h->copy_id, h->copy_size)) < 0)
            h->want_copy = 1;
    }
    return fd;
}

/* The file cache's reads (on its own thread, its own reader, under the pin lock). */
static long fill_read(void *arg, uint64_t ino, char *buf, size_t size, uint64_t offset)
{
    Session *s = arg;
    long got = -EIO;
    pthread_rwlock_rdlock(&s->pin_lock);
    if (fs_store_begin(s->fill_reader) == 0) {
        struct fs_inode n;
        int r = fs_store_inode(s->fill_reader, ino, &n);
        got = r < 0 ? r : fs_store_read(s->fill_reader, &n, ino, buf, size, offset);
        fs_store_end(s->fill_reader);
    }
    pthread_rwlock_unlock(&s->pin_lock);
    return got;
}

/* How a lower layer's own file (layerfs-overlay), open as h->fd, is read: one of 1 MiB or more
 * is passed through to the kernel as a file cache copy is (a writer of its node waits until
 * its readers are gone: copy_busy), a smaller one is read here through the page cache, which
 * a writer shares (lower_file).  Never as a backing writers share: that was the layer's file. */
#define PASS_LOWER_MIN (1u << 20) /* filecache.MIN_SIZE */
static void lower_file_mode(struct handle *h)
{
    struct stat st;
    if (fstat(h->fd, &st) == 0 && st.st_size >= PASS_LOWER_MIN)
        h->lower_copy = 1;
    else
        h->lower_file = 1;
}

/* Reply to an OPEN with the new handle `h` (closed on failure). */
static void finish_open(Session *s, uint64_t unique, struct handle *h, uint32_t flags)
{
    struct fuse_open_out o;
    memset(&o, 0, sizeof(o));
    struct node *n = node_get(&s->t, h->node);
    if (n)
        n->opens++;
    o.fh = (uint64_t)(uintptr_t)h;
    int how = open_mode(s, h, n, flags, &o.padding);
    if (how < 0) {
        handle_close(s, h, 0);
        reply_err(s, unique, -how);
        return;
    }
    o.open_flags = (uint32_t)how;
    reply(s, unique, 0, &o, sizeof(o));
}

/* Lower files up to this size are pushed into the page cache when first opened (push_lower,
 * stack_open): the kernel's first read-ahead of such a file asks for all of it anyway. */
#define PUSH_MAX (64u << 10)

/* Whether a writable mount's OPEN of lower node `n` may store the file's contents into the
 * kernel's page cache before its reply (FUSE_NOTIFY_STORE, push_pages), so that the read which
 * follows is served there instead of by a READ round trip: an open of a file there is a
 * LOOKUP, an OPEN, a READ and a RELEASE (a read-only mount answers OPEN with ENOSYS, and has
 * no OPEN to do this in).
 *
 * Only while nobody has the node open, and before the OPEN reply: storing waits for the lock
 * of each page, and a page under read-ahead stays locked until its READ is answered, by this
 * thread; with no open file (the opener still waits for this reply) no read-ahead of the node
 * can be in flight.  Once per node: pages the kernel dropped since are read as usual. */
static int may_push(struct node *n, uint64_t size)
{
    if (!n || n->opens || n->pushed || size == 0 || size > PUSH_MAX)
        return 0;
    n->pushed = 1;
    return 1;
}

/* Node `id`'s first `len` bytes (its whole file, in iov[2..2+niov)) into the page cache. */
static void push_pages(Session *s, uint64_t id, struct iovec *iov, int niov, size_t len)
{
    struct fuse_notify_store_out o = {.nodeid = id, .offset = 0, .size = (uint32_t)len};
    struct fuse_out_header h = {(uint32_t)(sizeof(h) + sizeof(o) + len), FUSE_NOTIFY_STORE, 0};
    iov[0] = (struct iovec){&h, sizeof(h)};
    iov[1] = (struct iovec){&o, sizeof(o)};
    if (writev(s->fd, iov, 2 + niov) < 0 && s->debug)
        fprintf(stderr, "layerfs: storing node %llu's pages: %s\n", (unsigned long long)id, strerror(errno));
}

/* push_pages of a stored file (a damaged one is left to its READ, which reports it). */
static void push_lower(Session *s, struct node *n, uint64_t ino)
{
    struct fs_inode fi;
    if (!n || n->opens || n->pushed || !s->lower_reader || fs_store_begin(s->lower_reader) < 0)
        return;
    if (fs_store_inode(s->lower_reader, ino, &fi) == 0 && S_ISREG(fi.mode) && may_push(n, fi.size)) {
        struct iovec iov[2 + FS_STORE_IOV];
        int niov;
        char *out = s->buf + BUF_SIZE;
        long got = fs_store_readv(s->lower_reader, &fi, ino, out, fi.size, 0, iov + 2, &niov);
        if (got == (long)fi.size) {
            if (!niov)
                iov[2 + niov++] = (struct iovec){out, (size_t)got};
            push_pages(s, n->id, iov, niov, (size_t)got);
        }
    }
    fs_store_end(s->lower_reader);
}

/* OPEN for reading of a stored file (index inode `ino`) as node `id`: read by the kernel from
 * its copy in the file cache, else here from the store (no Python: callable without the GIL). */
static void open_lower(Session *s, uint64_t unique, uint64_t id, uint64_t ino, uint32_t flags)
{
    struct handle *h = handle_new(NULL, -1, id);
    if (!h) {
        reply_err(s, unique, ENOMEM);
        return;
    }
    int copy = s->cache ? cached_copy(s, ino, h) : -1;
    if (copy >= 0) { /* read by the kernel from the copy (or here, with pread) */
        h->fd = copy;
        h->owns_fd = h->lower_copy = 1;
    } else {
        h->lower_ino = ino;
        push_lower(s, node_get(&s->t, id), ino);
    }
    finish_open(s, unique, h, flags);
}

static void do_open(Session *s, uint64_t unique, uint64_t id, uint32_t flags, int dir)
{
    struct fuse_open_out o;
    memset(&o, 0, sizeof(o));
    if (dir) {
        struct handle *h = handle_new(NULL, -1, id);
        if (!h) {
            reply_err(s, unique, ENOMEM);
            return;
        }
        o.fh = (uint64_t)(uintptr_t)h;
        if (!s->writable)
            o.open_flags = FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR;
        reply(s, unique, 0, &o, sizeof(o));
        return;
    }
    if (!s->writable) {
        /* the kernel remembers ENOSYS: no OPEN or RELEASE for the rest of the mount, reads by
         * path with the page cache kept across opens (lower files never change) */
        reply_err(s, unique, ENOSYS);
        return;
    }
    if ((flags & O_ACCMODE) != O_RDONLY || (flags & O_TRUNC)) {
        if (copy_busy(s, id)) {
            reply_err(s, unique, ETXTBSY);
            return;
        }
        unmark_lower(s, id); /* to be copied up */
    }
    PyObject *path = path_or_reply(s, unique, id);
    if (!path)
        return;
    PyObject *res = PyObject_CallMethod(s->ops, "open", "OI", path, flags);
    Py_DECREF(path);
    PyObject *pyfh;
    int fd, lower_file = 0;
    unsigned long long lower_ino = 0;
    if (!res || !PyArg_ParseTuple(res, "Oi|Kp", &pyfh, &fd, &lower_ino, &lower_file)) {
        Py_XDECREF(res);
        reply_err(s, unique, py_errno());
        return;
    }
    /* a lower file of the stored image opened for reading: read here, from the store */
    if (pyfh == Py_None && !(lower_ino && s->lower_reader)) {
        Py_DECREF(res);
        reply_err(s, unique, EIO);
        return;
    }
    if (pyfh == Py_None) {
        Py_DECREF(res);
        Py_BEGIN_ALLOW_THREADS
        open_lower(s, unique, id, lower_ino, flags);
        Py_END_ALLOW_THREADS
        return;
    }
    struct handle *h = handle_new(pyfh, fd, id);
    Py_DECREF(res);
    if (!h) {
        reply_err(s, unique, ENOMEM);
        return;
    }
    if (lower_file) /* a lower layer's own file (layerfs-overlay), opened to read */
        lower_file_mode(h);
    if (fd >= 0 && (flags & O_ACCMODE) != O_RDONLY) {
        /* the kernel asks for security.capability before every write (to drop it): a file
         * opened to be written (mostly just copied up) is asked here, once, on its descriptor */
        struct node *n = node_get(&s->t, id);
        if (n && !n->no_caps && fgetxattr(fd, CAPS_XATTR, NULL, 0) < 0 && errno == ENODATA)
            n->no_caps = 1;
    }
    finish_open(s, unique, h, flags);
}

/* A new file (parent, name) made and opened; or, `name` NULL, an O_TMPFILE file in directory
 * `parent`: a node without a name, which a LINK through its open handle may name later. */
static void do_create(Session *s, uint64_t unique, uint64_t parent, const struct fuse_create_in *in, const char *name,
                      size_t len, const struct fuse_in_header *ih)
{
    PyObject *path;
    if (name) {
        unmark_child(s, parent, name, len);
        path = child_or_reply(s, unique, parent, name, len, &s->pb);
    } else {
        unmark_lower(s, parent);
        path = path_or_reply(s, unique, parent);
    }
    if (!path)
        return;
    PyObject *res = PyObject_CallMethod(s->ops, name ? "create" : "tmpfile", "OIIIII", path, in->mode, in->flags,
                                        ih->uid, ih->gid, in->umask);
    Py_DECREF(path);
    PyObject *pyfh, *attr;
    int fd;
    if (!res || !PyArg_ParseTuple(res, "OiO", &pyfh, &fd, &attr)) {
        Py_XDECREF(res);
        reply_err(s, unique, py_errno());
        return;
    }
    struct {
        struct fuse_entry_out e;
        struct fuse_open_out o;
    } out;
    struct fuse_attr a;
    if (attr_from_tuple(attr, &a, NULL) < 0) {
        Py_DECREF(res);
        reply_err(s, unique, py_errno());
        return;
    }
    int r = 0;
    if (name) {
        r = remember(s, parent, name, len, &a, 0);
    } else {
        struct node *anon = node_make(&s->t, a.ino);
        if (anon) {
            anon->nlookup++;
            anon->attr = a;
            anon->has_attr = 1;
        } else {
            r = -ENOMEM;
        }
    }
    struct handle *h = r < 0 ? NULL : handle_new(pyfh, fd, a.ino);
    Py_DECREF(res);
    if (!h) {
        reply_err(s, unique, r < 0 ? -r : ENOMEM);
        return;
    }
    struct node *n = node_get(&s->t, a.ino);
    n->opens++;
    if (!name)
        n->anon = h;
    n->no_caps = 1; /* a new file has no capability: spare the GETXATTR of its first write */
    fill_entry(s, &out.e, &a);
    memset(&out.o, 0, sizeof(out.o));
    out.o.fh = (uint64_t)(uintptr_t)h;
    int how = open_mode(s, h, n, in->flags, &out.o.padding);
    if (how < 0) { /* a new inode has no other opens: not seen, but never a half-made reply */
        handle_close(s, h, 0);
        reply_err(s, unique, -how);
        return;
    }
    out.o.open_flags = (uint32_t)how;
    reply(s, unique, 0, &out, sizeof(out));
}

static void adopt_cancel(Session *s, struct handle *h);

static void handle_close(Session *s, struct handle *h, int dir)
{
    if (h->adopt_pending)
        adopt_cancel(s, h);
    if (h->c_fd)
        close(h->fd);
    if (h->pyfh && h->pyfh != Py_None) {
        PyObject *res = PyObject_CallMethod(s->ops, "release", "O", h->pyfh);
        if (!res)
            py_errno();
        Py_XDECREF(res);
    }
    if (h->owns_fd && h->fd >= 0)
        close(h->fd);
    if (h->followed)
        close(h->followed_fd);
    if (h->want_copy)
        fc_want(s->cache, h->copy_id, h->lower_ino, h->copy_size);
    if (!dir) {
        struct node *n = node_get(&s->t, h->node);
        if (n && n->anon == h)
            n->anon = NULL;
        if (n && h->counted_rdwr && n->pt_rdwr)
            n->pt_rdwr--;
        if (n && h->passthrough && n->pt_opens && --n->pt_opens == 0) {
            uint32_t id = (uint32_t)n->backing_id;
            ioctl(s->fd, PT_BACKING_CLOSE, &id);
            n->backing_id = 0;
        }
        if (n && h->counted_cached && n->cached_opens)
            n->cached_opens--;
        if (n && n->opens) {
            n->opens--;
            node_maybe_free(&s->t, n);
        }
    }
    Py_XDECREF(h->pyfh);
    Py_XDECREF(h->listing);
    stack_listing_free(h->stack);
    free(h);
}

static void do_release(Session *s, uint64_t unique, uint64_t fh, int dir)
{
    struct handle *h = (struct handle *)(uintptr_t)fh;
    if (h)
        handle_close(s, h, dir);
    reply_err(s, unique, 0);
}

/* READDIR / READDIRPLUS from the handle's listing: [(name, attr tuple or None), ...] where the
 * first two are "." and "..".  The offset of an entry is its index + 1. */
static void do_readdir(Session *s, uint64_t unique, uint64_t id, const struct fuse_read_in *in, int plus)
{
    struct handle *h = (struct handle *)(uintptr_t)in->fh;
    if (!h) {
        reply_err(s, unique, EBADF);
        return;
    }
    if (!h->listing || in->offset == 0 || h->relist) {
        int err = 0;
        h->relist = 0;
        PyObject *path = path_bytes(s, id, &s->pb, &err);
        if (!path) {
            reply_err(s, unique, err);
            return;
        }
        PyObject *res = PyObject_CallMethod(s->ops, "readdir", "O", path);
        Py_DECREF(path);
        if (!res || !PyList_Check(res)) {
            if (res)
                PyErr_SetString(PyExc_TypeError, "readdir must return a list");
            Py_XDECREF(res);
            reply_err(s, unique, py_errno());
            return;
        }
        Py_XDECREF(h->listing);
        h->listing = res;
    }
    size_t cap = in->size < BUF_SIZE ? in->size : BUF_SIZE;
    char *out = s->buf + BUF_SIZE; /* the second half of the buffer is the reply area */
    size_t used = 0;
    Py_ssize_t n = PyList_GET_SIZE(h->listing);
    for (Py_ssize_t i = (Py_ssize_t)in->offset; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(h->listing, i);
        PyObject *pyname, *attr;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2)
            break;
        pyname = PyTuple_GET_ITEM(item, 0);
        attr = PyTuple_GET_ITEM(item, 1);
        if (!PyBytes_Check(pyname))
            break;
        const char *name = PyBytes_AS_STRING(pyname);
        size_t len = (size_t)PyBytes_GET_SIZE(pyname);
        struct fuse_attr a;
        uint64_t lower;
        if (attr_from_tuple(attr, &a, &lower) < 0) {
            PyErr_Clear();
            continue;
        }
        int dot = (len == 1 && name[0] == '.') || (len == 2 && name[0] == '.' && name[1] == '.');
        size_t base = plus ? FUSE_NAME_OFFSET_DIRENTPLUS : FUSE_NAME_OFFSET;
        size_t rec = FUSE_DIRENT_ALIGN(base + len);
        if (used + rec > cap)
            break;
        char *p = out + used;
        memset(p, 0, rec);
        struct fuse_dirent *de;
        if (plus) {
            struct fuse_direntplus *dp = (struct fuse_direntplus *)p;
            if (!dot) {
                if (remember(s, id, name, len, &a, lower) < 0)
                    break;
                fill_entry(s, &dp->entry_out, &a);
            } else {
                dp->entry_out.attr.ino = a.ino; /* node id 0: the kernel does not count it */
                dp->entry_out.attr.mode = a.mode;
            }
            de = &dp->dirent;
        } else {
            de = (struct fuse_dirent *)p;
        }
        de->ino = a.ino;
        de->off = (uint64_t)i + 1;
        de->namelen = (uint32_t)len;
        de->type = (a.mode & S_IFMT) >> 12;
        memcpy(de->name, name, len);
        used += rec;
    }
    reply(s, unique, 0, out, used);
}

static void store_read(Session *s, struct fs_store *st, char *out, uint64_t u, uint64_t ino,
                       const struct fuse_read_in *in);

/* A handle opened to read a lower file (from the store, its copy in the file cache, or a
 * layer's own file) whose node was copied up since: read the copy from then on, as the kernel
 * overlay's files do once their inode is copied up (ovl_real_fdget).  The node is no longer
 * marked `lower` then; until the copy is there, the lower file is read. */
static void follow_copy_up(Session *s, struct handle *h)
{
    struct node *n = node_get(&s->t, h->node);
    struct stat st;
    if (s->upper_fd < 0 || !n || n->lower || node_path(&s->t, n->id, &s->pb) < 0 || !s->pb.len ||
        pb_reserve(&s->pb, 1))
        return;
    s->pb.p[s->pb.len] = 0;
    int fd = openat(s->upper_fd, s->pb.p, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return;
    }
    h->followed = 1;
    h->followed_fd = fd;
}

/* READ of a handle C reads by itself (a stored lower file, a host descriptor); 0 if it is not
 * one.  No Python: callable without the GIL. */
static int stack_file(Session *s, struct node *n);

/* The largest READ: 1 MiB, 16 of a stored file's chunks.  A mount of host directories alone
 * (layerfs-overlay) takes a page less: such a READ and its header then fit the 1 MiB pipe
 * (pipe-max-size) reply_splice sends it through, a page each. */
static uint32_t request_size(const Session *s)
{
    return s->store || s->lower_reader ? MAX_WRITE : MAX_WRITE - 4096;
}

/* How far the kernel reads ahead of a sequential reader: four READs for a stored image's mounts,
 * so that their threads (a read-only mount's, a writable mount's reader) decompress them at once
 * (one READ in flight at a time left the second thread idle); one for host directories, read by
 * one thread. */
static uint32_t read_ahead(const Session *s)
{
    return s->store || s->lower_reader ? 4 * MAX_WRITE : request_size(s);
}

/* READs of this size or more are spliced (reply_splice); a smaller one costs fewer calls as a
 * pread and a writev */
#define SPLICE_MIN (64u << 10)

static void drain_pipe(Session *s)
{
    while (read(s->pipe[0], s->buf + BUF_SIZE, BUF_SIZE) > 0)
        ;
}

/* Reply to a READ of `size` bytes at `offset` of host file fd by splicing them through a pipe
 * to the device: the kernel copies the file's pages once, where a pread and a writev copy them
 * twice (fuse-overlayfs and libfuse reply so too).  0 if it could not (no pipe, a file that
 * changed size meanwhile, a reply too large for the pipe): nothing was sent, the caller replies
 * the usual way. */
static int reply_splice(Session *s, uint64_t unique, int fd, uint64_t offset, size_t size)
{
    if (s->pipe[0] == -1) {
        s->pipe[0] = -2;
        int p[2];
        if (pipe2(p, O_CLOEXEC | O_NONBLOCK) == 0) {
            /* a page for the header, one more for data not aligned to a page; 2 MiB wants
             * CAP_SYS_RESOURCE (pipe-max-size is 1 MiB), an unprivileged daemon gets 1 MiB */
            long cap = fcntl(p[1], F_SETPIPE_SZ, 2 * MAX_WRITE);
            if (cap < 0)
                cap = fcntl(p[1], F_SETPIPE_SZ, MAX_WRITE);
            if (cap < 0)
                cap = fcntl(p[1], F_GETPIPE_SZ);
            s->pipe[0] = p[0];
            s->pipe[1] = p[1];
            s->pipe_cap = cap > 0 ? (size_t)cap : 0;
        }
    }
    struct stat st;
    if (s->pipe[0] < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || offset >= (uint64_t)st.st_size)
        return 0;
    size_t want = (uint64_t)st.st_size - offset < size ? (size_t)((uint64_t)st.st_size - offset) : size;
    if ((1 + (offset + want - 1) / 4096 - offset / 4096 + 1) * 4096 > s->pipe_cap)
        return 0; /* a pipe buffer per page the bytes touch, and one for the header */
    struct fuse_out_header h = {(uint32_t)(sizeof(h) + want), 0, unique};
    if (write(s->pipe[1], &h, sizeof(h)) != (ssize_t)sizeof(h)) {
        drain_pipe(s);
        return 0;
    }
    loff_t off = (loff_t)offset;
    for (size_t got = 0; got < want;) {
        ssize_t n = splice(fd, &off, s->pipe[1], NULL, want - got, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n <= 0) { /* the file shrank (or an error the pread will give the caller) */
            drain_pipe(s);
            return 0;
        }
        got += (size_t)n;
    }
    ssize_t n = splice(s->pipe[0], NULL, s->fd, NULL, sizeof(h) + want, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (n == (ssize_t)(sizeof(h) + want))
        return 1;
    int err = n < 0 ? errno : 0;
    drain_pipe(s);
    /* ENOENT: the request was interrupted meanwhile, the kernel no longer waits for a reply */
    return err == ENOENT;
}

/* Reply to READ `in` with what host descriptor fd holds there. */
static void reply_pread(Session *s, uint64_t unique, int fd, const struct fuse_read_in *in)
{
    size_t size = in->size < BUF_SIZE ? in->size : BUF_SIZE;
    if (size >= SPLICE_MIN && reply_splice(s, unique, fd, in->offset, size))
        return;
    char *out = s->buf + BUF_SIZE;
    ssize_t n = pread(fd, out, size, (off_t)in->offset);
    if (n < 0)
        reply_err(s, unique, errno);
    else
        reply(s, unique, 0, out, (size_t)n);
}

/* READs at least this large go to the reader thread when it is idle; a small file's one READ
 * would only wait for the thread to wake */
#define READER_MIN (256u << 10)

/* Give READ `in` of stored inode `ino` to the reader thread; 0 if it is busy (or absent). */
static int hand_to_reader(Session *s, uint64_t unique, uint64_t ino, const struct fuse_read_in *in)
{
    struct reader *r = s->reader;
    int taken = 0;
    if (!r || !r->started || in->size < READER_MIN)
        return 0;
    pthread_mutex_lock(&r->mu);
    if (!r->busy) {
        r->unique = unique;
        r->ino = ino;
        r->in = *in;
        r->busy = taken = 1;
        pthread_cond_signal(&r->cv);
    }
    pthread_mutex_unlock(&r->mu);
    return taken;
}

static void *reader_main(void *arg)
{
    Session *s = arg;
    struct reader *r = s->reader;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the main thread's: it unmounts */
    pthread_mutex_lock(&r->mu);
    for (;;) {
        while (!r->busy && !r->stop)
            pthread_cond_wait(&r->cv, &r->mu);
        if (r->stop)
            break;
        uint64_t unique = r->unique, ino = r->ino;
        struct fuse_read_in in = r->in;
        pthread_mutex_unlock(&r->mu);
        pthread_rwlock_rdlock(&s->pin_lock); /* (the serving thread renews the pin) */
        if (fs_store_begin(r->st) < 0) {
            reply_err(s, unique, EIO);
        } else {
            store_read(s, r->st, r->buf, unique, ino, &in);
            fs_store_end(r->st);
        }
        pthread_rwlock_unlock(&s->pin_lock);
        pthread_mutex_lock(&r->mu);
        r->busy = 0;
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

static void reader_stop(Session *s)
{
    struct reader *r = s->reader;
    if (!r || !r->started)
        return;
    pthread_mutex_lock(&r->mu);
    r->stop = 1;
    pthread_cond_signal(&r->cv);
    pthread_mutex_unlock(&r->mu);
    pthread_join(r->thread, NULL);
    r->started = 0;
}

static int read_here(Session *s, uint64_t unique, struct handle *h, const struct fuse_read_in *in)
{
    if (h && !h->followed && (h->lower_ino || h->lower_copy || h->lower_file))
        follow_copy_up(s, h);
    if (h && h->lower_file && !h->followed && h->fd < 0) { /* opened at its first READ (stack_open) */
        int opened = stack_file(s, node_get(&s->t, h->node));
        if (opened < 0) {
            reply_err(s, unique, -opened);
            return 1;
        }
        h->fd = opened;
    }
    int fd = h && h->followed ? h->followed_fd : h ? h->fd : -1;
    if (h && h->lower_ino && !h->followed && s->lower_reader) { /* a lower file: from the store */
        if (hand_to_reader(s, unique, h->lower_ino, in))
            return 1;
        if (fs_store_begin(s->lower_reader) < 0) {
            reply_err(s, unique, EIO);
        } else {
            store_read(s, s->lower_reader, s->buf + BUF_SIZE, unique, h->lower_ino, in);
            fs_store_end(s->lower_reader);
        }
        return 1;
    }
    if (fd >= 0) { /* an upper file, a lower file's copy in the file cache, a layer's file */
        reply_pread(s, unique, fd, in);
        return 1;
    }
    return 0;
}

/* WRITE of an upper file's host descriptor (the data follows `in`).  No Python: callable
 * without the GIL. */
static void write_here(Session *s, uint64_t unique, struct handle *h, const struct fuse_write_in *in)
{
    ssize_t n = pwrite(h->fd, in + 1, in->size, (off_t)in->offset);
    if (n < 0) {
        reply_err(s, unique, errno);
        return;
    }
    struct fuse_write_out o = {.size = (uint32_t)n};
    reply(s, unique, 0, &o, sizeof(o));
}

static void do_read(Session *s, uint64_t unique, uint64_t id, const struct fuse_read_in *in)
{
    struct handle *h = (struct handle *)(uintptr_t)in->fh;
    PyObject *res;
    int done;
    Py_BEGIN_ALLOW_THREADS
    done = read_here(s, unique, h, in);
    Py_END_ALLOW_THREADS
    if (done)
        return;
    if (h && h->pyfh) {
        res = PyObject_CallMethod(s->ops, "read", "OIK", h->pyfh, in->size, (unsigned long long)in->offset);
    } else {
        int err = 0;
        PyObject *path = path_bytes(s, id, &s->pb, &err);
        if (!path) {
            reply_err(s, unique, err);
            return;
        }
        res = PyObject_CallMethod(s->ops, "read_path", "OIK", path, in->size, (unsigned long long)in->offset);
        Py_DECREF(path);
    }
    Py_buffer view;
    if (!res || PyObject_GetBuffer(res, &view, PyBUF_SIMPLE) < 0) {
        Py_XDECREF(res);
        reply_err(s, unique, py_errno());
        return;
    }
    size_t len = (size_t)view.len < in->size ? (size_t)view.len : in->size;
    reply(s, unique, 0, view.buf, len);
    PyBuffer_Release(&view);
    Py_DECREF(res);
}

static void call_simple(Session *s, uint64_t unique, PyObject *res)
{
    if (!res) {
        reply_err(s, unique, py_errno());
        return;
    }
    Py_DECREF(res);
    reply_err(s, unique, 0);
}

static void do_statfs(Session *s, uint64_t unique)
{
    PyObject *res = PyObject_CallMethod(s->ops, "statfs", NULL);
    struct fuse_statfs_out o;
    memset(&o, 0, sizeof(o));
    unsigned long long blocks, bfree, bavail, files, ffree;
    unsigned int bsize, namelen, frsize;
    if (!res || !PyArg_ParseTuple(res, "KKKKKIII", &blocks, &bfree, &bavail, &files, &ffree, &bsize, &namelen,
                                  &frsize)) {
        Py_XDECREF(res);
        reply_err(s, unique, py_errno());
        return;
    }
    Py_DECREF(res);
    o.st.blocks = blocks;
    o.st.bfree = bfree;
    o.st.bavail = bavail;
    o.st.files = files;
    o.st.ffree = ffree;
    o.st.bsize = bsize;
    o.st.namelen = namelen;
    o.st.frsize = frsize;
    reply(s, unique, 0, &o, sizeof(o));
}


static void do_getxattr(Session *s, uint64_t unique, uint64_t id, const char *name, uint32_t size, int list)
{
    int err = 0;
    int caps = !list && strcmp(name, CAPS_XATTR) == 0;
    struct node *n = caps ? node_get(&s->t, id) : NULL;
    if (n && n->no_caps) {
        reply_err(s, unique, ENODATA);
        return;
    }
    PyObject *path = path_bytes(s, id, &s->pb, &err);
    if (!path) {
        reply_err(s, unique, err);
        return;
    }
    PyObject *res = list ? PyObject_CallMethod(s->ops, "listxattr", "O", path)
                         : PyObject_CallMethod(s->ops, "getxattr", "Oy", path, name);
    Py_DECREF(path);
    if (!res || !PyBytes_Check(res)) {
        if (res)
            PyErr_SetString(PyExc_TypeError, "xattr calls return bytes");
        Py_XDECREF(res);
        err = py_errno();
        if (n && err == ENODATA)
            n->no_caps = 1;
        reply_err(s, unique, err);
        return;
    }
    size_t len = (size_t)PyBytes_GET_SIZE(res);
    if (size == 0) {
        struct fuse_getxattr_out o = {.size = (uint32_t)len};
        reply(s, unique, 0, &o, sizeof(o));
    } else if (len > size) {
        reply_err(s, unique, ERANGE);
    } else {
        reply(s, unique, 0, PyBytes_AS_STRING(res), len);
    }
    Py_DECREF(res);
}

/* ---- read-only mounts of a stored image, served from the store without Python ---------------- */

static const char *take_name(const char **p, size_t *left, size_t *len);
static void do_init(Session *s, const struct fuse_in_header *ih, const char *body, size_t blen);

/* The xattrs of an index record, one at a time: `at` starts at 0; 1 with the next one's name
 * and value (neither NUL-terminated), 0 after the last, -1 where the record is damaged. */
struct xattr_it {
    unsigned i;
    size_t at;
};

static int next_xattr(const struct fs_inode *n, struct xattr_it *it, const char **name, size_t *nl,
                      const char **value, size_t *vl)
{
    if (it->i >= n->xattr_count)
        return 0;
    const unsigned char *x = n->xattrs + it->at;
    if (it->at + 6 > n->xattrs_len)
        return -1;
    *nl = (size_t)(x[0] | x[1] << 8);
    *vl = (size_t)x[2] | (size_t)x[3] << 8 | (size_t)x[4] << 16 | (size_t)x[5] << 24;
    if (*nl > n->xattrs_len || *vl > n->xattrs_len - *nl || it->at + 6 > n->xattrs_len - *nl - *vl)
        return -1;
    *name = (const char *)x + 6;
    *value = *name + *nl;
    it->at += 6 + *nl + *vl;
    it->i++;
    return 1;
}

static void attr_from_inode(struct fuse_attr *a, uint64_t ino, const struct fs_inode *n)
{
    memset(a, 0, sizeof(*a));
    a->ino = ino;
    a->mode = n->mode;
    a->nlink = n->nlink;
    a->uid = n->uid;
    a->gid = n->gid;
    a->rdev = (uint32_t)n->rdev;
    a->size = S_ISLNK(n->mode) ? n->link_len : n->size;
    a->blocks = (a->size + 511) / 512;
    a->blksize = 65536;
    int64_t sec;
    split_ns(n->mtime_ns, &sec, &a->mtimensec);
    a->atime = a->mtime = a->ctime = (uint64_t)sec;
    a->atimensec = a->ctimensec = a->mtimensec;
}

/* LOOKUP in a directory of the stored image; on a writable mount (a `lower` parent) the entry
 * is remembered, and 0 returned for a node known to be the image's no longer (a hardlink copied
 * up under another name): Python decides that one. */
static int fast_lookup(Session *s, struct worker *w, uint64_t u, uint64_t parent, const char *name, size_t len)
{
    uint64_t ino;
    struct fs_inode n;
    struct fuse_entry_out e;
    int r = fs_store_lookup(w->store, parent, name, len, &ino);
    if (r == -ENOENT || (s->writable && len >= 4 && memcmp(name, ".wh.", 4) == 0)) {
        /* (a writable mount never shows a fallback whiteout's name, as UnionView.resolve) */
        memset(&e, 0, sizeof(e));
        split_timeout(s->negative_timeout, &e.entry_valid, &e.entry_valid_nsec);
        if (s->writable)
            dentry_forget(&s->t, parent, name, len);
        reply(s, u, 0, &e, sizeof(e));
        return 1;
    }
    if (r == 0)
        r = fs_store_inode(w->store, ino, &n);
    if (r < 0) {
        reply_err(s, u, r == -ENOENT ? EIO : -r); /* a listed name without an inode: damaged */
        return 1;
    }
    struct fuse_attr a;
    attr_from_inode(&a, ino, &n);
    if (s->writable) {
        struct node *known = node_get(&s->t, ino);
        if (known && !known->lower)
            return 0;
        if ((r = remember(s, parent, name, len, &a, 1)) < 0) {
            reply_err(s, u, -r);
            return 1;
        }
    }
    fill_entry(s, &e, &a);
    reply(s, u, 0, &e, sizeof(e));
    return 1;
}

static void fast_getattr(Session *s, struct worker *w, uint64_t u, uint64_t ino)
{
    struct fs_inode n;
    struct fuse_attr_out o;
    int r = fs_store_inode(w->store, ino, &n);
    if (r < 0) {
        reply_err(s, u, r == -ENOENT ? ESTALE : -r);
        return;
    }
    memset(&o, 0, sizeof(o));
    attr_from_inode(&o.attr, ino, &n);
    if (s->writable) { /* what is left to say once every name is gone (reply_orphan) */
        struct node *nd = node_get(&s->t, ino);
        if (nd)
            nd->attr = o.attr;
    }
    split_timeout(s->attr_timeout, &o.attr_valid, &o.attr_valid_nsec);
    reply(s, u, 0, &o, sizeof(o));
}

/* Append one entry to a READDIR(PLUS) reply; 0 if it does not fit.  `a`: the entry's
 * attributes for READDIRPLUS, or NULL (node id 0: the kernel neither links nor counts it, and
 * LOOKUPs the name when it needs it). */
static int put_dirent(Session *s, char *out, size_t *used, size_t cap, int plus, const char *name, size_t len,
                      uint64_t off, uint64_t ino, uint32_t mode, const struct fuse_attr *a)
{
    size_t base = plus ? FUSE_NAME_OFFSET_DIRENTPLUS : FUSE_NAME_OFFSET;
    size_t rec = FUSE_DIRENT_ALIGN(base + len);
    if (*used + rec > cap)
        return 0;
    char *p = out + *used;
    memset(p, 0, rec);
    struct fuse_dirent *de;
    if (plus) {
        struct fuse_direntplus *dp = (struct fuse_direntplus *)p;
        if (a) {
            fill_entry(s, &dp->entry_out, a);
        } else {
            dp->entry_out.attr.ino = ino;
            dp->entry_out.attr.mode = mode;
        }
        de = &dp->dirent;
    } else {
        de = (struct fuse_dirent *)p;
    }
    de->ino = ino;
    de->off = off;
    de->namelen = (uint32_t)len;
    de->type = (mode & S_IFMT) >> 12;
    memcpy(de->name, name, len);
    *used += rec;
    return 1;
}

static void fast_readdir(Session *s, struct worker *w, uint64_t u, uint64_t dir, const struct fuse_read_in *in, int plus)
{
    struct handle *h = (struct handle *)(uintptr_t)in->fh;
    size_t cap = in->size < BUF_SIZE ? in->size : BUF_SIZE;
    char *out = w->buf + BUF_SIZE;
    size_t used = 0;
    uint64_t off = in->offset;
    if (!h) {
        reply_err(s, u, EBADF);
        return;
    }
    if (off < 1 && !put_dirent(s, out, &used, cap, plus, ".", 1, 1, dir, S_IFDIR, NULL))
        goto done;
    if (off < 2 && !put_dirent(s, out, &used, cap, plus, "..", 2, 2, dir, S_IFDIR, NULL))
        goto done;
    if (off < 2)
        off = 2;
    /* where to start: after the name the last reply ended with, or (a seekdir) by counting */
    int r;
    uint64_t skip = 0;
    if (off > 2 && off == h->last_off) {
        r = fs_store_dir_start(w->store, dir, h->last_name, h->last_len);
    } else {
        r = fs_store_dir_start(w->store, dir, NULL, 0);
        skip = off - 2;
    }
    struct fs_dirent de;
    while (r > 0 && (r = fs_store_dir_next(w->store, &de)) > 0) {
        if (skip) {
            skip--;
            continue;
        }
        struct fs_inode n;
        int ri = plus ? fs_store_inode(w->store, de.ino, &n) : 0;
        if (ri < 0) {
            r = ri;
            break;
        }
        /* a writable mount remembers each entry it gives attributes for; a node known to be
         * the image's no longer gets none (node id 0: the kernel will LOOKUP it) */
        struct node *known = s->writable && plus ? node_get(&s->t, de.ino) : NULL;
        int attrs = plus && !(known && !known->lower);
        struct fuse_attr a;
        if (attrs)
            attr_from_inode(&a, de.ino, &n);
        size_t before = used;
        if (!put_dirent(s, out, &used, cap, plus, de.name, de.name_len, off + 1, de.ino, de.mode, attrs ? &a : NULL))
            break;
        if (attrs && s->writable) {
            if (remember(s, dir, de.name, de.name_len, &a, 1) < 0) {
                used = before;
                break;
            }
        }
        off++;
        h->last_off = off;
        h->last_len = de.name_len;
        memcpy(h->last_name, de.name, de.name_len);
    }
    if (r < 0 && used == 0) {
        reply_err(s, u, EIO);
        return;
    }
done:
    reply(s, u, 0, out, used);
}

/* Reply to GETXATTR or LISTXATTR (`size`: the caller's buffer, 0 to ask the size) with `len`
 * bytes at `out` (the reply area; more than fits there: ERANGE), or ENODATA if not found. */
static void reply_xattr(Session *s, uint64_t u, const char *out, size_t len, int found, uint32_t size)
{
    if (!found) {
        reply_err(s, u, ENODATA);
    } else if (size == 0) {
        struct fuse_getxattr_out o = {.size = (uint32_t)len};
        reply(s, u, 0, &o, sizeof(o));
    } else if (len > size || len > BUF_SIZE) {
        reply_err(s, u, ERANGE);
    } else {
        reply(s, u, 0, out, len);
    }
}

static void fast_xattr(Session *s, struct worker *w, uint64_t u, uint64_t ino, const char *name, size_t name_len, uint32_t size,
                       int list)
{
    struct fs_inode n;
    int r = fs_store_inode(w->store, ino, &n);
    if (r < 0) {
        reply_err(s, u, r == -ENOENT ? ESTALE : -r);
        return;
    }
    char *out = w->buf + BUF_SIZE;
    size_t len = 0, nl, vl;
    int found = 0;
    const char *xn, *xv;
    struct xattr_it it = {0, 0};
    while (next_xattr(&n, &it, &xn, &nl, &xv, &vl) > 0) {
        if (list) {
            if (len + nl + 1 <= BUF_SIZE) {
                memcpy(out + len, xn, nl);
                out[len + nl] = 0;
            }
            len += nl + 1;
        } else if (nl == name_len && memcmp(xn, name, nl) == 0) {
            len = vl;
            if (vl <= BUF_SIZE)
                memcpy(out, xv, vl);
            found = 1;
            break;
        }
    }
    reply_xattr(s, u, out, len, list || found, size);
}

/* Say which file of which image a damaged chunk belongs to (the reader gets EIO), once per
 * inode as far as a few slots remember. */
static void report_damage(Session *s, struct fs_store *st, uint64_t ino, const struct fs_inode *n)
{
    static uint64_t seen[16];
    static unsigned next;
    for (int i = 0; i < 16; i++)
        if (__atomic_load_n(&seen[i], __ATOMIC_RELAXED) == ino)
            return;
    __atomic_store_n(&seen[__atomic_fetch_add(&next, 1, __ATOMIC_RELAXED) % 16], ino, __ATOMIC_RELAXED);
    char path[4096], hex[65] = "";
    if (fs_store_path(st, ino, path, sizeof(path)) < 0)
        snprintf(path, sizeof(path), "(inode %llu)", (unsigned long long)ino);
    for (int i = 0; n->content && i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", n->content[i]);
    fprintf(stderr, "layerfs: damaged data in %s at %s (object %s): reads of it give EIO; run layerfs verify\n",
            s->label, path, hex);
}

/* READ of a stored file's contents into `out`, the reply area (inside fs_store_begin/_end). */
static void store_read(Session *s, struct fs_store *st, char *out, uint64_t u, uint64_t ino,
                       const struct fuse_read_in *in)
{
    struct fs_inode n;
    int r = fs_store_inode(st, ino, &n);
    if (r < 0) {
        reply_err(s, u, r == -ENOENT ? ESTALE : -r);
        return;
    }
    if (!S_ISREG(n.mode)) {
        reply_err(s, u, S_ISDIR(n.mode) ? EISDIR : EINVAL);
        return;
    }
    size_t size = in->size < BUF_SIZE ? in->size : BUF_SIZE;
    struct iovec iov[1 + FS_STORE_IOV];
    int niov;
    long got = fs_store_readv(st, &n, ino, out, size, in->offset, iov + 1, &niov);
    if (got == -EIO)
        report_damage(s, st, ino, &n);
    if (got < 0)
        reply_err(s, u, (int)-got);
    else if (!niov)
        reply(s, u, 0, out, (size_t)got);
    else
        reply_iov(s, u, 0, iov, niov, (size_t)got);
}

/* Serve a request from the store without Python; 0 if it is not one of those (called without
 * the GIL: nothing here touches a Python object). */
static int fast_dispatch(Session *s, struct worker *w, const char *req, size_t n)
{
    const struct fuse_in_header *ih = (const struct fuse_in_header *)req;
    const char *body = req + sizeof(*ih);
    size_t blen = n - sizeof(*ih), len;
    const char *p = body, *name;
    size_t left = blen;
    uint64_t u = ih->unique, id = ih->nodeid;
    switch (ih->opcode) {
    case FUSE_INIT:
        do_init(s, ih, body, blen);
        return 1;
    case FUSE_DESTROY:
        reply_err(s, u, 0);
        return 1;
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
    case FUSE_INTERRUPT:
        return 1; /* no table to keep: node ids are the index's inode numbers */
    case FUSE_OPEN:
        reply_err(s, u, ENOSYS);
        return 1;
    case FUSE_FLUSH:
        reply_err(s, u, ENOSYS); /* see dispatch */
        return 1;
    case FUSE_RELEASE:
        reply_err(s, u, 0);
        return 1;
    case FUSE_ACCESS:
        reply_err(s, u, ENOSYS); /* default_permissions: the kernel checks */
        return 1;
    case FUSE_STATFS:
        reply(s, u, 0, &s->statfs, sizeof(s->statfs));
        return 1;
    case FUSE_OPENDIR: {
        struct handle *h = calloc(1, sizeof(*h));
        if (!h) {
            reply_err(s, u, ENOMEM);
            return 1;
        }
        h->fd = -1;
        h->node = id;
        struct fuse_open_out o;
        memset(&o, 0, sizeof(o));
        o.fh = (uint64_t)(uintptr_t)h;
        o.open_flags = FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR;
        reply(s, u, 0, &o, sizeof(o));
        return 1;
    }
    case FUSE_RELEASEDIR:
        if (blen < sizeof(struct fuse_release_in))
            break;
        free((void *)(uintptr_t)((const struct fuse_release_in *)body)->fh);
        reply_err(s, u, 0);
        return 1;
    case FUSE_LOOKUP:
    case FUSE_GETATTR:
    case FUSE_READDIR:
    case FUSE_READDIRPLUS:
    case FUSE_READLINK:
    case FUSE_GETXATTR:
    case FUSE_LISTXATTR:
    case FUSE_READ:
        break;
    default:
        return 0;
    }
    if (fs_store_begin(w->store) < 0) {
        reply_err(s, u, EIO);
        return 1;
    }
    __atomic_add_fetch(&s->fast_requests, 1, __ATOMIC_RELAXED);
    switch (ih->opcode) {
    case FUSE_LOOKUP:
        if ((name = take_name(&p, &left, &len)))
            fast_lookup(s, w, u, id, name, len);
        else
            reply_err(s, u, EINVAL);
        break;
    case FUSE_GETATTR:
        fast_getattr(s, w, u, id);
        break;
    case FUSE_READDIR:
    case FUSE_READDIRPLUS:
        if (blen >= sizeof(struct fuse_read_in))
            fast_readdir(s, w, u, id, (const struct fuse_read_in *)body, ih->opcode == FUSE_READDIRPLUS);
        else
            reply_err(s, u, EINVAL);
        break;
    case FUSE_READLINK: {
        struct fs_inode node;
        int r = fs_store_inode(w->store, id, &node);
        if (r < 0)
            reply_err(s, u, r == -ENOENT ? ESTALE : -r);
        else if (!S_ISLNK(node.mode))
            reply_err(s, u, EINVAL);
        else
            reply(s, u, 0, node.link, node.link_len);
        break;
    }
    case FUSE_GETXATTR:
        if (blen >= sizeof(struct fuse_getxattr_in)) {
            p += sizeof(struct fuse_getxattr_in);
            left -= sizeof(struct fuse_getxattr_in);
            if ((name = take_name(&p, &left, &len))) {
                fast_xattr(s, w, u, id, name, len, ((const struct fuse_getxattr_in *)body)->size, 0);
                break;
            }
        }
        reply_err(s, u, EINVAL);
        break;
    case FUSE_LISTXATTR:
        if (blen >= sizeof(struct fuse_getxattr_in))
            fast_xattr(s, w, u, id, NULL, 0, ((const struct fuse_getxattr_in *)body)->size, 1);
        else
            reply_err(s, u, EINVAL);
        break;
    case FUSE_READ:
        if (blen >= sizeof(struct fuse_read_in))
            store_read(s, w->store, w->buf + BUF_SIZE, u, id, (const struct fuse_read_in *)body);
        else
            reply_err(s, u, EINVAL);
        break;
    }
    fs_store_end(w->store);
    return 1;
}

/* ---- new names in upper directories, without Python ------------------------------------------
 *
 * Creating a file is four round trips (LOOKUP of the new name, CREATE, GETXATTR of
 * security.capability before the first write, RELEASE); in a directory already in the upper
 * directory each was a call into Python.  What the union rules say there is simple enough to
 * say here as well, for the common case; anything else (a whiteout or an upper entry at the
 * name, a setgid parent, a default ACL, a ".wh." name, a long path) goes to Python as before.
 * UnionView (layerfs/union/view.py) is the reference: union_dir tells us which lower
 * directory, if any, a directory is merged with; _prepare_new, create and _new_file say what a
 * new file must be. */

#define WH_PREFIX ".wh."
#define ACL_DEFAULT_XATTR "system.posix_acl_default"

/* Queue a C-made handle for the ops to adopt before the next call into Python (which may be
 * a request naming this handle). */
static int adopt_later(Session *s, struct handle *h)
{
    if (s->nadopt == s->adoptcap) {
        size_t cap = s->adoptcap ? s->adoptcap * 2 : 16;
        struct handle **a = realloc(s->adopt, cap * sizeof(*a));
        if (!a)
            return -1;
        s->adopt = a;
        s->adoptcap = cap;
    }
    s->adopt[s->nadopt++] = h;
    h->adopt_pending = 1;
    return 0;
}

static void adopt_cancel(Session *s, struct handle *h)
{
    for (size_t i = s->nadopt; i-- > 0;) /* mostly the last one: a create, a write, a close */
        if (s->adopt[i] == h) {
            s->adopt[i] = s->adopt[--s->nadopt];
            break;
        }
    h->adopt_pending = 0;
}

/* A handle of an upper file C opened read-write (fd), for the ops to adopt later; NULL when
 * memory runs out (fd is then still the caller's). */
static struct handle *c_handle(Session *s, int fd, uint64_t node)
{
    struct handle *h = handle_new(NULL, fd, node);
    if (!h)
        return NULL;
    h->c_fd = 1;
    h->fd_rdwr = 1;
    if (adopt_later(s, h) < 0) {
        free(h);
        return NULL;
    }
    return h;
}

/* The view numbers upper object host_ino as `number` (UnionView._upper_ino). */
static int made_here(Session *s, uint64_t host_ino, uint64_t number)
{
    if (s->nmade == s->madecap) {
        size_t cap = s->madecap ? s->madecap * 2 : 64;
        uint64_t *m = realloc(s->made, 2 * cap * sizeof(*m));
        if (!m)
            return -1;
        s->made = m;
        s->madecap = cap;
    }
    s->made[2 * s->nmade] = host_ino;
    s->made[2 * s->nmade + 1] = number;
    s->nmade++;
    return 0;
}

/* Tell Python what was made without it: the numbers of new and copied-up files by host inode
 * (whatever an earlier file of that host inode was numbered) and the handles of those still
 * open.  Called with the GIL, before any request goes to Python. */
static void tell_python(Session *s)
{
    if (s->nmade) {
        PyObject *list = PyList_New((Py_ssize_t)s->nmade);
        for (size_t i = 0; list && i < s->nmade; i++)
            PyList_SET_ITEM(list, (Py_ssize_t)i, Py_BuildValue("(KK)", s->made[2 * i], s->made[2 * i + 1]));
        PyObject *res = list ? PyObject_CallMethod(s->ops, "made", "O", list) : NULL;
        if (!res)
            PyErr_Print();
        Py_XDECREF(res);
        Py_XDECREF(list);
        s->nmade = 0;
    }
    for (size_t i = 0; i < s->nadopt; i++) {
        struct handle *h = s->adopt[i];
        PyObject *fh = PyObject_CallMethod(s->ops, "adopt", "i", h->fd);
        if (fh) {
            h->pyfh = fh; /* the view's now: it closes the descriptor at release */
            h->c_fd = 0;
        } else {
            PyErr_Print();
            Py_INCREF(Py_None);
            h->pyfh = Py_None; /* requests naming it fail in Python (EBADF), none crashes */
        }
        h->adopt_pending = 0;
    }
    s->nadopt = 0;
}

static int upper_dir_fd(Session *s, struct node *p);

/* Neither setgid nor with a default ACL: what a new object there gets is its maker's (dfd: the
 * upper directory, or -1). */
static int dir_is_plain(int dfd)
{
    struct stat st;
    return dfd >= 0 && fstat(dfd, &st) == 0 && !(st.st_mode & S_ISGID) &&
           fgetxattr(dfd, ACL_DEFAULT_XATTR, NULL, 0) < 0 && (errno == ENODATA || errno == EOPNOTSUPP);
}

/* Ask Python what directory `id` is in the union, unless known since the last change. */
static int load_dir_state(Session *s, struct node *p)
{
    if (p->dir_gen == s->union_gen)
        return p->dir_state;
    p->dir_state = DIR_PYTHON;
    p->dir_gen = s->union_gen;
    int err = 0;
    PyObject *path = path_bytes(s, p->id, &s->pb2, &err);
    PyObject *res = path ? PyObject_CallMethod(s->ops, "union_dir", "O", path) : NULL;
    Py_XDECREF(path);
    if (!res) {
        PyErr_Clear();
        return DIR_PYTHON;
    }
    long long v = PyLong_AsLongLong(res);
    Py_DECREF(res);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return DIR_PYTHON;
    }
    if (v == 0) {
        p->dir_state = DIR_UPPER;
    } else if (v > 0) {
        p->dir_state = DIR_MERGED;
        p->dir_lower = (uint64_t)v; /* (layerfs-overlay: the lower directory's layers) */
    }
    /* what decides a new file's group and mode besides the caller: a setgid directory gives its
     * group, a default ACL the mode (_new_gid, _new_mode); files there are Python's to make.
     * SETATTR and SETXATTR move union_gen, so this is asked again after a change */
    p->dir_plain = p->dir_state != DIR_PYTHON && dir_is_plain(upper_dir_fd(s, p));
    return p->dir_state;
}

/* 1 when Python has just told the state of directory `id` and C may decide about names in it
 * (rw_fast, without the GIL, could not ask): try the C path again. */
static int learn_dir_state(Session *s, uint64_t id)
{
    struct node *p = s->upper_fd >= 0 ? node_get(&s->t, id) : NULL;
    if (!p || p->lower || p->dir_gen == s->union_gen)
        return 0;
    return load_dir_state(s, p) != DIR_PYTHON;
}

/* The parent node of a new name, if C may decide about names in it (Python told its state). */
static struct node *upper_parent(Session *s, uint64_t parent, const char *name, size_t len)
{
    if (s->upper_fd < 0 || len == 0 || len > 255 || (len >= 4 && memcmp(name, WH_PREFIX, 4) == 0) ||
        (name[0] == '.' && (len == 1 || (len == 2 && name[1] == '.'))))
        return NULL;
    struct node *p = node_get(&s->t, parent);
    if (!p || p->lower || p->dir_gen != s->union_gen || p->dir_state == DIR_PYTHON)
        return NULL;
    return p;
}

/* The upper directory of node `p`, open (O_RDONLY: its xattrs can be read) and kept in the
 * session's few slots until union_gen moves (a rename or rmdir may have moved it); -1 if it
 * does not open.  Not the caller's to close. */
static int upper_dir_fd(Session *s, struct node *p)
{
    struct dir_slot *d = &s->dirs[p->id % DIR_SLOTS];
    if (d->fd > 0 && d->id == p->id && d->gen == s->union_gen)
        return d->fd;
    if (node_path(&s->t, p->id, &s->pb2) < 0 || s->pb2.len >= PATH_MAX - 1 || pb_reserve(&s->pb2, 1))
        return -1;
    s->pb2.p[s->pb2.len] = 0;
    int fd = openat(s->upper_fd, s->pb2.len ? s->pb2.p : ".", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return -1;
    if (d->fd > 0)
        close(d->fd);
    d->id = p->id;
    d->gen = s->union_gen;
    d->fd = fd;
    return fd;
}

static int stack_entry(Session *s, uint64_t pm, const char *path, size_t plen, size_t noff, struct fuse_attr *a,
                       uint64_t *layers);
static int stack_child_path(Session *s, uint64_t parent, const char *name, size_t len, size_t *noff);

/* What `name` shows in directory p (open as dfd) where the upper directory has no entry of
 * it (a whiteout is one) and no fallback whiteout: 1 nothing; 2 the lower entry, its
 * attributes in *a and its mark (as remember's `lower`) in *lower; 0 Python decides. */
static int merged_name(Session *s, struct node *p, int dfd, const char *name, size_t len, struct fuse_attr *a,
                       uint64_t *lower)
{
    struct stat st;
    if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 || errno != ENOENT)
        return 0;
    if (p->dir_state != DIR_MERGED)
        return 1;
    char wh[4 + 256];
    memcpy(wh, WH_PREFIX, 4);
    memcpy(wh + 4, name, len + 1);
    if (fstatat(dfd, wh, &st, AT_SYMLINK_NOFOLLOW) == 0 || (errno != ENOENT && errno != ENAMETOOLONG))
        return 0;
    if (s->nlayers) {
        size_t noff;
        if (stack_child_path(s, p->id, name, len, &noff) < 0)
            return 0;
        int r = stack_entry(s, p->dir_lower, s->pb.p, s->pb.len, noff, a, lower);
        return r < 0 ? 0 : r == 0 ? 1 : 2;
    }
    struct fs_store *st_ = s->lower_reader;
    uint64_t ino;
    struct fs_inode n;
    if (!st_ || fs_store_begin(st_) < 0)
        return 0;
    int r = fs_store_lookup(st_, p->dir_lower, name, len, &ino);
    if (r == 0 && fs_store_inode(st_, ino, &n) == 0) {
        attr_from_inode(a, ino, &n);
        *lower = 1;
        r = 2;
    } else {
        r = r == -ENOENT ? 1 : 0;
    }
    fs_store_end(st_);
    return r;
}

/* The entry of a lower object (name, attributes a, `lower` as remember's) remembered and
 * replied: 1; 0 if the node is known as an upper one (another name of it was copied up): Python's. */
static int reply_lower_entry(Session *s, uint64_t u, uint64_t parent, const char *name, size_t len,
                             const struct fuse_attr *a, uint64_t lower)
{
    struct node *known = node_get(&s->t, a->ino);
    if (known && !known->lower)
        return 0;
    struct fuse_entry_out e;
    int r = remember(s, parent, name, len, a, lower);
    if (r < 0) {
        reply_err(s, u, -r);
        return 1;
    }
    fill_entry(s, &e, a);
    reply(s, u, 0, &e, sizeof(e));
    return 1;
}

/* 1: `name` shows nothing in directory p (open as dfd).  0: something, or Python decides. */
static int name_is_free(Session *s, struct node *p, int dfd, const char *name, size_t len)
{
    struct fuse_attr a;
    uint64_t lower;
    return merged_name(s, p, dfd, name, len, &a, &lower) == 1;
}

/* LOOKUP in a directory C may decide about of a name the upper directory has not: a negative
 * entry, or the lower entry of a merged directory. */
static int upper_lookup(Session *s, uint64_t u, uint64_t parent, const char *name, size_t len)
{
    struct node *p = upper_parent(s, parent, name, len);
    if (!p)
        return 0;
    int dfd = upper_dir_fd(s, p);
    struct fuse_attr a;
    uint64_t lower = 0;
    int r = dfd < 0 ? 0 : merged_name(s, p, dfd, name, len, &a, &lower);
    if (r == 0)
        return 0;
    if (r == 2) /* a lower entry of a merged directory: the layers' as they are, as fast_lookup */
        return reply_lower_entry(s, u, parent, name, len, &a, lower);
    s->free_parent = parent;
    s->free_seq = s->change_seq;
    s->free_len = len;
    memcpy(s->free_name, name, len);
    struct fuse_entry_out e;
    memset(&e, 0, sizeof(e));
    split_timeout(s->negative_timeout, &e.entry_valid, &e.entry_valid_nsec);
    dentry_forget(&s->t, parent, name, len);
    reply(s, u, 0, &e, sizeof(e));
    return 1;
}

/* 1: the lower layers have nothing at `name` in upper directory p (whose state is known), so
 * removing or moving the upper entry there leaves nothing to hide; 0: something, or not known. */
static int nothing_below(Session *s, struct node *p, const char *name, size_t len)
{
    if (p->dir_state != DIR_MERGED)
        return p->dir_state == DIR_UPPER;
    if (s->nlayers) {
        struct fuse_attr a;
        uint64_t layers;
        size_t noff;
        return stack_child_path(s, p->id, name, len, &noff) == 0 &&
               stack_entry(s, p->dir_lower, s->pb.p, s->pb.len, noff, &a, &layers) == 0;
    }
    struct fs_store *st = s->lower_reader;
    uint64_t ino;
    if (!st || fs_store_begin(st) < 0)
        return 0;
    int r = fs_store_lookup(st, p->dir_lower, name, len, &ino);
    fs_store_end(st);
    return r == -ENOENT;
}

/* UNLINK of a non-directory in a directory of the upper directory C may decide about: of a lower
 * one, the work directory's shared whiteout linked at the name, as UnionView._whiteout does; of
 * an upper one with nothing below it, the upper entry.  0: Python's (a copied-up file, which
 * needs both; no shared whiteout yet: Python makes it; an unprivileged daemon's .wh. files). */
static int upper_unlink(Session *s, uint64_t u, uint64_t parent, const char *name, size_t len)
{
    struct node *p = upper_parent(s, parent, name, len);
    struct dentry *d = p ? dentry_get(&s->t, parent, name, len) : NULL;
    if (!d || S_ISDIR(d->node->attr.mode))
        return 0;
    int dfd = upper_dir_fd(s, p);
    if (dfd < 0)
        return 0;
    if (!d->node->lower) { /* an upper file with nothing below it: gone with its name */
        struct stat st;
        if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0 || S_ISDIR(st.st_mode) ||
            (S_ISCHR(st.st_mode) && st.st_rdev == 0) || !nothing_below(s, p, name, len))
            return 0;
        if (unlinkat(dfd, name, 0) < 0) {
            reply_err(s, u, errno);
            return 1;
        }
    } else if (s->work_fd < 0 || linkat(s->work_fd, "whiteout", dfd, name, 0) < 0) {
        return 0;
    }
    s->change_seq++;
    unmark_child(s, parent, name, len); /* (another name of it is the layers' no longer either) */
    dentry_forget(&s->t, parent, name, len);
    reply_err(s, u, 0);
    return 1;
}

static void attr_from_stat(struct fuse_attr *a, uint64_t ino, const struct stat *st)
{
    memset(a, 0, sizeof(*a));
    a->ino = ino;
    a->mode = st->st_mode;
    a->nlink = (uint32_t)st->st_nlink;
    a->uid = st->st_uid;
    a->gid = st->st_gid;
    a->rdev = (uint32_t)st->st_rdev;
    a->size = (uint64_t)st->st_size;
    a->blocks = (uint64_t)st->st_blocks;
    a->blksize = 4096; /* as attr_from_tuple */
    a->atime = (uint64_t)st->st_atim.tv_sec;
    a->atimensec = (uint32_t)st->st_atim.tv_nsec;
    a->mtime = (uint64_t)st->st_mtim.tv_sec;
    a->mtimensec = (uint32_t)st->st_mtim.tv_nsec;
    a->ctime = (uint64_t)st->st_ctim.tv_sec;
    a->ctimensec = (uint32_t)st->st_ctim.tv_nsec;
}

/* The host object of an upper node with one name (not a directory), through its parent's
 * upper directory: *dfd and name (room for 256) say where; -1 where that is not the node (a name
 * changed behind the mount's back, a node without a name, or with several: Python's). */
static int upper_place(Session *s, const struct node *n, int *dfd, char *name, struct stat *st)
{
    const struct dentry *d = n->names;
    if (!d || d->nnext || d->len > 255)
        return -1;
    struct node *p = node_get(&s->t, d->parent);
    if (!p || p->lower || (*dfd = upper_dir_fd(s, p)) < 0)
        return -1;
    memcpy(name, d->name, d->len);
    name[d->len] = 0;
    if (fstatat(*dfd, name, st, AT_SYMLINK_NOFOLLOW) < 0 || (st->st_mode & S_IFMT) != (n->attr.mode & S_IFMT))
        return -1;
    return 0;
}

static int upper_stat(Session *s, const struct node *n, struct stat *st)
{
    int dfd;
    char name[256];
    return upper_place(s, n, &dfd, name, st);
}

/* Reply to a GETATTR or SETATTR of upper node n with the host's attributes st. */
static int reply_upper_attr(Session *s, uint64_t u, struct node *n, const struct stat *st)
{
    struct fuse_attr_out o;
    memset(&o, 0, sizeof(o));
    attr_from_stat(&o.attr, n->attr.ino, st);
    n->attr = o.attr;
    split_timeout(attr_timeout_of(s, n->id), &o.attr_valid, &o.attr_valid_nsec);
    reply(s, u, 0, &o, sizeof(o));
    return 1;
}

/* GETATTR of a directory of the upper directory whose union state is known (load_dir_state):
 * the host directory's attributes, with one link if lower directories merge into it, as
 * UnionView.lookup answers.  Every CREATE, MKNOD or UNLINK in a directory makes the kernel ask
 * this before its next permission check there (fuse_dir_changed drops the mode it holds). */
static int upper_getattr(Session *s, uint64_t u, struct node *n)
{
    if (!n || !n->has_attr || s->upper_fd < 0)
        return 0;
    struct stat st;
    if (!S_ISDIR(n->attr.mode)) { /* a file or symlink with one name, as the kernel asks after a write */
        if (!(S_ISREG(n->attr.mode) || S_ISLNK(n->attr.mode)) || upper_stat(s, n, &st) < 0)
            return 0;
        return reply_upper_attr(s, u, n, &st);
    }
    if (n->dir_gen != s->union_gen || n->dir_state == DIR_PYTHON)
        return 0;
    int dfd = upper_dir_fd(s, n);
    if (dfd < 0 || fstat(dfd, &st) < 0 || !S_ISDIR(st.st_mode))
        return 0;
    if (n->dir_state == DIR_MERGED)
        st.st_nlink = 1;
    return reply_upper_attr(s, u, n, &st);
}

/* One side of a SETATTR's times as utimensat takes it; -1 where a 32-bit time_t cannot hold it. */
static int setattr_time(uint32_t valid, uint32_t set, uint32_t now, uint64_t sec, uint32_t nsec, struct timespec *ts)
{
    ts->tv_sec = 0;
    ts->tv_nsec = valid & now ? UTIME_NOW : valid & set ? (long)nsec : UTIME_OMIT;
    if ((valid & (set | now)) == set) {
        if ((int64_t)sec != (int64_t)(time_t)sec)
            return -1;
        ts->tv_sec = (time_t)sec;
    }
    return 0;
}

/* SETATTR of an object of the upper directory (not one only the lower layers have): what
 * LayerOps.setattr does there (chmod, chown, times, in that order), on the host object through
 * its parent's upper directory.  A tar -x or cp -a sends three per file (fchown, fchmod,
 * utimensat).  Left to Python: a size (copy_busy), a symlink's mode (EOPNOTSUPP there), a
 * directory whose union state is not known (its link count), what upper_place refuses. */
static int upper_setattr(Session *s, uint64_t u, struct node *n, const struct fuse_setattr_in *in)
{
    const uint32_t ours = FATTR_MODE | FATTR_UID | FATTR_GID | FATTR_ATIME | FATTR_MTIME | FATTR_FH |
                          FATTR_ATIME_NOW | FATTR_MTIME_NOW | FATTR_LOCKOWNER | FATTR_CTIME;
    if (!n || !n->has_attr || s->upper_fd < 0 || (in->valid & ~ours))
        return 0;
    uint32_t mode = n->attr.mode;
    int dir = S_ISDIR(mode);
    if (!(S_ISREG(mode) || S_ISLNK(mode) || dir) || (S_ISLNK(mode) && (in->valid & FATTR_MODE)) ||
        (dir && (n->dir_gen != s->union_gen || n->dir_state == DIR_PYTHON)))
        return 0;
    struct timespec ts[2];
    if (setattr_time(in->valid, FATTR_ATIME, FATTR_ATIME_NOW, in->atime, in->atimensec, &ts[0]) < 0 ||
        setattr_time(in->valid, FATTR_MTIME, FATTR_MTIME_NOW, in->mtime, in->mtimensec, &ts[1]) < 0)
        return 0;
    int dfd;
    char name[256];
    struct stat st;
    if (upper_place(s, n, &dfd, name, &st) < 0)
        return 0;
    int err = 0;
    if ((in->valid & FATTR_MODE) && fchmodat(dfd, name, in->mode & 07777, 0) < 0)
        err = errno;
    if (!err && (in->valid & (FATTR_UID | FATTR_GID)) &&
        fchownat(dfd, name, in->valid & FATTR_UID ? in->uid : (uid_t)-1, in->valid & FATTR_GID ? in->gid : (gid_t)-1,
                 AT_SYMLINK_NOFOLLOW) < 0)
        err = errno;
    if (!err && (ts[0].tv_nsec != UTIME_OMIT || ts[1].tv_nsec != UTIME_OMIT) &&
        utimensat(dfd, name, ts, AT_SYMLINK_NOFOLLOW) < 0)
        err = errno;
    if (!err && fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
        err = errno;
    if (err) {
        reply_err(s, u, err);
        return 1;
    }
    if (dir) {
        if (n->dir_state == DIR_MERGED)
            st.st_nlink = 1; /* as upper_getattr */
        /* made setgid or not: new objects there are C's to make or Python's (upper_create) */
        n->dir_plain = dir_is_plain(upper_dir_fd(s, n));
    }
    return reply_upper_attr(s, u, n, &st);
}

/* The directory where a new object `name` may be made by C, open as *dfd: an upper directory
 * whose state Python told, neither setgid nor with a default ACL, where the name shows nothing
 * (or NULL: Python's). */
static struct node *new_name_parent(Session *s, uint64_t parent, const char *name, size_t len, int *dfd)
{
    struct node *p = upper_parent(s, parent, name, len);
    if (!p || !p->dir_plain || (*dfd = upper_dir_fd(s, p)) < 0)
        return NULL;
    /* free, as the LOOKUP just before found (nothing changed since), or as we look now */
    int known_free = s->free_parent == parent && s->free_seq == s->change_seq && s->free_len == len &&
                     memcmp(s->free_name, name, len) == 0;
    if (!known_free && !name_is_free(s, p, *dfd, name, len))
        return NULL;
    s->change_seq++;
    return p;
}

/* The object just made at (dfd, name): given the caller's owner and `mode` (unless a symlink)
 * where the host did not, numbered as the view numbers new objects, remembered, its attributes
 * in *a.  An error undoes the making. */
static int new_object_done(Session *s, uint64_t parent, int dfd, const char *name, size_t len, int is_dir,
                           mode_t mode, const struct fuse_in_header *ih, struct fuse_attr *a)
{
    struct stat st;
    int r = 0;
    if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
        r = -errno;
    int link = !r && S_ISLNK(st.st_mode);
    if (!r && (st.st_uid != ih->uid || st.st_gid != ih->gid || (!link && (st.st_mode & 07777) != mode))) {
        /* the owner first: a chown drops set-id bits, which the mode then gives back */
        if (fchownat(dfd, name, ih->uid, ih->gid, AT_SYMLINK_NOFOLLOW) < 0 ||
            (!link && fchmodat(dfd, name, mode, 0) < 0) || fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
            r = -errno;
    }
    if (!r) {
        attr_from_stat(a, (uint64_t)st.st_ino + s->upper_ino, &st);
        r = made_here(s, (uint64_t)st.st_ino, a->ino);
    }
    if (!r)
        r = remember(s, parent, name, len, a, 0);
    if (r)
        unlinkat(dfd, name, is_dir ? AT_REMOVEDIR : 0);
    else /* (nothing new has a capability: a chown's GETXATTR of it need not reach Python) */
        node_get(&s->t, a->ino)->no_caps = 1;
    return r;
}

/* MKDIR where the name is free in a plain upper directory (new_name_parent): what
 * UnionView.mkdir does there (nothing below it to hide: no opaque mark). */
static int upper_mkdir(Session *s, uint64_t u, uint64_t parent, const struct fuse_mkdir_in *in, const char *name,
                       size_t len, const struct fuse_in_header *ih)
{
    int dfd;
    if (!new_name_parent(s, parent, name, len, &dfd))
        return 0;
    mode_t want = in->mode & ~in->umask & 07777;
    struct fuse_entry_out e;
    struct fuse_attr a;
    int r = mkdirat(dfd, name, want) < 0 ? -errno : new_object_done(s, parent, dfd, name, len, 1, want, ih, &a);
    if (r) {
        reply_err(s, u, -r);
        return 1;
    }
    /* what union_dir would say: the upper's alone; plain unless made setgid (no default ACL
     * to inherit from a plain parent) */
    struct node *n = node_get(&s->t, a.ino);
    n->dir_state = DIR_UPPER;
    n->dir_gen = s->union_gen;
    n->dir_plain = !(a.mode & S_ISGID);
    fill_entry(s, &e, &a);
    reply(s, u, 0, &e, sizeof(e));
    return 1;
}

/* SYMLINK where the name is free in a plain upper directory: what UnionView.symlink does. */
static int upper_symlink(Session *s, uint64_t u, uint64_t parent, const char *name, size_t len, const char *target,
                         const struct fuse_in_header *ih)
{
    int dfd;
    if (!new_name_parent(s, parent, name, len, &dfd))
        return 0;
    struct fuse_entry_out e;
    struct fuse_attr a;
    int r = symlinkat(target, dfd, name) < 0 ? -errno : new_object_done(s, parent, dfd, name, len, 0, 0, ih, &a);
    if (r) {
        reply_err(s, u, -r);
        return 1;
    }
    fill_entry(s, &e, &a);
    reply(s, u, 0, &e, sizeof(e));
    return 1;
}

/* RENAME of an upper file or symlink that has no lower entry behind it (nothing to white
 * out where it was) to a name of a plain upper directory that shows nothing, a lower non-directory
 * (the upper name now hides it) or an upper non-directory (replaced): one renameat, what
 * UnionView.rename comes to there.  A package manager's unpack is such renames (x.dpkg-new to x).
 * Python's: directories, RENAME_EXCHANGE, whiteouts, what these checks cannot tell. */
static int upper_rename(Session *s, uint64_t u, uint64_t olddir, const char *oldname, size_t oldlen, uint64_t newdir,
                        const char *newname, size_t newlen, uint32_t flags)
{
    if (flags & ~(uint32_t)RENAME_NOREPLACE)
        return 0;
    struct dentry *moved = dentry_get(&s->t, olddir, oldname, oldlen);
    struct node *src = moved ? moved->node : NULL;
    if (!src || src->lower || !src->has_attr || !(S_ISREG(src->attr.mode) || S_ISLNK(src->attr.mode)))
        return 0;
    struct node *p1 = upper_parent(s, olddir, oldname, oldlen), *p2 = upper_parent(s, newdir, newname, newlen);
    /* (both directories open at once: not in one slot of upper_dir_fd's) */
    if (!p1 || !p2 || !p2->dir_plain || (p1 != p2 && p1->id % DIR_SLOTS == p2->id % DIR_SLOTS))
        return 0;
    int dfd1 = upper_dir_fd(s, p1);
    struct stat st;
    if (dfd1 < 0 || fstatat(dfd1, oldname, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
        (st.st_mode & S_IFMT) != (src->attr.mode & S_IFMT))
        return 0;
    if (!nothing_below(s, p1, oldname, oldlen)) /* it would show once the source moves */
        return 0;
    int dfd2 = upper_dir_fd(s, p2);
    if (dfd2 < 0)
        return 0;
    struct fuse_attr a;
    uint64_t lower = 0;
    int r = merged_name(s, p2, dfd2, newname, newlen, &a, &lower);
    if (r == 0) { /* an upper entry there, or a whiteout: a file or symlink is replaced */
        if (fstatat(dfd2, newname, &st, AT_SYMLINK_NOFOLLOW) < 0 || S_ISDIR(st.st_mode) ||
            (S_ISCHR(st.st_mode) && st.st_rdev == 0) || (flags & RENAME_NOREPLACE))
            return 0;
    } else if (r == 2 && S_ISDIR(a.mode)) {
        return 0;
    }
    if (renameat2(dfd1, oldname, dfd2, newname, flags) < 0) {
        reply_err(s, u, errno);
        return 1;
    }
    s->change_seq++;
    unmark_child(s, newdir, newname, newlen); /* (a lower file hidden now: not the layers' there) */
    src->nlookup++; /* hold it while its name moves, as do_rename */
    dentry_drop(&s->t, moved);
    dentry_set(&s->t, newdir, newname, newlen, src); /* drops the replaced name too */
    src->nlookup--;
    node_maybe_free(&s->t, src);
    reply_err(s, u, 0);
    return 1;
}

/* CREATE of a new regular file where the name is free (name_is_free) in a directory of the
 * upper directory, not setgid and without a default ACL: what UnionView.create does there. */
static int upper_create(Session *s, uint64_t u, uint64_t parent, const struct fuse_create_in *in, const char *name,
                        size_t len, const struct fuse_in_header *ih)
{
    int dfd;
    if (!new_name_parent(s, parent, name, len, &dfd))
        return 0;
    /* read-write whatever the caller asked (the kernel holds it to its own open mode): a
     * passthrough backing other opens can share, without opening the file again */
    uint32_t how_open = (in->flags & ~(uint32_t)(O_DIRECT | O_ACCMODE)) | O_RDWR;
    mode_t want = in->mode & ~in->umask & 07777;
    int fd = openat(dfd, name, (int)how_open | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, want);
    if (fd < 0) {
        reply_err(s, u, errno);
        return 1;
    }
    /* mostly the daemon's owner is the caller's and its umask keeps the mode: nothing to set.
     * Else the owner first: a chown drops set-id bits, which the mode then gives back */
    struct stat st;
    int fixed = fstat(fd, &st) == 0 && st.st_uid == ih->uid && st.st_gid == ih->gid && (st.st_mode & 07777) == want;
    if (!fixed && (fchown(fd, ih->uid, ih->gid) < 0 || fchmod(fd, want) < 0 || fstat(fd, &st) < 0)) {
        int err = errno;
        close(fd);
        unlinkat(dfd, name, 0);
        reply_err(s, u, err);
        return 1;
    }
    struct fuse_attr a;
    attr_from_stat(&a, (uint64_t)st.st_ino + s->upper_ino, &st);
    struct handle *h = NULL;
    int r = made_here(s, (uint64_t)st.st_ino, a.ino);
    if (r == 0)
        r = remember(s, parent, name, len, &a, 0);
    if (r == 0)
        h = c_handle(s, fd, a.ino);
    if (!h) {
        close(fd);
        reply_err(s, u, r < 0 ? -r : ENOMEM);
        return 1;
    }
    struct {
        struct fuse_entry_out e;
        struct fuse_open_out o;
    } out;
    struct node *n = node_get(&s->t, a.ino);
    n->opens++;
    n->no_caps = 1; /* a new file has no capability: spare the GETXATTR of its first write */
    fill_entry(s, &out.e, &a);
    memset(&out.o, 0, sizeof(out.o));
    out.o.fh = (uint64_t)(uintptr_t)h;
    int how = open_mode(s, h, n, in->flags, &out.o.padding);
    if (how < 0) {
        handle_close(s, h, 0);
        reply_err(s, u, -how);
        return 1;
    }
    out.o.open_flags = (uint32_t)how;
    reply(s, u, 0, &out, sizeof(out));
    return 1;
}


/* Set a copy's xattr, as _copy_one does: what the host refuses (EPERM, ENOTSUP) is left out. */
static int copy_xattr(int fd, const char *name, const void *value, size_t len)
{
    if (fsetxattr(fd, name, value, len, 0) == 0 || errno == EPERM || errno == ENOTSUP)
        return 0;
    return -errno;
}

/* The last of a copy's metadata: the inode number it keeps, then atime and mtime the lower
 * file's mtime. */
static int copy_number_times(int fd, uint64_t ino, time_t sec, uint32_t nsec)
{
    unsigned char num[8];
    for (int i = 0; i < 8; i++)
        num[i] = (unsigned char)(ino >> (8 * i)); /* <Q, as view._INO */
    static const char *const ino_xattrs[] = {"trusted.overlay.layerfs.ino", "user.overlay.layerfs.ino"};
    for (int i = 0; i < 2; i++) {
        if (fsetxattr(fd, ino_xattrs[i], num, sizeof(num), 0) == 0)
            break;
        if (errno != EPERM && errno != ENOTSUP)
            return -errno;
    }
    struct timespec ts[2] = {{sec, (long)nsec}, {sec, (long)nsec}};
    return futimens(fd, ts) < 0 ? -errno : 0;
}

/* The lower file's metadata onto its copy (open as fd), as UnionView._copy_one gives it: owner,
 * then mode (a chown drops set-id bits), xattrs, the inode number it keeps, times.  *caps: the
 * file has a security.capability. */
static int copy_meta(int fd, const struct fs_inode *fi, uint64_t ino, int *caps)
{
    if (fchown(fd, fi->uid, fi->gid) < 0 || fchmod(fd, fi->mode & 07777) < 0)
        return -errno;
    char name[256 + 1];
    const char *xn, *xv;
    size_t nl, vl;
    struct xattr_it it = {0, 0};
    int more;
    *caps = 0;
    while ((more = next_xattr(fi, &it, &xn, &nl, &xv, &vl)) > 0) {
        if (nl > 256)
            return -EIO;
        memcpy(name, xn, nl);
        name[nl] = 0;
        *caps |= strcmp(name, CAPS_XATTR) == 0;
        int r = copy_xattr(fd, name, xv, vl);
        if (r < 0)
            return r;
    }
    if (more < 0)
        return -EIO;
    int64_t sec;
    uint32_t nsec;
    split_ns(fi->mtime_ns, &sec, &nsec);
    return copy_number_times(fd, ino, (time_t)sec, nsec);
}

/* The end of a copy-up: the copy `tmp`, made in the work directory from node n's lower file
 * (r < 0: that failed, with -r), renamed into place as its name d in upper directory dfd,
 * whose times (ds) it keeps; then opened as the caller asked, read-write, for the ops to adopt.
 * `caps`: the copy has a security.capability. */
static int copy_up_place(Session *s, uint64_t u, struct node *n, struct dentry *d, int dfd, const struct stat *ds,
                         const char *tmp, int r, int caps, uint32_t flags)
{
    if (r >= 0 && renameat(s->work_fd, tmp, dfd, d->name) < 0)
        r = -errno;
    if (r < 0) {
        unlinkat(s->work_fd, tmp, 0);
        reply_err(s, u, -r);
        return 1;
    }
    /* a copy-up is no change of its directory: its times stay (_parent_times_kept) */
    struct timespec dts[2] = {ds->st_atim, ds->st_mtim};
    futimens(dfd, dts);
    s->change_seq++;
    n->lower = 0; /* the upper directory has it now */
    /* the copy, opened as the caller asked but read-write (a backing other opens can share) */
    uint32_t how = (flags & ~(uint32_t)(O_DIRECT | O_ACCMODE | O_CREAT | O_EXCL)) | O_RDWR;
    int fd = openat(dfd, d->name, (int)how | O_NOFOLLOW | O_CLOEXEC);
    struct stat cs;
    if (fd < 0 || fstat(fd, &cs) < 0) {
        int err = errno;
        if (fd >= 0)
            close(fd);
        reply_err(s, u, err);
        return 1;
    }
    n->no_caps = !caps;
    struct handle *h = made_here(s, (uint64_t)cs.st_ino, n->id) == 0 ? c_handle(s, fd, n->id) : NULL;
    if (!h) {
        close(fd);
        reply_err(s, u, ENOMEM);
        return 1;
    }
    finish_open(s, u, h, flags);
    return 1;
}

/* A new file in the work directory for a copy-up (its name into tmp); -1 if none. */
static int copy_up_file(Session *s, char *tmp, size_t size)
{
    snprintf(tmp, size, "copyup-%d-c%llu", (int)getpid(), (unsigned long long)++s->copies);
    return openat(s->work_fd, tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
}

static int stack_copy_up(Session *s, uint64_t u, struct node *n, struct dentry *d, int dfd, const struct stat *ds,
                         uint32_t flags);

/* OPEN to write (or truncate) a lower file, alone in its inode (no other names to link), in a
 * directory already in the upper directory: the copy-up of UnionView._copy_one, here - the
 * bytes into a new file of the work directory, its metadata, then renamed into place with its
 * directory's times kept.  From the store (this function) or from a layer's own file
 * (stack_copy_up).  0: Python's. */
static int upper_copy_up(Session *s, uint64_t u, uint64_t id, uint32_t flags)
{
    struct node *n = node_get(&s->t, id);
    if (s->work_fd < 0 || !n || !n->lower || !n->names || n->names->nnext || !S_ISREG(n->attr.mode))
        return 0;
    struct dentry *d = n->names;
    struct node *p = upper_parent(s, d->parent, d->name, d->len);
    struct fs_store *st = s->lower_reader;
    struct stat ds;
    if (!p || copy_busy(s, id))
        return 0;
    int dfd = upper_dir_fd(s, p);
    if (dfd < 0 || fstat(dfd, &ds) < 0)
        return 0;
    if (s->nlayers)
        return stack_copy_up(s, u, n, d, dfd, &ds, flags);
    if (!st || fs_store_begin(st) < 0)
        return 0;
    struct fs_inode fi;
    int r = fs_store_inode(st, id, &fi);
    if (r < 0 || fi.nlink != 1 || !S_ISREG(fi.mode)) {
        fs_store_end(st);
        return 0;
    }
    char tmp[64];
    int fd = copy_up_file(s, tmp, sizeof(tmp));
    if (fd < 0) {
        fs_store_end(st);
        return 0; /* Python says why */
    }
    char *buf = s->buf + BUF_SIZE;
    for (uint64_t off = 0; !(flags & O_TRUNC) && off < fi.size && r >= 0;) {
        long got = fs_store_read(st, &fi, id, buf, MAX_WRITE, off);
        if (got <= 0) {
            r = got < 0 ? (int)got : -EIO;
            break;
        }
        for (long w = 0; w < got;) {
            ssize_t put = pwrite(fd, buf + w, (size_t)(got - w), (off_t)(off + (uint64_t)w));
            if (put < 0) {
                r = -errno;
                break;
            }
            w += put;
        }
        off += (uint64_t)got;
    }
    int caps = 0;
    if (r >= 0)
        r = copy_meta(fd, &fi, id, &caps);
    if (r == -EIO)
        report_damage(s, st, id, &fi);
    fs_store_end(st);
    close(fd);
    return copy_up_place(s, u, n, d, dfd, &ds, tmp, r, caps, flags);
}

/* ---- layerfs-overlay's lower layers (host directories), without Python ----------------------
 * A writable mount over lowerdirs (a UnionView over a Stack of DirLayers, layerfs/union/lower.py)
 * gives C the layers' roots.  A `lower` node there (nothing of it in the upper directory) is
 * answered from them as Stack and DirLayer answer: the same probes in the same order, the same
 * numbers ((position + 1) << 48 | host inode) and attributes.  Directories that merge with the
 * upper directory, and every change, stay Python's. */

#define LAYER_SHIFT 48 /* lower.DIR_LAYER_SHIFT */
#define OPAQUE_FILE ".wh..wh..opq"

enum { L_MISSING, L_WHITEOUT, L_FOUND };

/* a path relative to a layer's root as the *at() calls take it ("" is the root itself) */
static const char *at_path(const char *path)
{
    return *path ? path : ".";
}

/* overlayfmt.is_opaque_dir: an opaque xattr of "y", else the fallback marker file */
static int layer_opaque(Session *s, int i, const char *path)
{
    static const char *const xattrs[] = {"trusted.overlay.opaque", "user.overlay.opaque"};
    char full[PATH_MAX + 32];
    int n = snprintf(full, sizeof(full), "/proc/self/fd/%d/%s", s->layer_fd[i], path);
    for (int k = 0; k < 2 && n > 0 && (size_t)n < sizeof(full); k++) {
        char v[2];
        if (lgetxattr(full, xattrs[k], v, sizeof(v)) == 1 && v[0] == 'y')
            return 1;
    }
    char marker[PATH_MAX];
    struct stat st;
    n = snprintf(marker, sizeof(marker), "%s%s" OPAQUE_FILE, path, *path ? "/" : "");
    return n > 0 && (size_t)n < sizeof(marker) && fstatat(s->layer_fd[i], marker, &st, AT_SYMLINK_NOFOLLOW) == 0;
}

/* DirLayer.probe: what layer i has at `path` (plen bytes, NUL-terminated, its last name at
 * noff): L_MISSING, L_WHITEOUT, or L_FOUND with its stat (and whether a directory is opaque);
 * -errno for what DirLayer would raise. */
static int layer_probe(Session *s, int i, const char *path, size_t plen, size_t noff, struct stat *st, int *opaque)
{
    *opaque = 0;
    if (fstatat(s->layer_fd[i], at_path(path), st, AT_SYMLINK_NOFOLLOW) < 0) {
        if (errno != ENOENT && errno != ENOTDIR)
            return -errno;
        char wh[PATH_MAX];
        struct stat w;
        if (!plen || plen + 4 >= sizeof(wh))
            return L_MISSING;
        memcpy(wh, path, noff); /* parent/.wh.name: the fallback whiteout */
        memcpy(wh + noff, WH_PREFIX, 4);
        memcpy(wh + noff + 4, path + noff, plen - noff + 1);
        return fstatat(s->layer_fd[i], wh, &w, AT_SYMLINK_NOFOLLOW) == 0 ? L_WHITEOUT : L_MISSING;
    }
    if (S_ISCHR(st->st_mode) && st->st_rdev == 0)
        return L_WHITEOUT;
    if (plen && plen - noff >= 4 && memcmp(path + noff, WH_PREFIX, 4) == 0)
        return L_MISSING; /* bookkeeping of the format, never an entry */
    if (S_ISDIR(st->st_mode))
        *opaque = layer_opaque(s, i, path);
    return L_FOUND;
}

/* Stack.lookup of `path` below a directory whose layers are `pm`: 1 with its attributes (as
 * UnionView._node_attr of DirLayer's node) and its `layers`; 0 if nothing shows there; -errno. */
static int stack_entry(Session *s, uint64_t pm, const char *path, size_t plen, size_t noff, struct fuse_attr *a,
                       uint64_t *layers)
{
    struct stat st, top;
    int found = -1, opaque;
    uint64_t active = 0;
    for (int i = 0; i < s->nlayers; i++) {
        if (!(pm >> i & 1))
            continue;
        int r = layer_probe(s, i, path, plen, noff, &st, &opaque);
        if (r < 0)
            return r;
        if (r == L_WHITEOUT) {
            if (found < 0)
                return 0;
            break;
        }
        if (r == L_MISSING)
            continue;
        if (found < 0) {
            found = i;
            top = st;
        }
        if (!S_ISDIR(st.st_mode)) /* the topmost entry, or what ends a directory's merge */
            break;
        active |= 1ull << i;
        if (opaque)
            break;
    }
    if (found < 0)
        return 0;
    attr_from_stat(a, ((uint64_t)(found + 1) << LAYER_SHIFT) | (uint64_t)top.st_ino, &top);
    if (S_ISDIR(top.st_mode) && (active & (active - 1)))
        a->nlink = 1; /* merged: one link, as overlayfs */
    if (S_ISCHR(top.st_mode) || S_ISBLK(top.st_mode) || S_ISFIFO(top.st_mode))
        a->size = 0;
    a->blocks = (a->size + 511) / 512;
    *layers = S_ISDIR(top.st_mode) ? active : 1ull << found;
    return 1;
}

/* The path of (parent, name) into s->pb, NUL-terminated, the name at *noff; -1 if the parent
 * has no name left or the path is too long for the *at() calls (Python's then). */
static int stack_child_path(Session *s, uint64_t parent, const char *name, size_t len, size_t *noff)
{
    if (node_path(&s->t, parent, &s->pb) < 0 || pb_reserve(&s->pb, len + 2))
        return -1;
    if (s->pb.len)
        s->pb.p[s->pb.len++] = '/';
    *noff = s->pb.len;
    memcpy(s->pb.p + s->pb.len, name, len);
    s->pb.len += len;
    s->pb.p[s->pb.len] = 0;
    return s->pb.len + 4 < PATH_MAX ? 0 : -1;
}

/* ... and of node n itself */
static int stack_node_path(Session *s, struct node *n)
{
    if (node_path(&s->t, n->id, &s->pb) < 0 || pb_reserve(&s->pb, 1))
        return -1;
    s->pb.p[s->pb.len] = 0;
    return 0;
}

/* LOOKUP in a lower directory; 0 for Python (a node known to be the layers' no longer: a
 * hardlink copied up under another name). */
static int stack_lookup(Session *s, uint64_t u, struct node *p, const char *name, size_t len)
{
    struct fuse_entry_out e;
    struct fuse_attr a;
    uint64_t layers = 0, parent = p->id;
    size_t noff;
    int r = 0;
    if (!(len >= 4 && memcmp(name, WH_PREFIX, 4) == 0)) { /* (never shown, as UnionView.resolve) */
        if (stack_child_path(s, parent, name, len, &noff) < 0)
            return 0;
        r = stack_entry(s, p->layers, s->pb.p, s->pb.len, noff, &a, &layers);
    }
    if (r < 0) {
        reply_err(s, u, -r);
        return 1;
    }
    if (r == 0) {
        memset(&e, 0, sizeof(e));
        split_timeout(s->negative_timeout, &e.entry_valid, &e.entry_valid_nsec);
        dentry_forget(&s->t, parent, name, len);
        reply(s, u, 0, &e, sizeof(e));
        return 1;
    }
    return reply_lower_entry(s, u, parent, name, len, &a, layers);
}

/* Add `name` to a listing unless it is in it already: 1 added, 0 there, -1 out of memory. */
static int listing_put(struct stack_listing *l, const char *name, size_t len, uint64_t ino, uint32_t mode, int layer,
                       int hidden)
{
    if ((l->n + 1) * 2 > l->nslots) { /* rehash at half full */
        size_t ns = l->nslots ? l->nslots * 2 : 64;
        uint32_t *slots = calloc(ns, sizeof(*slots));
        if (!slots)
            return -1;
        for (size_t k = 0; k < l->n; k++) {
            const struct stack_item *it = &l->items[k];
            size_t j = name_hash(0, l->names.p + it->name, it->len) & (ns - 1);
            while (slots[j])
                j = (j + 1) & (ns - 1);
            slots[j] = (uint32_t)k + 1;
        }
        free(l->slots);
        l->slots = slots;
        l->nslots = ns;
    }
    size_t j = name_hash(0, name, len) & (l->nslots - 1);
    for (; l->slots[j]; j = (j + 1) & (l->nslots - 1)) {
        const struct stack_item *it = &l->items[l->slots[j] - 1];
        if (it->len == len && memcmp(l->names.p + it->name, name, len) == 0)
            return 0;
    }
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        struct stack_item *items = realloc(l->items, cap * sizeof(*items));
        if (!items)
            return -1;
        l->items = items;
        l->cap = cap;
    }
    if (pb_reserve(&l->names, len))
        return -1;
    memcpy(l->names.p + l->names.len, name, len);
    l->items[l->n] = (struct stack_item){ino, mode, (uint32_t)len, l->names.len, layer, hidden};
    l->names.len += len;
    l->slots[j] = (uint32_t)++l->n;
    return 1;
}

/* A listing complete: its name index goes (the names are served by offset from here on). */
static int listing_done(struct stack_listing *l, struct stack_listing **out)
{
    free(l->slots);
    l->slots = NULL;
    l->nslots = 0;
    *out = l;
    return 0;
}

/* A directory handle's listing for a READDIR at `offset`: made afresh at offset 0 (or if there
 * is none yet) by `make`, else the one made then; its first entries are "." and "..". */
static int listing_at(Session *s, struct handle *h, struct node *p, uint64_t offset,
                      int (*make)(Session *, struct node *, struct stack_listing **))
{
    if (offset != 0 && h->stack)
        return 0;
    stack_listing_free(h->stack);
    h->stack = NULL;
    return make(s, p, &h->stack);
}

/* "." and ".." of directory p, if the READDIR's offset is before them; 0 when the reply is full. */
static int put_dots(Session *s, char *out, size_t *used, size_t cap, int plus, uint64_t off, const struct node *p)
{
    uint64_t up = p->names ? p->names->parent : p->id;
    return (off >= 1 || put_dirent(s, out, used, cap, plus, ".", 1, 1, p->attr.ino ? p->attr.ino : p->id, S_IFDIR,
                                   NULL)) &&
           (off >= 2 || put_dirent(s, out, used, cap, plus, "..", 2, 2, up, S_IFDIR, NULL));
}

/* Stack.readdir of lower directory p into a new listing (*out); -errno. */
static int stack_list(Session *s, struct node *p, struct stack_listing **out)
{
    struct stack_listing *l = calloc(1, sizeof(*l));
    struct pathbuf pending = {0}; /* one layer's whiteouts (NUL-ended): they hide the layers below */
    int r = 0;
    if (!l)
        return -ENOMEM;
    if (stack_node_path(s, p) < 0) {
        free(l);
        return -ESTALE;
    }
    for (int i = 0; i < s->nlayers && r == 0; i++) {
        if (!(p->layers >> i & 1))
            continue;
        int fd = openat(s->layer_fd[i], at_path(s->pb.p), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
        if (!d) {
            if (fd >= 0)
                close(fd);
            if (errno != ENOENT && errno != ENOTDIR)
                r = -errno;
            continue;
        }
        uint64_t base = (uint64_t)(i + 1) << LAYER_SHIFT;
        struct dirent *de;
        pending.len = 0;
        while (r == 0 && (de = readdir(d))) {
            const char *nm = de->d_name;
            size_t nl = strlen(nm);
            if (nm[0] == '.' && (nl == 1 || (nl == 2 && nm[1] == '.')))
                continue;
            const char *hide = NULL;
            uint64_t hino = de->d_ino;
            uint32_t mode = DTTOIF(de->d_type);
            if (nl >= 4 && memcmp(nm, WH_PREFIX, 4) == 0) {
                if (strcmp(nm, OPAQUE_FILE) == 0)
                    continue;
                hide = nm + 4;
            } else if (de->d_type == DT_CHR || de->d_type == DT_UNKNOWN) {
                struct stat st;
                if (fstatat(dirfd(d), nm, &st, AT_SYMLINK_NOFOLLOW) < 0)
                    continue; /* gone meanwhile */
                if (S_ISCHR(st.st_mode) && st.st_rdev == 0)
                    hide = nm;
                hino = st.st_ino;
                mode = st.st_mode & S_IFMT;
            }
            if (hide) {
                size_t hl = strlen(hide) + 1;
                if (pb_reserve(&pending, hl)) {
                    r = -ENOMEM;
                    break;
                }
                memcpy(pending.p + pending.len, hide, hl);
                pending.len += hl;
            } else if (listing_put(l, nm, nl, base | hino, mode, i, 0) < 0) {
                r = -ENOMEM;
            }
        }
        closedir(d);
        for (size_t k = 0; r == 0 && k < pending.len; k += strlen(pending.p + k) + 1)
            if (listing_put(l, pending.p + k, strlen(pending.p + k), 0, 0, i, 1) < 0)
                r = -ENOMEM;
    }
    free(pending.p);
    if (r < 0) {
        stack_listing_free(l);
        return r;
    }
    size_t kept = 0; /* the whiteouts' names go */
    for (size_t k = 0; k < l->n; k++)
        if (!l->items[k].hidden)
            l->items[kept++] = l->items[k];
    l->n = kept;
    return listing_done(l, out);
}

/* READDIR(PLUS) of a lower directory, from its listing made at offset 0.  The offset of an
 * entry is its index + 3 ("." and ".." are 1 and 2). */
static void stack_readdir(Session *s, uint64_t u, struct node *p, const struct fuse_read_in *in, int plus)
{
    struct handle *h = (struct handle *)(uintptr_t)in->fh;
    int r = listing_at(s, h, p, in->offset, stack_list);
    if (r < 0) {
        reply_err(s, u, -r);
        return;
    }
    const struct stack_listing *l = h->stack;
    size_t cap = in->size < BUF_SIZE ? in->size : BUF_SIZE, used = 0;
    char *out = s->buf + BUF_SIZE;
    uint64_t off = in->offset, dir = p->id, dir_layers = p->layers;
    if (!put_dots(s, out, &used, cap, plus, off, p))
        goto done;
    for (size_t j = off < 2 ? 0 : off - 2; j < l->n; j++) {
        const struct stack_item *it = &l->items[j];
        const char *nm = l->names.p + it->name;
        struct fuse_attr a;
        uint64_t layers = 0;
        size_t noff;
        int attrs = 0;
        /* its attributes as a LOOKUP gives them, from the layer it was listed in down */
        if (plus && stack_child_path(s, dir, nm, it->len, &noff) == 0 &&
            stack_entry(s, dir_layers & ~((1ull << it->layer) - 1), s->pb.p, s->pb.len, noff, &a, &layers) > 0) {
            struct node *known = node_get(&s->t, a.ino);
            attrs = !(known && !known->lower);
        }
        size_t before = used;
        if (!put_dirent(s, out, &used, cap, plus, nm, it->len, j + 3, it->ino, it->mode, attrs ? &a : NULL))
            break;
        if (attrs && remember(s, dir, nm, it->len, &a, layers) < 0) {
            used = before;
            break;
        }
    }
done:
    reply(s, u, 0, out, used);
}

/* The number the view gives upper object `name` of directory `parent` (open as dirfd): the
 * node's, if the kernel holds one by that name; else the number a copy-up kept in an xattr
 * (view._INO_XATTRS_READ, in that order), else the host's plus upper_ino (UnionView._ino_of).
 * -1 where that cannot be told here. */
static int upper_number(Session *s, uint64_t parent, int dirfd, const char *name, size_t len, const struct stat *st,
                        uint64_t *number)
{
    struct dentry *d = dentry_get(&s->t, parent, name, len);
    if (d && d->node->has_attr && !d->node->lower && (d->node->attr.mode & S_IFMT) == (st->st_mode & S_IFMT)) {
        *number = d->node->attr.ino;
        return 0;
    }
    static const char *const ino_xattrs[] = {"trusted.overlay.layerfs.ino", "user.overlay.layerfs.ino",
                                             "trusted.layerfs.ino", "user.layerfs.ino"};
    char path[sizeof("/proc/self/fd/") + 12 + 256], names[1024];
    snprintf(path, sizeof(path), "/proc/self/fd/%d/%s", dirfd, name);
    ssize_t n = llistxattr(path, names, sizeof(names));
    if (n < 0 && errno != ENOTSUP)
        return -1; /* (ERANGE: more xattrs than fit: Python's) */
    for (int k = 0; k < 4 && n > 0; k++) {
        for (ssize_t at = 0; at < n; at += (ssize_t)strlen(names + at) + 1) {
            if (strcmp(names + at, ino_xattrs[k]) != 0)
                continue;
            unsigned char v[8];
            if (lgetxattr(path, ino_xattrs[k], v, sizeof(v)) != (ssize_t)sizeof(v))
                return -1;
            uint64_t x = 0;
            for (int b = 7; b >= 0; b--)
                x = x << 8 | v[b]; /* <Q */
            *number = x;
            return 0;
        }
    }
    *number = (uint64_t)st->st_ino + s->upper_ino;
    return 0;
}

/* Whether directory node p lists from its upper directory alone, here (state DIR_UPPER). */
static int upper_listable(Session *s, const struct node *p)
{
    return p && !p->lower && p->has_attr && S_ISDIR(p->attr.mode) && s->upper_fd >= 0 &&
           p->dir_gen == s->union_gen && p->dir_state == DIR_UPPER;
}

/* The listing of upper directory p whose names are its own, as UnionView.readdir gives it: the
 * host directory's entries but whiteouts and the format's .wh. names. */
static int upper_list(Session *s, struct node *p, struct stack_listing **out)
{
    int dfd = upper_dir_fd(s, p);
    int fd = dfd < 0 ? -1 : openat(dfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    if (!d) {
        if (fd >= 0)
            close(fd);
        return -ESTALE;
    }
    struct stack_listing *l = calloc(1, sizeof(*l));
    int r = l ? 0 : -ENOMEM;
    struct dirent *de;
    while (r == 0 && (de = readdir(d))) {
        const char *nm = de->d_name;
        size_t nl = strlen(nm);
        if ((nm[0] == '.' && (nl == 1 || (nl == 2 && nm[1] == '.'))) || (nl >= 4 && memcmp(nm, WH_PREFIX, 4) == 0))
            continue;
        struct stat st;
        uint64_t number;
        if (fstatat(dirfd(d), nm, &st, AT_SYMLINK_NOFOLLOW) < 0)
            continue; /* gone meanwhile */
        if (S_ISCHR(st.st_mode) && st.st_rdev == 0)
            continue; /* a whiteout: never shown */
        if (upper_number(s, p->id, dirfd(d), nm, nl, &st, &number) < 0)
            r = -EAGAIN;
        else if (listing_put(l, nm, nl, number, st.st_mode & S_IFMT, 0, 0) < 0)
            r = -ENOMEM;
    }
    closedir(d);
    if (r < 0) {
        stack_listing_free(l);
        return r;
    }
    return listing_done(l, out);
}

/* READDIR(PLUS) of an upper directory whose names are its own (upper_listable): listed once at
 * offset 0, served by offset after; READDIRPLUS gives each entry's host attributes (and its
 * node), as LayerOps.readdir's lookups would.  0: Python's (the listing could not be made). */
static int upper_readdir(Session *s, uint64_t u, struct node *p, const struct fuse_read_in *in, int plus)
{
    struct handle *h = (struct handle *)(uintptr_t)in->fh;
    if (listing_at(s, h, p, in->offset, upper_list) < 0)
        return 0;
    const struct stack_listing *l = h->stack;
    size_t cap = in->size < BUF_SIZE ? in->size : BUF_SIZE, used = 0;
    char *out = s->buf + BUF_SIZE;
    uint64_t off = in->offset, dir = p->id;
    int dfd = plus ? upper_dir_fd(s, p) : -1;
    if (!put_dots(s, out, &used, cap, plus, off, p))
        goto done;
    for (size_t j = off < 2 ? 0 : off - 2; j < l->n; j++) {
        const struct stack_item *it = &l->items[j];
        const char *nm = l->names.p + it->name;
        struct fuse_attr a;
        struct stat st;
        /* (the name, at most 255 bytes, ends where the next begins: copied to end it) */
        char name[256];
        memcpy(name, nm, it->len);
        name[it->len] = 0;
        int attrs = dfd >= 0 && fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
                    (st.st_mode & S_IFMT) == it->mode;
        if (attrs)
            attr_from_stat(&a, it->ino, &st);
        size_t before = used;
        if (!put_dirent(s, out, &used, cap, plus, nm, it->len, j + 3, it->ino, it->mode, attrs ? &a : NULL))
            break;
        if (attrs && remember(s, dir, nm, it->len, &a, 0) < 0) {
            used = before;
            break;
        }
    }
done:
    reply(s, u, 0, out, used);
    return 1;
}

/* The layer's own file of lower node n, opened to read; -errno. */
static int stack_file(Session *s, struct node *n)
{
    if (!n || !n->layers || stack_node_path(s, n) < 0)
        return -ESTALE;
    int fd = openat(s->layer_fd[__builtin_ctzll(n->layers)], s->pb.p, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

/* OPEN for reading of a lower file, as lower_file_mode says: one of 1 MiB or more passed
 * through, a smaller one through the page cache, its layer's file opened at the first READ
 * that reaches us (a file the page cache holds costs no open, fstat and close here). */
static int stack_open(Session *s, uint64_t u, struct node *n, uint32_t flags)
{
    if (!n->layers)
        return 0;
    int fd = -1;
    if (n->attr.size >= PASS_LOWER_MIN && (fd = stack_file(s, n)) < 0) {
        reply_err(s, u, -fd);
        return 1;
    }
    struct handle *h = handle_new(NULL, fd, n->id);
    if (!h) {
        if (fd >= 0)
            close(fd);
        reply_err(s, u, ENOMEM);
        return 1;
    }
    h->owns_fd = 1;
    if (fd >= 0) {
        h->lower_copy = 1;
    } else {
        h->lower_file = 1;
        if (may_push(n, n->attr.size) && (fd = stack_file(s, n)) >= 0) { /* (push_lower) */
            struct iovec iov[3];
            char *out = s->buf + BUF_SIZE;
            ssize_t got = pread(fd, out, n->attr.size, 0);
            if (got == (ssize_t)n->attr.size) {
                iov[2] = (struct iovec){out, (size_t)got};
                push_pages(s, n->id, iov, 1, (size_t)got);
            }
            h->fd = fd; /* its READs, if any, read it */
        }
    }
    finish_open(s, u, h, flags);
    return 1;
}

/* READ of a lower file without a handle: a read-only mount answers OPEN with ENOSYS (the kernel
 * then sends no OPEN or RELEASE at all, and keeps the page cache), so each READ opens the
 * layer's file. */
static int stack_read(Session *s, uint64_t u, struct node *n, const struct fuse_read_in *in)
{
    if (!S_ISREG(n->attr.mode))
        return 0;
    int fd = stack_file(s, n);
    if (fd < 0) {
        reply_err(s, u, -fd);
        return 1;
    }
    reply_pread(s, u, fd, in);
    close(fd);
    return 1;
}

static int stack_readlink(Session *s, uint64_t u, struct node *n)
{
    if (!S_ISLNK(n->attr.mode) || !n->layers || stack_node_path(s, n) < 0)
        return 0;
    char *out = s->buf + BUF_SIZE;
    ssize_t r = readlinkat(s->layer_fd[__builtin_ctzll(n->layers)], at_path(s->pb.p), out, PATH_MAX);
    if (r < 0)
        reply_err(s, u, errno);
    else
        reply(s, u, 0, out, (size_t)r);
    return 1;
}

/* GETATTR of a lower node: what its LOOKUP gave (the lower layers do not change) */
static int stack_getattr(Session *s, uint64_t u, struct node *n)
{
    if (!n->has_attr)
        return 0;
    struct fuse_attr_out o;
    memset(&o, 0, sizeof(o));
    o.attr = n->attr;
    split_timeout(attr_timeout_of(s, n->id), &o.attr_valid, &o.attr_valid_nsec);
    reply(s, u, 0, &o, sizeof(o));
    return 1;
}

/* xattrs the overlay format keeps to itself (overlayfmt.PRIVATE_XATTR_PREFIXES) */
static int private_xattr(const char *name)
{
    static const char *const prefixes[] = {"trusted.overlay.", "user.overlay.", "trusted.layerfs.", "user.layerfs."};
    for (int i = 0; i < 4; i++)
        if (strncmp(name, prefixes[i], strlen(prefixes[i])) == 0)
            return 1;
    return 0;
}

/* The bytes of src into dst (both at offset 0), in the kernel where it can. */
static int copy_bytes(Session *s, int src, int dst)
{
    off_t off = 0;
    for (;;) {
        ssize_t n = copy_file_range(src, NULL, dst, NULL, MAX_WRITE, 0);
        if (n == 0)
            return 0;
        if (n > 0) {
            off += n;
            continue;
        }
        if (errno != EXDEV && errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP)
            return -errno;
        break; /* not between these two: by hand, from where it stopped */
    }
    char *buf = s->buf + BUF_SIZE;
    for (;;) {
        ssize_t got = pread(src, buf, MAX_WRITE, off);
        if (got <= 0)
            return got < 0 ? -errno : 0;
        for (ssize_t w = 0; w < got;) {
            ssize_t put = pwrite(dst, buf + w, (size_t)(got - w), off + w);
            if (put < 0)
                return -errno;
            w += put;
        }
        off += got;
    }
}

/* The metadata of a layer's file (src, stat st) onto its copy, as copy_meta: owner, mode, the
 * xattrs DirLayer shows (host_xattrs), the inode number, times. */
static int copy_host_meta(int fd, int src, const struct stat *st, uint64_t ino, int *caps)
{
    if (fchown(fd, st->st_uid, st->st_gid) < 0 || fchmod(fd, st->st_mode & 07777) < 0)
        return -errno;
    *caps = 0;
    ssize_t len = flistxattr(src, NULL, 0);
    char *names = len > 0 ? malloc((size_t)len) : NULL, *value = NULL;
    int r = 0;
    if (len > 0 && (!names || (len = flistxattr(src, names, (size_t)len)) < 0))
        r = names ? -errno : -ENOMEM;
    for (ssize_t i = 0; r == 0 && len > 0 && i < len; i += (ssize_t)strlen(names + i) + 1) {
        const char *name = names + i;
        if (private_xattr(name))
            continue;
        ssize_t vl = fgetxattr(src, name, NULL, 0);
        char *v = vl >= 0 ? realloc(value, (size_t)vl + 1) : NULL;
        if (!v)
            continue; /* gone meanwhile, as host_xattrs leaves it out */
        value = v;
        if ((vl = fgetxattr(src, name, value, (size_t)vl)) < 0)
            continue;
        *caps |= strcmp(name, CAPS_XATTR) == 0;
        r = copy_xattr(fd, name, value, (size_t)vl);
    }
    free(names);
    free(value);
    return r < 0 ? r : copy_number_times(fd, ino, st->st_mtim.tv_sec, (uint32_t)st->st_mtim.tv_nsec);
}

static int by_name(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* GETXATTR (`name`) or LISTXATTR (`name` NULL) of a lower node: its layer's file's xattrs but the
 * overlay format's own, names sorted, as DirLayer's node has them (host_xattrs). */
static int stack_xattr(Session *s, uint64_t u, struct node *n, const char *name, uint32_t size)
{
    char full[PATH_MAX + 32];
    if (!n->layers || stack_node_path(s, n) < 0)
        return 0;
    int fl = snprintf(full, sizeof(full), "/proc/self/fd/%d/%s", s->layer_fd[__builtin_ctzll(n->layers)], s->pb.p);
    if (fl < 0 || (size_t)fl >= sizeof(full))
        return 0;
    char *out = s->buf + BUF_SIZE;
    if (name) {
        /* what the host will not give (no such xattr, no xattrs there, no permission) is
         * not among the node's */
        ssize_t vl = private_xattr(name) ? -1 : lgetxattr(full, name, out, BUF_SIZE);
        reply_xattr(s, u, out, vl < 0 ? 0 : (size_t)vl, vl >= 0, size);
        return 1;
    }
    char *names = s->buf + BUF_SIZE + BUF_SIZE / 2; /* listed into the reply area's second half */
    ssize_t nl = llistxattr(full, names, BUF_SIZE / 2);
    const char *sorted[4096];
    size_t count = 0, len = 0;
    for (ssize_t i = 0; nl > 0 && i < nl && count < 4096; i += (ssize_t)strlen(names + i) + 1)
        if (!private_xattr(names + i))
            sorted[count++] = names + i;
    qsort(sorted, count, sizeof(*sorted), by_name);
    for (size_t i = 0; i < count; i++) {
        size_t l = strlen(sorted[i]) + 1;
        memcpy(out + len, sorted[i], l); /* (the names' half is not reached: len <= nl) */
        len += l;
    }
    reply_xattr(s, u, out, len, 1, size);
    return 1;
}

/* upper_copy_up of a layerfs-overlay lower file: from its layer's own file. */
static int stack_copy_up(Session *s, uint64_t u, struct node *n, struct dentry *d, int dfd, const struct stat *ds,
                         uint32_t flags)
{
    struct stat st;
    if (!n->layers || stack_node_path(s, n) < 0)
        return 0;
    int src = openat(s->layer_fd[__builtin_ctzll(n->layers)], s->pb.p, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (src < 0 || fstat(src, &st) < 0 || st.st_nlink != 1 || !S_ISREG(st.st_mode)) {
        if (src >= 0)
            close(src);
        return 0; /* hardlinks (their names are linked together), and errors: Python's */
    }
    char tmp[64];
    int fd = copy_up_file(s, tmp, sizeof(tmp)), caps = 0, r = 0;
    if (fd < 0) {
        close(src);
        return 0;
    }
    if (!(flags & O_TRUNC))
        r = copy_bytes(s, src, fd);
    if (r >= 0)
        r = copy_host_meta(fd, src, &st, n->id, &caps);
    close(src);
    close(fd);
    return copy_up_place(s, u, n, d, dfd, ds, tmp, r, caps, flags);
}

/* ---- writable mounts of a stored image: what needs no union rule, without Python ------------ */

static void do_forget(Session *s, const struct fuse_in_header *ih, const char *body, size_t blen)
{
    if (ih->opcode == FUSE_FORGET) {
        if (blen >= sizeof(struct fuse_forget_in))
            forget_one(s, ih->nodeid, ((const struct fuse_forget_in *)body)->nlookup);
        return;
    }
    if (blen < sizeof(struct fuse_batch_forget_in))
        return;
    const struct fuse_batch_forget_in *bf = (const struct fuse_batch_forget_in *)body;
    const struct fuse_forget_one *one = (const struct fuse_forget_one *)(bf + 1);
    size_t count = (blen - sizeof(*bf)) / sizeof(*one);
    if (bf->count < count)
        count = bf->count;
    for (size_t i = 0; i < count; i++)
        forget_one(s, one[i].nodeid, one[i].nlookup);
}

/* Requests about `lower` nodes (the image's alone: answered from the index as a read-only
 * mount answers them), reads and writes of open files, and the bookkeeping of handles that
 * have no Python half; 0 for the rest, which dispatch() serves.  Called without the GIL: the
 * tables are this thread's alone (a writable mount has one), and no Python object is touched. */
static int rw_fast(Session *s, struct worker *w, const char *req, size_t n)
{
    const struct fuse_in_header *ih = (const struct fuse_in_header *)req;
    const char *body = req + sizeof(*ih);
    size_t blen = n - sizeof(*ih), len;
    const char *p = body, *name;
    size_t left = blen;
    uint64_t u = ih->unique, id = ih->nodeid;
    struct node *nd = node_get(&s->t, id);
    int lower = nd && nd->lower, handled = 1;
    switch (ih->opcode) {
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
        do_forget(s, ih, body, blen);
        return 1;
    case FUSE_FLUSH:
    case FUSE_IOCTL: /* (every buffered fopen's isatty(): one per file opened) */
        reply_err(s, u, ENOSYS); /* see dispatch */
        return 1;
    case FUSE_OPENDIR:
        do_open(s, u, id, 0, 1); /* no Python for directories */
        return 1;
    case FUSE_RELEASE:
    case FUSE_RELEASEDIR: {
        if (blen < sizeof(struct fuse_release_in))
            return 0;
        struct handle *h = (struct handle *)(uintptr_t)((const struct fuse_release_in *)body)->fh;
        if (h && (h->pyfh || h->listing))
            return 0;
        if (h)
            handle_close(s, h, ih->opcode == FUSE_RELEASEDIR);
        reply_err(s, u, 0);
        return 1;
    }
    case FUSE_READ: {
        if (blen < sizeof(struct fuse_read_in))
            return 0;
        const struct fuse_read_in *in = (const struct fuse_read_in *)body;
        if (!in->fh && lower && s->nlayers) /* a read-only mount: no OPEN, reads by node */
            return stack_read(s, u, nd, in);
        return read_here(s, u, (struct handle *)(uintptr_t)in->fh, in);
    }
    case FUSE_WRITE: {
        if (blen < sizeof(struct fuse_write_in))
            return 0;
        const struct fuse_write_in *in = (const struct fuse_write_in *)body;
        struct handle *h = (struct handle *)(uintptr_t)in->fh;
        if (blen - sizeof(*in) < in->size || !h || !(h->pyfh || h->c_fd) || h->fd < 0)
            return 0;
        write_here(s, u, h, in);
        return 1;
    }
    case FUSE_OPEN: {
        if (!lower || blen < sizeof(struct fuse_open_in) || !S_ISREG(nd->attr.mode))
            return 0;
        uint32_t flags = ((const struct fuse_open_in *)body)->flags;
        if ((flags & O_ACCMODE) != O_RDONLY || (flags & O_TRUNC))
            return upper_copy_up(s, u, id, flags); /* else Python's */
        if (s->nlayers) /* (a read-only mount answers ENOSYS: do_open) */
            return s->writable ? stack_open(s, u, nd, flags) : 0;
        open_lower(s, u, id, id, flags);
        return 1;
    }
    case FUSE_GETATTR:
        if (blen >= sizeof(struct fuse_getattr_in)) {
            const struct fuse_getattr_in *in = (const struct fuse_getattr_in *)body;
            struct handle *h = (struct handle *)(uintptr_t)in->fh;
            if ((in->getattr_flags & FUSE_GETATTR_FH) && h && h->pyfh)
                return 0;
        }
        if (!lower)
            return upper_getattr(s, u, nd);
        break;
    case FUSE_LOOKUP:
        if (!lower) /* a new name in an upper directory, mostly */
            return (name = take_name(&p, &left, &len)) ? upper_lookup(s, u, id, name, len) : 0;
        if ((blen == 2 && body[0] == '.') || (blen == 3 && body[0] == '.' && body[1] == '.'))
            /* "." and "..": what NFS export asks when it reconnects a handle */
            return 0;
        break;
    case FUSE_UNLINK:
        return (name = take_name(&p, &left, &len)) ? upper_unlink(s, u, id, name, len) : 0;
    case FUSE_SETATTR:
        return !lower && blen >= sizeof(struct fuse_setattr_in) &&
               upper_setattr(s, u, nd, (const struct fuse_setattr_in *)body);
    case FUSE_RENAME:
    case FUSE_RENAME2: {
        uint64_t newdir = 0;
        uint32_t flags = 0;
        const char *newname;
        size_t newlen;
        if (ih->opcode == FUSE_RENAME && blen >= sizeof(struct fuse_rename_in)) {
            newdir = ((const struct fuse_rename_in *)body)->newdir;
            p += sizeof(struct fuse_rename_in);
            left -= sizeof(struct fuse_rename_in);
        } else if (ih->opcode == FUSE_RENAME2 && blen >= sizeof(struct fuse_rename2_in)) {
            newdir = ((const struct fuse_rename2_in *)body)->newdir;
            flags = ((const struct fuse_rename2_in *)body)->flags;
            p += sizeof(struct fuse_rename2_in);
            left -= sizeof(struct fuse_rename2_in);
        } else {
            return 0;
        }
        return (name = take_name(&p, &left, &len)) && (newname = take_name(&p, &left, &newlen)) &&
               upper_rename(s, u, id, name, len, newdir, newname, newlen, flags);
    }
    case FUSE_MKDIR: {
        if (blen < sizeof(struct fuse_mkdir_in))
            return 0;
        p += sizeof(struct fuse_mkdir_in);
        left -= sizeof(struct fuse_mkdir_in);
        return (name = take_name(&p, &left, &len)) &&
               upper_mkdir(s, u, id, (const struct fuse_mkdir_in *)body, name, len, ih);
    }
    case FUSE_SYMLINK: { /* the new entry's name first, then the link target */
        const char *target;
        size_t tlen;
        return (name = take_name(&p, &left, &len)) && (target = take_name(&p, &left, &tlen)) &&
               upper_symlink(s, u, id, name, len, target, ih);
    }
    case FUSE_CREATE: {
        if (blen < sizeof(struct fuse_create_in))
            return 0;
        p += sizeof(struct fuse_create_in);
        left -= sizeof(struct fuse_create_in);
        if (!(name = take_name(&p, &left, &len)))
            return 0;
        return upper_create(s, u, id, (const struct fuse_create_in *)body, name, len, ih);
    }
    case FUSE_GETXATTR:
        if (!lower && nd && nd->no_caps && blen > sizeof(struct fuse_getxattr_in) &&
            memchr(body + sizeof(struct fuse_getxattr_in), 0, blen - sizeof(struct fuse_getxattr_in)) &&
            strcmp(body + sizeof(struct fuse_getxattr_in), CAPS_XATTR) == 0) {
            reply_err(s, u, ENODATA); /* as do_getxattr, without the GIL */
            return 1;
        }
        if (lower && s->nlayers) {
            if (blen <= sizeof(struct fuse_getxattr_in))
                return 0;
            p += sizeof(struct fuse_getxattr_in);
            left -= sizeof(struct fuse_getxattr_in);
            return (name = take_name(&p, &left, &len)) &&
                   stack_xattr(s, u, nd, name, ((const struct fuse_getxattr_in *)body)->size);
        }
        return lower ? fast_dispatch(s, w, req, n) : 0;
    case FUSE_READLINK:
        if (lower && s->nlayers)
            return stack_readlink(s, u, nd);
        return lower ? fast_dispatch(s, w, req, n) : 0; /* as a read-only mount */
    case FUSE_LISTXATTR:
        if (lower && s->nlayers)
            return blen >= sizeof(struct fuse_getxattr_in) &&
                   stack_xattr(s, u, nd, NULL, ((const struct fuse_getxattr_in *)body)->size);
        return lower ? fast_dispatch(s, w, req, n) : 0;
    case FUSE_READDIR:
    case FUSE_READDIRPLUS: {
        if (blen < sizeof(struct fuse_read_in))
            return 0;
        const struct fuse_read_in *in = (const struct fuse_read_in *)body;
        struct handle *h = (struct handle *)(uintptr_t)in->fh;
        if (!h)
            return 0;
        if (in->offset == 0)
            h->from_upper = !lower && upper_listable(s, nd);
        if (h->from_upper) {
            if (upper_readdir(s, u, nd, in, ih->opcode == FUSE_READDIRPLUS))
                return 1;
            h->from_upper = 0; /* (Python's listing from here on, and from its start) */
            h->relist = 1;
        }
        /* a listing is the store's or Python's from its start to its end; one whose directory
         * changes in between goes on from Python's (what was removed is not shown again) */
        if (in->offset == 0)
            h->from_store = lower;
        if (h->from_store && !lower)
            h->from_store = 0, h->relist = 1;
        if (!h->from_store)
            return 0;
        break;
    }
    default:
        return 0;
    }
    if (s->nlayers) { /* layerfs-overlay: from the layers' directories */
        s->fast_requests++;
        switch (ih->opcode) {
        case FUSE_LOOKUP:
            return (name = take_name(&p, &left, &len)) ? stack_lookup(s, u, nd, name, len) : 0;
        case FUSE_GETATTR:
            return stack_getattr(s, u, nd);
        case FUSE_READDIR:
        case FUSE_READDIRPLUS:
            stack_readdir(s, u, nd, (const struct fuse_read_in *)body, ih->opcode == FUSE_READDIRPLUS);
            return 1;
        }
        return 0;
    }
    if (fs_store_begin(w->store) < 0) {
        reply_err(s, u, EIO);
        return 1;
    }
    s->fast_requests++;
    switch (ih->opcode) {
    case FUSE_LOOKUP:
        if ((name = take_name(&p, &left, &len)))
            handled = fast_lookup(s, w, u, id, name, len);
        else
            reply_err(s, u, EINVAL);
        break;
    case FUSE_GETATTR:
        fast_getattr(s, w, u, id);
        break;
    case FUSE_READDIR:
    case FUSE_READDIRPLUS:
        fast_readdir(s, w, u, id, (const struct fuse_read_in *)body, ih->opcode == FUSE_READDIRPLUS);
        break;
    }
    fs_store_end(w->store);
    return handled;
}

/* ---- the loop --------------------------------------------------------------------------------- */

#define NEED(n)                                                                                              \
    do {                                                                                                     \
        if (blen < (size_t)(n)) {                                                                            \
            reply_err(s, ih->unique, EINVAL);                                                                \
            return;                                                                                          \
        }                                                                                                    \
    } while (0)

/* a NUL-terminated name inside the request, or NULL */
static const char *take_name(const char **p, size_t *left, size_t *len)
{
    const char *start = *p;
    const char *end = memchr(start, 0, *left);
    if (!end)
        return NULL;
    *len = (size_t)(end - start);
    *left -= *len + 1;
    *p = end + 1;
    return start;
}

static void do_init(Session *s, const struct fuse_in_header *ih, const char *body, size_t blen)
{
    NEED(sizeof(uint32_t) * 4);
    const struct fuse_init_in *in = (const struct fuse_init_in *)body;
    struct fuse_init_out o;
    memset(&o, 0, sizeof(o));
    o.major = FUSE_KERNEL_VERSION;
    o.minor = FUSE_KERNEL_MINOR_VERSION;
    if (in->major != FUSE_KERNEL_VERSION) {
        /* the kernel retries with our major if it is lower; 7 is all there is */
        reply(s, ih->unique, 0, &o, 8);
        return;
    }
    /* No NFS export: a file handle outlives its node here (FORGET frees it), so decoding one once
     * the kernel dropped the inode gives ESTALE.  FUSE_NO_EXPORT_SUPPORT (below) makes
     * name_to_handle_at say EOPNOTSUPP instead, as the kernel overlay does by default
     * (nfs_export=off); fanotify's handles (AT_HANDLE_FID) still work. */
    uint32_t want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_DO_READDIRPLUS | FUSE_MAX_PAGES |
                    FUSE_CACHE_SYMLINKS | FUSE_ATOMIC_O_TRUNC | FUSE_PARALLEL_DIROPS;
    /* POSIX ACLs: the kernel checks access ACLs (read as xattrs, cached per inode) as the kernel
     * overlay does; on writable mounts new objects come with their mode unmasked and the umask
     * beside it, so that the view can let a parent's default ACL decide (UnionView._new_mode) */
    want |= FUSE_POSIX_ACL | (s->writable ? FUSE_DONT_MASK : 0);
    /* SETXATTR_EXT: the kernel says when setting an access ACL must clear S_ISGID (the caller is
     * not in the file's group); this daemon's own setxattr, as root, would keep it */
    want |= FUSE_SETXATTR_EXT;
    o.flags = in->flags & want;
    s->setxattr_ext = (o.flags & FUSE_SETXATTR_EXT) != 0;
    int ext = (in->flags & PT_INIT_EXT) && blen >= sizeof(*in);
    if (ext && (in->flags2 & NO_EXPORT_FLAG2)) {
        o.flags |= PT_INIT_EXT;
        o.flags2 |= NO_EXPORT_FLAG2;
    }
    /* passthrough: reads and writes of upper files go from the kernel to the host file without
     * a round trip.  Writable mounts only (read-only ones read the store); the ioctl that names a
     * backing file needs CAP_SYS_ADMIN, so unprivileged daemons do without.  Stack depth 1: the
     * upper directory sits on a plain file system, and this mount can still be a lower of one
     * overlay. */
    if (s->writable && s->try_passthrough && ext && (in->flags2 & PT_FLAG2)) {
        o.flags |= PT_INIT_EXT;
        o.flags2 |= PT_FLAG2;
        o.unused[0] = 1; /* max_stack_depth, a field of protocol 7.40 */
        o.minor = 40;
        s->passthrough = 1;
    }
    /* the kernel takes the smaller of this and its device's read-ahead, which the Python side
     * raised (read_ahead) before serving: 1 MiB READs, not 128 KiB ones */
    o.max_readahead = read_ahead(s);
    o.max_write = MAX_WRITE;
    o.max_pages = (uint16_t)(request_size(s) / 4096);
    o.max_background = 64;
    o.congestion_threshold = 48;
    o.time_gran = 1;
    reply(s, ih->unique, 0, &o, sizeof(o));
}

/* What a change of an upper file's contents by the caller of request `ih` does to its set-id
 * bits, as the kernel's own file systems do (file_remove_privs): S_ISUID goes, and S_ISGID with
 * group execute or when the caller is not in the file's group, unless the caller has
 * CAP_FSETID.  The daemon's own fallocate on the host file would keep them (it has the
 * capability); the kernel leaves this to the server for FALLOCATE.  The caller's capabilities
 * and groups are read from /proc (rare: only for files with set-id bits). */
static void drop_setid_for_caller(int fd, const struct fuse_in_header *ih)
{
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || !(st.st_mode & (S_ISUID | S_ISGID)))
        return;
    int capable = ih->uid == 0, in_group = ih->gid == st.st_gid;
    char path[64], line[4096];
    snprintf(path, sizeof(path), "/proc/%u/status", ih->pid);
    FILE *f = ih->pid ? fopen(path, "re") : NULL;
    while (f && fgets(line, sizeof(line), f)) {
        if (!strncmp(line, "CapEff:", 7)) {
            capable = (strtoull(line + 7, NULL, 16) >> 4) & 1; /* CAP_FSETID */
        } else if (!strncmp(line, "Groups:", 7)) {
            char *q = line + 7, *end;
            for (unsigned long g = strtoul(q, &end, 10); end != q; g = strtoul(q, &end, 10)) {
                in_group |= g == st.st_gid;
                q = end;
            }
        }
    }
    if (f)
        fclose(f);
    if (capable)
        return;
    mode_t kill = st.st_mode & S_ISUID;
    if ((st.st_mode & S_ISGID) && ((st.st_mode & S_IXGRP) || !in_group))
        kill |= S_ISGID;
    if (kill)
        (void)fchmod(fd, (st.st_mode & 07777) & ~kill);
}

static void dispatch(Session *s, const char *req, size_t n)
{
    const struct fuse_in_header *ih = (const struct fuse_in_header *)req;
    const char *body = req + sizeof(*ih);
    size_t blen = n - sizeof(*ih);
    uint64_t u = ih->unique, id = ih->nodeid;
    const char *p = body;
    size_t left = blen, len, len2;
    const char *name, *name2;

    if (s->nmade || s->nadopt)
        tell_python(s);
    s->change_seq++; /* Python may change anything: a name found free is looked at again */
    switch (ih->opcode) {
    case FUSE_RENAME:
    case FUSE_RENAME2:
    case FUSE_RMDIR:
        s->union_gen++; /* may hide or show lower names, or move directories: ask afresh */
        break;
    case FUSE_SETATTR: /* a directory made setgid (upper_create leaves those to Python) */
    case FUSE_SETXATTR: /* ... or given a default ACL */
    case FUSE_REMOVEXATTR: {
        const struct node *n = node_get(&s->t, id);
        if (!n || !n->has_attr || S_ISDIR(n->attr.mode))
            s->union_gen++;
        break;
    }
    }
    /* (Not for an UNLINK, which removes a file, nor a MKDIR: the new directory's node has no
     * state yet, and no other directory's changes.  Copying up the directories above it, or
     * above any object, unmarks their nodes: they are learned afresh as upper directories.) */
    switch (ih->opcode) {
    case FUSE_INIT:
        do_init(s, ih, body, blen);
        return;
    case FUSE_DESTROY:
        reply_err(s, u, 0);
        return;
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
        do_forget(s, ih, body, blen);
        return; /* no reply */
    case FUSE_INTERRUPT:
        return; /* every request is answered promptly; nothing to cancel */
    case FUSE_LOOKUP:
        if (!(name = take_name(&p, &left, &len)))
            break;
        if (!(learn_dir_state(s, id) && upper_lookup(s, u, id, name, len)))
            do_lookup(s, u, id, name, len);
        return;
    case FUSE_GETATTR:
        do_getattr(s, u, id, blen >= sizeof(struct fuse_getattr_in) ? (const struct fuse_getattr_in *)body : NULL);
        return;
    case FUSE_SETATTR:
        NEED(sizeof(struct fuse_setattr_in));
        do_setattr(s, u, id, (const struct fuse_setattr_in *)body);
        return;
    case FUSE_READLINK:
        do_readlink(s, u, id);
        return;
    case FUSE_MKNOD: {
        NEED(sizeof(struct fuse_mknod_in));
        const struct fuse_mknod_in *in = (const struct fuse_mknod_in *)body;
        p += sizeof(*in);
        left -= sizeof(*in);
        if (!(name = take_name(&p, &left, &len)))
            break;
        do_make(s, u, id, name, len, "mknod", "mode", NULL, in->mode, in->rdev, in->umask, ih);
        return;
    }
    case FUSE_MKDIR: {
        NEED(sizeof(struct fuse_mkdir_in));
        const struct fuse_mkdir_in *in = (const struct fuse_mkdir_in *)body;
        p += sizeof(*in);
        left -= sizeof(*in);
        if (!(name = take_name(&p, &left, &len)))
            break;
        do_make(s, u, id, name, len, "mkdir", "mode", NULL, in->mode, 0, in->umask, ih);
        return;
    }
    case FUSE_SYMLINK: {
        if (!(name = take_name(&p, &left, &len)) || !(name2 = take_name(&p, &left, &len2)))
            break;
        /* the new entry's name comes first, then the link target */
        PyObject *target = PyBytes_FromStringAndSize(name2, (Py_ssize_t)len2);
        if (!target) {
            reply_err(s, u, py_errno());
            return;
        }
        do_make(s, u, id, name, len, "symlink", "symlink", target, 0, 0, 0, ih);
        Py_DECREF(target);
        return;
    }
    case FUSE_LINK: {
        NEED(sizeof(struct fuse_link_in));
        const struct fuse_link_in *in = (const struct fuse_link_in *)body;
        p += sizeof(*in);
        left -= sizeof(*in);
        if (!(name = take_name(&p, &left, &len)))
            break;
        int err = 0;
        unmark_lower(s, in->oldnodeid); /* copied up to take the new name */
        struct node *target = node_get(&s->t, in->oldnodeid);
        if (target && !target->names && target->anon) { /* an O_TMPFILE file gets its name */
            do_make(s, u, id, name, len, "link_open", "link", target->anon->pyfh, 0, 0, 0, ih);
            return;
        }
        PyObject *old = path_bytes(s, in->oldnodeid, &s->pb2, &err);
        if (!old) {
            reply_err(s, u, err);
            return;
        }
        do_make(s, u, id, name, len, "link", "link", old, 0, 0, 0, ih);
        Py_DECREF(old);
        return;
    }
    case FUSE_UNLINK:
        if (!(name = take_name(&p, &left, &len)))
            break;
        if (!(learn_dir_state(s, id) && upper_unlink(s, u, id, name, len)))
            do_unlink(s, u, id, name, len, "unlink");
        return;
    case FUSE_RMDIR:
        if (!(name = take_name(&p, &left, &len)))
            break;
        do_unlink(s, u, id, name, len, "rmdir");
        return;
    case FUSE_RENAME:
    case FUSE_RENAME2: {
        uint64_t newdir;
        uint32_t flags = 0;
        if (ih->opcode == FUSE_RENAME) {
            NEED(sizeof(struct fuse_rename_in));
            newdir = ((const struct fuse_rename_in *)body)->newdir;
            p += sizeof(struct fuse_rename_in);
            left -= sizeof(struct fuse_rename_in);
        } else {
            NEED(sizeof(struct fuse_rename2_in));
            newdir = ((const struct fuse_rename2_in *)body)->newdir;
            flags = ((const struct fuse_rename2_in *)body)->flags;
            p += sizeof(struct fuse_rename2_in);
            left -= sizeof(struct fuse_rename2_in);
        }
        if (!(name = take_name(&p, &left, &len)) || !(name2 = take_name(&p, &left, &len2)))
            break;
        do_rename(s, u, id, name, len, newdir, name2, len2, flags);
        return;
    }
    case FUSE_OPEN: {
        NEED(sizeof(struct fuse_open_in));
        uint32_t flags = ((const struct fuse_open_in *)body)->flags;
        struct node *nd = (flags & O_ACCMODE) != O_RDONLY || (flags & O_TRUNC) ? node_get(&s->t, id) : NULL;
        /* a copy-up C may make once Python has told it the directory (rw_fast could not ask) */
        if (nd && nd->lower && nd->names && learn_dir_state(s, nd->names->parent) &&
            upper_copy_up(s, u, id, flags))
            return;
        do_open(s, u, id, flags, 0);
        return;
    }
    case FUSE_OPENDIR:
        do_open(s, u, id, 0, 1);
        return;
    case FUSE_CREATE: {
        NEED(sizeof(struct fuse_create_in));
        const struct fuse_create_in *in = (const struct fuse_create_in *)body;
        p += sizeof(*in);
        left -= sizeof(*in);
        if (!(name = take_name(&p, &left, &len)))
            break;
        if (!(learn_dir_state(s, id) && upper_create(s, u, id, in, name, len, ih)))
            do_create(s, u, id, in, name, len, ih);
        return;
    }
    case OP_TMPFILE:
        NEED(sizeof(struct fuse_create_in));
        do_create(s, u, id, (const struct fuse_create_in *)body, NULL, 0, ih);
        return;
    case FUSE_READ:
        NEED(sizeof(struct fuse_read_in));
        do_read(s, u, id, (const struct fuse_read_in *)body);
        return;
    case FUSE_WRITE: {
        NEED(sizeof(struct fuse_write_in));
        const struct fuse_write_in *in = (const struct fuse_write_in *)body;
        if (blen - sizeof(*in) < in->size)
            break;
        struct handle *h = (struct handle *)(uintptr_t)in->fh;
        if (!h || !h->pyfh) {
            reply_err(s, u, EBADF);
            return;
        }
        if (h->fd >= 0) { /* an upper file: written here, without the GIL */
            Py_BEGIN_ALLOW_THREADS
            write_here(s, u, h, in);
            Py_END_ALLOW_THREADS
            return;
        }
        PyObject *data = PyMemoryView_FromMemory((char *)(in + 1), in->size, PyBUF_READ);
        PyObject *res = data ? PyObject_CallMethod(s->ops, "write", "OOK", h->pyfh, data,
                                                   (unsigned long long)in->offset)
                             : NULL;
        Py_XDECREF(data);
        if (!res) {
            reply_err(s, u, py_errno());
            return;
        }
        struct fuse_write_out o = {.size = (uint32_t)PyLong_AsUnsignedLong(res)};
        Py_DECREF(res);
        reply(s, u, 0, &o, sizeof(o));
        return;
    }
    case FUSE_STATFS:
        do_statfs(s, u);
        return;
    case FUSE_RELEASE:
    case FUSE_RELEASEDIR:
        NEED(sizeof(struct fuse_release_in));
        do_release(s, u, ((const struct fuse_release_in *)body)->fh, ih->opcode == FUSE_RELEASEDIR);
        return;
    case FUSE_FLUSH:
        /* writes go straight to the upper file, nothing is buffered here: ENOSYS tells the kernel
         * to stop sending FLUSH at every close (a round trip per file) */
        reply_err(s, u, ENOSYS);
        return;
    case FUSE_FSYNC:
    case FUSE_FSYNCDIR: {
        NEED(sizeof(struct fuse_fsync_in));
        const struct fuse_fsync_in *in = (const struct fuse_fsync_in *)body;
        struct handle *h = (struct handle *)(uintptr_t)in->fh;
        if (!h || !h->pyfh) {
            reply_err(s, u, 0);
            return;
        }
        call_simple(s, u, PyObject_CallMethod(s->ops, "fsync", "Oi", h->pyfh, (int)(in->fsync_flags & 1)));
        return;
    }
    case FUSE_FALLOCATE: {
        NEED(sizeof(struct fuse_fallocate_in));
        const struct fuse_fallocate_in *in = (const struct fuse_fallocate_in *)body;
        struct handle *h = (struct handle *)(uintptr_t)in->fh;
        if (!h || !h->pyfh) {
            reply_err(s, u, EBADF);
            return;
        }
        if (h->fd >= 0) { /* every mode the upper file system has (punch hole, zero range, ...) */
            int r;
            Py_BEGIN_ALLOW_THREADS
            drop_setid_for_caller(h->fd, ih);
            r = fallocate(h->fd, (int)in->mode, (off_t)in->offset, (off_t)in->length);
            Py_END_ALLOW_THREADS
            reply_err(s, u, r < 0 ? errno : 0);
            return;
        }
        call_simple(s, u,
                    PyObject_CallMethod(s->ops, "fallocate", "OIKK", h->pyfh, in->mode,
                                        (unsigned long long)in->offset, (unsigned long long)in->length));
        return;
    }
    case FUSE_READDIR:
    case FUSE_READDIRPLUS: {
        NEED(sizeof(struct fuse_read_in));
        const struct fuse_read_in *in = (const struct fuse_read_in *)body;
        struct handle *h = (struct handle *)(uintptr_t)in->fh;
        /* an upper directory not asked about since the last change: asked now, then listed here
         * if its names are its own (a walk lists a directory before it looks anything up in it) */
        if (h && in->offset == 0 && learn_dir_state(s, id) && upper_listable(s, node_get(&s->t, id))) {
            h->from_upper = 1;
            if (upper_readdir(s, u, node_get(&s->t, id), in, ih->opcode == FUSE_READDIRPLUS))
                return;
            h->from_upper = 0;
        }
        do_readdir(s, u, id, in, ih->opcode == FUSE_READDIRPLUS);
        return;
    }
    case FUSE_GETXATTR: {
        NEED(sizeof(struct fuse_getxattr_in));
        const struct fuse_getxattr_in *in = (const struct fuse_getxattr_in *)body;
        p += sizeof(*in);
        left -= sizeof(*in);
        if (!(name = take_name(&p, &left, &len)))
            break;
        do_getxattr(s, u, id, name, in->size, 0);
        return;
    }
    case FUSE_LISTXATTR:
        NEED(sizeof(struct fuse_getxattr_in));
        do_getxattr(s, u, id, NULL, ((const struct fuse_getxattr_in *)body)->size, 1);
        return;
    case FUSE_SETXATTR: {
        size_t head = s->setxattr_ext ? sizeof(struct fuse_setxattr_in) : FUSE_COMPAT_SETXATTR_IN_SIZE;
        NEED(head);
        const struct fuse_setxattr_in *in = (const struct fuse_setxattr_in *)body;
        int kill_sgid = s->setxattr_ext && (in->setxattr_flags & FUSE_SETXATTR_ACL_KILL_SGID);
        p += head;
        left -= head;
        if (!(name = take_name(&p, &left, &len)) || left < in->size)
            break;
        PyObject *path = path_or_reply(s, u, id);
        if (!path)
            return;
        struct node *xn = node_get(&s->t, id);
        if (xn)
            xn->no_caps = 0;
        unmark_lower(s, id);
        call_simple(s, u,
                    PyObject_CallMethod(s->ops, "setxattr", "Oy#y#Ii", path, name, (Py_ssize_t)len, p,
                                        (Py_ssize_t)in->size, in->flags, kill_sgid));
        Py_DECREF(path);
        return;
    }
    case FUSE_REMOVEXATTR: {
        if (!(name = take_name(&p, &left, &len)))
            break;
        PyObject *path = path_or_reply(s, u, id);
        if (!path)
            return;
        struct node *xn = node_get(&s->t, id);
        if (xn)
            xn->no_caps = 0;
        unmark_lower(s, id);
        call_simple(s, u, PyObject_CallMethod(s->ops, "removexattr", "Oy#", path, name, (Py_ssize_t)len));
        Py_DECREF(path);
        return;
    }
    case FUSE_ACCESS:
    default:
        /* ACCESS: default_permissions checks; locks, ioctl, poll, bmap, lseek, copy_file_range:
         * the kernel does them itself or reports that the filesystem does not */
        reply_err(s, u, ENOSYS);
        return;
    }
    reply_err(s, u, EINVAL); /* a malformed request */
}

/* ---- the Python type -------------------------------------------------------------------------- */

static int Session_init(Session *s, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd",         "ops",         "writable",        "entry_timeout",
                             "attr_timeout", "negative_timeout", "debug",      "store",
                             "chain_prefix", "statfs",      "threads",         "passthrough",
                             "file_cache",   "file_cache_size", "file_cache_min", "label",   "upper_dir",
                             "upper_ino",    "work_dir",        "lower_dirs",     NULL};
    const char *label = "the image";
    PyObject *store_path = Py_None, *statfs = Py_None, *cache_dir = Py_None, *upper_dir = Py_None, *work_dir = Py_None;
    PyObject *lower_dirs = Py_None;
    unsigned long long upper_ino = 0;
    unsigned long long cache_size = 0, cache_min = 0;
    const char *prefix = NULL;
    Py_ssize_t prefix_len = 0;
    int threads = 1;
    s->entry_timeout = s->attr_timeout = s->negative_timeout = 1.0;
    s->upper_fd = s->work_fd = -1;
    s->pipe[0] = s->pipe[1] = -1;
    s->union_gen = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO|pdddpOy#OipOKKsOKOO", kwlist, &s->fd, &s->ops, &s->writable,
                                     &s->entry_timeout, &s->attr_timeout, &s->negative_timeout, &s->debug,
                                     &store_path, &prefix, &prefix_len, &statfs, &threads, &s->try_passthrough,
                                     &cache_dir, &cache_size, &cache_min, &label, &upper_dir, &upper_ino, &work_dir,
                                     &lower_dirs))
        return -1;
    /* owned from here on: Session_dealloc drops it, also after a failure below (it dropped a
       reference it never took when a store failed to open: the caller's ops was freed) */
    Py_INCREF(s->ops);
    snprintf(s->label, sizeof(s->label), "%s", label);
    if (store_path == Py_None || s->writable)
        threads = 1; /* the Python request path is single-threaded */
    if (threads < 1 || threads > 64) {
        PyErr_SetString(PyExc_ValueError, "threads must be 1 to 64");
        return -1;
    }
    s->workers = calloc((size_t)threads, sizeof(*s->workers));
    if (!s->workers) {
        PyErr_NoMemory();
        return -1;
    }
    s->nworkers = threads;
    /* the pin renewal must not wait behind an endless stream of overlapping reads */
    pthread_rwlockattr_t rwattr;
    pthread_rwlockattr_init(&rwattr);
    pthread_rwlockattr_setkind_np(&rwattr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    int lock_failed = pthread_rwlock_init(&s->pin_lock, &rwattr);
    pthread_rwlockattr_destroy(&rwattr);
    if (lock_failed) {
        PyErr_SetString(PyExc_OSError, "cannot create a lock");
        return -1;
    }
    if (store_path != Py_None) {
        PyObject *encoded;
        char err[512];
        if (prefix_len != 8) {
            PyErr_SetString(PyExc_ValueError, "the store serves one chain (an 8-byte prefix)");
            return -1;
        }
        if (s->writable) { /* the union rules stay in Python; lower file contents come from here */
            if (!PyUnicode_FSConverter(store_path, &encoded))
                return -1;
            s->lower_reader =
                fs_store_open(PyBytes_AS_STRING(encoded), (const unsigned char *)prefix, err, sizeof(err));
            if (!s->lower_reader) {
                Py_DECREF(encoded);
                PyErr_SetString(PyExc_OSError, err);
                return -1;
            }
            if (cache_dir != Py_None && cache_size > 0) {
                PyObject *dir;
                if (!PyUnicode_FSConverter(cache_dir, &dir)) {
                    Py_DECREF(encoded);
                    return -1;
                }
                s->fill_reader =
                    fs_store_open(PyBytes_AS_STRING(encoded), (const unsigned char *)prefix, err, sizeof(err));
                if (s->fill_reader)
                    s->cache = fc_open(PyBytes_AS_STRING(dir), cache_size, cache_min, fill_read, s, err, sizeof(err));
                Py_DECREF(dir);
                if (!s->cache) { /* a luxury: without it lower files are read from the store */
                    fprintf(stderr, "layerfs: no file cache: %s\n", err);
                    fs_store_close(s->fill_reader);
                    s->fill_reader = NULL;
                }
            }
            struct reader *r = calloc(1, sizeof(*r));
            if (r && (r->buf = malloc(BUF_SIZE)) &&
                (r->st = fs_store_open(PyBytes_AS_STRING(encoded), (const unsigned char *)prefix, err,
                                       sizeof(err))) &&
                pthread_mutex_init(&r->mu, NULL) == 0) {
                if (pthread_cond_init(&r->cv, NULL) == 0) {
                    s->reader = r;
                    r = NULL;
                } else {
                    pthread_mutex_destroy(&r->mu);
                }
            }
            if (r) { /* a luxury too: without it the serving thread reads everything */
                fs_store_close(r->st);
                free(r->buf);
                free(r);
            }
            Py_DECREF(encoded);
            store_path = Py_None;
            s->workers[0].store = s->lower_reader; /* rw_fast's: the same thread */
        }
    }
    if (lower_dirs != Py_None) { /* layerfs-overlay's layers, topmost first */
        Py_ssize_t n = PySequence_Check(lower_dirs) ? PySequence_Size(lower_dirs) : -1;
        if (n < 1 || n > MAX_LAYERS) {
            PyErr_SetString(PyExc_ValueError, "lower_dirs: 1 to 63 directories");
            return -1;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PySequence_GetItem(lower_dirs, i), *encoded;
            int ok = item && PyUnicode_FSConverter(item, &encoded);
            Py_XDECREF(item);
            if (!ok)
                return -1;
            s->layer_fd[i] = open(PyBytes_AS_STRING(encoded), O_PATH | O_DIRECTORY | O_CLOEXEC);
            if (s->layer_fd[i] < 0) {
                PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, encoded);
                Py_DECREF(encoded);
                return -1;
            }
            Py_DECREF(encoded);
            s->nlayers = (int)i + 1;
        }
    }
    if (s->writable && upper_dir != Py_None) {
        /* upper_create's and upper_copy_up's; without them Python makes every name */
        PyObject *dirs[2] = {upper_dir, work_dir}, *encoded;
        int *fds[2] = {&s->upper_fd, &s->work_fd};
        for (int i = 0; i < 2 && dirs[i] != Py_None; i++) {
            if (!PyUnicode_FSConverter(dirs[i], &encoded))
                return -1;
            *fds[i] = open(PyBytes_AS_STRING(encoded), O_PATH | O_DIRECTORY | O_CLOEXEC);
            Py_DECREF(encoded);
        }
        s->upper_ino = upper_ino;
    }
    if (store_path != Py_None) {
        PyObject *encoded;
        char err[512];
        unsigned long long f[5];
        unsigned int bsize, namelen, frsize;
        if (!PyArg_ParseTuple(statfs, "KKKKKIII", &f[0], &f[1], &f[2], &f[3], &f[4], &bsize, &namelen, &frsize))
            return -1;
        s->statfs.st.blocks = f[0];
        s->statfs.st.bfree = f[1];
        s->statfs.st.bavail = f[2];
        s->statfs.st.files = f[3];
        s->statfs.st.ffree = f[4];
        s->statfs.st.bsize = bsize;
        s->statfs.st.namelen = namelen;
        s->statfs.st.frsize = frsize;
        if (!PyUnicode_FSConverter(store_path, &encoded))
            return -1;
        for (int i = 0; i < threads; i++) {
            s->workers[i].store =
                fs_store_open(PyBytes_AS_STRING(encoded), (const unsigned char *)prefix, err, sizeof(err));
            if (!s->workers[i].store) {
                Py_DECREF(encoded);
                PyErr_SetString(PyExc_OSError, err);
                return -1;
            }
        }
        Py_DECREF(encoded);
        s->store = s->workers[0].store;
    }
    if (table_init(&s->t) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    struct node *root = node_make(&s->t, ROOT_ID);
    for (int i = 0; i < s->nworkers; i++) {
        s->workers[i].s = s;
        if (!(s->workers[i].buf = malloc(2 * BUF_SIZE))) {
            PyErr_NoMemory();
            return -1;
        }
    }
    s->buf = s->workers[0].buf;
    if (!root) {
        PyErr_NoMemory();
        return -1;
    }
    root->nlookup = 1;
    s->generation = 1;
    return 0;
}

static void Session_dealloc(Session *s)
{
    if (s->reader) {
        reader_stop(s);
        fs_store_close(s->reader->st);
        free(s->reader->buf);
        pthread_cond_destroy(&s->reader->cv);
        pthread_mutex_destroy(&s->reader->mu);
        free(s->reader);
    }
    fc_close(s->cache); /* its thread reads through fill_reader */
    fs_store_close(s->fill_reader);
    if (!s->nworkers || s->workers[0].store != s->lower_reader)
        fs_store_close(s->lower_reader);
    for (int i = 0; i < s->nworkers; i++) {
        fs_store_close(s->workers[i].store);
        free(s->workers[i].buf);
    }
    free(s->workers);
    if (s->nworkers)
        pthread_rwlock_destroy(&s->pin_lock);
    Py_XDECREF(s->ops);
    if (s->t.nodes) {
        for (size_t i = 0; i < s->t.dentcap; i++) {
            struct dentry *d = s->t.dentries[i];
            while (d) {
                struct dentry *next = d->hnext;
                free(d);
                d = next;
            }
        }
        for (size_t i = 0; i < s->t.nodecap; i++) {
            struct node *n = s->t.nodes[i];
            while (n) {
                struct node *next = n->hnext;
                free(n);
                n = next;
            }
        }
        free(s->t.nodes);
        free(s->t.dentries);
    }
    free(s->pb.p);
    free(s->pb2.p);
    if (s->upper_fd > 0) /* (0: never initialised) */
        close(s->upper_fd);
    if (s->work_fd > 0)
        close(s->work_fd);
    for (int i = 0; i < 2; i++)
        if (s->pipe[i] > 0)
            close(s->pipe[i]);
    for (int i = 0; i < s->nlayers; i++)
        close(s->layer_fd[i]);
    for (int i = 0; i < DIR_SLOTS; i++)
        if (s->dirs[i].fd > 0)
            close(s->dirs[i].fd);
    free(s->adopt); /* handles still queued are freed at their RELEASE, or die with the daemon */
    free(s->made);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

/* Serve until the file system is unmounted.  Returns None; raises on a device error, or with
 * the exception of a signal handler (which usually unmounts first). */
static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* About once a second, one thread has the Python side renew the read transaction that keeps
 * the pages of our snapshots (ext/fusestore.h), while no store read is under way. */
static void maybe_pin(Session *s, int have_gil)
{
    long long t = now_ns(), last = __atomic_load_n(&s->last_pin_ns, __ATOMIC_RELAXED);
    if (t - last < 1000000000LL ||
        !__atomic_compare_exchange_n(&s->last_pin_ns, &last, t, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        return;
    PyGILState_STATE g = PyGILState_UNLOCKED;
    if (!have_gil)
        g = PyGILState_Ensure();
    pthread_rwlock_wrlock(&s->pin_lock);
    PyObject *res = PyObject_CallMethod(s->ops, "pin", NULL);
    if (!res)
        PyErr_Print();
    Py_XDECREF(res);
    pthread_rwlock_unlock(&s->pin_lock);
    if (!have_gil)
        PyGILState_Release(g);
}

static int valid_request(const char *buf, ssize_t n)
{
    return n >= (ssize_t)sizeof(struct fuse_in_header) && ((const struct fuse_in_header *)buf)->len == (uint32_t)n;
}

static int serve_fast(Session *s, struct worker *w, ssize_t n)
{
    pthread_rwlock_rdlock(&s->pin_lock);
    int handled = fast_dispatch(s, w, w->buf, (size_t)n);
    pthread_rwlock_unlock(&s->pin_lock);
    return handled;
}

/* A thread beside the main one (read-only mounts from the store only): never calls Python but
 * to renew the pin; what the store cannot answer gets ENOSYS. */
static void *worker_main(void *arg)
{
    struct worker *w = arg;
    Session *s = w->s;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the main thread's: it unmounts */
    for (;;) {
        ssize_t n = read(s->fd, w->buf, BUF_SIZE);
        if (n < 0) {
            if (errno == EINTR || errno == ENOENT || errno == EAGAIN)
                continue;
            break; /* ENODEV: unmounted */
        }
        if (!valid_request(w->buf, n))
            continue;
        __atomic_add_fetch(&s->requests, 1, __ATOMIC_RELAXED);
        if (!serve_fast(s, w, n))
            reply_err(s, ((const struct fuse_in_header *)w->buf)->unique, ENOSYS);
        maybe_pin(s, 0);
    }
    return NULL;
}

static void join_workers(Session *s)
{
    Py_BEGIN_ALLOW_THREADS
    reader_stop(s);
    for (int i = 1; i < s->nworkers; i++)
        if (s->workers[i].started) {
            pthread_join(s->workers[i].thread, NULL);
            s->workers[i].started = 0;
        }
    Py_END_ALLOW_THREADS
}

/* Serve until the file system is unmounted.  Returns None; raises on a device error, or with
 * the exception of a signal handler (which usually unmounts first). */
static PyObject *Session_run(Session *s, PyObject *unused)
{
    struct worker *w = &s->workers[0];
    s->last_pin_ns = now_ns();
    for (int i = 1; i < s->nworkers && s->store; i++)
        s->workers[i].started = pthread_create(&s->workers[i].thread, NULL, worker_main, &s->workers[i]) == 0;
    if (s->reader && !s->reader->started)
        s->reader->started = pthread_create(&s->reader->thread, NULL, reader_main, s) == 0;
    for (;;) {
        ssize_t n;
        int handled = 0, err = 0;
        PyThreadState *ts = PyEval_SaveThread();
        n = read(s->fd, w->buf, BUF_SIZE);
        if (n < 0)
            err = errno;
        if (n >= (ssize_t)sizeof(struct fuse_in_header) && s->debug)
            fprintf(stderr, "layerfs: op %u node %llu len %u\n", ((const struct fuse_in_header *)w->buf)->opcode,
                    (unsigned long long)((const struct fuse_in_header *)w->buf)->nodeid,
                    ((const struct fuse_in_header *)w->buf)->len);
        if (s->store && valid_request(w->buf, n))
            handled = serve_fast(s, w, n);
        else if ((w->store || s->nlayers) && valid_request(w->buf, n))
            handled = rw_fast(s, w, w->buf, (size_t)n);
        PyEval_RestoreThread(ts);
        if (n < 0) {
            if (err == EINTR) {
                if (PyErr_CheckSignals() < 0) {
                    join_workers(s);
                    return NULL;
                }
                continue;
            }
            if (err == ENOENT || err == EAGAIN)
                continue; /* an interrupted request vanished before we read it */
            if (err == ENODEV)
                break; /* unmounted */
            join_workers(s);
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        __atomic_add_fetch(&s->requests, 1, __ATOMIC_RELAXED);
        if (!handled && valid_request(w->buf, n)) {
            dispatch(s, w->buf, (size_t)n);
            if (PyErr_Occurred()) /* a handler left one behind: report it, keep serving */
                PyErr_Print();
        }
        if (s->store || s->lower_reader)
            maybe_pin(s, 1);
    }
    join_workers(s);
    Py_RETURN_NONE;
}

static PyObject *Session_stats(Session *s, PyObject *unused)
{
    return Py_BuildValue("{s:K,s:K,s:n,s:n}", "requests", (unsigned long long)s->requests, "from_store",
                         (unsigned long long)s->fast_requests, "nodes", (Py_ssize_t)s->t.nnodes, "names",
                         (Py_ssize_t)s->t.ndentries);
}

static PyObject *Session_read_ahead(Session *s, PyObject *unused)
{
    return PyLong_FromUnsignedLong(read_ahead(s));
}

static PyMethodDef Session_methods[] = {
    {"run", (PyCFunction)Session_run, METH_NOARGS, "Serve requests until the file system is unmounted."},
    {"read_ahead", (PyCFunction)Session_read_ahead, METH_NOARGS,
     "Bytes the kernel should read ahead of a sequential reader (the mount device's read_ahead_kb)."},
    {"stats", (PyCFunction)Session_stats, METH_NOARGS, "Requests served, nodes and names held."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "layerfs._cfuse.Session",
    .tp_basicsize = sizeof(Session),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Session_init,
    .tp_dealloc = (destructor)Session_dealloc,
    .tp_methods = Session_methods,
    .tp_doc = "A FUSE session on an open /dev/fuse descriptor, serving an ops object.",
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "layerfs._cfuse", "The FUSE request path in C (low-level protocol).", -1, NULL,
};

PyMODINIT_FUNC PyInit__cfuse(void)
{
    if (PyType_Ready(&SessionType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&SessionType);
    if (PyModule_AddObject(m, "Session", (PyObject *)&SessionType) < 0) {
        Py_DECREF(&SessionType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "PROTOCOL_MINOR", FUSE_KERNEL_MINOR_VERSION);
    return m;
}
