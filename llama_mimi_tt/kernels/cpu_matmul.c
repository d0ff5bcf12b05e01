/* y[m, n] = sum_k x[m, k] * w[n, k] for batch-1 decoding on AVX-512 CPUs: int4 and int8 weights
 * (VNNI) and bf16 weights (AVX512_BF16). Each weight row is read once from memory and reused from
 * L1 for every row of x, and rows are split over OpenMP threads: a matrix-vector product streams
 * the weights at close to the memory bandwidth, which sets the speed of decoding.
 *
 * int4: q[n, k] in 0..15 with a scale s and a zero z per row and group of 128 columns,
 * w = (q - z) * s. Packed [N, K / 2] bytes: in each group, byte j holds column j (low nibble)
 * and column 64 + j (high nibble), so one 64-byte load unpacks into two 64-column halves.
 * int8: q[n, k] in -127..127 with one scale s per row, w = q * s; the kernel flips each byte's
 * top bit (u = q + 128 in 1..255) to feed it to vpdpbusd as the unsigned operand.
 * Activations (int4, int8): each row of x is quantized to int8 per group of 128
 * (scale sx = max |x| / 127), so a group's dot product is vpdpbusd (u8 x s8 -> s32):
 *   int4: y[m, n] = sum_g s[n, g] * sx[m, g] * (sum_k q[n, k] * xq[m, k] - z[n, g] * sum_k xq[m, k])
 *   int8: y[m, n] = s[n] * sum_g sx[m, g] * (sum_k u[n, k] * xq[m, k] - 128 * sum_k xq[m, k])
 * bf16: x rounded to bf16 (round to nearest even), products summed in fp32 by vdpbf16ps.
 * Every function returns 0, or 1 for a K that is not a multiple of 128, 2 when out of memory.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define GROUP 128

typedef struct {
    int8_t *xq;  /* [m, k] */
    float *sx;   /* [m, k / GROUP] scales */
    float *xsum; /* [m, k / GROUP] sums of xq */
} Quantized;

static void release(Quantized *a) {
    free(a->xq); free(a->sx); free(a->xsum);
}

static int quantize_rows(const float *x, int m, int k, Quantized *a) {
    int groups = k / GROUP;
    a->xq = aligned_alloc(64, (size_t)m * k + 64);
    a->sx = malloc(sizeof(float) * (size_t)m * groups);
    a->xsum = malloc(sizeof(float) * (size_t)m * groups);
    if (!a->xq || !a->sx || !a->xsum) {
        release(a);
        return 2;
    }
    for (int r = 0; r < m; r++) {
        for (int g = 0; g < groups; g++) {
            const float *xs = x + (size_t)r * k + (size_t)g * GROUP;
            float amax = 0.f;
            for (int i = 0; i < GROUP; i++) amax = fmaxf(amax, fabsf(xs[i]));
            float scale = amax > 0.f ? amax / 127.f : 1.f;
            float inv = 1.f / scale;
            int sum = 0;
            int8_t *q = a->xq + (size_t)r * k + (size_t)g * GROUP;
            for (int i = 0; i < GROUP; i++) {
                int v = (int)lrintf(xs[i] * inv);
                v = v > 127 ? 127 : (v < -127 ? -127 : v);
                q[i] = (int8_t)v;
                sum += v;
            }
            a->sx[(size_t)r * groups + g] = scale;
            a->xsum[(size_t)r * groups + g] = (float)sum;
        }
    }
    return 0;
}

int int4_matmul(const float *x, int m, int k, const uint8_t *w, const float *s, const float *z,
                int n, float *y, int threads) {
    if (k % GROUP) return 1;
    int groups = k / GROUP;
    Quantized a;
    if (quantize_rows(x, m, k, &a)) return 2;
    const __m512i low = _mm512_set1_epi8(0x0F);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int row = 0; row < n; row++) {
        const uint8_t *wr = w + (size_t)row * (k / 2);
        const float *sr = s + (size_t)row * groups;
        const float *zr = z + (size_t)row * groups;
        for (int r = 0; r < m; r++) {
            const int8_t *xr = a.xq + (size_t)r * k;
            const float *sxr = a.sx + (size_t)r * groups;
            const float *xsr = a.xsum + (size_t)r * groups;
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
    release(&a);
    return 0;
}

int int8_matmul(const float *x, int m, int k, const int8_t *w, const float *s, int n, float *y,
                int threads) {
    if (k % GROUP) return 1;
    int groups = k / GROUP;
    Quantized a;
    if (quantize_rows(x, m, k, &a)) return 2;
    float *offset = malloc(sizeof(float) * (size_t)m); /* 128 * sum_g sx[g] * xsum[g] per row */
    if (!offset) {
        release(&a);
        return 2;
    }
    for (int r = 0; r < m; r++) {
        float o = 0.f;
        for (int g = 0; g < groups; g++)
            o += a.sx[(size_t)r * groups + g] * a.xsum[(size_t)r * groups + g];
        offset[r] = 128.f * o;
    }
    const __m512i top = _mm512_set1_epi8((char)0x80);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int row = 0; row < n; row++) {
        const int8_t *wr = w + (size_t)row * k;
        for (int r = 0; r < m; r++) {
            const int8_t *xr = a.xq + (size_t)r * k;
            const float *sxr = a.sx + (size_t)r * groups;
            __m512 acc = _mm512_setzero_ps();
            for (int g = 0; g < groups; g++) {
                const int8_t *wg = wr + (size_t)g * GROUP;
                const int8_t *xg = xr + (size_t)g * GROUP;
                __m512i ua = _mm512_xor_si512(_mm512_loadu_si512((const void *)wg), top);
                __m512i ub = _mm512_xor_si512(_mm512_loadu_si512((const void *)(wg + 64)), top);
                __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ua,
                                                _mm512_loadu_si512((const void *)xg));
                d = _mm512_dpbusd_epi32(d, ub, _mm512_loadu_si512((const void *)(xg + 64)));
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(sxr[g]), acc);
            }
            y[(size_t)r * n + row] = s[row] * (_mm512_reduce_add_ps(acc) - offset[r]);
        }
    }
    free(offset);
    release(&a);
    return 0;
}

int bf16_matmul(const float *x, int m, int k, const uint16_t *w, int n, float *y, int threads) {
    if (k % GROUP) return 1;
    __m256bh *xb = aligned_alloc(64, sizeof(__m256bh) * ((size_t)m * k / 16)); /* x in bf16 */
    if (!xb) return 2;
    for (size_t i = 0; i < (size_t)m * k / 16; i++) xb[i] = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + 16 * i));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int row = 0; row < n; row++) {
        const uint16_t *wr = w + (size_t)row * k;
        for (int r = 0; r < m; r++) {
            const uint16_t *xr = (const uint16_t *)xb + (size_t)r * k;
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                             _mm512_setzero_ps()};
            for (int i = 0; i < k; i += GROUP) { /* 4 x 32 columns, 4 independent sums */
                for (int j = 0; j < 4; j++) {
                    __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(wr + i + 32 * j));
                    __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xr + i + 32 * j));
                    acc[j] = _mm512_dpbf16_ps(acc[j], wv, xv);
                }
            }
            __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            y[(size_t)r * n + row] = _mm512_reduce_add_ps(sum);
        }
    }
    free(xb);
    return 0;
}
