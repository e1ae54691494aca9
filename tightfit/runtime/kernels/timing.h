// Timing entry points, measured inside the library: back-to-back matmuls (the latency profile),
// memory read bandwidth, decode attention over one KV head, and the forward step's per-phase clock;
// and tf_kv_attend, the attention of one KV head's cache that the kernel tests compare with a reference.
// Part of the one translation unit engine.cpp.
#pragma once

#include "activations.h"
#include "attention.h"
#include "common.h"
#include "forward.h"
#include "kv_cache.h"
#include "matmul.h"
#include "threads.h"

// kv <- a cache of one layer and one KV head holding n positions in kv_bits (keys [n, D] as
// attention sees them, already rotated; values [n, D]); returns that head (tests and timing of
// attention). The caller has checked the sizes; allocation may throw.
static KVHead one_head_cache(KVCache& kv, int kv_bits, int D, int n, const float* keys, const float* values) {
    tf_layer layer = {};
    tf_config c = {};
    c.n_layers = c.n_kv_heads = c.max_batch = 1;
    c.head_dim = D;
    c.max_pos = n;
    c.kv_bits = kv_bits;
    c.layers = &layer;
    kv.allocate(c);
    for (int p = 0; p < n; p++) {  // one position per call, as decode stores them
        kv.store_value(0, 0, p, values + (size_t)p * D);
        if (kv_bits == 4) kv.store_keys(0, 0, p, 1, 0, [&](int, float* kr) { memcpy(kr, keys + (size_t)p * D, sizeof(float) * D); });
        else kv.store_key(0, 0, p, keys + (size_t)p * D);
    }
    return {kv.keys(0, 0), kv.values(0, 0), kv.key_params(0, 0), kv.value_params(0, 0), kv_bits, D, kv.slots[0]};
}

// TF_OK, or the TF_E_* code of bad arguments to tf_kv_attend / tf_time_kv_attend
static int check_attend_args(int kv_bits, int D, int n, int rep, int group, const void* keys, const void* values,
                             const void* q, const void* out) {
    if (!keys || !values || !q || !out) return TF_E_NULL;
    if (n < 1 || n > TF_MAX_POSITIONS || D < 2 || D > TF_MAX_HEAD_DIM || D % 2 != 0 || rep < 1 || rep > TF_MAX_HEAD_DIM ||
        group < 1 || group > TF_MAX_GROUP)
        return TF_E_COUNT;
    if ((kv_bits != 16 && kv_bits != 8 && kv_bits != 4) || (kv_bits != 16 && D % 16 != 0)) return TF_E_KV;
    return TF_OK;
}

// out [rep, D] <- the attention of rep query heads q [rep, D] over all n positions of one KV head's
// cache h, in pieces of `group` heads (the last one may be smaller); sc scratch of
// attend_scratch(group, h.slots, D)
static void attend_all(const KVHead& h, int n, int rep, int group, const float* q, float scale, float* sc, float* out) {
    const Span all = {0, n};
    for (int h0 = 0; h0 < rep; h0 += group)
        attend(q + (size_t)h0 * h.D, std::min(group, rep - h0), h, &all, 1, scale, sc, out + (size_t)h0 * h.D);
}

extern "C" {

// One KV head of n positions stored in a KV cache of kv_bits (keys, values [n, D]; one_head_cache),
// then out [rep, D] <- the attention of rep query heads q [rep, D] that share it, over all n
// positions, with softmax scale `scale`, in groups of up to TF_MAX_GROUP heads (tests of the cache
// and the attention kernel). Returns 0 or a TF_E_* code.
int tf_kv_attend(int kv_bits, int D, int n, int rep, const float* keys, const float* values, const float* q, float scale,
                 float* out) {
    const int group = std::min(std::max(rep, 1), TF_MAX_GROUP);
    const int rc = check_attend_args(kv_bits, D, n, rep, group, keys, values, q, out);
    if (rc != TF_OK) return rc;
    try {
        KVCache kv;
        const KVHead h = one_head_cache(kv, kv_bits, D, n, keys, values);
        std::vector<float> sc(attend_scratch(group, h.slots, D));
        attend_all(h, n, rep, group, q, scale, sc.data(), out);
    } catch (...) {
        return TF_E_MEMORY;
    }
    return TF_OK;
}

// Seconds per call of `reps` back-to-back matmuls (activation quantization included), for profiling.
// W: `count` matrices of one shape and kind; call r multiplies by W[r % count]. With copies whose
// bytes exceed the last-level cache, every call streams its weights from memory, as in a decode
// step of a whole model (one matrix alone would stay cache-resident and time too fast).
double tf_time_matmul(const tf_mat* W, int count, const float* x, int M, float* y, int threads, int reps) {
    std::vector<QAct> acts(threads);
    Barrier meet;  // the forward step's barrier (threads.h), so the profile times what the engine runs
    double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads)
    {
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        int n0, n1, sense = 0;
        share(W[0].N, tid, nth, n0, n1);
        for (int r = 0; r < reps; r++) {
            const tf_mat& w = W[r % count];
            quantize_act(x, M, w.K, acts[tid]);
            group_sums(w, acts[tid]);
            matmul_rows(w, acts[tid], n0, n1, y);
            team_barrier(meet, sense, nth);
        }
    }
    return (omp_get_wtime() - t0) / reps;
}

// Seconds to read `bytes` of buf `reps` times with `threads` threads (sums 64-bit words).
double tf_read_seconds(const uint8_t* buf, size_t bytes, int reps, int threads) {
    volatile uint64_t sink = 0;
    double t0 = omp_get_wtime();
    for (int r = 0; r < reps; r++) {
        uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
        {
            int tid = omp_get_thread_num(), nth = omp_get_num_threads();
            size_t per = bytes / 64 / nth * 64, lo = per * tid, hi = tid == nth - 1 ? bytes / 64 * 64 : lo + per;
#if TF_AVX512
            __m512i acc = _mm512_setzero_si512();
            for (size_t i = lo; i < hi; i += 64) acc = _mm512_add_epi64(acc, _mm512_loadu_si512((const void*)(buf + i)));
            total += (uint64_t)_mm512_reduce_add_epi64(acc);
#else
            for (size_t i = lo; i < hi; i += 8) { uint64_t v; memcpy(&v, buf + i, 8); total += v; }
#endif
        }
        sink += total;
    }
    (void)sink;
    return omp_get_wtime() - t0;
}

// Seconds per call, over `reps` back-to-back calls on this thread, of the attention of rep query
// heads q [rep, D] over n positions of one KV head's cache in kv_bits (keys, values [n, D]), the
// heads in pieces of `group` (1: each head reads the cache alone). The cache is copied until the
// copies' bytes reach min_bytes (0: one copy) and call r reads copy r % copies: copies beyond the
// last-level cache make every call stream its cache from memory, as a whole model's decode does.
// out [rep, D] receives the result. Returns a negative TF_E_* code for bad arguments or a failed
// allocation.
double tf_time_kv_attend(int kv_bits, int D, int n, int rep, int group, const float* keys, const float* values,
                         const float* q, float scale, int reps, size_t min_bytes, float* out) {
    const int rc = check_attend_args(kv_bits, D, n, rep, group, keys, values, q, out);
    if (rc != TF_OK) return rc;
    if (reps < 1 || min_bytes > ((size_t)1 << 36)) return TF_E_COUNT;
    try {
        KVCache first;
        std::vector<KVHead> heads = {one_head_cache(first, kv_bits, D, n, keys, values)};
        const size_t copies = std::max<size_t>(1, (min_bytes + first.bytes() - 1) / first.bytes());
        std::vector<KVCache> more(copies - 1);  // sized once: the heads point into their buffers
        for (KVCache& c : more) heads.push_back(one_head_cache(c, kv_bits, D, n, keys, values));
        std::vector<float> sc(attend_scratch(group, heads[0].slots, D));
        const double t0 = omp_get_wtime();
        for (int r = 0; r < reps; r++) attend_all(heads[r % copies], n, rep, group, q, scale, sc.data(), out);
        return (omp_get_wtime() - t0) / reps;
    } catch (...) {
        return TF_E_MEMORY;
    }
}

// out [PH_COUNT] <- thread 0's seconds per phase (Phase, forward.h) since the last call; then reset.
void tf_engine_profile(void* p, double* out) {
    Engine& e = *(Engine*)p;
    for (int i = 0; i < PH_COUNT; i++) { out[i] = e.prof[i]; e.prof[i] = 0; }
}

}  // extern "C"
