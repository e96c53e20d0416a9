/* Attention for one new query per sequence (the decode step) over a bfloat16 KV cache.

   q [B, H, hd], k and v [B, KV, S, hd], all bfloat16 and contiguous; bias float32 with strides
   (bias_sb, bias_sh, 1) over [B, H, S] (stride 0 where it broadcasts), or NULL. out [B, H, hd].
   Scores, softmax and the weighted sum are float32, as `qkv.nn.attention._single_query` computes
   them, and the output is rounded to bfloat16 once. Keys whose bias is -1e30 or below (the
   masked slots of a static cache: most of it early in a generation) get weight exactly 0, and
   the slots before the first and after the last unmasked one are not read at all. One OpenMP
   task per (sequence, kv head); the query heads that share a kv head read each cached row once.
   Returns nonzero for shapes it does not take. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "exp.h"

#define LANES 16

static inline float dot(const float *a, const float *b, int64_t n) { /* n % LANES == 0 */
    float part[LANES] = {0};
    for (int64_t d = 0; d < n; d += LANES)
        for (int l = 0; l < LANES; l++) part[l] += a[d + l] * b[d + l];
    for (int width = LANES / 2; width > 0; width /= 2) /* a tree, not a chain of dependent adds */
        for (int l = 0; l < width; l++) part[l] += part[l + width];
    return part[0];
}

int qkv_single_query_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const float *bias,
                          uint16_t *out, int64_t B, int64_t H, int64_t KV, int64_t S, int64_t hd,
                          int64_t bias_sb, int64_t bias_sh, float scale, int threads) {
    if (KV <= 0 || H % KV || hd <= 0 || hd % LANES || S <= 0 || threads < 1) return 1;
    const int64_t G = H / KV;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        /* per thread: G query rows, one key/value row, G x S scores, G accumulators */
        float *work = malloc(sizeof(float) * (size_t)(G * hd + hd + G * S + G * hd + 2 * G));
        if (!work) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < B * KV; task++) {
            if (!work) continue;
            const int64_t b = task / KV, kv = task % KV;
            float *qf = work, *row = qf + G * hd, *score = row + hd, *acc = score + G * S, *top = acc + G * hd,
                  *total = top + G;
            const uint16_t *kb = k + task * S * hd, *vb = v + task * S * hd;
            const float *bias_b = bias ? bias + b * bias_sb + kv * G * bias_sh : 0;
            /* the slots [lo, hi) outside of which every head of this group is masked */
            int64_t lo = 0, hi = S;
            if (bias_b) {
                lo = S, hi = 0;
                for (int64_t g = 0; g < (bias_sh ? G : 1); g++) {
                    const float *bg = bias_b + g * bias_sh;
                    int64_t first = 0, last = S;
                    while (first < S && bg[first] <= -1e30f) first++;
                    while (last > first && bg[last - 1] <= -1e30f) last--;
                    if (first < last) {
                        lo = first < lo ? first : lo;
                        hi = last > hi ? last : hi;
                    }
                }
            }
            const int64_t n = hi > lo ? hi - lo : 0;
            for (int64_t g = 0; g < G; g++)
                for (int64_t d = 0; d < hd; d++) qf[g * hd + d] = from_bf16(q[(b * H + kv * G + g) * hd + d]);
            for (int64_t s = 0; s < n; s++) {
                for (int64_t d = 0; d < hd; d++) row[d] = from_bf16(kb[(lo + s) * hd + d]);
                for (int64_t g = 0; g < G; g++)
                    score[g * S + s] = dot(qf + g * hd, row, hd) * scale + (bias_b ? bias_b[g * bias_sh + lo + s] : 0.0f);
            }
            for (int64_t g = 0; g < G; g++) {
                float *sg = score + g * S, m = -INFINITY, sum = 0.0f;
                const float *bg = bias_b ? bias_b + g * bias_sh + lo : 0;
                for (int64_t s = 0; s < n; s++) m = sg[s] > m ? sg[s] : m;
                for (int64_t s = 0; s < n; s++) sg[s] = exp_nonpositive(sg[s] - m);
                if (bg)
                    for (int64_t s = 0; s < n; s++) sg[s] = bg[s] <= -1e30f ? 0.0f : sg[s];
                for (int64_t s = 0; s < n; s++) sum += sg[s];
                total[g] = sum;
            }
            memset(acc, 0, sizeof(float) * (size_t)(G * hd));
            for (int64_t s = 0; s < n; s++) {
                for (int64_t d = 0; d < hd; d++) row[d] = from_bf16(vb[(lo + s) * hd + d]);
                for (int64_t g = 0; g < G; g++) {
                    const float w = score[g * S + s];
                    for (int64_t d = 0; d < hd; d++) acc[g * hd + d] += w * row[d];
                }
            }
            for (int64_t g = 0; g < G; g++)
                for (int64_t d = 0; d < hd; d++)
                    out[(b * H + kv * G + g) * hd + d] = to_bf16(total[g] > 0 ? acc[g * hd + d] / total[g] : 0.0f);
        }
        free(work);
    }
    return failed ? 2 : 0;
}
