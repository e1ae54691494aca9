// Matrix kernels for CPUs with AVX2 but no AVX-512 (TF_AVX2, common.h): the same sums as matmul.h's
// AVX-512 tiles, y[m, n] = sum_j s(n, g(j)) (q[n, j] - z(n, g(j))) sx(m, b(j)) xq[m, j], on 256-bit
// registers. A layout.h chunk (16 rows x 4 columns, o = 4 row + col) is two halves of 32 codes,
// rows 0-7 and rows 8-15, each one register whose 32-bit lanes are rows. AVX2 has no vpdpbusd:
// vpmaddubsw (u8 codes x s8 activations, pairs summed to int16) then vpmaddwd by ones (pairs of
// those to int32) give the same 4-column dot per row. Codes of at most 4 bits keep their int16 sums
// over a whole segment of <= 32 columns (<= 8 chunks: |sum| <= 8 * 2 * 15 * 127 = 30480 < 2^15),
// 5- and 6-bit codes widen every chunk (2 * 63 * 127 < 2^15), and 8-bit codes (up to 255, whose pair
// sums would saturate int16) are split into nibbles, hi * 16 + lo. A grid's u8 levels L + 128 are taken
// as the int8 levels L (xor 0x80, in [-127, 127]) and multiplied as |x| (u8, vpsignb x by x) times L
// with the sign of x (vpsignb): pairs <= 2 * 127 * 127 < 2^15, widened every chunk; their zero term,
// s (z - 128) with every grid's z = 128 (layout.py), is 0 and skipped.
// Covered: uniform codes of 2, 3, 4, 5, 6 and 8 bits, grid and learned formats (one level table:
// one vpshufb per half chunk; a table per row: 2- and 3-bit tables folded, one or two vpshufb, 4-bit codes
// transposed to rows of 16 columns, one vpshufb per row), SpQR's dense part (its statistics
// decoded per 16 rows as spqr_stat does; its outliers are added after, outliers.h), fp16 / fp32
// dense matrices. Exact mode is left to the portable scalar kernels (avx2_rows returns false).
// Part of the one translation unit engine.cpp.
#pragma once

#include "activations.h"
#include "common.h"
#include "layout.h"
#include "tuning.h"

#if TF_AVX2
// codes of bit plane `p` (layout.h: bit j of a little-endian u64) as bytes 0 or 1 << sh, codes
// 32 h .. 32 h + 31
static inline __m256i avx2_bits(const uint8_t* p, int h, int sh) {
    uint32_t w;
    memcpy(&w, p + 4 * h, 4);
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i x = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)w), spread), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(x, bit), _mm256_set1_epi8((char)(1 << sh)));
}

// crumb plane `p` (16 bytes; byte j = c[j] | c[j+16] << 2 | c[j+32] << 4 | c[j+48] << 6): codes 0..31, 32..63
static inline void avx2_crumbs(const uint8_t* p, __m256i& lo, __m256i& hi) {
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p)), three = _mm256_set1_epi8(3);
    lo = _mm256_and_si256(_mm256_srlv_epi64(b, _mm256_setr_epi64x(0, 0, 2, 2)), three);
    hi = _mm256_and_si256(_mm256_srlv_epi64(b, _mm256_setr_epi64x(4, 4, 6, 6)), three);
}

// the 64 codes of one chunk as u8: lo = rows 0-7 (o = 0..31), hi = rows 8-15 (o = 32..63)
template <int BITS>
static inline void avx2_unpack(const uint8_t* p, __m256i& lo, __m256i& hi) {
    const __m256i m4 = _mm256_set1_epi8(15);
    if (BITS == 8) {
        lo = _mm256_loadu_si256((const __m256i*)p);
        hi = _mm256_loadu_si256((const __m256i*)(p + 32));
        return;
    }
    if (BITS == 2 || BITS == 3) {
        avx2_crumbs(p, lo, hi);
        if (BITS == 3) lo = _mm256_or_si256(lo, avx2_bits(p + 16, 0, 2)), hi = _mm256_or_si256(hi, avx2_bits(p + 16, 1, 2));
        return;
    }
    const __m256i v = _mm256_loadu_si256((const __m256i*)p);  // nibble plane: bits 4, 5, 6
    lo = _mm256_and_si256(v, m4);
    hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    if (BITS == 5) {
        lo = _mm256_or_si256(lo, avx2_bits(p + 32, 0, 4));
        hi = _mm256_or_si256(hi, avx2_bits(p + 32, 1, 4));
    } else if (BITS == 6) {
        __m256i c0, c1;
        avx2_crumbs(p + 32, c0, c1);
        lo = _mm256_or_si256(lo, _mm256_slli_epi16(c0, 4));
        hi = _mm256_or_si256(hi, _mm256_slli_epi16(c1, 4));
    }
}

// Level tables of half h of tile T (layout.h): GRID 1 the one table in both lanes of t[0]; GRID 2 t[j] holds
// in lane l the levels of row 8h + 4l + j (the 512-bit register j's lanes 2h, 2h + 1)
template <int GRID>
static inline void avx2_levels(const tf_mat& W, int T, int h, __m256i t[4]) {
    for (int j = 0; j < (GRID == 2 ? 4 : 1); j++)  // one table: t[0] alone
        t[j] = GRID == 1 ? _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)W.levels))
                         : _mm256_loadu_si256((const __m256i*)(W.levels + (size_t)T * 256 + 64 * j + 32 * h));
}
// Per-row tables of 2- and 3-bit codes (4 or 8 levels) folded: four rows' tables in one 16-byte lane (2-bit
// codes, row j's at bytes 4j ..) or two (3-bit, rows j and j + 1 at bytes 0 and 8 of t[j / 2]), so that a code
// plus its row's offset (avx2_row_offsets) indexes them: one or two vpshufb for four and three blends
template <int BITS>
static inline void avx2_fold_tables(__m256i t[4]) {
    if (BITS == 2) {
        t[0] = _mm256_unpacklo_epi64(_mm256_unpacklo_epi32(t[0], t[1]), _mm256_unpacklo_epi32(t[2], t[3]));
    } else {
        const __m256i t01 = _mm256_unpacklo_epi64(t[0], t[1]), t23 = _mm256_unpacklo_epi64(t[2], t[3]);
        t[0] = t01, t[1] = t23;
    }
}
// the offsets of the folded tables: byte 4j + i of every lane (row j of the lane) 4j (2-bit) or 8 (j & 1) (3-bit)
template <int BITS>
static inline __m256i avx2_row_offsets() {
    return BITS == 2 ? _mm256_setr_epi32(0, 0x04040404, 0x08080808, 0x0C0C0C0C, 0, 0x04040404, 0x08080808, 0x0C0C0C0C)
                     : _mm256_set1_epi64x(0x0808080800000000LL);
}
// codes (0..15, byte o of row o/4 of the half) -> their levels (FOLDED: per-row tables folded as above)
template <int GRID, int FOLDED = 0>
static inline __m256i avx2_lookup(const __m256i t[4], __m256i codes) {
    if (FOLDED == 2) return _mm256_shuffle_epi8(t[0], _mm256_or_si256(codes, avx2_row_offsets<2>()));
    if (FOLDED == 3) {  // rows 0, 1 of each lane from t[0], rows 2, 3 from t[1]
        const __m256i i = _mm256_or_si256(codes, avx2_row_offsets<3>());
        return _mm256_blend_epi32(_mm256_shuffle_epi8(t[0], i), _mm256_shuffle_epi8(t[1], i), 0xCC);
    }
    __m256i v = _mm256_shuffle_epi8(t[0], codes);
    if (GRID == 2) {  // bytes 4j .. 4j+3 of each lane (its 32-bit elements j): row 4l + j, from t[j]
        v = _mm256_blend_epi32(v, _mm256_shuffle_epi8(t[1], codes), 0x22);
        v = _mm256_blend_epi32(v, _mm256_shuffle_epi8(t[2], codes), 0x44);
        v = _mm256_blend_epi32(v, _mm256_shuffle_epi8(t[3], codes), 0x88);
    }
    return v;
}

// Per-row tables of 4-bit codes, one segment of `chunks` chunks (a multiple of 4) from p, x from xq (the
// segment's first column, rows of Kp): each half's int32 sums, as the chunk loop in avx2_tile gives them, but
// taken by rows. Four chunks' nibble planes (lane l, element j: rows 4l + j and 8 + 4l + j, columns 4k .. 4k+3
// of chunk k) are transposed as loaded (vpunpck*) so that element k of register j holds them: each 128-bit
// lane of a half then holds 16 columns of one row, whose table is one vpshufb (the chunk loop needs four and
// three blends), and the 16 columns' x one broadcast. The four column quads of every row are summed by
// vphaddd at the segment's end, back to one row per element. Measured (gate_proj [1536, 576], 1 thread, best
// of 30): 41.0 us by chunks, 37.7 transposing each half's unpacked codes, 34.3 so; lut4g32 ~26, w4g32-sym 23.
template <int MT>
static inline void avx2_row_table_segment(const uint8_t* p, int chunks, const int8_t* xq, int Kp, const __m256i table[2][4],
                                          __m256i ia[2][MT]) {
    const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(15);
    __m256i r[2][MT][4];
    for (int h = 0; h < 2; h++)
        for (int t = 0; t < MT; t++)
            for (int j = 0; j < 4; j++) r[h][t][j] = _mm256_setzero_si256();
    for (int q = 0; q < chunks; q += 4) {
        __m256i c[4];
        for (int k = 0; k < 4; k++) {
            const uint8_t* pk = p + (size_t)(q + k) * 32;
            _mm_prefetch((const char*)pk + TF_PREFETCH, _MM_HINT_T0);
            c[k] = _mm256_loadu_si256((const __m256i*)pk);
        }
        const __m256i t0 = _mm256_unpacklo_epi32(c[0], c[1]), t1 = _mm256_unpackhi_epi32(c[0], c[1]);
        const __m256i t2 = _mm256_unpacklo_epi32(c[2], c[3]), t3 = _mm256_unpackhi_epi32(c[2], c[3]);
        const __m256i u[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2), _mm256_unpacklo_epi64(t1, t3),
                              _mm256_unpackhi_epi64(t1, t3)};
        __m256i x[MT], ax[MT];
        for (int t = 0; t < MT; t++) {
            x[t] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(xq + (size_t)t * Kp + 4 * q)));
            ax[t] = _mm256_sign_epi8(x[t], x[t]);
        }
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 4; j++) {
                const __m256i v = _mm256_shuffle_epi8(table[h][j], _mm256_and_si256(h ? _mm256_srli_epi16(u[j], 4) : u[j], m4));
                for (int t = 0; t < MT; t++)
                    r[h][t][j] = _mm256_add_epi32(r[h][t][j], _mm256_madd_epi16(_mm256_maddubs_epi16(ax[t], _mm256_sign_epi8(v, x[t])), ones));
            }
    }
    for (int h = 0; h < 2; h++)
        for (int t = 0; t < MT; t++)
            ia[h][t] = _mm256_hadd_epi32(_mm256_hadd_epi32(r[h][t][0], r[h][t][1]), _mm256_hadd_epi32(r[h][t][2], r[h][t][3]));
}

// SpQR: s and z of the 16 rows of one (tile, group) record, rows 8h .. 8h+7 in s[h] and z[h]: the same
// fp32 operations as spqr_stat, its four fp16 second-level values converted once for both halves.
// Measured (gate_proj [1536, 576], 1 thread, best of 40, 2026-11-29): the in-lane broadcasts and loads
// below instead of four vpermps by index registers and a byte shift took spqr-w2g32 from 30.3 to 26.1 us
// (w2g64: 20.7), spqr-w3g32 (decoded up front) 44.6 -> 43.4
static inline void avx2_spqr_stats(const uint8_t* rec, __m256 s[2], __m256 z[2]) {
    // the four fp16 values converted once into both 128-bit lanes, each broadcast by an in-lane vpermilps
    // (no index registers); each half's 8 code bytes widened straight from memory
    const __m128 f4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(rec + 16)));
    const __m256 f = _mm256_insertf128_ps(_mm256_castps128_ps256(f4), f4, 1);
    const __m256 step_s = _mm256_permute_ps(f, 0x00), min_s = _mm256_permute_ps(f, 0x55);
    const __m256 step_z = _mm256_permute_ps(f, 0xAA), min_z = _mm256_permute_ps(f, 0xFF);
    for (int h = 0; h < 2; h++) {
        const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(rec + 8 * h)));
        const __m256 qs = _mm256_cvtepi32_ps(_mm256_and_si256(c, _mm256_set1_epi32(15)));
        const __m256 qz = _mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4));
        s[h] = _mm256_max_ps(_mm256_add_ps(_mm256_mul_ps(qs, step_s), min_s), _mm256_set1_ps(6.103515625e-05f));
        z[h] = _mm256_add_ps(_mm256_mul_ps(qz, step_z), min_z);
    }
}

// this thread's buffer for the decoded statistics of a tile's G groups (32 floats each), grown as needed;
// only the kernels that decode them up front take it (not every tile: a thread_local in avx2_tile
// itself would be reached by every call)
static inline float* avx2_stat_buffer(int G) {
    thread_local std::vector<float> buf;
    if (buf.size() < (size_t)G * 32) buf.resize((size_t)G * 32);
    return buf.data();
}

// int32 lanes (rows) += the 4-column dot of u8 values v (any of 0..255) and the broadcast s8 x
static inline __m256i avx2_dot_u8(__m256i acc, __m256i v, __m256i x) {
    const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const __m256i lo = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v, m4), x), ones);
    const __m256i hi = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), x), ones);
    return _mm256_add_epi32(acc, _mm256_add_epi32(lo, _mm256_slli_epi32(hi, 4)));
}

// scales s of rows 8h .. 8h+7 of tile T in group g, and s z
template <bool BF16>
static inline __m256 avx2_scale(const tf_mat& W, int T, int g, int h) {
    const __m128i r = _mm_loadu_si128((const __m128i*)(W.scales + ((size_t)T * W.G + g) * 16 + 8 * h));
    if (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(r), 16));
    return _mm256_cvtph_ps(r);
}
// s z of rows 8h .. 8h+7 of tile T in group g, given their scales s
static inline __m256 avx2_scaled_zero(const tf_mat& W, int T, int g, int h, __m256 s) {
    const __m128i z = _mm_loadl_epi64((const __m128i*)(W.zeros + ((size_t)T * W.G + g) * 16 + 8 * h));
    return _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z)));
}

// tile T (rows 16T .. 16T+15) x tokens [m0, m0+MT), as matmul.h's quant_tile: per segment of
// min(group, 32) columns int32 dot products, then converted and scaled once; the zero term as each group
// starts (decode; SpQR always, its statistics decoded once) or after the tile (grids: none).
template <int BITS, int MT, bool BF16, int GRID, bool SPQR>
static void avx2_tile(const tf_mat& W, const QAct& a, int m0, int T, float* y) {
    constexpr bool WIDE = BITS == 8 && !GRID;   // u8 codes up to 255: nibble split
    constexpr bool SUM16 = BITS <= 4 && !GRID;  // int16 sums over a whole segment
    // per-row tables: 2- and 3-bit codes look up folded tables, 4-bit codes go by rows (avx2_row_table_segment)
    constexpr int FOLDED = GRID == 2 && BITS < 4 && TF_ROW_TABLES ? BITS : 0;
    const int nq = W.Kp / 4, cb = 8 * BITS, Kp = a.Kp;
    const int seg = W.group < 32 && W.G > 1 ? W.group : 32;
    const uint8_t* p = W.codes + (size_t)T * nq * cb;
    const int8_t* xq = a.xq.data() + (size_t)m0 * Kp;
    const float* sx = a.sx.data() + (size_t)m0 * (Kp / 32);
    __m256i table[2][4];
    if (GRID) {  // levels less 128 as int8 (u8 level ^ 0x80), multiplied by x with vpsignb (see the top)
        avx2_levels<GRID>(W, T, 0, table[0]), avx2_levels<GRID>(W, T, 1, table[1]);
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < (GRID == 2 ? 4 : 1); j++) table[h][j] = _mm256_xor_si256(table[h][j], _mm256_set1_epi8((char)0x80));
        if (FOLDED)
            for (int h = 0; h < 2; h++) avx2_fold_tables<BITS>(table[h]);
    }
    // the zero term subtracted as each group starts, with its scales just loaded (decode), or after the tile
    // (multi-token matmuls, whose accumulators hold more registers): TF_ZERO_AT_START, tuning.h
    constexpr bool ZSTART = MT <= TF_ZERO_AT_START;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2][MT], s[2];
    for (int h = 0; h < 2; h++)
        for (int t = 0; t < MT; t++) acc[h][t] = _mm256_setzero_ps();
    // SpQR's statistics: decoded as each group starts, or (3-bit codes, whose unpacking keeps more
    // registers busy) all of the tile's first, into s and s z per group (measured: gate_proj [1536, 576],
    // 1 thread: spqr-w3g32 48.2 -> 44.2 us, while spqr-w2g32 was 4 % slower so; again after the cheaper
    // decode of avx2_spqr_stats, best of 40: spqr-w2g32 26.3 us as each group starts vs 31.1 up front,
    // spqr-w3g32 42.2 up front vs 43.2)
    constexpr bool PRESTATS = SPQR && BITS == 3;
    float* stat_buf = PRESTATS ? avx2_stat_buffer(W.G) : nullptr;  // per group: s of both halves, then s z
    if (PRESTATS) {
        for (int gi = 0; gi < W.G; gi++) {
            __m256 sg[2], z[2];
            avx2_spqr_stats(W.stats + ((size_t)T * W.G + gi) * 24, sg, z);
            for (int h = 0; h < 2; h++) {
                _mm256_storeu_ps(stat_buf + gi * 32 + 8 * h, sg[h]);
                _mm256_storeu_ps(stat_buf + gi * 32 + 16 + 8 * h, _mm256_mul_ps(sg[h], z[h]));
            }
        }
    }
    // acc[h][t] -= sz[h] xs[m0 + t, g]: group g's zero term (s z per row) for every token
    auto subtract_zero_term = [&](int g, const __m256 sz[2]) {
        for (int t = 0; t < MT; t++) {
            const __m256 xs = _mm256_set1_ps(a.xs[(size_t)(m0 + t) * W.G + g]);
            for (int h = 0; h < 2; h++) acc[h][t] = _mm256_fnmadd_ps(sz[h], xs, acc[h][t]);
        }
    };
    // group g's scales, and its zero term where it is subtracted as the group starts (SpQR always)
    auto start_group = [&](int g) {
        __m256 sz[2];
        if (!SPQR) {
            for (int h = 0; h < 2; h++) s[h] = avx2_scale<BF16>(W, T, g, h);
            if (GRID || !ZSTART) return;  // every grid's zero term is 0 (see the top)
            for (int h = 0; h < 2; h++) sz[h] = avx2_scaled_zero(W, T, g, h, s[h]);  // with the scales just loaded
        } else if (PRESTATS) {
            for (int h = 0; h < 2; h++)
                s[h] = _mm256_loadu_ps(stat_buf + g * 32 + 8 * h), sz[h] = _mm256_loadu_ps(stat_buf + g * 32 + 16 + 8 * h);
        } else {
            __m256 z[2];
            avx2_spqr_stats(W.stats + ((size_t)T * W.G + g) * 24, s, z);
            for (int h = 0; h < 2; h++) sz[h] = _mm256_mul_ps(s[h], z[h]);
        }
        subtract_zero_term(g, sz);
    };
    start_group(0);
    int g = 0, next = W.group;
    for (int c0 = 0; c0 < Kp; c0 += seg) {
        if (c0 >= next && g + 1 < W.G) {
            g++;
            next += W.group;
            start_group(g);
        }
        __m256i ia[2][MT];
        if (GRID == 2 && BITS == 4 && TF_ROW_TABLES && seg % 16 == 0) {  // per-row tables of 4-bit codes: by rows
            avx2_row_table_segment<MT>(p, seg / 4, xq + c0, Kp, table, ia);
            p += (size_t)(seg / 4) * cb;
        } else {
            for (int h = 0; h < 2; h++)
                for (int t = 0; t < MT; t++) ia[h][t] = _mm256_setzero_si256();
            for (int k4 = c0 / 4; k4 < (c0 + seg) / 4; k4++, p += cb) {
                _mm_prefetch((const char*)p + TF_PREFETCH, _MM_HINT_T0);
                __m256i v[2];
                avx2_unpack<BITS>(p, v[0], v[1]);
                if (GRID) v[0] = avx2_lookup<GRID, FOLDED>(table[0], v[0]), v[1] = avx2_lookup<GRID, FOLDED>(table[1], v[1]);
                for (int t = 0; t < MT; t++) {
                    int32_t x4;
                    memcpy(&x4, xq + (size_t)t * Kp + 4 * k4, 4);
                    const __m256i x = _mm256_set1_epi32(x4), ax = _mm256_sign_epi8(x, x);  // ax: |x| (grids)
                    for (int h = 0; h < 2; h++) {
                        if (GRID) ia[h][t] = _mm256_add_epi32(ia[h][t], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(v[h], x)), ones));
                        else if (WIDE) ia[h][t] = avx2_dot_u8(ia[h][t], v[h], x);
                        else if (SUM16) ia[h][t] = _mm256_add_epi16(ia[h][t], _mm256_maddubs_epi16(v[h], x));
                        else ia[h][t] = _mm256_add_epi32(ia[h][t], _mm256_madd_epi16(_mm256_maddubs_epi16(v[h], x), ones));
                    }
                }
            }
        }
        for (int t = 0; t < MT; t++) {
            const __m256 sxt = _mm256_set1_ps(sx[(size_t)t * (Kp / 32) + c0 / 32]);
            for (int h = 0; h < 2; h++) {
                const __m256i d = SUM16 ? _mm256_madd_epi16(ia[h][t], ones) : ia[h][t];
                acc[h][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(s[h], sxt), acc[h][t]);
            }
        }
    }
    for (int gi = 0; gi < W.G && !SPQR && !GRID && !ZSTART; gi++) {  // zero term after the tile: sum_g s_g z_g xs[m, g]
        __m256 sz[2];
        for (int h = 0; h < 2; h++) sz[h] = avx2_scaled_zero(W, T, gi, h, avx2_scale<BF16>(W, T, gi, h));
        subtract_zero_term(gi, sz);
    }
    for (int h = 0; h < 2; h++) {
        const int n0 = 16 * T + 8 * h, valid = std::min(8, W.N - n0);
        if (valid <= 0) break;
        alignas(32) float out[8];
        for (int t = 0; t < MT; t++) {
            _mm256_store_ps(out, acc[h][t]);
            float* yr = y + (size_t)(m0 + t) * W.N + n0;
            for (int r = 0; r < valid; r++) yr[r] = out[r] + (W.bias ? W.bias[n0 + r] : 0.f);
        }
    }
}

template <int BITS, int MT, int GRID, bool SPQR>
static void avx2_rows_t(const tf_mat& W, const QAct& a, int m0, int n0, int n1, float* y) {
    for (int T = n0 / 16; 16 * T < n1; T++) {
        if (W.scale_bf16 && !SPQR) avx2_tile<BITS, MT, true, GRID, SPQR>(W, a, m0, T, y);
        else avx2_tile<BITS, MT, false, GRID, SPQR>(W, a, m0, T, y);
    }
}

static_assert(TF_AVX2_TOKENS == 2 || TF_AVX2_TOKENS == 4, "TF_AVX2_TOKENS: 2 or 4 tokens per pass");
// tokens [m0, m0 + mt), mt <= TF_AVX2_TOKENS; GRID: 0 none, 1 one level table, 2 a table per row; SPQR: SpQR statistics
template <int BITS, int GRID = 0, bool SPQR = false>
static void avx2_rows_bits(const tf_mat& W, const QAct& a, int m0, int mt, int n0, int n1, float* y) {
    if (mt == 1) avx2_rows_t<BITS, 1, GRID, SPQR>(W, a, m0, n0, n1, y);
    else if (mt == 2 || TF_AVX2_TOKENS == 2) avx2_rows_t<BITS, 2, GRID, SPQR>(W, a, m0, n0, n1, y);
    else if (mt == 3) avx2_rows_t<BITS, 3, GRID, SPQR>(W, a, m0, n0, n1, y);
    else avx2_rows_t<BITS, 4, GRID, SPQR>(W, a, m0, n0, n1, y);
}

// fp16 / fp32 dense rows [n0, n1) for tokens [m0, m0+MT), times the fp32 x
template <int MT>
static void avx2_dense_rows(const tf_mat& W, const QAct& a, int m0, int n0, int n1, float* y) {
    const int K = W.K, K8 = K / 8 * 8;
    for (int n = n0; n < n1; n++) {
        __m256 acc[MT];
        for (int t = 0; t < MT; t++) acc[t] = _mm256_setzero_ps();
        const uint16_t* wh = (const uint16_t*)W.dense + (size_t)n * K;
        const float* wf = (const float*)W.dense + (size_t)n * K;
        for (int j = 0; j < K8; j += 8) {
            const __m256 w = W.kind == TF_F16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(wh + j))) : _mm256_loadu_ps(wf + j);
            for (int t = 0; t < MT; t++) acc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(a.x + (size_t)(m0 + t) * K + j), acc[t]);
        }
        for (int t = 0; t < MT; t++) {
            float r = avx2_hsum(acc[t]);
            for (int j = K8; j < K; j++) r += (W.kind == TF_F16 ? f16_to_f32(wh[j]) : wf[j]) * a.x[(size_t)(m0 + t) * K + j];
            y[(size_t)(m0 + t) * W.N + n] = r + (W.bias ? W.bias[n] : 0.f);
        }
    }
}

// rows [n0, n1) of y for every token with the AVX2 kernels; false where they do not apply (see the top)
static bool avx2_rows(const tf_mat& W, const QAct& a, int n0, int n1, float* y, int rb) {
    const bool dense = W.kind != TF_QUANT;
    if (!dense && a.exact) return false;
    const int grid = !dense && W.levels != nullptr ? (W.level_rows ? 2 : 1) : 0;  // 2, 3 or 4 bits (layout.py)
    const bool spqr = !dense && W.stats != nullptr;                                // 2, 3 or 4 bits
    // rows in blocks of rb (matmul.h's row_block), every TF_AVX2_TOKENS tokens inside a block (4 for dense rows;
    // 2 for 4-bit per-row tables taken by rows, avx2_row_table_segment, whose sums hold 8 registers a token)
    const int step = dense ? 4 : grid == 2 && W.bits == 4 && TF_ROW_TABLES ? 2 : TF_AVX2_TOKENS;
    for (int b0 = n0; b0 < n1; b0 += rb)
        for (int m0 = 0, b1 = std::min(n1, b0 + rb); m0 < a.M; m0 += step) {
            const int mt = std::min(step, a.M - m0);
            if (dense) {
                switch (mt) {
                    case 1: avx2_dense_rows<1>(W, a, m0, b0, b1, y); break;
                    case 2: avx2_dense_rows<2>(W, a, m0, b0, b1, y); break;
                    case 3: avx2_dense_rows<3>(W, a, m0, b0, b1, y); break;
                    default: avx2_dense_rows<4>(W, a, m0, b0, b1, y); break;
                }
                continue;
            }
#define TF_AVX2_LOW_BITS(GRID, SPQR)                                                  \
    switch (W.bits) {                                                                 \
        case 2: avx2_rows_bits<2, GRID, SPQR>(W, a, m0, mt, b0, b1, y); break;        \
        case 3: avx2_rows_bits<3, GRID, SPQR>(W, a, m0, mt, b0, b1, y); break;        \
        default: avx2_rows_bits<4, GRID, SPQR>(W, a, m0, mt, b0, b1, y); break;       \
    }
            if (grid == 1) TF_AVX2_LOW_BITS(1, false)
            else if (grid == 2) TF_AVX2_LOW_BITS(2, false)
            else if (spqr) TF_AVX2_LOW_BITS(0, true)
            else
                switch (W.bits) {
                    case 2: avx2_rows_bits<2>(W, a, m0, mt, b0, b1, y); break;
                    case 3: avx2_rows_bits<3>(W, a, m0, mt, b0, b1, y); break;
                    case 4: avx2_rows_bits<4>(W, a, m0, mt, b0, b1, y); break;
                    case 5: avx2_rows_bits<5>(W, a, m0, mt, b0, b1, y); break;
                    case 6: avx2_rows_bits<6>(W, a, m0, mt, b0, b1, y); break;
                    default: avx2_rows_bits<8>(W, a, m0, mt, b0, b1, y); break;
                }
#undef TF_AVX2_LOW_BITS
        }
    return true;
}
#endif
