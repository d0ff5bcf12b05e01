/* y[m, n] = sum_k x[m, k] * w[n, k] for batch-1 decoding on AVX-512 CPUs: int8 weights with fp32
 * activations (AVX-512F), int4 and int8 weights with int8 activations (VNNI), and bf16 weights
 * (AVX512_BF16). (A weight-only int4 kernel ran slower than torchao's: bench/RESULTS.md.)
 * Each weight row is read once from memory and reused from L1 for every row of x, and rows are
 * split over OpenMP threads: a matrix-vector product streams the weights at close to the memory
 * bandwidth, which sets the speed of decoding.
 *
 * int4: q[n, k] in 0..15 with a scale s and a zero z per row and group of 128 columns,
 * w = (q - z) * s. Packed [N, K / 2] bytes: in each group, byte j holds column j (low nibble)
 * and column 64 + j (high nibble), so one 64-byte load unpacks into two 64-column halves.
 * int8: q[n, k] in -127..127 with one scale s per row, w = q * s.
 * Weight-only int8 (int8_matmul): x stays fp32, y = sum_k x * q in fp32 (no scale).
 * int8 activations (w4a8_matmul, w8a8_matmul): each row of x is quantized to int8 per group of
 * 128 (scale sx = max |x| / 127, round half to even), so a group's dot product is vpdpbusd
 * (u8 x s8 -> s32); the int8 weight's top bit is flipped (u = q + 128 in 1..255) to be the
 * unsigned operand:
 *   w4a8: y[m, n] = sum_g s[n, g] * sx[m, g]
 *                   * (sum_k q[n, k] * xq[m, k] - z[n, g] * sum_k xq[m, k])
 *   w8a8: y[m, n] = s[n] * sum_g sx[m, g] * (sum_k u[n, k] * xq[m, k] - 128 * sum_k xq[m, k])
 * bf16: x rounded to bf16 (round to nearest even), products summed in fp32 by vdpbf16ps.
 * Every matmul returns 0, or 1 for a K that is not a multiple of 128, 2 when out of memory.
 * The w4a8 kernel takes the scales 16 groups at a time and sums the zero corrections as one
 * vector per row, which keeps its inner loop at about 10 instructions per 64 bytes.
 *
 * Also: a decode step's RMS norm, RoPE and grouped-query attention over the KV cache.
 *
 * Each function is compiled for the instructions it uses (a target attribute, no global -m
 * flags), and the file is built once per instruction set into its own library (-DKERNELS_F:
 * AVX-512F; -DKERNELS_VNNI: + BW and VNNI; -DKERNELS_BF16: + BW and BF16), so that a CPU or
 * a gcc without one of them keeps the kernels of the others.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define GROUP 128

#ifdef KERNELS_F /* ---- AVX-512F: weight-only int8, norms, RoPE, attention ---- */
#define TARGET __attribute__((target("avx512f")))
TARGET
int int8_matmul(const float *x, int m, int k, const int8_t *w, int n, float *y, int threads) {
    if (k % GROUP) return 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int row = 0; row < n; row++) {
        const int8_t *wr = w + (size_t)row * k;
        for (int r = 0; r < m; r++) {
            const float *xr = x + (size_t)r * k;
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                             _mm512_setzero_ps()};
            for (int i = 0; i < k; i += 64) /* 4 x 16 columns, 4 independent sums */
                for (int j = 0; j < 4; j++) {
                    __m128i b = _mm_loadu_si128((const __m128i *)(wr + i + 16 * j));
                    __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
                    acc[j] = _mm512_fmadd_ps(q, _mm512_loadu_ps(xr + i + 16 * j), acc[j]);
                }
            __m512 sum =
                _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            y[(size_t)r * n + row] = _mm512_reduce_add_ps(sum);
        }
    }
    return 0;
}

/* The small per-token work of a decode step, one call each instead of 5-15 PyTorch ops:
 * rms_norm: y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, rows of n (a multiple of 16).
 * rope: RoPE of x [b, s, heads, d] (batch and position strides xb, xs; heads contiguous) at
 * positions pos [b, s] from torchtune's cache [positions, d / 2, 2] (cos, sin), pairs (2i, 2i + 1)
 * rotated as torchtune does, into y [b, s, heads, d]. Both return 1 for a bad size. */
TARGET
int rms_norm(const float *x, int rows, int n, const float *w, float eps, float *y) {
    if (n % 16) return 1;
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * n;
        __m512 sq = _mm512_setzero_ps();
        for (int i = 0; i < n; i += 16) {
            __m512 v = _mm512_loadu_ps(xr + i);
            sq = _mm512_fmadd_ps(v, v, sq);
        }
        __m512 inv = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(sq) / n + eps));
        for (int i = 0; i < n; i += 16)
            _mm512_storeu_ps(y + (size_t)r * n + i,
                             _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(xr + i), inv),
                                           _mm512_loadu_ps(w + i)));
    }
    return 0;
}

TARGET
int rope(const float *x, int b, int s, int heads, int d, long xb, long xs, const float *cache,
         int positions, const int64_t *pos, float *y) {
    if (d % 2) return 1;
    for (int bi = 0; bi < b; bi++)
        for (int si = 0; si < s; si++) {
            int64_t p = pos[(size_t)bi * s + si];
            if (p < 0 || p >= positions) return 1;
            const float *c = cache + (size_t)p * d; /* [d / 2, 2] */
            const float *xr = x + bi * xb + si * xs;
            float *yr = y + ((size_t)bi * s + si) * heads * d;
            for (int h = 0; h < heads; h++)
                for (int i = 0; i < d / 2; i++) {
                    float x0 = xr[h * d + 2 * i], x1 = xr[h * d + 2 * i + 1];
                    float cos = c[2 * i], sin = c[2 * i + 1];
                    yr[h * d + 2 * i] = x0 * cos - x1 * sin;
                    yr[h * d + 2 * i + 1] = x1 * cos + x0 * sin;
                }
        }
    return 0;
}

/* e^x, 16 at a time, to about 1 ulp for x in [-87, 88] (Cody-Waite reduction, degree-6
 * polynomial); smaller x give 0 or a denormal. */
TARGET
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x); /* x - n ln 2, in two parts */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 e = _mm512_set1_ps(1.f / 720.f);
    const float c[] = {1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f};
    for (int i = 0; i < 6; i++) e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(e, n); /* e * 2^n */
}

/* Attention of one new query per sequence over its KV cache (a decode step), grouped-query:
 * q [b, h, d], k and v [b, hkv, len, d] (the cache), valid [b, len] (nonzero: attended),
 * out [b, h, d]. Query head j reads key/value head j / (h / hkv), as torchtune's expansion of
 * the key/value heads does, but each cached key and value row is read once for all the query
 * heads of its group instead of being copied per query head, and the positions after the last
 * valid one are not read. Three passes per group: the scores, their softmax (16 at a time),
 * the sum of the value rows. A row with no valid position gets zeros. Returns 1 for d not a
 * multiple of 16 or above 256, or more than 16 query heads per key/value head; 2 when out of
 * memory. */
#define MAX_PER 16
TARGET
int decode_attention(const float *q, int b, int h, int hkv, int d, const float *k, const float *v,
                     int len, const uint8_t *valid, float scale, float *out, int threads) {
    if (d % 16 || d > 256 || h % hkv || h / hkv > MAX_PER) return 1;
    int per = h / hkv, w = d / 16, failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int task = 0; task < b * hkv; task++) {
        int bi = task / hkv;
        const uint8_t *ok = valid + (size_t)bi * len;
        const float *kg = k + (size_t)task * len * d, *vg = v + (size_t)task * len * d;
        const float *qg = q + (size_t)task * per * d; /* the group's query heads, in a row */
        float *og = out + (size_t)task * per * d;
        int end = len;
        while (end > 0 && !ok[end - 1]) end--;
        int padded = (end + 16) & ~15;
        float *scores = aligned_alloc(64, sizeof(float) * per * padded); /* [per, padded] */
        if (!scores) {
            failed = 1;
            continue;
        }
        for (int t = 0; t < padded; t++) {
            const float *kt = kg + (size_t)t * d;
            for (int j = 0; j < per; j++) {
                float s = -INFINITY;
                if (t < end && ok[t]) {
                    __m512 dot = _mm512_setzero_ps();
                    for (int i = 0; i < w; i++)
                        dot = _mm512_fmadd_ps(_mm512_loadu_ps(qg + j * d + 16 * i),
                                              _mm512_loadu_ps(kt + 16 * i), dot);
                    s = _mm512_reduce_add_ps(dot) * scale;
                }
                scores[(size_t)j * padded + t] = s;
            }
        }
        float inv[MAX_PER];
        for (int j = 0; j < per; j++) { /* softmax numerators, in place, and 1 / their sum */
            float *sj = scores + (size_t)j * padded;
            __m512 top = _mm512_set1_ps(-INFINITY);
            for (int t = 0; t < padded; t += 16) top = _mm512_max_ps(top, _mm512_load_ps(sj + t));
            __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(top)), sum = _mm512_setzero_ps();
            for (int t = 0; t < padded; t += 16) {
                __m512 s = _mm512_load_ps(sj + t);
                __mmask16 live = _mm512_cmp_ps_mask(s, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
                __m512 e = _mm512_maskz_mov_ps(live, exp_ps(_mm512_sub_ps(s, best)));
                _mm512_store_ps(sj + t, e);
                sum = _mm512_add_ps(sum, e);
            }
            float total = _mm512_reduce_add_ps(sum);
            inv[j] = total > 0.f ? 1.f / total : 0.f;
        }
        __m512 acc[MAX_PER][16];
        for (int j = 0; j < per; j++)
            for (int i = 0; i < w; i++) acc[j][i] = _mm512_setzero_ps();
        for (int t = 0; t < end; t++) {
            if (!ok[t]) continue;
            const float *vt = vg + (size_t)t * d;
            for (int i = 0; i < w; i++) {
                __m512 vi = _mm512_loadu_ps(vt + 16 * i);
                for (int j = 0; j < per; j++)
                    acc[j][i] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(size_t)j * padded + t]), vi,
                                                acc[j][i]);
            }
        }
        for (int j = 0; j < per; j++)
            for (int i = 0; i < w; i++)
                _mm512_storeu_ps(og + j * d + 16 * i, _mm512_mul_ps(acc[j][i], _mm512_set1_ps(inv[j])));
        free(scores);
    }
    return failed ? 2 : 0;
}
#undef TARGET
#endif

#ifdef KERNELS_VNNI /* ---- AVX-512 BW + VNNI: int4 and int8 weights, int8 activations ---- */
#define TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))
typedef struct {
    int8_t *xq;  /* [m, k] */
    float *sx;   /* [m, k / GROUP] scales */
    float *xsum; /* [m, k / GROUP] sums of xq */
} Quantized;

TARGET
static void release(Quantized *a) {
    free(a->xq); free(a->sx); free(a->xsum);
}

TARGET
static int quantize_rows(const float *x, int m, int k, Quantized *a) {
    int groups = k / GROUP;
    a->xq = aligned_alloc(64, (size_t)m * k + 64);
    a->sx = malloc(sizeof(float) * (size_t)m * groups);
    a->xsum = malloc(sizeof(float) * (size_t)m * groups);
    if (!a->xq || !a->sx || !a->xsum) {
        release(a);
        return 2;
    }
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (size_t rg = 0; rg < (size_t)m * groups; rg++) { /* rows are contiguous groups */
        const float *xs = x + rg * GROUP;
        __m512 v[GROUP / 16];
        __m512 amax = _mm512_setzero_ps();
        for (int i = 0; i < GROUP / 16; i++) {
            v[i] = _mm512_loadu_ps(xs + 16 * i);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
        }
        float top = _mm512_reduce_max_ps(amax);
        float scale = top > 0.f ? top / 127.f : 1.f;
        __m512 inv = _mm512_set1_ps(1.f / scale);
        __m512i sum = _mm512_setzero_si512();
        for (int i = 0; i < GROUP / 16; i++) { /* round to nearest even, as lrintf */
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv));
            q = _mm512_max_epi32(_mm512_min_epi32(q, hi), lo);
            sum = _mm512_add_epi32(sum, q);
            _mm_storeu_si128((__m128i *)(a->xq + rg * GROUP + 16 * i), _mm512_cvtepi32_epi8(q));
        }
        a->sx[rg] = scale;
        a->xsum[rg] = (float)_mm512_reduce_add_epi32(sum);
    }
    return 0;
}

TARGET
int w4a8_matmul(const float *x, int m, int k, const uint8_t *w, const float *s, const float *z,
                int n, float *y, int threads) {
    if (k % GROUP) return 1;
    int groups = k / GROUP;
    Quantized a;
    if (quantize_rows(x, m, k, &a)) return 2;
    for (size_t i = 0; i < (size_t)m * groups; i++) a.xsum[i] *= a.sx[i]; /* sx * sum(xq) */
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
            __m512 acc = _mm512_setzero_ps(), correction = _mm512_setzero_ps();
            for (int g0 = 0; g0 < groups; g0 += 16) { /* 16 groups' scales at a time */
                __mmask16 live = groups - g0 >= 16 ? 0xFFFF : (__mmask16)((1u << (groups - g0)) - 1);
                __m512 sw = _mm512_maskz_loadu_ps(live, sr + g0);
                __m512 scale = _mm512_mul_ps(sw, _mm512_maskz_loadu_ps(live, sxr + g0));
                correction = _mm512_fmadd_ps(_mm512_mul_ps(sw, _mm512_maskz_loadu_ps(live, zr + g0)),
                                             _mm512_maskz_loadu_ps(live, xsr + g0), correction);
                float scales[16] __attribute__((aligned(64)));
                _mm512_store_ps(scales, scale);
                int stop = groups - g0 < 16 ? groups - g0 : 16;
                for (int i = 0; i < stop; i++) {
                    int g = g0 + i;
                    __m512i b = _mm512_loadu_si512((const void *)(wr + (size_t)g * 64));
                    __m512i lo = _mm512_and_si512(b, low);
                    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
                    __m512i d = _mm512_dpbusd_epi32(
                        _mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)(xr + (size_t)g * GROUP)));
                    d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512((const void *)(xr + (size_t)g * GROUP + 64)));
                    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(scales[i]), acc);
                }
            }
            y[(size_t)r * n + row] = _mm512_reduce_add_ps(acc) - _mm512_reduce_add_ps(correction);
        }
    }
    release(&a);
    return 0;
}

TARGET
int w8a8_matmul(const float *x, int m, int k, const int8_t *w, const float *s, int n, float *y,
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
#undef TARGET
#endif

#ifdef KERNELS_BF16 /* ---- AVX-512 BW + BF16: bf16 weights ---- */
#define TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))
TARGET
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
            __m512 sum =
                _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            y[(size_t)r * n + row] = _mm512_reduce_add_ps(sum);
        }
    }
    free(xb);
    return 0;
}
#undef TARGET
#endif
