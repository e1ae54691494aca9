// The decoder: one forward step of a Llama-layout model (RMSNorm, RoPE attention with grouped KV
// heads, gated MLP) for M tokens, all layers and the head in one call. What other architectures
// differ by is data in tf_config / tf_layer, not code of their own: norms of the attention and MLP
// outputs and per-head q/k norms (Gemma3), the MLP's activation, sliding-window layers beside
// full ones with their own RoPE tables, partial rotary, the embedding scale, final logit soft-capping.
// Part of the one translation unit engine.cpp.
#pragma once

#include "activations.h"
#include "attention.h"
#include "checks.h"
#include "common.h"
#include "layout.h"
#include "matmul.h"
#include "threads.h"

// Phases of a forward step as thread 0 times them (tf_engine_profile; engine.py's PHASES names
// them in this order): attention norm + quantize, q/k/v, KV cache + attention, o, MLP norm +
// gate/up + SiLU, down, final norm + head; PH_BARRIERS is its waiting for the other threads.
enum Phase { PH_NORM, PH_QKV, PH_ATTENTION, PH_O, PH_GATE_UP, PH_DOWN, PH_HEAD, PH_BARRIERS, PH_COUNT };

struct Engine {
    tf_config cfg;
    KVCache kv;
    std::vector<std::vector<float>> res, xp; // per thread [B, hidden]: residual stream, normed input
    std::vector<float> q, k, v, att;         // [B, H*D], [B, KVH*D] x2, [B, H*D]
    std::vector<float> o, gate, up, down;    // [B, hidden], [B, inter] x2, [B, hidden]
    std::vector<QAct> acts;                  // one per thread
    std::vector<std::vector<float>> scores;  // one per thread [attend_scratch(group, kv.max_slots, head_dim)]
    double prof[PH_COUNT] = {0};             // thread 0's seconds per phase
    Pace pace;                               // decode on the team or on thread 0 alone (threads.h)
    Team team;                               // its threads (TF_BARRIER=2; threads.h); declared last, so joined first
};

static void rmsnorm(const float* x, const float* w, float eps, int H, float* out) {
    double ss = 0.0;
    for (int j = 0; j < H; j++) ss += (double)x[j] * x[j];
    float r = 1.f / sqrtf((float)(ss / H) + eps);
    for (int j = 0; j < H; j++) out[j] = w[j] * (x[j] * r);
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
    Barrier& meet;    // the call's barrier (threads.h)
    int sense = 0;    // this thread's side of it
    double clock = 0; // thread 0's time at the last lap

    Step(Engine& e_, Barrier& meet_, int M_, int pos_, int tid_, int nth_)
        : e(e_), c(e_.cfg), M(M_), pos(pos_), tid(tid_), nth(nth_), a(e_.acts[tid]), meet(meet_) {
        a.exact = c.exact != 0;
        e.res[tid].resize((size_t)M * c.hidden);
        e.xp[tid].resize((size_t)M * c.hidden);
        res = e.res[tid].data();
        xp = e.xp[tid].data();
    }
    // thread 0: the time since the last lap goes to `phase`
    void lap(int phase) { if (tid == 0) { double t = omp_get_wtime(); e.prof[phase] += t - clock; clock = t; } }
    // wait until every thread of the call gets here
    void sync() { team_barrier(meet, sense, nth); }
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

// res [M, hidden] += y [M, hidden], or += RMSNorm(y) * norm where the block normalizes its output
// (normed into this thread's xp: y is shared, and xp's input is consumed by then)
static inline void add_residual(Step& s, const float* y, const float* norm) {
    const int H = s.c.hidden;
    if (norm) {
        for (int i = 0; i < s.M; i++) rmsnorm(y + (size_t)i * H, norm, s.c.eps, H, s.xp + (size_t)i * H);
        y = s.xp;
    }
    for (size_t j = 0; j < (size_t)s.M * H; j++) s.res[j] += y[j];
}

// res [M, hidden] <- the embedding rows of ids, times embed_scale
static inline void embed(Step& s, const int32_t* ids) {
    const int H = s.c.hidden;
    for (int i = 0; i < s.M; i++) {
        float* row = s.res + (size_t)i * H;
        dequant_row(s.c.embed, ids[i], row);
        if (s.c.embed_scale != 1.f)
            for (int j = 0; j < H; j++) row[j] *= s.c.embed_scale;
    }
}

// one head v [D] at position ps of layer ly: RMSNorm(v) * norm where the layer has one (in place), then RoPE
static inline void norm_rope(const Step& s, const tf_layer& ly, const float* norm, int ps, float* v) {
    const int D = s.c.head_dim, r2 = s.c.rope_dim / 2;
    if (norm) rmsnorm(v, norm, s.c.eps, D, v);
    rope(v, ly.rope_cos + (size_t)ps * r2, ly.rope_sin + (size_t)ps * r2, s.c.rope_dim);
}

// the new keys (normed, rotated) and values of every (token, KV head) into layer L's cache; 4-bit
// keys per channel, a block of 16 positions at a time (KVCache::store_keys' work items)
static inline void store_kv(Step& s, int L) {
    const tf_layer& ly = s.c.layers[L];
    const int D = s.c.head_dim, KVH = s.c.n_kv_heads;
    KVCache& kv = s.e.kv;
    auto key = [&](int kh, int ps, float* kr) {  // kr [D] <- the key of KV head kh at position ps, normed and rotated
        memcpy(kr, s.e.k.data() + (size_t)(ps - s.pos) * KVH * D + kh * D, sizeof(float) * D);
        norm_rope(s, ly, ly.k_norm, ps, kr);
    };
    for (int it = s.tid; it < s.M * KVH; it += s.nth) {
        const int i = it / KVH, kh = it % KVH, ps = s.pos + i;
        kv.store_value(L, kh, ps, s.e.v.data() + (size_t)i * KVH * D + kh * D);
        if (kv.bits == 4) continue;
        float kr[TF_MAX_HEAD_DIM];
        key(kh, ps, kr);
        kv.store_key(L, kh, ps, kr);
    }
    if (kv.bits != 4) return;
    const int items = KVCache::key_items(s.pos, s.M);
    for (int it = s.nth - 1 - s.tid; it < KVH * items; it += s.nth) {  // from the last thread: the first ones store values
        const int kh = it % KVH;
        kv.store_keys(L, kh, s.pos, s.M, it / KVH, [&](int ps, float* kr) { key(kh, ps, kr); });
    }
}

// Query heads of a KV head attend in pieces of R (<= TF_MAX_GROUP) that read its cache together:
// as few pieces as keep all nth threads busy over the M * KVH (token, KV head) pairs, so a decode
// step on few threads decodes each code once per KV head, and many threads still share the work.
static inline int group_size(int rep, int M, int KVH, int nth) {
    const int pieces = std::min(rep, std::max((rep + TF_MAX_GROUP - 1) / TF_MAX_GROUP, (nth + M * KVH - 1) / (M * KVH)));
    return (rep + pieces - 1) / pieces;
}

// att <- causal attention of every (token, head) over the positions layer L's cache gives it
// (all before it, or its sliding window); softmax in fp32. The query heads of one KV head go in
// pieces of group_size (the last one may be smaller).
static inline void attend_heads(Step& s, int L) {
    const tf_layer& ly = s.c.layers[L];
    const int D = s.c.head_dim, NH = s.c.n_heads, KVH = s.c.n_kv_heads, rep = NH / KVH;
    const int R = group_size(rep, s.M, KVH, s.nth), pieces = (rep + R - 1) / R;
    float* sc = s.e.scores[s.tid].data();
    for (int it = s.tid; it < s.M * KVH * pieces; it += s.nth) {
        const int i = it / (KVH * pieces), kh = it / pieces % KVH, h0 = kh * rep + it % pieces * R, ps = s.pos + i;
        const int n = std::min(R, (kh + 1) * rep - h0);  // query heads h0 .. h0 + n - 1
        float* qv = s.e.q.data() + (size_t)i * NH * D + (size_t)h0 * D;  // [n, D]
        for (int r = 0; r < n; r++) norm_rope(s, ly, ly.q_norm, ps, qv + (size_t)r * D);
        Span spans[2];
        const int n_spans = s.e.kv.spans(L, ps, spans);
        float* out = s.e.att.data() + (size_t)i * NH * D + (size_t)h0 * D;
        const KVHead h = {s.e.kv.keys(L, kh), s.e.kv.values(L, kh), s.e.kv.key_params(L, kh), s.e.kv.value_params(L, kh),
                          s.e.kv.bits, D, s.e.kv.slots[L]};
        attend(qv, n, h, spans, n_spans, s.c.attn_scale, sc, out);
    }
}

// res += o(attention(RMSNorm(res))) for layer L (normed again before the add where the layer says so)
static inline void attention_block(Step& s, int L) {
    const tf_layer& ly = s.c.layers[L];
    int n0, n1;
    norm_quantize(s, ly.attn_norm);
    s.lap(PH_NORM);
    matmul_share(s, ly.q, s.e.q.data(), n0, n1);
    matmul_share(s, ly.k, s.e.k.data(), n0, n1);
    matmul_share(s, ly.v, s.e.v.data(), n0, n1);
    s.lap(PH_QKV);
    s.sync();
    s.lap(PH_BARRIERS);
    store_kv(s, L);
    s.sync();
    attend_heads(s, L);
    s.lap(PH_ATTENTION);
    s.sync();
    s.lap(PH_BARRIERS);
    quantize_act(s.e.att.data(), s.M, s.c.n_heads * s.c.head_dim, s.a);
    matmul_share(s, ly.o, s.e.o.data(), n0, n1);
    s.lap(PH_O);
    s.sync();
    s.lap(PH_BARRIERS);
    add_residual(s, s.e.o.data(), ly.attn_out_norm);
}

// res += down(act(gate(x)) * up(x)), x = RMSNorm(res), for layer ly (its output normed likewise)
static inline void mlp_block(Step& s, const tf_layer& ly) {
    const int I = s.c.inter;
    int n0, n1;
    norm_quantize(s, ly.mlp_norm);
    matmul_share(s, ly.gate, s.e.gate.data(), n0, n1);
    group_sums(ly.up, s.a);
    matmul_rows(ly.up, s.a, n0, n1, s.e.up.data());  // same rows as gate
    for (int i = 0; i < s.M; i++) gated_act(s.c.act, s.e.gate.data() + (size_t)i * I, s.e.up.data() + (size_t)i * I, n0, n1);
    s.lap(PH_GATE_UP);
    s.sync();
    s.lap(PH_BARRIERS);
    quantize_act(s.e.gate.data(), s.M, I, s.a);
    matmul_share(s, ly.down, s.e.down.data(), n0, n1);
    s.lap(PH_DOWN);
    s.sync();
    s.lap(PH_BARRIERS);
    add_residual(s, s.e.down.data(), ly.mlp_out_norm);
}

// logits [rows, vocab] <- head(RMSNorm(res)) of the last token (rows = 1) or of all (rows = M),
// soft-capped to c tanh(logits / c) where final_softcap c > 0
static inline void lm_head(Step& s, float* logits, int all_logits) {
    const int H = s.c.hidden, first = all_logits ? 0 : s.M - 1, rows = s.M - first;
    int n0, n1;
    for (int i = 0; i < rows; i++) rmsnorm(s.res + (size_t)(first + i) * H, s.c.final_norm, s.c.eps, H, s.xp + (size_t)i * H);
    quantize_act(s.xp, rows, H, s.a);
    matmul_share(s, s.c.head, logits, n0, n1);
    if (s.c.final_softcap > 0.f)
        for (int i = 0; i < rows; i++)
            for (int n = n0; n < n1; n++) {  // this thread's rows of the head
                float& x = logits[(size_t)i * s.c.vocab + n];
                x = s.c.final_softcap * tanhf(x / s.c.final_softcap);
            }
    s.lap(PH_HEAD);
}

// One forward call's arguments, and the barrier its threads meet at
struct Call {
    Engine& e;
    const int32_t* ids;
    int M, pos;
    float* logits;
    int all_logits;
    Barrier meet;
};

// Thread tid's part (of nth) of a forward call (a Team's job, or an OpenMP region's body)
static void forward_thread(void* ctx, int tid, int nth) {
    Call& call = *(Call*)ctx;
    Step s(call.e, call.meet, call.M, call.pos, tid, nth);
    embed(s, call.ids);
    s.clock = omp_get_wtime();  // the phases start after the embedding lookup
    for (int L = 0; L < s.c.n_layers; L++) {
        attention_block(s, L);
        mlp_block(s, s.c.layers[L]);
    }
    lm_head(s, call.logits, call.all_logits);
    if (TF_BARRIER == 1) s.sync();  // all arrive at OpenMP's closing barrier together: none waits in it (its spin policy)
}

extern "C" {

// *out <- a new engine for cfg (copied; the weights it points to stay the caller's and must outlive
// the engine), or NULL with the TF_E_* code returned. No exception crosses this boundary; every
// buffer a forward step uses is allocated here.
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
        const int group = std::min(c.n_heads / c.n_kv_heads, TF_MAX_GROUP);  // the largest group_size
        e->scores.assign(T, std::vector<float>(attend_scratch(group, e->kv.max_slots, c.head_dim)));
        if (TF_BARRIER == 2) e->team.launch(c.threads);
    } catch (...) {  // std::bad_alloc, std::length_error, std::system_error (a thread not started)
        delete e;
        return TF_E_MEMORY;
    }
    *out = e;
    return TF_OK;
}

void tf_engine_free(void* p) { delete (Engine*)p; }

int tf_max_head_dim(void) { return TF_MAX_HEAD_DIM; }

// Bytes of the engine's KV cache (rings of sliding-window layers included)
size_t tf_engine_kv_bytes(const void* p) { return ((const Engine*)p)->kv.bytes(); }

// Bytes one position takes in the KV cache of every layer: codes (or fp16) + scales of K and V
size_t tf_engine_kv_bytes_per_token(const void* p) { return ((const Engine*)p)->kv.bytes_per_token(); }

// Run tokens ids[0..M) at positions pos..pos+M-1 (M <= max_batch, pos+M <= max_pos); writes the
// logits of the last token [vocab] (all_logits = 0) or of every token [M, vocab] to `logits`.
// Returns 0, or -1 (bad M or pos), -2 (a token id out of range), -3 (a sliding-window ring no
// longer holds positions before pos that this call reads: run the kept tokens again from 0).
int tf_engine_forward(void* p, const int32_t* ids, int M, int pos, float* logits, int all_logits) {
    Engine& e = *(Engine*)p;
    const tf_config& c = e.cfg;
    if (M < 1 || M > c.max_batch || pos < 0 || pos + M > c.max_pos) return -1;
    for (int i = 0; i < M; i++) if (ids[i] < 0 || ids[i] >= c.vocab) return -2;
    if (!e.kv.claim(pos, M)) return -3;
    Call call = {e, ids, M, pos, logits, all_logits, {}};
#if TF_BARRIER == 2
    if (M > 1 || !TF_PACE || c.threads == 1) {
        e.team.run(forward_thread, &call, c.threads);
    } else {  // a decode call: the team or thread 0 alone, whichever is faster now (Pace)
        const bool team = e.pace.team();
        const double t0 = omp_get_wtime();
        e.team.run(forward_thread, &call, team ? c.threads : 1);
        e.pace.record(team, omp_get_wtime() - t0);
    }
#else
#pragma omp parallel num_threads(c.threads)
    forward_thread(&call, omp_get_thread_num(), omp_get_num_threads());
#endif
    return 0;
}

}  // extern "C"
