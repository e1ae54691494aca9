// Attention: RoPE, and one query's softmax attention over the positions it sees in one KV head's
// cache (kv_cache.h: fp16, or 8- or 4-bit codes read as they are stored).
// Part of the one translation unit engine.cpp.
#pragma once

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

// One KV head of one layer as attention reads it (KVCache's layout for `bits`).
struct KVHead {
    const uint8_t* k;    // keys: fp16 or codes, in blocks of 16 slots
    const uint8_t* v;    // values: fp16 or codes, slot by slot
    const uint16_t* kp;  // (scale, min) of the keys [slots/16, groups, 2, 16] (bits 8, 4)
    const uint16_t* vp;  // (scale, min) of the values [slots, groups, 2] (bits 8, 4)
    int bits, D, slots;
};

#if TF_AVX512
static inline __m512 ld16h(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline __m512 u8_to_ps(__m128i x) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(x)); }
// 4-bit value codes of one slot: dims 32i .. 32i+31 from 16 bytes (low nibbles the first 16, high
// the next), a last 16 dims (D % 32 = 16) from 8 bytes (low the first 8, high the next)
static inline void value_codes_32(const uint8_t* row, int c, __m512& lo, __m512& hi) {
    const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + 8 * c)));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(x, _mm512_set1_epi32(15)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(x, 4));
}
static inline __m512 value_codes_16(const uint8_t* row, int c) {
    const __m128i b = _mm_loadl_epi64((const __m128i*)(row + 8 * c));
    return u8_to_ps(_mm_and_si128(_mm_unpacklo_epi64(b, _mm_srli_epi16(b, 4)), _mm_set1_epi8(0x0f)));
}
#endif

// sc[s] <- (q . k_s) * scale over the slots of `spans`; returns their max. Keys of 16 slots are
// scored together: fp16, or codes c with q . k = sum_g scale_g (q_g . c_g) + min_g sum(q_g) over
// the key's groups g, so the inner loop multiplies codes.
template <int BITS>
static float key_scores(const float* q, const KVHead& h, const Span* spans, int n_spans, float scale, float* sc) {
    const int D = h.D, G = kv_groups(D), gw = kv_group(D);
    float qsum[TF_MAX_HEAD_DIM / 16] = {0};  // [G] sum(q_g)
    for (int d = 0; d < D; d++) qsum[d / gw] += q[d];
    const size_t block = (size_t)D * 16 * BITS / 8;  // bytes of 16 slots' keys
#if TF_AVX512
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int t = 0; t < n_spans; t++) {
        const Span sp = spans[t];
        for (int b = sp.begin / 16; 16 * b < sp.end; b++) {
            const uint8_t* kblk = h.k + b * block;
            __m512 sv = _mm512_setzero_ps();
            if (BITS == 16) {
                const uint16_t* kh = (const uint16_t*)kblk;
                __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
                for (int d = 0; d < D; d += 2) {
                    s0 = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), ld16h(kh + (size_t)d * 16), s0);
                    s1 = _mm512_fmadd_ps(_mm512_set1_ps(q[d + 1]), ld16h(kh + (size_t)(d + 1) * 16), s1);
                }
                sv = _mm512_add_ps(s0, s1);
            } else {
                const uint16_t* par = h.kp + (size_t)b * G * 32;
                for (int g = 0; g < G; g++) {
                    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
                    for (int d = g * gw; d < std::min(D, (g + 1) * gw); d += 2) {
                        __m512 c0, c1;
                        if (BITS == 8) {
                            c0 = u8_to_ps(_mm_loadu_si128((const __m128i*)(kblk + (size_t)d * 16)));
                            c1 = u8_to_ps(_mm_loadu_si128((const __m128i*)(kblk + (size_t)(d + 1) * 16)));
                        } else {  // dims d (low nibble) and d + 1 (high) of 16 slots
                            const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(kblk + (size_t)d * 8)));
                            c0 = _mm512_cvtepi32_ps(_mm512_and_si512(x, _mm512_set1_epi32(15)));
                            c1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(x, 4));
                        }
                        s0 = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), c0, s0);
                        s1 = _mm512_fmadd_ps(_mm512_set1_ps(q[d + 1]), c1, s1);
                    }
                    sv = _mm512_fmadd_ps(ld16h(par + g * 32), _mm512_add_ps(s0, s1), sv);
                    sv = _mm512_fmadd_ps(ld16h(par + g * 32 + 16), _mm512_set1_ps(qsum[g]), sv);
                }
            }
            sv = _mm512_mul_ps(sv, _mm512_set1_ps(scale));
            const unsigned lo = std::max(sp.begin - 16 * b, 0), hi = std::min(sp.end - 16 * b, 16);
            const __mmask16 m = (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));  // this span's slots of the block
            _mm512_mask_storeu_ps(sc + 16 * b, m, sv);
            vmax = _mm512_mask_max_ps(vmax, m, vmax, sv);
        }
    }
    return _mm512_reduce_max_ps(vmax);
#else
    float mx = -INFINITY;
    for (int t = 0; t < n_spans; t++)
        for (int j = spans[t].begin; j < spans[t].end; j++) {
            const uint8_t* kblk = h.k + (j / 16) * block;
            const int lane = j % 16;
            float s = 0.f;
            if (BITS == 16) {
                for (int d = 0; d < D; d++) s += q[d] * f16_to_f32(((const uint16_t*)kblk)[(size_t)d * 16 + lane]);
            } else {
                const uint16_t* par = h.kp + (size_t)(j / 16) * G * 32 + lane;
                for (int g = 0; g < G; g++) {
                    float a = 0.f;
                    for (int d = g * gw; d < std::min(D, (g + 1) * gw); d++) {
                        const int c = BITS == 8 ? kblk[(size_t)d * 16 + lane] : (kblk[(size_t)(d / 2) * 16 + lane] >> (4 * (d & 1))) & 15;
                        a += q[d] * (float)c;
                    }
                    s += f16_to_f32(par[g * 32]) * a + f16_to_f32(par[g * 32 + 16]) * qsum[g];
                }
            }
            sc[j] = s * scale;
            mx = std::max(mx, sc[j]);
        }
    return mx;
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
    for (int t = 0; t < n_spans; t++)
        for (int j = spans[t].begin; j < spans[t].end; j++) {
            sc[j] = expf(sc[j] - mx);
            sum += sc[j];
        }
    return 1.f / sum;
#endif
}

#if TF_AVX512
// out[16 c0 .. 16 (c0 + NC)) <- inv * sum_s p_s v_s for fp16 values, NC chunks of 16 dims in one pass
// over the slots, the accumulators in registers (NC a constant: the loop over c unrolls)
template <int NC>
static inline void values_f16_pass(const KVHead& h, const Span* spans, int n_spans, const float* sc, float inv, int c0,
                                   float* out) {
    const uint16_t* vb = (const uint16_t*)h.v + 16 * c0;
    __m512 o[NC];
    for (int c = 0; c < NC; c++) o[c] = _mm512_setzero_ps();
    for (int t = 0; t < n_spans; t++)
        for (int j = spans[t].begin; j < spans[t].end; j++) {
            const __m512 p = _mm512_set1_ps(sc[j]);
            for (int c = 0; c < NC; c++) o[c] = _mm512_fmadd_ps(p, ld16h(vb + (size_t)j * h.D + 16 * c), o[c]);
        }
    for (int c = 0; c < NC; c++) _mm512_storeu_ps(out + 16 * (c0 + c), _mm512_mul_ps(o[c], _mm512_set1_ps(inv)));
}
#endif

// out [D] <- inv * sum_s p_s v_s over the slots of `spans` (p_s = sc[s]), fp16 values
static void values_f16(const KVHead& h, const Span* spans, int n_spans, const float* sc, float inv, float* out) {
    const int D = h.D;
    const uint16_t* vb = (const uint16_t*)h.v;
#if TF_AVX512
    if (D == 64) {  // two positions per step, each into its own 4 x 16 accumulators
        __m512 o[8];
        for (int t = 0; t < 8; t++) o[t] = _mm512_setzero_ps();
        for (int t = 0; t < n_spans; t++) {
            int j = spans[t].begin;
            for (; j + 2 <= spans[t].end; j += 2) {
                const __m512 w0 = _mm512_set1_ps(sc[j]), w1 = _mm512_set1_ps(sc[j + 1]);
                const uint16_t* v0 = vb + (size_t)j * 64;
                for (int u = 0; u < 4; u++) {
                    o[u] = _mm512_fmadd_ps(w0, ld16h(v0 + 16 * u), o[u]);
                    o[4 + u] = _mm512_fmadd_ps(w1, ld16h(v0 + 64 + 16 * u), o[4 + u]);
                }
            }
            for (; j < spans[t].end; j++)
                for (int u = 0; u < 4; u++) o[u] = _mm512_fmadd_ps(_mm512_set1_ps(sc[j]), ld16h(vb + (size_t)j * 64 + 16 * u), o[u]);
        }
        for (int u = 0; u < 4; u++) _mm512_storeu_ps(out + 16 * u, _mm512_mul_ps(_mm512_add_ps(o[u], o[4 + u]), _mm512_set1_ps(inv)));
        return;
    }
    if (D % 128 == 0) {  // 128 dims per pass (head_dim 128, 256, ...)
        for (int c0 = 0; c0 < D / 16; c0 += 8) values_f16_pass<8>(h, spans, n_spans, sc, inv, c0, out);
        return;
    }
    for (int d0 = 0; d0 < D; d0 += 16) {  // 16 dims per pass
        const __mmask16 mk = (__mmask16)(D - d0 >= 16 ? 0xffff : (1u << (D - d0)) - 1);
        __m512 o = _mm512_setzero_ps();
        for (int t = 0; t < n_spans; t++)
            for (int j = spans[t].begin; j < spans[t].end; j++)
                o = _mm512_fmadd_ps(_mm512_set1_ps(sc[j]), _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, vb + (size_t)j * D + d0)), o);
        _mm512_mask_storeu_ps(out + d0, mk, _mm512_mul_ps(o, _mm512_set1_ps(inv)));
    }
#else
    for (int d = 0; d < D; d++) out[d] = 0.f;
    for (int t = 0; t < n_spans; t++)
        for (int j = spans[t].begin; j < spans[t].end; j++)
            for (int d = 0; d < D; d++) out[d] += sc[j] * f16_to_f32(vb[(size_t)j * D + d]);
    for (int d = 0; d < D; d++) out[d] *= inv;
#endif
}

#if TF_AVX512
// out[16 c0 .. 16 (c0 + NC)) of values_q: NC chunks of 16 dims (c0 a multiple of 8, so a pair of
// chunks c0 + c, c0 + c + 1 with c even is 32 dims, and an odd NC ends at D's last 16 dims), one pass
// over the slots with the NC accumulators in registers (NC a constant: the loops over c unroll).
template <int BITS, int NC>
static inline void values_pass(const KVHead& h, const Span* spans, int n_spans, const float* ws, const float* ms,
                               float inv, int c0, float* out) {
    const int G = kv_groups(h.D), gw = kv_group(h.D);
    const size_t row = (size_t)h.D * BITS / 8;
    int widx[NC];  // chunk c's scale among one slot's ws
    __m512 o[NC];
    for (int c = 0; c < NC; c++) widx[c] = 2 * ((c0 + c) * 16 / gw), o[c] = _mm512_setzero_ps();
    for (int t = 0; t < n_spans; t++)
        for (int j = spans[t].begin; j < spans[t].end; j++) {
            const uint8_t* vr = h.v + (size_t)j * row;
            const float* w = ws + (size_t)j * G * 2;
            for (int c = 0; c < NC; c += 2) {
                __m512 x0, x1 = _mm512_setzero_ps();
                if (BITS == 8) {
                    x0 = u8_to_ps(_mm_loadu_si128((const __m128i*)(vr + 16 * (c0 + c))));
                    if (c + 1 < NC) x1 = u8_to_ps(_mm_loadu_si128((const __m128i*)(vr + 16 * (c0 + c + 1))));
                } else if (c + 1 < NC) {
                    value_codes_32(vr, c0 + c, x0, x1);
                } else {
                    x0 = value_codes_16(vr, c0 + c);
                }
                o[c] = _mm512_fmadd_ps(_mm512_set1_ps(w[widx[c]]), x0, o[c]);
                if (c + 1 < NC) o[c + 1] = _mm512_fmadd_ps(_mm512_set1_ps(w[widx[c + 1]]), x1, o[c + 1]);
            }
        }
    for (int c = 0; c < NC; c++)
        _mm512_storeu_ps(out + 16 * (c0 + c), _mm512_mul_ps(_mm512_add_ps(o[c], _mm512_set1_ps(ms[widx[c] + 1])), _mm512_set1_ps(inv)));
}
#endif

// out [D] <- inv * sum_s p_s v_s for value codes: per group g, sum_s (p_s scale_sg) c_s + sum_s p_s min_sg.
// ws [slots, groups, 2] scratch.
template <int BITS>
static void values_q(const KVHead& h, const Span* spans, int n_spans, const float* sc, float inv, float* ws, float* out) {
    const int D = h.D, G = kv_groups(D);
#if TF_AVX512
    // First ws[s] <- p_s (scale, min) of every group and msum <- their sum over the slots; then the
    // codes times broadcast weights, one pass over the slots per 128 dims (values_pass).
    const int per = 2 * G;  // ws floats per slot
    __m512 msum[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};  // lane k: ws[.][k % per] summed (per > 16: k, 16 + k)
    for (int t = 0; t < n_spans; t++) {
        int j = spans[t].begin;
        if (16 % per == 0) {  // 16 / per slots per vector: (scale, min) of each times its p_s, lane l of slot l / per
            const __m512i slot = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                   __builtin_ctz(per));
            const __mmask16 pm = (__mmask16)((1u << (16 / per)) - 1);
            for (; j + 16 / per <= spans[t].end; j += 16 / per) {
                const __m512 p = _mm512_permutexvar_ps(slot, _mm512_maskz_loadu_ps(pm, sc + j));
                const __m512 w = _mm512_mul_ps(p, ld16h(h.vp + (size_t)j * per));
                _mm512_storeu_ps(ws + (size_t)j * per, w);
                msum[0] = _mm512_add_ps(msum[0], w);
            }
        }
        for (; j < spans[t].end; j++) {  // one slot at a time
            const __m512 p = _mm512_set1_ps(sc[j]);
            for (int i = 0; i < per; i += 16) {
                const __mmask16 m = (__mmask16)((1u << std::min(16, per - i)) - 1);
                const __m512 w = _mm512_mul_ps(p, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, h.vp + (size_t)j * per + i)));
                _mm512_mask_storeu_ps(ws + (size_t)j * per + i, m, w);
                msum[i / 16] = _mm512_add_ps(msum[i / 16], w);
            }
        }
    }
    alignas(64) float ms[32];  // [G, 2] sum_s p_s (scale, min)
    _mm512_store_ps(ms, msum[0]);
    _mm512_store_ps(ms + 16, msum[1]);
    if (per < 16)
        for (int l = per; l < 16; l++) ms[l % per] += ms[l];
    for (int c0 = 0; c0 < D / 16; c0 += 8) {
        switch (std::min(8, D / 16 - c0)) {
            case 1: values_pass<BITS, 1>(h, spans, n_spans, ws, ms, inv, c0, out); break;
            case 2: values_pass<BITS, 2>(h, spans, n_spans, ws, ms, inv, c0, out); break;
            case 3: values_pass<BITS, 3>(h, spans, n_spans, ws, ms, inv, c0, out); break;
            case 4: values_pass<BITS, 4>(h, spans, n_spans, ws, ms, inv, c0, out); break;
            case 5: values_pass<BITS, 5>(h, spans, n_spans, ws, ms, inv, c0, out); break;
            case 6: values_pass<BITS, 6>(h, spans, n_spans, ws, ms, inv, c0, out); break;
            case 7: values_pass<BITS, 7>(h, spans, n_spans, ws, ms, inv, c0, out); break;
            default: values_pass<BITS, 8>(h, spans, n_spans, ws, ms, inv, c0, out); break;
        }
    }
#else
    (void)ws;
    const int gw = kv_group(D);
    const size_t row = (size_t)D * BITS / 8;
    float msum[TF_MAX_HEAD_DIM / 16] = {0};  // [G] sum_s p_s min_sg
    for (int d = 0; d < D; d++) out[d] = 0.f;
    for (int t = 0; t < n_spans; t++)
        for (int j = spans[t].begin; j < spans[t].end; j++) {
            const uint8_t* vr = h.v + (size_t)j * row;
            const uint16_t* par = h.vp + (size_t)j * G * 2;
            for (int g = 0; g < G; g++) {
                const float w = sc[j] * f16_to_f32(par[2 * g]);
                msum[g] += sc[j] * f16_to_f32(par[2 * g + 1]);
                for (int d = g * gw; d < std::min(D, (g + 1) * gw); d++) {
                    const int half = std::min(32, D - d / 32 * 32) / 2;  // 16, or 8 in a last 16 dims
                    const int c = BITS == 8 ? vr[d] : (vr[d / 32 * 16 + d % 32 % half] >> (4 * (d % 32 >= half))) & 15;
                    out[d] += w * (float)c;
                }
            }
        }
    for (int d = 0; d < D; d++) out[d] = (out[d] + msum[d / gw]) * inv;
#endif
}

// out [D] = softmax(q . k_s * scale) . v_s over the slots s of `spans` (disjoint) of one KV head's
// cache h; sc [kv_scratch(h.slots, D)] scratch: the scores, indexed by slot, then (bits 8, 4) ws.
static void attend(const float* q, const KVHead& h, const Span* spans, int n_spans, float scale, float* sc, float* out) {
    const float mx = h.bits == 16 ? key_scores<16>(q, h, spans, n_spans, scale, sc)
                     : h.bits == 8 ? key_scores<8>(q, h, spans, n_spans, scale, sc)
                                   : key_scores<4>(q, h, spans, n_spans, scale, sc);
    const float inv = softmax_weights(spans, n_spans, mx, sc);
    if (h.bits == 16) values_f16(h, spans, n_spans, sc, inv, out);
    else if (h.bits == 8) values_q<8>(h, spans, n_spans, sc, inv, sc + h.slots, out);
    else values_q<4>(h, spans, n_spans, sc, inv, sc + h.slots, out);
}
