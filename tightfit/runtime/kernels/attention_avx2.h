// Attention on CPUs with AVX2 but no AVX-512 (TF_AVX2, common.h): the key scores and the weighted
// sum of values of attention.h / attention_values.h's AVX-512 paths, for every KV width (kv_cache.h's
// layouts), on 256-bit registers (FMA, F16C): a block of 16 slots as two halves of 8.
// Part of the one translation unit engine.cpp.
#pragma once

#include "common.h"
#include "kv_cache.h"

#if TF_AVX2
// sc[r * slots + s] <- (q_r . k_s) * scale for R queries q [R, D] over the slots of `spans`; mx[r] <- their
// max. Keys kc (kv_cache.h) in blocks of 16 slots, each as two halves of 8, the R queries' accumulators
// in registers, every key converted once for all R: fp16 keys; 8-bit codes per slot and group with their
// (scale, min) kp, q . k = sum_g scale_g (q_g . c_g) + min_g sum(q_g); 4-bit codes per block and dim,
// q . k = sum_d (q_d scale_d) c_d + sum_d q_d min_d, q_d scale_d and the constant computed once per block.
template <int BITS, int R>
static void avx2_key_scores(const float* q, const uint8_t* kc, const uint16_t* kp, int D, int slots, const Span* spans,
                            int n_spans, float scale, float* sc, float* mx) {
    const int G = kv_groups(D), gw = kv_group(D);
    const size_t block = (size_t)D * 16 * BITS / 8;
    float qsum[R][TF_MAX_HEAD_DIM / 16];  // [R, G] sum(q_rg) (bits 8)
    if (BITS == 8) query_group_sums(q, R, D, qsum);
    alignas(32) float qs[BITS == 4 ? R * TF_MAX_HEAD_DIM : 1];  // [R, D] q_rd scale_d of a block (bits 4)
    float bias[R];                                              // sum_d q_rd min_d of a block (bits 4)
    for (int r = 0; r < R; r++) mx[r] = -INFINITY;
    for (int t = 0; t < n_spans; t++)
        for (int b = spans[t].begin / 16; 16 * b < spans[t].end; b++) {
            const uint8_t* kb = kc + b * block;
            const int lo = std::max(spans[t].begin - 16 * b, 0), hi = std::min(spans[t].end - 16 * b, 16);
            if (BITS == 4) {
                const uint16_t* par = kp + (size_t)b * 2 * D;  // [2, D]: scales, mins
                for (int r = 0; r < R; r++) {
                    __m256 bv = _mm256_setzero_ps();
                    for (int d = 0; d < D; d += 8) {
                        const __m256 qv = _mm256_loadu_ps(q + r * D + d);
                        _mm256_store_ps(qs + r * D + d, _mm256_mul_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(par + d)))));
                        bv = _mm256_fmadd_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(par + D + d))), bv);
                    }
                    bias[r] = avx2_hsum(bv);
                }
            }
            for (int h = 0; h < 2; h++) {
                if (8 * h >= hi || 8 * h + 8 <= lo) continue;
                __m256 sv[R], acc[R];
                for (int r = 0; r < R; r++) sv[r] = _mm256_setzero_ps();
                if (BITS == 16) {
                    const uint16_t* kh = (const uint16_t*)kb + 8 * h;
                    for (int d = 0; d < D; d++) {
                        const __m256 k = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(kh + (size_t)d * 16)));
                        for (int r = 0; r < R; r++) sv[r] = _mm256_fmadd_ps(_mm256_set1_ps(q[r * D + d]), k, sv[r]);
                    }
                } else if (BITS == 4) {
                    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
                    for (int d = 0; d < D; d += 2) {  // dims d (low nibble) and d + 1 (high) of 8 slots
                        const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(kb + (size_t)d * 8 + 8 * h)));
                        const __m256 c0 = _mm256_cvtepi32_ps(_mm256_and_si256(x, _mm256_set1_epi32(15)));
                        const __m256 c1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(x, 4));
                        for (int r = 0; r < R; r++)
                            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(qs[r * D + d + 1]), c1, _mm256_fmadd_ps(_mm256_set1_ps(qs[r * D + d]), c0, acc[r]));
                    }
                    for (int r = 0; r < R; r++) sv[r] = _mm256_add_ps(acc[r], _mm256_set1_ps(bias[r]));
                } else {
                    const uint16_t* par = kp + (size_t)b * G * 32 + 8 * h;
                    for (int g = 0; g < G; g++) {
                        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
                        for (int d = g * gw; d < std::min(D, (g + 1) * gw); d++) {
                            const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(kb + (size_t)d * 16 + 8 * h))));
                            for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(q[r * D + d]), c, acc[r]);
                        }
                        const __m256 sg = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(par + g * 32)));
                        const __m256 mg = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(par + g * 32 + 16)));
                        for (int r = 0; r < R; r++) sv[r] = _mm256_fmadd_ps(mg, _mm256_set1_ps(qsum[r][g]), _mm256_fmadd_ps(sg, acc[r], sv[r]));
                    }
                }
                alignas(32) float s8[8];
                for (int r = 0; r < R; r++) {
                    _mm256_store_ps(s8, _mm256_mul_ps(sv[r], _mm256_set1_ps(scale)));
                    for (int l = std::max(lo - 8 * h, 0); l < std::min(hi - 8 * h, 8); l++) {
                        sc[(size_t)r * slots + 16 * b + 8 * h + l] = s8[l];
                        mx[r] = std::max(mx[r], s8[l]);
                    }
                }
            }
        }
}

// 8 value codes of a slot's row `vr` (kv_cache.h's layout) from dim d0 (a multiple of 8) as floats
template <int BITS>
static inline __m256 avx2_value_codes(const uint8_t* vr, int D, int d0) {
    if (BITS == 8) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(vr + d0))));
    const int half = std::min(32, D - d0 / 32 * 32) / 2, o = d0 % 32;  // 16 bytes of a 32-dim block, or 8 of a last 16
    const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(vr + d0 / 32 * 16 + o % half)));
    return _mm256_cvtepi32_ps(o >= half ? _mm256_srli_epi32(x, 4) : _mm256_and_si256(x, _mm256_set1_epi32(15)));
}

// out [R, D] <- inv_r * sum_s p_rs v_s for 8- or 4-bit value codes v [slots, D * BITS / 8] and their
// (scale, min) vp [slots, groups, 2]: per group g, sum_s p_rs (scale_sg c_s) + sum_s p_rs min_sg; each
// slot's codes decoded and scaled once for the R queries, passes of NC chunks of 8 dims.
template <int BITS, int NC, int R>
static void avx2_values_q_pass(const uint8_t* v, const uint16_t* vp, int D, int slots, const Span* spans, int n_spans,
                               const float* sc, int c0, __m256 (&o)[R][NC]) {
    const int G = kv_groups(D), gw = kv_group(D);
    const size_t row = (size_t)D * BITS / 8;
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NC; c++) o[r][c] = _mm256_setzero_ps();
    for (int t = 0; t < n_spans; t++)
        for (int j = spans[t].begin; j < spans[t].end; j++) {
            const uint8_t* vr = v + (size_t)j * row;
            for (int c = 0; c < NC; c++) {
                const int d0 = 8 * (c0 + c);
                const __m256 x = _mm256_mul_ps(avx2_value_codes<BITS>(vr, D, d0), _mm256_set1_ps(f16_to_f32(vp[((size_t)j * G + d0 / gw) * 2])));
                for (int r = 0; r < R; r++) o[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(sc[(size_t)r * slots + j]), x, o[r][c]);
            }
        }
}
template <int BITS, int R>
static void avx2_values_q(const uint8_t* v, const uint16_t* vp, int D, int slots, const Span* spans, int n_spans,
                          const float* sc, const float* inv, float* out) {
    const int G = kv_groups(D), gw = kv_group(D);
    float msum[R][TF_MAX_HEAD_DIM / 16] = {};  // [R, G] sum_s p_rs min_sg
    for (int t = 0; t < n_spans; t++)
        for (int j = spans[t].begin; j < spans[t].end; j++)
            for (int g = 0; g < G; g++) {
                const float m = f16_to_f32(vp[((size_t)j * G + g) * 2 + 1]);
                for (int r = 0; r < R; r++) msum[r][g] += sc[(size_t)r * slots + j] * m;
            }
    constexpr int NC = R <= 2 ? 4 : R <= 4 ? 2 : 1;
    auto finish = [&](auto& o, int c0, int nc) {
        for (int r = 0; r < R; r++)
            for (int c = 0; c < nc; c++) {
                const int d0 = 8 * (c0 + c);
                _mm256_storeu_ps(out + (size_t)r * D + d0, _mm256_mul_ps(_mm256_add_ps(o[r][c], _mm256_set1_ps(msum[r][d0 / gw])), _mm256_set1_ps(inv[r])));
            }
    };
    int c0 = 0;
    for (; c0 + NC <= D / 8; c0 += NC) {
        __m256 o[R][NC];
        avx2_values_q_pass<BITS, NC, R>(v, vp, D, slots, spans, n_spans, sc, c0, o);
        finish(o, c0, NC);
    }
    for (; c0 < D / 8; c0++) {
        __m256 o[R][1];
        avx2_values_q_pass<BITS, 1, R>(v, vp, D, slots, spans, n_spans, sc, c0, o);
        finish(o, c0, 1);
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
