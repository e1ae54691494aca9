// Timing entry points, measured inside the library: back-to-back matmuls (the latency profile),
// memory read bandwidth, and the forward step's per-phase clock.
// Part of the one translation unit engine.cpp.
#pragma once

#include "activations.h"
#include "common.h"
#include "forward.h"
#include "matmul.h"

extern "C" {

// Seconds per call of `reps` back-to-back matmuls (activation quantization included), for profiling.
// W: `count` matrices of one shape and kind; call r multiplies by W[r % count]. With copies whose
// bytes exceed the last-level cache, every call streams its weights from memory, as in a decode
// step of a whole model (one matrix alone would stay cache-resident and time too fast).
double tf_time_matmul(const tf_mat* W, int count, const float* x, int M, float* y, int threads, int reps) {
    std::vector<QAct> acts(threads);
    double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads)
    {
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        int n0, n1;
        share(W[0].N, tid, nth, n0, n1);
        for (int r = 0; r < reps; r++) {
            const tf_mat& w = W[r % count];
            quantize_act(x, M, w.K, acts[tid]);
            group_sums(w, acts[tid]);
            matmul_rows(w, acts[tid], n0, n1, y);
#pragma omp barrier
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

// out [PH_COUNT] <- thread 0's seconds per phase (Phase, forward.h) since the last call; then reset.
void tf_engine_profile(void* p, double* out) {
    Engine& e = *(Engine*)p;
    for (int i = 0; i < PH_COUNT; i++) { out[i] = e.prof[i]; e.prof[i] = 0; }
}

}  // extern "C"
