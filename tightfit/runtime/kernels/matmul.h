// Matrix kernels: y [M, N] = x [M, K] W^T (+ bias) for a layout.h matrix, rows [n0, n1) at a time
// so that threads can split N. With x quantized as activations.h does, a quantized matmul
// computes exactly
//   y[m, n] = sum_j s(n, g(j)) * (q[n, j] - z(n, g(j))) * sx(m, b(j)) * xq[m, j]
// (up to fp32 summation order): the int8 dot products q . xq run on AVX-512 VNNI (vpdpbusd,
// u8 x s8) and the zero term sum_g s_g z_g xs[m, g] (group_sums) is subtracted after them. Grid
// formats (layout.h) put each code through their level table first, one vpshufb per chunk, and
// multiply the u8 levels the same way (GRID: a template flag, the 2-, 3- and 4-bit kernels: 1 one
// table, 2 a table per row, four masked vpshufb per chunk, layout.h; 2- and 3-bit codes are unpacked
// from their uniform planes to bytes 0..3 / 0..7 first, so the lookup replaces the zero point). Exact
// mode multiplies the same codes by the fp32 x; dense fp16 / fp32 matrices always take the fp32 x.
// SpQR (layout.h) decodes its per-(tile, group) s and real-valued z from the quantized statistics
// as a group comes up (SPQR: a template flag; bits 2, 3, 4) and then runs the same int8 dot products
// and zero term; its outliers are added after a thread's rows, each times the fp32 x of its
// column (add_outliers, outliers.h).
// Without AVX-512 (F, BW, VL, VNNI): AVX2 kernels (matmul_avx2.h) or portable scalar ones, the same sums.
// Part of the one translation unit engine.cpp.
#pragma once

#include "activations.h"
#include "common.h"
#include "layout.h"
#include "matmul_avx2.h"
#include "outliers.h"
#include "tuning.h"


#if TF_AVX512
// tile T (rows 16T .. 16T+15) x tokens [m0, m0+MT): y[m, n] = W[n] . x[m] - zero term + bias.
// Lanes are rows: per chunk one unpack, then per token a 4-byte activation broadcast and one
// vpdpbusd; every segment of min(group, 32) columns (one activation block, one group) is
// converted to fp32 and scaled once.
template <int BITS, int MT, int NT, bool BF16, int GRID, bool SPQR>
static void quant_tile(const tf_mat& W, const QAct& a, int m0, int T, float* y) {
    const int nq = W.Kp / 4, cb = 8 * BITS, Kp = a.Kp;
    const int seg = W.group < 32 && W.G > 1 ? W.group : 32;  // columns per int32 accumulation
    const uint8_t* p[NT];
    for (int u = 0; u < NT; u++) p[u] = W.codes + (size_t)(T + u) * nq * cb;
    const int8_t* xq = a.xq.data() + (size_t)m0 * Kp;
    const float* sx = a.sx.data() + (size_t)m0 * (Kp / 32);
    LevelTable table[NT];
    for (int u = 0; u < NT; u++)
        if (GRID) table[u] = load_levels<GRID>(W, T + u);
    __m512 acc[NT][MT], s[NT];
    // group g's scales; SpQR subtracts its zero term here too, from the s and z it has just decoded
    auto start_group = [&](int g) {
        for (int u = 0; u < NT; u++) {
            if (!SPQR) {
                s[u] = tile_scale<BF16, false>(W, T + u, g);
                continue;
            }
            __m512 z;
            spqr_stats16(W.stats + ((size_t)(T + u) * W.G + g) * 24, s[u], z);
            const __m512 sz = _mm512_mul_ps(s[u], z);
            for (int t = 0; t < MT; t++) acc[u][t] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(a.xs[(size_t)(m0 + t) * W.G + g]), acc[u][t]);
        }
    };
    for (int u = 0; u < NT; u++)
        for (int t = 0; t < MT; t++) acc[u][t] = _mm512_setzero_ps();
    start_group(0);
    int g = 0, next = W.group;
    for (int c0 = 0; c0 < Kp; c0 += seg) {
        if (c0 >= next && g + 1 < W.G) {
            g++;
            next += W.group;
            start_group(g);
        }
        __m512i ia[NT][MT];
        for (int u = 0; u < NT; u++)
            for (int t = 0; t < MT; t++) ia[u][t] = _mm512_setzero_si512();
        for (int k4 = c0 / 4; k4 < (c0 + seg) / 4; k4 += 2) {  // seg is a multiple of 8 columns
            __m512i xa[MT], xb[MT];
            for (int t = 0; t < MT; t++) {
                int32_t x4[2];
                memcpy(x4, xq + (size_t)t * Kp + 4 * k4, 8);
                xa[t] = _mm512_set1_epi32(x4[0]);
                xb[t] = _mm512_set1_epi32(x4[1]);
            }
            for (int u = 0; u < NT; u++) {
                _mm_prefetch((const char*)p[u] + TF_PREFETCH, _MM_HINT_T0);  // 2 chunks <= 128 B: one or two lines
                if (BITS > 4) _mm_prefetch((const char*)p[u] + TF_PREFETCH + 64, _MM_HINT_T0);
                __m512i qa = unpack64<BITS>(p[u]), qb = unpack64<BITS>(p[u] + cb);
                if (GRID) {
                    qa = lookup_levels<GRID>(table[u], qa);
                    qb = lookup_levels<GRID>(table[u], qb);
                }
                p[u] += 2 * cb;
                for (int t = 0; t < MT; t++) {
                    ia[u][t] = _mm512_dpbusd_epi32(ia[u][t], qa, xa[t]);
                    ia[u][t] = _mm512_dpbusd_epi32(ia[u][t], qb, xb[t]);
                }
            }
        }
        for (int t = 0; t < MT; t++) {
            const __m512 sxt = _mm512_set1_ps(sx[(size_t)t * (Kp / 32) + c0 / 32]);
            for (int u = 0; u < NT; u++)
                acc[u][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[u][t]), _mm512_mul_ps(s[u], sxt), acc[u][t]);
        }
    }
    for (int u = 0; u < NT; u++) {
        // zero term: sum_g s_g z_g xs[m, g] (SpQR: subtracted in start_group)
        for (int gi = 0; gi < W.G && !SPQR; gi++) {
            const __m512 sz = tile_scaled_zero<BF16, SPQR>(W, T + u, gi);
            for (int t = 0; t < MT; t++) acc[u][t] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(a.xs[(size_t)(m0 + t) * W.G + gi]), acc[u][t]);
        }
        const int n0 = 16 * (T + u), valid = std::min(16, W.N - n0);
        const __mmask16 mk = (__mmask16)((1u << valid) - 1);
        const __m512 b = W.bias ? _mm512_maskz_loadu_ps(mk, W.bias + n0) : _mm512_setzero_ps();
        for (int t = 0; t < MT; t++) _mm512_mask_storeu_ps(y + (size_t)(m0 + t) * W.N + n0, mk, _mm512_add_ps(acc[u][t], b));
    }
}

// rows [n0, n1), n0 a multiple of 16; at one token TF_DECODE_TILES tiles share each activation broadcast
template <int BITS, int MT, bool BF16, int GRID, bool SPQR>
static void quant_rows_t(const tf_mat& W, const QAct& a, int m0, int n0, int n1, float* y) {
    constexpr int NT = MT == 1 ? TF_DECODE_TILES : 1;
    const int t1 = (n1 + 15) / 16;
    int T = n0 / 16;
    for (; T + NT <= t1; T += NT) quant_tile<BITS, MT, NT, BF16, GRID, SPQR>(W, a, m0, T, y);
    for (; T < t1; T++) quant_tile<BITS, MT, 1, BF16, GRID, SPQR>(W, a, m0, T, y);
}

// GRID: 0 none, 1 a grid or learned format's one level table, 2 a table per row; SPQR: SpQR statistics
// (fp32 from their codes, no bf16 scales)
template <int BITS, int MT, int GRID = 0, bool SPQR = false>
static void quant_rows(const tf_mat& W, const QAct& a, int m0, int n0, int n1, float* y) {
    if (SPQR) quant_rows_t<BITS, MT, false, 0, true>(W, a, m0, n0, n1, y);
    else if (W.scale_bf16) quant_rows_t<BITS, MT, true, GRID, false>(W, a, m0, n0, n1, y);
    else quant_rows_t<BITS, MT, false, GRID, false>(W, a, m0, n0, n1, y);
}

// Exact mode: the same tiles multiplied by the fp32 activations (codes converted to fp32 per
// column of each chunk); slower, bit-for-bit the dequantized weight times x up to summation order.
template <int BITS, bool BF16, int GRID, bool SPQR>
static void quant_tile_exact(const tf_mat& W, const QAct& a, int m, int T, float* y) {
    const int nq = W.Kp / 4, cb = 8 * BITS, K = a.K;
    const int seg = W.group < 32 && W.G > 1 ? W.group : 32;
    const uint8_t* p = W.codes + (size_t)T * nq * cb;
    const float* x = a.x + (size_t)m * K;
    LevelTable table;
    if (GRID) table = load_levels<GRID>(W, T);
    __m512 acc = _mm512_setzero_ps(), s = tile_scale<BF16, SPQR>(W, T, 0);
    int g = 0, next = W.group;
    for (int c0 = 0; c0 < W.Kp; c0 += seg) {
        if (c0 >= next && g + 1 < W.G) { g++; next += W.group; s = tile_scale<BF16, SPQR>(W, T, g); }
        __m512 f = _mm512_setzero_ps();
        for (int k4 = c0 / 4; k4 < (c0 + seg) / 4; k4++, p += cb) {
            const __m512i q = GRID ? lookup_levels<GRID>(table, unpack64<BITS>(p)) : unpack64<BITS>(p);
            for (int c = 0; c < 4; c++) {
                const int col = 4 * k4 + c;
                if (col >= K) break;
                __m512 qc = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(q, 8 * c), _mm512_set1_epi32(0xff)));
                f = _mm512_fmadd_ps(qc, _mm512_set1_ps(x[col]), f);
            }
        }
        acc = _mm512_fmadd_ps(s, f, acc);
    }
    for (int gi = 0; gi < W.G; gi++)
        acc = _mm512_fnmadd_ps(tile_scaled_zero<BF16, SPQR>(W, T, gi), _mm512_set1_ps(a.xs[(size_t)m * W.G + gi]), acc);
    const int n0 = 16 * T, valid = std::min(16, W.N - n0);
    const __mmask16 mk = (__mmask16)((1u << valid) - 1);
    const __m512 b = W.bias ? _mm512_maskz_loadu_ps(mk, W.bias + n0) : _mm512_setzero_ps();
    _mm512_mask_storeu_ps(y + (size_t)m * W.N + n0, mk, _mm512_add_ps(acc, b));
}

template <int BITS, int GRID = 0, bool SPQR = false>
static void quant_rows_exact(const tf_mat& W, const QAct& a, int n0, int n1, float* y) {
    for (int m = 0; m < a.M; m++)
        for (int T = n0 / 16; 16 * T < n1; T++) {
            if (SPQR) quant_tile_exact<BITS, false, 0, true>(W, a, m, T, y);
            else if (W.scale_bf16) quant_tile_exact<BITS, true, GRID, false>(W, a, m, T, y);
            else quant_tile_exact<BITS, false, GRID, false>(W, a, m, T, y);
        }
}

template <int MT>
static void dense_rows(const tf_mat& W, const QAct& a, int m0, int n0, int n1, float* y) {
    const int K = W.K, K16 = K / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (K - K16)) - 1);
    for (int n = n0; n < n1; n++) {
        __m512 acc[MT];
        for (int t = 0; t < MT; t++) acc[t] = _mm512_setzero_ps();
        for (int j = 0; j <= K16; j += 16) {
            const __mmask16 mk = j < K16 ? (__mmask16)0xffff : tail;
            if (!mk) break;
            __m512 w;
            if (W.kind == TF_F16)
                w = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, (const uint16_t*)W.dense + (size_t)n * K + j));
            else
                w = _mm512_maskz_loadu_ps(mk, (const float*)W.dense + (size_t)n * K + j);
            for (int t = 0; t < MT; t++)
                acc[t] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mk, a.x + (size_t)(m0 + t) * K + j), acc[t]);
        }
        for (int t = 0; t < MT; t++) y[(size_t)(m0 + t) * W.N + n] = _mm512_reduce_add_ps(acc[t]) + (W.bias ? W.bias[n] : 0.f);
    }
}
#endif

// Portable fallback with the same arithmetic (int8 block dot products, then scales).
[[maybe_unused]] static void quant_rows_scalar(const tf_mat& W, const QAct& a, int m0, int mt, int n0, int n1, float* y) {
    const int nq = W.Kp / 4, cb = 8 * W.bits, Kp = a.Kp;
    const int seg = W.group < 32 && W.G > 1 ? W.group : 32;
    uint8_t q[64];
    for (int T = n0 / 16; 16 * T < n1; T++)
        for (int m = m0; m < m0 + mt; m++) {
            float acc[16] = {0};
            const uint8_t* p = W.codes + (size_t)T * nq * cb;
            for (int c0 = 0; c0 < Kp; c0 += seg) {
                const int g = std::min(c0 / W.group, W.G - 1);
                int32_t d[16] = {0};
                for (int k4 = c0 / 4; k4 < (c0 + seg) / 4; k4++, p += cb) {
                    unpack_chunk_values(W, T, p, q);
                    for (int r = 0; r < 16; r++)
                        for (int c = 0; c < 4; c++) d[r] += (int32_t)q[4 * r + c] * a.xq[(size_t)m * Kp + 4 * k4 + c];
                }
                for (int r = 0; r < 16; r++) {
                    float s, z;
                    stat_at(W, T, g, r, s, z);
                    acc[r] += (float)d[r] * (s * a.sx[(size_t)m * (Kp / 32) + c0 / 32]);
                }
            }
            for (int r = 0; r < 16; r++) {
                const int n = 16 * T + r;
                if (n >= W.N) break;
                for (int g = 0; g < W.G; g++) {
                    float s, z;
                    stat_at(W, T, g, r, s, z);
                    acc[r] -= s * z * a.xs[(size_t)m * W.G + g];
                }
                y[(size_t)m * W.N + n] = acc[r] + (W.bias ? W.bias[n] : 0.f);
            }
        }
}

[[maybe_unused]] static void dense_rows_scalar(const tf_mat& W, const QAct& a, int m0, int mt, int n0, int n1, float* y) {
    std::vector<float> w(W.K);
    for (int n = n0; n < n1; n++) {
        dequant_row_dense(W, n, w.data());  // SpQR's outliers: add_outliers
        for (int m = m0; m < m0 + mt; m++) {
            float r = 0.f;
            for (int j = 0; j < W.K; j++) r += w[j] * a.x[(size_t)m * W.K + j];
            y[(size_t)m * W.N + n] = r + (W.bias ? W.bias[n] : 0.f);
        }
    }
}

// Rows per block of quant_matmul_rows: about TF_ROW_BLOCK_BYTES of W's codes (or dense values),
// a multiple of the tiles a decode step takes together; all rows when W is smaller.
static inline int row_block(const tf_mat& W) {
    const size_t row_bytes = W.kind == TF_QUANT ? (size_t)W.Kp * W.bits / 8 : (size_t)W.K * (W.kind == TF_F16 ? 2 : 4);
    const int unit = 16 * TF_DECODE_TILES;
    return (int)std::max<size_t>(unit, (size_t)TF_ROW_BLOCK_BYTES / std::max<size_t>(row_bytes, 1) / unit * unit);
}

// matmul_rows without the outliers: the dense part of every kind, rows [n0, n1) (n0 < n1)
static void quant_matmul_rows(const tf_mat& W, const QAct& a, int n0, int n1, float* y) {
#if TF_AVX512
    const int grid = W.kind == TF_QUANT && W.levels != nullptr ? (W.level_rows ? 2 : 1) : 0;  // 2, 3 or 4 bits (layout.py)
    const bool spqr = W.kind == TF_QUANT && W.stats != nullptr;  // SpQR: 2, 3 or 4 bits (layout.py)
#define TF_GRID_BITS(CALL, GRID)                   \
    switch (W.bits) {                              \
        case 2: CALL(2, GRID) break;               \
        case 3: CALL(3, GRID) break;               \
        default: CALL(4, GRID) break;              \
    }
#define TF_EXACT_GRID(B, GRID) quant_rows_exact<B, GRID>(W, a, n0, n1, y);
    if (a.exact && grid) {
        if (grid == 1) TF_GRID_BITS(TF_EXACT_GRID, 1)
        else TF_GRID_BITS(TF_EXACT_GRID, 2)
        return;
    }
#undef TF_EXACT_GRID
    if (a.exact && spqr) {
        switch (W.bits) {
            case 2: quant_rows_exact<2, 0, true>(W, a, n0, n1, y); break;
            case 3: quant_rows_exact<3, 0, true>(W, a, n0, n1, y); break;
            default: quant_rows_exact<4, 0, true>(W, a, n0, n1, y); break;
        }
        return;
    }
    if (a.exact && W.kind == TF_QUANT) {
        switch (W.bits) {
            case 2: quant_rows_exact<2>(W, a, n0, n1, y); break;
            case 3: quant_rows_exact<3>(W, a, n0, n1, y); break;
            case 4: quant_rows_exact<4>(W, a, n0, n1, y); break;
            case 5: quant_rows_exact<5>(W, a, n0, n1, y); break;
            case 6: quant_rows_exact<6>(W, a, n0, n1, y); break;
            default: quant_rows_exact<8>(W, a, n0, n1, y); break;
        }
        return;
    }
    // rows in blocks of about TF_ROW_BLOCK_BYTES, every 4 tokens inside a block: the block is read
    // from memory once per call and from L2 after (each y[m, n] is computed as without blocks)
    const int rb = row_block(W);
    for (int b0 = n0; b0 < n1; b0 += rb)
    for (int m0 = 0, b1 = std::min(n1, b0 + rb); m0 < a.M; m0 += 4) {
        const int mt = std::min(4, a.M - m0);
        if (W.kind != TF_QUANT) {
            switch (mt) {
                case 1: dense_rows<1>(W, a, m0, b0, b1, y); break;
                case 2: dense_rows<2>(W, a, m0, b0, b1, y); break;
                case 3: dense_rows<3>(W, a, m0, b0, b1, y); break;
                default: dense_rows<4>(W, a, m0, b0, b1, y); break;
            }
            continue;
        }
#define TF_TOKENS(B, GRID, SPQR)                                                  \
    switch (mt) {                                                                 \
        case 1: quant_rows<B, 1, GRID, SPQR>(W, a, m0, b0, b1, y); break;         \
        case 2: quant_rows<B, 2, GRID, SPQR>(W, a, m0, b0, b1, y); break;         \
        case 3: quant_rows<B, 3, GRID, SPQR>(W, a, m0, b0, b1, y); break;         \
        default: quant_rows<B, 4, GRID, SPQR>(W, a, m0, b0, b1, y); break;        \
    }
#define TF_BITS_CASE(B) \
    case B: TF_TOKENS(B, 0, false) break;
#define TF_GRID_TOKENS(B, GRID) TF_TOKENS(B, GRID, false)
        if (grid) {
            if (grid == 1) TF_GRID_BITS(TF_GRID_TOKENS, 1)
            else TF_GRID_BITS(TF_GRID_TOKENS, 2)
            continue;
        }
        if (spqr) {
            switch (W.bits) {
                case 2: TF_TOKENS(2, 0, true) break;
                case 3: TF_TOKENS(3, 0, true) break;
                default: TF_TOKENS(4, 0, true) break;
            }
            continue;
        }
        switch (W.bits) {
            TF_BITS_CASE(2) TF_BITS_CASE(3) TF_BITS_CASE(4) TF_BITS_CASE(5) TF_BITS_CASE(6) TF_BITS_CASE(8)
        }
#undef TF_GRID_TOKENS
#undef TF_BITS_CASE
#undef TF_TOKENS
#undef TF_GRID_BITS
    }
#else
#if TF_AVX2
    if (avx2_rows(W, a, n0, n1, y, row_block(W))) return;
#endif
    if (W.kind != TF_QUANT || a.exact) dense_rows_scalar(W, a, 0, a.M, n0, n1, y);
    else quant_rows_scalar(W, a, 0, a.M, n0, n1, y);
#endif
}

// y[M, N] rows [n0, n1) for all tokens of a (the activation must be prepared with group_sums for W).
static void matmul_rows(const tf_mat& W, const QAct& a, int n0, int n1, float* y) {
    if (n0 >= n1) return;
    quant_matmul_rows(W, a, n0, n1, y);
    add_outliers(W, a, n0, n1, y);
}

// This thread's share [n0, n1) of N rows, in multiples of 16 rows.
static inline void share(int N, int tid, int nth, int& n0, int& n1) {
    int units = (N + 15) / 16, per = units / nth, extra = units % nth;
    int u0 = tid * per + std::min(tid, extra), u1 = u0 + per + (tid < extra ? 1 : 0);
    n0 = std::min(N, u0 * 16);
    n1 = std::min(N, u1 * 16);
}

extern "C" {

// y [M, N] = x [M, K] W^T (+ bias), with `threads` threads (the kernel a layer runs with).
void tf_matmul(const tf_mat* W, const float* x, int M, float* y, int threads, int exact) {
    QAct a;
    a.exact = exact != 0;
    quantize_act(x, M, W->K, a);
    if (W->kind == TF_QUANT) group_sums(*W, a);
#pragma omp parallel num_threads(threads)
    {
        int n0, n1;
        share(W->N, omp_get_thread_num(), omp_get_num_threads(), n0, n1);
        matmul_rows(*W, a, n0, n1, y);
    }
}

}  // extern "C"
