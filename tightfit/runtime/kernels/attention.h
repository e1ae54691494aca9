// Attention: RoPE, the fp16 KV cache (a ring for sliding-window layers), and one query's softmax
// attention over the positions it sees.
// Part of the one translation unit engine.cpp.
#pragma once

#include "common.h"

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

// Slots [begin, end) of a KV head's cache that one query attends to.
struct Span {
    int begin, end;
};

// The KV cache of all layers in fp16 (f32_to_f16: round to nearest even). Layer L has slots[L]
// slots (a multiple of 16) and keeps position p in slot p % slots[L]: max_pos rounded up for a
// full-attention layer, so nothing wraps; for a sliding window W a ring of W + max_batch - 1
// rounded up, the least that lets a call's first query still see its W positions after the call
// stored all its keys, so long generations do not pay full-context memory for these layers.
// Keys are stored in blocks of 16 slots, [KVH, slots/16, D, 16], so that attend reads component d
// of 16 positions as one vector; values slot by slot, [KVH, slots, D].
struct KVCache {
    std::vector<uint16_t> k, v;
    std::vector<size_t> base;                 // [L] where layer L starts in k and v
    std::vector<int> slots, window;           // [L]
    std::vector<std::vector<int32_t>> held;   // [L][slots] the position each slot of a ring holds (-1: none)
    int kv_heads = 0, D = 0, max_pos = 0, max_slots = 0;

    void allocate(const tf_config& c) {
        kv_heads = c.n_kv_heads;
        D = c.head_dim;
        max_pos = c.max_pos;
        const int full = (c.max_pos + 15) / 16 * 16;
        size_t at = 0;
        for (int L = 0; L < c.n_layers; L++) {
            const int w = c.layers[L].window, ring = (w + c.max_batch - 1 + 15) / 16 * 16;
            const int n = w > 0 && ring < c.max_pos ? ring : full;
            slots.push_back(n);
            window.push_back(w);
            held.emplace_back(n < c.max_pos ? n : 0, -1);
            base.push_back(at);
            at += (size_t)kv_heads * n * D;
            max_slots = std::max(max_slots, n);
        }
        k.assign(at, 0);
        v.assign(at, 0);
    }
    size_t bytes() const { return (k.size() + v.size()) * sizeof(uint16_t); }
    // KV head kh of layer L: its keys [slots/16, D, 16] and values [slots, D]
    uint16_t* keys(int L, int kh) { return k.data() + base[L] + (size_t)kh * slots[L] * D; }
    uint16_t* values(int L, int kh) { return v.data() + base[L] + (size_t)kh * slots[L] * D; }
    // position ps of KV head kh in layer L <- key [D] (already rotated), value [D]
    void store(int L, int kh, int ps, const float* key, const float* value) {
        const int s = ps % slots[L];
        uint16_t* kblk = keys(L, kh) + (size_t)(s / 16) * D * 16 + s % 16;
        for (int d = 0; d < D; d++) kblk[(size_t)d * 16] = f32_to_f16(key[d]);
        uint16_t* vdst = values(L, kh) + (size_t)s * D;
        for (int d = 0; d < D; d++) vdst[d] = f32_to_f16(value[d]);
    }
    // the slots a query at position ps of layer L attends to: one span, two where its window wraps the ring
    int spans(int L, int ps, Span out[2]) const {
        const int lo = window[L] > 0 ? std::max(0, ps - window[L] + 1) : 0, n = ps - lo + 1, s0 = lo % slots[L];
        out[0] = {s0, std::min(slots[L], s0 + n)};
        if (s0 + n <= slots[L]) return 1;
        out[1] = {0, s0 + n - slots[L]};
        return 2;
    }
    // Whether every ring still holds the positions a call at `pos` reads from before it (a truncation
    // may have gone back further than a ring remembers); then the ring slots of pos .. pos+M-1 are theirs.
    bool claim(int pos, int M) {
        for (size_t L = 0; L < held.size(); L++) {
            if (held[L].empty() || pos == 0) continue;
            for (int p = std::max(0, pos - window[L] + 1); p < pos; p++)
                if (held[L][p % slots[L]] != p) return false;
        }
        for (auto& h : held)
            for (int p = pos; p < pos + M && !h.empty(); p++) h[p % (int)h.size()] = p;
        return true;
    }
};

// out [D] = softmax(q . k_s * scale) . v_s over the slots s of `spans` (disjoint) of one KV head's
// cache: fp16 keys in blocks of 16 slots [slots/16, D, 16], fp16 values [slots, D]; sc [slots]
// scratch for the scores, indexed by slot.
#if TF_AVX512
static inline __m512 ld16h(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
#endif
static void attend(const float* q, const uint16_t* kb, const uint16_t* vb, const Span* spans, int n_spans, int D,
                   float scale, float* sc, float* out) {
#if TF_AVX512
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int t = 0; t < n_spans; t++) {
        const Span sp = spans[t];
        for (int b = sp.begin / 16; 16 * b < sp.end; b++) {
            const uint16_t* kblk = kb + (size_t)b * D * 16;
            __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
            for (int d = 0; d < D; d += 2) {
                s0 = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), ld16h(kblk + (size_t)d * 16), s0);
                s1 = _mm512_fmadd_ps(_mm512_set1_ps(q[d + 1]), ld16h(kblk + (size_t)(d + 1) * 16), s1);
            }
            const __m512 sv = _mm512_mul_ps(_mm512_add_ps(s0, s1), _mm512_set1_ps(scale));
            const unsigned lo = std::max(sp.begin - 16 * b, 0), hi = std::min(sp.end - 16 * b, 16);
            const __mmask16 m = (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));  // this span's slots of the block
            _mm512_mask_storeu_ps(sc + 16 * b, m, sv);
            vmax = _mm512_mask_max_ps(vmax, m, vmax, sv);
        }
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int t = 0; t < n_spans; t++)
        for (int j = spans[t].begin; j < spans[t].end; j += 16) {
            const __mmask16 m = (__mmask16)((1u << std::min(16, spans[t].end - j)) - 1);
            const __m512 p = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + j), mx));
            _mm512_mask_storeu_ps(sc + j, m, p);
            vsum = _mm512_mask_add_ps(vsum, m, vsum, p);
        }
    const float inv = 1.f / _mm512_reduce_add_ps(vsum);
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
    for (int d0 = 0; d0 < D; d0 += 16) {
        const __mmask16 mk = (__mmask16)(D - d0 >= 16 ? 0xffff : (1u << (D - d0)) - 1);
        __m512 o = _mm512_setzero_ps();
        for (int t = 0; t < n_spans; t++)
            for (int j = spans[t].begin; j < spans[t].end; j++)
                o = _mm512_fmadd_ps(_mm512_set1_ps(sc[j]), _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, vb + (size_t)j * D + d0)), o);
        _mm512_mask_storeu_ps(out + d0, mk, _mm512_mul_ps(o, _mm512_set1_ps(inv)));
    }
#else
    float mx = -INFINITY;
    for (int t = 0; t < n_spans; t++)
        for (int j = spans[t].begin; j < spans[t].end; j++) {
            const uint16_t* kblk = kb + (size_t)(j / 16) * D * 16 + j % 16;
            float s = 0.f;
            for (int d = 0; d < D; d++) s += q[d] * f16_to_f32(kblk[(size_t)d * 16]);
            sc[j] = s * scale;
            mx = std::max(mx, sc[j]);
        }
    float sum = 0.f;
    for (int d = 0; d < D; d++) out[d] = 0.f;
    for (int t = 0; t < n_spans; t++)
        for (int j = spans[t].begin; j < spans[t].end; j++) {
            sc[j] = expf(sc[j] - mx);
            sum += sc[j];
            for (int d = 0; d < D; d++) out[d] += sc[j] * f16_to_f32(vb[(size_t)j * D + d]);
        }
    for (int d = 0; d < D; d++) out[d] /= sum;
#endif
}
