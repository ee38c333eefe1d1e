/* Resource agents: each exhausts one resource and then behaves as a careless program would. */
#include "agent.h"
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>

static void sleep_forever(void) {
    for (;;) pause();
}

/* Touch memory until the kernel refuses, then use the failed result like careless C does. */
static int memory_bomb(void) {
    size_t total = 0;
    for (;;) {
        char *chunk = mmap(NULL, 16 << 20, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (chunk == MAP_FAILED) break;
        memset(chunk, 1, 16 << 20);
        total += 16 << 20;
        if (total > ((size_t)64 << 30)) break;   /* bounded even with no limit */
    }
    printf("touched %zu bytes\n", total);
    *(volatile char *)0 = 0;
    return EX_TEMPFAIL;
}

#pragma GCC diagnostic ignored "-Winfinite-recursion"
static int recurse(int depth) {
    volatile char frame[4096];
    frame[0] = (char)depth;
    return recurse(depth + 1) + frame[0];
}

static int fill(const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return refused(path);
    static char block[1 << 20];
    memset(block, 'x', sizeof block);
    long long total = 0;
    for (int i = 0; i < 100000; i++) {   /* 100 GB at most */
        ssize_t n = write(fd, block, sizeof block);
        if (n <= 0) break;
        total += n;
    }
    printf("wrote %lld bytes to %s: %s\n", total, path, strerror(errno));
    return EX_TEMPFAIL;
}

static int sparse(const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return refused(path);
    if (ftruncate(fd, 1LL << 40) != 0 && pwrite(fd, "x", 1, 1LL << 40) != 1)
        return refused("1 TiB sparse file");
    printf("made a 1 TiB file\n");
    return EX_TEMPFAIL;
}

/* Disk that RLIMIT_FSIZE does not see: blocks reserved beyond the size (FALLOC_FL_KEEP_SIZE),
 * in a file of the writable directory or in the message's private copy ("-": stdin). */
static int reserve(const char *path) {
    int fd = strcmp(path, "-") ? open(path, O_RDWR | O_CREAT, 0644) : 0;
    if (fd < 0) return refused(path);
    if (fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 256LL << 20) != 0) return refused("fallocate");
    struct stat info;
    fstat(fd, &info);
    printf("RESERVED %lld bytes in a file of size %lld\n", (long long)info.st_blocks * 512,
           (long long)info.st_size);   /* the test reads this for the message's copy */
    return EX_TEMPFAIL;
}

/* Memory that RLIMIT_AS does not see: pages written into memfds are never mapped.  Each
 * memfd stays under limits.file_bytes (per_file_mb), so only the total is hostile. */
static int memfd_bomb(long cap_mb, long per_file_mb) {
    static char block[1 << 20];
    memset(block, 'm', sizeof block);
    long total = 0;
    for (int files = 0; files < 200 && total < cap_mb; files++) {
        int fd = (int)syscall(SYS_memfd_create, "hostile", 0);
        if (fd < 0) break;
        for (long here = 0; here < per_file_mb && total < cap_mb; here++, total++)
            if (write(fd, block, sizeof block) != (ssize_t)sizeof block) break;
    }
    printf("memfd held %ld MiB\n", total);
    sleep_forever();
    return EX_TEMPFAIL;
}

/* Many files, each under limits.file_bytes: nothing but the disk bounds the total. */
static int fill_many(const char *dir, long cap_mb, long per_file_mb) {
    static char block[1 << 20];
    memset(block, 'f', sizeof block);
    long total = 0;
    for (int i = 0; total < cap_mb; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/fill-%d", dir, i);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) break;
        long before = total;
        for (long here = 0; here < per_file_mb && total < cap_mb; here++, total++)
            if (write(fd, block, sizeof block) != (ssize_t)sizeof block) break;
        close(fd);
        if (total == before) break;
    }
    printf("wrote %ld MiB in files\n", total);
    return EX_TEMPFAIL;
}

/* Kernel memory: stream socket pairs filled until the kernel refuses, in `procs` processes
 * (each with its own descriptors), cap_mb in all.  Raising SO_SNDBUF is tried first. */
static long fill_sockets(long cap_bytes) {
    long held = 0;
    static char block[65536];
    memset(block, 's', sizeof block);
    for (;;) {
        int pair[2];
        if (held >= cap_bytes || socketpair(AF_UNIX, SOCK_STREAM, 0, pair) != 0) break;
        int size = 8 << 20;
        setsockopt(pair[0], SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
        fcntl(pair[0], F_SETFL, O_NONBLOCK);
        ssize_t n;
        while (held < cap_bytes && (n = write(pair[0], block, sizeof block)) > 0) held += n;
    }
    return held;
}

static int socket_bomb(long cap_mb, int procs) {
    long each = (cap_mb << 20) / procs;
    for (int i = 1; i < procs; i++)
        if (fork() == 0) {
            fill_sockets(each);
            sleep_forever();
        }
    printf("socket buffers: this process holds %ld MiB\n", fill_sockets(each) >> 20);
    sleep_forever();
    return EX_TEMPFAIL;
}

/* CPU spent by fresh processes one after another, each under a second of it. */
static int spin_serial(int children, long ms_each) {
    for (int i = 0; i < children; i++) {
        pid_t pid = fork();
        if (pid < 0) return refused("fork");
        if (pid == 0) {
            struct timespec start, now;
            clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &start);
            do clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &now);
            while ((now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000
                   < ms_each);
            _exit(0);
        }
        waitpid(pid, NULL, 0);
    }
    printf("spent %ld ms of CPU in %d processes\n", children * ms_each, children);
    return 0;
}

static int descriptors(void) {
    int count = 0;
    while (count < 1 << 20 && dup(0) >= 0) count++;
    printf("FDS %d more descriptors: %s\n", count, strerror(errno));
    return EX_TEMPFAIL;
}

static int flood(int fd) {
    static char block[65536];
    memset(block, 'A', sizeof block);
    for (long i = 0; i < 1L << 20; i++)   /* 64 GiB at most */
        if (write(fd, block, sizeof block) < 0) break;
    return EX_TEMPFAIL;
}

int main(int argc, char **argv) {
    setup(argc, argv);
    const char *mode = case_arg(0);
    if (!strcmp(mode, "memory")) return memory_bomb();
    if (!strcmp(mode, "stack")) return recurse(0);
    if (!strcmp(mode, "spin")) for (volatile long i = 0;; i++) {}
    if (!strcmp(mode, "sleep")) sleep_forever();
    if (!strcmp(mode, "fill")) return fill(case_arg(1));
    if (!strcmp(mode, "sparse")) return sparse(case_arg(1));
    if (!strcmp(mode, "reserve")) return reserve(case_arg(1));
    if (!strcmp(mode, "fds")) return descriptors();
    if (!strcmp(mode, "memfd")) return memfd_bomb(atol(case_arg(1)), atol(case_arg(2)));
    if (!strcmp(mode, "fill-many"))
        return fill_many(case_arg(1), atol(case_arg(2)), atol(case_arg(3)));
    if (!strcmp(mode, "sockets")) return socket_bomb(atol(case_arg(1)), atoi(case_arg(2)));
    if (!strcmp(mode, "spin-serial")) return spin_serial(atoi(case_arg(1)), atol(case_arg(2)));
    if (!strcmp(mode, "stdout")) return flood(1);
    if (!strcmp(mode, "stderr")) return flood(2);
    fprintf(stderr, "resources: unknown mode %s\n", mode);
    return 64;
}
