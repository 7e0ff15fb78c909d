/* DAM attention on the CPU for rows that lie in one query block of 64 (a decode step, a prompt of one block): the
 * C peer of the gathered path's `_decode_one` (gathered.py) and of the Triton decode kernel (decode.py), exact like
 * the reference (reference.py) up to float rounding. Built into one library with `cpu_sparse.c` (`cpu_sparse.py`).
 *
 * Two phases, each over OpenMP threads:
 *   1. scores: every row's q . k (q pre-scaled by scale * log2 e, so the scores are in log2 units) against every
 *      key its window can reach, one work item per (kv head, chunk of keys): each key is read once for the G query
 *      heads of its kv head and all rows;
 *   2. per query head: with `gamma` >= 0 the dynamic part's blocks chosen here by the exact-mass rule from those
 *      scores (`dynamic.mass_select`: the own block's mass counts as kept, earlier blocks join by decreasing mass,
 *      ties to the lower index, while the mass left out exceeds 1 - gamma of the total, at most `cap`; blocks of
 *      mass 0 never), else the caller's `chosen`; then each row's softmax over the keys its Stage-2 word allows
 *      (`cpu_words.h`: a selected block or a retrieval head's block whole and causal, the window cut) and the
 *      weighted sum of their values. Value rows of keys no word allows are never read.
 * The block masses are each row's softmax over every causal key in its window, summed per block of 64 and
 * averaged over the rows, as `dynamic.scores_block_mass` computes them.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_vector.h"
#include "cpu_words.h"

#define BLK 64
#define CHUNK 512 /* keys per score work item */

typedef uint16_t v16h __attribute__((vector_size(32)));

/* 16 floats at element offset `off` of a float32 or bfloat16 tensor (bfloat16 widened exactly: its bits are the top
 * half of a float32's). */
static inline v16 load16_kv(const void *base, int64_t off, int bf16) {
    if (!bf16) return load16((const float *)base + off);
    v16h h;
    memcpy(&h, (const uint16_t *)base + off, sizeof h);
    return (v16)(__builtin_convertvector(h, v16u) << 16);
}

typedef struct {
    const float *q; int64_t q_sh, q_ss;
    const void *k; int64_t k_sh, k_ss;   /* key row t holds position key_start + t; strides in elements */
    const void *v; int64_t v_sh, v_ss;
    int kv_bf16;                          /* k and v hold bfloat16 (else float32) */
    float *out; int64_t o_sh, o_ss;
    int H, Hkv, Sq, start, D;
    int64_t key_start, base, n;           /* scores cover positions base .. base + n - 1 (base a multiple of 64) */
    int64_t lo;                           /* the first position any row reads: keys before it are -inf */
    float scale_log2;
    const int64_t *mw, *ow, *cw;
    int L, NW;
    const uint8_t *full, *chosen;         /* [H], [H][nKd] or NULL */
    int nKd;
    double gamma;                         /* >= 0: choose by exact mass here */
    int cap;
    uint8_t *chosen_out;                  /* [H][qb + 1] or NULL */
    int64_t window;
    float *s;                             /* [H][Sq][n]: the scores */
} dec_t;

/* Phase 1: keys c0 .. c1 - 1 (positions, within base .. base + n) of kv head g against every row of its G heads. */
static void score_chunk(const dec_t *a, int g, int64_t c0, int64_t c1) {
    const int D = a->D, G = a->H / a->Hkv, nd = D / 16;
    for (int64_t p = c0; p < c1; p++) {
        float *col = a->s + (p - a->base);
        if (p < a->lo) {
            for (int r = 0; r < G * a->Sq; r++) col[(int64_t)r * a->n] = NEG_INF;
            continue;
        }
        int64_t kp = g * a->k_sh + (p - a->key_start) * a->k_ss;
        v16 kv[16];
        for (int c = 0; c < nd; c++) kv[c] = load16_kv(a->k, kp + 16 * c, a->kv_bf16);
        for (int hh = 0; hh < G; hh++) {
            int h = g * G + hh;
            for (int r = 0; r < a->Sq; r++) {
                const float *qr = a->q + h * a->q_sh + (int64_t)r * a->q_ss;
                v16 acc = splat(0);
                for (int c = 0; c < nd; c++) acc += load16(qr + 16 * c) * kv[c];
                col[((int64_t)h * a->Sq + r) * a->n] = hsum16(acc) * a->scale_log2;
            }
        }
    }
}

/* Sum of exp2(x[j] - mx) over j in [j0, j1) of a row's scores (positions from base). */
static float exp2_sum(const float *x, int64_t j0, int64_t j1, float mx) {
    v16 sum = splat(0);
    v16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int64_t j = j0 & ~(int64_t)15; j < j1; j += 16) {
        v16i idx = lane + (int32_t)(j - (j0 & ~(int64_t)15));
        v16i ok = (idx >= (int32_t)(j0 - (j0 & ~(int64_t)15))) & (idx < (int32_t)(j1 - (j0 & ~(int64_t)15)));
        v16 p = exp2v(load16(x + j) - splat(mx));
        sum += select16(ok, p, splat(0));
    }
    return hsum16(sum);
}

/* Row i's word over key block kb: the Stage-2 word (whole and causal when `sel`), cut to the keys that exist and
 * to the row's window. */
static inline uint64_t row_word(const dec_t *a, int h, int64_t i, int kb, int sel) {
    int64_t k0 = (int64_t)kb * BLK;
    uint64_t w = stage2_word(a->mw, a->ow, a->cw, a->L, a->NW, h, i, kb, sel) & window_word(a->lo - k0);
    return a->window ? w & window_word(i - a->window + 1 - k0) : w;
}

typedef struct { float m; int kb; } cand_t;

static int heavier_first(const void *x, const void *y) {
    const cand_t *a = x, *b = y;
    if (a->m != b->m) return a->m > b->m ? -1 : 1;
    return a->kb - b->kb;
}

/* The exact-mass rule for head h: sel[0 .. qb] (1: a chosen block). mass, left and cands: scratch of qb + 1. */
static void choose_by_mass(const dec_t *a, int h, int qb, uint8_t *sel, float *mass, float *left, cand_t *cands) {
    memset(mass, 0, sizeof(float) * (qb + 1));
    for (int r = 0; r < a->Sq; r++) {
        int64_t i = a->start + r, first = a->lo;
        if (a->window && i - a->window + 1 > first) first = i - a->window + 1;
        const float *x = a->s + ((int64_t)h * a->Sq + r) * a->n - a->base; /* indexed by position */
        float mx = NEG_INF;
        for (int64_t j = first; j <= i; j++) mx = x[j] > mx ? x[j] : mx;
        if (mx == NEG_INF) continue;
        float total = 0;
        int kb0 = (int)(first / BLK), kb1 = (int)(i / BLK);
        for (int kb = kb0; kb <= kb1; kb++) { /* the row's unnormalised block sums, in left for a moment */
            int64_t j0 = (int64_t)kb * BLK > first ? (int64_t)kb * BLK : first;
            int64_t j1 = (int64_t)kb * BLK + BLK < i + 1 ? (int64_t)kb * BLK + BLK : i + 1;
            left[kb] = exp2_sum(x, j0, j1, mx);
            total += left[kb];
        }
        float w = 1.0f / (total * (float)a->Sq);
        for (int kb = kb0; kb <= kb1; kb++) mass[kb] += left[kb] * w;
    }
    int nc = 0;
    for (int kb = 0; kb < qb; kb++) cands[nc++] = (cand_t){mass[kb], kb};
    qsort(cands, nc, sizeof(cand_t), heavier_first);
    /* left[t]: the mass of candidate t and every lighter one, summed lightest first (a reversed cumsum). */
    float acc = 0;
    for (int t = nc - 1; t >= 0; t--) left[t] = (acc += cands[t].m > 0 ? cands[t].m : 0);
    float bar = (float)(1.0 - a->gamma) * (mass[qb] + acc);
    memset(sel, 0, qb + 1);
    for (int t = 0; t < nc && t < a->cap; t++)
        if (left[t] > bar) sel[cands[t].kb] = 1;
}

/* Phase 2 for head h: the selection, then every row's masked softmax and weighted values. words: scratch of qb + 1. */
static void head(const dec_t *a, int h, uint8_t *sel, float *mass, float *left, cand_t *cands, uint64_t *words) {
    const int D = a->D, nd = D / 16, G = a->H / a->Hkv, g = h / G;
    const int qb = a->start / BLK;
    const int full_head = a->full && a->full[h];
    if (a->gamma >= 0) {
        choose_by_mass(a, h, qb, sel, mass, left, cands);
        if (a->chosen_out) memcpy(a->chosen_out + (int64_t)h * (qb + 1), sel, qb + 1);
    } else {
        for (int kb = 0; kb <= qb; kb++)
            sel[kb] = a->chosen && kb < a->nKd ? a->chosen[(int64_t)h * a->nKd + kb] != 0 : 0;
    }
    for (int r = 0; r < a->Sq; r++) {
        int64_t i = a->start + r;
        const float *x = a->s + ((int64_t)h * a->Sq + r) * a->n - a->base;
        float *dst = a->out + h * a->o_sh + (int64_t)r * a->o_ss;
        int kb0 = (int)(a->base / BLK), kb1 = (int)(i / BLK);
        float mx = NEG_INF;
        for (int kb = kb0; kb <= kb1; kb++) { /* each block's word (kept for the second pass), the largest score */
            uint64_t w = words[kb] = row_word(a, h, i, kb, full_head || sel[kb]);
            for (int c = 0; c < 4 && w; c++) {
                float m = hmax16(select16(lanes_of(w, c), load16(x + (int64_t)kb * BLK + 16 * c), splat(NEG_INF)));
                mx = m > mx ? m : mx;
            }
        }
        if (mx == NEG_INF) { /* nothing allowed: a zero row; every allowed score NaN (a NaN query): NaN, as the
                              * reference gives */
            float fill = 0.0f;
            for (int kb = kb0; kb <= kb1; kb++)
                for (int c = 0; c < 4 && words[kb]; c++) {
                    v16 xs = load16(x + (int64_t)kb * BLK + 16 * c);
                    v16i nan = (xs != xs) & lanes_of(words[kb], c);
                    for (int t = 0; t < 16; t++) fill = nan[t] ? __builtin_nanf("") : fill;
                }
            for (int d = 0; d < D; d++) dst[d] = fill;
            continue;
        }
        v16 acc[16];
        for (int c = 0; c < nd; c++) acc[c] = splat(0);
        v16 ls = splat(0);
        float p[BLK];
        for (int kb = kb0; kb <= kb1; kb++) {
            uint64_t w = words[kb];
            if (!w) continue;
            int64_t k0 = (int64_t)kb * BLK;
            for (int c = 0; c < 4; c++) {
                v16 pc = select16(lanes_of(w, c), exp2v(load16(x + k0 + 16 * c) - splat(mx)), splat(0));
                store16(p + 16 * c, pc);
                ls += pc;
            }
            int64_t vb = g * a->v_sh + (k0 - a->key_start) * a->v_ss;
            for (uint64_t b = w; b; b &= b - 1) { /* value rows of allowed keys only */
                int j = __builtin_ctzll(b);
                int64_t vj = vb + (int64_t)j * a->v_ss;
                v16 pv = splat(p[j]);
                for (int c = 0; c < nd; c++) acc[c] += pv * load16_kv(a->v, vj + 16 * c, a->kv_bf16);
            }
        }
        float inv = 1.0f / hsum16(ls);
        for (int c = 0; c < nd; c++) store16(dst + 16 * c, acc[c] * splat(inv));
    }
}

/* Rows start .. start + Sq - 1 (in one query block of 64) of H heads over positions up to start + Sq - 1; k and v
 * hold positions from key_start (every row's window must begin at or after it), float32 or (kv_bf16) bfloat16. D a
 * multiple of 16, at most 256.
 * gamma >= 0: the dynamic part chosen here by exact mass (at most `cap` blocks; written to chosen_out [H][qb + 1]
 * when given); else `chosen` [H][nKd] (or NULL: no dynamic part). Returns 0, or 1 when scratch memory could not be
 * had. */
int dam_cpu_decode(const float *q, int64_t q_sh, int64_t q_ss, const void *k, int64_t k_sh, int64_t k_ss,
                   const void *v, int64_t v_sh, int64_t v_ss, int kv_bf16, float *out, int64_t o_sh, int64_t o_ss,
                   int H, int Hkv, int Sq, int start, int64_t key_start, int D, float scale_log2, const int64_t *mw,
                   const int64_t *ow, const int64_t *cw, int L, int NW, const uint8_t *full, int64_t window,
                   const uint8_t *chosen, int nKd, double gamma, int cap, uint8_t *chosen_out, int threads) {
    int64_t lo = key_start;
    if (window && start - window + 1 > lo) lo = start - window + 1;
    int64_t base = lo / BLK * BLK, end = (int64_t)start + Sq;
    dec_t a = {q, q_sh, q_ss, k, k_sh, k_ss, v, v_sh, v_ss, kv_bf16, out, o_sh, o_ss, H, Hkv, Sq, start, D, key_start,
               base, ((end - base) + BLK - 1) / BLK * BLK, lo, scale_log2, mw, ow, cw, L, NW, full, chosen, nKd, gamma,
               cap, chosen_out, window, NULL};
    float *s = aligned_alloc(64, (size_t)H * Sq * a.n * sizeof(float));
    if (!s) return 1;
    a.s = s;
    for (int64_t t = 0; t < (int64_t)H * Sq; t++) /* the padding past the last position */
        for (int64_t j = end - base; j < a.n; j++) s[t * a.n + j] = NEG_INF;
    const int64_t n_chunks = (end - base + CHUNK - 1) / CHUNK;
    const int qb = start / BLK;
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(| : failed)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < (int64_t)Hkv * n_chunks; t++) {
            int64_t c0 = base + (t % n_chunks) * CHUNK, c1 = c0 + CHUNK < end ? c0 + CHUNK : end;
            score_chunk(&a, (int)(t / n_chunks), c0, c1);
        }
        uint8_t *sel = malloc(qb + 1);
        float *mass = malloc(sizeof(float) * (qb + 1));
        float *left = malloc(sizeof(float) * (qb + 1));
        cand_t *cands = malloc(sizeof(cand_t) * (qb + 1));
        uint64_t *words = malloc(sizeof(uint64_t) * (qb + 1));
        int ok = sel && mass && left && cands && words;
        failed |= !ok;
#pragma omp for schedule(dynamic, 1)
        for (int h = 0; h < H; h++)
            if (ok) head(&a, h, sel, mass, left, cands, words);
        free(sel); free(mass); free(left); free(cands); free(words);
    }
    free(s);
    return failed;
}
