/* e^x for x <= 0, vectorizable (shared by the attention kernels' softmax loops). */
#ifndef QKV_EXP_H
#define QKV_EXP_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, 2^n put in the exponent; within 2 ulp.
   Written so that the softmax loops vectorize, which libm's expf does not. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}
#endif
