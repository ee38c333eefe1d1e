/* Canary run by the test OUTSIDE any compartment.  It records every signal that reaches it and
 * any tracer that attaches, as files in argv[1] named after argv[2]; argv[3] is the test's pid.  A canary that stays
 * silent, alive and unstopped is the evidence that no agent reached it. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

static const char *dir, *name;

static void mark(const char *what, int number) {
    char path[4096];
    snprintf(path, sizeof path, "%s/canary-%s-%s-%d", dir, name, what, number);
    int fd = open(path, O_WRONLY | O_CREAT, 0644);
    if (fd >= 0) close(fd);
}

static void on_signal(int sig) { mark("signal", sig); }

static int traced(void) {
    char buf[4096];
    int fd = open("/proc/self/status", O_RDONLY);
    ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
    if (fd >= 0) close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    const char *line = strstr(buf, "TracerPid:");
    return line && atoi(line + 10) != 0;
}

int main(int argc, char **argv) {
    if (argc < 4) return 64;
    dir = argv[1];
    name = argv[2];
    /* The test that started us may die (interrupted run): never outlive it. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != (pid_t)atoi(argv[3])) return 0;
    for (int sig = 1; sig < 65; sig++)
        if (sig != SIGKILL && sig != SIGSTOP) signal(sig, on_signal);
    for (;;) {
        if (traced()) mark("traced", 0);
        usleep(20000);
    }
}
