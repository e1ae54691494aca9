// tightfit CPU engine: low-bit matrix kernels and a decoder forward step, plain C ABI (ctypes:
// build.py compiles and declares it, layout.py and engine.py mirror its structs).
//
// The engine is one translation unit: this file includes its parts in the order data flows
//   common.h       instruction sets, the C ABI structs, fp16/bf16 conversions, vector e^x
//   layout.h       the weight layout ("tf-tile16") and its decoding
//   activations.h  int8 block-32 activations (llama.cpp's Q8_0)
//   outliers.h     SpQR's sparse residuals, added after a matmul's dense part
//   matmul.h       quantized and dense matrix kernels: AVX-512 VNNI, AVX2 (matmul_avx2.h), or portable scalar
//                  code; their tuning knobs in tuning.h
//   kv_cache.h     the KV cache: fp16, or 8- or 4-bit codes with per-token group scales
//   attention_values.h  how attention reads a KV head's cache; the weighted sum of its values
//   attention.h    RoPE, softmax attention of the query heads that share one KV head's cache; on AVX2: attention_avx2.h
//   threads.h      the forward step's threads: kept across calls, a barrier (spin, yield, sleep)
//   checks.h       what tf_engine_create accepts: sizes, architecture fields, weight matrices
//   forward.h      the decoder's forward step
//   timing.h       timing entry points (matmuls, memory reads, attention, the forward step's
//                  phases) and the attention probe of the kernel tests
// One unit, not several objects linked together, so that -O3 -march=native inlines the hot path
// across parts (chunk unpacking into the tile loops, the tiles into matmul_rows, those into the
// forward step) exactly as within one file, without depending on link-time optimization; every
// internal function stays `static` and only the extern "C" functions are exported. build.py
// compiles this file alone and keys its cache on every source here.

#include "common.h"
#include "layout.h"
#include "activations.h"
#include "matmul.h"
#include "kv_cache.h"
#include "attention_values.h"
#include "attention.h"
#include "threads.h"
#include "checks.h"
#include "forward.h"
#include "timing.h"

extern "C" {

int tf_abi_version(void) { return TF_ABI_VERSION; }
int tf_has_avx512(void) { return TF_AVX512; }
int tf_has_avx2(void) { return TF_AVX2; }

}  // extern "C"
