/* qmodel.h: inference API of a quantized MLP exported by `qexport to-c` (C99, libc only).
 *
 * Weights are integer codes packed at N bits each (docs/packing.md): bit j of code i is bit
 * (i*N + j) mod 8 of byte (i*N + j) / 8, two's complement, or for 1-bit binary layers the
 * sign bit (1 means -1, 0 means +1). A layer computes y = scale * (Q x) + bias, then ReLU.
 */
#ifndef QMODEL_H
#define QMODEL_H

#include <stdint.h>

#include "qmodel_config.h" /* generated: QMODEL_INPUTS, QMODEL_CLASSES, ... */

#define QM_TWOS_COMPLEMENT 0
#define QM_SIGN 1

/* One Linear layer: weight shape (out, in), C order. width 0 means a float layer (kept float). */
typedef struct {
    uint32_t in, out;
    uint32_t width;        /* bits per packed code (1..9), or 0 for float weights */
    int encoding;          /* QM_TWOS_COMPLEMENT or QM_SIGN */
    int per_channel;       /* 1: scale[out], 0: scale[0] for the whole tensor */
    const uint8_t *packed; /* ceil(in*out*width/8) bytes, or NULL */
    const float *scale;    /* or NULL for a float layer */
    const float *weight;   /* float weights of a float layer, or NULL */
    const float *bias;     /* out values, or NULL */
    int relu;              /* 1: ReLU after this layer */
} qm_layer;

/* Run the model on one sample: `input` holds QMODEL_INPUTS raw (unnormalised) features in
 * the order of the PyTorch input tensor (C order); `logits` receives QMODEL_CLASSES values.
 * Returns the predicted class (argmax, first one on ties). Uses two static float buffers of
 * QMODEL_MAX_WIDTH values: not reentrant. */
int qmodel_predict(const float *input, float *logits);

/* The signed code at flat index i of a packed tensor (exposed for tests and custom kernels). */
int32_t qmodel_code(const uint8_t *packed, uint32_t i, uint32_t width, int encoding);

#endif /* QMODEL_H */
