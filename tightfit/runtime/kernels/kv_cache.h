// The KV cache of all layers: fp16, or asymmetric 8- or 4-bit codes (a ring for sliding-window
// layers), written when a position's key and value are stored.
// Part of the one translation unit engine.cpp.
#pragma once

#include "common.h"

// Quantized KV (bits 8 or 4, tf_config.kv_bits), asymmetric as KIVI's and QServe's: x ~ scale * c + min,
// c in [0, 2^bits - 1], min = min(x), scale = (max - min) / (2^bits - 1), both stored in fp16 (fp32
// would add as much again, and fp16's 11-bit mantissa is finer than any 8-bit grid step) and
// rounded before the codes are computed, so the codes fit the values read back.
// - Values (both widths) and 8-bit keys: every stored value or key [D] on its own (per token), in
//   groups along the head dimension of KV_GROUP dims (D when D < KV_GROUP; D is a multiple of 16,
//   so a last group of D % 32 = 16 dims is the only short one).
// - 4-bit keys: per channel (KIVI, arXiv 2402.02750): one (scale, min) per head dim over a
//   block of 16 positions. Keys have outlier channels that a per-token grid spends its 16 levels on;
//   bench/kv_error.py measured keys at 84 % of KV4's error, per-channel keys cutting KV4's KL 3.2x.
//   The block being filled is kept in fp32 (KVCache::stage) and re-quantized whole at every store, so
//   codes never compound rounding and attention reads codes only; in a call of several tokens a
//   block's grid includes its later positions of the same call (masked in attention).
#define KV_GROUP 32

static inline int kv_group(int D) { return D < KV_GROUP ? D : KV_GROUP; }
static inline int kv_groups(int D) { return (D + kv_group(D) - 1) / kv_group(D); }
// floats of scratch per query head attending over `slots` slots (attention.h, attend_scratch): its
// scores, and room for each slot's (scale, min) per group as floats
static inline size_t kv_scratch(int slots, int D) { return (size_t)slots * (1 + 2 * kv_groups(D)); }

// qsum[r][g] <- the sum of query r's dims in group g (q [R, D]): 8-bit keys' min term, min_g sum(q_g)
static void query_group_sums(const float* q, int R, int D, float (*qsum)[TF_MAX_HEAD_DIM / 16]) {
    const int gw = kv_group(D);
    for (int r = 0; r < R; r++)
        for (int g = 0; g < kv_groups(D); g++) {
            float a = 0.f;
            for (int d = g * gw; d < std::min(D, (g + 1) * gw); d++) a += q[r * D + d];
            qsum[r][g] = a;
        }
}

// x [n] -> codes [n] in [0, 2^bits - 1], *scale_h and *min_h (fp16) with x ~ scale * code + min
static void quantize_kv_group(const float* x, int n, int bits, uint8_t* codes, uint16_t* scale_h, uint16_t* min_h) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; i++) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]);
    const int top = (1 << bits) - 1;
    *min_h = f32_to_f16(lo);
    *scale_h = f32_to_f16((hi - lo) / top);
    const float m = f16_to_f32(*min_h), s = f16_to_f32(*scale_h), inv = s > 0.f ? 1.f / s : 0.f;
    for (int i = 0; i < n; i++) codes[i] = (uint8_t)std::min(std::max((int)lrintf((x[i] - m) * inv), 0), top);
}

// Slots [begin, end) of a KV head's cache that one query attends to.
struct Span {
    int begin, end;
};

// Layer L has slots[L] slots (a multiple of 16) and keeps position p in slot p % slots[L]: max_pos
// rounded up for a full-attention layer, so nothing wraps; for a sliding window W a ring of W +
// max_batch - 1 rounded up, the least that lets a call's first query still see its W positions
// after the call stored all its keys, so long generations do not pay full-context memory for these
// layers. With per-channel keys (bits 4) a ring has 15 slots more: storing position p re-quantizes
// all 16 slots of its block, whose slots not yet rewritten hold positions up to 16 floor(p/16) + 15 -
// slots <= p + 15 - slots; for the last p = pos + M - 1 of a call at pos that is before pos - W + 1,
// the first position the call reads, when slots >= W + M - 1 + 15: a block being refilled holds no
// position any query still sees. Per KV head, in blocks of 16 slots so that attention reads
// component d of 16 positions as one vector:
//   bits 16: keys fp16 [slots/16, D, 16]; values fp16 [slots, D]
//   bits 8:  key codes [slots/16, D, 16] bytes; value codes [slots, D] bytes;
//            key (scale, min) fp16 [slots/16, groups, 2, 16] (per slot and group)
//   bits 4:  key codes [slots/16, D/2, 16] bytes, dims 2i (low nibble) and 2i+1 (high) of a slot in
//            one byte; value codes [slots, D/2] bytes, per 32 dims 16 bytes: dim b low, dim b+16
//            high (a last 16 dims: 8 bytes, dim b low, b+8 high), so 16 bytes widen to 32 dims;
//            key (scale, min) fp16 [slots/16, 2, D] (per block and dim: D scales, then D mins)
//   bits 8, 4: value (scale, min) fp16 [slots, groups, 2]
struct KVCache {
    std::vector<uint8_t> k, v;                // codes, or fp16 keys and values (bits 16)
    std::vector<uint16_t> kp, vp;             // (scale, min) of the keys and values (bits 8, 4)
    std::vector<size_t> base, kpbase, vpbase; // [L] where layer L starts in k and v, in kp, in vp
    std::vector<int> slots, window;           // [L]
    std::vector<std::vector<int32_t>> held;   // [L][slots] the position each slot of a ring holds (-1: none)
    std::vector<float> stage;                 // bits 4: [L, kv_heads, D, 16] fp32 keys of the block each KV head stored into last
    std::vector<int> staged;                  // bits 4: [L, kv_heads] which block (position / 16) stage holds, -1 none
    int bits = 16, kv_heads = 0, D = 0, groups = 0, max_pos = 0, max_slots = 0;

    size_t row_bytes() const { return (size_t)D * bits / 8; }  // one slot's key (or value) codes
    // fp16 (scale, min) numbers per slot: keys per slot and group (bits 8) or per block and dim (bits 4), values per slot and group
    size_t key_row_params() const { return bits == 16 ? 0 : bits == 4 ? (size_t)D / 8 : (size_t)groups * 2; }
    size_t value_row_params() const { return bits == 16 ? 0 : (size_t)groups * 2; }

    void allocate(const tf_config& c) {
        bits = c.kv_bits;
        kv_heads = c.n_kv_heads;
        D = c.head_dim;
        groups = kv_groups(D);
        max_pos = c.max_pos;
        const int full = (c.max_pos + 15) / 16 * 16, refill = bits == 4 ? 15 : 0;  // refill: see the layout above
        size_t at = 0, kpat = 0, vpat = 0;
        for (int L = 0; L < c.n_layers; L++) {
            const int w = c.layers[L].window, ring = (w + c.max_batch - 1 + refill + 15) / 16 * 16;
            const int n = w > 0 && ring < c.max_pos ? ring : full;
            slots.push_back(n);
            window.push_back(w);
            held.emplace_back(n < c.max_pos ? n : 0, -1);
            base.push_back(at);
            kpbase.push_back(kpat);
            vpbase.push_back(vpat);
            at += (size_t)kv_heads * n * row_bytes();
            kpat += (size_t)kv_heads * n * key_row_params();
            vpat += (size_t)kv_heads * n * value_row_params();
            max_slots = std::max(max_slots, n);
        }
        k.assign(at, 0);
        v.assign(at, 0);
        kp.assign(kpat, 0);
        vp.assign(vpat, 0);
        if (bits == 4) {
            stage.assign((size_t)c.n_layers * kv_heads * D * 16, 0.f);
            staged.assign((size_t)c.n_layers * kv_heads, -1);
        }
    }
    // codes and scales (stage, 64 D bytes per layer and KV head at bits 4, is working memory, not counted)
    size_t bytes() const { return k.size() + v.size() + (kp.size() + vp.size()) * sizeof(uint16_t); }
    // bytes one position takes in every layer's cache: codes + scales of its keys and values
    size_t bytes_per_token() const {
        return slots.size() * kv_heads * (2 * row_bytes() + (key_row_params() + value_row_params()) * sizeof(uint16_t));
    }
    // KV head kh of layer L: its keys, values (layout above) and their (scale, min)
    uint8_t* keys(int L, int kh) { return k.data() + base[L] + (size_t)kh * slots[L] * row_bytes(); }
    uint8_t* values(int L, int kh) { return v.data() + base[L] + (size_t)kh * slots[L] * row_bytes(); }
    uint16_t* key_params(int L, int kh) { return kp.data() + kpbase[L] + (size_t)kh * slots[L] * key_row_params(); }
    uint16_t* value_params(int L, int kh) { return vp.data() + vpbase[L] + (size_t)kh * slots[L] * value_row_params(); }

    // position ps of KV head kh in layer L <- value [D]
    void store_value(int L, int kh, int ps, const float* value) {
        const int s = ps % slots[L];
        if (bits == 16) {
            uint16_t* vdst = (uint16_t*)values(L, kh) + (size_t)s * D;
            for (int d = 0; d < D; d++) vdst[d] = f32_to_f16(value[d]);
            return;
        }
        uint8_t vc[TF_MAX_HEAD_DIM];
        const int gw = kv_group(D);
        uint16_t* vpar = value_params(L, kh) + (size_t)s * groups * 2;
        for (int g = 0; g < groups; g++) {
            const int d0 = g * gw, n = std::min(D, d0 + gw) - d0;
            quantize_kv_group(value + d0, n, bits, vc + d0, vpar + 2 * g, vpar + 2 * g + 1);
        }
        uint8_t* vrow = values(L, kh) + (size_t)s * row_bytes();
        if (bits == 8) {
            memcpy(vrow, vc, D);
            return;
        }
        for (int c = 0; c < D; c += 32) {
            const int half = std::min(32, D - c) / 2;
            for (int b = 0; b < half; b++) vrow[c / 2 + b] = (uint8_t)(vc[c + b] | vc[c + half + b] << 4);
        }
    }
    // position ps of KV head kh in layer L <- key [D] (already rotated), keys per token (bits 16, 8;
    // bits 4: store_keys)
    void store_key(int L, int kh, int ps, const float* key) {
        const int s = ps % slots[L], lane = s % 16;
        if (bits == 16) {
            uint16_t* kblk = (uint16_t*)keys(L, kh) + (size_t)(s / 16) * D * 16 + lane;
            for (int d = 0; d < D; d++) kblk[(size_t)d * 16] = f32_to_f16(key[d]);
            return;
        }
        uint8_t kc[TF_MAX_HEAD_DIM];
        const int gw = kv_group(D);
        uint16_t* kpar = key_params(L, kh) + (size_t)(s / 16) * groups * 32 + lane;
        for (int g = 0; g < groups; g++) {
            const int d0 = g * gw, n = std::min(D, d0 + gw) - d0;
            quantize_kv_group(key + d0, n, bits, kc + d0, kpar + g * 32, kpar + g * 32 + 16);
        }
        uint8_t* kblk = keys(L, kh) + (size_t)(s / 16) * row_bytes() * 16 + lane;
        for (int d = 0; d < D; d++) kblk[(size_t)d * 16] = kc[d];
    }

    // Work items per KV head of store_keys for a call at pos of M tokens: the blocks of 16 positions
    // it stores into, item 0 the first and the last block (the two that read or write stage), then
    // one per block between them. Items touch disjoint blocks: threads may run them at once.
    static int key_items(int pos, int M) {
        const int blocks = (pos + M - 1) / 16 - pos / 16 + 1;
        return blocks > 1 ? blocks - 1 : 1;
    }
    // Per-channel 4-bit keys of positions pos .. pos+M-1 of KV head kh in layer L, work item `item` of
    // key_items(pos, M); key(p, out [D]) writes the key of position p (already rotated). A call
    // starting inside a block re-quantizes it with the block's earlier keys from stage, or, after a
    // truncation back into a block stage no longer holds, as their codes give them back.
    template <class Key>
    void store_keys(int L, int kh, int pos, int M, int item, const Key& key) {
        const int b0 = pos / 16, b1 = (pos + M - 1) / 16;
        if (item > 0) {
            float x[TF_MAX_HEAD_DIM * 16];
            fill_key_block(L, kh, b0 + item, pos, M, x, key);
            return;
        }
        float* st = stage.data() + ((size_t)L * kv_heads + kh) * D * 16;  // [D, 16]
        int& in_stage = staged[(size_t)L * kv_heads + kh];
        if (pos % 16 && in_stage != b0) dequantize_key_block(L, kh, b0, pos % 16, st);
        fill_key_block(L, kh, b0, pos, M, st, key);  // lanes before pos % 16 as they are
        if (b1 != b0) fill_key_block(L, kh, b1, pos, M, st, key);
        in_stage = b1;
    }
    // x [D, 16] lanes of block b's positions in pos .. pos+M-1 <- their keys; then the block <- per
    // dim, x's lanes up to its last position in the call quantized together (the later lanes code 0)
    template <class Key>
    void fill_key_block(int L, int kh, int b, int pos, int M, float* x, const Key& key) {
        const int p0 = std::max(16 * b, pos), p1 = std::min(16 * b + 16, pos + M);
        float kr[TF_MAX_HEAD_DIM];
        for (int p = p0; p < p1; p++) {
            key(p, kr);
            for (int d = 0; d < D; d++) x[(size_t)d * 16 + p % 16] = kr[d];
        }
        const int sb = b % (slots[L] / 16), n = p1 - 16 * b;
        uint8_t* kblk = keys(L, kh) + (size_t)sb * row_bytes() * 16;
        uint16_t* par = key_params(L, kh) + (size_t)sb * 2 * D;
        uint8_t c[2][16] = {};
        for (int d = 0; d < D; d += 2) {
            for (int e = 0; e < 2; e++) quantize_kv_group(x + (size_t)(d + e) * 16, n, 4, c[e], par + d + e, par + D + d + e);
            for (int lane = 0; lane < 16; lane++) kblk[(size_t)d * 8 + lane] = (uint8_t)(c[0][lane] | c[1][lane] << 4);
        }
    }
    // x [D, 16] lanes 0 .. n-1 <- block b's 4-bit keys as their codes give them back
    void dequantize_key_block(int L, int kh, int b, int n, float* x) {
        const int sb = b % (slots[L] / 16);
        const uint8_t* kblk = keys(L, kh) + (size_t)sb * row_bytes() * 16;
        const uint16_t* par = key_params(L, kh) + (size_t)sb * 2 * D;
        for (int d = 0; d < D; d++) {
            const float s = f16_to_f32(par[d]), m = f16_to_f32(par[D + d]);
            for (int lane = 0; lane < n; lane++) x[(size_t)d * 16 + lane] = s * (float)((kblk[(size_t)d / 2 * 16 + lane] >> 4 * (d & 1)) & 15) + m;
        }
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
