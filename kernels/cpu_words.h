/* The Stage-2 mask of one row over one key block of 64, as a 64-bit word (bit t: key k0 + t allowed), from the
 * kernels' word tables (`word_tables.py`, the words `prefill.dam_tile_mask` reads): shared by the CPU kernels
 * (`cpu_sparse.c` for prompts, `cpu_decode.c` for rows in one query block). */
#ifndef DAM_CPU_WORDS_H
#define DAM_CPU_WORDS_H

#include <stdint.h>

#include "cpu_vector.h"

static inline uint64_t causal_word(int64_t e) { /* keys k0 .. k0 + e of a block at k0, for row k0 + e */
    if (e < 0) return 0;
    if (e >= 63) return ~(uint64_t)0;
    return ((uint64_t)1 << (e + 1)) - 1;
}

static inline uint64_t window_word(int64_t lo) { /* keys k0 + t with t >= lo */
    if (lo <= 0) return ~(uint64_t)0;
    if (lo >= 64) return 0;
    return ~(uint64_t)0 << lo;
}

/* Row i of head h over key block kb: every causal key when `sel` (a selected block, a retrieval head); below L the
 * true mask's word `mw[h, i, kb]` (diagonal guard included); at or beyond L the offset word `ow[h, i - k0]` (offsets
 * < L, guard included, causal) OR the matched columns' word `cw[h, kb]` of the keys below L. mw [H][L][NW],
 * ow [H][L + 64], cw [H][NW]. */
static inline uint64_t stage2_word(const int64_t *mw, const int64_t *ow, const int64_t *cw, int L, int NW, int h,
                                   int64_t i, int kb, int sel) {
    int64_t k0 = (int64_t)kb * 64, e = i - k0;
    uint64_t w;
    if (sel) {
        w = causal_word(e);
    } else if (i < L) {
        w = k0 < L ? (uint64_t)mw[((int64_t)h * L + i) * NW + kb] : 0;
    } else {
        w = (e >= 0 && e < L + 64) ? (uint64_t)ow[(int64_t)h * (L + 64) + e] : 0;
        if (k0 < L) w |= (uint64_t)cw[(int64_t)h * NW + kb];
    }
    return w;
}

/* The 16 lanes of chunk c (keys 16c .. 16c+15) of a 64-bit word as an all-ones / zero lane mask. */
static inline v16i lanes_of(uint64_t w, int c) {
    uint32_t half = (uint32_t)(w >> (32 * (c >> 1)));
    v16u sh = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    sh += (uint32_t)(16 * (c & 1));
    v16u h = (v16u){half, half, half, half, half, half, half, half, half, half, half, half, half, half, half, half};
    return (v16i)(((h >> sh) & 1u) != 0u);
}

#endif
