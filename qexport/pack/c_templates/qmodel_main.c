/* qmodel_main.c: a desktop check of the exported model, not needed on the device.
 * Reads samples of QMODEL_INPUTS whitespace-separated numbers from FILE (or stdin) and prints,
 * per sample, the predicted class and the QMODEL_CLASSES logits.
 *   cc -std=c99 -O2 qmodel.c qmodel_main.c -o qmodel && ./qmodel inputs.txt */
#include <stdio.h>

#include "qmodel.h"

int main(int argc, char **argv)
{
    static float x[QMODEL_INPUTS];
    float logits[QMODEL_CLASSES];
    FILE *f = stdin;
    long n = 0;
    int i;
    if (argc > 2) {
        fprintf(stderr, "usage: %s [FILE]  (samples of %d numbers each)\n", argv[0], QMODEL_INPUTS);
        return 2;
    }
    if (argc == 2 && !(f = fopen(argv[1], "r"))) {
        fprintf(stderr, "error: cannot open %s\n", argv[1]);
        return 2;
    }
    for (;;) {
        for (i = 0; i < QMODEL_INPUTS; ++i) {
            if (fscanf(f, "%f", &x[i]) != 1) {
                if (i == 0 && feof(f))
                    return 0;
                fprintf(stderr, "error: sample %ld ends after %d of %d numbers\n", n, i, QMODEL_INPUTS);
                return 2;
            }
        }
        printf("%d", qmodel_predict(x, logits));
        for (i = 0; i < QMODEL_CLASSES; ++i)
            printf(" %.9g", logits[i]);
        printf("\n");
        ++n;
    }
}
