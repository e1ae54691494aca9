// The value half of attention: how attention reads one KV head's cache (KVHead, the code decoders),
// and the softmax-weighted sum of its values for a group of R query heads that share it, each value
// read and decoded once for all R (grouped-query attention).
// Part of the one translation unit engine.cpp.
#pragma once

#include <type_traits>

#include "attention_avx2.h"
#include "common.h"
#include "kv_cache.h"

// Most query heads that attend together: each keeps its accumulators in registers.
#define TF_MAX_GROUP 8

// One KV head of one layer as attention reads it (KVCache's layout for `bits`).
struct KVHead {
    const uint8_t* k;    // keys: fp16 or codes, in blocks of 16 slots
    const uint8_t* v;    // values: fp16 or codes, slot by slot
    const uint16_t* kp;  // (scale, min) of the keys: [slots/16, groups, 2, 16] (bits 8), [slots/16, 2, D] (bits 4)
    const uint16_t* vp;  // (scale, min) of the values [slots, groups, 2] (bits 8, 4)
    int bits, D, slots;
};

// Slots a step of a value pass takes: two, into separate accumulators, where NC * R accumulators
// alone would leave the FMA latency exposed.
template <int NC, int R>
constexpr int slots_per_step() { return NC * R <= 8 ? 2 : 1; }

// Widest value pass (16-dim chunks) for R queries: NC * R accumulators stay within the registers.
template <int R>
constexpr int widest_pass() { return R == 1 ? 8 : R <= 4 ? 4 : 2; }

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

// Runs pass(nc-chunk pass template) over D/16 chunks: the widest pass NCW while it fits, then 4, 2, 1.
// `pass` is called as pass(std::integral_constant<int, NC>{}, c0).
template <int NCW, class Pass>
static inline void over_chunks(int D, Pass pass) {
    const int chunks = D / 16;
    int c0 = 0;
    for (; c0 + NCW <= chunks; c0 += NCW) pass(std::integral_constant<int, NCW>{}, c0);
    if (NCW > 4 && c0 + 4 <= chunks) pass(std::integral_constant<int, 4>{}, c0), c0 += 4;
    if (NCW > 2 && c0 + 2 <= chunks) pass(std::integral_constant<int, 2>{}, c0), c0 += 2;
    if (c0 < chunks) pass(std::integral_constant<int, 1>{}, c0);
}

// slot(j, u) for every slot j of `spans`: U at a time into accumulator sets u = 0 .. U - 1, the
// slots left over into set 0
template <int U, class Slot>
static inline void each_slot(const Span* spans, int n_spans, Slot& slot) {
    for (int t = 0; t < n_spans; t++) {
        int j = spans[t].begin;
        for (; j + U <= spans[t].end; j += U)
            for (int u = 0; u < U; u++) slot(j + u, u);
        for (; j < spans[t].end; j++) slot(j, 0);
    }
}

// out_r[16 c0 .. 16 (c0 + NC)) <- inv_r * sum_s p_rs v_s for fp16 values (D a multiple of 16), R
// queries (p_rs = sc[r * slots + s]), one pass over the slots, the accumulators in registers
template <int NC, int R>
static inline void values_f16_pass(const KVHead& h, const Span* spans, int n_spans, const float* sc, const float* inv,
                                   int c0, float* out) {
    constexpr int U = slots_per_step<NC, R>();
    const uint16_t* vb = (const uint16_t*)h.v + 16 * c0;
    __m512 o[U][R][NC];
    for (int u = 0; u < U; u++)
        for (int r = 0; r < R; r++)
            for (int c = 0; c < NC; c++) o[u][r][c] = _mm512_setzero_ps();
    auto slot = [&](int j, int u) {
        for (int c = 0; c < NC; c++) {
            const __m512 x = ld16h(vb + (size_t)j * h.D + 16 * c);
            for (int r = 0; r < R; r++) o[u][r][c] = _mm512_fmadd_ps(_mm512_set1_ps(sc[(size_t)r * h.slots + j]), x, o[u][r][c]);
        }
    };
    each_slot<U>(spans, n_spans, slot);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NC; c++) {
            const __m512 a = U == 2 ? _mm512_add_ps(o[0][r][c], o[U - 1][r][c]) : o[0][r][c];
            _mm512_storeu_ps(out + (size_t)r * h.D + 16 * (c0 + c), _mm512_mul_ps(a, _mm512_set1_ps(inv[r])));
        }
}
#endif

// out [R, D] <- inv_r * sum_s p_rs v_s over the slots of `spans` (p_rs = sc[r * slots + s]), fp16 values
template <int R>
static void values_f16(const KVHead& h, const Span* spans, int n_spans, const float* sc, const float* inv, float* out) {
    const int D = h.D;
    const uint16_t* vb = (const uint16_t*)h.v;
#if TF_AVX512
    if (D % 16 == 0) {
        over_chunks<widest_pass<R>()>(D, [&](auto nc, int c0) { values_f16_pass<decltype(nc)::value, R>(h, spans, n_spans, sc, inv, c0, out); });
        return;
    }
    for (int d0 = 0; d0 < D; d0 += 16) {  // 16 dims per pass, the last one masked
        const __mmask16 mk = (__mmask16)(D - d0 >= 16 ? 0xffff : (1u << (D - d0)) - 1);
        __m512 o[R];
        for (int r = 0; r < R; r++) o[r] = _mm512_setzero_ps();
        for (int t = 0; t < n_spans; t++)
            for (int j = spans[t].begin; j < spans[t].end; j++) {
                const __m512 x = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, vb + (size_t)j * D + d0));
                for (int r = 0; r < R; r++) o[r] = _mm512_fmadd_ps(_mm512_set1_ps(sc[(size_t)r * h.slots + j]), x, o[r]);
            }
        for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(out + (size_t)r * D + d0, mk, _mm512_mul_ps(o[r], _mm512_set1_ps(inv[r])));
    }
#else
#if TF_AVX2
    if (D % 8 == 0) return avx2_values16<R>(vb, D, h.slots, spans, n_spans, sc, inv, out);
#endif
    for (int r = 0; r < R; r++) {
        float* o = out + (size_t)r * D;
        const float* p = sc + (size_t)r * h.slots;
        for (int d = 0; d < D; d++) o[d] = 0.f;
        for (int t = 0; t < n_spans; t++)
            for (int j = spans[t].begin; j < spans[t].end; j++)
                for (int d = 0; d < D; d++) o[d] += p[j] * f16_to_f32(vb[(size_t)j * D + d]);
        for (int d = 0; d < D; d++) o[d] *= inv[r];
    }
#endif
}

#if TF_AVX512
// The value (scale, min) of every group of the slots of `spans`, for all R queries at once:
// sm[s] <- (scale, min) of slot s as floats [slots, groups, 2] (R = 1: p_s (scale, min), the one
// query's weights), and ms[r] [32] <- sum_s p_rs (scale, min) (lane k: sm[.][k] weighted by p_rs and
// summed; only the min lanes are used).
template <int R>
static void value_params(const KVHead& h, const Span* spans, int n_spans, const float* sc, float* sm, float* ms) {
    const int per = 2 * kv_groups(h.D);  // floats per slot
    __m512 msum[R][2];                     // lane k: k (and 16 + k where per > 16)
    for (int r = 0; r < R; r++) msum[r][0] = msum[r][1] = _mm512_setzero_ps();
    for (int t = 0; t < n_spans; t++)
        for (int j = spans[t].begin; j < spans[t].end; j++)
            for (int v = 0; v < 2 && 16 * v < per; v++) {  // v a constant once unrolled: msum stays in registers
                const __mmask16 m = (__mmask16)((1u << std::min(16, per - 16 * v)) - 1);
                const __m512 x = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, h.vp + (size_t)j * per + 16 * v));
                if (R == 1) {  // one query: its weights p_s (scale, min) themselves, so its pass multiplies nothing more
                    const __m512 w = _mm512_mul_ps(_mm512_set1_ps(sc[j]), x);
                    _mm512_mask_storeu_ps(sm + (size_t)j * per + 16 * v, m, w);
                    msum[0][v] = _mm512_add_ps(msum[0][v], w);
                    continue;
                }
                _mm512_mask_storeu_ps(sm + (size_t)j * per + 16 * v, m, x);
                for (int r = 0; r < R; r++) msum[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(sc[(size_t)r * h.slots + j]), x, msum[r][v]);
            }
    for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(ms + 32 * r, msum[r][0]);
        _mm512_storeu_ps(ms + 32 * r + 16, msum[r][1]);
    }
}

// out_r[16 c0 .. 16 (c0 + NC)) of values_q for R queries: NC chunks of 16 dims (c0 even, so a pair of
// chunks c0 + c, c0 + c + 1 with c even is 32 dims, one group, and an odd NC ends at D's last 16
// dims), one pass over the slots: each slot's codes decoded and scaled (scale_sg c_s) once, then
// weighted by every query's p_rs. sm, ms: value_params.
template <int BITS, int NC, int R>
static inline void values_pass(const KVHead& h, const Span* spans, int n_spans, const float* sc, const float* sm,
                               const float* ms, const float* inv, int c0, float* out) {
    constexpr int U = slots_per_step<NC, R>();
    const int gw = kv_group(h.D), per = 2 * kv_groups(h.D);
    const size_t row = (size_t)h.D * BITS / 8;
    int sidx[NC];  // chunk c's scale among one slot's (scale, min) floats
    __m512 o[U][R][NC];
    for (int c = 0; c < NC; c++) sidx[c] = 2 * ((c0 + c) * 16 / gw);
    for (int u = 0; u < U; u++)
        for (int r = 0; r < R; r++)
            for (int c = 0; c < NC; c++) o[u][r][c] = _mm512_setzero_ps();
    auto slot = [&](int j, int u) {
        const uint8_t* vr = h.v + (size_t)j * row;
        __m512 p[R];
        for (int r = 0; r < R; r++) p[r] = _mm512_set1_ps(sc[(size_t)r * h.slots + j]);
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
            const __m512 s = _mm512_set1_ps(sm[(size_t)j * per + sidx[c]]);  // chunks c, c + 1 share a group
            if (R == 1) {  // one query: sm holds its weights p_s scale_sg (value_params)
                p[0] = s;
            } else {
                x0 = _mm512_mul_ps(x0, s);
                x1 = _mm512_mul_ps(x1, s);
            }
            for (int r = 0; r < R; r++) {
                o[u][r][c] = _mm512_fmadd_ps(p[r], x0, o[u][r][c]);
                if (c + 1 < NC) o[u][r][c + 1] = _mm512_fmadd_ps(p[r], x1, o[u][r][c + 1]);
            }
        }
    };
    each_slot<U>(spans, n_spans, slot);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NC; c++) {
            const __m512 a = U == 2 ? _mm512_add_ps(o[0][r][c], o[U - 1][r][c]) : o[0][r][c];
            const __m512 m = _mm512_set1_ps(ms[r * 32 + sidx[c] + 1]);
            _mm512_storeu_ps(out + (size_t)r * h.D + 16 * (c0 + c), _mm512_mul_ps(_mm512_add_ps(a, m), _mm512_set1_ps(inv[r])));
        }
}
#endif

// out [R, D] <- inv_r * sum_s p_rs v_s for value codes: per group g, sum_s p_rs (scale_sg c_s) + sum_s
// p_rs min_sg. sm [slots, groups, 2] scratch.
template <int BITS, int R>
static void values_q(const KVHead& h, const Span* spans, int n_spans, const float* sc, const float* inv, float* sm, float* out) {
    const int D = h.D, G = kv_groups(D);
#if TF_AVX512
    // First the slots' (scale, min) as floats and each query's weighted sum of the mins
    // (value_params); then passes of up to widest_pass<R>() chunks of 16 dims over the slots.
    alignas(64) float ms[R * 32];  // [R, 32] sum_s p_rs (scale, min)
    value_params<R>(h, spans, n_spans, sc, sm, ms);
    over_chunks<widest_pass<R>()>(D, [&](auto nc, int c0) { values_pass<BITS, decltype(nc)::value, R>(h, spans, n_spans, sc, sm, ms, inv, c0, out); });
#else
    (void)sm;
#if TF_AVX2
    if (D % 8 == 0) return avx2_values_q<BITS, R>(h.v, h.vp, D, h.slots, spans, n_spans, sc, inv, out);
#endif
    const int gw = kv_group(D);
    const size_t row = (size_t)D * BITS / 8;
    for (int r = 0; r < R; r++) {
        float* o = out + (size_t)r * D;
        const float* p = sc + (size_t)r * h.slots;
        float msum[TF_MAX_HEAD_DIM / 16] = {0};  // [G] sum_s p_s min_sg
        for (int d = 0; d < D; d++) o[d] = 0.f;
        for (int t = 0; t < n_spans; t++)
            for (int j = spans[t].begin; j < spans[t].end; j++) {
                const uint8_t* vr = h.v + (size_t)j * row;
                const uint16_t* par = h.vp + (size_t)j * G * 2;
                for (int g = 0; g < G; g++) {
                    const float w = p[j] * f16_to_f32(par[2 * g]);
                    msum[g] += p[j] * f16_to_f32(par[2 * g + 1]);
                    for (int d = g * gw; d < std::min(D, (g + 1) * gw); d++) {
                        const int half = std::min(32, D - d / 32 * 32) / 2;  // 16, or 8 in a last 16 dims
                        const int c = BITS == 8 ? vr[d] : (vr[d / 32 * 16 + d % 32 % half] >> (4 * (d % 32 >= half))) & 15;
                        o[d] += w * (float)c;
                    }
                }
            }
        for (int d = 0; d < D; d++) o[d] = (o[d] + msum[d / gw]) * inv[r];
    }
#endif
}
