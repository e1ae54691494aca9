// The engine's shared ground: instruction-set detection, the C ABI structs that layout.py and
// engine.py mirror (tf_mat, tf_layer, tf_config; TF_ABI_VERSION versions them), fp16/bf16
// conversions and the vector e^x.
// Part of the one translation unit engine.cpp.
#pragma once

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

// Instruction-set tiers: AVX-512 VNNI (F, BW, VL, VNNI); else AVX2 (with FMA and F16C: x86-64-v3,
// every x86 CPU since 2013-2015 that lacks AVX-512, AMD Zen 1-3 and Intel client cores among them)
// for the matrix kernels (matmul_avx2.h); else portable scalar code. TF_NO_AVX512 builds the AVX2
// tier on an AVX-512 machine (its tests).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && !defined(TF_NO_AVX512)
#define TF_AVX512 1
#define TF_AVX2 0
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TF_AVX512 0
#define TF_AVX2 1
#include <immintrin.h>
#else
#define TF_AVX512 0
#define TF_AVX2 0
#endif

#define TF_ABI_VERSION 13  // = ABI_VERSION in build.py; bump with any change below or to a signature

// Largest head_dim: store_kv rotates each key, and the KV cache quantizes it, in stack buffers of this size.
#define TF_MAX_HEAD_DIM 512

extern "C" {

enum { TF_QUANT = 0, TF_F16 = 1, TF_F32 = 2 };
enum { TF_ACT_SILU = 0, TF_ACT_GELU_TANH = 1 };  // the MLP gate's activation (tf_config.act)

typedef struct {
    int32_t kind;   // TF_QUANT, TF_F16, TF_F32
    int32_t N, K;   // out_features, in_features
    int32_t Kp;     // K padded to a multiple of 32 (quant)
    int32_t bits;   // code bits (quant)
    int32_t group;  // group width along K; K for per channel (quant)
    int32_t G;      // groups per row
    int32_t scale_bf16;  // scales are bf16 (1) or fp16 (0)
    int32_t level_rows;  // levels: 0 one table [16]; 1 a table per row, [Np/16, 4, 64] (layout.h)
    const uint8_t* codes;    // [Np/16, Kp/4, 8*bits]
    const uint16_t* scales;  // [Np/16, G, 16]
    const uint8_t* zeros;    // [Np/16, G, 16]
    const void* dense;       // fp16 or fp32 [N, K]
    const float* bias;       // [N] or NULL
    const uint8_t* levels;   // grid / learned-table formats: code q stands for levels[q] (level + zero), else NULL
    // SpQR (layout.h): statistics decoded in the kernel, then scales and zeros are NULL; else NULL
    const uint8_t* stats;            // [Np/16, G, 24] per (tile, group): 16 code bytes, 4 fp16 (see layout.h)
    // SpQR's residual outliers in tile slices (layout.h), or all NULL (none)
    const int32_t* outlier_tiles;    // [Np/16 + 1] first slice of each tile
    const int32_t* outlier_entries;  // [Np/16 + 1] first entry of each tile
    const uint16_t* outlier_masks;   // [slices] bit r: row 16T + r has an entry in this slice
    const uint16_t* outlier_cols;    // [nnz] column of each outlier, slice after slice
    const uint16_t* outlier_values;  // [nnz] fp16 residual added to the dense weight
} tf_mat;

typedef struct {
    const float* attn_norm;      // [hidden] RMSNorm weight before attention
    const float* mlp_norm;       // [hidden] RMSNorm weight before the MLP
    const float* attn_out_norm;  // [hidden] RMSNorm of the attention output before the residual add, or NULL
    const float* mlp_out_norm;   // [hidden] RMSNorm of the MLP output before the residual add, or NULL
    const float* q_norm;         // [head_dim] RMSNorm of every query head before RoPE, or NULL
    const float* k_norm;         // [head_dim] RMSNorm of every key head before RoPE, or NULL
    const float* rope_cos;       // [max_pos, rope_dim/2] this layer's RoPE angles (bases may differ per layer)
    const float* rope_sin;       // [max_pos, rope_dim/2]
    int32_t window;              // > 0: attends to the last `window` positions only (sliding window); 0: to all
    tf_mat q, k, v, o, gate, up, down;
} tf_layer;

typedef struct {
    int32_t n_layers, hidden, n_heads, n_kv_heads, head_dim, inter, vocab;
    int32_t max_pos;    // KV cache capacity
    int32_t max_batch;  // most tokens per forward call
    int32_t threads;
    int32_t exact;      // 1: quantized matmuls take fp32 activations (reference-exact, slower)
    int32_t rope_dim;   // leading dims of each head that RoPE rotates (partial rotary), even, <= head_dim
    int32_t act;        // TF_ACT_*: act(gate) * up in the MLP
    int32_t kv_bits;    // the KV cache: 16 (fp16), 8 or 4 (codes per token in groups along head_dim; kv_cache.h)
    float eps;          // RMSNorm epsilon
    float attn_scale;   // softmax scale (head_dim^-0.5, or the architecture's own)
    float final_softcap;  // > 0: logits <- c tanh(logits / c); 0: none
    float embed_scale;    // embedding rows are multiplied by it (1: none)
    tf_mat embed;           // [vocab, hidden], rows looked up
    tf_mat head;            // [vocab, hidden]
    const float* final_norm;
    const tf_layer* layers;  // [n_layers]
} tf_config;

}  // extern "C"

// ---------------------------------------------------------------------------------------------
// number formats

static inline float f16_to_f32(uint16_t h) {
#if TF_AVX512 || TF_AVX2
    return _cvtsh_ss(h);  // F16C: exact, as the bit manipulation below
#endif
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
#if TF_AVX512 || TF_AVX2
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

#if TF_AVX2
// e^x as exp512 below, on 8 lanes: 2^n from n's bits in the exponent field (n in [-126, 127] here)
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    x = _mm256_min_ps(x, _mm256_set1_ps(88.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
// the largest of a vector's 8 lanes
static inline float avx2_hmax(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}
// the sum of a vector's 8 lanes
static inline float avx2_hsum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
#endif

#if TF_AVX512
// e^x (softmax, SiLU), x clamped to [-87, 88]: 2^n * p(r), r = x - n ln2, |r| <= ln2/2;
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
