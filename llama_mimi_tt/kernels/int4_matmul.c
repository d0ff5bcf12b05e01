/* y[m, n] = sum_k x[m, k] * w[n, k] with int4 weights, for CPUs with AVX-512 VNNI.
 *
 * Weights: q[n, k] in 0..15 with a scale s and a zero z per row and group of 128 columns,
 * w = (q - z) * s. Packed [N, K / 2] bytes: in each group, byte j holds column j (low nibble)
 * and column 64 + j (high nibble), so one 64-byte load unpacks into two 64-column halves.
 * Activations: each row of x is quantized to int8 per group of 128 (scale = max |x| / 127),
 * so a group's dot product is one pair of vpdpbusd (u8 x s8 -> s32) instructions:
 *   y[m, n] = sum_g s[n, g] * sx[m, g] * (sum_k q[n, k] * xq[m, k] - z[n, g] * sum_k xq[m, k])
 * A row's packed weights (K / 2 bytes) are read once and reused from L1 for every row of x.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define GROUP 128

static void quantize_rows(const float *x, int m, int k, int8_t *xq, float *sx, float *xsum) {
    int groups = k / GROUP;
    for (int r = 0; r < m; r++) {
        for (int g = 0; g < groups; g++) {
            const float *xs = x + (size_t)r * k + (size_t)g * GROUP;
            float amax = 0.f;
            for (int i = 0; i < GROUP; i++) amax = fmaxf(amax, fabsf(xs[i]));
            float scale = amax > 0.f ? amax / 127.f : 1.f;
            float inv = 1.f / scale;
            int sum = 0;
            int8_t *q = xq + (size_t)r * k + (size_t)g * GROUP;
            for (int i = 0; i < GROUP; i++) {
                int v = (int)lrintf(xs[i] * inv);
                v = v > 127 ? 127 : (v < -127 ? -127 : v);
                q[i] = (int8_t)v;
                sum += v;
            }
            sx[(size_t)r * groups + g] = scale;
            xsum[(size_t)r * groups + g] = (float)sum;
        }
    }
}

int int4_matmul(const float *x, int m, int k, const uint8_t *w, const float *s, const float *z,
                int n, float *y, int threads) {
    if (k % GROUP) return 1;
    int groups = k / GROUP;
    int8_t *xq = aligned_alloc(64, (size_t)m * k + 64);
    float *sx = malloc(sizeof(float) * (size_t)m * groups);
    float *xsum = malloc(sizeof(float) * (size_t)m * groups);
    if (!xq || !sx || !xsum) {
        free(xq); free(sx); free(xsum);
        return 2;
    }
    quantize_rows(x, m, k, xq, sx, xsum);
    const __m512i low = _mm512_set1_epi8(0x0F);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int row = 0; row < n; row++) {
        const uint8_t *wr = w + (size_t)row * (k / 2);
        const float *sr = s + (size_t)row * groups;
        const float *zr = z + (size_t)row * groups;
        for (int r = 0; r < m; r++) {
            const int8_t *xr = xq + (size_t)r * k;
            const float *sxr = sx + (size_t)r * groups;
            const float *xsr = xsum + (size_t)r * groups;
            __m512 acc = _mm512_setzero_ps();
            float correction = 0.f;
            for (int g = 0; g < groups; g++) {
                __m512i b = _mm512_loadu_si512((const void *)(wr + (size_t)g * 64));
                __m512i lo = _mm512_and_si512(b, low);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
                __m512i xa = _mm512_loadu_si512((const void *)(xr + (size_t)g * GROUP));
                __m512i xb = _mm512_loadu_si512((const void *)(xr + (size_t)g * GROUP + 64));
                __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xa);
                d = _mm512_dpbusd_epi32(d, hi, xb);
                float scale = sr[g] * sxr[g];
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(scale), acc);
                correction += scale * zr[g] * xsr[g];
            }
            y[(size_t)r * n + row] = _mm512_reduce_add_ps(acc) - correction;
        }
    }
    free(xq); free(sx); free(xsum);
    return 0;
}
