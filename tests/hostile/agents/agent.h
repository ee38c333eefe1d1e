/* Shared part of the hostile agents: argument layout and the escape beacon.
 *
 * Every agent gets the same leading arguments from the test (tests/hostile/hostile_evidence.py):
 *   argv[1] evidence directory (outside the compartment; nothing inside can reach it)
 *   argv[2] TCP port and argv[3] UDP port of loopback listeners the test opened
 *   argv[4] path of a unix socket the test listens on, argv[5] abstract socket name (no '@')
 *   argv[6] pid of a canary with the agent's uid, argv[7] pid of a root canary
 *   argv[8] pid of the supervisor, argv[9...] case arguments
 * An agent tries one thing.  If the thing works it calls beacon(), which tries every channel
 * that leads outside, and exits BREACHED; if the thing is refused it exits EX_TEMPFAIL, which
 * is what a real agent does when it cannot do its work.  The test never believes the exit
 * status alone: it looks for the beacon's traces outside.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

#define EX_TEMPFAIL 75
#define BREACHED 13

static int g_argc;
static char **g_argv;

static const char *arg(int i) { return i < g_argc ? g_argv[i] : ""; }
static const char *evidence_dir(void) { return arg(1); }
static int tcp_port(void) { return atoi(arg(2)); }
static int udp_port(void) { return atoi(arg(3)); }
static const char *unix_path(void) { return arg(4); }
static const char *abstract_name(void) { return arg(5); }
static pid_t canary_same_uid(void) { return (pid_t)atoi(arg(6)); }
static pid_t canary_root(void) { return (pid_t)atoi(arg(7)); }
static __attribute__((unused)) pid_t supervisor_pid(void) { return (pid_t)atoi(arg(8)); }
static const char *case_arg(int i) { return arg(9 + i); }

static __attribute__((unused)) void setup(int argc, char **argv) {
    g_argc = argc;
    g_argv = argv;
    setvbuf(stdout, NULL, _IONBF, 0);
}

/* Refused: say what refused it (for the person reading the log) and fail temporarily. */
static __attribute__((unused)) int refused(const char *what) {
    printf("refused %s: %s\n", what, strerror(errno));
    return EX_TEMPFAIL;
}

static __attribute__((unused)) void drop_marker(const char *prefix, const char *what) {
    char path[4096];
    snprintf(path, sizeof path, "%s%s/escaped-%s", prefix, evidence_dir(), what);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0666);
    if (fd >= 0) {
        ssize_t ignored = write(fd, what, strlen(what)); /* the file existing is the evidence */
        (void)ignored;
        close(fd);
    }
}

static __attribute__((unused)) void send_stream(int family, const struct sockaddr *addr,
                                               socklen_t len, const char *what) {
    int fd = socket(family, SOCK_STREAM, 0);
    if (fd < 0) return;
    if (connect(fd, addr, len) == 0) {
        ssize_t ignored = write(fd, what, strlen(what)); /* the listener logs the connection */
        (void)ignored;
    }
    close(fd);
}

/* Try every way out.  Each of these is impossible from a working compartment. */
static __attribute__((unused)) void beacon(const char *what) {
    printf("BREACH %s\n", what);
    drop_marker("", what);
    drop_marker("/proc/1/root", what);
    if (canary_same_uid() > 1) kill(canary_same_uid(), SIGUSR1);
    if (canary_root() > 1) kill(canary_root(), SIGUSR1);

    struct sockaddr_in in4 = {.sin_family = AF_INET, .sin_port = htons(tcp_port())};
    in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    send_stream(AF_INET, (struct sockaddr *)&in4, sizeof in4, what);
    in4.sin_port = htons(udp_port());
    int udp = socket(AF_INET, SOCK_DGRAM, 0);
    if (udp >= 0) {
        sendto(udp, what, strlen(what), 0, (struct sockaddr *)&in4, sizeof in4);
        close(udp);
    }
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    snprintf(un.sun_path, sizeof un.sun_path, "%s", unix_path());
    send_stream(AF_UNIX, (struct sockaddr *)&un, sizeof un, what);
    memset(un.sun_path, 0, sizeof un.sun_path);
    snprintf(un.sun_path + 1, sizeof un.sun_path - 1, "%s", abstract_name());
    send_stream(AF_UNIX, (struct sockaddr *)&un,
                offsetof(struct sockaddr_un, sun_path) + 1 + strlen(abstract_name()), what);
}

/* Refuse to do broad damage if the compartment gave us uid 0 outside any user namespace:
 * that would itself be a failure the test reports, and kill(-1) as real root must never run. */
static __attribute__((unused)) int dangerous_as_root(void) {
    if (getuid() == 0 || geteuid() == 0) {
        printf("UID0 agent runs as uid 0; not sending broad signals\n");
        return 1;
    }
    return 0;
}
