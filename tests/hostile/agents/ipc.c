/* Pairs of agents for the between-compartments cases: one leaves something, the other looks
 * for it.  Both run at once in two compartments; case_arg(1) names the shared thing,
 * case_arg(2) is a token, case_arg(3) the seconds to hold on. */
#include "agent.h"
#include <dirent.h>
#include <poll.h>
#include <sys/file.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/shm.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>

static const char *name(void) { return case_arg(1); }
static const char *token(void) { return case_arg(2); }
static int hold_s(void) { return atoi(case_arg(3)); }

static int shm_put(void) {
    char path[256];
    snprintf(path, sizeof path, "/dev/shm/%s", name());
    int fd = open(path, O_WRONLY | O_CREAT, 0666);
    if (fd < 0) { refused(path); sleep(hold_s()); return EX_TEMPFAIL; }
    if (write(fd, token(), strlen(token())) < 0) return refused("write");
    sleep(hold_s());
    return 0;
}

static int shm_get(void) {
    DIR *dir = opendir("/dev/shm");
    if (!dir) return refused("/dev/shm");
    for (struct dirent *entry; (entry = readdir(dir));) {
        char path[512], buf[256] = {0};
        snprintf(path, sizeof path, "/dev/shm/%s", entry->d_name);
        int fd = open(path, O_RDONLY);
        if (fd >= 0 && read(fd, buf, sizeof buf - 1) > 0) printf("found %s: %s\n", path, buf);
    }
    return 0;
}

static key_t ipc_key(void) { return (key_t)strtol(name(), NULL, 0); }

struct message { long type; char text[128]; };

static int sysv_put(void) {
    int shm = shmget(ipc_key(), 4096, IPC_CREAT | 0666);
    if (shm >= 0) {
        char *at = shmat(shm, NULL, 0);
        if (at != (char *)-1) strcpy(at, token());
    } else refused("shmget");
    int queue = msgget(ipc_key(), IPC_CREAT | 0666);
    if (queue >= 0) {
        struct message msg = {.type = 1};
        snprintf(msg.text, sizeof msg.text, "%s", token());
        msgsnd(queue, &msg, sizeof msg.text, IPC_NOWAIT);
    } else refused("msgget");
    sleep(hold_s());
    return 0;
}

static int sysv_get(void) {
    int shm = shmget(ipc_key(), 0, 0);
    if (shm >= 0) {
        char *at = shmat(shm, NULL, SHM_RDONLY);
        if (at != (char *)-1) printf("found shm %.100s\n", at);
    }
    int queue = msgget(ipc_key(), 0);
    struct message msg;
    if (queue >= 0 && msgrcv(queue, &msg, sizeof msg.text, 0, IPC_NOWAIT) > 0)
        printf("found msg %.100s\n", msg.text);
    return 0;
}

static socklen_t abstract_address(struct sockaddr_un *un) {
    memset(un, 0, sizeof *un);
    un->sun_family = AF_UNIX;
    snprintf(un->sun_path + 1, sizeof un->sun_path - 1, "%s", name());
    return offsetof(struct sockaddr_un, sun_path) + 1 + strlen(name());
}

static int abstract_listen(void) {
    struct sockaddr_un un;
    socklen_t len = abstract_address(&un);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&un, len) != 0 || listen(fd, 4) != 0)
        return refused("abstract listen");
    struct pollfd ready = {.fd = fd, .events = POLLIN};
    if (poll(&ready, 1, hold_s() * 1000) == 1) {
        int peer = accept(fd, NULL, NULL);
        if (peer >= 0 && write(peer, token(), strlen(token())) > 0) printf("ACCEPTED a peer\n");
    }
    return 0;
}

static int abstract_connect(void) {
    struct sockaddr_un un;
    socklen_t len = abstract_address(&un);
    for (int attempt = 0; attempt < 20; attempt++) {
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&un, len) == 0) {
            char buf[128] = {0};
            if (read(fd, buf, sizeof buf - 1) > 0) printf("found %s\n", buf);
            return 0;
        }
        close(fd);
        usleep(100000);
    }
    return refused("abstract connect");
}

static int flock_hold(void) {
    int fd = open(name(), O_RDONLY);
    if (fd < 0) return refused(name());
    if (flock(fd, LOCK_EX) != 0) return refused("flock");
    printf("LOCKED %s\n", name());
    sleep(hold_s());
    return 0;
}

static int flock_probe(void) {
    int fd = open(name(), O_RDONLY);
    if (fd < 0) return refused(name());
    for (int i = 0; i < hold_s() * 10; i++) {
        if (flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK) {
            printf("BUSY %s %s\n", name(), token());   /* saw the other compartment's lock */
            return 0;
        }
        flock(fd, LOCK_UN);
        usleep(100000);
    }
    return 0;
}

static volatile sig_atomic_t signalled;
static void record(int sig) { signalled = sig; }

static int signal_target(void) {
    for (int sig = 1; sig < 32; sig++)
        if (sig != SIGKILL && sig != SIGSTOP && sig != SIGCHLD) signal(sig, record);
    for (int i = 0; i < hold_s() * 10 && !signalled; i++) usleep(100000);
    if (signalled) printf("SIGNALLED by another compartment: %d %s\n", signalled, token());
    return 0;
}

static int signal_everyone(void) {
    if (dangerous_as_root()) return EX_TEMPFAIL;
    usleep(300000);   /* let the other compartment start */
    kill(-1, SIGUSR1);
    for (pid_t pid = 2; pid < 100000; pid++)
        if (pid != getpid()) kill(pid, SIGUSR1);
    return 0;
}

static int key_put(void) {
    long key = syscall(SYS_add_key, "user", name(), token(), strlen(token()), -4);
    if (key < 0) refused("add_key");
    sleep(hold_s());
    return 0;
}

static int key_get(void) {
    long key = syscall(SYS_keyctl, 10 /* KEYCTL_SEARCH */, -4, "user", name(), 0);
    if (key < 0) return refused("keyctl search");
    char buf[128] = {0};
    if (syscall(SYS_keyctl, 11 /* KEYCTL_READ */, key, buf, sizeof buf - 1) > 0)
        printf("found key %s\n", buf);
    return 0;
}

/* Take every process the limit allows, hold them, then end (the children go with us). */
static int bomb_hold(void) {
    int made = 0;
    for (; made < 5000; made++) {
        pid_t pid = fork();
        if (pid < 0) break;
        if (pid == 0) {
            for (;;) pause();
        }
    }
    printf("holding %d processes\n", made);
    sleep(hold_s());
    /* End what it held, as a careful program does: the run is over only when its compartment
     * is empty, and held processes would keep it busy until the deadline (a timeout). */
    signal(SIGTERM, SIG_IGN);
    kill(0, SIGTERM);
    return 0;
}

/* An ordinary agent that needs a couple of processes, as a shell script would. */
static int ordinary(void) {
    for (int i = 0; i < 2; i++) {
        pid_t pid = fork();
        if (pid < 0) return refused("fork");
        if (pid == 0) _exit(0);
    }
    printf("STARTED and forked\n");
    return 0;
}

int main(int argc, char **argv) {
    setup(argc, argv);
    const char *mode = case_arg(0);
    if (!strcmp(mode, "shm-put")) return shm_put();
    if (!strcmp(mode, "shm-get")) return shm_get();
    if (!strcmp(mode, "sysv-put")) return sysv_put();
    if (!strcmp(mode, "sysv-get")) return sysv_get();
    if (!strcmp(mode, "abstract-listen")) return abstract_listen();
    if (!strcmp(mode, "abstract-connect")) return abstract_connect();
    if (!strcmp(mode, "flock-hold")) return flock_hold();
    if (!strcmp(mode, "flock-probe")) return flock_probe();
    if (!strcmp(mode, "signal-target")) return signal_target();
    if (!strcmp(mode, "signal-everyone")) return signal_everyone();
    if (!strcmp(mode, "bomb-hold")) return bomb_hold();
    if (!strcmp(mode, "ordinary")) return ordinary();
    if (!strcmp(mode, "key-put")) return key_put();
    if (!strcmp(mode, "key-get")) return key_get();
    fprintf(stderr, "ipc: unknown mode %s\n", mode);
    return 64;
}
