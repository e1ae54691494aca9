// Attention: RoPE, and the softmax attention of a group of query heads over the positions they see
// in the one KV head they share (kv_cache.h: fp16, or 8- or 4-bit codes read as they are stored).
// Grouped-query attention reads and decodes every key and value once per group, not once per
// query head: with codes, decoding is the work, so the group divides it (6 query heads per KV head
// on Qwen2 1.5B).
// Part of the one translation unit engine.cpp.
#pragma once

#include "attention_values.h"
#include "common.h"
#include "kv_cache.h"

// Rotary position embedding of one head v at one position: its first R dims (R = rope_dim; partial
// rotary leaves the rest as they are) in pairs (i, i + R/2) rotated by the position's angles,
// cos_/sin_ [R/2] (rows of the layer's rope tables).
static void rope(float* v, const float* cos_, const float* sin_, int R) {
    const int r2 = R / 2;
    for (int i = 0; i < r2; i++) {
        float x1 = v[i], x2 = v[i + r2];
        v[i] = x1 * cos_[i] - x2 * sin_[i];
        v[i + r2] = x2 * cos_[i] + x1 * sin_[i];
    }
}

#if TF_AVX512
// max of sc[s] over the slots of `spans`
static float scores_max(const Span* spans, int n_spans, const float* sc) {
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int t = 0; t < n_spans; t++)
        for (int j = spans[t].begin; j < spans[t].end; j += 16) {
            const __mmask16 m = (__mmask16)((1u << std::min(16, spans[t].end - j)) - 1);
            vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, sc + j));
        }
    return _mm512_reduce_max_ps(vmax);
}
#endif

// sc[r * slots + s] <- (q_r . k_s) * scale for R queries q [R, D] over the slots of `spans`; mx[r]
// <- their max. Keys of 16 slots are scored together, fp16 or codes c, so the inner loop multiplies
// codes, each decoded once for the R queries: 8-bit keys (per slot and group g) as q . k = sum_g
// scale_g (q_g . c_g) + min_g sum(q_g); 4-bit keys (per block and dim d) as q . k = sum_d (q_d
// scale_d) c_d + sum_d q_d min_d, q_d scale_d and the constant computed once per block.
template <int BITS, int R>
static void key_scores(const float* q, const KVHead& h, const Span* spans, int n_spans, float scale, float* sc, float* mx) {
    const int D = h.D, G = kv_groups(D), gw = kv_group(D);
    const size_t S = h.slots, block = (size_t)D * 16 * BITS / 8;  // bytes of 16 slots' keys
    float qsum[R][TF_MAX_HEAD_DIM / 16];                        // [R, G] sum(q_rg) (bits 8)
    if (BITS == 8) query_group_sums(q, R, D, qsum);
#if TF_AVX512
    constexpr int A = R <= 6 ? 2 : 1;  // accumulators per query: two chains, but for many queries' FMAs
    alignas(64) float qs[BITS == 4 ? R * TF_MAX_HEAD_DIM : 1];  // [R, D] q_rd scale_d of a block (bits 4)
    for (int t = 0; t < n_spans; t++) {
        const Span sp = spans[t];
        for (int b = sp.begin / 16; 16 * b < sp.end; b++) {
            const uint8_t* kblk = h.k + b * block;
            __m512 sv[R], acc[A][R];
            for (int r = 0; r < R; r++) sv[r] = _mm512_setzero_ps();
            if (BITS == 16) {
                const uint16_t* kh = (const uint16_t*)kblk;
                for (int a = 0; a < A; a++)
                    for (int r = 0; r < R; r++) acc[a][r] = _mm512_setzero_ps();
                for (int d = 0; d < D; d += 2) {
                    const __m512 k0 = ld16h(kh + (size_t)d * 16), k1 = ld16h(kh + (size_t)(d + 1) * 16);
                    for (int r = 0; r < R; r++) {
                        acc[0][r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * D + d]), k0, acc[0][r]);
                        acc[A - 1][r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * D + d + 1]), k1, acc[A - 1][r]);
                    }
                }
                for (int r = 0; r < R; r++) sv[r] = A == 2 ? _mm512_add_ps(acc[0][r], acc[A - 1][r]) : acc[0][r];
            } else if (BITS == 4) {
                const uint16_t* par = h.kp + (size_t)b * 2 * D;  // [2, D]: scales, mins
                __m512 bias[R];                                   // lanes summed: sum_d q_rd min_d
                for (int r = 0; r < R; r++) bias[r] = _mm512_setzero_ps();
                for (int d = 0; d < D; d += 16) {
                    const __m512 s = ld16h(par + d), m = ld16h(par + D + d);
                    for (int r = 0; r < R; r++) {
                        const __m512 qv = _mm512_loadu_ps(q + r * D + d);
                        _mm512_store_ps(qs + r * D + d, _mm512_mul_ps(qv, s));
                        bias[r] = _mm512_fmadd_ps(qv, m, bias[r]);
                    }
                }
                for (int a = 0; a < A; a++)
                    for (int r = 0; r < R; r++) acc[a][r] = _mm512_setzero_ps();
                for (int d = 0; d < D; d += 2) {  // dims d (low nibble) and d + 1 (high) of 16 slots
                    const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(kblk + (size_t)d * 8)));
                    const __m512 c0 = _mm512_cvtepi32_ps(_mm512_and_si512(x, _mm512_set1_epi32(15)));
                    const __m512 c1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(x, 4));
                    for (int r = 0; r < R; r++) {
                        acc[0][r] = _mm512_fmadd_ps(_mm512_set1_ps(qs[r * D + d]), c0, acc[0][r]);
                        acc[A - 1][r] = _mm512_fmadd_ps(_mm512_set1_ps(qs[r * D + d + 1]), c1, acc[A - 1][r]);
                    }
                }
                for (int r = 0; r < R; r++) {
                    const __m512 a = A == 2 ? _mm512_add_ps(acc[0][r], acc[A - 1][r]) : acc[0][r];
                    sv[r] = _mm512_add_ps(a, _mm512_set1_ps(_mm512_reduce_add_ps(bias[r])));
                }
            } else {
                const uint16_t* par = h.kp + (size_t)b * G * 32;
                for (int g = 0; g < G; g++) {
                    for (int a = 0; a < A; a++)
                        for (int r = 0; r < R; r++) acc[a][r] = _mm512_setzero_ps();
                    for (int d = g * gw; d < std::min(D, (g + 1) * gw); d += 2) {
                        const __m512 c0 = u8_to_ps(_mm_loadu_si128((const __m128i*)(kblk + (size_t)d * 16)));
                        const __m512 c1 = u8_to_ps(_mm_loadu_si128((const __m128i*)(kblk + (size_t)(d + 1) * 16)));
                        for (int r = 0; r < R; r++) {
                            acc[0][r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * D + d]), c0, acc[0][r]);
                            acc[A - 1][r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * D + d + 1]), c1, acc[A - 1][r]);
                        }
                    }
                    const __m512 s = ld16h(par + g * 32), m = ld16h(par + g * 32 + 16);
                    for (int r = 0; r < R; r++) {
                        const __m512 a = A == 2 ? _mm512_add_ps(acc[0][r], acc[A - 1][r]) : acc[0][r];
                        sv[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(qsum[r][g]), _mm512_fmadd_ps(s, a, sv[r]));
                    }
                }
            }
            const unsigned lo = std::max(sp.begin - 16 * b, 0), hi = std::min(sp.end - 16 * b, 16);
            const __mmask16 m = (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));  // this span's slots of the block
            for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(sc + r * S + 16 * b, m, _mm512_mul_ps(sv[r], _mm512_set1_ps(scale)));
        }
    }
    for (int r = 0; r < R; r++) mx[r] = scores_max(spans, n_spans, sc + r * S);  // apart: its R registers would spill the accumulators
#else
#if TF_AVX2
    return avx2_key_scores<BITS, R>(q, h.k, h.kp, D, h.slots, spans, n_spans, scale, sc, mx);
#endif
    for (int r = 0; r < R; r++) {
        const float* qr = q + (size_t)r * D;
        float* scr = sc + r * S;
        float qs[TF_MAX_HEAD_DIM], bias = 0.f;  // bits 4: q_d scale_d and sum_d q_d min_d of block `in_qs`
        int in_qs = -1;
        mx[r] = -INFINITY;
        for (int t = 0; t < n_spans; t++)
            for (int j = spans[t].begin; j < spans[t].end; j++) {
                const uint8_t* kblk = h.k + (j / 16) * block;
                const int lane = j % 16;
                float s = 0.f;
                if (BITS == 16) {
                    for (int d = 0; d < D; d++) s += qr[d] * f16_to_f32(((const uint16_t*)kblk)[(size_t)d * 16 + lane]);
                } else if (BITS == 4) {
                    if (j / 16 != in_qs) {
                        const uint16_t* par = h.kp + (size_t)(j / 16) * 2 * D;
                        in_qs = j / 16, bias = 0.f;
                        for (int d = 0; d < D; d++) qs[d] = qr[d] * f16_to_f32(par[d]), bias += qr[d] * f16_to_f32(par[D + d]);
                    }
                    for (int d = 0; d < D; d++) s += qs[d] * (float)((kblk[(size_t)(d / 2) * 16 + lane] >> (4 * (d & 1))) & 15);
                    s += bias;
                } else {
                    const uint16_t* par = h.kp + (size_t)(j / 16) * G * 32 + lane;
                    for (int g = 0; g < G; g++) {
                        float a = 0.f;
                        for (int d = g * gw; d < std::min(D, (g + 1) * gw); d++) {
                            a += qr[d] * (float)kblk[(size_t)d * 16 + lane];
                        }
                        s += f16_to_f32(par[g * 32]) * a + f16_to_f32(par[g * 32 + 16]) * qsum[r][g];
                    }
                }
                scr[j] = s * scale;
                mx[r] = std::max(mx[r], scr[j]);
            }
    }
#endif
}

// sc[s] <- e^(sc[s] - mx) over the slots of `spans`; returns 1 / their sum
static float softmax_weights(const Span* spans, int n_spans, float mx, float* sc) {
#if TF_AVX512
    const __m512 vmx = _mm512_set1_ps(mx);
    __m512 vsum = _mm512_setzero_ps();
    for (int t = 0; t < n_spans; t++)
        for (int j = spans[t].begin; j < spans[t].end; j += 16) {
            const __mmask16 m = (__mmask16)((1u << std::min(16, spans[t].end - j)) - 1);
            const __m512 p = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + j), vmx));
            _mm512_mask_storeu_ps(sc + j, m, p);
            vsum = _mm512_mask_add_ps(vsum, m, vsum, p);
        }
    return 1.f / _mm512_reduce_add_ps(vsum);
#else
    float sum = 0.f;
    for (int t = 0; t < n_spans; t++) {
        int j = spans[t].begin;
#if TF_AVX2
        __m256 vs = _mm256_setzero_ps();
        for (; j + 8 <= spans[t].end; j += 8) {
            const __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + j), _mm256_set1_ps(mx)));
            _mm256_storeu_ps(sc + j, p);
            vs = _mm256_add_ps(vs, p);
        }
        sum += avx2_hsum(vs);
#endif
        for (; j < spans[t].end; j++) {
            sc[j] = expf(sc[j] - mx);
            sum += sc[j];
        }
    }
    return 1.f / sum;
#endif
}

// floats of scratch R query heads' attention over `slots` slots needs (attend)
static inline size_t attend_scratch(int R, int slots, int D) { return (size_t)R * kv_scratch(slots, D); }

// out [R, D] = softmax(q_r . k_s * scale) . v_s for R query heads q [R, D] over the slots s of
// `spans` (disjoint) of the KV head's cache h they share; scratch [attend_scratch(R, h.slots, D)]:
// the scores [R, slots], then (bits 8, 4) the values' (scale, min) as floats [slots, groups, 2].
template <int R>
static void attend_group(const float* q, const KVHead& h, const Span* spans, int n_spans, float scale, float* scratch, float* out) {
    float mx[R], inv[R];
    float *sc = scratch, *sm = scratch + (size_t)R * h.slots;
    if (h.bits == 16) key_scores<16, R>(q, h, spans, n_spans, scale, sc, mx);
    else if (h.bits == 8) key_scores<8, R>(q, h, spans, n_spans, scale, sc, mx);
    else key_scores<4, R>(q, h, spans, n_spans, scale, sc, mx);
    for (int r = 0; r < R; r++) inv[r] = softmax_weights(spans, n_spans, mx[r], sc + (size_t)r * h.slots);
    if (h.bits == 16) values_f16<R>(h, spans, n_spans, sc, inv, out);
    else if (h.bits == 8) values_q<8, R>(h, spans, n_spans, sc, inv, sm, out);
    else values_q<4, R>(h, spans, n_spans, sc, inv, sm, out);
}

// attend_group for R in 1 .. TF_MAX_GROUP (the caller splits larger groups)
static void attend(const float* q, int R, const KVHead& h, const Span* spans, int n_spans, float scale, float* scratch, float* out) {
    switch (R) {
        case 1: attend_group<1>(q, h, spans, n_spans, scale, scratch, out); break;
        case 2: attend_group<2>(q, h, spans, n_spans, scale, scratch, out); break;
        case 3: attend_group<3>(q, h, spans, n_spans, scale, scratch, out); break;
        case 4: attend_group<4>(q, h, spans, n_spans, scale, scratch, out); break;
        case 5: attend_group<5>(q, h, spans, n_spans, scale, scratch, out); break;
        case 6: attend_group<6>(q, h, spans, n_spans, scale, scratch, out); break;
        case 7: attend_group<7>(q, h, spans, n_spans, scale, scratch, out); break;
        default: attend_group<8>(q, h, spans, n_spans, scale, scratch, out); break;
    }
}
