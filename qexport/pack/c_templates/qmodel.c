/* qmodel.c: portable C99 inference for a quantized MLP exported by `qexport to-c`.
 * Normalise, then per layer y = scale * sum_i(code_i * x_i) + bias (float accumulation), ReLU
 * between layers, argmax. Codes are unpacked on the fly from the packed bytes in flash. */
#include <stddef.h>
#include <stdint.h>

#include "qmodel.h"
#include "qmodel_weights.h" /* generated: qm_mean, qm_std, qm_layers[] and their arrays */

int32_t qmodel_code(const uint8_t *packed, uint32_t i, uint32_t width, int encoding)
{
    /* Bit stream position i*width, low bits first; a code of up to 9 bits spans at most 2 bytes. */
    uint32_t bit = i * width;
    uint32_t byte = bit >> 3, shift = bit & 7u;
    uint32_t v = packed[byte];
    if (shift + width > 8u)
        v |= (uint32_t)packed[byte + 1u] << 8;
    v = (v >> shift) & ((1u << width) - 1u);
    if (encoding == QM_SIGN)
        return v ? -1 : 1; /* Larq convention: bit 1 means -1 */
    if (v >> (width - 1u))
        return (int32_t)v - (int32_t)(1u << width); /* two's complement sign extension */
    return (int32_t)v;
}

static float qm_buf[2][QMODEL_MAX_WIDTH];

static void qm_linear(const qm_layer *L, const float *x, float *y)
{
    uint32_t o, i, row;
    for (o = 0; o < L->out; ++o) {
        float acc = 0.0f, v;
        row = o * L->in;
        if (L->width) {
            for (i = 0; i < L->in; ++i)
                acc += (float)qmodel_code(L->packed, row + i, L->width, L->encoding) * x[i];
            acc *= L->scale[L->per_channel ? o : 0u]; /* W = scale * Q, factored out of the sum */
        } else {
            for (i = 0; i < L->in; ++i)
                acc += L->weight[row + i] * x[i];
        }
        v = acc + (L->bias ? L->bias[o] : 0.0f);
        y[o] = (L->relu && v < 0.0f) ? 0.0f : v;
    }
}

int qmodel_predict(const float *input, float *logits)
{
    uint32_t i, l;
    int best = 0;
    for (i = 0; i < QMODEL_INPUTS; ++i) {
        uint32_t k = (i / QMODEL_NORM_DIV) % QMODEL_NORM_SIZE;
        qm_buf[0][i] = (input[i] - qm_mean[k]) / qm_std[k];
    }
    for (l = 0; l < QMODEL_LAYERS; ++l)
        qm_linear(&qm_layers[l], qm_buf[l & 1u], l + 1u == QMODEL_LAYERS ? logits : qm_buf[(l + 1u) & 1u]);
    for (i = 1; i < QMODEL_CLASSES; ++i)
        if (logits[i] > logits[best])
            best = (int)i;
    return best;
}
