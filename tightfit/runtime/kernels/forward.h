// The decoder: one forward step of a Llama-layout model (RMSNorm, RoPE attention with grouped KV
// heads, SiLU-gated MLP) for M tokens, all layers and the head in one call.
// Part of the one translation unit engine.cpp.
#pragma once

#include "activations.h"
#include "attention.h"
#include "common.h"
#include "layout.h"
#include "matmul.h"

// Phases of a forward step as thread 0 times them (tf_engine_profile; engine.py's PHASES names
// them in this order): attention norm + quantize, q/k/v, KV cache + attention, o, MLP norm +
// gate/up + SiLU, down, final norm + head; PH_BARRIERS is its waiting for the other threads.
enum Phase { PH_NORM, PH_QKV, PH_ATTENTION, PH_O, PH_GATE_UP, PH_DOWN, PH_HEAD, PH_BARRIERS, PH_COUNT };

// Largest head_dim: store_kv rotates each key in a stack buffer of this many floats.
#define TF_MAX_HEAD_DIM 512
// Largest KV cache, batch and thread count: positions and token counts stay far from int overflow,
// per-thread buffers within reason.
#define TF_MAX_POSITIONS (1 << 30)
#define TF_MAX_BATCH (1 << 16)
#define TF_MAX_THREADS 1024

// What tf_engine_create returns (CREATE_ERRORS in runtime/engine_checks.py words them for people).
enum {
    TF_OK = 0,
    TF_E_COUNT = -1,     // a size or count <= 0 or past its limit below, or n_heads not a multiple of n_kv_heads
    TF_E_HEAD_DIM = -2,  // head_dim odd (RoPE rotates pairs) or above TF_MAX_HEAD_DIM
    TF_E_SHAPE = -3,     // a matrix's (N, K) or layout fields disagree with the config
    TF_E_NULL = -4,      // a weight, norm or table pointer is missing
    TF_E_MEMORY = -5,    // an allocation failed
};

struct Engine {
    tf_config cfg;
    KVCache kv;
    std::vector<std::vector<float>> res, xp; // per thread [B, hidden]: residual stream, normed input
    std::vector<float> q, k, v, att;         // [B, H*D], [B, KVH*D] x2, [B, H*D]
    std::vector<float> o, gate, up, down;    // [B, hidden], [B, inter] x2, [B, hidden]
    std::vector<QAct> acts;                  // one per thread
    std::vector<std::vector<float>> scores;  // one per thread [max_pos16]
    double prof[PH_COUNT] = {0};             // thread 0's seconds per phase
};

static void rmsnorm(const float* x, const float* w, float eps, int H, float* out) {
    double ss = 0.0;
    for (int j = 0; j < H; j++) ss += (double)x[j] * x[j];
    float r = 1.f / sqrtf((float)(ss / H) + eps);
    for (int j = 0; j < H; j++) out[j] = w[j] * (x[j] * r);
}

// gate[j] <- SiLU(gate[j]) * up[j] for j in [j0, j1)
static void silu_mul(float* gate, const float* up, int j0, int j1) {
    int j = j0;
#if TF_AVX512
    for (; j + 16 <= j1; j += 16) {
        __m512 g = _mm512_loadu_ps(gate + j);
        __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_storeu_ps(gate + j, _mm512_mul_ps(_mm512_mul_ps(g, sig), _mm512_loadu_ps(up + j)));
    }
#endif
    for (; j < j1; j++) gate[j] = gate[j] / (1.f + expf(-gate[j])) * up[j];
}

// ---------------------------------------------------------------------------------------------
// the steps of one forward call, run by every thread of its parallel region

// One thread's part of a forward call over tokens at positions pos .. pos+M-1. Every thread keeps
// its own copy of the residual stream and norms/quantizes the whole (small) input itself; threads
// meet only where one needs rows another one computed (the barriers in the steps below).
struct Step {
    Engine& e;
    const tf_config& c;
    const int M, pos, tid, nth;
    QAct& a;          // this thread's activations
    float* res;       // [M, hidden] its residual stream
    float* xp;        // [M, hidden] its normed input
    double clock = 0; // thread 0's time at the last lap

    Step(Engine& e_, int M_, int pos_)
        : e(e_), c(e_.cfg), M(M_), pos(pos_), tid(omp_get_thread_num()), nth(omp_get_num_threads()), a(e_.acts[tid]) {
        a.exact = c.exact != 0;
        e.res[tid].resize((size_t)M * c.hidden);
        e.xp[tid].resize((size_t)M * c.hidden);
        res = e.res[tid].data();
        xp = e.xp[tid].data();
    }
    // thread 0: the time since the last lap goes to `phase`
    void lap(int phase) { if (tid == 0) { double t = omp_get_wtime(); e.prof[phase] += t - clock; clock = t; } }
};

// This thread's rows [n0, n1) of y [M, W.N] = x W^T, x already quantized into s.a.
static inline void matmul_share(Step& s, const tf_mat& W, float* y, int& n0, int& n1) {
    group_sums(W, s.a);
    share(W.N, s.tid, s.nth, n0, n1);
    matmul_rows(W, s.a, n0, n1, y);
}

// xp [M, hidden] <- RMSNorm(res) * w, quantized into s.a
static inline void norm_quantize(Step& s, const float* w) {
    const int H = s.c.hidden;
    for (int i = 0; i < s.M; i++) rmsnorm(s.res + (size_t)i * H, w, s.c.eps, H, s.xp + (size_t)i * H);
    quantize_act(s.xp, s.M, H, s.a);
}

// res [M, hidden] += y [M, hidden]
static inline void add_residual(Step& s, const float* y) {
    for (size_t j = 0; j < (size_t)s.M * s.c.hidden; j++) s.res[j] += y[j];
}

// res [M, hidden] <- the embedding rows of ids
static inline void embed(Step& s, const int32_t* ids) {
    for (int i = 0; i < s.M; i++) dequant_row(s.c.embed, ids[i], s.res + (size_t)i * s.c.hidden);
}

// the new keys (rotated) and values of every (token, KV head) into layer L's cache
static inline void store_kv(Step& s, int L) {
    const int D = s.c.head_dim, KVH = s.c.n_kv_heads, d2 = D / 2;
    for (int it = s.tid; it < s.M * KVH; it += s.nth) {
        const int i = it / KVH, kh = it % KVH, ps = s.pos + i;
        float kr[TF_MAX_HEAD_DIM];
        memcpy(kr, s.e.k.data() + (size_t)i * KVH * D + kh * D, sizeof(float) * D);
        rope(kr, s.c.rope_cos + (size_t)ps * d2, s.c.rope_sin + (size_t)ps * d2, D);
        s.e.kv.store(L, kh, ps, kr, s.e.v.data() + (size_t)i * KVH * D + kh * D);
    }
}

// att <- causal attention of every (token, head) over layer L's cache; softmax in fp32
static inline void attend_heads(Step& s, int L) {
    const int D = s.c.head_dim, NH = s.c.n_heads, rep = NH / s.c.n_kv_heads, d2 = D / 2;
    float* sc = s.e.scores[s.tid].data();
    for (int it = s.tid; it < s.M * NH; it += s.nth) {
        const int i = it / NH, hd = it % NH, kh = hd / rep, ps = s.pos + i;
        float* qv = s.e.q.data() + (size_t)i * NH * D + hd * D;
        rope(qv, s.c.rope_cos + (size_t)ps * d2, s.c.rope_sin + (size_t)ps * d2, D);
        float* out = s.e.att.data() + (size_t)i * NH * D + hd * D;
        attend(qv, s.e.kv.keys(L, kh), s.e.kv.values(L, kh), ps + 1, D, s.c.attn_scale, sc, out);
    }
}

// res += o(attention(RMSNorm(res))) for layer L
static inline void attention_block(Step& s, int L) {
    const tf_layer& ly = s.c.layers[L];
    int n0, n1;
    norm_quantize(s, ly.attn_norm);
    s.lap(PH_NORM);
    matmul_share(s, ly.q, s.e.q.data(), n0, n1);
    matmul_share(s, ly.k, s.e.k.data(), n0, n1);
    matmul_share(s, ly.v, s.e.v.data(), n0, n1);
    s.lap(PH_QKV);
#pragma omp barrier
    s.lap(PH_BARRIERS);
    store_kv(s, L);
#pragma omp barrier
    attend_heads(s, L);
    s.lap(PH_ATTENTION);
#pragma omp barrier
    s.lap(PH_BARRIERS);
    quantize_act(s.e.att.data(), s.M, s.c.n_heads * s.c.head_dim, s.a);
    matmul_share(s, ly.o, s.e.o.data(), n0, n1);
    s.lap(PH_O);
#pragma omp barrier
    s.lap(PH_BARRIERS);
    add_residual(s, s.e.o.data());
}

// res += down(SiLU(gate(x)) * up(x)), x = RMSNorm(res), for layer ly
static inline void mlp_block(Step& s, const tf_layer& ly) {
    const int I = s.c.inter;
    int n0, n1;
    norm_quantize(s, ly.mlp_norm);
    matmul_share(s, ly.gate, s.e.gate.data(), n0, n1);
    group_sums(ly.up, s.a);
    matmul_rows(ly.up, s.a, n0, n1, s.e.up.data());  // same rows as gate
    for (int i = 0; i < s.M; i++) silu_mul(s.e.gate.data() + (size_t)i * I, s.e.up.data() + (size_t)i * I, n0, n1);
    s.lap(PH_GATE_UP);
#pragma omp barrier
    s.lap(PH_BARRIERS);
    quantize_act(s.e.gate.data(), s.M, I, s.a);
    matmul_share(s, ly.down, s.e.down.data(), n0, n1);
    s.lap(PH_DOWN);
#pragma omp barrier
    s.lap(PH_BARRIERS);
    add_residual(s, s.e.down.data());
}

// logits [rows, vocab] <- head(RMSNorm(res)) of the last token (rows = 1) or of all (rows = M)
static inline void lm_head(Step& s, float* logits, int all_logits) {
    const int H = s.c.hidden, first = all_logits ? 0 : s.M - 1, rows = s.M - first;
    int n0, n1;
    for (int i = 0; i < rows; i++) rmsnorm(s.res + (size_t)(first + i) * H, s.c.final_norm, s.c.eps, H, s.xp + (size_t)i * H);
    quantize_act(s.xp, rows, H, s.a);
    matmul_share(s, s.c.head, logits, n0, n1);
    s.lap(PH_HEAD);
}

extern "C" {

// Whether W is a well-formed [N, K] matrix: kind, layout fields and the pointers its kind reads.
static bool mat_ok(const tf_mat& W, int64_t N, int64_t K) {
    if (W.N != N || W.K != K) return false;
    if (W.kind == TF_F16 || W.kind == TF_F32) return W.dense != nullptr;
    if (W.kind != TF_QUANT) return false;
    const bool bits_ok = W.bits == 2 || W.bits == 3 || W.bits == 4 || W.bits == 5 || W.bits == 6 || W.bits == 8;
    return bits_ok && W.Kp == (K + 31) / 32 * 32 && W.group >= 1 && W.G == (K + W.group - 1) / W.group &&
           W.codes && W.scales && W.zeros;
}

// Every size the forward step relies on, checked before any allocation: TF_OK or a TF_E_* code.
static int check_config(const tf_config& c) {
    if (c.n_layers < 1 || c.hidden < 1 || c.n_heads < 1 || c.n_kv_heads < 1 || c.head_dim < 1 || c.inter < 1 ||
        c.vocab < 1 || c.max_pos < 1 || c.max_pos > TF_MAX_POSITIONS || c.max_batch < 1 || c.max_batch > TF_MAX_BATCH ||
        c.threads < 1 || c.threads > TF_MAX_THREADS || c.n_heads % c.n_kv_heads != 0)
        return TF_E_COUNT;
    if (c.head_dim % 2 != 0 || c.head_dim > TF_MAX_HEAD_DIM) return TF_E_HEAD_DIM;
    if (!c.rope_cos || !c.rope_sin || !c.final_norm || !c.layers) return TF_E_NULL;
    const int64_t H = c.hidden, QD = (int64_t)c.n_heads * c.head_dim, KVD = (int64_t)c.n_kv_heads * c.head_dim, I = c.inter;
    if (!mat_ok(c.embed, c.vocab, H) || !mat_ok(c.head, c.vocab, H)) return TF_E_SHAPE;
    for (int L = 0; L < c.n_layers; L++) {
        const tf_layer& l = c.layers[L];
        if (!l.attn_norm || !l.mlp_norm) return TF_E_NULL;
        if (!mat_ok(l.q, QD, H) || !mat_ok(l.k, KVD, H) || !mat_ok(l.v, KVD, H) || !mat_ok(l.o, H, QD) ||
            !mat_ok(l.gate, I, H) || !mat_ok(l.up, I, H) || !mat_ok(l.down, H, I))
            return TF_E_SHAPE;
    }
    return TF_OK;
}

// *out <- a new engine for cfg (its weights stay the caller's), or NULL with the TF_E_* code returned.
// No exception crosses this boundary; every buffer a forward step uses is allocated here.
int tf_engine_create(const tf_config* cfg, void** out) {
    if (!out) return TF_E_NULL;
    *out = nullptr;
    if (!cfg) return TF_E_NULL;
    const int rc = check_config(*cfg);
    if (rc != TF_OK) return rc;
    Engine* e = nullptr;
    try {
        e = new Engine();
        e->cfg = *cfg;
        const tf_config& c = e->cfg;
        const size_t D = c.head_dim, B = c.max_batch, T = c.threads;
        const size_t widest = (size_t)std::max({c.hidden, c.inter, c.n_heads * c.head_dim}) + 31;  // + padding to 32 (checked: fits int)
        e->kv.allocate(c);
        e->res.assign(T, std::vector<float>(B * c.hidden));
        e->xp.assign(T, std::vector<float>(B * c.hidden));
        e->q.resize(B * c.n_heads * D);
        e->att.resize(B * c.n_heads * D);
        e->k.resize(B * c.n_kv_heads * D);
        e->v.resize(B * c.n_kv_heads * D);
        e->o.resize(B * c.hidden);
        e->down.resize(B * c.hidden);
        e->gate.resize(B * c.inter);
        e->up.resize(B * c.inter);
        e->acts.resize(T);
        for (QAct& a : e->acts) {  // capacity for the widest activation, so forward steps never allocate
            a.xq.reserve(B * widest);
            a.sx.reserve(B * widest / 32 + B);
            a.psum.reserve(B * widest / 16 + B);
            a.xs.reserve(B * widest);
        }
        e->scores.assign(T, std::vector<float>(e->kv.max_pos16));
    } catch (...) {  // std::bad_alloc, std::length_error
        delete e;
        return TF_E_MEMORY;
    }
    *out = e;
    return TF_OK;
}

void tf_engine_free(void* p) { delete (Engine*)p; }

int tf_max_head_dim(void) { return TF_MAX_HEAD_DIM; }

// Run tokens ids[0..M) at positions pos..pos+M-1 (M <= max_batch, pos+M <= max_pos); writes the
// logits of the last token [vocab] (all_logits = 0) or of every token [M, vocab] to `logits`.
int tf_engine_forward(void* p, const int32_t* ids, int M, int pos, float* logits, int all_logits) {
    Engine& e = *(Engine*)p;
    const tf_config& c = e.cfg;
    if (M < 1 || M > c.max_batch || pos < 0 || pos + M > c.max_pos) return -1;
    for (int i = 0; i < M; i++) if (ids[i] < 0 || ids[i] >= c.vocab) return -2;
#pragma omp parallel num_threads(c.threads)
    {
        Step s(e, M, pos);
        embed(s, ids);
        s.clock = omp_get_wtime();  // the phases start after the embedding lookup
        for (int L = 0; L < c.n_layers; L++) {
            attention_block(s, L);
            mlp_block(s, c.layers[L]);
        }
        lm_head(s, logits, all_logits);
    }
    return 0;
}

}  // extern "C"
