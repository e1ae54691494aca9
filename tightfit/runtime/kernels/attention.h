// Attention: RoPE, the fp16 KV cache, and one query's causal softmax attention over it.
// Part of the one translation unit engine.cpp.
#pragma once

#include "common.h"

// Rotary position embedding of one head v [D] at one position: pairs (i, i + D/2) rotated by the
// position's angles, cos_/sin_ [D/2] (rows of tf_config's rope tables).
static void rope(float* v, const float* cos_, const float* sin_, int D) {
    const int d2 = D / 2;
    for (int i = 0; i < d2; i++) {
        float x1 = v[i], x2 = v[i + d2];
        v[i] = x1 * cos_[i] - x2 * sin_[i];
        v[i + d2] = x2 * cos_[i] + x1 * sin_[i];
    }
}

// The KV cache of all layers in fp16 (f32_to_f16: round to nearest even). Keys are stored in
// blocks of 16 positions, [L, KVH, pos_blocks, D, 16], so that attend reads component d of 16
// positions as one vector; values position by position, [L, KVH, max_pos16, D].
struct KVCache {
    std::vector<uint16_t> k, v;
    int kv_heads = 0, D = 0;
    int pos_blocks = 0, max_pos16 = 0;  // max_pos rounded up to whole blocks of 16

    void allocate(const tf_config& c) {
        kv_heads = c.n_kv_heads;
        D = c.head_dim;
        pos_blocks = (c.max_pos + 15) / 16;
        max_pos16 = pos_blocks * 16;
        k.assign((size_t)c.n_layers * c.n_kv_heads * max_pos16 * (size_t)c.head_dim, 0);
        v.assign(k.size(), 0);
    }
    // KV head kh of layer L: its keys [pos_blocks, D, 16] and values [max_pos16, D]
    uint16_t* keys(int L, int kh) { return k.data() + (size_t)L * kv_heads * max_pos16 * D + (size_t)kh * pos_blocks * D * 16; }
    uint16_t* values(int L, int kh) { return v.data() + (size_t)L * kv_heads * max_pos16 * D + (size_t)kh * max_pos16 * D; }
    // position ps of KV head kh in layer L <- key [D] (already rotated), value [D]
    void store(int L, int kh, int ps, const float* key, const float* value) {
        uint16_t* kblk = keys(L, kh) + (size_t)(ps / 16) * D * 16 + ps % 16;
        for (int d = 0; d < D; d++) kblk[(size_t)d * 16] = f32_to_f16(key[d]);
        uint16_t* vdst = values(L, kh) + (size_t)ps * D;
        for (int d = 0; d < D; d++) vdst[d] = f32_to_f16(value[d]);
    }
};

// out [D] = softmax(q . k_j * scale, j < n) . v_j over one KV head's cache: fp16 keys in blocks of
// 16 positions [ceil(n/16), D, 16], fp16 values [n, D]; sc [ceil(n/16)*16] scratch for the scores.
#if TF_AVX512
static inline __m512 ld16h(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
#endif
static void attend(const float* q, const uint16_t* kb, const uint16_t* vb, int n, int D, float scale, float* sc, float* out) {
#if TF_AVX512
    const int nb = (n + 15) / 16;
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int b = 0; b < nb; b++) {
        const uint16_t* kblk = kb + (size_t)b * D * 16;
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 2) {
            s0 = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), ld16h(kblk + (size_t)d * 16), s0);
            s1 = _mm512_fmadd_ps(_mm512_set1_ps(q[d + 1]), ld16h(kblk + (size_t)(d + 1) * 16), s1);
        }
        __m512 sv = _mm512_mul_ps(_mm512_add_ps(s0, s1), _mm512_set1_ps(scale));
        const int valid = std::min(16, n - 16 * b);
        sv = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), (__mmask16)((1u << valid) - 1), sv);
        _mm512_storeu_ps(sc + 16 * b, sv);
        vmax = _mm512_max_ps(vmax, sv);
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + 16 * b), mx));  // -inf -> 0
        _mm512_storeu_ps(sc + 16 * b, p);
        vsum = _mm512_add_ps(vsum, p);
    }
    const float inv = 1.f / _mm512_reduce_add_ps(vsum);
    if (D == 64) {  // two positions per step, each into its own 4 x 16 accumulators
        __m512 o[8];
        for (int t = 0; t < 8; t++) o[t] = _mm512_setzero_ps();
        int j = 0;
        for (; j + 2 <= n; j += 2) {
            const __m512 w0 = _mm512_set1_ps(sc[j]), w1 = _mm512_set1_ps(sc[j + 1]);
            const uint16_t* v0 = vb + (size_t)j * 64;
            for (int t = 0; t < 4; t++) {
                o[t] = _mm512_fmadd_ps(w0, ld16h(v0 + 16 * t), o[t]);
                o[4 + t] = _mm512_fmadd_ps(w1, ld16h(v0 + 64 + 16 * t), o[4 + t]);
            }
        }
        for (; j < n; j++)
            for (int t = 0; t < 4; t++) o[t] = _mm512_fmadd_ps(_mm512_set1_ps(sc[j]), ld16h(vb + (size_t)j * 64 + 16 * t), o[t]);
        for (int t = 0; t < 4; t++) _mm512_storeu_ps(out + 16 * t, _mm512_mul_ps(_mm512_add_ps(o[t], o[4 + t]), _mm512_set1_ps(inv)));
        return;
    }
    for (int d0 = 0; d0 < D; d0 += 16) {
        const __mmask16 mk = (__mmask16)(D - d0 >= 16 ? 0xffff : (1u << (D - d0)) - 1);
        __m512 o = _mm512_setzero_ps();
        for (int j = 0; j < n; j++)
            o = _mm512_fmadd_ps(_mm512_set1_ps(sc[j]), _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, vb + (size_t)j * D + d0)), o);
        _mm512_mask_storeu_ps(out + d0, mk, _mm512_mul_ps(o, _mm512_set1_ps(inv)));
    }
#else
    float mx = -INFINITY;
    for (int j = 0; j < n; j++) {
        const uint16_t* kblk = kb + (size_t)(j / 16) * D * 16 + j % 16;
        float s = 0.f;
        for (int d = 0; d < D; d++) s += q[d] * f16_to_f32(kblk[(size_t)d * 16]);
        sc[j] = s * scale;
        mx = std::max(mx, sc[j]);
    }
    float sum = 0.f;
    for (int j = 0; j < n; j++) { sc[j] = expf(sc[j] - mx); sum += sc[j]; }
    for (int d = 0; d < D; d++) out[d] = 0.f;
    for (int j = 0; j < n; j++)
        for (int d = 0; d < D; d++) out[d] += sc[j] * f16_to_f32(vb[(size_t)j * D + d]);
    for (int d = 0; d < D; d++) out[d] /= sum;
#endif
}
