/* The file cache (see filecache.h). */
#define _GNU_SOURCE
#include "filecache.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define FC_QUEUE 64
#define FC_STEP (1u << 20)           /* read and written 1 MiB at a time */
#define FC_TOUCH_AFTER 600           /* seconds: a hit refreshes an older mtime (the LRU clock) */
#define FC_NAME 64                   /* hex of a 32-byte object id */

struct fc_job {
    unsigned char id[32];
    uint64_t ino, size;
};

struct fc {
    int dirfd;
    uint64_t bound, min_size;
    fc_read_fn read;
    void *arg;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct fc_job queue[FC_QUEUE];
    int queued;
    int busy; /* the thread is filling queue[0]'s predecessor (popped) */
    unsigned char busy_id[32];
    int stop;
    int started;
    int broken; /* the directory cannot take files (no O_TMPFILE, read-only): stop trying */
    pthread_t thread;
    uint64_t total; /* bytes in the directory as last counted, plus what we added since */
    int counted;
    char *buf;
};

static void hex_name(const unsigned char id[32], char out[FC_NAME + 1])
{
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        out[2 * i] = digits[id[i] >> 4];
        out[2 * i + 1] = digits[id[i] & 15];
    }
    out[FC_NAME] = 0;
}

static int is_entry_name(const char *name)
{
    if (strlen(name) != FC_NAME)
        return 0;
    for (int i = 0; i < FC_NAME; i++)
        if (!((name[i] >= '0' && name[i] <= '9') || (name[i] >= 'a' && name[i] <= 'f')))
            return 0;
    return 1;
}

struct entry {
    long long mtime;
    uint64_t size;
    char name[FC_NAME + 1];
};

static int by_age(const void *a, const void *b)
{
    long long x = ((const struct entry *)a)->mtime, y = ((const struct entry *)b)->mtime;
    return x < y ? -1 : x > y;
}

/* Count the directory (other mounts of the store add and evict too) and, above the bound,
 * remove the least recently used files down to 90 % of it.  An open copy stays readable. */
static void fc_count_and_evict(struct fc *c)
{
    int fd = openat(c->dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    if (!d) {
        if (fd >= 0)
            close(fd);
        return;
    }
    struct entry *all = NULL;
    size_t n = 0, cap = 0;
    uint64_t total = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        struct stat st;
        if (!is_entry_name(de->d_name) || fstatat(c->dirfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
            !S_ISREG(st.st_mode))
            continue;
        if (n == cap) {
            size_t ncap = cap ? 2 * cap : 256;
            struct entry *more = realloc(all, ncap * sizeof(*all));
            if (!more)
                break;
            all = more;
            cap = ncap;
        }
        all[n].mtime = (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
        all[n].size = (uint64_t)st.st_blocks * 512 > (uint64_t)st.st_size ? (uint64_t)st.st_blocks * 512
                                                                           : (uint64_t)st.st_size;
        memcpy(all[n].name, de->d_name, FC_NAME + 1);
        total += all[n].size;
        n++;
    }
    closedir(d);
    if (total > c->bound) {
        qsort(all, n, sizeof(*all), by_age);
        uint64_t goal = c->bound / 10 * 9;
        for (size_t i = 0; i < n && total > goal; i++)
            if (unlinkat(c->dirfd, all[i].name, 0) == 0 || errno == ENOENT)
                total -= all[i].size;
    }
    free(all);
    c->total = total;
    c->counted = 1;
}

/* Fill one file: stream it from the store into an unnamed file, link it in when whole. */
static void fc_fill(struct fc *c, const struct fc_job *job)
{
    char name[FC_NAME + 1];
    hex_name(job->id, name);
    if (faccessat(c->dirfd, name, F_OK, AT_SYMLINK_NOFOLLOW) == 0)
        return; /* another mount of the store filled it */
    int fd = openat(c->dirfd, ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
    if (fd < 0) {
        fprintf(stderr, "layerfs: file cache: cannot create files (%s): lower files stay read from the store\n",
                strerror(errno));
        __atomic_store_n(&c->broken, 1, __ATOMIC_RELAXED);
        return;
    }
    uint64_t off = 0;
    while (off < job->size) {
        pthread_mutex_lock(&c->mu);
        int stop = c->stop;
        pthread_mutex_unlock(&c->mu);
        if (stop)
            break;
        size_t want = job->size - off < FC_STEP ? (size_t)(job->size - off) : FC_STEP;
        long got = c->read(c->arg, job->ino, c->buf, want, off);
        if (got <= 0)
            break; /* the read logged why (a bad chunk), or the file went away */
        const char *p = c->buf;
        size_t left = (size_t)got;
        while (left) {
            ssize_t w = pwrite(fd, p, left, (off_t)off);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                goto out; /* a full disk: the cache is a luxury, drop this one quietly */
            }
            p += w;
            left -= (size_t)w;
            off += (uint64_t)w;
        }
    }
    if (off != job->size || fdatasync(fd) < 0)
        goto out;
    char proc[64];
    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
    if (linkat(AT_FDCWD, proc, c->dirfd, name, AT_SYMLINK_FOLLOW) == 0) {
        c->total += job->size;
        if (!c->counted || c->total > c->bound)
            fc_count_and_evict(c);
    }
out:
    close(fd);
}

static void *fc_main(void *arg)
{
    struct fc *c = arg;
    /* below the request path: a fill is for later opens, the reads waiting now come first */
    setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 10);
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->stop && c->queued == 0)
            pthread_cond_wait(&c->cv, &c->mu);
        if (c->stop)
            break;
        struct fc_job job = c->queue[0];
        memmove(c->queue, c->queue + 1, (size_t)(c->queued - 1) * sizeof(*c->queue));
        c->queued--;
        c->busy = 1;
        memcpy(c->busy_id, job.id, 32);
        pthread_mutex_unlock(&c->mu);
        if (!c->broken)
            fc_fill(c, &job);
        pthread_mutex_lock(&c->mu);
        c->busy = 0;
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

struct fc *fc_open(const char *dir, uint64_t bound, uint64_t min_size, fc_read_fn read, void *arg, char *err,
                   size_t errlen)
{
    if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
        snprintf(err, errlen, "file cache %s: %s", dir, strerror(errno));
        return NULL;
    }
    int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0) {
        snprintf(err, errlen, "file cache %s: %s", dir, strerror(errno));
        return NULL;
    }
    struct fc *c = calloc(1, sizeof(*c));
    if (!c || !(c->buf = malloc(FC_STEP))) {
        free(c);
        close(dirfd);
        snprintf(err, errlen, "file cache: out of memory");
        return NULL;
    }
    c->dirfd = dirfd;
    c->bound = bound;
    c->min_size = min_size;
    c->read = read;
    c->arg = arg;
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    return c;
}

void fc_close(struct fc *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&c->mu);
    c->stop = 1;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    if (c->started)
        pthread_join(c->thread, NULL);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
    close(c->dirfd);
    free(c->buf);
    free(c);
}

int fc_lookup(struct fc *c, const unsigned char id[32], uint64_t size)
{
    if (!c || size < c->min_size)
        return -1;
    char name[FC_NAME + 1];
    hex_name(id, name);
    int fd = openat(c->dirfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return -1;
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size != size) {
        close(fd);
        return -1;
    }
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    if (now.tv_sec - st.st_mtim.tv_sec > FC_TOUCH_AFTER) {
        struct timespec times[2] = {{.tv_nsec = UTIME_OMIT}, {.tv_nsec = UTIME_NOW}};
        futimens(fd, times); /* the LRU clock; failing only makes it an earlier candidate */
    }
    return fd;
}

void fc_want(struct fc *c, const unsigned char id[32], uint64_t ino, uint64_t size)
{
    if (!c || __atomic_load_n(&c->broken, __ATOMIC_RELAXED) || size < c->min_size || size > c->bound / 2)
        return;
    pthread_mutex_lock(&c->mu);
    int skip = c->queued >= FC_QUEUE || (c->busy && memcmp(c->busy_id, id, 32) == 0);
    for (int i = 0; !skip && i < c->queued; i++)
        skip = memcmp(c->queue[i].id, id, 32) == 0;
    if (!skip && !c->started) {
        if (pthread_create(&c->thread, NULL, fc_main, c) == 0)
            c->started = 1;
        else
            skip = 1;
    }
    if (!skip) {
        memcpy(c->queue[c->queued].id, id, 32);
        c->queue[c->queued].ino = ino;
        c->queue[c->queued].size = size;
        c->queued++;
        pthread_cond_signal(&c->cv);
    }
    pthread_mutex_unlock(&c->mu);
}
