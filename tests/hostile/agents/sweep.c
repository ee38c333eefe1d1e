/* One agent that tries every way out in a single run, for `compartment learn`: under learning
 * each refused call is recorded and the program goes on, so one run meets them all.  Each try
 * that works calls beacon() (the test looks for its traces outside); each that fails says so on
 * stdout ("refused WHAT: ERRNO") and the sweep goes on to the next.  Exits 0 when every try
 * was refused, BREACHED when one worked.  case_arg(0): a host file to try reading. */
#include "agent.h"
#include <linux/bpf.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>

static int breached;

static void attempt(int worked, const char *what) {
    if (worked) {
        breached = 1;
        beacon(what);
    } else {
        refused(what);
    }
}

static void read_secret(const char *name) {
    char path[4096], buf[256] = {0};
    snprintf(path, sizeof path, "%s/%s", evidence_dir(), name);
    int fd = open(path, O_RDONLY);
    ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
    if (n > 0) printf("read %s: %s\n", path, buf);  /* the test looks for the secret */
    attempt(n > 0, name);
}

static void read_host_file(const char *path) {
    char buf[256] = {0};
    int fd = *path ? open(path, O_RDONLY) : -1;
    ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
    attempt(n > 0, path);
}

static void write_outside(void) {
    char path[4096];
    snprintf(path, sizeof path, "%s/escaped-sweep", evidence_dir());
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0666);
    attempt(fd >= 0 && write(fd, "sweep\n", 6) == 6, "write-evidence");
}

static void connect_out(void) {
    struct sockaddr_in in4 = {.sin_family = AF_INET, .sin_port = htons(tcp_port())};
    in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    attempt(fd >= 0 && connect(fd, (struct sockaddr *)&in4, sizeof in4) == 0, "tcp-connect");
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    snprintf(un.sun_path, sizeof un.sun_path, "%s", unix_path());
    int unix_fd = socket(AF_UNIX, SOCK_STREAM, 0);
    attempt(unix_fd >= 0 && connect(unix_fd, (struct sockaddr *)&un, sizeof un) == 0,
            "unix-connect");
}

static void new_user_namespace(void) {
    pid_t pid = (pid_t)syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
    if (pid == 0) _exit(BREACHED);
    if (pid > 0) waitpid(pid, NULL, 0);
    attempt(pid > 0, "clone-newuser");
}

static void setuid_file(void) {
    int fd = open("/tmp/sweep-suid", O_WRONLY | O_CREAT | O_TRUNC, 0755);
    if (fd >= 0) close(fd);
    attempt(chmod("/tmp/sweep-suid", 04755) == 0, "chmod-setuid");
}

int main(int argc, char **argv) {
    setup(argc, argv);
    if (dangerous_as_root()) return EX_TEMPFAIL;
    attempt(mount("none", "/tmp", "tmpfs", 0, NULL) == 0, "mount");
    attempt(unshare(CLONE_NEWUSER) == 0, "unshare");
    attempt(syscall(SYS_add_key, "user", "sweep", "payload", 7, -4) >= 0, "add_key");
    attempt(ptrace(PTRACE_ATTACH, canary_same_uid(), 0, 0) == 0, "ptrace");
    union bpf_attr map = {.map_type = BPF_MAP_TYPE_ARRAY, .key_size = 4, .value_size = 4,
                          .max_entries = 1};
    attempt(syscall(SYS_bpf, BPF_MAP_CREATE, &map, sizeof map) >= 0, "bpf");
    new_user_namespace();
    connect_out();
    read_secret("secret-root");
    read_secret("world");
    read_host_file(case_arg(0));  /* a host file named by the test */
    write_outside();
    attempt(kill(canary_same_uid(), SIGUSR1) == 0, "kill-canary");
    attempt(kill(canary_root(), SIGUSR1) == 0, "kill-root-canary");
    setuid_file();
    drop_marker("/proc/1/root", "sweep-proc-root");
    return breached ? BREACHED : 0;
}
