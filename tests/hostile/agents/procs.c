/* Process agents: bombs, signals and ptrace against canaries, daemons that try to outlive the
 * compartment, and the exit games a broken agent plays. */
#include "agent.h"
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/wait.h>

#define BOMB_LIMIT 20000   /* bounded even if every limit failed */

static void sleep_forever(void) {
    for (;;) pause();
}

static int fork_bomb(void) {
    int made = 0;
    for (; made < BOMB_LIMIT; made++) {
        pid_t pid = fork();
        if (pid < 0) break;
        if (pid == 0) {
            prctl(PR_SET_NAME, "hstl-bomb");
            sleep_forever();
        }
    }
    printf("forked %d before: %s\n", made, strerror(errno));
    sleep_forever();
    return EX_TEMPFAIL;
}

static void *idle(void *unused) {
    (void)unused;
    sleep_forever();
    return NULL;
}

static int thread_bomb(void) {
    int made = 0;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 65536);
    for (pthread_t thread; made < BOMB_LIMIT; made++)
        if (pthread_create(&thread, &attr, idle, NULL) != 0) break;
    printf("threads %d\n", made);
    sleep_forever();
    return EX_TEMPFAIL;
}

/* Every signal, including SIGSTOP and SIGKILL last: the canary records what reaches it. */
static int kill_canary(pid_t pid) {
    int delivered = 0;
    for (int sig = 1; sig < 32; sig++)
        if (sig != SIGKILL && sig != SIGSTOP && kill(pid, sig) == 0) delivered++;
    if (kill(pid, SIGSTOP) == 0) delivered++;
    if (kill(pid, SIGKILL) == 0) delivered++;
    if (!delivered) return refused("kill canary");
    beacon("kill");
    return BREACHED;
}

static int ptrace_canary(pid_t pid) {
    if (ptrace(PTRACE_SEIZE, pid, 0, 0) != 0 && ptrace(PTRACE_ATTACH, pid, 0, 0) != 0)
        return refused("ptrace canary");
    beacon("ptrace");
    return BREACHED;
}

static int kill_everyone(void) {
    if (dangerous_as_root()) return EX_TEMPFAIL;
    if (kill(-1, SIGUSR1) != 0) return refused("kill(-1)");
    printf("kill(-1) delivered\n");   /* fine inside our own pid namespace; canaries tell */
    return EX_TEMPFAIL;
}

static int kill_scan(void) {
    if (dangerous_as_root()) return EX_TEMPFAIL;
    int reached = 0;
    for (pid_t pid = 2; pid < 100000; pid++)
        if (pid != getpid() && kill(pid, SIGUSR1) == 0) reached++;
    printf("signalled %d pids\n", reached);
    return EX_TEMPFAIL;
}

static int signal_supervisor(void) {
    int hit = 0;
    if (supervisor_pid() > 1) {
        hit += kill(supervisor_pid(), SIGUSR2) == 0;
        hit += kill(-supervisor_pid(), SIGUSR2) == 0;
    }
    hit += getppid() > 0 && kill(getppid(), SIGUSR2) == 0;
    if (!hit) return refused("signal supervisor");
    printf("signalled supervisor or parent\n");
    return EX_TEMPFAIL;
}

/* The classic daemon: fork, setsid, fork again, and let the parent report success. */
static int double_fork(void) {
    pid_t child = fork();
    if (child < 0) return refused("fork");
    if (child == 0) {
        setsid();
        if (fork() == 0) {
            prctl(PR_SET_NAME, "hstl-daemon");
            prctl(PR_SET_PDEATHSIG, 0);
            sleep(60);
            beacon("daemon");
            _exit(0);
        }
        _exit(0);
    }
    waitpid(child, NULL, 0);
    return 0;
}

static int setsid_games(void) {
    setsid();
    pid_t child = fork();
    if (child < 0) return refused("fork");
    if (child == 0) {
        setpgid(0, 0);
        prctl(PR_SET_NAME, "hstl-setsid");
        signal(SIGHUP, SIG_IGN);
        signal(SIGTERM, SIG_IGN);
        sleep(60);
        beacon("setsid");
        _exit(0);
    }
    return 0;
}

/* Signal the compartment's init with everything, then finish the delivery as usual. */
static int signal_init(void) {
    int delivered = 0;
    for (int sig = 1; sig < 65; sig++)
        if (sig != SIGSTOP && kill(1, sig) == 0) delivered++;
    char buf[4096];
    while (read(0, buf, sizeof buf) > 0) {}
    usleep(200000);
    printf("finished after %d signals to init\n", delivered);
    return 0;
}

/* Which descriptors beyond 0, 1 and 2 does the agent hold? */
static int inventory(void) {
    int extra = 0;
    for (int fd = 3; fd < 1024; fd++) {
        if (fcntl(fd, F_GETFD) < 0) continue;
        struct stat info;
        fstat(fd, &info);
        printf("EXTRA-FD %d mode %o\n", fd, info.st_mode);
        extra++;
    }
    return extra ? BREACHED : EX_TEMPFAIL;
}

/* An error line in the form Postfix reads as a bounce, then a hang until the deadline. */
static int bounce_line_then_hang(void) {
    printf("5.1.1 <rcpt@example.org>: recipient address rejected (said the filter)\n");
    sleep_forever();
    return 0;
}

int main(int argc, char **argv) {
    setup(argc, argv);
    const char *mode = case_arg(0);
    if (!strcmp(mode, "fork-bomb")) return fork_bomb();
    if (!strcmp(mode, "thread-bomb")) return thread_bomb();
    if (!strcmp(mode, "kill-same")) return kill_canary(canary_same_uid());
    if (!strcmp(mode, "kill-root")) return kill_canary(canary_root());
    if (!strcmp(mode, "ptrace-same")) return ptrace_canary(canary_same_uid());
    if (!strcmp(mode, "ptrace-root")) return ptrace_canary(canary_root());
    if (!strcmp(mode, "kill-all")) return kill_everyone();
    if (!strcmp(mode, "kill-scan")) return kill_scan();
    if (!strcmp(mode, "signal-supervisor")) return signal_supervisor();
    if (!strcmp(mode, "double-fork")) return double_fork();
    if (!strcmp(mode, "setsid")) return setsid_games();
    if (!strcmp(mode, "exit")) return atoi(case_arg(1));
    if (!strcmp(mode, "signal-init")) return signal_init();
    if (!strcmp(mode, "fd-inventory")) return inventory();
    if (!strcmp(mode, "bounce-line")) return bounce_line_then_hang();
    if (!strcmp(mode, "segv")) return *(volatile int *)0;
    if (!strcmp(mode, "kill-self")) { kill(getpid(), SIGKILL); raise(SIGKILL); return 0; }
    if (!strcmp(mode, "raise-term")) { raise(SIGTERM); return 0; }   /* 0 is never reached */
    if (!strcmp(mode, "abort")) abort();
    if (!strcmp(mode, "close-stdin")) { close(0); return 0; }
    if (!strcmp(mode, "read-then-exit")) {
        char buf[4096];
        while (read(0, buf, sizeof buf) > 0) {}
        return atoi(case_arg(1));
    }
    fprintf(stderr, "procs: unknown mode %s\n", mode);
    return 64;
}
