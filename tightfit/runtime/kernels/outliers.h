// SpQR's sparse part: the residual outliers R (layout.h: tile slices of u16 columns and fp16 values)
// added to a matmul's rows after their dense low-bit part (matmul.h),
//   y[m, n] += sum_{j in row n} R[n, col j] * x[m, col j],
// with the fp32 x: exact, and the int8 blocks would save no bytes (x of one token is a few KB, in L1).
// Per token: first the products R[n, col j] * x[m, col j] of all a thread's entries, 8 at a time,
// then each tile's slices summed as 16-row vectors, each slice's products expanded to the rows of its
// mask; no per-row loop, whose branches on rows of 0 to a few dozen entries cost more than the
// arithmetic. The AVX2 instructions this takes are in both vector builds (the same code, tested here
// on AVX2; the AVX-512 machines' old 8-lane row gathers are gone).
// Part of the one translation unit engine.cpp.
#pragma once

#include "activations.h"
#include "common.h"
#include "layout.h"

// Tuning knob, chosen by measurement (bench/kernel_ab.py, as tuning.h's):
//   TF_OUTLIER_SIMD  1: the vector tile pass above (AVX2 or AVX-512 builds); 0: the scalar loop over
//                    each slice's rows, which the portable build always takes. 2-core AMD EPYC, AVX2
//                    only, 2026-11-28, SmolLM2-135M spqr-w3g32-s3-o0.5 (RTN): one gate_proj [1536, 576]
//                    with its 4410 outliers, 1 thread, best of 25: 1.12 vs 1.58 ns per outlier (at 8x the
//                    outliers, rows' counts scaled: 1.03 vs 1.57; the products' x by an AVX2 gather
//                    instead of loads one by one: 1.67, removed); decode (kernel_ab.py --rounds 9, 2
//                    threads, medians of 8 on a noisy machine): 87.6 vs 77.9 tok/s.
#ifndef TF_OUTLIER_SIMD
#define TF_OUTLIER_SIMD 1
#endif
#define TF_OUTLIER_VECTOR ((TF_AVX512 || TF_AVX2) && TF_OUTLIER_SIMD)

#if TF_OUTLIER_VECTOR
// lane i of row i's product in a slice half of mask m: the index of that product among the
// half's (the set bits of m below i); lanes not in m are zeroed after the permutation
struct ExpandTable {
    alignas(32) int32_t idx[256][8];
    ExpandTable() {
        for (int m = 0; m < 256; m++)
            for (int i = 0, k = 0; i < 8; i++) idx[m][i] = m >> i & 1 ? k++ : 0;
    }
};
static const ExpandTable expand_table;

// the first popcount(m) floats at p spread to the lanes of m's set bits, others 0
static inline __m256 expand8(const float* p, unsigned m) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i in = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)m), bit), bit);
    const __m256 v = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), _mm256_load_si256((const __m256i*)expand_table.idx[m]));
    return _mm256_and_ps(v, _mm256_castsi256_ps(in));
}

// prod[e - e0] = R value * x[column] of entries [e0, e1), 8 at a time (the columns' x loaded one by
// one: faster than a gather on the AVX2 machines measured), past e1 up to 7 more products of 0
static void outlier_products(const tf_mat& W, int e0, int e1, const float* x, float* prod) {
    auto eight = [&](int e, const uint16_t* c, const uint16_t* v) {
        const __m256 xs = _mm256_setr_ps(x[c[0]], x[c[1]], x[c[2]], x[c[3]], x[c[4]], x[c[5]], x[c[6]], x[c[7]]);
        _mm256_storeu_ps(prod + (e - e0), _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)v)), xs));
    };
    int e = e0;
    for (; e + 8 <= e1; e += 8) eight(e, W.outlier_cols + e, W.outlier_values + e);
    if (e < e1) {  // the tail: columns and values 0 past e1
        uint16_t c[8] = {0}, v[8] = {0};
        memcpy(c, W.outlier_cols + e, 2 * (e1 - e));
        memcpy(v, W.outlier_values + e, 2 * (e1 - e));
        eight(e, c, v);
    }
}

// yt[r] += the products of tile T's entries (prod: its first entry's) summed per row, for its `valid` rows
static void tile_outliers(const tf_mat& W, int T, const float* prod, float* yt, int valid) {
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    for (int sl = W.outlier_tiles[T], e = 0; sl < W.outlier_tiles[T + 1]; sl++) {
        const unsigned m = W.outlier_masks[sl];
        lo = _mm256_add_ps(lo, expand8(prod + e, m & 0xFF));
        e += __builtin_popcount(m & 0xFF);
        hi = _mm256_add_ps(hi, expand8(prod + e, m >> 8));
        e += __builtin_popcount(m >> 8);
    }
    if (valid == 16) {
        _mm256_storeu_ps(yt, _mm256_add_ps(_mm256_loadu_ps(yt), lo));
        _mm256_storeu_ps(yt + 8, _mm256_add_ps(_mm256_loadu_ps(yt + 8), hi));
        return;
    }
    alignas(32) float r[16];
    _mm256_store_ps(r, lo);
    _mm256_store_ps(r + 8, hi);
    for (int i = 0; i < valid; i++) yt[i] += r[i];
}

// y[m, n] += (R x[m])[n] for rows [n0, n1) (n0 a multiple of 16) and every token of a.
static void add_outliers(const tf_mat& W, const QAct& a, int n0, int n1, float* y) {
    if (!W.outlier_tiles) return;
    const int T0 = n0 / 16, T1 = (n1 + 15) / 16, e0 = W.outlier_entries[T0], e1 = W.outlier_entries[T1];
    if (e0 == e1) return;
    thread_local std::vector<float> prod;  // the products of this thread's entries, then 8 more floats
    if (prod.size() < (size_t)(e1 - e0) + 8) prod.resize(e1 - e0 + 8);
    for (int m = 0; m < a.M; m++) {
        outlier_products(W, e0, e1, a.x + (size_t)m * a.K, prod.data());
        for (int T = T0; T < T1; T++)
            tile_outliers(W, T, prod.data() + (W.outlier_entries[T] - e0), y + (size_t)m * W.N + 16 * T, std::min(16, n1 - 16 * T));
    }
}
#else
// y[m, n] += (R x[m])[n] for rows [n0, n1) (n0 a multiple of 16) and every token of a: each slice's rows in turn
static void add_outliers(const tf_mat& W, const QAct& a, int n0, int n1, float* y) {
    if (!W.outlier_tiles) return;
    for (int T = n0 / 16; 16 * T < n1; T++)
        for (int m = 0; m < a.M; m++) {
            const float* x = a.x + (size_t)m * a.K;
            float* yt = y + (size_t)m * W.N + 16 * T;
            for (int sl = W.outlier_tiles[T], e = W.outlier_entries[T]; sl < W.outlier_tiles[T + 1]; sl++)
                for (unsigned k = W.outlier_masks[sl]; k; k &= k - 1, e++) yt[__builtin_ctz(k)] += half_value(W.outlier_values[e]) * x[W.outlier_cols[e]];
        }
}
#endif

