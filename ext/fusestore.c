/* The store as the C FUSE core reads it (see fusestore.h for the why of the LMDB handle). */
#define _FILE_OFFSET_BITS 64 /* pack files are read with pread: 64-bit offsets on 32-bit systems too */
#include "fusestore.h"

#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#define XXH_INLINE_ALL /* the system's header, inlined: XXH3 is a handful of vector loops */
#include <xxhash.h>

#define PREFIX_LEN 8
#define REC_FIXED 46              /* <BBIIIIQqQHH */
#define HAS_CONTENT 0x80
#define OBJ_HEAD 13               /* <BQI: version, size, chunk count */
#define OBJ_CHUNK 29              /* <QIIIQB: pack, offset, stored, raw, xxh3, codec */
#define MAX_CHUNK (4u << 20)      /* a chunk larger than this is a damaged record, not data */
#define CACHE_SLOTS 64            /* decompressed chunks kept for reads that cover part of one */
/* Records read between drops of the store pages mapped into this process: a walk of a large
 * tree touches many B-tree pages, which would count in the daemon's resident memory for as long
 * as the map lives (one READDIRPLUS reads hundreds of records, so this counts records, not
 * requests).  Dropping them is safe between transactions: the map is a shared read-only file
 * map, so a page touched again is faulted back in from the page cache.  A drop costs
 * microseconds. */
#define TRIM_EVERY 4096
#define PACK_FDS 16 /* pack files kept open (file packs), by pack id modulo this */
/* 32-bit: the map covers data.mdb and this much more (address space is scarce: a map per thread) */
#define MAP_SLACK_32 ((size_t)32 << 20)

struct pack_fd {
    uint64_t pack;
    int fd; /* -1: empty */
};

struct cache_slot {
    uint64_t pack;
    uint32_t offset;
    uint32_t len;
    uint32_t cap;
    int used;
    char *data;
};

struct fs_store {
    MDB_env *env;
    MDB_dbi dbi_union, dbi_objects, dbi_packs;
    MDB_txn *txn;
    MDB_cursor *cur;
    unsigned char prefix[PREFIX_LEN];
    unsigned char dirkey[PREFIX_LEN + 1 + 8];
    ZSTD_DCtx *dctx;
    unsigned long touched; /* records read since the last drop */
    char *map;             /* this handle's map of data.mdb (LMDB does not tell it) */
    size_t map_len;
    struct cache_slot cache[CACHE_SLOTS];
    char *path;            /* the store directory */
    int pack_dir;          /* file packs (meta/payload "files"): the packs/ directory; else -1 */
    struct pack_fd fds[PACK_FDS];
    char *src;             /* a stored chunk read from a pack file, before it is decompressed */
    size_t src_cap;
};

static uint16_t le16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t le32(const unsigned char *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t le64(const unsigned char *p) { return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32; }

static void put_be64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (unsigned char)v;
        v >>= 8;
    }
}

static void find_map(struct fs_store *st, const void *p);

/* The map to ask for: address space only (the pages are the data file's, mapped read-only and
 * shared).  64-bit: plenty.  32-bit: the data file and some room, as each reader thread has its
 * own map beside py-lmdb's (LMDB never maps less than the pages in use). */
static size_t map_size(const char *path)
{
    if (sizeof(void *) >= 8)
        return (size_t)1 << 40;
    char data[4096];
    struct stat sb;
    snprintf(data, sizeof(data), "%s/data.mdb", path);
    if (stat(data, &sb) != 0 || (uint64_t)sb.st_size > (uint64_t)SIZE_MAX - MAP_SLACK_32)
        return (size_t)768 << 20;
    return (size_t)sb.st_size + MAP_SLACK_32;
}

/* The environment, read-only, with the map map_size asks for; where that much address space is
 * not lent (qemu-aarch64 refused 1 TiB with ENOMEM, as a 39-bit arm64 kernel, 512 GiB per process,
 * would), half of it and so on.  LMDB raises the size to at least the one the store was written
 * with. */
static int open_env(struct fs_store *st, const char *path)
{
    size_t size = map_size(path);
    for (;;) {
        int rc = mdb_env_create(&st->env);
        if (rc)
            return rc;
        rc = mdb_env_set_maxdbs(st->env, 16);
        if (!rc)
            rc = mdb_env_set_mapsize(st->env, size);
        if (!rc)
            rc = mdb_env_open(st->env, path, MDB_RDONLY | MDB_NOLOCK | MDB_NOTLS, 0600);
        if (!rc)
            return 0;
        mdb_env_close(st->env);
        st->env = NULL;
        if (rc != ENOMEM || size <= (size_t)256 << 20)
            return rc;
        size /= 2;
    }
}

struct fs_store *fs_store_open(const char *path, const unsigned char prefix[8], char *err, size_t errlen)
{
    struct fs_store *st = calloc(1, sizeof(*st));
    MDB_txn *txn = NULL;
    MDB_dbi dbi_meta;
    MDB_val pk = {7, "payload"}, pv;
    int rc, files = 0;
    if (!st) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    st->pack_dir = -1;
    for (int i = 0; i < PACK_FDS; i++)
        st->fds[i].fd = -1;
    memcpy(st->prefix, prefix, PREFIX_LEN);
    if (!(st->path = strdup(path))) {
        snprintf(err, errlen, "out of memory");
        fs_store_close(st);
        return NULL;
    }
    if ((rc = open_env(st, path)) || (rc = mdb_txn_begin(st->env, NULL, MDB_RDONLY, &txn)) ||
        (rc = mdb_dbi_open(txn, "union", 0, &st->dbi_union)) ||
        (rc = mdb_dbi_open(txn, "objects", 0, &st->dbi_objects)) ||
        (rc = mdb_dbi_open(txn, "packs", 0, &st->dbi_packs)) || (rc = mdb_dbi_open(txn, "meta", 0, &dbi_meta))) {
        snprintf(err, errlen, "cannot open the store at %s: %s", path, mdb_strerror(rc));
        if (txn)
            mdb_txn_abort(txn);
        fs_store_close(st);
        return NULL;
    }
    /* where the payload is (docs/FORMAT.md: meta/payload; a store made before it has none) */
    if (mdb_get(txn, dbi_meta, &pk, &pv) == 0) {
        if (pv.mv_size == 5 && memcmp(pv.mv_data, "files", 5) == 0) {
            files = 1;
        } else if (!(pv.mv_size == 4 && memcmp(pv.mv_data, "lmdb", 4) == 0)) {
            snprintf(err, errlen, "the store at %s keeps its payload in a way this layerfs cannot read", path);
            mdb_txn_abort(txn);
            fs_store_close(st);
            return NULL;
        }
    }
    if ((rc = mdb_txn_commit(txn))) {
        snprintf(err, errlen, "cannot open the store at %s: %s", path, mdb_strerror(rc));
        fs_store_close(st);
        return NULL;
    }
    if (files) {
        char dir[4096];
        snprintf(dir, sizeof(dir), "%s/packs", path);
        st->pack_dir = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (st->pack_dir < 0) {
            snprintf(err, errlen, "cannot open the pack files of the store at %s: %s", path, strerror(errno));
            fs_store_close(st);
            return NULL;
        }
    }
    if ((rc = mdb_txn_begin(st->env, NULL, MDB_RDONLY, &st->txn))) {
        snprintf(err, errlen, "cannot read the store at %s: %s", path, mdb_strerror(rc));
        fs_store_close(st);
        return NULL;
    }
    /* where the map is, for trim_map: any record's address lies in it */
    MDB_cursor *cur;
    MDB_val k, v;
    if (!mdb_cursor_open(st->txn, st->dbi_union, &cur)) { /* the transaction is still live */
        if (!mdb_cursor_get(cur, &k, &v, MDB_FIRST))
            find_map(st, v.mv_data);
        mdb_cursor_close(cur);
    }
    mdb_txn_reset(st->txn);
    st->dctx = ZSTD_createDCtx();
    if (!st->dctx) {
        snprintf(err, errlen, "out of memory");
        fs_store_close(st);
        return NULL;
    }
    return st;
}

void fs_store_close(struct fs_store *st)
{
    if (!st)
        return;
    if (st->cur)
        mdb_cursor_close(st->cur);
    if (st->txn)
        mdb_txn_abort(st->txn);
    if (st->env)
        mdb_env_close(st->env);
    if (st->dctx)
        ZSTD_freeDCtx(st->dctx);
    for (int i = 0; i < CACHE_SLOTS; i++)
        free(st->cache[i].data);
    for (int i = 0; i < PACK_FDS; i++)
        if (st->fds[i].fd >= 0)
            close(st->fds[i].fd);
    if (st->pack_dir >= 0)
        close(st->pack_dir);
    free(st->src);
    free(st->path);
    free(st);
}

/* The map that holds `p` (a pointer LMDB gave us into its pages), from /proc/self/maps. */
static void find_map(struct fs_store *st, const void *p)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    if (!f)
        return;
    while (fgets(line, sizeof(line), f)) {
        unsigned long start, end;
        if (sscanf(line, "%lx-%lx", &start, &end) == 2 && (uintptr_t)p >= start && (uintptr_t)p < end) {
            st->map = (char *)start;
            st->map_len = end - start;
            break;
        }
    }
    fclose(f);
}

static void trim_map(struct fs_store *st)
{
    MDB_envinfo info;
    MDB_stat stat;
    if (!st->map || mdb_env_info(st->env, &info) || mdb_env_stat(st->env, &stat))
        return;
    size_t used = (size_t)(info.me_last_pgno + 1) * stat.ms_psize;
    madvise(st->map, used < st->map_len ? used : st->map_len, MADV_DONTNEED);
}

int fs_store_begin(struct fs_store *st)
{
    if (st->touched >= TRIM_EVERY) {
        trim_map(st); /* between transactions: nothing of the map is in use */
        st->touched = 0;
    }
    int rc = mdb_txn_renew(st->txn);
    if (rc == MDB_MAP_RESIZED) { /* another process grew the store past our map: adopt it */
        mdb_env_set_mapsize(st->env, sizeof(void *) >= 8 ? 0 : map_size(st->path));
        rc = mdb_txn_renew(st->txn);
    }
    if (rc) {
        fprintf(stderr, "layerfs: cannot read the store: %s\n", mdb_strerror(rc));
        return -EIO;
    }
    return 0;
}

void fs_store_end(struct fs_store *st)
{
    if (st->cur) {
        mdb_cursor_close(st->cur);
        st->cur = NULL;
    }
    mdb_txn_reset(st->txn);
}

static int bad_record(uint64_t ino, const char *what)
{
    fprintf(stderr, "layerfs: the index record of inode %llu is damaged (%s)\n", (unsigned long long)ino, what);
    return -EIO;
}

int fs_store_inode(struct fs_store *st, uint64_t ino, struct fs_inode *out)
{
    unsigned char key[PREFIX_LEN + 1 + 8];
    memcpy(key, st->prefix, PREFIX_LEN);
    key[PREFIX_LEN] = 'I';
    put_be64(key + PREFIX_LEN + 1, ino);
    MDB_val k = {sizeof(key), key}, v;
    st->touched++;
    int rc = mdb_get(st->txn, st->dbi_union, &k, &v);
    if (rc == MDB_NOTFOUND)
        return -ENOENT;
    if (rc)
        return -EIO;
    const unsigned char *p = v.mv_data;
    size_t n = v.mv_size;
    if (n < REC_FIXED)
        return bad_record(ino, "short");
    out->kind = p[0];
    out->flags = p[1];
    out->mode = le32(p + 2);
    out->uid = le32(p + 6);
    out->gid = le32(p + 10);
    out->nlink = le32(p + 14);
    out->size = le64(p + 18);
    out->mtime_ns = (int64_t)le64(p + 26);
    out->rdev = le64(p + 34);
    out->link_len = le16(p + 42);
    out->xattr_count = le16(p + 44);
    size_t pos = REC_FIXED;
    out->content = NULL;
    if (out->flags & HAS_CONTENT) {
        if (n < pos + 32)
            return bad_record(ino, "content id");
        out->content = p + pos;
        pos += 32;
    }
    if (n < pos + out->link_len)
        return bad_record(ino, "link target");
    out->link = (const char *)p + pos;
    pos += out->link_len;
    out->xattrs = p + pos;
    out->xattrs_len = n - pos;
    /* the xattr list must account for the rest of the record exactly */
    size_t x = 0;
    for (unsigned i = 0; i < out->xattr_count; i++) {
        if (out->xattrs_len - x < 6)
            return bad_record(ino, "xattrs");
        size_t nl = le16(out->xattrs + x), vl = le32(out->xattrs + x + 2);
        if (out->xattrs_len - x - 6 < nl + vl)
            return bad_record(ino, "xattrs");
        x += 6 + nl + vl;
    }
    if (x != out->xattrs_len)
        return bad_record(ino, "trailing bytes");
    return 0;
}

static void dir_key(struct fs_store *st, uint64_t dir)
{
    memcpy(st->dirkey, st->prefix, PREFIX_LEN);
    st->dirkey[PREFIX_LEN] = 'D';
    put_be64(st->dirkey + PREFIX_LEN + 1, dir);
}

int fs_store_lookup(struct fs_store *st, uint64_t parent, const char *name, size_t len, uint64_t *ino)
{
    unsigned char key[PREFIX_LEN + 1 + 8 + 256];
    if (len == 0 || len > 255)
        return -ENOENT;
    dir_key(st, parent);
    memcpy(key, st->dirkey, sizeof(st->dirkey));
    memcpy(key + sizeof(st->dirkey), name, len);
    MDB_val k = {sizeof(st->dirkey) + len, key}, v;
    st->touched++;
    int rc = mdb_get(st->txn, st->dbi_union, &k, &v);
    if (rc == MDB_NOTFOUND)
        return -ENOENT;
    if (rc || v.mv_size < 12)
        return -EIO;
    *ino = le64(v.mv_data);
    return 0;
}

int fs_store_dir_start(struct fs_store *st, uint64_t dir, const char *after, size_t after_len)
{
    unsigned char key[PREFIX_LEN + 1 + 8 + 256];
    if (after_len > 255)
        return -EINVAL;
    if (!st->cur && mdb_cursor_open(st->txn, st->dbi_union, &st->cur))
        return -EIO;
    dir_key(st, dir);
    memcpy(key, st->dirkey, sizeof(st->dirkey));
    if (after)
        memcpy(key + sizeof(st->dirkey), after, after_len);
    MDB_val k = {sizeof(st->dirkey) + (after ? after_len : 0), key}, v;
    int rc = mdb_cursor_get(st->cur, &k, &v, MDB_SET_RANGE);
    if (rc == MDB_NOTFOUND)
        return 0;
    if (rc)
        return -EIO;
    /* resuming: the name given was sent already */
    if (after && k.mv_size == sizeof(st->dirkey) + after_len &&
        memcmp((const char *)k.mv_data + sizeof(st->dirkey), after, after_len) == 0) {
        rc = mdb_cursor_get(st->cur, &k, &v, MDB_NEXT);
        if (rc == MDB_NOTFOUND)
            return 0;
        if (rc)
            return -EIO;
    }
    return 1;
}

int fs_store_dir_next(struct fs_store *st, struct fs_dirent *out)
{
    MDB_val k, v;
    if (!st->cur)
        return 0;
    st->touched++;
    int rc = mdb_cursor_get(st->cur, &k, &v, MDB_GET_CURRENT);
    if (rc == MDB_NOTFOUND || rc == EINVAL)
        return 0;
    if (rc)
        return -EIO;
    if (k.mv_size <= sizeof(st->dirkey) || memcmp(k.mv_data, st->dirkey, sizeof(st->dirkey)) != 0)
        return 0; /* past the directory */
    if (v.mv_size < 12)
        return -EIO;
    out->name = (const char *)k.mv_data + sizeof(st->dirkey);
    out->name_len = k.mv_size - sizeof(st->dirkey);
    out->ino = le64(v.mv_data);
    out->mode = le32((const unsigned char *)v.mv_data + 8);
    rc = mdb_cursor_get(st->cur, &k, &v, MDB_NEXT);
    if (rc == MDB_NOTFOUND) { /* the entry given out is the last: leave the cursor past it */
        mdb_cursor_close(st->cur);
        st->cur = NULL;
    } else if (rc) {
        return -EIO;
    }
    return 1;
}

static int chunk_error(uint64_t ino, const unsigned char *content, uint64_t pack, uint32_t off, const char *what)
{
    char hex[65];
    for (int i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", content[i]);
    fprintf(stderr, "layerfs: inode %llu: object %s: chunk in pack %llu at %u %s\n", (unsigned long long)ino, hex,
            (unsigned long long)pack, off, what);
    return -EIO;
}

/* The descriptor of a pack file (file packs), opened on first use and kept: a file is written
 * once and never changes, and ids are never reused, so a descriptor stays right for as long as
 * it is kept (even once gc has deleted the file).  -1 with errno set if it does not open. */
static int pack_fd(struct fs_store *st, uint64_t pack)
{
    struct pack_fd *slot = &st->fds[pack % PACK_FDS];
    if (slot->fd >= 0 && slot->pack == pack)
        return slot->fd;
    char name[17];
    snprintf(name, sizeof(name), "%016llx", (unsigned long long)pack);
    int fd = openat(st->pack_dir, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    if (slot->fd >= 0)
        close(slot->fd);
    slot->fd = fd;
    slot->pack = pack;
    return fd;
}

/* `len` bytes at `off` of a pack file into `dst`; 0, or -1 with a reason in `why`. */
static int pack_pread(struct fs_store *st, uint64_t pack, uint32_t off, uint32_t len, char *dst, const char **why)
{
    int fd = pack_fd(st, pack);
    if (fd < 0) {
        *why = errno == ENOENT ? "is missing (pack file gone)" : "is missing (pack file does not open)";
        return -1;
    }
    size_t done = 0;
    while (done < len) {
        ssize_t got = pread(fd, dst + done, len - done, (off_t)off + (off_t)done);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            *why = "is missing (pack file does not read)";
            return -1;
        }
        if (got == 0) {
            *why = "is missing (pack file short)";
            return -1;
        }
        done += (size_t)got;
    }
    return 0;
}

/* Where a chunk's stored bytes are in the map (LMDB packs), valid until fs_store_end. */
static int chunk_in_map(struct fs_store *st, uint64_t ino, const unsigned char *content, const unsigned char *c,
                        const char **src)
{
    uint64_t pack = le64(c);
    uint32_t off = le32(c + 8), stored = le32(c + 12);
    unsigned char key[8];
    put_be64(key, pack);
    MDB_val k = {8, key}, v;
    st->touched += 16; /* a chunk spans several pages */
    int rc = mdb_get(st->txn, st->dbi_packs, &k, &v);
    if (rc || (uint64_t)off + stored > v.mv_size)
        return chunk_error(ino, content, pack, off, "is missing (pack gone or short)");
    *src = (const char *)v.mv_data + off;
    return 0;
}

/* Where a chunk stored raw (codec 0) is in the map, its length and checksum verified. */
static int raw_in_map(struct fs_store *st, uint64_t ino, const unsigned char *content, const unsigned char *c,
                      const char **src)
{
    uint32_t raw = le32(c + 16);
    int rc = chunk_in_map(st, ino, content, c, src);
    if (rc)
        return rc;
    if (le32(c + 12) != raw)
        return chunk_error(ino, content, le64(c), le32(c + 8), "has a wrong length");
    if (XXH3_64bits(*src, raw) != le64(c + 20))
        return chunk_error(ino, content, le64(c), le32(c + 8), "fails its checksum");
    return 0;
}

/* One chunk's bytes, verified, into dst (which has room for raw bytes). */
static int chunk_into(struct fs_store *st, uint64_t ino, const unsigned char *content, const unsigned char *c,
                      char *dst)
{
    uint64_t pack = le64(c);
    uint32_t off = le32(c + 8), stored = le32(c + 12), raw = le32(c + 16);
    uint64_t xxh = le64(c + 20);
    uint8_t codec = c[28];
    const char *src;
    if (st->pack_dir >= 0) { /* file packs: read straight from the pack file, never more than the chunk */
        const char *why;
        if (stored > MAX_CHUNK)
            return chunk_error(ino, content, pack, off, "has a wrong length");
        if (codec == 0) {
            if (stored != raw)
                return chunk_error(ino, content, pack, off, "has a wrong length");
            if (pack_pread(st, pack, off, stored, dst, &why))
                return chunk_error(ino, content, pack, off, why);
            if (XXH3_64bits(dst, raw) != xxh)
                return chunk_error(ino, content, pack, off, "fails its checksum");
            return 0;
        }
        if (st->src_cap < stored) {
            char *bigger = realloc(st->src, stored);
            if (!bigger)
                return -ENOMEM;
            st->src = bigger;
            st->src_cap = stored;
        }
        if (pack_pread(st, pack, off, stored, st->src, &why))
            return chunk_error(ino, content, pack, off, why);
        src = st->src;
    } else if (codec == 0) {
        int rc = raw_in_map(st, ino, content, c, &src);
        if (!rc)
            memcpy(dst, src, raw);
        return rc;
    } else {
        int rc = chunk_in_map(st, ino, content, c, &src);
        if (rc)
            return rc;
    }
    if (codec == 1) {
        size_t got = ZSTD_decompressDCtx(st->dctx, dst, raw, src, stored);
        if (ZSTD_isError(got) || got != raw)
            return chunk_error(ino, content, pack, off, "does not decompress");
    } else {
        return chunk_error(ino, content, pack, off, "has an unknown codec");
    }
    if (XXH3_64bits(dst, raw) != xxh)
        return chunk_error(ino, content, pack, off, "fails its checksum");
    return 0;
}

/* An iovec entry for n bytes at p: joined to the last one where they follow it. */
static void iov_add(struct iovec *iov, int *niov, const char *p, size_t n)
{
    if (*niov && (const char *)iov[*niov - 1].iov_base + iov[*niov - 1].iov_len == p) {
        iov[*niov - 1].iov_len += n;
        return;
    }
    iov[*niov].iov_base = (void *)p;
    iov[*niov].iov_len = n;
    (*niov)++;
}

long fs_store_read(struct fs_store *st, const struct fs_inode *inode, uint64_t ino, char *buf, size_t size,
                   uint64_t offset)
{
    return fs_store_readv(st, inode, ino, buf, size, offset, NULL, NULL);
}

long fs_store_readv(struct fs_store *st, const struct fs_inode *inode, uint64_t ino, char *buf, size_t size,
                    uint64_t offset, struct iovec *iov, int *niov)
{
    if (niov)
        *niov = 0;
    if (!inode->content || offset >= inode->size || size == 0)
        return 0;
    MDB_val k = {32, (void *)inode->content}, v;
    int rc = mdb_get(st->txn, st->dbi_objects, &k, &v);
    if (rc)
        return chunk_error(ino, inode->content, 0, 0, "record is missing");
    const unsigned char *rec = v.mv_data;
    if (v.mv_size < OBJ_HEAD || rec[0] != 1)
        return chunk_error(ino, inode->content, 0, 0, "record is malformed");
    uint64_t osize = le64(rec + 1);
    uint32_t count = le32(rec + 9);
    if (v.mv_size != OBJ_HEAD + (size_t)count * OBJ_CHUNK || count == 0)
        return chunk_error(ino, inode->content, 0, 0, "record is malformed");
    const unsigned char *chunks = rec + OBJ_HEAD;
    uint64_t csize = le32(chunks + 16); /* every chunk but the last has the first one's size */
    if (csize == 0 || csize > MAX_CHUNK)
        return chunk_error(ino, inode->content, 0, 0, "record is malformed");
    uint64_t end = offset + size;
    if (end > osize)
        end = osize;
    if (end > inode->size)
        end = inode->size;
    if (offset >= end)
        return 0;
    uint64_t first = offset / csize, last = (end - 1) / csize;
    if (last >= count)
        return chunk_error(ino, inode->content, 0, 0, "record is shorter than the file");
    if (iov && last - first + 1 > FS_STORE_IOV)
        iov = NULL, *niov = 0; /* (more chunks than entries: all of them into buf) */
    size_t done = 0;
    for (uint64_t i = first; i <= last; i++) {
        const unsigned char *c = chunks + i * OBJ_CHUNK;
        uint64_t base = i * csize;
        uint32_t raw = le32(c + 16);
        if (raw > csize || (i + 1 < count && raw != csize))
            return chunk_error(ino, inode->content, le64(c), le32(c + 8), "has a wrong length");
        uint64_t from = offset > base ? offset - base : 0;
        uint64_t to = end - base < raw ? end - base : raw;
        if (from >= to)
            break;
        if (from == 0 && to == raw && iov && st->pack_dir < 0 && c[28] == 0) {
            /* a whole chunk stored raw: the reply takes it from the map, no copy here */
            const char *src;
            if ((rc = raw_in_map(st, ino, inode->content, c, &src)))
                return rc;
            iov_add(iov, niov, src, raw);
            done += raw;
            continue;
        }
        if (from == 0 && to == raw) { /* the whole chunk: straight into the reply */
            if ((rc = chunk_into(st, ino, inode->content, c, buf + done)))
                return rc;
        } else { /* part of one: through the cache, the rest is likely read next */
            uint64_t pack = le64(c);
            uint32_t coff = le32(c + 8);
            struct cache_slot *slot = &st->cache[(pack * 31 + coff / 64) % CACHE_SLOTS];
            if (!slot->used || slot->pack != pack || slot->offset != coff || slot->len != raw) {
                slot->used = 0;
                if (slot->cap < raw) {
                    char *bigger = realloc(slot->data, raw);
                    if (!bigger)
                        return -ENOMEM;
                    slot->data = bigger;
                    slot->cap = raw;
                }
                if ((rc = chunk_into(st, ino, inode->content, c, slot->data)))
                    return rc;
                slot->pack = pack;
                slot->offset = coff;
                slot->len = raw;
                slot->used = 1;
            }
            memcpy(buf + done, slot->data + from, to - from);
        }
        if (iov)
            iov_add(iov, niov, buf + done, to - from);
        done += to - from;
    }
    return (long)done;
}

int fs_store_path(struct fs_store *st, uint64_t ino, char *out, size_t cap)
{
    /* built from the end of `out` backwards, a component per pass over the chain's names */
    if (cap < 2)
        return -ERANGE;
    size_t at = cap - 1;
    out[at] = 0;
    MDB_cursor *cur;
    if (mdb_cursor_open(st->txn, st->dbi_union, &cur))
        return -EIO;
    int rc = 0;
    for (int depth = 0; ino != 1; depth++) {
        unsigned char start[PREFIX_LEN + 1];
        memcpy(start, st->prefix, PREFIX_LEN);
        start[PREFIX_LEN] = 'D';
        MDB_val k = {sizeof(start), start}, v;
        int found = 0;
        for (int r = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); r == 0; r = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
            if (k.mv_size <= sizeof(start) + 8 || memcmp(k.mv_data, start, sizeof(start)) != 0)
                break;
            if (v.mv_size < 8 || le64(v.mv_data) != ino)
                continue;
            const unsigned char *key = k.mv_data;
            size_t len = k.mv_size - sizeof(start) - 8;
            if (len + 1 > at) {
                rc = -ERANGE;
                break;
            }
            at -= len;
            memcpy(out + at, key + sizeof(start) + 8, len);
            out[--at] = '/';
            uint64_t parent = 0;
            for (int i = 0; i < 8; i++)
                parent = parent << 8 | key[sizeof(start) + i];
            ino = parent;
            found = 1;
            break;
        }
        if (rc || !found || depth > 100000) {
            rc = rc ? rc : -ENOENT;
            break;
        }
    }
    mdb_cursor_close(cur);
    if (rc)
        return rc;
    if (at == cap - 1)
        out[--at] = '/';
    memmove(out, out + at, cap - at);
    return 0;
}
