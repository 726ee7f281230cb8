/* Power-cut shim (LD_PRELOAD): records, before each write to a file under $EDGEOS_SHIM_DIR, the
 * bytes it overwrites and the file's size (an undo record), and after each successful
 * fsync/fdatasync a sync record for that file. After a kill -9, tests/faults/powercut.py undoes,
 * newest first, every write not followed by a sync of its file: the files then hold what a
 * power cut would have left if the page cache had written back nothing on its own (the worst
 * case; a prefix of the unsynced writes can be kept too). Directory operations (rename, unlink)
 * are taken as durable: only file data is dropped (documented in docs/reliability.md).
 *
 * Log record: u32 kind (1 undo, 2 sync), u32 path length, i64 offset, i64 old size,
 * i64 old-bytes length, path, old bytes. Written with raw syscalls under a mutex.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int logfd = -1;
static char prefix[4096];
static size_t plen = 0;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);

static void init(void) {
    real_write = dlsym(RTLD_NEXT, "write");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_writev = dlsym(RTLD_NEXT, "writev");
    real_pwritev = dlsym(RTLD_NEXT, "pwritev");
    real_ftruncate = dlsym(RTLD_NEXT, "ftruncate");
    real_ftruncate64 = dlsym(RTLD_NEXT, "ftruncate64");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    const char *dir = getenv("EDGEOS_SHIM_DIR");
    const char *log = getenv("EDGEOS_SHIM_LOG");
    if (dir && log) {
        strncpy(prefix, dir, sizeof(prefix) - 1);
        plen = strlen(prefix);
        logfd = (int)syscall(SYS_openat, AT_FDCWD, log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    }
}

static int tracked(int fd, char *path) {
    pthread_once(&once, init);
    if (logfd < 0 || plen == 0)
        return 0;
    char link[64];
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, 4095);
    if (n <= 0)
        return 0;
    path[n] = 0;
    return strncmp(path, prefix, plen) == 0 && strstr(path, "-shm") == NULL;
}

static void put(const void *b, size_t n) {
    const char *p = b;
    while (n) {
        ssize_t w = syscall(SYS_write, logfd, p, n);
        if (w <= 0)
            return;
        p += w;
        n -= (size_t)w;
    }
}

static void record(uint32_t kind, const char *path, int64_t off, int64_t len) {
    int64_t oldsize = 0, oldlen = 0;
    char *old = NULL;
    if (kind == 1) {
        int rfd = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
        if (rfd >= 0) {
            struct stat st;
            if (fstat(rfd, &st) == 0)
                oldsize = st.st_size;
            if (off < oldsize) {
                oldlen = oldsize - off < len ? oldsize - off : len;
                old = malloc((size_t)oldlen);
                int64_t got = 0;
                while (old && got < oldlen) {
                    ssize_t r = syscall(SYS_pread64, rfd, old + got, (size_t)(oldlen - got), off + got);
                    if (r <= 0)
                        break;
                    got += r;
                }
                oldlen = got;
            }
            syscall(SYS_close, rfd);
        }
    }
    uint32_t pl = (uint32_t)strlen(path);
    pthread_mutex_lock(&mu);
    put(&kind, 4);
    put(&pl, 4);
    put(&off, 8);
    put(&oldsize, 8);
    put(&oldlen, 8);
    put(path, pl);
    if (oldlen)
        put(old, (size_t)oldlen);
    pthread_mutex_unlock(&mu);
    free(old);
}

static off_t where(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0 && (fl & O_APPEND)) {
        struct stat st;
        return fstat(fd, &st) == 0 ? st.st_size : 0;
    }
    return lseek(fd, 0, SEEK_CUR);
}

ssize_t write(int fd, const void *buf, size_t n) {
    char path[4096];
    if (tracked(fd, path))
        record(1, path, where(fd), (int64_t)n);
    return real_write(fd, buf, n);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    char path[4096];
    if (tracked(fd, path))
        record(1, path, off, (int64_t)n);
    return real_pwrite(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    char path[4096];
    if (tracked(fd, path))
        record(1, path, off, (int64_t)n);
    return real_pwrite64(fd, buf, n, off);
}

static int64_t iolen(const struct iovec *iov, int cnt) {
    int64_t t = 0;
    for (int i = 0; i < cnt; i++)
        t += (int64_t)iov[i].iov_len;
    return t;
}

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    char path[4096];
    if (tracked(fd, path))
        record(1, path, where(fd), iolen(iov, cnt));
    return real_writev(fd, iov, cnt);
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    char path[4096];
    if (tracked(fd, path))
        record(1, path, off, iolen(iov, cnt));
    return real_pwritev(fd, iov, cnt, off);
}

static void truncating(int fd, off_t len) {
    char path[4096];
    if (tracked(fd, path)) {
        struct stat st;
        int64_t cur = fstat(fd, &st) == 0 ? st.st_size : 0;
        /* the bytes cut off (or none, when it grows): undo re-writes them, then sets the size */
        record(1, path, len < cur ? len : cur, len < cur ? cur - len : 0);
    }
}

int ftruncate(int fd, off_t len) {
    truncating(fd, len);
    return real_ftruncate(fd, len);
}

int ftruncate64(int fd, off_t len) {
    truncating(fd, len);
    return real_ftruncate64(fd, len);
}

static int synced(int fd, int rc) {
    char path[4096];
    if (rc == 0 && tracked(fd, path))
        record(2, path, 0, 0);
    return rc;
}

int fsync(int fd) {
    pthread_once(&once, init);
    return synced(fd, real_fsync(fd));
}

int fdatasync(int fd) {
    pthread_once(&once, init);
    return synced(fd, real_fdatasync(fd));
}
