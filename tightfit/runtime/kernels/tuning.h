// The matrix kernels' tuning knobs (matmul.h, matmul_avx2.h), chosen by measurement (bench/kernel_ab.py
// builds variants through build.load(defines=...) and times them round-robin in one process):
//   TF_PREFETCH      software prefetch distance in bytes. Decode of models streamed from DRAM
//                    (qwen2.5-coder-1.5b, 2-core EPYC with 32 MiB L3, 2 threads, 2026-11-26, medians
//                    of 7 rounds): 4096 vs 1024 vs 0: w2g64 72.7 / 67.8 / 68.7 tok/s, w3g128 58.4 /
//                    53.6 / 53.5, w4g128 47.5 vs 2048: 45.2; SmolLM2-135M w8g32 229.8 / 226.8 / 216.5
//                    (8192 and 16384 as 4096; an L2 hint instead of L1 alike). Earlier, SmolLM2-135M
//                    w4g32-sym on a 2-core Zen 5 (2026-11-23): 1024 vs 0: 207 vs 194 at 2 threads.
//   TF_DECODE_TILES  row tiles sharing each activation broadcast at decode; 2 vs 1: 105 vs 140 tok/s
//   TF_ROW_BLOCK_BYTES  rows per block of a multi-token matmul (bytes of codes; the tokens loop inside a
//                    block). Scoring a 512-token window (every token's logits, fp16 head, w3g64 layers,
//                    SmolLM2-135M, 2 threads, 2026-11-28, `kernel_ab.py --all-logits 512`, medians of 5):
//                    128 KB vs 512 KB vs one block: 732 / 660 / 580 tok/s (decode: one token, no change)
//   TF_ROW_TABLES    per-row level tables on the AVX2 tier (matmul_avx2.h): 1 folds 2- and 3-bit tables (four
//                    or two rows per 16-byte lane) and takes 4-bit codes by rows (avx2_row_table_segment); 0 looks
//                    every half chunk up in four tables and blends. gate_proj [1536, 576], 1 thread, best of 20-30
//                    (`bench/matrix_ab.py --variant "" --variant TF_ROW_TABLES=0`, 2026-11-29): lut4g32-row 41.0 ->
//                    34.3 us, lut3g128-row 62.6 -> 53.4 us (w4g32-sym 23, lut4g32 26, w3g64 33, lut3g128 40)
//   TF_AVX2_TOKENS   tokens sharing each pass over a tile's codes in a multi-token matmul on the AVX2 tier (2 or
//                    4). Scoring a 512-token window (`kernel_ab.py --all-logits 512 --rounds 6`, 2 threads, AVX2
//                    EPYC, 2026-11-29, medians of 5), 4 vs 2: w4g32-sym 362 / 317 tok/s, w3g64 299 / 242,
//                    w8g32-sym 295 / 237, lut4g32 280 / 266, lut3g128-row 258 / 214, spqr-w3g32-s3-o0.5 264 / 221;
//                    lut4g32-row 205 / 226, so 4-bit per-row tables keep 2 (matmul_avx2.h)
//   TF_ZERO_AT_START matmuls of at most this many tokens subtract a uniform format's zero term s z xs as each
//                    group starts, with the scales just loaded (more tokens: after the tile, every group's
//                    scales and zeros loaded again). AVX2 tier, 1 thread, 2026-11-29: decode (`kernel_ab.py
//                    --threads 1 --rounds 12`, medians of 11) 1 vs 0: w4g32-sym 133.1 / 128.0 tok/s, w3g16-dq
//                    114.9 / 98.6; one gate_proj (the two builds' libraries timed round-robin as bench/matrix_ab.py does, best
//                    of 30-40; `matrix_ab.py --variant "" --variant TF_ZERO_AT_START=0` repeats it): w2g16 33.6 -> 30.4 us, w3g16
//                    46.6 -> 41.8, w4g128 19.6 -> 18.3, w4g32-sym 23.1 -> 21.6, w3g64 32.1 -> 32.1; scoring 512
//                    tokens (4 per pass) was no faster so (w4g32-sym 224.6 vs 249.3 tok/s, w3g16-dq 167 vs 186)
// Measured the same way and removed: a second vpdpbusd accumulator per tile (136 vs 140 tok/s on
// SmolLM2; 2-bit decode matmuls at K = 8960 alike).
// Part of the one translation unit engine.cpp.
#pragma once

#ifndef TF_PREFETCH
#define TF_PREFETCH 4096
#endif
#ifndef TF_DECODE_TILES
#define TF_DECODE_TILES 1
#endif
#ifndef TF_ROW_BLOCK_BYTES
#define TF_ROW_BLOCK_BYTES (128 * 1024)
#endif
#ifndef TF_ROW_TABLES
#define TF_ROW_TABLES 1
#endif
#ifndef TF_ZERO_AT_START
#define TF_ZERO_AT_START 1
#endif
#ifndef TF_AVX2_TOKENS
#define TF_AVX2_TOKENS 4
#endif
