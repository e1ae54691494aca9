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
// w = (q - z) * s, exactly as the reference dequantizes. Grid formats (4-bit codes on a fixed
// non-uniform grid) add a 16-byte table `levels`: code q stands for the u8 levels[q] = L[q] + 128
// and z = 128, so w = (levels[q] - z) * s = L[q] * s. Learned tables (formats/lut.py) are the same
// with the layer's own levels (16; a 2- or 3-bit table, its codes in the crumb / crumb + bit planes,
// fills the first 4 / 8 entries), or (level_rows) a table per row: per tile 4 x 64 bytes, where
// 64-byte register j holds in its 128-bit lane l the 16 levels of row 4l + j, so that one vpshufb
// per j looks up the rows 4l + j (bytes 4j .. 4j+3 of every lane). Dense matrices are plain fp16 / fp32 [N, K].
// SpQR (formats/spqr.py) keeps its codes in these planes (bits 2, 3, 4) but its statistics as the
// file quantizes them: per (tile, group) a 24-byte record `stats`, bytes 0..15 the codes of row r,
// scale code | zero code << 4 (stat_bits <= 4), bytes 16..23 the second-level fp16 scale step,
// scale minimum, zero step, zero minimum of those 16 rows (a second-level group is 16 consecutive
// rows: one tile). The kernels decode s = max(qs * step_s + min_s, fp16 tiny), z = qz * step_z +
// min_z (real-valued) exactly as the reference does in fp32; `scales` and `zeros` are NULL. The
// residual outliers R are added to the dense part, w = (q - z) * s + R, stored in tile slices: slice k
// of tile T holds the k-th entry (u16 column, fp16 value) of each of its rows that has more than k,
// rows in order, bit r of the slice's u16 mask set for row 16T + r; a tile's slices (outlier_tiles[T]
// ..) and entries (outlier_entries[T] ..) follow each other, so its outliers add as 16-row vectors.
// Part of the one translation unit engine.cpp.
#pragma once

#include "common.h"

static inline float scale_at(const tf_mat& W, size_t i) {
    return W.scale_bf16 ? bf16_to_f32(W.scales[i]) : f16_to_f32(W.scales[i]);
}

// The 64 codes of one chunk (o = 4*row + col), scalar (reference for the layout; embedding
// lookups; portable kernels).
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

// The 64 codes of one chunk of tile T as the u8 values the kernels multiply: the codes, or for a
// grid or learned-table format their levels (scalar).
static void unpack_chunk_values(const tf_mat& W, int T, const uint8_t* p, uint8_t out[64]) {
    unpack_chunk_scalar(p, W.bits, out);
    if (!W.levels) return;
    if (!W.level_rows) {
        for (int j = 0; j < 64; j++) out[j] = W.levels[out[j] & 15];
        return;
    }
    const uint8_t* t = W.levels + (size_t)T * 256;  // row r = 4l + j: register j, lane l
    for (int o = 0; o < 64; o++) {
        const int r = o / 4;
        out[o] = t[(r % 4) * 64 + (r / 4) * 16 + (out[o] & 15)];
    }
}

// fp16 -> fp32 of one value (an outlier), one instruction where F16C is there
static inline float half_value(uint16_t h) {
#if TF_AVX512
    return _cvtsh_ss(h);
#else
    return f16_to_f32(h);
#endif
}

// SpQR: s and z of row r of tile T in group g, decoded from its statistics record (fp32, as the reference).
static inline void spqr_stat(const tf_mat& W, int T, int g, int r, float& s, float& z) {
    const uint8_t* rec = W.stats + ((size_t)T * W.G + g) * 24;
    uint16_t h[4];
    memcpy(h, rec + 16, 8);
    s = std::max((float)(rec[r] & 15) * f16_to_f32(h[0]) + f16_to_f32(h[1]), 6.103515625e-05f);  // fp16 tiny
    z = (float)(rec[r] >> 4) * f16_to_f32(h[2]) + f16_to_f32(h[3]);
}

// Scale s and zero z of row r of tile T in group g (any quantized layout).
static inline void stat_at(const tf_mat& W, int T, int g, int r, float& s, float& z) {
    if (W.stats) { spqr_stat(W, T, g, r, s, z); return; }
    const size_t si = ((size_t)T * W.G + g) * 16 + r;
    s = scale_at(W, si);
    z = (float)W.zeros[si];
}

// Row n of W's dense part dequantized to fp32 [K] (exactly (q - z) * s, as the reference).
static void dequant_row_dense(const tf_mat& W, int n, float* out) {
    if (W.kind == TF_F32) { memcpy(out, (const float*)W.dense + (size_t)n * W.K, sizeof(float) * W.K); return; }
    if (W.kind == TF_F16) {
        const uint16_t* r = (const uint16_t*)W.dense + (size_t)n * W.K;
        for (int j = 0; j < W.K; j++) out[j] = f16_to_f32(r[j]);
        return;
    }
    const int nq = W.Kp / 4, cb = 8 * W.bits, T = n / 16, r = n % 16;
    uint8_t q[64];
    for (int k4 = 0; k4 < nq && 4 * k4 < W.K; k4++) {
        unpack_chunk_values(W, T, W.codes + ((size_t)T * nq + k4) * cb, q);
        for (int c = 0; c < 4 && 4 * k4 + c < W.K; c++) {
            int col = 4 * k4 + c, g = col / W.group;
            float s, z;
            stat_at(W, T, g, r, s, z);
            out[col] = ((float)q[4 * r + c] - z) * s;
        }
    }
}

// Row n of W dequantized to fp32 [K]: the dense part plus SpQR's outliers (W_hat = (q - z) * s + R).
static void dequant_row(const tf_mat& W, int n, float* out) {
    dequant_row_dense(W, n, out);
    if (!W.outlier_tiles) return;
    const int T = n / 16;
    const unsigned below = (1u << (n % 16)) - 1;  // rows of the tile before row n
    for (int sl = W.outlier_tiles[T], e = W.outlier_entries[T]; sl < W.outlier_tiles[T + 1]; sl++) {
        const unsigned m = W.outlier_masks[sl];
        if (m >> (n % 16) & 1) {
            const int j = e + __builtin_popcount(m & below);
            out[W.outlier_cols[j]] += half_value(W.outlier_values[j]);
        }
        e += __builtin_popcount(m);
    }
}


#if TF_AVX512
// The same chunk as one vector: byte o of the result is code o, so lane r (4 bytes) holds row r.
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
// Level tables of tile T for lookup_levels. GRID 1 (one table): the 16 levels in each 128-bit
// lane of t[0]; GRID 2 (a table per row): t[j] holds in lane l the levels of row 4l + j.
struct LevelTable {
    __m512i t[4];
};
template <int GRID>
static inline LevelTable load_levels(const tf_mat& W, int T) {
    LevelTable L;
    for (int j = 0; j < 4; j++) L.t[j] = _mm512_setzero_si512();
    if (GRID == 1) L.t[0] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)W.levels));
    if (GRID == 2)
        for (int j = 0; j < 4; j++) L.t[j] = _mm512_loadu_si512((const void*)(W.levels + (size_t)T * 256 + 64 * j));
    return L;
}
// codes (0..15 in every byte; byte o of row o/4) -> their levels: one vpshufb, each byte indexing
// its lane's table; per-row tables: one per j, each writing the bytes 4j .. 4j+3 of every lane.
template <int GRID>
static inline __m512i lookup_levels(const LevelTable& L, __m512i codes) {
    __m512i v = _mm512_shuffle_epi8(L.t[0], codes);
    if (GRID == 2)
        for (int j = 1; j < 4; j++) v = _mm512_mask_shuffle_epi8(v, (__mmask64)(0x000F000F000F000FULL << (4 * j)), L.t[j], codes);
    return v;
}
template <bool BF16>
static inline __m512 load16_scales(const uint16_t* s) {
    __m256i h = _mm256_loadu_si256((const __m256i*)s);
    if (BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}
// SpQR: the 16 rows' s and z of one (tile, group) record, the same fp32 operations as spqr_stat.
static inline void spqr_stats16(const uint8_t* rec, __m512& s, __m512& z) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)rec));
    const __m128 f = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(rec + 16)));  // step_s, min_s, step_z, min_z
    const __m512 f4 = _mm512_castps128_ps512(f);
    auto lane = [&](int i) { return _mm512_permutexvar_ps(_mm512_set1_epi32(i), f4); };
    const __m512 qs = _mm512_cvtepi32_ps(_mm512_and_si512(c, _mm512_set1_epi32(15)));
    const __m512 qz = _mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4));
    s = _mm512_max_ps(_mm512_add_ps(_mm512_mul_ps(qs, lane(0)), lane(1)), _mm512_set1_ps(6.103515625e-05f));
    z = _mm512_add_ps(_mm512_mul_ps(qz, lane(2)), lane(3));
}
// Scale of the 16 rows of tile T in group g; and the zero term's factor s * z.
template <bool BF16, bool SPQR>
static inline __m512 tile_scale(const tf_mat& W, int T, int g) {
    if (SPQR) {
        __m512 s, z;
        spqr_stats16(W.stats + ((size_t)T * W.G + g) * 24, s, z);
        return s;
    }
    return load16_scales<BF16>(W.scales + ((size_t)T * W.G + g) * 16);
}
template <bool BF16, bool SPQR>
static inline __m512 tile_scaled_zero(const tf_mat& W, int T, int g) {
    if (SPQR) {
        __m512 s, z;
        spqr_stats16(W.stats + ((size_t)T * W.G + g) * 24, s, z);
        return _mm512_mul_ps(s, z);
    }
    const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(W.zeros + ((size_t)T * W.G + g) * 16))));
    return _mm512_mul_ps(load16_scales<BF16>(W.scales + ((size_t)T * W.G + g) * 16), z);
}
#endif

extern "C" {

// rows [n0, n0+count) of W dequantized: out [count, K] fp32
void tf_dequant_rows(const tf_mat* W, int n0, int count, float* out) {
    for (int i = 0; i < count; i++) dequant_row(*W, n0 + i, out + (size_t)i * W->K);
}

}  // extern "C"
