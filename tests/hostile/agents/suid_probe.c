/* Installed by the test as a setuid-root file and exec'd by an agent: the probe is test code,
 * so what it prints can be believed.  EUID0 in the output means the exec gained root. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    printf("suid probe: uid %d euid %d\n", (int)getuid(), (int)geteuid());
    if (geteuid() == 0) printf("EUID0\n");
    return 75;
}
