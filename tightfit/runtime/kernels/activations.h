// Activations: the MLP's gated activation functions, and activation quantization as llama.cpp's
// Q8_0: x [M, K] per token to int8 in blocks of 32, x ~ sx_b * xq with sx_b = amax_b / 127 and xq
// rounded to nearest even. Quantized matmuls (matmul.h) multiply these blocks; dense ones, and exact
// mode, the fp32 x itself.
// Part of the one translation unit engine.cpp.
#pragma once

#include "common.h"

// gate[j] <- act(gate[j]) * up[j] for j in [j0, j1), act = TF_ACT_SILU: x sigmoid(x), or
// TF_ACT_GELU_TANH: GELU's tanh approximation 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3),
// computed as x sigmoid(2u) (the same function; Gemma's GeGLU).
static void gated_act(int act, float* gate, const float* up, int j0, int j1) {
    const float c = act == TF_ACT_GELU_TANH ? 1.5957691216057308f : 0.f;  // 2 sqrt(2/pi)
    int j = j0;
#if TF_AVX512
    for (; j + 16 <= j1; j += 16) {
        const __m512 g = _mm512_loadu_ps(gate + j);
        __m512 z = g;  // sigmoid's argument: x (SiLU) or 2u (GELU)
        if (act == TF_ACT_GELU_TANH)
            z = _mm512_mul_ps(_mm512_mul_ps(g, _mm512_set1_ps(c)), _mm512_fmadd_ps(_mm512_mul_ps(g, g), _mm512_set1_ps(0.044715f), _mm512_set1_ps(1.f)));
        const __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), z))));
        _mm512_storeu_ps(gate + j, _mm512_mul_ps(_mm512_mul_ps(g, sig), _mm512_loadu_ps(up + j)));
    }
#elif TF_AVX2
    for (; j + 8 <= j1; j += 8) {
        const __m256 g = _mm256_loadu_ps(gate + j);
        __m256 z = g;
        if (act == TF_ACT_GELU_TANH)
            z = _mm256_mul_ps(_mm256_mul_ps(g, _mm256_set1_ps(c)), _mm256_fmadd_ps(_mm256_mul_ps(g, g), _mm256_set1_ps(0.044715f), _mm256_set1_ps(1.f)));
        const __m256 sig = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_add_ps(_mm256_set1_ps(1.f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), z))));
        _mm256_storeu_ps(gate + j, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + j)));
    }
#endif
    for (; j < j1; j++) {
        const float g = gate[j], z = act == TF_ACT_GELU_TANH ? c * g * (1.f + 0.044715f * g * g) : g;
        gate[j] = g / (1.f + expf(-z)) * up[j];
    }
}

struct QAct {  // x [M, K] quantized per token in blocks of 32
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
        int b = 0;
        int8_t* q = a.xq.data() + (size_t)m * Kp;
#if TF_AVX512
        // whole blocks: the same fp32 operations as below (cvtps rounds to nearest even, as lrintf)
        for (; (b + 1) * 32 <= K; b++) {
            const __m512 x0 = _mm512_loadu_ps(xr + b * 32), x1 = _mm512_loadu_ps(xr + b * 32 + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
            const float id = amax > 0.f ? 127.f / amax : 0.f;
            a.sx[(size_t)m * nb + b] = amax / 127.f;
            const __m512 vid = _mm512_set1_ps(id);
            _mm_storeu_si128((__m128i*)(q + b * 32), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(x0, vid))));
            _mm_storeu_si128((__m128i*)(q + b * 32 + 16), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(x1, vid))));
        }
#elif TF_AVX2
        // the same on 8-lane registers: the packs saturate as cvtsepi32_epi8; their 4-byte pieces come
        // out as r0[0:4], r1[0:4], r2[0:4], r3[0:4], r0[4:8], ..., which the permutation puts in order
        const __m256 sign = _mm256_set1_ps(-0.f);
        for (; (b + 1) * 32 <= K; b++) {
            __m256 v[4], amax = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(xr + b * 32 + 8 * i), amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
            const float am = avx2_hmax(amax), id = am > 0.f ? 127.f / am : 0.f;
            a.sx[(size_t)m * nb + b] = am / 127.f;
            const __m256 vid = _mm256_set1_ps(id);
            __m256i r[4];
            for (int i = 0; i < 4; i++) r[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vid));
            const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
            _mm256_storeu_si256((__m256i*)(q + b * 32), _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        }
#endif
        for (; b < nb; b++) {
            int lo = b * 32, hi = std::min(lo + 32, K);
            float amax = 0.f;
            for (int j = lo; j < hi; j++) amax = std::max(amax, fabsf(xr[j]));
            float id = amax > 0.f ? 127.f / amax : 0.f;
            a.sx[(size_t)m * nb + b] = amax / 127.f;
            for (int j = lo; j < hi; j++) q[j] = (int8_t)lrintf(xr[j] * id);
        }
        for (int p = 0; p < Kp / 16; p++) {
            int s = 0;
#if TF_AVX2 || TF_AVX512
            // the sum of 16 int8: ones (u8) times q (s8) summed in pairs, those in pairs, then across
            const __m128i v = _mm_loadu_si128((const __m128i*)(q + p * 16));
            const __m128i w = _mm_madd_epi16(_mm_maddubs_epi16(_mm_set1_epi8(1), v), _mm_set1_epi16(1));
            const __m128i h = _mm_add_epi32(w, _mm_shuffle_epi32(w, 0x4E));
            s = _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1)));
#else
            for (int j = 0; j < 16; j++) s += q[p * 16 + j];
#endif
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
    if (W.G > 1 && W.group % 16 != 0) {  // SpQR's groups of 8: column by column
        const int nb = a.Kp / 32;
        for (int m = 0; m < a.M; m++)
            for (int j = 0; j < a.Kp; j++)
                a.xs[(size_t)m * W.G + std::min(j / W.group, W.G - 1)] += a.sx[(size_t)m * nb + j / 32] * (float)a.xq[(size_t)m * a.Kp + j];
        return;
    }
    const int np = a.Kp / 16;
    for (int m = 0; m < a.M; m++)
        for (int p = 0; p < np; p++) {
            int g = std::min(p * 16 / W.group, W.G - 1);  // padding columns belong to the last group
            a.xs[(size_t)m * W.G + g] += a.psum[(size_t)m * np + p];
        }
}

extern "C" {

// x [M, K] -> its block-int8 dequantization sx * xq [M, K] (what quantized matmuls multiply by)
void tf_quantize_activations(const float* x, int M, int K, float* out) {
    QAct a;
    quantize_act(x, M, K, a);
    for (int m = 0; m < M; m++)
        for (int j = 0; j < K; j++)
            out[(size_t)m * K + j] = a.sx[(size_t)m * (a.Kp / 32) + j / 32] * (float)a.xq[(size_t)m * a.Kp + j];
}

}  // extern "C"
