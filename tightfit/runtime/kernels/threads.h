// How the forward step's threads run and meet. A Team of threads kept across forward calls (the
// caller is thread 0) runs each call; its threads meet at a Barrier of their own: sense-reversing,
// on atomics. A waiting thread spins (pause) for TF_BARRIER_SPIN_US, then yields its core
// (sched_yield) until TF_BARRIER_YIELD_US have passed, then sleeps (futex) until the last one
// arrives; the Team's workers wait for the next call in the same way. On a quiet machine the
// threads of a step arrive within microseconds and the spin catches them; a partner that shares
// this thread's core runs during the yields; one that a busy neighbour process keeps off its core
// for a time slice finds this thread asleep, its core free. Where other processes keep the cores
// busy, two threads that meet ~200 times per decode step still wait for each other's time slices:
// Pace then runs decode calls on thread 0 alone, as long as that is faster.
// OpenMP's barrier, by contrast, spins for milliseconds by default (libgomp: GOMP_SPINCOUNT), on a
// core its late partner may be waiting for, or with OMP_WAIT_POLICY=passive sleeps at once and
// pays a wake-up at each barrier even on a quiet machine; its workers wait between parallel regions
// in the same way. bench/neighbour.py measures both.
// Tuning macros (each value a library of its own in build.py's cache):
//   TF_BARRIER           2 (default): a Team and this barrier; 1: this barrier in an OpenMP
//                        parallel region per call; 0: OpenMP's region and `#pragma omp barrier`
//                        (the engine before; for A/B)
//   TF_BARRIER_SPIN_US   microseconds of pause-spinning before the yields
//   TF_BARRIER_YIELD_US  microseconds (from the arrival) until a waiting thread sleeps
//   TF_PACE              1 (default): Pace chooses the team or thread 0 alone per decode call; 0: always the team
// Part of the one translation unit engine.cpp.
#pragma once

#include <atomic>
#include <climits>
#include <thread>

#include "common.h"

#include <sched.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#ifndef TF_BARRIER
#define TF_BARRIER 2
#endif
#ifndef TF_BARRIER_SPIN_US
#define TF_BARRIER_SPIN_US 20
#endif
#ifndef TF_BARRIER_YIELD_US
#define TF_BARRIER_YIELD_US 200
#endif
#ifndef TF_PACE
#define TF_PACE 1
#endif

static inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

// Sleep while *word == old (returns at once if it differs), or until woken.
static inline void sleep_while(std::atomic<int>* word, int old) {
#if defined(__linux__)
    syscall(SYS_futex, (int*)word, FUTEX_WAIT_PRIVATE, old, nullptr, nullptr, 0);
#else
    (void)word, (void)old;
    sched_yield();
#endif
}

static inline void wake_all(std::atomic<int>* word) {
#if defined(__linux__)
    syscall(SYS_futex, (int*)word, FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
#else
    (void)word;
#endif
}

// One barrier for the nth threads of a parallel region (each passes nth, the team's size, and its
// own sense, starting at 0).
struct Barrier {
    alignas(64) std::atomic<int> arrived{0};
    alignas(64) std::atomic<int> sense{0};     // flips when the last thread arrives
    alignas(64) std::atomic<int> sleepers{0};  // threads in (or about to enter) sleep_while

    void wait(int& my_sense, int nth) {
        const int s = my_sense ^= 1;
        if (arrived.fetch_add(1, std::memory_order_acq_rel) == nth - 1) {
            arrived.store(0, std::memory_order_relaxed);  // nobody arrives again before the flip below
            sense.store(s);                               // seq_cst, as the sleepers' count read after it
            if (sleepers.load() > 0) wake_all(&sense);
            return;
        }
        const double t0 = omp_get_wtime();
        for (int i = 1;; i++) {
            if (sense.load(std::memory_order_acquire) == s) return;
            cpu_relax();
            if (i % 64 == 0 && omp_get_wtime() - t0 >= TF_BARRIER_SPIN_US * 1e-6) break;
        }
        while (omp_get_wtime() - t0 < TF_BARRIER_YIELD_US * 1e-6) {
            if (sense.load(std::memory_order_acquire) == s) return;
            sched_yield();
        }
        // Counted before the last look at sense: the last thread either sees the count (and wakes)
        // or this thread sees the flip (and does not sleep); the futex rechecks the word atomically.
        while (sense.load(std::memory_order_acquire) != s) {
            sleepers.fetch_add(1);
            if (sense.load() != s) sleep_while(&sense, s ^ 1);
            sleepers.fetch_sub(1);
        }
    }
};

// Wait at `meet` until the team's nth threads get there; with TF_BARRIER=0 at OpenMP's barrier instead.
static inline void team_barrier(Barrier& meet, int& sense, int nth) {
#if TF_BARRIER
    meet.wait(sense, nth);
#else
    (void)meet, (void)sense, (void)nth;
#pragma omp barrier
#endif
}

// n threads that run one job at a time: the caller is thread 0, n - 1 workers started once wait at
// `start` between jobs (spin, yield, then sleep: a decode loop's next call finds them awake, an idle
// engine's sleep). No allocation per job; launch may throw (std::system_error, std::bad_alloc).
struct Team {
    std::atomic<int> n{1};
    Barrier start, done;
    int start_sense = 0, done_sense = 0;  // thread 0's
    void (*job)(void* ctx, int tid, int nth) = nullptr;
    void* ctx = nullptr;
    bool quit = false;  // published to the workers by the start barrier, as job and ctx are
    std::vector<std::thread> workers;

    void launch(int threads) {
        n = threads;
        workers.reserve(threads - 1);
        for (int t = 1; t < threads; t++) workers.emplace_back([this, t] { work(t); });
    }

    void work(int tid) {
        int my_start = 0, my_done = 0;
        for (;;) {
            start.wait(my_start, n.load());
            if (quit) return;
            job(ctx, tid, n.load());
            done.wait(my_done, n.load());
        }
    }

    // job(ctx, tid, nth) on threads 0 .. nth - 1 (nth: all n, or 1: the caller alone, the workers
    // left waiting); returns when all are done
    void run(void (*job_)(void*, int, int), void* ctx_, int nth) {
        if (nth == 1) return job_(ctx_, 0, 1);
        job = job_, ctx = ctx_;
        start.wait(start_sense, nth);
        job(ctx, 0, nth);
        done.wait(done_sense, nth);
    }

    ~Team() {
        n = (int)workers.size() + 1;  // fewer than asked where launch failed part way
        quit = true;
        start.wait(start_sense, n.load());
        for (std::thread& w : workers) w.join();
    }
};

// Whether a decode call runs on the whole team or on thread 0 alone: whichever took less time per
// call lately (a running average of each), trying the other one now and then: after TF_PACE_TRY
// calls where the two are close, after proportionally more where the other is slower (so trying
// costs about 1/TF_PACE_TRY of the time), after at most TF_PACE_TRY_MAX. Both give the same logits
// (each thread count computes every row and head alike); only the time differs.
#define TF_PACE_TRY 32
#define TF_PACE_TRY_MAX 1024
struct Pace {
    double seconds[2] = {0, 0};  // running average of seconds per decode call: [0] thread 0 alone, [1] the team
    long calls = 0, next_try = 0;

    bool team() {
        if (seconds[1] == 0) return true;  // each timed once first
        if (seconds[0] == 0) return false;
        const bool best = seconds[1] <= seconds[0];
        if (++calls < next_try) return best;
        const double slower = seconds[!best] / seconds[best];  // >= 1
        next_try = calls + (long)std::min<double>(TF_PACE_TRY_MAX, TF_PACE_TRY * slower);
        return !best;
    }

    void record(bool team, double s) {
        double& m = seconds[team];
        m = m == 0 ? s : m + 0.25 * (s - m);
    }
};
