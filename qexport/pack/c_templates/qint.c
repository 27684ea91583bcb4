/* qint.c: integer kernels of `qexport to-c` (see qint.h). No allocation; rintf and fmaf are the
 * only library calls (round half to even in the default rounding mode, one fused multiply-add). */
#include <math.h>
#include <stdint.h>

#include "qint.h"

int32_t qi_code(const uint8_t *packed, uint32_t i, uint32_t bits, uint32_t encoding)
{
    /* Bit stream position i*bits, low bits first; a code of up to 9 bits spans at most 2 bytes. */
    uint32_t bit = i * bits;
    uint32_t byte = bit >> 3, shift = bit & 7u;
    uint32_t v = packed[byte];
    if (shift + bits > 8u)
        v |= (uint32_t)packed[byte + 1u] << 8;
    v = (v >> shift) & ((1u << bits) - 1u);
    if (encoding == QI_SIGN)
        return v ? -1 : 1;
    if (v >> (bits - 1u))
        return (int32_t)v - (int32_t)(1u << bits); /* two's complement sign extension */
    return (int32_t)v;
}

/* fp32(acc) * m, clamp to [-zp, 255 - zp], round half to even, + zp (MlasRequantizeOutput). */
static uint8_t requantize(int32_t acc, float m, int32_t zp)
{
    float f = (float)acc * m;
    float lo = (float)-zp, hi = (float)(255 - zp);
    f = f < lo ? lo : (f > hi ? hi : f);
    return (uint8_t)((int32_t)rintf(f) + zp);
}

/* One output channel's codes, unpacked into c->row (the only unpacked copy: one row at a time). */
static const int8_t *unpack_row(const qi_conv_t *c, uint32_t o, uint32_t n)
{
    uint32_t i;
    for (i = 0; i < n; ++i)
        c->row[i] = (int8_t)qi_code(c->codes, o * n + i, c->bits, c->encoding);
    return c->row;
}

void qi_conv(const qi_conv_t *c, const uint8_t *x, uint8_t *y)
{
    uint32_t cin_g = c->cin / c->groups, cout_g = c->cout / c->groups;
    uint32_t per_out = cin_g * c->kh * c->kw, plane = c->h * c->w, taps = c->kh * c->kw;
    uint32_t o, oy, ox, ic, ky, kx;
    for (o = 0; o < c->cout; ++o) {
        const int8_t *wr = unpack_row(c, o, per_out);
        const uint8_t *xg = x + (o / cout_g) * cin_g * plane;
        for (oy = 0; oy < c->ho; ++oy) {
            for (ox = 0; ox < c->wo; ++ox) {
                int32_t acc = 0;
                for (ky = 0; ky < c->kh; ++ky) {
                    int32_t iy = (int32_t)(oy * c->sh + ky * c->dh) - (int32_t)c->ph;
                    if (iy < 0 || iy >= (int32_t)c->h)
                        continue; /* padding holds x_zp: it adds 0 */
                    for (kx = 0; kx < c->kw; ++kx) {
                        int32_t ix = (int32_t)(ox * c->sw + kx * c->dw) - (int32_t)c->pw;
                        const uint8_t *xp;
                        const int8_t *wp;
                        if (ix < 0 || ix >= (int32_t)c->w)
                            continue;
                        xp = xg + (uint32_t)iy * c->w + (uint32_t)ix;
                        wp = wr + ky * c->kw + kx;
                        for (ic = 0; ic < cin_g; ++ic) /* exact integers: any order gives the same sum */
                            acc += ((int32_t)xp[ic * plane] - (int32_t)c->x_zp) * (int32_t)wp[ic * taps];
                    }
                }
                acc = acc * (int32_t)c->flip[o] + c->bias[o];
                y[(o * c->ho + oy) * c->wo + ox] = requantize(acc, c->m[o], c->y_zp);
            }
        }
    }
}

void qi_linear(const qi_conv_t *c, uint32_t rows, const uint8_t *x, uint8_t *y)
{
    uint32_t r, o, i;
    for (o = 0; o < c->cout; ++o) {
        const int8_t *wr = unpack_row(c, o, c->cin);
        for (r = 0; r < rows; ++r) {
            const uint8_t *xr = x + r * c->cin;
            int32_t acc = 0;
            for (i = 0; i < c->cin; ++i)
                acc += ((int32_t)xr[i] - (int32_t)c->x_zp) * (int32_t)wr[i];
            acc = acc * (int32_t)c->flip[o] + c->bias[o];
            y[r * c->cout + o] = requantize(acc, c->m[o], c->y_zp);
        }
    }
}

void qi_maxpool(const qi_pool_t *p, const uint8_t *x, uint8_t *y)
{
    uint32_t ch, oy, ox, ky, kx;
    for (ch = 0; ch < p->c; ++ch) {
        const uint8_t *xc = x + ch * p->h * p->w;
        for (oy = 0; oy < p->ho; ++oy) {
            for (ox = 0; ox < p->wo; ++ox) {
                uint8_t best = 0;
                for (ky = 0; ky < p->kh; ++ky) {
                    uint32_t iy = oy * p->sh + ky * p->dh - p->ph;
                    for (kx = 0; kx < p->kw; ++kx) {
                        uint32_t ix = ox * p->sw + kx * p->dw - p->pw;
                        if (iy < p->h && ix < p->w && xc[iy * p->w + ix] > best)
                            best = xc[iy * p->w + ix];
                    }
                }
                y[(ch * p->ho + oy) * p->wo + ox] = best;
            }
        }
    }
}

void qi_global_avgpool(uint32_t channels, uint32_t n, const uint8_t *x, float s, uint8_t x_zp, uint8_t y_zp, uint8_t *y)
{
    uint32_t ch, i;
    for (ch = 0; ch < channels; ++ch) {
        int32_t acc = -(int32_t)(n * x_zp);
        float f;
        for (i = 0; i < n; ++i)
            acc += x[ch * n + i];
        f = rintf((float)acc * s) + (float)y_zp;
        y[ch] = (uint8_t)(f < 0.0f ? 0.0f : (f > 255.0f ? 255.0f : f));
    }
}

void qi_add(uint32_t n, const uint8_t *a, const uint8_t *b, float ra, float rb, float k, uint8_t *y)
{
    uint32_t i;
    for (i = 0; i < n; ++i) {
        float f = rintf(fmaf((float)a[i], ra, fmaf((float)b[i], rb, k)));
        y[i] = (uint8_t)(f < 0.0f ? 0.0f : (f > 255.0f ? 255.0f : f));
    }
}

void qi_quantize(uint32_t n, const float *x, float s, uint8_t zp, uint8_t *y)
{
    uint32_t i;
    float lo = -(float)zp, hi = 255.0f - (float)zp;
    for (i = 0; i < n; ++i) {
        float v = x[i] / s;
        v = v < lo ? lo : (v > hi ? hi : v);
        y[i] = (uint8_t)((int32_t)rintf(v) + zp);
    }
}

void qi_dequantize(uint32_t n, const uint8_t *q, float s, uint8_t zp, float *y)
{
    uint32_t i;
    for (i = 0; i < n; ++i)
        y[i] = (float)((int32_t)q[i] - (int32_t)zp) * s;
}
