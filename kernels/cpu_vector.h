/* The CPU kernels' vector helpers (`cpu_sparse.c`, `cpu_antisum.c`): GCC vector extensions, a `v16` being 16 floats
 * (one AVX-512 register, or two or four narrower ones), a polynomial exp2, horizontal reductions, and the 4 x 64
 * product both kernels are built on. */
#ifndef DAM_CPU_VECTOR_H
#define DAM_CPU_VECTOR_H

#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));

#define NEG_INF (-__builtin_inff())

static inline v16 splat(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
static inline v16 load16(const float *p) { v16 r; memcpy(&r, p, sizeof r); return r; }
static inline void store16(float *p, v16 x) { memcpy(p, &x, sizeof x); }
static inline v16 select16(v16i m, v16 a, v16 b) { return (v16)(((v16i)a & m) | ((v16i)b & ~m)); }

/* 2^x elementwise for x <= 0 (x below -126 gives 2^-126, which callers zero or never weigh). */
static inline v16 exp2v(v16 x) {
    x = select16(x < splat(-126.0f), splat(-126.0f), x);
    v16 n = (x + splat(12582912.0f)) - splat(12582912.0f); /* round to nearest (|x| < 2^22) */
    v16 f = x - n;                                          /* in [-1/2, 1/2] */
    const float c1 = 0.6931471805599453f, c2 = 0.2402265069591007f, c3 = 0.05550410866482158f,
                c4 = 0.009618129107628477f, c5 = 0.0013333558146428443f, c6 = 0.00015403530393381606f;
    v16 p = splat(c6);
    p = p * f + splat(c5);
    p = p * f + splat(c4);
    p = p * f + splat(c3);
    p = p * f + splat(c2);
    p = p * f + splat(c1);
    p = p * f + splat(1.0f);
    v16i e = __builtin_convertvector(n, v16i);
    return (v16)((v16i)p + (e << 23));
}

static inline v16 max16(v16 a, v16 b) { return select16(a > b, a, b); }

static inline float hmax16(v16 x) { /* a tree of shuffles: 4 steps */
    x = max16(x, __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    x = max16(x, __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    x = max16(x, __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    x = max16(x, __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
    return x[0];
}

static inline float hsum16(v16 x) {
    x += __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    x += __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    x += __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    x += __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return x[0];
}

/* x[0 .. n16) (n16 a multiple of 16; -inf where there is no score) becomes exp2(x - mx), 0 where -inf; returns its
 * sum: a row's softmax weights before the division. A NaN score stays NaN (and so does the sum), as the reference
 * has it. */
static inline float exp2_row(float *x, int64_t n16, float mx) {
    v16 sum = splat(0);
    for (int64_t j = 0; j < n16; j += 16) {
        v16 v = load16(x + j);
        v16 p = select16(v != splat(NEG_INF), exp2v(v - splat(mx)), splat(0));
        store16(x + j, p);
        sum += p;
    }
    return hsum16(sum);
}

/* d_r[0 .. 63] = (accumulate ? d_r : 0) + sum over c in [c0, c1) of q_r[c] * kt[64 c .. 64 c + 63], for the 4 rows
 * r: 4 rows by 64 columns of vector accumulators (16 registers), each step one load of kt's 64 floats and 4
 * broadcasts. Rows may alias (the same q and d): d is stored last row first, so the first row's sums win. */
static inline void rows4_by_64(const float *q0, const float *q1, const float *q2, const float *q3, const float *kt,
                               int c0, int c1, float *d0, float *d1, float *d2, float *d3, int accumulate) {
    v16 s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33;
    if (accumulate) {
        s00 = load16(d0); s01 = load16(d0 + 16); s02 = load16(d0 + 32); s03 = load16(d0 + 48);
        s10 = load16(d1); s11 = load16(d1 + 16); s12 = load16(d1 + 32); s13 = load16(d1 + 48);
        s20 = load16(d2); s21 = load16(d2 + 16); s22 = load16(d2 + 32); s23 = load16(d2 + 48);
        s30 = load16(d3); s31 = load16(d3 + 16); s32 = load16(d3 + 32); s33 = load16(d3 + 48);
    } else {
        s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = splat(0);
        s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = splat(0);
    }
    for (int c = c0; c < c1; c++) {
        const float *kc = kt + (int64_t)c * 64;
        v16 k0 = load16(kc), k1 = load16(kc + 16), k2 = load16(kc + 32), k3 = load16(kc + 48);
        v16 a0 = splat(q0[c]), a1 = splat(q1[c]), a2 = splat(q2[c]), a3 = splat(q3[c]);
        s00 += a0 * k0; s01 += a0 * k1; s02 += a0 * k2; s03 += a0 * k3;
        s10 += a1 * k0; s11 += a1 * k1; s12 += a1 * k2; s13 += a1 * k3;
        s20 += a2 * k0; s21 += a2 * k1; s22 += a2 * k2; s23 += a2 * k3;
        s30 += a3 * k0; s31 += a3 * k1; s32 += a3 * k2; s33 += a3 * k3;
    }
    store16(d3, s30); store16(d3 + 16, s31); store16(d3 + 32, s32); store16(d3 + 48, s33);
    store16(d2, s20); store16(d2 + 16, s21); store16(d2 + 32, s22); store16(d2 + 48, s23);
    store16(d1, s10); store16(d1 + 16, s11); store16(d1 + 32, s12); store16(d1 + 48, s13);
    store16(d0, s00); store16(d0 + 16, s01); store16(d0 + 32, s02); store16(d0 + 48, s03);
}

#endif
