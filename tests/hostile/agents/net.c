/* Network agents: each mode opens one kind of socket and tries to reach the test's listeners
 * (or, for raw, packet, vsock and netlink, anything at all beyond the compartment). */
#include "agent.h"
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/vm_sockets.h>
#include <linux/if_ether.h>

static int connect_and_send(int fd, const struct sockaddr *addr, socklen_t len) {
    if (connect(fd, addr, len) != 0) return refused("connect");
    if (write(fd, "hostile", 7) != 7) return refused("write");
    beacon("connect");
    return BREACHED;
}

static int inet(int type, int port) {
    int fd = socket(AF_INET, type, 0);
    if (fd < 0) return refused("socket AF_INET");
    struct sockaddr_in in4 = {.sin_family = AF_INET, .sin_port = htons(port)};
    in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return connect_and_send(fd, (struct sockaddr *)&in4, sizeof in4);
}

static int inet6(int port) {
    int fd = socket(AF_INET6, SOCK_STREAM, 0);
    if (fd < 0) return refused("socket AF_INET6");
    struct sockaddr_in6 in6 = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
    in6.sin6_addr = in6addr_loopback;
    return connect_and_send(fd, (struct sockaddr *)&in6, sizeof in6);
}

static int unix_socket(int abstract) {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) return refused("socket AF_UNIX");
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    const char *name = abstract ? abstract_name() : unix_path();
    snprintf(un.sun_path + abstract, sizeof un.sun_path - 1, "%s", name);
    socklen_t len = offsetof(struct sockaddr_un, sun_path) + abstract + strlen(name) + !abstract;
    return connect_and_send(fd, (struct sockaddr *)&un, len);
}

/* A hand-built UDP datagram to the test's UDP listener, sent through a raw socket. */
static int raw_udp(void) {
    int fd = socket(AF_INET, SOCK_RAW, IPPROTO_UDP);
    if (fd < 0) return refused("socket SOCK_RAW");
    unsigned char packet[8 + 7] = {0x30, 0x39};
    packet[2] = udp_port() >> 8;
    packet[3] = udp_port() & 0xff;
    packet[5] = sizeof packet;
    memcpy(packet + 8, "hostile", 7);
    struct sockaddr_in in4 = {.sin_family = AF_INET};
    in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (sendto(fd, packet, sizeof packet, 0, (struct sockaddr *)&in4, sizeof in4) < 0)
        return refused("sendto raw");
    beacon("raw");
    return BREACHED;
}

static int packet_socket(void) {
    int fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (fd < 0) return refused("socket AF_PACKET");
    beacon("packet");
    return BREACHED;
}

static int vsock(void) {
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0) return refused("socket AF_VSOCK");
    struct sockaddr_vm vm = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = 22};
    return connect_and_send(fd, (struct sockaddr *)&vm, sizeof vm);
}

/* Ask the kernel for the interface list: the test looks for the host's interfaces. */
static int netlink(void) {
    int fd = socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
    if (fd < 0) return refused("socket AF_NETLINK");
    struct { struct nlmsghdr header; struct rtgenmsg gen; } request = {
        .header = {.nlmsg_len = sizeof request, .nlmsg_type = RTM_GETLINK,
                   .nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP, .nlmsg_seq = 1},
        .gen = {.rtgen_family = AF_UNSPEC}};
    if (send(fd, &request, sizeof request, 0) < 0) return refused("netlink send");
    char buf[16384];
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n <= 0) return refused("netlink recv");
    for (ssize_t i = 0; i < n; i++) putchar(buf[i] >= 32 && buf[i] < 127 ? buf[i] : '.');
    putchar('\n');
    return EX_TEMPFAIL;
}

int main(int argc, char **argv) {
    setup(argc, argv);
    const char *mode = case_arg(0);
    if (!strcmp(mode, "tcp4")) return inet(SOCK_STREAM, tcp_port());
    if (!strcmp(mode, "udp4")) return inet(SOCK_DGRAM, udp_port());
    if (!strcmp(mode, "tcp6")) return inet6(tcp_port());
    if (!strcmp(mode, "unix")) return unix_socket(0);
    if (!strcmp(mode, "abstract")) return unix_socket(1);
    if (!strcmp(mode, "raw")) return raw_udp();
    if (!strcmp(mode, "packet")) return packet_socket();
    if (!strcmp(mode, "vsock")) return vsock();
    if (!strcmp(mode, "netlink")) return netlink();
    fprintf(stderr, "net: unknown mode %s\n", mode);
    return 64;
}
