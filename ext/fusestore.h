/*
 * The store as the C FUSE core reads it: an image's merged index (the `union` database) and
 * the chunks of file contents (`objects`, `packs`), straight from LMDB.  Formats: docs/FORMAT.md.
 * No Python, no FUSE: the request path calls these without the GIL.
 *
 * One handle per process: the environment is opened MDB_RDONLY | MDB_NOLOCK, so it never touches
 * lock.mdb (a second ordinary handle in a process that also has py-lmdb's would reset the lock
 * file under the other: LMDB's locks are per process).  Without a reader slot of its own, what
 * keeps writers from reusing the pages it reads is a read transaction the Python side of the
 * daemon holds and renews about once a second, never while a read is under way here: every
 * snapshot read here is at least as new as that pinned one, and LMDB reuses no page freed after
 * the oldest pinned snapshot.
 *
 * Not thread-safe: one reader transaction, one decompression context, one chunk cache; a thread
 * opens its own (the handles share nothing but the data file's pages).
 */
#ifndef LAYERFS_FUSESTORE_H
#define LAYERFS_FUSESTORE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

struct fs_store;

/* An inode record of the merged index, pointing into the current transaction's pages. */
struct fs_inode {
    uint8_t kind;
    uint8_t flags;
    uint32_t mode; /* with the S_IF type bits */
    uint32_t uid, gid, nlink;
    uint64_t size;
    int64_t mtime_ns;
    uint64_t rdev;
    const unsigned char *content; /* 32-byte object id, or NULL (no contents) */
    const char *link;
    size_t link_len;
    const unsigned char *xattrs; /* count * (u16 name_len | u32 value_len | name | value) */
    size_t xattrs_len;
    unsigned xattr_count;
};

/* Directory listing iteration (a cursor over `D` records of one directory). */
struct fs_dirent {
    const char *name;
    size_t name_len;
    uint64_t ino;
    uint32_t mode; /* file type bits */
};

/* Open the store at `path` for the chain whose 8-byte key prefix is `prefix`; NULL and an errno
 * with a message in `err` on failure. */
struct fs_store *fs_store_open(const char *path, const unsigned char prefix[8], char *err, size_t errlen);
void fs_store_close(struct fs_store *st);

/* Every call below runs inside fs_store_begin / fs_store_end (one snapshot per request). */
int fs_store_begin(struct fs_store *st);
void fs_store_end(struct fs_store *st);

/* 0, -ENOENT, or -EIO (a malformed record, logged) */
int fs_store_inode(struct fs_store *st, uint64_t ino, struct fs_inode *out);
int fs_store_lookup(struct fs_store *st, uint64_t parent, const char *name, size_t len, uint64_t *ino);

/* Directory listing: start at the first name after `after` (NULL: from the start);
 * fs_store_dir_next gives 1 per entry, 0 at the end, <0 on error. */
int fs_store_dir_start(struct fs_store *st, uint64_t dir, const char *after, size_t after_len);
int fs_store_dir_next(struct fs_store *st, struct fs_dirent *out);

/* Read `size` bytes at `offset` of the contents of an inode into `buf`: bytes read, or -EIO
 * (a chunk fails its checksum or does not decompress; logged with the object and chunk). */
long fs_store_read(struct fs_store *st, const struct fs_inode *inode, uint64_t ino, char *buf, size_t size,
                   uint64_t offset);

/* The same, but whole chunks stored raw in LMDB are not copied into `buf`: the bytes read are
 * iov[0..*niov) (at most FS_STORE_IOV entries), some pointing into the store's map, valid until
 * fs_store_end; the rest of them in `buf`, at their offset into the read. */
#define FS_STORE_IOV 20
long fs_store_readv(struct fs_store *st, const struct fs_inode *inode, uint64_t ino, char *buf, size_t size,
                    uint64_t offset, struct iovec *iov, int *niov);

/* The path of inode `ino` ("/a/b"), found by scanning the index's names (slow: for error
 * messages only); 0, -ENOENT (not reachable from the root) or -ERANGE (longer than cap). */
int fs_store_path(struct fs_store *st, uint64_t ino, char *out, size_t cap);

#endif
