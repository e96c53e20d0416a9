/* Causal self-attention over a bfloat16 prompt (a prefill) in one call, on AVX-512 BF16.

   q and out [B, H, T, hd], k and v [B, KV, S, hd] with S >= T: the T queries are the last T of the
   S positions (query t sits at S - T + t and sees keys 0 .. S - T + t: a prompt's chunk after the
   ones already in a KV cache). bfloat16, each with its own strides (in elements,
   for the sequence, head and position; each row of hd contiguous), so that the heads of a fused
   projection are read, and the output written in the [B, T, H, hd] order the output projection
   reads, without copies. KV divides H (query heads h = kv * G .. kv * G + G - 1 share kv head kv);
   hd a multiple of 32. The
   arithmetic is that of the block path in `qkv/nn/causal_attention.py`: each score q.k is float32
   (vdpbf16ps multiplies bfloat16 pairs exactly and accumulates in float32), scaled, put through a
   float32 softmax over the keys up to the query's own position, and the weights are rounded to
   bfloat16; their product with V is accumulated in float32 and rounded to bfloat16 once.

   K and V are first repacked per (sequence, kv head) into the pair-interleaved layouts vdpbf16ps
   reads: K as tiles of 16 keys, each dimension pair of the 16 keys in one register; V as key
   pairs, each of its hd columns' two values side by side. A task is ROWS query positions of one
   (sequence, query head): scores for keys 0 .. its last position only (the masked triangle above
   the tile is never computed), softmax, and the weighted sum of V, all in the thread's cache.
   The largest tasks (the last positions) go first, in a dynamic schedule.

   Returns 0, or 1 for shapes it does not take, 2 where the CPU lacks AVX-512 BF16 (callers keep
   the torch path), 3 where memory ran out. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>


int qkv_causal_attention_simd(void) {
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

#define ROWS 32 /* query positions a task */
#define KEYS 32 /* keys are padded to a multiple of this: two 16-key tiles per score step */

static inline __m512bh pair_of(const uint16_t *p) {
    int32_t pair;
    memcpy(&pair, p, sizeof pair);
    return (__m512bh)_mm512_set1_epi32(pair);
}

/* Scores of 8 query rows (pointers, hd elements each) against keys [0, nkeys) of a packed K:
   s[r * ld + key] = scale * q_r . k_key, for nkeys a multiple of KEYS. 16 accumulators: enough
   independent sums to hide vdpbf16ps's latency (8 left the product latency-bound). */
static void scores8(const uint16_t *const *q, const uint16_t *kp, int64_t hd, int64_t nkeys, float scale,
                    float *s, int64_t ld) {
    const int64_t pairs = hd / 2;
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < nkeys / 16; j += 2) {
        const uint16_t *k0 = kp + j * pairs * 32, *k1 = k0 + pairs * 32;
        __m512 a[8][2];
        for (int r = 0; r < 8; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
        for (int64_t p = 0; p < pairs; p++) {
            const __m512bh kz0 = (__m512bh)_mm512_loadu_si512(k0 + p * 32);
            const __m512bh kz1 = (__m512bh)_mm512_loadu_si512(k1 + p * 32);
            for (int r = 0; r < 8; r++) {
                const __m512bh qr = pair_of(q[r] + 2 * p);
                a[r][0] = _mm512_dpbf16_ps(a[r][0], kz0, qr);
                a[r][1] = _mm512_dpbf16_ps(a[r][1], kz1, qr);
            }
        }
        for (int r = 0; r < 8; r++) {
            _mm512_storeu_ps(s + r * ld + j * 16, _mm512_mul_ps(a[r][0], vscale));
            _mm512_storeu_ps(s + r * ld + j * 16 + 16, _mm512_mul_ps(a[r][1], vscale));
        }
    }
}

/* out rows (pointers, NULL for padding) = the 8 weight rows w (bfloat16, ld apart) times packed V
   over key pairs [0, npairs), 32 columns at a time. */
static void weighted8(const uint16_t *w, int64_t ld, const uint16_t *vp, int64_t hd, int64_t npairs,
                      uint16_t *const *out) {
    for (int64_t d = 0; d < hd; d += 32) {
        __m512 a[8][2];
        for (int r = 0; r < 8; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
        for (int64_t c = 0; c < npairs; c++) {
            const __m512bh v0 = (__m512bh)_mm512_loadu_si512(vp + (c * hd + d) * 2);
            const __m512bh v1 = (__m512bh)_mm512_loadu_si512(vp + (c * hd + d + 16) * 2);
            for (int r = 0; r < 8; r++) {
                const __m512bh wr = pair_of(w + r * ld + 2 * c);
                a[r][0] = _mm512_dpbf16_ps(a[r][0], v0, wr);
                a[r][1] = _mm512_dpbf16_ps(a[r][1], v1, wr);
            }
        }
        for (int r = 0; r < 8; r++) {
            if (!out[r]) continue;
            _mm256_storeu_si256((__m256i *)(out[r] + d), (__m256i)_mm512_cvtneps_pbh(a[r][0]));
            _mm256_storeu_si256((__m256i *)(out[r] + d + 16), (__m256i)_mm512_cvtneps_pbh(a[r][1]));
        }
    }
}

/* e^x on 16 lanes of x <= 0: the polynomial of exp_nonpositive (exp.h), in AVX-512. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

static inline __mmask16 first_lanes(int64_t k) { return k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << k) - 1u); }

/* Softmax of s[0 .. last] (the keys a query at position `last` sees) as bfloat16 weights w[0, n),
   zero from last + 1 on; n a multiple of 16. Written in intrinsics: the compiler left the scalar
   loop unvectorized, and it took three quarters of the kernel's time. */
static void softmax_row(float *s, int64_t last, uint16_t *w, int64_t n) {
    const int64_t count = last + 1;
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t c = 0; c < count; c += 16)
        vmax = _mm512_mask_max_ps(vmax, first_lanes(count - c), vmax, _mm512_loadu_ps(s + c));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t c = 0; c < count; c += 16) {
        const __m512 e = _mm512_maskz_mov_ps(first_lanes(count - c), exp16(_mm512_sub_ps(_mm512_loadu_ps(s + c), m)));
        _mm512_storeu_ps(s + c, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
    const int64_t done = (count + 15) / 16 * 16;
    for (int64_t c = 0; c < done; c += 16)
        _mm256_storeu_si256((__m256i *)(w + c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(s + c), inv)));
    for (int64_t c = done; c < n; c += 16) _mm256_storeu_si256((__m256i *)(w + c), _mm256_setzero_si256());
}

int qkv_causal_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t B,
                              int64_t H, int64_t KV, int64_t T, int64_t S, int64_t hd, const int64_t *strides,
                              float scale, int threads) {
    /* strides: q's, k's, v's and out's (sequence, head, position) strides, in that order */
    const int64_t *sq = strides, *sk = strides + 3, *sv = strides + 6, *so = strides + 9;
    if (B <= 0 || T <= 0 || S < T || KV <= 0 || H % KV || hd <= 0 || hd % 32 || threads < 1) return 1;
    const int64_t G = H / KV, pairs = hd / 2, padded = (S + KEYS - 1) / KEYS * KEYS, offset = S - T;
    const int64_t tiles = (T + ROWS - 1) / ROWS;
    /* per (sequence, kv head): K as [padded / 16][pairs][16][2], V as [padded / 2][hd][2] */
    uint16_t *kp = malloc(sizeof(uint16_t) * (size_t)(B * KV * padded * hd));
    uint16_t *vp = malloc(sizeof(uint16_t) * (size_t)(B * KV * padded * hd));
    int failed = !kp || !vp;
#pragma omp parallel num_threads(threads)
    {
        float *s = malloc(sizeof(float) * (size_t)(ROWS * padded));
        uint16_t *w = malloc(sizeof(uint16_t) * (size_t)(ROWS * padded));
        uint16_t *zero = calloc((size_t)hd, sizeof(uint16_t));
        if (!s || !w || !zero) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t bk = 0; bk < B * KV; bk++) {
            if (!kp || !vp) continue;
            const uint16_t *kb = k + bk / KV * sk[0] + bk % KV * sk[1], *vb = v + bk / KV * sv[0] + bk % KV * sv[1];
            uint16_t *kpb = kp + bk * padded * hd, *vpb = vp + bk * padded * hd;
            for (int64_t key = 0; key < padded; key++) {
                uint16_t *kt = kpb + (key / 16) * pairs * 32 + (key % 16) * 2;
                uint16_t *vt = vpb + (key / 2) * hd * 2 + key % 2;
                for (int64_t p = 0; p < pairs; p++) {
                    kt[p * 32] = key < S ? kb[key * sk[2] + 2 * p] : 0;
                    kt[p * 32 + 1] = key < S ? kb[key * sk[2] + 2 * p + 1] : 0;
                }
                for (int64_t d = 0; d < hd; d++) vt[d * 2] = key < S ? vb[key * sv[2] + d] : 0;
            }
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < B * H * tiles; task++) {
            if (failed) continue;
            const int64_t tile = tiles - 1 - task % tiles, bh = task / tiles;
            const int64_t b = bh / H, h = bh % H, bk = b * KV + h / G;
            const uint16_t *qb = q + b * sq[0] + h * sq[1];
            uint16_t *ob = out + b * so[0] + h * so[1];
            const int64_t t0 = tile * ROWS, rows = T - t0 < ROWS ? T - t0 : ROWS;
            const int64_t keys = (offset + t0 + rows + KEYS - 1) / KEYS * KEYS; /* keys this tile reads, padded */
            const uint16_t *qrow[ROWS + 8];
            uint16_t *orow[ROWS + 8];
            for (int64_t r = 0; r < ROWS + 8; r++) {
                const int real = r < rows;
                qrow[r] = real ? qb + (t0 + r) * sq[2] : zero;
                orow[r] = real ? ob + (t0 + r) * so[2] : 0;
            }
            for (int64_t r = 0; r < rows; r += 8)
                scores8(qrow + r, kp + bk * padded * hd, hd, keys, scale, s + r * padded, padded);
            for (int64_t r = 0; r < rows; r++) softmax_row(s + r * padded, offset + t0 + r, w + r * padded, keys);
            for (int64_t r = rows; r < (rows + 7) / 8 * 8; r++) memset(w + r * padded, 0, sizeof(uint16_t) * (size_t)keys);
            for (int64_t r = 0; r < rows; r += 8) {
                const int64_t last = offset + t0 + (r + 8 < rows ? r + 8 : rows) - 1; /* the group's last position */
                weighted8(w + r * padded, padded, vp + bk * padded * hd, hd, (last + 2) / 2, orow + r);
            }
        }
        free(s);
        free(w);
        free(zero);
    }
    free(kp);
    free(vp);
    return failed ? 3 : 0;
}
#else
int qkv_causal_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t B,
                              int64_t H, int64_t KV, int64_t T, int64_t S, int64_t hd, const int64_t *strides,
                              float scale, int threads) {
    (void)q, (void)k, (void)v, (void)out, (void)B, (void)H, (void)KV, (void)T, (void)S, (void)hd, (void)strides,
        (void)scale, (void)threads;
    return 2;
}
#endif
