/* Paged decode attention for CPUs: one query token per sequence, keys and values read in place from the engine's
 * paged KV pools through each sequence's slot map - no dense copy of a sequence's keys per layer.
 *
 * Why it exists: PyTorch's SDPA needs each sequence's keys as one tensor, so the engine used to gather every
 * sequence's blocks (index_select) into a fresh [B, Hkv, S, d] copy for every layer of every decode step, then
 * read that copy again in SDPA: the KV crossed memory three times.  Here each key and value row comes from memory
 * once (software-prefetched across block jumps, which the hardware prefetcher cannot guess).
 *
 * Layout (what helios_ray/engine/kv_cache.py stores):
 *   q      [B, Hq, d]      float32, contiguous (the caller converts; it is tiny)
 *   q_bf16 [B, Hq, d]      the same query in bf16 when query and pools are bf16 (else NULL): the AVX512-BF16 dots
 *   pools  [N, Hkv, d]     float32 or bfloat16, contiguous; slot s holds one token's keys (values) of all kv heads
 *   slots  [B, S] int64    row b's slot of key position p (p < lens[b]); the query sits at position lens[b] - 1
 *   out    [B, Hq, d]      float32
 * Query head h reads kv head h / (Hq / Hkv) (grouped-query attention as transformers' repeat_kv).
 * window > 0 keeps keys with query_pos - key_pos < window; softcap > 0 applies tanh(s / cap) * cap to the logits.
 * Softmax and accumulation run in float32: the same arithmetic SDPA does on CPU for bf16 inputs.
 *
 * Two code paths: AVX-512 (16 lanes, 4 key dots reduced together, vectorised exp, value sums in registers) where
 * the compiler targets it, and portable C elsewhere.  Built on first use by helios_ray/engine/paged_attention.py
 * (cc -O3 -march=native), called through ctypes.
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

/* Ask for one token's row of one kv head ahead of use: rows jump at every block boundary, a pattern the
 * hardware prefetcher cannot guess. */
static inline void prefetch_row(const void *pool, int bf16, int64_t slot, int64_t Hkv, int64_t kvh, int64_t d) {
    const int64_t esz = bf16 ? 2 : 4;
    const char *r = (const char *)pool + (slot * Hkv + kvh) * d * esz;
    for (int64_t c = 0; c < d * esz; c += 64) _mm_prefetch(r + c, _MM_HINT_T0);
}

/* [sum(a), sum(b), sum(c), sum(d)]: four horizontal sums for ~3 instructions each instead of ~8. */
static inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512 x = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(1, 0, 3, 2)));
    x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm512_castps512_ps128(x);
}

/* q_g . k_row as 16 partial sums (not yet reduced).  bf16 pools with a bf16 query on AVX512-BF16: vdpbf16ps on
 * (q, k) pairs - exact bf16 products summed in float32; q is a bf16 activation in a bf16 model, so nothing is
 * rounded that SDPA keeps.  Otherwise the key row is widened to float32 and multiplied with the float32 query. */
static inline __m512 partial_dot(const float *qg, const uint16_t *qg_bf16, const void *k_pool, int bf16,
                                 int64_t off, int64_t V) {
#if defined(__AVX512BF16__)
    if (qg_bf16) {
        const uint16_t *kr = (const uint16_t *)k_pool + off;
        __m512 a = _mm512_setzero_ps();
        for (int64_t j = 0; j < 16 * V; j += 32)
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qg_bf16 + j), (__m512bh)_mm512_loadu_si512(kr + j));
        return a;
    }
#else
    (void)qg_bf16;
#endif
    __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qg), load16(k_pool, bf16, off));
    for (int64_t j = 1; j < V; j++) a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * j), load16(k_pool, bf16, off + 16 * j), a);
    return a;
}

/* out_g = sum_t p_g[t] * v[t] for the G heads, V (compile-time after inlining) 16-lane accumulators per head held
 * in registers; value rows are re-read per head from L1/L2 (a sequence's rows for one kv head are ~40 KB). */
static inline __attribute__((always_inline)) void weighted_values(const int V, const void *v_pool, int bf16,
                                                                  const int64_t *slots, int64_t n, int64_t Hkv,
                                                                  int64_t kvh, int64_t d, const float *scores,
                                                                  int64_t G, float *out) {
    for (int64_t g = 0; g < G; g++) {
        __m512 acc[16], acc2[16];
#pragma GCC unroll 16
        for (int j = 0; j < V; j++) acc[j] = acc2[j] = _mm512_setzero_ps();
        const float *pg = scores + g * n;
        int64_t t = 0;
        for (; t + 2 <= n; t += 2) {  /* two independent chains hide the FMA latency */
            const __m512 p0 = _mm512_set1_ps(pg[t]), p1 = _mm512_set1_ps(pg[t + 1]);
            const int64_t o0 = (slots[t] * Hkv + kvh) * d, o1 = (slots[t + 1] * Hkv + kvh) * d;
            if (g == 0 && t + 10 <= n)  /* first pass over the values: fetch ahead (later heads hit the cache) */
                for (int u = 0; u < 2; u++) prefetch_row(v_pool, bf16, slots[t + 8 + u], Hkv, kvh, d);
#pragma GCC unroll 16
            for (int j = 0; j < V; j++) {
                acc[j] = _mm512_fmadd_ps(p0, load16(v_pool, bf16, o0 + 16 * j), acc[j]);
                acc2[j] = _mm512_fmadd_ps(p1, load16(v_pool, bf16, o1 + 16 * j), acc2[j]);
            }
        }
        if (t < n) {
            const __m512 p0 = _mm512_set1_ps(pg[t]);
            const int64_t o0 = (slots[t] * Hkv + kvh) * d;
#pragma GCC unroll 16
            for (int j = 0; j < V; j++) acc[j] = _mm512_fmadd_ps(p0, load16(v_pool, bf16, o0 + 16 * j), acc[j]);
        }
#pragma GCC unroll 16
        for (int j = 0; j < V; j++) _mm512_storeu_ps(out + g * d + 16 * j, _mm512_add_ps(acc[j], acc2[j]));
    }
}

/* The same computation as attend_one below, 16 lanes at a time (d % 16 == 0, d <= 256): key dots for four
 * tokens at a time per query head, reduced together; the softmax vectorised; value sums in registers. */
static int attend_one_avx512(const float *q, const uint16_t *q_bf16, const void *k_pool, const void *v_pool,
                             int bf16, const int64_t *slots, int64_t len, int64_t Hq, int64_t Hkv, int64_t d,
                             float scale, int64_t window, float softcap, int64_t b, int64_t kvh, float *out) {
    const int64_t G = Hq / Hkv, V = d / 16;
    const int64_t start = (window > 0 && len > window) ? len - window : 0;
    const int64_t n = len - start;
    float *scores = (float *)aligned_alloc(64, (size_t)(((G * n + 15) / 16) * 16) * sizeof(float));
    if (!scores) return -1;
    const float *qb = q + (b * Hq + kvh * G) * d;
    const uint16_t *qh = (bf16 && q_bf16 && d % 32 == 0) ? q_bf16 + (b * Hq + kvh * G) * d : NULL;
    slots += start;

    int64_t t = 0;
    const __m128 sc4 = _mm_set1_ps(scale);
    for (; t + 4 <= n; t += 4) {
        int64_t off[4];
        for (int u = 0; u < 4; u++) off[u] = (slots[t + u] * Hkv + kvh) * d;
        if (t + 20 <= n)  /* the keys 16 tokens ahead */
            for (int u = 0; u < 4; u++) prefetch_row(k_pool, bf16, slots[t + 16 + u], Hkv, kvh, d);
        for (int64_t g = 0; g < G; g++) {
            const float *qg = qb + g * d;
            const uint16_t *qgh = qh ? qh + g * d : NULL;
            __m128 s = _mm_mul_ps(reduce4(partial_dot(qg, qgh, k_pool, bf16, off[0], V),
                                          partial_dot(qg, qgh, k_pool, bf16, off[1], V),
                                          partial_dot(qg, qgh, k_pool, bf16, off[2], V),
                                          partial_dot(qg, qgh, k_pool, bf16, off[3], V)), sc4);
            _mm_storeu_ps(scores + g * n + t, s);
        }
    }
    for (; t < n; t++) {
        const int64_t off = (slots[t] * Hkv + kvh) * d;
        for (int64_t g = 0; g < G; g++)
            scores[g * n + t] = _mm512_reduce_add_ps(partial_dot(qb + g * d, qh ? qh + g * d : NULL, k_pool, bf16,
                                                                 off, V)) * scale;
    }
    if (softcap > 0.0f)
        for (int64_t i = 0; i < G * n; i++) scores[i] = tanhf(scores[i] / softcap) * softcap;
    for (int64_t g = 0; g < G; g++) softmax_avx512(scores + g * n, n);

    float *ob = out + (b * Hq + kvh * G) * d;
    switch (V) {  /* constant V: the accumulators become registers */
        case 1: weighted_values(1, v_pool, bf16, slots, n, Hkv, kvh, d, scores, G, ob); break;
        case 2: weighted_values(2, v_pool, bf16, slots, n, Hkv, kvh, d, scores, G, ob); break;
        case 4: weighted_values(4, v_pool, bf16, slots, n, Hkv, kvh, d, scores, G, ob); break;
        case 8: weighted_values(8, v_pool, bf16, slots, n, Hkv, kvh, d, scores, G, ob); break;
        default: weighted_values(V, v_pool, bf16, slots, n, Hkv, kvh, d, scores, G, ob); break;
    }
    free(scores);
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
