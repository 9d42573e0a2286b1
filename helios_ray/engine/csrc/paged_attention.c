/* Paged decode attention for CPUs: one query token per sequence, keys and values read in place from the engine's
 * paged KV pools through each sequence's slot map - no dense copy of a sequence's keys per layer.
 *
 * Why it exists: PyTorch's SDPA needs each sequence's keys as one tensor, so the engine used to gather every
 * sequence's blocks (index_select) into a fresh [B, Hkv, S, d] copy for every layer of every decode step, then
 * read that copy again in SDPA: the KV crossed memory three times.  Here each key and value row is read once.
 *
 * Layout (what helios_ray/engine/kv_cache.py stores):
 *   q      [B, Hq, d]      float32, contiguous (the caller converts; it is tiny)
 *   pools  [N, Hkv, d]     float32 or bfloat16, contiguous; slot s holds one token's keys (values) of all kv heads
 *   slots  [B, S] int64    row b's slot of key position p (p < lens[b]); the query sits at position lens[b] - 1
 *   out    [B, Hq, d]      float32
 * Query head h reads kv head h / (Hq / Hkv) (grouped-query attention as transformers' repeat_kv).
 * window > 0 keeps keys with query_pos - key_pos < window; softcap > 0 applies tanh(s / cap) * cap to the logits.
 * Softmax and accumulation run in float32: the same arithmetic SDPA does on CPU for bf16 inputs.
 *
 * Built on first use by helios_ray/engine/paged_attention.py (cc -O3 -march=native), called through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline void load_row(const void *pool, int bf16, int64_t offset, int64_t d, float *dst) {
    if (bf16) {
        const uint16_t *src = (const uint16_t *)pool + offset;
        for (int64_t i = 0; i < d; i++) {
            uint32_t u = (uint32_t)src[i] << 16;
            float f;
            memcpy(&f, &u, sizeof f);
            dst[i] = f;
        }
    } else {
        memcpy(dst, (const float *)pool + offset, (size_t)d * sizeof(float));
    }
}

static inline float dot(const float *a, const float *b, int64_t d) {
    float s = 0.0f;
    for (int64_t i = 0; i < d; i++) s += a[i] * b[i];
    return s;
}

#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 load16(const void *pool, int bf16, int64_t offset) {
    if (bf16) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)pool + offset));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    return _mm512_loadu_ps((const float *)pool + offset);
}

/* exp(x) for x <= 0, 16 lanes: 2^k * p(r) with x = k ln2 + r, |r| <= ln2/2, a degree-6 polynomial (relative error
 * ~2e-7, float32's own rounding) - scalar expf was a third of the kernel's time. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, k);
}

/* In place: s[t] <- softmax(s)[t] over n scores. */
static inline void softmax_avx512(float *s, int64_t n) {
    __m512 vm = _mm512_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(s + t));
    float m = _mm512_reduce_max_ps(vm);
    for (; t < n; t++) m = s[t] > m ? s[t] : m;
    const __m512 mm = _mm512_set1_ps(m);
    __m512 vs = _mm512_setzero_ps();
    for (t = 0; t + 16 <= n; t += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), mm));
        _mm512_storeu_ps(s + t, e);
        vs = _mm512_add_ps(vs, e);
    }
    if (t < n) {
        const __mmask16 tail = (__mmask16)((1u << (n - t)) - 1u);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + t), mm));
        _mm512_mask_storeu_ps(s + t, tail, e);
        vs = _mm512_add_ps(vs, _mm512_maskz_mov_ps(tail, e));
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vs));
    for (t = 0; t + 16 <= n; t += 16) _mm512_storeu_ps(s + t, _mm512_mul_ps(_mm512_loadu_ps(s + t), inv));
    for (; t < n; t++) s[t] *= _mm512_cvtss_f32(inv);
}

/* The same computation as attend_one below, 16 lanes at a time (d % 16 == 0): each key row is converted once
 * and dotted with the G query heads as G independent FMA chains; each value row is scaled into G x d
 * accumulators.  With AVX512-BF16 the key dots of bf16 pools run as vdpbf16ps on (q, k) pairs: exact bf16
 * products summed in float32 - q is a bf16 activation in a bf16 model, so nothing is rounded that SDPA keeps. */
static int attend_one_avx512(const float *q, const uint16_t *q_bf16, const void *k_pool, const void *v_pool,
                             int bf16, const int64_t *slots, int64_t len, int64_t Hq, int64_t Hkv, int64_t d,
                             float scale, int64_t window, float softcap, int64_t b, int64_t kvh, float *out) {
    const int64_t G = Hq / Hkv, V = d / 16;
    const int64_t start = (window > 0 && len > window) ? len - window : 0;
    const int64_t n = len - start;
    float *buf = (float *)aligned_alloc(64, (size_t)(((G * n + 15) / 16) * 16 + G * d) * sizeof(float));
    if (!buf) return -1;
    float *scores = buf, *acc = buf + ((G * n + 15) / 16) * 16;
    const float *qb = q + (b * Hq + kvh * G) * d;
    (void)q_bf16;

    for (int64_t t = 0; t < n; t++) {
        const int64_t off = (slots[start + t] * Hkv + kvh) * d;
#if defined(__AVX512BF16__)
        if (bf16 && q_bf16 && d % 32 == 0) {
            const uint16_t *kr = (const uint16_t *)k_pool + off;
            const uint16_t *qh = q_bf16 + (b * Hq + kvh * G) * d;
            for (int64_t g = 0; g < G; g++) {
                __m512 a = _mm512_setzero_ps();
                for (int64_t j = 0; j < d; j += 32)
                    a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qh + g * d + j),
                                         (__m512bh)_mm512_loadu_si512(kr + j));
                float s = _mm512_reduce_add_ps(a) * scale;
                if (softcap > 0.0f) s = tanhf(s / softcap) * softcap;
                scores[g * n + t] = s;
            }
            continue;
        }
#endif
        __m512 k[16];
        for (int64_t j = 0; j < V; j++) k[j] = load16(k_pool, bf16, off + 16 * j);
        for (int64_t g = 0; g < G; g++) {
            __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qb + g * d), k[0]);
            for (int64_t j = 1; j < V; j++) a = _mm512_fmadd_ps(_mm512_loadu_ps(qb + g * d + 16 * j), k[j], a);
            float s = _mm512_reduce_add_ps(a) * scale;
            if (softcap > 0.0f) s = tanhf(s / softcap) * softcap;
            scores[g * n + t] = s;
        }
    }
    for (int64_t g = 0; g < G; g++) softmax_avx512(scores + g * n, n);
    for (int64_t i = 0; i < G * d; i += 16) _mm512_store_ps(acc + i, _mm512_setzero_ps());
    for (int64_t t = 0; t < n; t++) {
        const int64_t off = (slots[start + t] * Hkv + kvh) * d;
        for (int64_t j = 0; j < V; j++) {
            const __m512 v = load16(v_pool, bf16, off + 16 * j);
            for (int64_t g = 0; g < G; g++) {
                float *ag = acc + g * d + 16 * j;
                _mm512_store_ps(ag, _mm512_fmadd_ps(_mm512_set1_ps(scores[g * n + t]), v, _mm512_load_ps(ag)));
            }
        }
    }
    memcpy(out + (b * Hq + kvh * G) * d, acc, (size_t)(G * d) * sizeof(float));
    free(buf);
    return 0;
}
#endif

/* One (sequence, kv head): the G query heads that share it.  scratch holds G * n scores + G * d accumulators
 * + d floats for the converted row; returns 0, or -1 if it could not allocate. */
static int attend_one(const float *q, const void *k_pool, const void *v_pool, int bf16, const int64_t *slots,
                      int64_t len, int64_t Hq, int64_t Hkv, int64_t d, float scale, int64_t window, float softcap,
                      int64_t b, int64_t kvh, float *out) {
    const int64_t G = Hq / Hkv;
    const int64_t start = (window > 0 && len > window) ? len - window : 0;
    const int64_t n = len - start;
    float *buf = (float *)malloc((size_t)(G * n + G * d + d) * sizeof(float));
    if (!buf) return -1;
    float *scores = buf, *acc = buf + G * n, *row = acc + G * d;
    const float *qb = q + (b * Hq + kvh * G) * d;

    for (int64_t t = 0; t < n; t++) {
        load_row(k_pool, bf16, (slots[start + t] * Hkv + kvh) * d, d, row);
        for (int64_t g = 0; g < G; g++) {
            float s = dot(qb + g * d, row, d) * scale;
            if (softcap > 0.0f) s = tanhf(s / softcap) * softcap;
            scores[g * n + t] = s;
        }
    }
    for (int64_t g = 0; g < G; g++) {
        float *sg = scores + g * n, m = -INFINITY, sum = 0.0f;
        for (int64_t t = 0; t < n; t++) m = sg[t] > m ? sg[t] : m;
        for (int64_t t = 0; t < n; t++) {
            sg[t] = expf(sg[t] - m);
            sum += sg[t];
        }
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < n; t++) sg[t] *= inv;
    }
    memset(acc, 0, (size_t)(G * d) * sizeof(float));
    for (int64_t t = 0; t < n; t++) {
        load_row(v_pool, bf16, (slots[start + t] * Hkv + kvh) * d, d, row);
        for (int64_t g = 0; g < G; g++) {
            const float p = scores[g * n + t];
            float *ag = acc + g * d;
            for (int64_t i = 0; i < d; i++) ag[i] += p * row[i];
        }
    }
    memcpy(out + (b * Hq + kvh * G) * d, acc, (size_t)(G * d) * sizeof(float));
    free(buf);
    return 0;
}

/* Returns 0 on success, -1 if memory for the scores could not be allocated (the caller falls back). */
int helios_paged_decode_attention(const float *q, const uint16_t *q_bf16, const void *k_pool, const void *v_pool, int kv_bf16,
                                  const int64_t *slots, int64_t slots_stride, const int64_t *lens, float *out,
                                  int64_t B, int64_t Hq, int64_t Hkv, int64_t d, float scale, int64_t window,
                                  float softcap, int num_threads) {
    int failed = 0;
    const int64_t tasks = B * Hkv;
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1) reduction(| : failed) if (num_threads > 1)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t b = task / Hkv, kvh = task % Hkv;
#if defined(__AVX512F__)
        if (d % 16 == 0 && d <= 256) {
            failed |= attend_one_avx512(q, q_bf16, k_pool, v_pool, kv_bf16, slots + b * slots_stride, lens[b], Hq,
                                        Hkv, d, scale, window, softcap, b, kvh, out) != 0;
            continue;
        }
#endif
        failed |= attend_one(q, k_pool, v_pool, kv_bf16, slots + b * slots_stride, lens[b], Hq, Hkv, d, scale,
                             window, softcap, b, kvh, out) != 0;
    }
    return failed ? -1 : 0;
}
