/* GGUF Q4_0 / Q4_1 / Q8_0 blocks straight into torch's packed CPU int4 layout, in one pass.

   The loader would otherwise unpack the file's nibbles into `QuantLinear`'s stored form and repack
   them for the kernel (two passes over every weight, and the stored copy beside the packed one).
   Output, as `QuantLinear._build_kernel` builds it (see int4_dense.c for the layout):
     packed [n / 64, kk, 32] bytes: byte (k, j) of block b holds row b*64 + j in its low nibble and
       row b*64 + j + 32 in its high one, kk = k (Q4) or 2k (Q8_0: each value as two int4 halves);
     scales_and_zeros [kk / 32, n, 2] bfloat16 (round to nearest even, as torch's .to(bfloat16));
     scales, zeros [n, k / 32] float32: the stored form's exact values (zeros: Q4 only).
   Row r of the output reads its blocks at row_addr[r] (any file row, so fused Q/K/V rows and the
   RoPE-permuted rows come out in the model's order) of type row_type[r]: 0 = Q4_0 (w = (q - 8) d),
   1 = Q4_1 (w = q d + m = (q - 8) d + (m + 8 d)), 2 = Q8_0 (w = v d, v = 16 hi + lo with hi = v >> 4,
   lo = v & 15, stored as hi + 8 under scale 16 d and lo under scale d with zero 8 d). Types 0 and 1
   mix freely; 2 must be alone. A Q4 byte of the file holds element i in its low nibble and i + 16 in
   its high one (ggml's block_q4_0 / block_q4_1). Work is split by 64-row blocks over OpenMP threads. */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

static inline float from_fp16(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    uint32_t u;
    if (exp == 0) {
        float f = (float)man * 5.9604644775390625e-8f; /* man * 2^-24: exact */
        memcpy(&u, &f, sizeof u);
        u |= sign;
    } else if (exp == 31) {
        u = sign | 0x7F800000u | (man << 13);
    } else {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t load_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* The 32 values of one block as kernel nibbles in q[0..31] (Q8_0: hi halves in q[0..31], lo
   halves in q[32..63]); its scale(s) and zero(s) in s[], z[] (Q8_0: two of each). */
static inline void decode_block(const uint8_t *blk, int type, uint8_t *q, float *s, float *z) {
    const float d = from_fp16(load_u16(blk));
    if (type == 2) {
        const int8_t *v = (const int8_t *)(blk + 2);
        for (int i = 0; i < 32; i++) {
            q[i] = (uint8_t)((v[i] >> 4) + 8);
            q[32 + i] = (uint8_t)(v[i] & 15);
        }
        s[0] = 16.0f * d, z[0] = 0.0f, s[1] = d, z[1] = 8.0f * d;
        return;
    }
    const uint8_t *qs = blk + (type == 1 ? 4 : 2);
    for (int i = 0; i < 16; i++) {
        q[i] = qs[i] & 15;
        q[16 + i] = qs[i] >> 4;
    }
    s[0] = d;
    z[0] = type == 1 ? from_fp16(load_u16(blk + 2)) + 8.0f * d : 0.0f;
}

int qkv_gguf_int4pack(const int64_t *row_addr, const int8_t *row_type, int64_t n, int64_t k, uint8_t *packed,
                      uint16_t *scales_and_zeros, float *scales, float *zeros, int threads) {
    if (n % 64 || k % 32 || threads < 1) return 1;
    const int q8 = row_type[0] == 2;
    for (int64_t r = 0; r < n; r++)
        if ((row_type[r] == 2) != q8 || row_type[r] < 0 || row_type[r] > 2) return 2;
    const int64_t groups = k / 32, kk = q8 ? 2 * k : k, type_size = q8 ? 34 : 18;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < n / 64; b++) {
        for (int64_t g = 0; g < groups; g++) {
            uint8_t q[64][64]; /* [row in block][value (Q8_0: hi then lo halves)] */
            for (int j = 0; j < 64; j++) {
                const int64_t row = b * 64 + j;
                const int type = row_type[row];
                const int64_t size = type == 1 ? 20 : type_size;
                const uint8_t *blk = (const uint8_t *)(intptr_t)row_addr[row] + g * size;
                float s[2], z[2];
                decode_block(blk, type, q[j], s, z);
                scales[row * groups + g] = q8 ? s[1] : s[0];
                if (zeros) zeros[row * groups + g] = z[0];
                for (int h = 0; h < (q8 ? 2 : 1); h++) {
                    uint16_t *sz = scales_and_zeros + ((g + h * groups) * n + row) * 2;
                    sz[0] = to_bf16(s[h]);
                    sz[1] = to_bf16(z[h]);
                }
            }
            for (int h = 0; h < (q8 ? 2 : 1); h++) {
                uint8_t *out = packed + (b * kk + (g + h * groups) * 32) * 32;
                for (int i = 0; i < 32; i++)
                    for (int j = 0; j < 32; j++) out[i * 32 + j] = q[j][h * 32 + i] | (uint8_t)(q[j + 32][h * 32 + i] << 4);
            }
        }
    }
    return 0;
}
