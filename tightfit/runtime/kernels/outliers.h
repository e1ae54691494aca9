// SpQR's sparse part: the residual outliers R (CSR: int32 row pointers, u16 columns, fp16 values,
// layout.h) added to a matmul's rows after their dense low-bit part (matmul.h),
//   y[m, n] += sum_{j in row n} R[n, col j] * x[m, col j],
// with the fp32 x: exact, and the int8 blocks would save no bytes (x of one token is a few KB, in L1).
// Part of the one translation unit engine.cpp.
#pragma once

#include "activations.h"
#include "common.h"
#include "layout.h"

// Tuning knob, chosen by measurement (bench/kernel_ab.py, as tuning.h's):
//   TF_OUTLIER_LANES  CSR entries of a row summed at once under a mask (AVX-512: 8; 0 the scalar
//                     loop, which the portable build always takes). Decode of SmolLM2-135M
//                     spqr-w3g32-s3-o0.5 (RTN, fp16 head; ~155k rows, ~530k outliers per token;
//                     2-core EPYC, 2 threads, 2026-11-28, `kernel_ab.py --rounds 8`, medians of 7):
//                     8 vs 0: 177.0 / 158.9 tok/s; 16 lanes (zmm, measured the same way and removed):
//                     165.4. Rows hold 3-8 entries mostly: one 8-lane step each, where 16 lanes
//                     gather twice the (masked) lanes.
#ifndef TF_OUTLIER_LANES
#define TF_OUTLIER_LANES 8
#endif

// sum_j R[n, j] x[j] over row n's entries [j0, j1). AVX-512: 8 entries at a time under
// a mask (columns and fp16 values loaded, x gathered by column, one fma), one horizontal sum at the
// end: the loop runs once for a row of up to that many entries instead of branching per entry.
#if TF_AVX512 && TF_OUTLIER_LANES == 8
static inline float outlier_dot(const tf_mat& W, int j0, int j1, const float* x) {
    __m256 acc = _mm256_setzero_ps();
    for (int j = j0; j < j1; j += 8) {
        const __mmask8 k = j1 - j >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (j1 - j)) - 1);
        const __m256i col = _mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(k, W.outlier_cols + j));
        const __m256 v = _mm256_cvtph_ps(_mm_maskz_loadu_epi16(k, W.outlier_values + j));
        acc = _mm256_fmadd_ps(v, _mm256_mmask_i32gather_ps(_mm256_setzero_ps(), k, col, x, 4), acc);
    }
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
#else
static inline float outlier_dot(const tf_mat& W, int j0, int j1, const float* x) {
    float r = 0.f;
    for (int j = j0; j < j1; j++) r += half_value(W.outlier_values[j]) * x[W.outlier_cols[j]];
    return r;
}
#endif

// y[m, n] += (R x[m])[n] for rows [n0, n1) and every token of a.
static void add_outliers(const tf_mat& W, const QAct& a, int n0, int n1, float* y) {
    if (!W.outlier_rowptr) return;
    for (int n = n0; n < n1; n++) {
        const int j0 = W.outlier_rowptr[n], j1 = W.outlier_rowptr[n + 1];
        if (j0 == j1) continue;
        for (int m = 0; m < a.M; m++) y[(size_t)m * W.N + n] += outlier_dot(W, j0, j1, a.x + (size_t)m * a.K);
    }
}
