/* Installed setuid root in the test image: prints the effective uid it runs with. Under
   no-new-privileges the kernel ignores the setuid bit, so a job sees its own uid here. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    printf("%u\n", (unsigned)geteuid());
    return 0;
}
