// tightfit CPU engine: low-bit matrix kernels and a decoder forward step, plain C ABI (ctypes).
//
// Weight layout (made by runtime/kernels/layout.py, "tf-tile16" v2). A quantized matrix W [N, K]
// is padded to Np = ceil(N/16)*16 rows and Kp = ceil(K/32)*32 columns with zero codes and cut
// into tiles of 16 rows; a tile is Kp/4 chunks, chunk k4 holding the 64 codes of its 16 rows x 4
// columns 4*k4 .. 4*k4+3 in the order o = 4*row + col, stored as bit planes, low bits first:
//   nibble plane (4 bits, 32 B): byte j = code[j] & 15 | (code[j+32] & 15) << 4
//   crumb plane  (2 bits, 16 B): byte j = c[j] | c[j+16] << 2 | c[j+32] << 4 | c[j+48] << 6
//   bit plane    (1 bit,   8 B): bit j of a little-endian u64 = the code bit
//   byte plane   (8 bits, 64 B): code[j]
//   bits 2 = crumb; 3 = crumb + bit(2); 4 = nibble; 5 = nibble + bit(4); 6 = nibble + crumb(4,5); 8 = byte
// so a chunk holds 8*bits bytes, and one AVX-512 vpdpbusd multiplies it by 4 activations
// broadcast to every row: lanes are rows. Statistics per (tile, group, row): an fp16 or bf16 scale
// s and a u8 zero z (symmetric formats: z = 2^(bits-1)), each (tile, group) 16 contiguous values.
// w = (q - z) * s, exactly as the reference dequantizes.
//
// Activations are quantized per token to int8 in blocks of 32 (x ~ sx_b * xq, sx_b = amax_b/127,
// round to nearest even), as llama.cpp's Q8_0 does; a quantized matmul then computes exactly
//   y[m, n] = sum_j s(n, g(j)) * (q[n, j] - z(n, g(j))) * sx(m, b(j)) * xq[m, j]
// (up to fp32 summation order): the int8 dot products run on AVX-512 VNNI (vpdpbusd, u8 x s8).
// Dense fp16 / fp32 matrices use exact fp32 activations.
//
// Without AVX-512 (BW, VL, VNNI) the same functions compile to portable scalar code.

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define TF_AVX512 1
#include <immintrin.h>
#else
#define TF_AVX512 0
#endif

#define TF_ABI_VERSION 4
// Tuning knobs, chosen by measurement (bench/kernel_ab.py: variants built side by side, timed
// round-robin in one process; SmolLM2-135M w4g32-sym, 2-core Zen 5, 2026-11-23):
//   TF_PREFETCH      software prefetch distance in bytes; 1024 vs 0: 162 vs 140 tok/s at 1 thread,
//                    207 vs 194 at 2 threads (512-2048 alike)
//   TF_DECODE_TILES  row tiles sharing each activation broadcast at decode; 2 vs 1: 105 vs 140 tok/s
//   TF_TWO_CHAINS    two vpdpbusd accumulators per tile; 136 vs 140 tok/s (no gain)
#ifndef TF_PREFETCH
#define TF_PREFETCH 1024
#endif
#ifndef TF_DECODE_TILES
#define TF_DECODE_TILES 1
#endif
#ifndef TF_TWO_CHAINS
#define TF_TWO_CHAINS 0
#endif

extern "C" {

enum { TF_QUANT = 0, TF_F16 = 1, TF_F32 = 2 };

typedef struct {
    int32_t kind;   // TF_QUANT, TF_F16, TF_F32
    int32_t N, K;   // out_features, in_features
    int32_t Kp;     // K padded to a multiple of 32 (quant)
    int32_t bits;   // code bits (quant)
    int32_t group;  // group width along K; K for per channel (quant)
    int32_t G;      // groups per row
    int32_t scale_bf16;  // scales are bf16 (1) or fp16 (0)
    const uint8_t* codes;    // [Np/16, Kp/4, 8*bits]
    const uint16_t* scales;  // [Np/16, G, 16]
    const uint8_t* zeros;    // [Np/16, G, 16]
    const void* dense;       // fp16 or fp32 [N, K]
    const float* bias;       // [N] or NULL
} tf_mat;

typedef struct {
    const float* attn_norm;  // [hidden]
    const float* mlp_norm;   // [hidden]
    tf_mat q, k, v, o, gate, up, down;
} tf_layer;

typedef struct {
    int32_t n_layers, hidden, n_heads, n_kv_heads, head_dim, inter, vocab;
    int32_t max_pos;    // KV cache capacity
    int32_t max_batch;  // most tokens per forward call
    int32_t threads;
    int32_t exact;      // 1: quantized matmuls take fp32 activations (reference-exact, slower)
    float eps;          // RMSNorm epsilon
    float attn_scale;   // softmax scale, head_dim^-0.5
    const float* rope_cos;  // [max_pos, head_dim/2]
    const float* rope_sin;  // [max_pos, head_dim/2]
    tf_mat embed;           // [vocab, hidden], rows looked up
    tf_mat head;            // [vocab, hidden]
    const float* final_norm;
    const tf_layer* layers;  // [n_layers]
} tf_config;

int tf_abi_version(void) { return TF_ABI_VERSION; }
int tf_has_avx512(void) { return TF_AVX512; }

}  // extern "C"

// ---------------------------------------------------------------------------------------------
// scalars

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalize
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// fp32 -> fp16, round to nearest even (the KV cache's storage)
static inline uint16_t f32_to_f16(float f) {
#if TF_AVX512
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    x &= 0x7fffffff;
    if (x >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (x > 0x7f800000 ? 0x200 : 0));  // inf / nan
    if (x >= 0x477ff000) return (uint16_t)(sign | 0x7c00);                                // overflow
    if (x < 0x38800000) {                                                                   // subnormal or zero
        float a;
        memcpy(&a, &x, 4);
        return (uint16_t)(sign | (uint32_t)lrintf(a * 16777216.f));  // a / 2^-24, nearest even
    }
    const uint32_t mant = x & 0x1fff, base = (x - 0x38000000) >> 13;
    uint32_t h = base + (mant > 0x1000 || (mant == 0x1000 && (base & 1)));
    return (uint16_t)(sign | h);
#endif
}

static inline float scale_at(const tf_mat& W, size_t i) {
    return W.scale_bf16 ? bf16_to_f32(W.scales[i]) : f16_to_f32(W.scales[i]);
}

// Codes of chunk c of row n, scalar (reference for the layout; embedding lookups; fallback).
static void unpack_chunk_scalar(const uint8_t* p, int bits, uint8_t out[64]) {
    auto nib = [&](const uint8_t* s) { for (int j = 0; j < 32; j++) { out[j] = s[j] & 15; out[j + 32] = s[j] >> 4; } };
    auto crumb = [&](const uint8_t* s, int sh) {
        for (int j = 0; j < 16; j++)
            for (int t = 0; t < 4; t++) out[j + 16 * t] |= ((s[j] >> (2 * t)) & 3) << sh;
    };
    auto bit = [&](const uint8_t* s, int sh) {
        for (int j = 0; j < 64; j++) out[j] |= ((s[j >> 3] >> (j & 7)) & 1) << sh;
    };
    memset(out, 0, 64);
    switch (bits) {
        case 2: crumb(p, 0); break;
        case 3: crumb(p, 0); bit(p + 16, 2); break;
        case 4: nib(p); break;
        case 5: nib(p); bit(p + 32, 4); break;
        case 6: nib(p); crumb(p + 32, 4); break;
        case 8: memcpy(out, p, 64); break;
    }
}

// Row n of W dequantized to fp32 [K] (exactly (q - z) * s, as the reference).
static void dequant_row(const tf_mat& W, int n, float* out) {
    if (W.kind == TF_F32) { memcpy(out, (const float*)W.dense + (size_t)n * W.K, sizeof(float) * W.K); return; }
    if (W.kind == TF_F16) {
        const uint16_t* r = (const uint16_t*)W.dense + (size_t)n * W.K;
        for (int j = 0; j < W.K; j++) out[j] = f16_to_f32(r[j]);
        return;
    }
    const int nq = W.Kp / 4, cb = 8 * W.bits, T = n / 16, r = n % 16;
    uint8_t q[64];
    for (int k4 = 0; k4 < nq && 4 * k4 < W.K; k4++) {
        unpack_chunk_scalar(W.codes + ((size_t)T * nq + k4) * cb, W.bits, q);
        for (int c = 0; c < 4 && 4 * k4 + c < W.K; c++) {
            int col = 4 * k4 + c, g = col / W.group;
            size_t si = ((size_t)T * W.G + g) * 16 + r;
            out[col] = ((float)q[4 * r + c] - (float)W.zeros[si]) * scale_at(W, si);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// activations

struct QAct {  // x [M, K] quantized per token in blocks of 32 (see header)
    int M = 0, K = 0, Kp = 0;
    std::vector<int8_t> xq;    // [M, Kp]
    std::vector<float> sx;     // [M, Kp/32]
    std::vector<float> psum;   // [M, Kp/16]: sx_b * sum of xq over each 16 columns
    std::vector<float> xs;     // [M, G]: per-group sums for the zero term (filled per matrix)
    const float* x = nullptr;  // the fp32 input [M, K] (dense matrices, exact mode)
    bool exact = false;        // quantized matrices multiply x itself (fp32), not its int8 blocks
};

static void quantize_act(const float* x, int M, int K, QAct& a) {
    a.M = M; a.K = K; a.Kp = (K + 31) / 32 * 32; a.x = x;
    const int Kp = a.Kp, nb = Kp / 32;
    a.xq.assign((size_t)M * Kp, 0);
    a.sx.resize((size_t)M * nb);
    a.psum.resize((size_t)M * (Kp / 16));
    for (int m = 0; m < M; m++) {
        const float* xr = x + (size_t)m * K;
        for (int b = 0; b < nb; b++) {
            int lo = b * 32, hi = std::min(lo + 32, K);
            float amax = 0.f;
            for (int j = lo; j < hi; j++) amax = std::max(amax, fabsf(xr[j]));
            float id = amax > 0.f ? 127.f / amax : 0.f;
            a.sx[(size_t)m * nb + b] = amax / 127.f;
            int8_t* q = a.xq.data() + (size_t)m * Kp;
            for (int j = lo; j < hi; j++) q[j] = (int8_t)lrintf(xr[j] * id);
        }
        for (int p = 0; p < Kp / 16; p++) {
            int s = 0;
            const int8_t* q = a.xq.data() + (size_t)m * Kp + p * 16;
            for (int j = 0; j < 16; j++) s += q[j];
            a.psum[(size_t)m * (Kp / 16) + p] = (float)s * a.sx[(size_t)m * nb + p / 2];
        }
    }
}

// Per-group sums of the dequantized activation for W's grouping: xs [M, G].
static void group_sums(const tf_mat& W, QAct& a) {
    if (W.kind != TF_QUANT) return;  // dense matrices multiply the exact activations
    a.xs.assign((size_t)a.M * W.G, 0.f);
    if (a.exact) {
        for (int m = 0; m < a.M; m++)
            for (int j = 0; j < a.K; j++) a.xs[(size_t)m * W.G + std::min(j / W.group, W.G - 1)] += a.x[(size_t)m * a.K + j];
        return;
    }
    const int np = a.Kp / 16;
    for (int m = 0; m < a.M; m++)
        for (int p = 0; p < np; p++) {
            int g = std::min(p * 16 / W.group, W.G - 1);  // padding columns belong to the last group
            a.xs[(size_t)m * W.G + g] += a.psum[(size_t)m * np + p];
        }
}

// ---------------------------------------------------------------------------------------------
// quantized rows

#if TF_AVX512
static inline __m512i nib_plane(const uint8_t* p) {
    const __m512i sh = _mm512_set_epi64(0x0004000400040004LL, 0x0004000400040004LL, 0x0004000400040004LL,
                                        0x0004000400040004LL, 0, 0, 0, 0);
    __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_and_si512(_mm512_srlv_epi16(v, sh), _mm512_set1_epi8(0x0f));
}
static inline __m512i crumb_plane(const uint8_t* p) {
    const __m512i sh = _mm512_set_epi64(0x0006000600060006LL, 0x0006000600060006LL, 0x0004000400040004LL,
                                        0x0004000400040004LL, 0x0002000200020002LL, 0x0002000200020002LL, 0, 0);
    __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)p));
    return _mm512_and_si512(_mm512_srlv_epi16(v, sh), _mm512_set1_epi8(0x03));
}
static inline __m512i bit_plane(const uint8_t* p, int shift) {
    uint64_t m;
    memcpy(&m, p, 8);
    return _mm512_maskz_mov_epi8(_cvtu64_mask64(m), _mm512_set1_epi8((char)(1 << shift)));
}
template <int BITS>
static inline __m512i unpack64(const uint8_t* p) {
    if (BITS == 2) return crumb_plane(p);
    if (BITS == 3) return _mm512_or_si512(crumb_plane(p), bit_plane(p + 16, 2));
    if (BITS == 4) return nib_plane(p);
    if (BITS == 5) return _mm512_or_si512(nib_plane(p), bit_plane(p + 32, 4));
    if (BITS == 6) return _mm512_or_si512(nib_plane(p), _mm512_slli_epi16(crumb_plane(p + 32), 4));
    return _mm512_loadu_si512((const void*)p);
}
template <bool BF16>
static inline __m512 load16_scales(const uint16_t* s) {
    __m256i h = _mm256_loadu_si256((const __m256i*)s);
    if (BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

// tile T (rows 16T .. 16T+15) x tokens [m0, m0+MT): y[m, n] = W[n] . x[m] - zero term + bias.
// Lanes are rows: per chunk one unpack, then per token a 4-byte activation broadcast and one
// vpdpbusd; every segment of min(group, 32) columns (one activation block, one group) is
// converted to fp32 and scaled once.
template <int BITS, int MT, int NT, bool BF16>
static void quant_tile(const tf_mat& W, const QAct& a, int m0, int T, float* y) {
    const int nq = W.Kp / 4, cb = 8 * BITS, Kp = a.Kp;
    const int seg = W.group < 32 && W.G > 1 ? W.group : 32;  // columns per int32 accumulation
    const uint8_t* p[NT];
    const uint16_t* st[NT];
    for (int u = 0; u < NT; u++) {
        p[u] = W.codes + (size_t)(T + u) * nq * cb;
        st[u] = W.scales + (size_t)(T + u) * W.G * 16;
    }
    const int8_t* xq = a.xq.data() + (size_t)m0 * Kp;
    const float* sx = a.sx.data() + (size_t)m0 * (Kp / 32);
    __m512 acc[NT][MT], s[NT];
    for (int u = 0; u < NT; u++) {
        s[u] = load16_scales<BF16>(st[u]);
        for (int t = 0; t < MT; t++) acc[u][t] = _mm512_setzero_ps();
    }
    int g = 0, next = W.group;
    for (int c0 = 0; c0 < Kp; c0 += seg) {
        if (c0 >= next && g + 1 < W.G) {
            g++;
            next += W.group;
            for (int u = 0; u < NT; u++) s[u] = load16_scales<BF16>(st[u] + (size_t)g * 16);
        }
        // two chains per (tile, token): vpdpbusd latency, not throughput, would bind otherwise
        __m512i ia[NT][MT], ib[NT][MT];
        for (int u = 0; u < NT; u++)
            for (int t = 0; t < MT; t++) ia[u][t] = ib[u][t] = _mm512_setzero_si512();
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
                const __m512i qa = unpack64<BITS>(p[u]), qb = unpack64<BITS>(p[u] + cb);
                p[u] += 2 * cb;
                for (int t = 0; t < MT; t++) {
                    ia[u][t] = _mm512_dpbusd_epi32(ia[u][t], qa, xa[t]);
#if TF_TWO_CHAINS
                    ib[u][t] = _mm512_dpbusd_epi32(ib[u][t], qb, xb[t]);
#else
                    ia[u][t] = _mm512_dpbusd_epi32(ia[u][t], qb, xb[t]);
#endif
                }
            }
        }
        for (int t = 0; t < MT; t++) {
            const __m512 sxt = _mm512_set1_ps(sx[(size_t)t * (Kp / 32) + c0 / 32]);
            for (int u = 0; u < NT; u++)
                acc[u][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(ia[u][t], ib[u][t])), _mm512_mul_ps(s[u], sxt), acc[u][t]);
        }
    }
    for (int u = 0; u < NT; u++) {
        // zero term: sum_g s_g z_g xs[m, g]
        const uint8_t* zt = W.zeros + (size_t)(T + u) * W.G * 16;
        for (int gi = 0; gi < W.G; gi++) {
            __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(zt + (size_t)gi * 16))));
            __m512 sz = _mm512_mul_ps(load16_scales<BF16>(st[u] + (size_t)gi * 16), z);
            for (int t = 0; t < MT; t++) acc[u][t] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(a.xs[(size_t)(m0 + t) * W.G + gi]), acc[u][t]);
        }
        const int n0 = 16 * (T + u), valid = std::min(16, W.N - n0);
        const __mmask16 mk = (__mmask16)((1u << valid) - 1);
        const __m512 b = W.bias ? _mm512_maskz_loadu_ps(mk, W.bias + n0) : _mm512_setzero_ps();
        for (int t = 0; t < MT; t++) _mm512_mask_storeu_ps(y + (size_t)(m0 + t) * W.N + n0, mk, _mm512_add_ps(acc[u][t], b));
    }
}

// rows [n0, n1), n0 a multiple of 16; at one token two tiles share each activation broadcast
template <int BITS, int MT, bool BF16>
static void quant_rows_t(const tf_mat& W, const QAct& a, int m0, int n0, int n1, float* y) {
    constexpr int NT = MT == 1 ? TF_DECODE_TILES : 1;
    const int t1 = (n1 + 15) / 16;
    int T = n0 / 16;
    for (; T + NT <= t1; T += NT) quant_tile<BITS, MT, NT, BF16>(W, a, m0, T, y);
    for (; T < t1; T++) quant_tile<BITS, MT, 1, BF16>(W, a, m0, T, y);
}

template <int BITS, int MT>
static void quant_rows(const tf_mat& W, const QAct& a, int m0, int n0, int n1, float* y) {
    if (W.scale_bf16) quant_rows_t<BITS, MT, true>(W, a, m0, n0, n1, y);
    else quant_rows_t<BITS, MT, false>(W, a, m0, n0, n1, y);
}

// Exact mode: the same tiles multiplied by the fp32 activations (codes converted to fp32 per
// column of each chunk); slower, bit-for-bit the dequantized weight times x up to summation order.
template <int BITS, bool BF16>
static void quant_tile_exact(const tf_mat& W, const QAct& a, int m, int T, float* y) {
    const int nq = W.Kp / 4, cb = 8 * BITS, K = a.K;
    const int seg = W.group < 32 && W.G > 1 ? W.group : 32;
    const uint8_t* p = W.codes + (size_t)T * nq * cb;
    const uint16_t* st = W.scales + (size_t)T * W.G * 16;
    const float* x = a.x + (size_t)m * K;
    __m512 acc = _mm512_setzero_ps(), s = load16_scales<BF16>(st);
    int g = 0, next = W.group;
    for (int c0 = 0; c0 < W.Kp; c0 += seg) {
        if (c0 >= next && g + 1 < W.G) { g++; next += W.group; s = load16_scales<BF16>(st + (size_t)g * 16); }
        __m512 f = _mm512_setzero_ps();
        for (int k4 = c0 / 4; k4 < (c0 + seg) / 4; k4++, p += cb) {
            const __m512i q = unpack64<BITS>(p);
            for (int c = 0; c < 4; c++) {
                const int col = 4 * k4 + c;
                if (col >= K) break;
                __m512 qc = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(q, 8 * c), _mm512_set1_epi32(0xff)));
                f = _mm512_fmadd_ps(qc, _mm512_set1_ps(x[col]), f);
            }
        }
        acc = _mm512_fmadd_ps(s, f, acc);
    }
    const uint8_t* zt = W.zeros + (size_t)T * W.G * 16;
    for (int gi = 0; gi < W.G; gi++) {
        __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(zt + (size_t)gi * 16))));
        acc = _mm512_fnmadd_ps(_mm512_mul_ps(load16_scales<BF16>(st + (size_t)gi * 16), z), _mm512_set1_ps(a.xs[(size_t)m * W.G + gi]), acc);
    }
    const int n0 = 16 * T, valid = std::min(16, W.N - n0);
    const __mmask16 mk = (__mmask16)((1u << valid) - 1);
    const __m512 b = W.bias ? _mm512_maskz_loadu_ps(mk, W.bias + n0) : _mm512_setzero_ps();
    _mm512_mask_storeu_ps(y + (size_t)m * W.N + n0, mk, _mm512_add_ps(acc, b));
}

template <int BITS>
static void quant_rows_exact(const tf_mat& W, const QAct& a, int n0, int n1, float* y) {
    for (int m = 0; m < a.M; m++)
        for (int T = n0 / 16; 16 * T < n1; T++) {
            if (W.scale_bf16) quant_tile_exact<BITS, true>(W, a, m, T, y);
            else quant_tile_exact<BITS, false>(W, a, m, T, y);
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
                    unpack_chunk_scalar(p, W.bits, q);
                    for (int r = 0; r < 16; r++)
                        for (int c = 0; c < 4; c++) d[r] += (int32_t)q[4 * r + c] * a.xq[(size_t)m * Kp + 4 * k4 + c];
                }
                for (int r = 0; r < 16; r++)
                    acc[r] += (float)d[r] * (scale_at(W, ((size_t)T * W.G + g) * 16 + r) * a.sx[(size_t)m * (Kp / 32) + c0 / 32]);
            }
            for (int r = 0; r < 16; r++) {
                const int n = 16 * T + r;
                if (n >= W.N) break;
                for (int g = 0; g < W.G; g++) {
                    size_t si = ((size_t)T * W.G + g) * 16 + r;
                    acc[r] -= scale_at(W, si) * (float)W.zeros[si] * a.xs[(size_t)m * W.G + g];
                }
                y[(size_t)m * W.N + n] = acc[r] + (W.bias ? W.bias[n] : 0.f);
            }
        }
}

[[maybe_unused]] static void dense_rows_scalar(const tf_mat& W, const QAct& a, int m0, int mt, int n0, int n1, float* y) {
    std::vector<float> w(W.K);
    for (int n = n0; n < n1; n++) {
        dequant_row(W, n, w.data());
        for (int m = m0; m < m0 + mt; m++) {
            float r = 0.f;
            for (int j = 0; j < W.K; j++) r += w[j] * a.x[(size_t)m * W.K + j];
            y[(size_t)m * W.N + n] = r + (W.bias ? W.bias[n] : 0.f);
        }
    }
}

// y[M, N] rows [n0, n1) for all tokens of a (the activation must be prepared with group_sums for W).
static void matmul_rows(const tf_mat& W, const QAct& a, int n0, int n1, float* y) {
    if (n0 >= n1) return;
#if TF_AVX512
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
    for (int m0 = 0; m0 < a.M; m0 += 4) {
        const int mt = std::min(4, a.M - m0);
        if (W.kind != TF_QUANT) {
            switch (mt) {
                case 1: dense_rows<1>(W, a, m0, n0, n1, y); break;
                case 2: dense_rows<2>(W, a, m0, n0, n1, y); break;
                case 3: dense_rows<3>(W, a, m0, n0, n1, y); break;
                default: dense_rows<4>(W, a, m0, n0, n1, y); break;
            }
            continue;
        }
#define TF_BITS_CASE(B)                                                  \
    case B:                                                              \
        switch (mt) {                                                    \
            case 1: quant_rows<B, 1>(W, a, m0, n0, n1, y); break;        \
            case 2: quant_rows<B, 2>(W, a, m0, n0, n1, y); break;        \
            case 3: quant_rows<B, 3>(W, a, m0, n0, n1, y); break;        \
            default: quant_rows<B, 4>(W, a, m0, n0, n1, y); break;       \
        }                                                                \
        break;
        switch (W.bits) {
            TF_BITS_CASE(2) TF_BITS_CASE(3) TF_BITS_CASE(4) TF_BITS_CASE(5) TF_BITS_CASE(6) TF_BITS_CASE(8)
        }
#undef TF_BITS_CASE
    }
#else
    if (W.kind != TF_QUANT || a.exact) dense_rows_scalar(W, a, 0, a.M, n0, n1, y);
    else quant_rows_scalar(W, a, 0, a.M, n0, n1, y);
#endif
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

// rows [n0, n0+count) of W dequantized: out [count, K] fp32
void tf_dequant_rows(const tf_mat* W, int n0, int count, float* out) {
    for (int i = 0; i < count; i++) dequant_row(*W, n0 + i, out + (size_t)i * W->K);
}

// x [M, K] -> its block-int8 dequantization sx * xq [M, K] (what quantized matmuls multiply by)
void tf_quantize_activations(const float* x, int M, int K, float* out) {
    QAct a;
    quantize_act(x, M, K, a);
    for (int m = 0; m < M; m++)
        for (int j = 0; j < K; j++)
            out[(size_t)m * K + j] = a.sx[(size_t)m * (a.Kp / 32) + j / 32] * (float)a.xq[(size_t)m * a.Kp + j];
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

}  // extern "C"

// ---------------------------------------------------------------------------------------------
// the decoder

struct Engine {
    tf_config cfg;
    std::vector<uint16_t> kcache, vcache;    // fp16 keys [L, KVH, max_pos/16, D, 16]; values [L, KVH, max_pos, D]
    int pos_blocks = 0, max_pos16 = 0;       // max_pos rounded up to whole blocks of 16
    std::vector<std::vector<float>> res, xp; // per thread [B, hidden]: residual stream, normed input
    std::vector<float> q, k, v, att;         // [B, H*D], [B, KVH*D] x2, [B, H*D]
    std::vector<float> o, gate, up, down;    // [B, hidden], [B, inter] x2, [B, hidden]
    std::vector<QAct> acts;                  // one per thread
    std::vector<std::vector<float>> scores;  // one per thread [max_pos]
    double prof[8] = {0};                    // thread 0's seconds per phase (see tf_engine_profile)
};

static void rmsnorm(const float* x, const float* w, float eps, int H, float* out) {
    double ss = 0.0;
    for (int j = 0; j < H; j++) ss += (double)x[j] * x[j];
    float r = 1.f / sqrtf((float)(ss / H) + eps);
    for (int j = 0; j < H; j++) out[j] = w[j] * (x[j] * r);
}

static void rope(float* v, const float* cos_, const float* sin_, int D) {
    const int d2 = D / 2;
    for (int i = 0; i < d2; i++) {
        float x1 = v[i], x2 = v[i + d2];
        v[i] = x1 * cos_[i] - x2 * sin_[i];
        v[i + d2] = x2 * cos_[i] + x1 * sin_[i];
    }
}

#if TF_AVX512
// e^x for x <= 0 (softmax, SiLU of a clamped argument): 2^n * p(r), r = x - n ln2, |r| <= ln2/2;
// degree-6 polynomial, relative error below 2e-7.
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

// out [D] = softmax(q . k_j * scale, j < n) . v_j; fp16 keys in blocks of 16 positions [n/16, D, 16],
// fp16 values [n, D].
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
    if (D == 64) {  // four independent accumulators, two positions per step
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

extern "C" {

void* tf_engine_create(const tf_config* cfg) {
    Engine* e = new Engine();
    e->cfg = *cfg;
    const tf_config& c = e->cfg;
    const size_t D = c.head_dim, B = c.max_batch;
    e->pos_blocks = (c.max_pos + 15) / 16;
    e->max_pos16 = e->pos_blocks * 16;
    e->kcache.assign((size_t)c.n_layers * c.n_kv_heads * e->max_pos16 * D, 0);
    e->vcache.assign(e->kcache.size(), 0);
    e->res.resize(std::max(1, c.threads));
    e->xp.resize(std::max(1, c.threads));
    e->q.resize(B * c.n_heads * D);
    e->att.resize(B * c.n_heads * D);
    e->k.resize(B * c.n_kv_heads * D);
    e->v.resize(B * c.n_kv_heads * D);
    e->o.resize(B * c.hidden);
    e->down.resize(B * c.hidden);
    e->gate.resize(B * c.inter);
    e->up.resize(B * c.inter);
    e->acts.resize(std::max(1, c.threads));
    e->scores.assign(std::max(1, c.threads), std::vector<float>(e->max_pos16));
    return e;
}

void tf_engine_free(void* p) { delete (Engine*)p; }

// Thread 0's seconds since the last call, per phase: 0 norm+quantize, 1 q/k/v, 2 cache+attention,
// 3 o, 4 gate/up+SiLU, 5 down, 6 final norm+head, 7 waiting at barriers; then reset.
void tf_engine_profile(void* p, double* out) {
    Engine& e = *(Engine*)p;
    for (int i = 0; i < 8; i++) { out[i] = e.prof[i]; e.prof[i] = 0; }
}

// Run tokens ids[0..M) at positions pos..pos+M-1 (M <= max_batch, pos+M <= max_pos); writes the
// logits of the last token [vocab] (all_logits = 0) or of every token [M, vocab] to `logits`.
int tf_engine_forward(void* p, const int32_t* ids, int M, int pos, float* logits, int all_logits) {
    Engine& e = *(Engine*)p;
    const tf_config& c = e.cfg;
    if (M < 1 || M > c.max_batch || pos < 0 || pos + M > c.max_pos) return -1;
    for (int i = 0; i < M; i++) if (ids[i] < 0 || ids[i] >= c.vocab) return -2;
    const int H = c.hidden, D = c.head_dim, NH = c.n_heads, KVH = c.n_kv_heads, I = c.inter, d2 = D / 2;
    const int rep = NH / KVH;
#pragma omp parallel num_threads(c.threads)
    {
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        QAct& a = e.acts[tid];
        a.exact = c.exact != 0;
        // Every thread keeps its own copy of the residual stream and norms/quantizes the whole
        // (small) input itself; threads meet only where one needs rows another one computed.
        std::vector<float>& res = e.res[tid];  // [M, hidden]
        std::vector<float>& xp = e.xp[tid];    // [M, hidden]
        res.resize((size_t)M * H);
        xp.resize((size_t)M * H);
        for (int i = 0; i < M; i++) dequant_row(c.embed, ids[i], res.data() + (size_t)i * H);
        int n0, n1;
        double tp = omp_get_wtime();
        auto lap = [&](int phase) { if (tid == 0) { double t = omp_get_wtime(); e.prof[phase] += t - tp; tp = t; } };
        for (int L = 0; L < c.n_layers; L++) {
            const tf_layer& ly = c.layers[L];
            uint16_t* kc = e.kcache.data() + (size_t)L * KVH * e.max_pos16 * D;
            uint16_t* vc = e.vcache.data() + (size_t)L * KVH * e.max_pos16 * D;
            for (int i = 0; i < M; i++) rmsnorm(res.data() + (size_t)i * H, ly.attn_norm, c.eps, H, xp.data() + (size_t)i * H);
            quantize_act(xp.data(), M, H, a);
            lap(0);
            group_sums(ly.q, a); share(ly.q.N, tid, nth, n0, n1); matmul_rows(ly.q, a, n0, n1, e.q.data());
            group_sums(ly.k, a); share(ly.k.N, tid, nth, n0, n1); matmul_rows(ly.k, a, n0, n1, e.k.data());
            group_sums(ly.v, a); share(ly.v.N, tid, nth, n0, n1); matmul_rows(ly.v, a, n0, n1, e.v.data());
            lap(1);
#pragma omp barrier
            lap(7);
            // rotate the new keys and store them in the cache (blocks of 16 positions), values as they are
            for (int it = tid; it < M * KVH; it += nth) {
                const int i = it / KVH, kh = it % KVH, ps = pos + i;
                float kr[512];
                memcpy(kr, e.k.data() + (size_t)i * KVH * D + kh * D, sizeof(float) * D);
                rope(kr, c.rope_cos + (size_t)ps * d2, c.rope_sin + (size_t)ps * d2, D);
                uint16_t* kblk = kc + (((size_t)kh * e.pos_blocks + ps / 16) * D) * 16 + ps % 16;
                for (int d = 0; d < D; d++) kblk[(size_t)d * 16] = f32_to_f16(kr[d]);
                const float* vsrc = e.v.data() + (size_t)i * KVH * D + kh * D;
                uint16_t* vdst = vc + ((size_t)kh * e.max_pos16 + ps) * D;
                for (int d = 0; d < D; d++) vdst[d] = f32_to_f16(vsrc[d]);
            }
#pragma omp barrier
            // causal attention, one (token, head) at a time; softmax in fp32
            float* sc = e.scores[tid].data();
            for (int it = tid; it < M * NH; it += nth) {
                const int i = it / NH, hd = it % NH, kh = hd / rep, ps = pos + i;
                float* qv = e.q.data() + (size_t)i * NH * D + hd * D;
                rope(qv, c.rope_cos + (size_t)ps * d2, c.rope_sin + (size_t)ps * d2, D);
                const uint16_t* kb = kc + (size_t)kh * e.pos_blocks * D * 16;
                const uint16_t* vb = vc + (size_t)kh * e.max_pos16 * D;
                float* out = e.att.data() + (size_t)i * NH * D + hd * D;
                attend(qv, kb, vb, ps + 1, D, c.attn_scale, sc, out);
            }
            lap(2);
#pragma omp barrier
            lap(7);
            quantize_act(e.att.data(), M, NH * D, a);
            group_sums(ly.o, a); share(ly.o.N, tid, nth, n0, n1); matmul_rows(ly.o, a, n0, n1, e.o.data());
            lap(3);
#pragma omp barrier
            lap(7);
            for (size_t j = 0; j < (size_t)M * H; j++) res[j] += e.o[j];
            for (int i = 0; i < M; i++) rmsnorm(res.data() + (size_t)i * H, ly.mlp_norm, c.eps, H, xp.data() + (size_t)i * H);
            quantize_act(xp.data(), M, H, a);
            group_sums(ly.gate, a); share(ly.gate.N, tid, nth, n0, n1); matmul_rows(ly.gate, a, n0, n1, e.gate.data());
            group_sums(ly.up, a); matmul_rows(ly.up, a, n0, n1, e.up.data());  // same rows as gate
            for (int i = 0; i < M; i++) silu_mul(e.gate.data() + (size_t)i * I, e.up.data() + (size_t)i * I, n0, n1);
            lap(4);
#pragma omp barrier
            lap(7);
            quantize_act(e.gate.data(), M, I, a);
            group_sums(ly.down, a); share(ly.down.N, tid, nth, n0, n1); matmul_rows(ly.down, a, n0, n1, e.down.data());
            lap(5);
#pragma omp barrier
            lap(7);
            for (size_t j = 0; j < (size_t)M * H; j++) res[j] += e.down[j];
        }
        // final norm and head
        const int first = all_logits ? 0 : M - 1, rows = M - first;
        for (int i = 0; i < rows; i++) rmsnorm(res.data() + (size_t)(first + i) * H, c.final_norm, c.eps, H, xp.data() + (size_t)i * H);
        quantize_act(xp.data(), rows, H, a);
        if (c.head.kind == TF_QUANT) group_sums(c.head, a);
        share(c.head.N, tid, nth, n0, n1);
        matmul_rows(c.head, a, n0, n1, logits);
        lap(6);
    }
    return 0;
}

}  // extern "C"
