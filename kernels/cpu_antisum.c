/* XAttention's summed-antidiagonal estimate on the CPU (the dynamic selection's mass per query block and key block):
 * the C peer of `dam_kernels.block_mass.antisum_block_mass` (every row group estimated) and of the Triton kernels
 * of `antisum.py`, the same numbers up to float rounding. Built with `cpu_sparse.c` into one library
 * (`cpu_sparse.py`); GCC vector extensions as there.
 *
 * The caller lays out each row group's `s` rows side by side (`qg`, pre-scaled by scale / s * log2 e, zeros for
 * rows outside the call) and each key group's `s` keys last first, transposed in tiles of 64 key groups (`kgt`),
 * so that a row group's score against a key group is one dot product of `s * D` elements. One work item is
 * (head, query block): its `R = block / s` row groups against every causal key group (j <= the row group's own,
 * j s < Sk), 4 row groups by 64 key groups at a time; each row group's softmax (exp2 of log2 scores), summed per
 * key block, weighted by `present / groups` and added into the query block's row of `out`.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_vector.h"

#define KT 64 /* key groups per transposed tile */
#define WC 128 /* depth of a tile's chunk: 128 x 64 floats, 32 KiB */

/* qg [H][n_groups][W] (W = s * D); kgt [Hkv][n_tiles][W][64]; out [H][nQ][nK] (rows qb0 .. nQ - 1 written whole);
 * present [n_groups]; groups [nQ - qb0]. `g0` = base / s: the absolute index of row group 0. Returns 0, or 1 when
 * scratch memory could not be had. */
int dam_cpu_antisum(const float *qg, const float *kgt, float *out, int H, int Hkv, int n_groups, int W,
                    int64_t g0, int64_t n_key_groups, int R, int qb0, int nQ, int nK, const float *present,
                    const float *groups, int threads) {
    const int G = H / Hkv;
    const int64_t n_tiles = (n_key_groups + KT - 1) / KT;
    const int nqb = nQ - qb0;
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(| : failed)
    {
        float *sc = aligned_alloc(64, (size_t)(R + 3) * n_tiles * KT * sizeof(float) + 64);
        int ok = sc != NULL;
        failed |= !ok;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < (int64_t)H * nqb; t++) {
            if (!ok) continue;
            int qbl = nqb - 1 - (int)(t / H), h = (int)(t % H), kvh = h / G;
            float *orow = out + ((int64_t)h * nQ + qb0 + qbl) * nK;
            memset(orow, 0, sizeof(float) * nK);
            const float inv_groups = 1.0f / groups[qbl];
            /* Scores of the R row groups, a tile of 64 key groups at a time, its depth in chunks of WC (a chunk of
             * the tile, 32 KiB, stays in L1 while each quad of row groups reads it); partial sums kept in `sc`. */
            int64_t jmax = g0 + (int64_t)qbl * R + R - 1; /* the last causal key group of the block's rows */
            if (jmax > n_key_groups - 1) jmax = n_key_groups - 1;
            const int64_t tiles = jmax / KT + 1, stride = n_tiles * KT;
            for (int64_t tt = 0; tt < tiles; tt++) {
                const float *kt = kgt + ((int64_t)kvh * n_tiles + tt) * (int64_t)W * KT;
                for (int c0 = 0; c0 < W; c0 += WC) {
                    int c1 = c0 + WC < W ? c0 + WC : W;
                    for (int r0 = 0; r0 < R; r0 += 4) {
                        int nr = R - r0 < 4 ? R - r0 : 4;
                        int64_t gl = (int64_t)qbl * R + r0;
                        const float *q0 = qg + ((int64_t)h * n_groups + gl) * W;
                        const float *q1 = nr > 1 ? q0 + W : q0, *q2 = nr > 2 ? q0 + 2 * W : q0;
                        const float *q3 = nr > 3 ? q0 + 3 * W : q0;
                        float *d0 = sc + r0 * stride + tt * KT, *d1 = d0 + (nr > 1) * stride;
                        float *d2 = d0 + (nr > 2 ? 2 : 0) * stride, *d3 = d0 + (nr > 3 ? 3 : 0) * stride;
                        rows4_by_64(q0, q1, q2, q3, kt, c0, c1, d0, d1, d2, d3, c0 > 0);
                    }
                }
            }
            for (int r0 = 0; r0 < R; r0 += 4) {
                int nr = R - r0 < 4 ? R - r0 : 4;
                int64_t gl = (int64_t)qbl * R + r0;
                for (int r = 0; r < nr; r++) {
                    float w = present[gl + r];
                    if (w == 0.0f) continue;
                    int64_t jl = g0 + gl + r; /* causal key groups 0 .. jl */
                    if (jl > n_key_groups - 1) jl = n_key_groups - 1;
                    float *s = sc + (r0 + r) * n_tiles * KT;
                    int64_t n = jl + 1, n16 = (n + 15) & ~(int64_t)15;
                    for (int64_t j = n; j < n16; j++) s[j] = NEG_INF;
                    v16 mv = splat(NEG_INF);
                    for (int64_t j = 0; j < n16; j += 16) {
                        v16 x = load16(s + j);
                        mv = select16(x > mv, x, mv);
                    }
                    float l = exp2_row(s, n16, hmax16(mv));
                    float scale = w * inv_groups / l;
                    for (int64_t j0 = 0; j0 < n; j0 += R) { /* key block j0 / R: its R key groups (fewer at the end) */
                        float blk = 0.0f;
                        for (int64_t j = j0; j < j0 + R && j < n; j++) blk += s[j];
                        orow[j0 / R] += blk * scale;
                    }
                }
            }
        }
        free(sc);
    }
    return failed;
}
