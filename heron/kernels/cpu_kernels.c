/* Heron's CPU kernels (x86-64 with AVX2, FMA and F16C), loaded through ctypes by heron/kernels.
 *
 * - Linear layers straight from GGUF blocks (Q4_0, Q4_1, Q8_0): y[M, N] = x[M, K] @ W^T, with W kept
 *   in its 4.5-8.5 bits per weight. A single-stream decode step is bound by how many bytes of
 *   weights it streams from memory, so reading the blocks instead of float32 copies (5 to 7 times
 *   larger) is most of the speed. Each group of 4 weight rows is dequantized once into a small
 *   float32 scratch that stays in L1, then every token of the batch takes its dot products from it.
 *   Dequantization computes exactly what gguf-py's reference does (d * q + m, rounded twice: this
 *   file is built with -ffp-contract=off), so only the summation order differs from a float32 GEMM.
 *   Every output element is summed the same way whatever M is and wherever its row falls in a
 *   tile, so a request gets bit-identical results alone or in any batch.
 * - Decode attention over the paged KV cache: each sequence's keys and values are read in place
 *   through its slot list (no gathered copy), for all query heads of a KV head at once (GQA).
 *
 * Threads come from OpenMP; Python loads this library after torch, so the runtime (and its thread
 * pool) is the one torch already runs on.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 4  /* weight rows dequantized together */
#define KC 1024 /* scratch width (elements along K): 4 rows x 1024 floats = 16 KiB */
#define TB 96   /* tokens per block: 96 x 1024 floats of activations fit in L2 */

enum { QTYPE_Q4_0 = 2, QTYPE_Q4_1 = 3, QTYPE_Q8_0 = 8 }; /* GGML's type codes */

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static int block_bytes(int qtype) {
    switch (qtype) {
    case QTYPE_Q4_0: return 18;
    case QTYPE_Q4_1: return 20;
    case QTYPE_Q8_0: return 34;
    default: return 0;
    }
}

/* Dequantize nb blocks of 32 weights into out[0 .. 32 * nb). */
static void dequant_q4_0(const uint8_t *blk, float *out, int64_t nb) {
    const __m256i low = _mm256_set1_epi32(0xF);
    const __m256 eight = _mm256_set1_ps(8.0f);
    for (int64_t b = 0; b < nb; b++, blk += 18, out += 32) {
        const __m256 d = _mm256_set1_ps(half_to_float(blk));
        const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 2)));
        const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 10)));
        /* gguf-py: (q - 8) * d */
        _mm256_storeu_ps(out + 0, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(a, low)), eight), d));
        _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(c, low)), eight), d));
        _mm256_storeu_ps(out + 16, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), eight), d));
        _mm256_storeu_ps(out + 24, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4)), eight), d));
    }
}

static void dequant_q4_1(const uint8_t *blk, float *out, int64_t nb) {
    const __m256i low = _mm256_set1_epi32(0xF);
    for (int64_t b = 0; b < nb; b++, blk += 20, out += 32) {
        const __m256 d = _mm256_set1_ps(half_to_float(blk));
        const __m256 m = _mm256_set1_ps(half_to_float(blk + 2));
        const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 4)));
        const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 12)));
        /* gguf-py: d * q + m */
        _mm256_storeu_ps(out + 0, _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(a, low))), m));
        _mm256_storeu_ps(out + 8, _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(c, low))), m));
        _mm256_storeu_ps(out + 16, _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4))), m));
        _mm256_storeu_ps(out + 24, _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4))), m));
    }
}

static void dequant_q8_0(const uint8_t *blk, float *out, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, blk += 34, out += 32) {
        const __m256 d = _mm256_set1_ps(half_to_float(blk));
        for (int i = 0; i < 4; i++) {
            const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * i)));
            _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(d, _mm256_cvtepi32_ps(q)));
        }
    }
}

typedef void (*dequant_fn)(const uint8_t *, float *, int64_t);

static dequant_fn dequantizer(int qtype) {
    switch (qtype) {
    case QTYPE_Q4_0: return dequant_q4_0;
    case QTYPE_Q4_1: return dequant_q4_1;
    case QTYPE_Q8_0: return dequant_q8_0;
    default: return NULL;
    }
}

/* Fixed-order horizontal sum: the same for every output element. */
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Dequantize weight rows [n0, n0 + nr) x columns [k0, k0 + kc) into scratch (row stride kc). */
static void dequant_panel(dequant_fn dq, const uint8_t *w, int64_t row_bytes, int bb, int64_t n0, int nr,
                          int64_t k0, int64_t kc, float *scratch) {
    for (int r = 0; r < nr; r++)
        dq(w + (n0 + r) * row_bytes + (k0 / 32) * bb, scratch + r * kc, kc / 32);
}

/* acc[t][r] (8 lanes each, kept in memory between K chunks) += scratch row r . x row t, for NT tokens
 * and ROWS rows. Lane i of an accumulator sums the products at k = i (mod 8) in k order, the same for
 * every tile shape, so results do not depend on how a batch is tiled. */
#define TILE(NT)                                                                                         \
    static inline void tile_##NT##x4(const float *s, int64_t kc, const float *x, int64_t ldx, float *acc) { \
        __m256 a[NT][ROWS];                                                                              \
        for (int t = 0; t < NT; t++)                                                                     \
            for (int r = 0; r < ROWS; r++)                                                               \
                a[t][r] = _mm256_loadu_ps(acc + (t * ROWS + r) * 8);                                     \
        for (int64_t k = 0; k < kc; k += 8) {                                                            \
            for (int t = 0; t < NT; t++) {                                                               \
                const __m256 v = _mm256_loadu_ps(x + t * ldx + k);                                       \
                for (int r = 0; r < ROWS; r++)                                                           \
                    a[t][r] = _mm256_fmadd_ps(_mm256_loadu_ps(s + r * kc + k), v, a[t][r]);              \
            }                                                                                            \
        }                                                                                                \
        for (int t = 0; t < NT; t++)                                                                     \
            for (int r = 0; r < ROWS; r++)                                                               \
                _mm256_storeu_ps(acc + (t * ROWS + r) * 8, a[t][r]);                                     \
    }
TILE(1)
TILE(3)

/* The same arithmetic for one token and nr < ROWS rows (the last group of an N not divisible by 4). */
static inline void tile_1xn(const float *s, int64_t kc, int nr, const float *x0, float *acc0) {
    for (int r = 0; r < nr; r++) {
        __m256 a = _mm256_loadu_ps(acc0 + 8 * r);
        const float *sr = s + r * kc;
        for (int64_t k = 0; k < kc; k += 8)
            a = _mm256_fmadd_ps(_mm256_loadu_ps(sr + k), _mm256_loadu_ps(x0 + k), a);
        _mm256_storeu_ps(acc0 + 8 * r, a);
    }
}

/* y[M, N] (row stride ldy) = x[M, K] (row stride ldx) @ W^T, W [N, K] in GGML blocks of qtype.
 * Returns 0, or -1 for an unsupported qtype or a K that is not a multiple of 32. */
int heron_quant_linear(const float *x, int64_t ldx, const uint8_t *w, int qtype, float *y, int64_t ldy,
                       int64_t M, int64_t N, int64_t K) {
    const dequant_fn dq = dequantizer(qtype);
    const int bb = block_bytes(qtype);
    if (dq == NULL || K % 32 != 0)
        return -1;
    const int64_t row_bytes = K / 32 * bb;
    const int64_t groups = (N + ROWS - 1) / ROWS;
#pragma omp parallel
    {
        float *scratch = malloc(sizeof(float) * ROWS * KC);
        float *acc = malloc(sizeof(float) * 8 * ROWS * TB);
        /* Token blocks outermost: a block's activations stay in L2 while every row group reads them. */
        for (int64_t t0 = 0; t0 < M; t0 += TB) {
            const int64_t tb = M - t0 < TB ? M - t0 : TB;
            const float *xb = x + t0 * ldx;
#pragma omp for schedule(dynamic, 4)
            for (int64_t g = 0; g < groups; g++) {
                const int64_t n0 = g * ROWS;
                const int nr = (int)(N - n0 < ROWS ? N - n0 : ROWS);
                memset(acc, 0, sizeof(float) * 8 * ROWS * tb);
                for (int64_t k0 = 0; k0 < K; k0 += KC) {
                    const int64_t kc = K - k0 < KC ? K - k0 : KC;
                    dequant_panel(dq, w, row_bytes, bb, n0, nr, k0, kc, scratch);
                    int64_t t = 0;
                    if (nr == ROWS) {
                        for (; t + 3 <= tb; t += 3)
                            tile_3x4(scratch, kc, xb + t * ldx + k0, ldx, acc + t * 8 * ROWS);
                        for (; t < tb; t++)
                            tile_1x4(scratch, kc, xb + t * ldx + k0, ldx, acc + t * 8 * ROWS);
                    }
                    for (; t < tb; t++)
                        tile_1xn(scratch, kc, nr, xb + t * ldx + k0, acc + t * 8 * ROWS);
                }
                for (int64_t t = 0; t < tb; t++)
                    for (int r = 0; r < nr; r++)
                        y[(t0 + t) * ldy + n0 + r] = hsum(_mm256_loadu_ps(acc + t * 8 * ROWS + 8 * r));
            }
        }
        free(acc);
        free(scratch);
    }
    return 0;
}

/* Dequantize rows[i] of W [N, K] into out[i, :] (row stride K): embedding lookups from GGUF blocks. */
int heron_quant_rows(const uint8_t *w, int qtype, int64_t K, const int64_t *rows, int64_t num_rows, float *out) {
    const dequant_fn dq = dequantizer(qtype);
    const int bb = block_bytes(qtype);
    if (dq == NULL || K % 32 != 0)
        return -1;
    const int64_t row_bytes = K / 32 * bb;
    for (int64_t i = 0; i < num_rows; i++)
        dq(w + rows[i] * row_bytes, out + i * K, K / 32);
    return 0;
}

static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    if (i < n)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    return hsum(_mm256_add_ps(s0, s1));
}

/* e^x for 8 lanes (Cephes' expf: range reduction by ln 2, degree-5 polynomial; ~1 ulp), x <= 88. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.33654f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(0.693359375f)));
    x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* p[0..n) = exp(p - max p); returns the sum. Lanes past n in the last vector are padding. */
static float softmax_numerators(float *p, int64_t n) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; j++)
        mx = p[j] > mx ? p[j] : mx;
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 total = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + j), vmx));
        _mm256_storeu_ps(p + j, e);
        total = _mm256_add_ps(total, e);
    }
    float sum = hsum(total);
    for (; j < n; j++) {
        p[j] = expf(p[j] - mx);
        sum += p[j];
    }
    return sum;
}

/* Decode attention, one query token per sequence, over K/V read in place from the paged cache.
 *   q [B, H, D] (token stride ldq), out [B, H, D] contiguous;
 *   k_cache, v_cache [num_slots, Hkv, D]; slots [B, max_len] (int64) cache slot of each position;
 *   seq_lens [B] (int64) positions each sequence attends to (its new token included).
 * Query head h reads KV head h / (H / Hkv). One job per sequence reads each cache slot whole (all
 * KV heads) in position order, which the hardware prefetcher follows; the sequence's values then
 * stay in L2 while every head takes its weighted sum. D must be a multiple of 8. */
int heron_paged_decode_attention(const float *q, int64_t ldq, const float *k_cache, const float *v_cache,
                                 const int64_t *slots, int64_t max_len, const int64_t *seq_lens, float *out,
                                 int64_t B, int64_t H, int64_t Hkv, int64_t D, float scale) {
    if (D % 8 != 0 || H % Hkv != 0)
        return -1;
    const int64_t G = H / Hkv;
    const int64_t slot_stride = Hkv * D;
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * (size_t)(H * (max_len > 0 ? max_len : 1)));
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < B; b++) {
            const int64_t L = seq_lens[b];
            const int64_t *seq_slots = slots + b * max_len;
            const float *qb = q + b * ldq;
            for (int64_t j = 0; j < L; j++) {
                const float *kj = k_cache + seq_slots[j] * slot_stride;
                for (int64_t h = 0; h < H; h++)
                    scores[h * L + j] = dot(qb + h * D, kj + (h / G) * D, D) * scale;
            }
            for (int64_t h = 0; h < H; h++) {
                const float *ph = scores + h * L;
                const __m256 inv = _mm256_set1_ps(1.0f / softmax_numerators(scores + h * L, L));
                const float *vh = v_cache + (h / G) * D;
                float *oh = out + (b * H + h) * D;
                /* 64 output lanes at a time, held in registers across all positions. */
                for (int64_t d0 = 0; d0 < D; d0 += 64) {
                    const int64_t nv = (D - d0 < 64 ? D - d0 : 64) / 8;
                    __m256 acc[8];
                    for (int i = 0; i < 8; i++)
                        acc[i] = _mm256_setzero_ps();
                    for (int64_t j = 0; j < L; j++) {
                        const float *vj = vh + seq_slots[j] * slot_stride + d0;
                        const __m256 pj = _mm256_set1_ps(ph[j]);
                        for (int i = 0; i < nv; i++)
                            acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * i), acc[i]);
                    }
                    for (int i = 0; i < nv; i++)
                        _mm256_storeu_ps(oh + d0 + 8 * i, _mm256_mul_ps(acc[i], inv));
                }
            }
        }
        free(scores);
    }
    return 0;
}

/* Residual add and RMSNorm in one pass over x [M, N] (row stride ldx):
 *   x += delta (skipped when delta is NULL); out = x / sqrt(mean(x^2) + eps) * w. */
int heron_add_rms_norm(float *x, int64_t ldx, const float *delta, int64_t ldd, const float *w, float *out,
                       int64_t M, int64_t N, float eps) {
    if (N % 8 != 0)
        return -1;
#pragma omp parallel for schedule(static) if (M * N > 32768)
    for (int64_t t = 0; t < M; t++) {
        float *xt = x + t * ldx;
        __m256 ss = _mm256_setzero_ps();
        for (int64_t i = 0; i < N; i += 8) {
            __m256 v = _mm256_loadu_ps(xt + i);
            if (delta != NULL) {
                v = _mm256_add_ps(v, _mm256_loadu_ps(delta + t * ldd + i));
                _mm256_storeu_ps(xt + i, v);
            }
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        const __m256 r = _mm256_set1_ps(1.0f / sqrtf(hsum(ss) / (float)N + eps));
        for (int64_t i = 0; i < N; i += 8)
            _mm256_storeu_ps(out + t * N + i,
                             _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xt + i), r), _mm256_loadu_ps(w + i)));
    }
    return 0;
}

/* out [M, I] = silu(gate) * up, from gate_up [M, 2I] holding gate then up. */
int heron_silu_mul(const float *gate_up, float *out, int64_t M, int64_t I) {
    if (I % 8 != 0)
        return -1;
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 sign = _mm256_set1_ps(-0.0f);
#pragma omp parallel for schedule(static) if (M * I > 32768)
    for (int64_t t = 0; t < M; t++) {
        const float *g = gate_up + t * 2 * I, *u = g + I;
        for (int64_t i = 0; i < I; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i);
            /* exp256 clamps below -87.3, so a large positive gate gives g / (1 + ~0) = g. */
            const __m256 e = exp256(_mm256_min_ps(_mm256_xor_ps(gv, sign), _mm256_set1_ps(88.0f)));
            const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            _mm256_storeu_ps(out + t * I + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
        }
    }
    return 0;
}

/* Rotate-half RoPE in place on the first num_heads heads of each row of x [T, ...] (row stride ldx,
 * heads of D contiguous): for i < D/2, (a, b) = (x[i], x[i + D/2]) becomes
 * (a cos - b sin, b cos + a sin), with cos/sin rows [max_pos, D/2] picked by positions[t]. */
int heron_rotary(float *x, int64_t ldx, int64_t T, int64_t num_heads, int64_t D, const int64_t *positions,
                 const float *cos_table, const float *sin_table) {
    const int64_t half = D / 2;
    if (half % 8 != 0)
        return -1;
#pragma omp parallel for schedule(static) if (T * num_heads * D > 32768)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_table + positions[t] * half, *s = sin_table + positions[t] * half;
        for (int64_t h = 0; h < num_heads; h++) {
            float *a = x + t * ldx + h * D, *b = a + half;
            for (int64_t i = 0; i < half; i += 8) {
                const __m256 av = _mm256_loadu_ps(a + i), bv = _mm256_loadu_ps(b + i);
                const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
                _mm256_storeu_ps(a + i, _mm256_sub_ps(_mm256_mul_ps(av, cv), _mm256_mul_ps(bv, sv)));
                _mm256_storeu_ps(b + i, _mm256_add_ps(_mm256_mul_ps(bv, cv), _mm256_mul_ps(av, sv)));
            }
        }
    }
    return 0;
}
