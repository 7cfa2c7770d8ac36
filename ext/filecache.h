/*
 * The file cache: whole decompressed lower files on the host's disk, so that the kernel can read
 * them itself (FUSE passthrough) instead of asking the daemon to decompress chunks from the store.
 *
 * One flat directory per store (`<store>/filecache`), shared by every mount of that store: a
 * file is named by the hex of its object id (the SHA-256 of its contents), so two images, or two
 * mounts, holding the same file share one copy.  Files are filled by a background thread of the
 * mount that first opened them, written to an O_TMPFILE and linked in only when complete (a kill
 * at any point leaves nothing half-written under a name), and evicted least recently used (the
 * mtime, refreshed when a hit finds it older than FC_TOUCH_AFTER) once the directory holds more
 * than its bound.  A cached file is trusted as it is: the chunks' XXH3 sums were checked when it
 * was filled, the directory is private to the store's owner, and a size that does not match the
 * index's makes the entry a miss.
 *
 * Knows nothing of LMDB or FUSE: contents come through the fc_read_fn the owner gives.
 */
#ifndef LAYERFS_FILECACHE_H
#define LAYERFS_FILECACHE_H

#include <stddef.h>
#include <stdint.h>

struct fc;

/* Read `size` bytes at `offset` of index inode `ino` into `buf`: bytes read or -errno.
 * Called on the cache's own thread. */
typedef long (*fc_read_fn)(void *arg, uint64_t ino, char *buf, size_t size, uint64_t offset);

/* Open (creating it 0700) the cache directory `dir`: at most `bound` bytes of files, each of at
 * least `min_size` bytes.  NULL and a message in `err` on failure. */
struct fc *fc_open(const char *dir, uint64_t bound, uint64_t min_size, fc_read_fn read, void *arg, char *err,
                   size_t errlen);

/* Stop the fill thread (a fill under way is abandoned, leaving nothing) and free. */
void fc_close(struct fc *c);

/* A read-only descriptor of the cached copy of object `id` (`size` bytes), or -1. */
int fc_lookup(struct fc *c, const unsigned char id[32], uint64_t size);

/* Ask for object `id` (index inode `ino`, `size` bytes) to be filled in the background; ignored
 * when it is too small, too large for the bound, already queued, or the queue is full. */
void fc_want(struct fc *c, const unsigned char id[32], uint64_t ino, uint64_t size);

#endif
