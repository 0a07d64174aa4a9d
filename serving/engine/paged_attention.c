/* Paged attention on the CPU: queries attend to K/V read in place through block tables.
 *
 * Why C: in torch, attention over a paged cache first gathers every sequence's blocks into a
 * contiguous tensor (index_select) and then multiplies. For a decode step of 64 sequences of
 * SmolLM2-135M that copy moved ~0.5 GB each way and, with the batched matmuls of 3-row
 * queries, took about half of the step (measured with torch.profiler). Here each K/V block is
 * read once, straight from the pool, for every query row of its KV head (GQA: the G query heads
 * of a KV group share the read), with an online softmax in fp32 (flash-decoding style).
 *
 * Layout (as serving/engine/kv_cache.py allocates it):
 *   q, out:   (n_rows, H, D), rows of all sequences back to back
 *   k, v:     (num_blocks, K, bs, D), per layer
 *   tables:   int64, each sequence's block ids, back to back
 *   seqs:     int64 (n_seqs, 4): first query row, query rows, position of the first query,
 *             offset of its block table in `tables`
 * Query row t of a sequence sees keys 0 .. start + t (causal). A decode is one row.
 *
 * Built at first use by serving/engine/kernels.py with the machine's C compiler
 * (-O3 -march=native -fopenmp, no -ffast-math: linked into a shared object it would set
 * flush-to-zero for the whole process on load); the same code serves bf16 and fp32 caches.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define NEG_BIG (-1e30f) /* a finite "minus infinity": exp(NEG_BIG - x) is 0, never NaN */

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
static inline unsigned csr_flush_denormals(void) {
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040u); /* FTZ | DAZ */
    return csr;
}
static inline void csr_restore(unsigned csr) { _mm_setcsr(csr); }
#else
static inline unsigned csr_flush_denormals(void) { return 0; }
static inline void csr_restore(unsigned csr) { (void)csr; }
#endif

/* One (sequence, KV head): its n_q * G query rows against the sequence's blocks.
 * kf/vf: (bs, D) scratch; qf/acc: (R, D); m/l: (R); s: (bs). */
#define ATTEND_BODY(T, LOAD, STORE)                                                           \
    const int64_t q_row = seq[0], n_q = seq[1], start = seq[2];                             \
    const int64_t* table = tables + seq[3];                                                   \
    const int G = H / K, R = (int)n_q * G;                                                    \
    for (int r = 0; r < R; r++) {                                                             \
        const int t = r / G, g = r % G;                                                       \
        const T* src = q + ((q_row + t) * H + kv * G + g) * D;                               \
        for (int d = 0; d < D; d++) qf[r * D + d] = LOAD(src[d]) * scale;                     \
        for (int d = 0; d < D; d++) acc[r * D + d] = 0.f;                                     \
        m[r] = NEG_BIG;                                                                       \
        l[r] = 0.f;                                                                           \
    }                                                                                         \
    const int64_t ctx = start + n_q;                                                          \
    for (int64_t b = 0; b * bs < ctx; b++) {                                                  \
        const int64_t base = b * bs;                                                          \
        const int n_keys = (int)(ctx - base < bs ? ctx - base : bs);                          \
        const T* kp = k + ((table[b] * K + kv) * bs) * D;                                    \
        const T* vp = v + ((table[b] * K + kv) * bs) * D;                                    \
        for (int i = 0; i < n_keys * D; i++) kf[i] = LOAD(kp[i]);                             \
        for (int i = 0; i < n_keys * D; i++) vf[i] = LOAD(vp[i]);                             \
        for (int r = 0; r < R; r++) {                                                         \
            const int64_t limit = start + r / G; /* last key position this row sees */        \
            if (limit < base) continue;                                                       \
            const int n = (int)(limit - base + 1 < n_keys ? limit - base + 1 : n_keys);       \
            const float* qr = qf + r * D;                                                     \
            float bmax = NEG_BIG;                                                             \
            for (int j = 0; j < n; j++) {                                                     \
                const float* kj = kf + j * D;                                                 \
                float dot = 0.f;                                                              \
                for (int d = 0; d < D; d++) dot += qr[d] * kj[d];                             \
                s[j] = dot;                                                                   \
                bmax = dot > bmax ? dot : bmax;                                               \
            }                                                                                 \
            const float m_new = bmax > m[r] ? bmax : m[r];                                    \
            const float corr = expf(m[r] - m_new);                                            \
            float* ar = acc + r * D;                                                          \
            float sum = 0.f;                                                                  \
            for (int d = 0; d < D; d++) ar[d] *= corr;                                        \
            for (int j = 0; j < n; j++) {                                                     \
                const float p = expf(s[j] - m_new);                                           \
                const float* vj = vf + j * D;                                                 \
                sum += p;                                                                     \
                for (int d = 0; d < D; d++) ar[d] += p * vj[d];                               \
            }                                                                                 \
            l[r] = l[r] * corr + sum;                                                         \
            m[r] = m_new;                                                                     \
        }                                                                                     \
    }                                                                                         \
    for (int r = 0; r < R; r++) {                                                             \
        const int t = r / G, g = r % G;                                                       \
        T* dst = out + ((q_row + t) * H + kv * G + g) * D;                                   \
        const float inv = 1.f / l[r];                                                         \
        for (int d = 0; d < D; d++) dst[d] = STORE(acc[r * D + d] * inv);                     \
    }


#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_BF16_FAST 1
#define FAST_BS 16 /* one zmm of fp32 scores per block */
#define FAST_D 64  /* two zmm of bf16 per key */
#define PREFETCH_AHEAD 2 /* blocks; 1, 4 and 8 measured slower in the engine's decode */

/* The dim held by lane i of the p.v accumulator (4 vectors of 16): unpack{lo,hi}_epi16 work per
 * 128-bit lane, so vector c, lane 4q + e holds dim 32 * (c / 2) + 8q + 4 * (c % 2) + e. */
#define D_ORDER(i) (32 * ((i) / 32) + 4 * (((i) / 16) % 2) + 8 * (((i) % 16) / 4) + (i) % 4)

/* exp of 16 lanes: 2^n * e^r with |r| <= ln2/2, degree-6 polynomial (rel. error ~2e-7). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* The 16 x 16 transpose of 32-bit lanes: r[i] lane j <- r[j] lane i. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
            t[8 * i + j + 4] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
}

/* One query row against one block, given its 16 raw q.k products: the online-softmax update of
 * (m, l) and acc += p . v, with p rounded to bf16 as torch's bf16 matmul path does. */
static inline void softmax_pv_row(__m512 dots, int n, float scale, const __m512i* vpair, float* acc, float* m,
                                  float* l) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __mmask16 valid = _mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32(n));
    const __m512 sc = _mm512_mask_mov_ps(_mm512_set1_ps(NEG_BIG), valid, _mm512_mul_ps(dots, _mm512_set1_ps(scale)));
    const float bmax = _mm512_reduce_max_ps(sc);
    const float m_new = bmax > *m ? bmax : *m;
    const float corr = m_new == *m ? 1.f : expf(*m - m_new); /* the max often holds: skip the call */
    const __m512 p = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(sc, _mm512_set1_ps(m_new))));
    *l = *l * corr + _mm512_reduce_add_ps(p);
    *m = m_new;
    uint32_t pairs[8]; /* p as bf16, two keys per 32 bits */
    _mm256_storeu_si256((__m256i*)pairs, (__m256i)_mm512_cvtneps_pbh(p));
    const __m512 c = _mm512_set1_ps(corr);
    __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(acc), c), a1 = _mm512_mul_ps(_mm512_loadu_ps(acc + 16), c);
    __m512 a2 = _mm512_mul_ps(_mm512_loadu_ps(acc + 32), c), a3 = _mm512_mul_ps(_mm512_loadu_ps(acc + 48), c);
    for (int i = 0; 2 * i < n; i++) { /* a key past n has p = 0 */
        const __m512bh pp = (__m512bh)_mm512_set1_epi32((int)pairs[i]);
        a0 = _mm512_dpbf16_ps(a0, pp, (__m512bh)vpair[4 * i + 0]);
        a1 = _mm512_dpbf16_ps(a1, pp, (__m512bh)vpair[4 * i + 1]);
        a2 = _mm512_dpbf16_ps(a2, pp, (__m512bh)vpair[4 * i + 2]);
        a3 = _mm512_dpbf16_ps(a3, pp, (__m512bh)vpair[4 * i + 3]);
    }
    _mm512_storeu_ps(acc, a0);
    _mm512_storeu_ps(acc + 16, a1);
    _mm512_storeu_ps(acc + 32, a2);
    _mm512_storeu_ps(acc + 48, a3);
}

#define TILE_ROWS 4 /* query rows sharing each transposed K vector */

/* The bf16 path for head_dim 64 and blocks of 16 (SmolLM2's and the engine's defaults): q.k
 * with vdpbf16ps straight from the cache (no conversion, fp32 accumulation), the 16 scores of a
 * block as one vector, a vectorized exp, p.v with vdpbf16ps too into an fp32 accumulator.
 * q.k one way for every row, decode or prefill: the block's K is transposed once into 32
 * vectors of "pair i of all 16 keys", and tiles of rows multiply them by broadcast q pairs, no
 * reduction. (Decodes used to finish each row's 16 products by a lane reduction instead, which
 * rounds differently: a row's output then depended on how many rows its step held.) */
static void attend_bf16_fast(const uint16_t* q, uint16_t* out, const uint16_t* k, const uint16_t* v,
                             const int64_t* seq, const int64_t* tables, int H, int K, float scale, int kv,
                             float* acc, float* m, float* l) {
    enum { D = FAST_D, bs = FAST_BS };
    const int64_t q_row = seq[0], n_q = seq[1], start = seq[2];
    const int64_t* table = tables + seq[3];
    const int G = H / K, R = (int)n_q * G;
    for (int r = 0; r < R; r++) {
        for (int d = 0; d < D; d++) acc[r * D + d] = 0.f;
        m[r] = NEG_BIG;
        l[r] = 0.f;
    }
    const int64_t ctx = start + n_q;
    for (int64_t b = 0; b * bs < ctx; b++) {
        const int64_t base = b * bs;
        const int n_keys = (int)(ctx - base < bs ? ctx - base : bs);
        const uint16_t* kp = k + ((table[b] * K + kv) * bs) * D;
        const uint16_t* vp = v + ((table[b] * K + kv) * bs) * D;
        if ((b + PREFETCH_AHEAD) * bs < ctx) { /* blocks are scattered: the hardware prefetcher cannot guess the next */
            const int64_t ahead = (table[b + PREFETCH_AHEAD] * K + kv) * bs * D;
            for (int i = 0; i < bs * D; i += 32) {
                _mm_prefetch((const char*)(k + ahead + i), _MM_HINT_T0);
                _mm_prefetch((const char*)(v + ahead + i), _MM_HINT_T0);
            }
        }
        /* V as bf16 pairs of consecutive keys per dim, for vdpbf16ps: vector 4i + c holds keys
         * 2i and 2i+1 interleaved for the dims of D_ORDER's group c. */
        __m512i vpair[bs / 2 * 4];
        for (int i = 0; i < bs / 2; i++) {
            const int j0 = 2 * i < n_keys ? 2 * i : 0, j1 = 2 * i + 1 < n_keys ? 2 * i + 1 : j0; /* no stale slots */
            const __m512i a_lo = _mm512_loadu_si512(vp + j0 * D), a_hi = _mm512_loadu_si512(vp + j0 * D + 32);
            const __m512i b_lo = _mm512_loadu_si512(vp + j1 * D), b_hi = _mm512_loadu_si512(vp + j1 * D + 32);
            vpair[4 * i + 0] = _mm512_unpacklo_epi16(a_lo, b_lo);
            vpair[4 * i + 1] = _mm512_unpackhi_epi16(a_lo, b_lo);
            vpair[4 * i + 2] = _mm512_unpacklo_epi16(a_hi, b_hi);
            vpair[4 * i + 3] = _mm512_unpackhi_epi16(a_hi, b_hi);
        }
        /* Rows are time-major (r = t * G + g), so the rows that see this block are a suffix. */
        const int first = base > start ? (int)(base - start) * G : 0;
        const int limit_n = (int)(n_keys < bs ? n_keys : bs);
        /* slots past n_keys hold stale keys: their products are masked, never NaN-multiplied */
        /* Every row takes the same q.k summation (transposed K, even/odd chains), however many
         * rows the step has: a row's answer must not depend on its batch-mates or on how much
         * of its prompt came from the prefix cache. A second, per-row reduction for few rows
         * rounded differently (up to 1e-3 in the output, labels flipped in the engine). */
        if (R > first) {
            __m512i kt[2 * bs]; /* kt[i] lane j: the i-th bf16 pair of key j */
            for (int j = 0; j < bs; j++) {
                kt[j] = _mm512_loadu_si512(kp + j * D);
                kt[bs + j] = _mm512_loadu_si512(kp + j * D + 32);
            }
            transpose16(kt);
            transpose16(kt + bs);
            for (int r0 = first; r0 < R; r0 += TILE_ROWS) {
                const int nr = R - r0 < TILE_ROWS ? R - r0 : TILE_ROWS;
                __m512 even[TILE_ROWS], odd[TILE_ROWS]; /* two chains per row: vdpbf16ps latency */
                const uint32_t* qr[TILE_ROWS];
                for (int t = 0; t < TILE_ROWS; t++) {
                    const int r = r0 + (t < nr ? t : 0);
                    qr[t] = (const uint32_t*)(q + ((q_row + r / G) * H + kv * G + r % G) * D);
                    even[t] = odd[t] = _mm512_setzero_ps();
                }
                for (int i = 0; i < 2 * bs; i += 2)
                    for (int t = 0; t < TILE_ROWS; t++) {
                        even[t] = _mm512_dpbf16_ps(even[t], (__m512bh)_mm512_set1_epi32((int)qr[t][i]), (__m512bh)kt[i]);
                        odd[t] = _mm512_dpbf16_ps(odd[t], (__m512bh)_mm512_set1_epi32((int)qr[t][i + 1]), (__m512bh)kt[i + 1]);
                    }
                for (int t = 0; t < nr; t++) {
                    const int r = r0 + t;
                    const int64_t seen = start + r / G - base + 1; /* keys of this block the row sees */
                    softmax_pv_row(_mm512_add_ps(even[t], odd[t]), (int)(seen < limit_n ? seen : limit_n), scale, vpair,
                                   acc + r * D, m + r, l + r);
                }
            }
        }
    }
    for (int r = 0; r < R; r++) {
        uint16_t* dst = out + ((q_row + r / G) * H + kv * G + r % G) * D;
        const float inv = 1.f / l[r];
        for (int i = 0; i < D; i++) dst[D_ORDER(i)] = f32_to_bf16(acc[r * D + i] * inv);
    }
}
#endif

#define ID(x) (x)

#define DEFINE_PAGED_ATTENTION(NAME, T, LOAD, STORE, FAST)                                          \
    int NAME(const T* q, T* out, const T* k, const T* v, const int64_t* tables,                \
             const int64_t* seqs, int64_t n_seqs, int H, int K, int D, int bs, float scale,    \
             int n_threads) {                                                                  \
        int64_t max_rows = 0;                                                                  \
        for (int64_t i = 0; i < n_seqs; i++)                                                   \
            if (seqs[i * 4 + 1] > max_rows) max_rows = seqs[i * 4 + 1];                        \
        const int64_t R_max = max_rows * (H / K);                                              \
        const int64_t per_thread = 2 * bs * D + 2 * R_max * D + 2 * R_max + bs;                \
        if (n_threads < 1) n_threads = 1;                                                      \
        float* scratch = malloc(sizeof(float) * per_thread * n_threads);                       \
        if (!scratch) return 1;                                                                \
        _Pragma("omp parallel num_threads(n_threads)") {                                       \
            /* Tiny attention weights are denormal, and x86 takes ~100 cycles per denormal      \
             * operand: flush them, on this thread and for this call only. */                  \
            const unsigned csr = csr_flush_denormals();                                        \
            float* kf = scratch + per_thread * omp_get_thread_num();                           \
            float *vf = kf + bs * D, *qf = vf + bs * D, *acc = qf + R_max * D;                 \
            float *m = acc + R_max * D, *l = m + R_max, *s = l + R_max;                        \
            _Pragma("omp for schedule(dynamic)")                                               \
            for (int64_t item = 0; item < n_seqs * K; item++) {                                \
                const int64_t* seq = seqs + (item / K) * 4;                                    \
                const int kv = (int)(item % K);                                                \
                if (FAST()) continue; /* the vectorized path took this item */                 \
                ATTEND_BODY(T, LOAD, STORE)                                                    \
            }                                                                                  \
            csr_restore(csr);                                                                  \
        }                                                                                      \
        free(scratch);                                                                         \
        return 0;                                                                              \
    }

#ifdef HAVE_BF16_FAST
#define BF16_FAST()                                                                           \
    (D == FAST_D && bs == FAST_BS && (attend_bf16_fast(q, out, k, v, seq, tables, H, K, scale, kv, acc, m, l), 1))
#else
#define BF16_FAST() 0
#endif
#define NO_FAST() 0

DEFINE_PAGED_ATTENTION(paged_attention_bf16, uint16_t, bf16_to_f32, f32_to_bf16, BF16_FAST)
DEFINE_PAGED_ATTENTION(paged_attention_f32, float, ID, ID, NO_FAST)
