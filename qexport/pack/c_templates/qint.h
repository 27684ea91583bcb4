/* qint.h: the integer kernels of `qexport to-c` (C99): uint8 activations, N-bit weight codes read
 * from their packed bytes in flash, int32 accumulation, requantization as onnxruntime computes it
 * (fp32 product of the int32 sum and (x_scale * w_scale) / y_scale, clamp, round half to even, zero
 * point). Each kernel computes exactly what the QOperator ONNX file's operator computes.
 *
 * Build with IEEE single precision and no contraction of a*b+c into one rounding where the source
 * does not ask for it: -ffp-contract=off (GCC and Clang), no -ffast-math. */
#ifndef QINT_H
#define QINT_H

#include <stdint.h>

#define QI_TWOS_COMPLEMENT 0
#define QI_SIGN 1 /* 1-bit codes: bit 1 means -1, bit 0 means +1 */

/* A Conv1d/Conv2d (Conv1d: h = ho = kh = 1) or, with h = w = kh = kw = 1, a Linear on one row.
 * Weight codes in C order (cout, cin / groups, kh, kw), packed at `bits` bits (docs/packing.md). */
typedef struct {
    const uint8_t *codes;
    uint8_t bits, encoding;
    const int8_t *flip;  /* -1 where a folded BatchNorm's factor is negative (the codes' sign), else +1 */
    const int32_t *bias; /* int32, scale x_scale * w_scale */
    const float *m;      /* requantization multiplier per output channel */
    int8_t *row;         /* scratch for one output channel's codes, unpacked (cin / groups * kh * kw bytes) */
    uint32_t cin, h, w, cout, ho, wo, kh, kw, sh, sw, dh, dw, ph, pw, groups;
    uint8_t x_zp, y_zp;
} qi_conv_t;

void qi_conv(const qi_conv_t *c, const uint8_t *x, uint8_t *y);
/* A Linear on `rows` rows of c->cin features each (x: rows x cin, y: rows x cout). */
void qi_linear(const qi_conv_t *c, uint32_t rows, const uint8_t *x, uint8_t *y);

typedef struct {
    uint32_t c, h, w, ho, wo, kh, kw, sh, sw, dh, dw, ph, pw;
} qi_pool_t;

/* MaxPool on uint8 values (padding never wins). */
void qi_maxpool(const qi_pool_t *p, const uint8_t *x, uint8_t *y);
/* QLinearGlobalAveragePool over n values per channel: (sum - n*x_zp) * s, s = x_s / (y_s * n). */
void qi_global_avgpool(uint32_t channels, uint32_t n, const uint8_t *x, float s, uint8_t x_zp, uint8_t y_zp, uint8_t *y);
/* QLinearAdd as MLAS computes it with FMA: y = fma(a, ra, fma(b, rb, k)), round half to even, clamp. */
void qi_add(uint32_t n, const uint8_t *a, const uint8_t *b, float ra, float rb, float k, uint8_t *y);
/* QuantizeLinear: x / s, clamp to [-zp, 255 - zp], round half to even, + zp. */
void qi_quantize(uint32_t n, const float *x, float s, uint8_t zp, uint8_t *y);
/* DequantizeLinear: (q - zp) * s. */
void qi_dequantize(uint32_t n, const uint8_t *q, float s, uint8_t zp, float *y);

/* The signed code at flat index i of a packed tensor. */
int32_t qi_code(const uint8_t *packed, uint32_t i, uint32_t bits, uint32_t encoding);

#endif /* QINT_H */
