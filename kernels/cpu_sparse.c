/* Block-sparse DAM attention on the CPU: the online softmax of FlashAttention over the key blocks a query block
 * keeps, with the Stage-2 mask evaluated in place from the kernels' 64-bit word tables (no mask is built).
 *
 * The C peer of the Triton prefill kernel (prefill.py) and of the PyTorch gathered path (gathered.py); exact like
 * the reference (reference.py) up to float rounding. Compiled at first use by `cpu_sparse.py` (the C compiler of
 * the machine, -O3 -march=native -fopenmp) and called through ctypes. Portable C11 with GCC vector extensions:
 * a `v16` is 16 floats (one AVX-512 register, or two or four narrower ones where the machine has no AVX-512).
 *
 * One work item is (query head, query block of 64 rows at absolute positions); items run on OpenMP threads.
 * For every key block of 64 keys up to the item's last row, each row's word says which keys it allows:
 *   - a key block the dynamic part selected for this (head, query block), or any block of a retrieval head: all
 *     keys (cut to the causal ones on the diagonal block);
 *   - a row i below L: the true mask's word `mw[h, i, kb]` (diagonal guard included);
 *   - a row i at or beyond L: the offset word `ow[h, i - k0]` (offsets < L, guard included, causal) OR the matched
 *     columns' word `cw[h, kb]` of the keys below L.
 * A block no row allows is skipped: its keys are never read. Scores are in log2 units (q pre-scaled by
 * scale * log2 e); exp2 is a degree-6 polynomial on [-1/2, 1/2] with the exponent set from the rounded argument
 * (relative error about 2e-7, below float32's rounding of the sums). Products accumulate in float32 in the order
 * of the head dimension, as a naive dot product does.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_vector.h"
#include "cpu_words.h"

#define BLK 64
#define SPARSE_SHARE 4 /* a block whose allowed pairs are under 1 / SPARSE_SHARE of its rows' keys: pair by pair */

typedef struct {
    const float *q; int64_t q_sh, q_ss;
    const float *k; int64_t k_sh, k_ss;  /* the keys as the model holds them (sparse blocks read rows of it) */
    const float *kt;                      /* [Hkv][nKB][D][64]: each key block transposed, zero past Sk */
    const float *v; int64_t v_sh, v_ss;
    float *out; int64_t o_sh, o_ss;
    int H, Hkv, Sq, start, Sk, D;
    float scale_log2;
    const int64_t *mw, *ow, *cw;          /* [H][L][NW], [H][L + 64], [H][NW] */
    int L, NW;
    const uint8_t *chosen;                /* [H][nQd][nKd] or NULL */
    int nQd, nKd;
    const uint8_t *full;                  /* [H] or NULL */
    int64_t window;                       /* a sliding-window layer's W (row i keeps keys j > i - W); 0: none */
} args_t;

static uint64_t row_word(const args_t *a, int h, int64_t i, int kb, int sel) {
    uint64_t w = stage2_word(a->mw, a->ow, a->cw, a->L, a->NW, h, i, kb, sel);
    return a->window ? w & window_word(i - a->window + 1 - (int64_t)kb * BLK) : w;
}

/* The keys a row allows in a block of few allowed pairs (`SPARSE_SHARE`), one by one: each score a dot product,
 * the row's softmax state and output updated as in the dense path. */
static void sparse_row(const args_t *a, int kvh, int64_t k0, uint64_t w, const float *qr, float *orow, float *m,
                       float *l) {
    const int D = a->D;
    float sc[BLK + 16];
    int js[BLK], n = 0;
    for (uint64_t bits = w; bits; bits &= bits - 1) {
        int j = __builtin_ctzll(bits);
        const float *kj = a->k + kvh * a->k_sh + (k0 + j) * a->k_ss;
        v16 acc = splat(0);
        for (int d = 0; d < D; d += 16) acc += load16(qr + d) * load16(kj + d);
        sc[n] = hsum16(acc);
        js[n++] = j;
    }
    for (int t = n; t < ((n + 15) & ~15); t++) sc[t] = NEG_INF;
    float mx = *m;
    for (int t = 0; t < n; t++) mx = sc[t] > mx ? sc[t] : mx;
    float sum = exp2_row(sc, (n + 15) & ~15, mx);
    float al = *m == NEG_INF ? 0.0f : exp2v(splat(*m - mx))[0];
    *l = *l * al + sum;
    *m = mx;
    const float *vb = a->v + kvh * a->v_sh + k0 * a->v_ss;
    for (int d = 0; d < D; d += 16) {
        v16 acc = load16(orow + d) * splat(al);
        for (int t = 0; t < n; t++) acc += splat(sc[t]) * load16(vb + (int64_t)js[t] * a->v_ss + d);
        store16(orow + d, acc);
    }
}

/* One (head, query block): rows r0 .. r1 - 1 of the call (absolute i = start + r). Scratch: qs [64][D],
 * s [64][64], o [64][D], m [64], l [64]. */
static void item(const args_t *a, int h, int qb, float *qs, float *s, float *o, float *m, float *l) {
    const int D = a->D, G = a->H / a->Hkv, kvh = h / G;
    int64_t i0 = (int64_t)qb * BLK;
    int r0 = (int)(i0 > a->start ? i0 - a->start : 0);
    int r1 = (int)((i0 + BLK - a->start) < a->Sq ? (i0 + BLK - a->start) : a->Sq);
    int nr = r1 - r0, nr4 = (nr + 3) & ~3;
    int64_t ifirst = a->start + r0;
    for (int r = 0; r < nr4; r++) {
        for (int d = 0; d < D; d++)
            qs[r * D + d] = r < nr ? a->q[h * a->q_sh + (int64_t)(r0 + r) * a->q_ss + d] * a->scale_log2 : 0.0f;
        m[r] = NEG_INF;
        l[r] = 0.0f;
    }
    memset(o, 0, sizeof(float) * nr4 * D);
    int kb_last = (int)((ifirst + nr - 1) / BLK);
    int full_head = a->full && a->full[h];
    const int64_t nKB = (a->Sk + BLK - 1) / BLK;
    uint64_t w[BLK];
    int kb_first = 0; /* with a window, blocks wholly left of the first row's window hold no key */
    if (a->window && ifirst - a->window + 1 > 0) kb_first = (int)((ifirst - a->window + 1) / BLK);
    for (int kb = kb_first; kb <= kb_last; kb++) {
        int sel = full_head || (a->chosen && qb < a->nQd && kb < a->nKd
                                && a->chosen[((int64_t)h * a->nQd + qb) * a->nKd + kb]);
        uint64_t any = 0;
        int pop = 0;
        for (int r = 0; r < nr; r++) {
            any |= (w[r] = row_word(a, h, ifirst + r, kb, sel));
            pop += __builtin_popcountll(w[r]);
        }
        if (!any) continue;
        for (int r = nr; r < nr4; r++) w[r] = 0;
        if (pop * SPARSE_SHARE < nr * BLK) { /* few allowed pairs (a diagonal, a column): one by one */
            for (int r = 0; r < nr; r++)
                if (w[r]) sparse_row(a, kvh, (int64_t)kb * BLK, w[r], qs + r * D, o + r * D, &m[r], &l[r]);
            continue;
        }
        const float *kt = a->kt + ((int64_t)kvh * nKB + kb) * (int64_t)D * BLK;
        /* s = q . k for 4 rows at a time, 64 keys in 4 vectors each: 16 accumulators. */
        for (int r = 0; r < nr4; r += 4) {
            if (!(w[r] | w[r + 1] | w[r + 2] | w[r + 3])) continue; /* masked whole below */
            const float *q0 = qs + r * D;
            float *sr = s + r * BLK;
            rows4_by_64(q0, q0 + D, q0 + 2 * D, q0 + 3 * D, kt, 0, D, sr, sr + BLK, sr + 2 * BLK, sr + 3 * BLK, 0);
        }
        /* Masked online softmax per row: s becomes p; alpha[r] rescales row r's output before p v is added. */
        float alpha[BLK];
        for (int r = 0; r < nr4; r++) {
            float *sr = s + r * BLK;
            if (!w[r]) { /* nothing allowed here: the row's weights for this block are 0 */
                for (int c = 0; c < 4; c++) store16(sr + 16 * c, splat(0));
                alpha[r] = 1.0f;
                continue;
            }
            v16 x[4];
            v16i mk[4];
            for (int c = 0; c < 4; c++) {
                mk[c] = lanes_of(w[r], c);
                x[c] = select16(mk[c], load16(sr + 16 * c), splat(NEG_INF));
            }
            float hm = hmax16(max16(max16(x[0], x[1]), max16(x[2], x[3])));
            float mx = hm > m[r] ? hm : m[r];
            v16 ps = splat(0);
            for (int c = 0; c < 4; c++) {
                v16 p = select16(mk[c], exp2v(x[c] - splat(mx)), splat(0));
                store16(sr + 16 * c, p);
                ps += p;
            }
            float sum = hsum16(ps);
            float al = m[r] == NEG_INF ? 0.0f : exp2v(splat(m[r] - mx))[0];
            l[r] = l[r] * al + sum;
            m[r] = mx;
            alpha[r] = al;
        }
        /* o = alpha o + p v, 4 rows by 64 dims at a time (16 accumulators), keys of the block in order. */
        int nk = (int)(a->Sk - (int64_t)kb * BLK < BLK ? a->Sk - (int64_t)kb * BLK : BLK);
        const float *vb = a->v + kvh * a->v_sh + (int64_t)kb * BLK * a->v_ss;
        for (int r = 0; r < nr4; r += 4) {
            if (!(w[r] | w[r + 1] | w[r + 2] | w[r + 3])) continue;
            for (int d0 = 0; d0 < D; d0 += 64) {
                int dn = D - d0 < 64 ? D - d0 : 64; /* 16, 32, 48 or 64 */
                float *o0 = o + r * D + d0, *o1 = o0 + D, *o2 = o1 + D, *o3 = o2 + D;
                v16 acc[4][4];
                for (int c = 0; c < 4; c++) {
                    int on = 16 * c < dn;
                    acc[0][c] = on ? load16(o0 + 16 * c) * splat(alpha[r]) : splat(0);
                    acc[1][c] = on ? load16(o1 + 16 * c) * splat(alpha[r + 1]) : splat(0);
                    acc[2][c] = on ? load16(o2 + 16 * c) * splat(alpha[r + 2]) : splat(0);
                    acc[3][c] = on ? load16(o3 + 16 * c) * splat(alpha[r + 3]) : splat(0);
                }
                const float *p0 = s + r * BLK, *p1 = p0 + BLK, *p2 = p1 + BLK, *p3 = p2 + BLK;
                if (dn == 64) {
                    for (int j = 0; j < nk; j++) {
                        const float *vj = vb + (int64_t)j * a->v_ss + d0;
                        v16 v0 = load16(vj), v1 = load16(vj + 16), v2 = load16(vj + 32), v3 = load16(vj + 48);
                        v16 b0 = splat(p0[j]), b1 = splat(p1[j]), b2 = splat(p2[j]), b3 = splat(p3[j]);
                        acc[0][0] += b0 * v0; acc[0][1] += b0 * v1; acc[0][2] += b0 * v2; acc[0][3] += b0 * v3;
                        acc[1][0] += b1 * v0; acc[1][1] += b1 * v1; acc[1][2] += b1 * v2; acc[1][3] += b1 * v3;
                        acc[2][0] += b2 * v0; acc[2][1] += b2 * v1; acc[2][2] += b2 * v2; acc[2][3] += b2 * v3;
                        acc[3][0] += b3 * v0; acc[3][1] += b3 * v1; acc[3][2] += b3 * v2; acc[3][3] += b3 * v3;
                    }
                } else {
                    for (int j = 0; j < nk; j++) {
                        const float *vj = vb + (int64_t)j * a->v_ss + d0;
                        for (int c = 0; 16 * c < dn; c++) {
                            v16 vc = load16(vj + 16 * c);
                            acc[0][c] += splat(p0[j]) * vc; acc[1][c] += splat(p1[j]) * vc;
                            acc[2][c] += splat(p2[j]) * vc; acc[3][c] += splat(p3[j]) * vc;
                        }
                    }
                }
                for (int c = 0; 16 * c < dn; c++) {
                    store16(o0 + 16 * c, acc[0][c]); store16(o1 + 16 * c, acc[1][c]);
                    store16(o2 + 16 * c, acc[2][c]); store16(o3 + 16 * c, acc[3][c]);
                }
            }
        }
    }
    for (int r = 0; r < nr; r++) {
        /* a row with no allowed key gives 0; a NaN score (l NaN) gives NaN, as the reference does */
        float inv = l[r] > 0.0f ? 1.0f / l[r] : (l[r] != l[r] ? l[r] : 0.0f);
        float *dst = a->out + h * a->o_sh + (int64_t)(r0 + r) * a->o_ss;
        for (int d = 0; d < D; d++) dst[d] = o[r * D + d] * inv;
    }
}

/* Returns 0, or 1 when scratch memory could not be had. D must be a multiple of 16. `window` > 0 (a sliding-window
 * layer): every row's word is cut to its window, `i - j < window`, and blocks left of it are not visited. */
int dam_cpu_sparse_attention(const float *q, int64_t q_sh, int64_t q_ss, const float *k, int64_t k_sh,
                             int64_t k_ss, const float *kt, const float *v,
                             int64_t v_sh, int64_t v_ss, float *out, int64_t o_sh, int64_t o_ss, int H, int Hkv,
                             int Sq, int start, int Sk, int D, float scale_log2, const int64_t *mw,
                             const int64_t *ow, const int64_t *cw, int L, int NW, const uint8_t *chosen, int nQd,
                             int nKd, const uint8_t *full, int64_t window, int threads) {
    args_t a = {q, q_sh, q_ss, k, k_sh, k_ss, kt, v, v_sh, v_ss, out, o_sh, o_ss, H, Hkv, Sq, start, Sk, D, scale_log2,
                mw, ow, cw, L, NW, chosen, nQd, nKd, full, window};
    int qb0 = start / BLK, nQ = (start + Sq - 1) / BLK + 1 - qb0;
    int64_t n_items = (int64_t)H * nQ;
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(| : failed)
    {
        size_t tile = (size_t)BLK * D * sizeof(float);
        float *qs = aligned_alloc(64, tile), *o = aligned_alloc(64, tile);
        float *s = aligned_alloc(64, BLK * BLK * sizeof(float));
        float m[BLK], l[BLK];
        int ok = qs && o && s;
        failed |= !ok;
        /* Every thread meets the loop (a worksharing construct); later query blocks see more keys: first. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_items; t++) {
            int qb = qb0 + nQ - 1 - (int)(t / H), h = (int)(t % H);
            if (ok) item(&a, h, qb, qs, s, o, m, l);
        }
        free(qs); free(o); free(s);
    }
    return failed;
}
