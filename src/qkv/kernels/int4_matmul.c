/* y = x @ W^T for a few rows of bfloat16 activations and a weight in torch's packed int4 CPU layout.

   x [M, *] bfloat16 with row stride ldx; column k of W multiplies x[:, k % kx] (kx = K for a plain
   layer; kx = K / 2 for a group-wise int8 weight run as two int4 halves over [x | x]). W [N, K]
   as `_convert_weight_to_int4pack_for_cpu` packs it (AVX-512 build): blocks of 64 rows, block b
   is [K, 32] bytes, byte (k, j) holding row b*64 + j in its low nibble and row b*64 + j + 32 in
   its high one; a last block of r = N % 64 rows is [K, r/2] bytes holding rows 2p (low) and 2p+1
   (high) in byte p. scales_and_zeros [K / group, N, 2] bfloat16; w = (q - 8) * scale + zero.
   y [M, N] bfloat16.

   torch's kernel decodes the weight to float32 again for every 4 rows of x and does one float32
   FMA per weight and row. Here a group is summed in integers' stead: with q + 128 in the
   bfloat16 bits 0x4300 | q (exact), vdpbf16ps accumulates a = sum x * (q + 128) over a group,
   two k at a time and for up to MT rows at once (the weight is decoded once per MT rows), and
   the group folds in as y += scale * a + (zero - 136 * scale) * sum(x). Products of two bfloat16
   values are exact in float32; the sums are float32, like torch's; y is rounded once to bfloat16.
   Work is split by 32-column tiles over torch's OpenMP pool (see int4_dense.c).

   Without AVX-512 BF16 (`qkv_int4_matmul_simd()` is 0) the function returns 2 and callers keep
   torch's kernel. Returns 1 for shapes it does not take. */
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

int qkv_int4_matmul_simd(void) {
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}

/* The last block of N % 64 rows (pairs layout), and every block where SIMD is missing: plain C. */
static void rows_scalar(const uint16_t *x, int64_t ldx, int64_t kx, const uint8_t *block, int64_t width,
                        int pairs, const uint16_t *sz, int64_t n, int64_t k, int64_t group, int64_t m,
                        uint16_t *y, int64_t ldy) {
    for (int64_t mi = 0; mi < m; mi++)
        for (int64_t j = 0; j < width; j++) {
            float total = 0.0f;
            for (int64_t g = 0; g < k / group; g++) {
                const float s = from_bf16(sz[(g * n + j) * 2]), z = from_bf16(sz[(g * n + j) * 2 + 1]);
                float part = 0.0f;
                for (int64_t c = g * group; c < (g + 1) * group; c++) {
                    uint8_t byte;
                    int high;
                    if (pairs) {
                        byte = block[c * (width / 2) + j / 2];
                        high = j & 1;
                    } else {
                        byte = block[c * 32 + (j & 31)];
                        high = j >= 32;
                    }
                    const int q = high ? byte >> 4 : byte & 15;
                    part += from_bf16(x[mi * ldx + c % kx]) * ((float)(q - 8) * s + z);
                }
                total += part;
            }
            y[mi * ldy + j] = to_bf16(total);
        }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

#define MAX_MT 6 /* rows a tile: 2 accumulators + 2 sums per row, in 32 zmm registers */
/* Bytes ahead of the packed rows read now to ask the cache for. In a model a layer's weights come
   from memory once per call, at the pace of the first row tile's arithmetic, which left memory
   latency exposed; `benchmarks/int4_matmul.py --cold` measures products over weights not in cache. */
#define PREFETCH 2048

/* One 32-column tile (16 bytes of each packed row: columns c..c+15 and c+32..c+47 of the block)
   for MT rows of x. xsum [MT][groups_x]: each row's sum of x over a group. */
static inline __attribute__((always_inline)) void tile(const uint16_t *x, int64_t ldx, int64_t kx,
                                                       const uint8_t *col, const uint16_t *sz, int64_t n,
                                                       int64_t k, int64_t group, const float *xsum,
                                                       int64_t groups_x, uint16_t *y, int64_t ldy, const int MT) {
    const __m512i nibble = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(0x43004300);
    __m512 lo_out[MAX_MT], hi_out[MAX_MT];
    for (int r = 0; r < MT; r++) lo_out[r] = hi_out[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < k / group; g++) {
        __m512 lo_acc[MAX_MT], hi_acc[MAX_MT];
        for (int r = 0; r < MT; r++) lo_acc[r] = hi_acc[r] = _mm512_setzero_ps();
        const int64_t xk = (g * group) % kx;
        const uint8_t *p = col + g * group * 32;
        for (int64_t c = 0; c < group; c += 2, p += 64) {
            _mm_prefetch((const char *)(p + PREFETCH), _MM_HINT_T0);
            /* 32-bit lane i: byte i of row c in its low half, of row c + 1 in its high half */
            const __m512i v = _mm512_or_si512(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)),
                                              _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 32))), 16));
            /* (v & nibble) | magic: bfloat16 pairs 128 + q */
            const __m512bh lo = (__m512bh)_mm512_ternarylogic_epi32(v, nibble, magic, 0xEA);
            const __m512bh hi = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 4), nibble, magic, 0xEA);
            for (int r = 0; r < MT; r++) {
                int32_t pair;
                __builtin_memcpy(&pair, x + r * ldx + xk + c, sizeof pair);
                const __m512bh xr = (__m512bh)_mm512_set1_epi32(pair);
                lo_acc[r] = _mm512_dpbf16_ps(lo_acc[r], lo, xr);
                hi_acc[r] = _mm512_dpbf16_ps(hi_acc[r], hi, xr);
            }
        }
        /* lanes (scale, zero) bfloat16 pairs: the scale is the low half */
        const __m512i lo_sz = _mm512_loadu_si512(sz + g * n * 2), hi_sz = _mm512_loadu_si512(sz + (g * n + 32) * 2);
        const __m512 lo_s = _mm512_castsi512_ps(_mm512_slli_epi32(lo_sz, 16));
        const __m512 hi_s = _mm512_castsi512_ps(_mm512_slli_epi32(hi_sz, 16));
        const __m512i top = _mm512_set1_epi32((int)0xFFFF0000u);
        const __m512 off = _mm512_set1_ps(-136.0f);
        const __m512 lo_c = _mm512_fmadd_ps(lo_s, off, _mm512_castsi512_ps(_mm512_and_si512(lo_sz, top)));
        const __m512 hi_c = _mm512_fmadd_ps(hi_s, off, _mm512_castsi512_ps(_mm512_and_si512(hi_sz, top)));
        const int64_t gx = g % groups_x;
        for (int r = 0; r < MT; r++) {
            const __m512 sum = _mm512_set1_ps(xsum[r * groups_x + gx]);
            lo_out[r] = _mm512_fmadd_ps(lo_c, sum, _mm512_fmadd_ps(lo_s, lo_acc[r], lo_out[r]));
            hi_out[r] = _mm512_fmadd_ps(hi_c, sum, _mm512_fmadd_ps(hi_s, hi_acc[r], hi_out[r]));
        }
    }
    for (int r = 0; r < MT; r++) {
        _mm256_storeu_si256((__m256i *)(y + r * ldy), (__m256i)_mm512_cvtneps_pbh(lo_out[r]));
        _mm256_storeu_si256((__m256i *)(y + r * ldy + 32), (__m256i)_mm512_cvtneps_pbh(hi_out[r]));
    }
}

static void tile_rows(const uint16_t *x, int64_t ldx, int64_t kx, const uint8_t *col, const uint16_t *sz,
                      int64_t n, int64_t k, int64_t group, const float *xsum, int64_t groups_x, uint16_t *y,
                      int64_t ldy, int mt) {
    switch (mt) { /* constant row counts: the accumulators stay in registers */
    case 1: tile(x, ldx, kx, col, sz, n, k, group, xsum, groups_x, y, ldy, 1); break;
    case 2: tile(x, ldx, kx, col, sz, n, k, group, xsum, groups_x, y, ldy, 2); break;
    case 3: tile(x, ldx, kx, col, sz, n, k, group, xsum, groups_x, y, ldy, 3); break;
    case 4: tile(x, ldx, kx, col, sz, n, k, group, xsum, groups_x, y, ldy, 4); break;
    case 5: tile(x, ldx, kx, col, sz, n, k, group, xsum, groups_x, y, ldy, 5); break;
    default: tile(x, ldx, kx, col, sz, n, k, group, xsum, groups_x, y, ldy, 6); break;
    }
}
#endif

int qkv_int4_matmul_bf16(const uint16_t *x, const uint8_t *packed, const uint16_t *scales_and_zeros, uint16_t *y,
                         int64_t m, int64_t n, int64_t k, int64_t kx, int64_t ldx, int64_t group, int threads) {
    if (m < 1 || n < 16 || n % 16 || k < 2 || group < 2 || group % 2 || k % group || kx < group || kx % group ||
        k % kx || ldx < kx || threads < 1)
        return 1;
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
    const int64_t groups_x = kx / group, full = n / 64, tail = n % 64;
    float *xsum = malloc(sizeof(float) * (size_t)(m * groups_x));
    if (!xsum) return 3;
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < groups_x; g++) {
            float s = 0.0f;
            for (int64_t c = g * group; c < (g + 1) * group; c++) s += from_bf16(x[r * ldx + c]);
            xsum[r * groups_x + g] = s;
        }
    const int64_t row_tiles = (m + MAX_MT - 1) / MAX_MT, tasks = full * 2 + (tail ? 1 : 0);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        if (t == full * 2) { /* the last, partial block */
            rows_scalar(x, ldx, kx, packed + full * 64 * k / 2, tail, 1, scales_and_zeros + full * 64 * 2, n, k,
                        group, m, y + full * 64, n);
            continue;
        }
        const int64_t b = t / 2, half = t % 2, c0 = b * 64 + half * 16;
        for (int64_t rt = 0, r0 = 0; rt < row_tiles; rt++) {
            const int64_t rows = (m - r0) / (row_tiles - rt); /* balanced: 16 rows -> 5, 5, 6 */
            tile_rows(x + r0 * ldx, ldx, kx, packed + b * 64 * k / 2 + half * 16, scales_and_zeros + c0 * 2, n, k,
                      group, xsum + r0 * groups_x, groups_x, y + r0 * n + c0, n, (int)rows);
            r0 += rows;
        }
    }
    free(xsum);
    return 0;
#else
    (void)x; (void)packed; (void)scales_and_zeros; (void)y; (void)rows_scalar;
    return 2;
#endif
}
