/* Dense bfloat16 weights from torch's packed int4 CPU layout, in one pass.

   torch's `_convert_weight_to_int4pack_for_cpu` stores W [N, K] in blocks of 64 rows: block b is
   [K, 32] bytes, byte (k, j) holding row b*64 + j in its low nibble and row b*64 + j + 32 in its
   high one. The scales and zeros are [K / group, N, 2] bfloat16. This writes W^T [K, N]: wt[k,
   b*64 + j] = W[b*64 + j, k] (each packed row of a block is 64 contiguous outputs, so every read
   and write is contiguous), the layout the dense matmul reads, with no copy to reach it, and with
   `QuantLinear.dequantize`'s bfloat16 arithmetic bit for bit: t = bf16((q - 8) * s), w = bf16(t + z).
   Work is split by (block, group) tiles over `threads` OpenMP threads: built with -fopenmp, the
   library needs libgomp.so.1, which the process already holds as torch's own, so the kernel runs
   on torch's thread pool instead of fighting it for the cores. */
#include <stdint.h>

#include "bf16.h"

int qkv_int4_dense_bf16(const uint8_t *packed, const uint16_t *scales_and_zeros, uint16_t *out,
                        int64_t n, int64_t k, int64_t group, int threads) {
    if (n % 64 || group <= 0 || k % group || threads < 1) return 1;
    const int64_t groups = k / group, tiles = (n / 64) * groups;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t tile = 0; tile < tiles; tile++) {
        const int64_t b = tile / groups, g = tile % groups;
        const uint16_t *sz = scales_and_zeros + (g * n + b * 64) * 2;
        float scale[64], zero[64];
        for (int j = 0; j < 64; j++) {
            scale[j] = from_bf16(sz[2 * j]);
            zero[j] = from_bf16(sz[2 * j + 1]);
        }
        for (int64_t row = g * group; row < (g + 1) * group; row++) {
            const uint8_t *in = packed + (b * k + row) * 32;
            uint16_t *w = out + row * n + b * 64;
            for (int j = 0; j < 32; j++) {
                const float lo = (float)((int)(in[j] & 15) - 8), hi = (float)((int)(in[j] >> 4) - 8);
                w[j] = to_bf16(from_bf16(to_bf16(lo * scale[j])) + zero[j]);
                w[j + 32] = to_bf16(from_bf16(to_bf16(hi * scale[j + 32])) + zero[j + 32]);
            }
        }
    }
    return 0;
}
