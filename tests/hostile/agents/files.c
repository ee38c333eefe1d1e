/* Filesystem agents: each mode tries one way to read or change something outside the
 * compartment's declared view.  Modes take the path to attack as case_arg(1). */
#include "agent.h"
#include <dirent.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>

static int read_path(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return refused(path);
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    if (n < 0) return refused(path);
    buf[n] = 0;
    printf("read %s: %s\n", path, buf);   /* the test looks for the secret in our output */
    beacon("read");
    return BREACHED;
}

static int list_path(const char *path) {
    DIR *dir = opendir(path);
    if (!dir) return refused(path);
    for (struct dirent *entry; (entry = readdir(dir));)
        printf("entry %s/%s\n", path, entry->d_name);  /* the test compares with the host */
    closedir(dir);
    return 0;
}

static int write_path(const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0666);
    if (fd < 0) return refused(path);
    if (write(fd, "hostile\n", 8) != 8) return refused(path);
    close(fd);
    printf("wrote %s\n", path);   /* legitimate inside the writable dir; the test checks where */
    return 0;
}

static int make_setid(const char *path, mode_t mode) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0755);
    if (fd < 0) return refused(path);
    if (fchmod(fd, mode) != 0) return refused("fchmod");
    close(fd);
    if (chmod(path, mode) != 0) return refused("chmod");
    printf("made %s mode %o\n", path, mode);   /* the test stats the file on the host */
    return BREACHED;
}

/* Other ways to a set-id file than chmod: the mode given at creation, and newer syscalls. */
static int setid_other_way(const char *how, const char *path) {
    int ok = -1;
    if (!strcmp(how, "open")) {
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 04755);
        ok = fd >= 0 ? 0 : -1;
    } else if (!strcmp(how, "mknod")) {
        ok = mknod(path, S_IFREG | 04755, 0);
    } else if (!strcmp(how, "fchmodat2")) {
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0755);
        ok = fd < 0 ? -1 : (int)syscall(452 /* fchmodat2 */, AT_FDCWD, path, 04755, 0);
    } else if (!strcmp(how, "tmpfile")) {
        /* an unnamed file made with the mode, then given a name through /proc */
        char dir[4096], self[64];
        snprintf(dir, sizeof dir, "%s", path);
        *strrchr(dir, '/') = 0;
        int fd = open(dir, O_TMPFILE | O_WRONLY, 04755);
        snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
        ok = fd < 0 ? -1 : linkat(AT_FDCWD, self, AT_FDCWD, path, AT_SYMLINK_FOLLOW);
    } else if (!strcmp(how, "fcaps")) {
        /* version 2 file capabilities granting CAP_SETUID (bit 7) permitted and effective */
        unsigned int caps[5] = {0x02000001, 1u << 7, 0, 0, 0};
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0755);
        ok = fd < 0 ? -1 : fsetxattr(fd, "security.capability", caps, sizeof caps, 0);
    }
    if (ok != 0) return refused(how);
    printf("made %s by %s\n", path, how);   /* the test stats the file on the host */
    return BREACHED;
}

static int rewrite_self(void) {
    int fd = open("/proc/self/exe", O_WRONLY);
    if (fd < 0) fd = open(g_argv[0], O_WRONLY);
    if (fd < 0) return refused(g_argv[0]);
    if (write(fd, "\x7f" "ELF-hostile", 12) != 12) return refused("write own binary");
    beacon("rewrite-self");
    return BREACHED;
}

static int hard_link(const char *source, const char *target) {
    if (link(source, target) != 0) return refused("link");
    printf("linked %s -> %s\n", source, target);   /* the test compares inodes on the host */
    return BREACHED;
}

static int make_node(const char *path) {
    if (mknod(path, S_IFCHR | 0666, makedev(1, 1)) != 0) return refused("mknod /dev/mem");
    beacon("mknod");
    return BREACHED;
}

int main(int argc, char **argv) {
    setup(argc, argv);
    const char *mode = case_arg(0), *path = case_arg(1);
    if (!strcmp(mode, "read")) return read_path(path);
    if (!strcmp(mode, "list")) return list_path(path);
    if (!strcmp(mode, "write")) return write_path(path);
    if (!strcmp(mode, "setuid")) return make_setid(path, 04755);
    if (!strcmp(mode, "setgid")) return make_setid(path, 02755);
    if (!strcmp(mode, "setid-by")) return setid_other_way(path, case_arg(2));
    if (!strcmp(mode, "rewrite-self")) return rewrite_self();
    if (!strcmp(mode, "link")) return hard_link(path, case_arg(2));
    if (!strcmp(mode, "mknod")) return make_node(path);
    fprintf(stderr, "files: unknown mode %s\n", mode);
    return 64;
}
