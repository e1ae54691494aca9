// What the engine accepts: every size, architecture field and weight matrix of a tf_config checked
// before tf_engine_create allocates anything (CREATE_ERRORS in runtime/engine_checks.py words the
// codes for people). Part of the one translation unit engine.cpp.
#pragma once

#include <cmath>

#include "common.h"

// Largest KV cache, batch and thread count: positions and token counts stay far from int overflow,
// per-thread buffers within reason.
#define TF_MAX_POSITIONS (1 << 30)
#define TF_MAX_BATCH (1 << 16)
#define TF_MAX_THREADS 1024

// What tf_engine_create returns (CREATE_ERRORS in runtime/engine_checks.py words them for people;
// timing.h's entry points return them too).
enum {
    TF_OK = 0,
    TF_E_COUNT = -1,     // a size or count <= 0 or past its limit below, or n_heads not a multiple of n_kv_heads
    TF_E_HEAD_DIM = -2,  // head_dim odd (RoPE rotates pairs) or above TF_MAX_HEAD_DIM, or rope_dim odd, < 2 or > head_dim
    TF_E_SHAPE = -3,     // a matrix's (N, K) or layout fields disagree with the config
    TF_E_NULL = -4,      // a weight, norm or table pointer is missing
    TF_E_MEMORY = -5,    // an allocation failed
    TF_E_ARCH = -6,      // an architecture field out of range: act, a layer's window, eps, attn_scale, final_softcap, embed_scale
    TF_E_KV = -7,        // kv_bits not 16, 8 or 4, or a quantized KV cache with head_dim not a multiple of 16
};

// Whether W is a well-formed [N, K] matrix: kind, layout fields and the pointers its kind reads
// (a level table only with 2-, 3- or 4-bit codes: the kernels' grid path reads 16 levels, or a table per row).
static bool mat_ok(const tf_mat& W, int64_t N, int64_t K) {
    if (W.N != N || W.K != K) return false;
    if (W.kind == TF_F16 || W.kind == TF_F32) return W.dense != nullptr;
    if (W.kind != TF_QUANT) return false;
    const bool bits_ok = W.bits == 2 || W.bits == 3 || W.bits == 4 || W.bits == 5 || W.bits == 6 || W.bits == 8;
    const bool shape_ok = W.Kp == (K + 31) / 32 * 32 && W.group >= 1 && W.G == (K + W.group - 1) / W.group && W.codes;
    if (!W.stats) return bits_ok && (!W.levels || W.bits <= 4) && (W.level_rows == 0 || (W.level_rows == 1 && W.levels)) && shape_ok && W.scales && W.zeros && !W.outlier_tiles;
    // SpQR: 2-4 bit codes, statistics records, groups the kernels' segments divide (8 or a multiple of 16)
    if (W.bits > 4 || W.levels || W.level_rows || !shape_ok || (W.G > 1 && W.group % 16 != 0 && W.group != 8)) return false;
    if (!W.outlier_tiles) return true;
    // outliers (layout.h): every tile's slices and entries in order, masks on rows < N, the entries
    // of a tile as many as its masks' bits, every column < K
    if (!W.outlier_entries || !W.outlier_masks || !W.outlier_cols || !W.outlier_values) return false;
    if (W.outlier_tiles[0] != 0 || W.outlier_entries[0] != 0) return false;
    for (int64_t T = 0; 16 * T < N; T++) {
        const int s0 = W.outlier_tiles[T], s1 = W.outlier_tiles[T + 1], e0 = W.outlier_entries[T], e1 = W.outlier_entries[T + 1];
        if (s1 < s0 || e1 < e0) return false;
        const uint32_t rows = N - 16 * T >= 16 ? 0xFFFFu : (1u << (N - 16 * T)) - 1;
        int e = e0;
        for (int sl = s0; sl < s1; sl++) {
            if (W.outlier_masks[sl] & ~rows) return false;
            e += __builtin_popcount(W.outlier_masks[sl]);
        }
        if (e != e1) return false;
        for (int j = e0; j < e1; j++)
            if (W.outlier_cols[j] >= K) return false;
    }
    return true;
}

// Every size and architecture field the forward step relies on, checked before any allocation:
// TF_OK or a TF_E_* code.
static int check_config(const tf_config& c) {
    if (c.n_layers < 1 || c.hidden < 1 || c.n_heads < 1 || c.n_kv_heads < 1 || c.head_dim < 1 || c.inter < 1 ||
        c.vocab < 1 || c.max_pos < 1 || c.max_pos > TF_MAX_POSITIONS || c.max_batch < 1 || c.max_batch > TF_MAX_BATCH ||
        c.threads < 1 || c.threads > TF_MAX_THREADS || c.n_heads % c.n_kv_heads != 0)
        return TF_E_COUNT;
    if (c.head_dim % 2 != 0 || c.head_dim > TF_MAX_HEAD_DIM) return TF_E_HEAD_DIM;
    if (c.rope_dim < 2 || c.rope_dim % 2 != 0 || c.rope_dim > c.head_dim) return TF_E_HEAD_DIM;
    if ((c.kv_bits != 16 && c.kv_bits != 8 && c.kv_bits != 4) || (c.kv_bits != 16 && c.head_dim % 16 != 0)) return TF_E_KV;
    if ((c.act != TF_ACT_SILU && c.act != TF_ACT_GELU_TANH) || !(c.eps > 0.f) || !isfinite(c.eps) ||
        !(c.attn_scale > 0.f) || !isfinite(c.attn_scale) || !(c.final_softcap >= 0.f) || !isfinite(c.final_softcap) ||
        !isfinite(c.embed_scale))
        return TF_E_ARCH;
    if (!c.final_norm || !c.layers) return TF_E_NULL;
    const int64_t H = c.hidden, QD = (int64_t)c.n_heads * c.head_dim, KVD = (int64_t)c.n_kv_heads * c.head_dim, I = c.inter;
    if (!mat_ok(c.embed, c.vocab, H) || !mat_ok(c.head, c.vocab, H)) return TF_E_SHAPE;
    for (int L = 0; L < c.n_layers; L++) {
        const tf_layer& l = c.layers[L];
        if (l.window < 0 || l.window > TF_MAX_POSITIONS) return TF_E_ARCH;
        if (!l.attn_norm || !l.mlp_norm || !l.rope_cos || !l.rope_sin) return TF_E_NULL;
        if (!mat_ok(l.q, QD, H) || !mat_ok(l.k, KVD, H) || !mat_ok(l.v, KVD, H) || !mat_ok(l.o, H, QD) ||
            !mat_ok(l.gate, I, H) || !mat_ok(l.up, I, H) || !mat_ok(l.down, H, I))
            return TF_E_SHAPE;
    }
    return TF_OK;
}
