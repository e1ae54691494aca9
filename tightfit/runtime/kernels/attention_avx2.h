// Attention over an fp16 KV cache on CPUs with AVX2 but no AVX-512 (TF_AVX2, common.h): the key
// scores and the weighted sum of values of attention.h / attention_values.h's AVX-512 paths, on
// 256-bit registers (FMA, F16C). The 8- and 4-bit caches keep the portable code there.
// Part of the one translation unit engine.cpp.
#pragma once

#include "common.h"
#include "kv_cache.h"

#if TF_AVX2
// sc[r * slots + s] <- (q_r . k_s) * scale for R queries q [R, D] over the slots of `spans`, fp16
// keys [slots/16, D, 16]; mx[r] <- their max. Each block of 16 slots as two halves of 8, the R
// queries' accumulators in registers, every key converted once for all R.
template <int R>
static void avx2_key_scores16(const float* q, const uint16_t* keys, int D, int slots, const Span* spans, int n_spans,
                              float scale, float* sc, float* mx) {
    for (int r = 0; r < R; r++) mx[r] = -INFINITY;
    for (int t = 0; t < n_spans; t++)
        for (int b = spans[t].begin / 16; 16 * b < spans[t].end; b++) {
            const uint16_t* kb = keys + (size_t)b * D * 16;
            const int lo = std::max(spans[t].begin - 16 * b, 0), hi = std::min(spans[t].end - 16 * b, 16);
            for (int h = 0; h < 2; h++) {
                if (8 * h >= hi || 8 * h + 8 <= lo) continue;
                __m256 acc[R];
                for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
                for (int d = 0; d < D; d++) {
                    const __m256 k = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(kb + (size_t)d * 16 + 8 * h)));
                    for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(q[r * D + d]), k, acc[r]);
                }
                alignas(32) float s[8];
                for (int r = 0; r < R; r++) {
                    _mm256_store_ps(s, _mm256_mul_ps(acc[r], _mm256_set1_ps(scale)));
                    for (int l = std::max(lo - 8 * h, 0); l < std::min(hi - 8 * h, 8); l++) {
                        sc[(size_t)r * slots + 16 * b + 8 * h + l] = s[l];
                        mx[r] = std::max(mx[r], s[l]);
                    }
                }
            }
        }
}

// out_r[8 c0 .. 8 (c0 + NC)) <- inv_r * sum_s p_rs v_s, fp16 values [slots, D], one pass over the slots
template <int NC, int R>
static void avx2_values16_pass(const uint16_t* v, int D, int slots, const Span* spans, int n_spans, const float* sc,
                               const float* inv, int c0, float* out) {
    __m256 o[R][NC];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NC; c++) o[r][c] = _mm256_setzero_ps();
    for (int t = 0; t < n_spans; t++)
        for (int j = spans[t].begin; j < spans[t].end; j++) {
            const uint16_t* vr = v + (size_t)j * D + 8 * c0;
            for (int c = 0; c < NC; c++) {
                const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(vr + 8 * c)));
                for (int r = 0; r < R; r++) o[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(sc[(size_t)r * slots + j]), x, o[r][c]);
            }
        }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NC; c++)
            _mm256_storeu_ps(out + (size_t)r * D + 8 * (c0 + c), _mm256_mul_ps(o[r][c], _mm256_set1_ps(inv[r])));
}

// out [R, D] <- inv_r * sum_s p_rs v_s over the slots of `spans`, D a multiple of 8: passes of NC
// chunks of 8 dims, NC * R accumulators within the 16 registers
template <int R>
static void avx2_values16(const uint16_t* v, int D, int slots, const Span* spans, int n_spans, const float* sc,
                          const float* inv, float* out) {
    constexpr int NC = R <= 2 ? 4 : R <= 4 ? 2 : 1;
    int c0 = 0;
    for (; c0 + NC <= D / 8; c0 += NC) avx2_values16_pass<NC, R>(v, D, slots, spans, n_spans, sc, inv, c0, out);
    for (; c0 < D / 8; c0++) avx2_values16_pass<1, R>(v, D, slots, spans, n_spans, sc, inv, c0, out);
}
#endif
