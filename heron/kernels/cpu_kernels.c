/* Heron's CPU kernels (x86-64 with AVX2, FMA and F16C), loaded through ctypes by heron/kernels.
 *
 * - Linear layers from GGUF-quantized weights (Q4_0, Q4_1, Q8_0): y[M, N] = x[M, K] @ W^T with W kept
 *   at 4-8 bits per weight (heron_packed_linear, below). A single-stream decode step is bound by the
 *   bytes of weights it streams from memory, so reading quantized weights instead of float32
 *   copies (5 to 7 times larger) is most of the speed. Dequantization computes exactly what gguf-py's
 *   reference does (d * q + m, rounded twice: this file is built with -ffp-contract=off), so only the
 *   summation order differs from a float32 GEMM; and every output element is summed the same way
 *   whatever M is, so a request gets bit-identical results alone or in any batch.
 * - The same with int8 activations (heron_q8_linear, at the end): each row quantized per 32 values,
 *   products summed in integers, as llama.cpp does; about 1.5x faster at batch 64 (one token is
 *   bound by the weights' bytes either way), at the cost of the activations' rounding. The default;
 *   HERON_CPU_INT8=0 keeps float32.
 * - Embedding rows dequantized from the file's blocks (heron_quant_rows).
 * - Decode attention over the paged KV cache, reading K/V in place through each sequence's slots.
 * - Residual add + RMSNorm, SiLU * up, and RoPE in place: the small per-layer steps, fused.
 *
 * Threads come from OpenMP; Python loads this library after torch, so the runtime (and its thread
 * pool) is the one torch already runs on.
 *
 * One source, built once per ISA (heron/kernels/__init__.py): the AVX2 build, and with HERON_AVX512
 * defined an AVX-512 build (F/BW/VL/VNNI) whose int8 matmul tiles sum with vpdpbusd over two panels
 * per register. Both sum the same exact integers and do the same float operations per output, so
 * the two builds give bit-identical results (tested). HERON_SIMDE builds the AVX-512 code on a CPU
 * without it, through SIMDe's portable intrinsics: slow, for testing only.
 */
#include <immintrin.h>
#if defined(HERON_AVX512) && defined(HERON_SIMDE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TB 96 /* tokens per block: 96 x 1536 floats of activations fit in L2 */
#define PKC 256 /* k per scratch chunk: 2 panels x 256 k x 8 floats = 16 KiB */

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

/* Eight dot products at once: lane s of the result = sum of v[s]'s lanes. */
static inline __m256 hsum8(const __m256 v[8]) {
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

/* scores[h][j] = scale * q_h . k_j (query head h reads KV head h / G) for j in [0, L), 8 positions per
 * pass: each head runs 8 independent accumulation chains and one transposing reduction instead of 8
 * horizontal sums. Positions past L in the last pass re-read position L - 1; each row of scores
 * (stride lds) has room for L rounded up to 8. Slot j's keys (all KV heads) are kv + slots[j] * stride. */
static void attention_scores(const float *q, int64_t H, int64_t G, const float *kv, int64_t stride,
                             const int64_t *slots, int64_t L, int64_t D, float scale, float *scores, int64_t lds) {
    const __m256 vscale = _mm256_set1_ps(scale);
    for (int64_t j = 0; j < L; j += 8) {
        /* A sequence's blocks lie scattered over a cache far bigger than the CPU's: prefetch the keys
         * two passes ahead so that the loads do not wait on DRAM. */
        for (int64_t s = j + 16; s < j + 24 && s < L; s++)
            for (int64_t e = 0; e < stride; e += 16)
                _mm_prefetch((const char *)(kv + slots[s] * stride + e), _MM_HINT_T0);
        const float *k[8];
        for (int s = 0; s < 8; s++)
            k[s] = kv + slots[j + s < L ? j + s : L - 1] * stride;
        for (int64_t h = 0; h < H; h++) {
            const float *qh = q + h * D;
            const int64_t off = h / G * D;
            __m256 acc[8];
            for (int s = 0; s < 8; s++)
                acc[s] = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) {
                const __m256 qv = _mm256_loadu_ps(qh + d);
                for (int s = 0; s < 8; s++)
                    acc[s] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[s] + off + d), acc[s]);
            }
            _mm256_storeu_ps(scores + h * lds + j, _mm256_mul_ps(hsum8(acc), vscale));
        }
    }
}

/* out[d0 .. d0 + 64) (+)= sum over j of p[j] * v_j[d0 ..] (v_j = vh + slots[j] * stride): 8 accumulation
 * chains in registers; `first` starts from zero, otherwise from what out holds. */
static void weighted_sum_64(const float *p, const float *vh, int64_t stride, const int64_t *slots, int64_t n,
                            int64_t d0, float *out, int first) {
    __m256 acc[8];
    for (int i = 0; i < 8; i++)
        acc[i] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + d0 + 8 * i);
    for (int64_t j = 0; j < n; j++) {
        const float *vj = vh + slots[j] * stride + d0;
        const __m256 pj = _mm256_broadcast_ss(p + j);
        for (int i = 0; i < 8; i++)
            acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * i), acc[i]);
    }
    for (int i = 0; i < 8; i++)
        _mm256_storeu_ps(out + d0 + 8 * i, acc[i]);
}

/* The same for 8 lanes, for the part of a head_dim past its last multiple of 64. */
static void weighted_sum_8(const float *p, const float *vh, int64_t stride, const int64_t *slots, int64_t n,
                           int64_t d0, float *out, int first) {
    __m256 acc = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + d0);
    for (int64_t j = 0; j < n; j++)
        acc = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), _mm256_loadu_ps(vh + slots[j] * stride + d0), acc);
    _mm256_storeu_ps(out + d0, acc);
}

#define VCHUNK 16 /* positions per pass of the weighted sums: 16 slots of values stay in L1 for all heads */

/* out[h] = sum over j of p[h][j] * v_j (KV head h / G) for every head h, VCHUNK positions at a time:
 * each chunk of values comes from memory once (prefetched while the chunk before is summed) and
 * serves all H heads from L1. Each lane still adds its terms in position order. */
static void weighted_sums(const float *p, int64_t ldp, int64_t H, int64_t G, const float *vv, int64_t stride,
                          const int64_t *slots, int64_t L, int64_t D, float *out) {
    for (int64_t j0 = 0; j0 < L; j0 += VCHUNK) {
        const int64_t n = L - j0 < VCHUNK ? L - j0 : VCHUNK;
        for (int64_t s = j0 + VCHUNK; s < j0 + 2 * VCHUNK && s < L; s++)
            for (int64_t e = 0; e < stride; e += 16)
                _mm_prefetch((const char *)(vv + slots[s] * stride + e), _MM_HINT_T0);
        for (int64_t h = 0; h < H; h++) {
            const float *vh = vv + h / G * D;
            int64_t d0 = 0;
            for (; d0 + 64 <= D; d0 += 64)
                weighted_sum_64(p + h * ldp + j0, vh, stride, slots + j0, n, d0, out + h * D, j0 == 0);
            for (; d0 < D; d0 += 8)
                weighted_sum_8(p + h * ldp + j0, vh, stride, slots + j0, n, d0, out + h * D, j0 == 0);
        }
    }
}

/* Decode attention, one query token per sequence, over K/V read in place from the paged cache.
 *   q [B, H, D] (token stride ldq), out [B, H, D] contiguous;
 *   k_cache, v_cache [num_slots, Hkv, D]; slots [B, >= max_len] (int64, row stride ld_slots) cache slot
 *   of each position; seq_lens [B] (int64, <= max_len) positions each row attends to (its own included).
 * A row's result depends on nothing but its query, its length and the cached K/V, so the rows of a
 * prefill chunk (ld_slots = 0: one slot list, lengths counting up) get exactly what each of those
 * tokens would get as a decode: outputs do not depend on chunking, batching or prefix caching.
 * Query head h reads KV head h / (H / Hkv). One job per sequence: it reads each cache slot whole
 * (all KV heads) in position order, the access pattern DRAM serves fastest, and every query head
 * sharing a KV head (GQA) reuses what was read. D must be a multiple of 8. */
int heron_paged_decode_attention(const float *q, int64_t ldq, const float *k_cache, const float *v_cache,
                                 const int64_t *slots, int64_t ld_slots, int64_t max_len, const int64_t *seq_lens,
                                 float *out, int64_t B, int64_t H, int64_t Hkv, int64_t D, float scale) {
    if (D % 8 != 0 || H % Hkv != 0)
        return -1;
    const int64_t G = H / Hkv;
    const int64_t stride = Hkv * D;
    const int64_t lds = ((max_len > 0 ? max_len : 1) + 7) / 8 * 8;
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * (size_t)(H * lds));
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < B; b++) {
            const int64_t L = seq_lens[b];
            const int64_t *seq_slots = slots + b * ld_slots;
            attention_scores(q + b * ldq, H, G, k_cache, stride, seq_slots, L, D, scale, scores, lds);
            for (int64_t h = 0; h < H; h++) {
                float *ph = scores + h * lds;
                const __m256 inv = _mm256_set1_ps(1.0f / softmax_numerators(ph, L));
                for (int64_t j = 0; j < L; j += 8) /* normalized up front: the sums below are then final */
                    _mm256_storeu_ps(ph + j, _mm256_mul_ps(_mm256_loadu_ps(ph + j), inv));
            }
            weighted_sums(scores, lds, H, G, v_cache, stride, seq_slots, L, D, out + b * H * D);
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

/* ---- Linear layers from panel-packed quantized weights -------------------------------------------
 * The file's blocks run along a row, which makes every output a dot product whose inner loop issues
 * more loads than FMAs. Repacked once at load time into panels of 8 rows, with the 8 rows' weights of
 * one k side by side, the matmul becomes rank-1 updates: one vector of 8 weights times one broadcast
 * activation per FMA, 16 rows x 6 tokens of accumulators in registers (about 15% faster at batch 64).
 * Each pair of panels is dequantized, 256 k at a time, into a float32 scratch that stays in L1 while
 * every token of the batch reads it.
 *
 * Packed layout, panel p (rows 8p .. 8p + 7; rows past N are zero), block b (k = 32b .. 32b + 31):
 *   Q4_0 / Q4_1: q[p][b][16][8] bytes: byte [j][r] = q(k = 32b + 2j, r) | q(k = 32b + 2j + 1, r) << 4
 *   Q8_0:        q[p][b][32][8] int8
 *   d[p][b][8] float32 scales, m[p][b][8] float32 mins (Q4_1 only)
 * Values are dequantized exactly as gguf-py does (Q4_0: (q - 8) * d; Q4_1: d * q + m; Q8_0: d * q),
 * and each output sums its products in k order in one lane, whatever M is: a row gets the same bits
 * alone or in any batch. */


static inline int packed_qbytes(int qtype) { return qtype == QTYPE_Q8_0 ? 256 : 128; }

/* Dequantize panel p, k in [k0, k0 + kc) (multiples of 32) into s[k - k0][8] (row stride `stride`). */
static void dequant_packed(const uint8_t *q, const float *d, const float *m, int qtype, int64_t nb, int64_t p,
                           int64_t k0, int64_t kc, float *s, int64_t stride) {
    const __m256i low = _mm256_set1_epi32(0xF);
    const int qb = packed_qbytes(qtype);
    for (int64_t b = k0 / 32; b < (k0 + kc) / 32; b++) {
        const uint8_t *qp = q + (p * nb + b) * qb;
        const __m256 dv = _mm256_loadu_ps(d + (p * nb + b) * 8);
        float *out = s + (b * 32 - k0) * stride;
        if (qtype == QTYPE_Q8_0) {
            for (int k = 0; k < 32; k++) {
                const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qp + 8 * k)));
                _mm256_storeu_ps(out + k * stride, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(v)));
            }
        } else if (qtype == QTYPE_Q4_1) {
            const __m256 mv = _mm256_loadu_ps(m + (p * nb + b) * 8);
            for (int j = 0; j < 16; j++) {
                const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qp + 8 * j)));
                const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, low));
                const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
                _mm256_storeu_ps(out + (2 * j) * stride, _mm256_add_ps(_mm256_mul_ps(dv, lo), mv));
                _mm256_storeu_ps(out + (2 * j + 1) * stride, _mm256_add_ps(_mm256_mul_ps(dv, hi), mv));
            }
        } else { /* Q4_0 */
            const __m256 eight = _mm256_set1_ps(8.0f);
            for (int j = 0; j < 16; j++) {
                const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qp + 8 * j)));
                const __m256 lo = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low)), eight);
                const __m256 hi = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), eight);
                _mm256_storeu_ps(out + (2 * j) * stride, _mm256_mul_ps(lo, dv));
                _mm256_storeu_ps(out + (2 * j + 1) * stride, _mm256_mul_ps(hi, dv));
            }
        }
    }
}

/* acc[t][8 * NP] += sum over k of s[k][8 * NP] * x[t][k], for NT tokens and NP panels. */
#define RANK1(NP, NT)                                                                                      \
    static inline void rank1_##NP##x##NT(const float *s, int64_t kc, const float *x, int64_t ldx, float *acc) { \
        __m256 a[NT][NP];                                                                                  \
        for (int t = 0; t < NT; t++)                                                                       \
            for (int p = 0; p < NP; p++)                                                                   \
                a[t][p] = _mm256_loadu_ps(acc + t * 16 + 8 * p);                                           \
        for (int64_t k = 0; k < kc; k++) {                                                                 \
            __m256 w[NP];                                                                                  \
            for (int p = 0; p < NP; p++)                                                                   \
                w[p] = _mm256_loadu_ps(s + k * 8 * NP + 8 * p);                                            \
            for (int t = 0; t < NT; t++) {                                                                 \
                const __m256 xb = _mm256_broadcast_ss(x + t * ldx + k);                                    \
                for (int p = 0; p < NP; p++)                                                               \
                    a[t][p] = _mm256_fmadd_ps(w[p], xb, a[t][p]);                                          \
            }                                                                                              \
        }                                                                                                  \
        for (int t = 0; t < NT; t++)                                                                       \
            for (int p = 0; p < NP; p++)                                                                   \
                _mm256_storeu_ps(acc + t * 16 + 8 * p, a[t][p]);                                           \
    }
RANK1(2, 6) RANK1(2, 5) RANK1(2, 4) RANK1(2, 3) RANK1(2, 2) RANK1(2, 1)
RANK1(1, 6) RANK1(1, 5) RANK1(1, 4) RANK1(1, 3) RANK1(1, 2) RANK1(1, 1)

static void rank1(int np, int nt, const float *s, int64_t kc, const float *x, int64_t ldx, float *acc) {
    switch (np * 8 + nt) {
    case 8 + 1: rank1_1x1(s, kc, x, ldx, acc); break;
    case 8 + 2: rank1_1x2(s, kc, x, ldx, acc); break;
    case 8 + 3: rank1_1x3(s, kc, x, ldx, acc); break;
    case 8 + 4: rank1_1x4(s, kc, x, ldx, acc); break;
    case 8 + 5: rank1_1x5(s, kc, x, ldx, acc); break;
    case 8 + 6: rank1_1x6(s, kc, x, ldx, acc); break;
    case 16 + 1: rank1_2x1(s, kc, x, ldx, acc); break;
    case 16 + 2: rank1_2x2(s, kc, x, ldx, acc); break;
    case 16 + 3: rank1_2x3(s, kc, x, ldx, acc); break;
    case 16 + 4: rank1_2x4(s, kc, x, ldx, acc); break;
    case 16 + 5: rank1_2x5(s, kc, x, ldx, acc); break;
    default: rank1_2x6(s, kc, x, ldx, acc); break;
    }
}

/* One token (a single-stream decode step): no scratch, up to 4 panels dequantized straight into
 * registers so that 4 accumulation chains run side by side. The same values, added in the same
 * order, as the batched path computes. */
static void packed_gemv(const float *x, const uint8_t *q, const float *d, const float *m, int qtype, int64_t nb,
                        int64_t p0, int np, float *out) {
    const __m256i low = _mm256_set1_epi32(0xF);
    const __m256 eight = _mm256_set1_ps(8.0f);
    const int qb = packed_qbytes(qtype);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + 32 * b;
        __m256 dv[4], mv[4];
        for (int p = 0; p < np; p++) {
            dv[p] = _mm256_loadu_ps(d + ((p0 + p) * nb + b) * 8);
            mv[p] = qtype == QTYPE_Q4_1 ? _mm256_loadu_ps(m + ((p0 + p) * nb + b) * 8) : _mm256_setzero_ps();
        }
        if (qtype == QTYPE_Q8_0) {
            for (int k = 0; k < 32; k++) {
                const __m256 xk = _mm256_broadcast_ss(xb + k);
                for (int p = 0; p < np; p++) {
                    const uint8_t *qp = q + ((p0 + p) * nb + b) * qb + 8 * k;
                    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)qp));
                    acc[p] = _mm256_fmadd_ps(_mm256_mul_ps(dv[p], _mm256_cvtepi32_ps(v)), xk, acc[p]);
                }
            }
            continue;
        }
        for (int j = 0; j < 16; j++) {
            const __m256 x0 = _mm256_broadcast_ss(xb + 2 * j), x1 = _mm256_broadcast_ss(xb + 2 * j + 1);
            for (int p = 0; p < np; p++) {
                const uint8_t *qp = q + ((p0 + p) * nb + b) * qb + 8 * j;
                const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)qp));
                __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, low));
                __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
                if (qtype == QTYPE_Q4_1) {
                    lo = _mm256_add_ps(_mm256_mul_ps(dv[p], lo), mv[p]);
                    hi = _mm256_add_ps(_mm256_mul_ps(dv[p], hi), mv[p]);
                } else {
                    lo = _mm256_mul_ps(_mm256_sub_ps(lo, eight), dv[p]);
                    hi = _mm256_mul_ps(_mm256_sub_ps(hi, eight), dv[p]);
                }
                acc[p] = _mm256_fmadd_ps(lo, x0, acc[p]);
                acc[p] = _mm256_fmadd_ps(hi, x1, acc[p]);
            }
        }
    }
    for (int p = 0; p < np; p++)
        _mm256_storeu_ps(out + 8 * p, acc[p]);
}

/* y[M, N] (row stride ldy) = x[M, K] (row stride ldx) @ W^T, W packed as above. Returns 0, or -1 for
 * an unsupported qtype or a K that is not a multiple of 32. */
int heron_packed_linear(const float *x, int64_t ldx, const uint8_t *q, const float *d, const float *m, int qtype,
                        float *y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
    if (K % 32 != 0 || !(qtype == QTYPE_Q4_0 || qtype == QTYPE_Q4_1 || qtype == QTYPE_Q8_0))
        return -1;
    const int64_t nb = K / 32;
    const int64_t panels = (N + 7) / 8;
    const int64_t pairs = (panels + 1) / 2;
    if (M == 1) {
        const int64_t quads = (panels + 3) / 4;
#pragma omp parallel for schedule(dynamic, 4)
        for (int64_t g = 0; g < quads; g++) {
            float out[32];
            const int64_t p0 = 4 * g;
            const int np = (int)(panels - p0 < 4 ? panels - p0 : 4);
            packed_gemv(x, q, d, m, qtype, nb, p0, np, out);
            const int64_t n0 = p0 * 8;
            memcpy(y + n0, out, sizeof(float) * (N - n0 < 8 * np ? N - n0 : 8 * np));
        }
        return 0;
    }
#pragma omp parallel
    {
        float *scratch = malloc(sizeof(float) * 16 * PKC);
        float *acc = malloc(sizeof(float) * 16 * TB);
        for (int64_t t0 = 0; t0 < M; t0 += TB) {
            const int64_t tb = M - t0 < TB ? M - t0 : TB;
            const float *xb = x + t0 * ldx;
#pragma omp for schedule(dynamic, 2)
            for (int64_t g = 0; g < pairs; g++) {
                const int64_t p0 = 2 * g;
                const int np = p0 + 1 < panels ? 2 : 1;
                memset(acc, 0, sizeof(float) * 16 * tb);
                for (int64_t k0 = 0; k0 < K; k0 += PKC) {
                    const int64_t kc = K - k0 < PKC ? K - k0 : PKC;
                    for (int p = 0; p < np; p++)
                        dequant_packed(q, d, m, qtype, nb, p0 + p, k0, kc, scratch + 8 * p, 8 * np);
                    for (int64_t t = 0; t < tb; t += 6) {
                        const int nt = (int)(tb - t < 6 ? tb - t : 6);
                        rank1(np, nt, scratch, kc, xb + t * ldx + k0, ldx, acc + t * 16);
                    }
                }
                const int64_t n0 = p0 * 8;
                const int64_t nr = N - n0 < 8 * np ? N - n0 : 8 * np;
                for (int64_t t = 0; t < tb; t++)
                    memcpy(y + (t0 + t) * ldy + n0, acc + t * 16, sizeof(float) * nr);
            }
        }
        free(acc);
        free(scratch);
    }
    return 0;
}

/* ---- Linear layers with int8 activations (integer dot products) -------------------------------
 * The scheme llama.cpp uses for these weight types: each activation row is quantized per 32-value
 * block to int8 (scale amax / 127, round to nearest even), and every block
 * of products is summed exactly in integers (vpmaddubsw: 32 u8 x s8 products per instruction, four
 * times a float32 FMA's 8) before one float32 rescale per block:
 *   y[t][n] = sum over blocks b of  d[n][b] * sx[t][b] * (sum_k q[n][k] * xq[t][k])  +  m[n][b] * xs[t][b]
 * with xs the float sum of the block's activations (Q4_1's min; Q4_0 is packed as Q4_1 with m = -8 d).
 * Q8_0 has no m. The float terms are added in block order whatever M is, and the integer sums are
 * exact, so a row gets the same bits alone or in any batch.
 *
 * Packed layout, panel p (rows 8p .. 8p + 7), block b, 4-value groups g = 0 .. 7 of the block:
 *   Q4: q[p][b][4][8][4] bytes: byte [v][r][i] = q(k = 32b + 8v + i, r) | q(k = 32b + 8v + 4 + i, r) << 4
 *       (the low nibbles of a 32-byte vector are group 2v, the high nibbles group 2v + 1: two masks apart)
 *   Q8: q[p][b][8][8][4] int8: [g][r][i] = q(k = 32b + 4g + i, r)
 *   d[p][b][8], m[p][b][8] float32 as in the float layout. */

enum { DOT_Q4 = 4, DOT_Q8 = 8 };

/* Row x[0 .. K) -> xq (int8), sx[b] (scale), xs[b] (float sum of the block), b < K / 32. */
static void quantize_row_q8(const float *x, int64_t K, int8_t *xq, float *sx, float *xs) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < K / 32; b++) {
        const float *xb = x + 32 * b;
        __m256 v[4], amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
            sum = _mm256_add_ps(sum, v[i]);
        }
        __m128 a = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        a = _mm_max_ps(a, _mm_movehl_ps(a, a));
        a = _mm_max_ss(a, _mm_movehdup_ps(a));
        const float scale = _mm_cvtss_f32(a) / 127.0f;
        const __m256 inv = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
        sx[b] = scale;
        xs[b] = hsum(sum);
        __m256i i32[4];
        for (int i = 0; i < 4; i++)
            i32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
        /* packs interleave the 128-bit lanes; the permute puts the 32 values back in k order. */
        const __m256i i16a = _mm256_packs_epi32(i32[0], i32[1]), i16b = _mm256_packs_epi32(i32[2], i32[3]);
        const __m256i i8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i16a, i16b),
                                                       _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq + 32 * b), i8);
    }
}

static inline __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* acc[t][8 * NP] = rows 0 .. 8 NP of W (q, d, m at the first panel) times NT quantized tokens (xq rows
 * ldq bytes apart, scales sx and sums xs rows nb apart), over all nb blocks. The float accumulators
 * live in acc (L1) and are touched once per block, which leaves the 16 vector registers to the
 * 16-bit sums and the weights. */
#define DOT_Q4(NP, NT)                                                                                     \
    static void dot_q4_##NP##x##NT(const uint8_t *q, const float *d, const float *m, int64_t nb,           \
                                   const int8_t *xq, int64_t ldq, const float *sx, const float *xs,        \
                                   float *acc) {                                                           \
        const __m256i low = _mm256_set1_epi8(0xF);                                                         \
        for (int i = 0; i < NT * 16; i++)                                                                  \
            acc[i] = 0.0f;                                                                                 \
        for (int64_t b = 0; b < nb; b++) {                                                                 \
            __m256i s[NT][NP];                                                                             \
            for (int t = 0; t < NT; t++)                                                                   \
                for (int p = 0; p < NP; p++)                                                               \
                    s[t][p] = _mm256_setzero_si256();                                                      \
            _Pragma("GCC unroll 1") for (int v = 0; v < 4; v++) {                                          \
                for (int half = 0; half < 2; half++) {                                                     \
                    __m256i w[NP];                                                                         \
                    for (int p = 0; p < NP; p++) {                                                         \
                        const uint8_t *qp = q + (p * nb + b) * 128 + 32 * v;                               \
                        const __m256i raw = _mm256_loadu_si256((const __m256i *)qp);                       \
                        w[p] = _mm256_and_si256(half ? _mm256_srli_epi16(raw, 4) : raw, low);              \
                    }                                                                                      \
                    for (int t = 0; t < NT; t++) {                                                         \
                        const __m256i x4 = bcast4(xq + t * ldq + 32 * b + 8 * v + 4 * half);              \
                        for (int p = 0; p < NP; p++)                                                       \
                            s[t][p] = _mm256_add_epi16(s[t][p], _mm256_maddubs_epi16(w[p], x4));           \
                    }                                                                                      \
                }                                                                                          \
            }                                                                                              \
            /* 8 groups x 2 x 15 x 127 < 2^15: the block's sums fit the 16-bit lanes. */                   \
            const __m256i ones = _mm256_set1_epi16(1);                                                     \
            for (int t = 0; t < NT; t++) {                                                                 \
                const __m256 st = _mm256_set1_ps(sx[t * nb + b]), mt = _mm256_set1_ps(xs[t * nb + b]);     \
                for (int p = 0; p < NP; p++) {                                                             \
                    float *a = acc + t * 16 + 8 * p;                                                       \
                    const __m256 isum = _mm256_cvtepi32_ps(_mm256_madd_epi16(s[t][p], ones));              \
                    const __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(d + (p * nb + b) * 8), st);         \
                    __m256 f = _mm256_fmadd_ps(isum, scale, _mm256_loadu_ps(a));                           \
                    f = _mm256_fmadd_ps(_mm256_loadu_ps(m + (p * nb + b) * 8), mt, f);                     \
                    _mm256_storeu_ps(a, f);                                                                \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
    }
#ifndef HERON_AVX512 /* that build has its own tiles, below */
DOT_Q4(1, 1) DOT_Q4(1, 2) DOT_Q4(1, 3) DOT_Q4(1, 4) DOT_Q4(2, 1) DOT_Q4(2, 2) DOT_Q4(2, 3) DOT_Q4(2, 4)
#endif

/* Q8_0 weights are signed: |w| goes in the unsigned operand and w's sign moves onto x. A pair of
 * 127 x 127 products can come near 2^15, so each group is widened to 32 bits at once. */
#define DOT_Q8(NP, NT)                                                                                     \
    static void dot_q8_##NP##x##NT(const uint8_t *q, const float *d, const float *m, int64_t nb,           \
                                   const int8_t *xq, int64_t ldq, const float *sx, const float *xs,        \
                                   float *acc) {                                                           \
        (void)m;                                                                                           \
        (void)xs;                                                                                          \
        const __m256i ones = _mm256_set1_epi16(1);                                                         \
        for (int i = 0; i < NT * 16; i++)                                                                  \
            acc[i] = 0.0f;                                                                                 \
        for (int64_t b = 0; b < nb; b++) {                                                                 \
            __m256i s[NT][NP];                                                                             \
            for (int t = 0; t < NT; t++)                                                                   \
                for (int p = 0; p < NP; p++)                                                               \
                    s[t][p] = _mm256_setzero_si256();                                                      \
            _Pragma("GCC unroll 1") for (int g = 0; g < 8; g++) {                                          \
                __m256i w[NP], aw[NP];                                                                     \
                for (int p = 0; p < NP; p++) {                                                             \
                    w[p] = _mm256_loadu_si256((const __m256i *)(q + (p * nb + b) * 256 + 32 * g));         \
                    aw[p] = _mm256_sign_epi8(w[p], w[p]);                                                  \
                }                                                                                          \
                for (int t = 0; t < NT; t++) {                                                             \
                    const __m256i x4 = bcast4(xq + t * ldq + 32 * b + 4 * g);                              \
                    for (int p = 0; p < NP; p++)                                                           \
                        s[t][p] = _mm256_add_epi32(s[t][p], _mm256_madd_epi16(                             \
                            _mm256_maddubs_epi16(aw[p], _mm256_sign_epi8(x4, w[p])), ones));               \
                }                                                                                          \
            }                                                                                              \
            for (int t = 0; t < NT; t++) {                                                                 \
                const __m256 st = _mm256_set1_ps(sx[t * nb + b]);                                          \
                for (int p = 0; p < NP; p++) {                                                             \
                    float *a = acc + t * 16 + 8 * p;                                                       \
                    const __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(d + (p * nb + b) * 8), st);         \
                    const __m256 isum = _mm256_cvtepi32_ps(s[t][p]);                                       \
                    _mm256_storeu_ps(a, _mm256_fmadd_ps(isum, scale, _mm256_loadu_ps(a)));                 \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
    }
#ifndef HERON_AVX512 /* that build has its own tiles, below */
DOT_Q8(1, 1) DOT_Q8(1, 2) DOT_Q8(1, 3) DOT_Q8(1, 4) DOT_Q8(2, 1) DOT_Q8(2, 2) DOT_Q8(2, 3) DOT_Q8(2, 4)
#endif

typedef void (*dot_fn)(const uint8_t *, const float *, const float *, int64_t, const int8_t *, int64_t,
                       const float *, const float *, float *);

#ifdef HERON_AVX512
/* The same tiles with AVX-512 VNNI: one 512-bit register holds a group of both panels (16 rows x 4
 * values), and vpdpbusd sums u8 x s8 products in fours straight into 32-bit lanes (no 16-bit stage,
 * no saturation), so a tile of 8 tokens takes one instruction per group and token. The integer sums
 * equal the AVX2 tiles' exactly, and the float steps below are the AVX2 ones lane by lane (scale
 * d * sx, then fmadd, then m * xs), so the results are the same bits. With one panel (np = 1) the
 * upper half is zero and never read. */
static inline __m512i pair256(const uint8_t *lo, int64_t hi_offset, int np) {
    const __m256i a = _mm256_loadu_si256((const __m256i *)lo);
    if (np == 1)
        return _mm512_inserti64x4(_mm512_setzero_si512(), a, 0);
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), _mm256_loadu_si256((const __m256i *)(lo + hi_offset)), 1);
}

static inline __m512 pair_ps(const float *lo, int64_t hi_offset, int np) {
    const __m256 a = _mm256_loadu_ps(lo);
    const __m256 b = np == 1 ? _mm256_setzero_ps() : _mm256_loadu_ps(lo + hi_offset);
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(a)), _mm256_castps_pd(b), 1));
}

#define DOT512(KIND, NP, NT)                                                                               \
    static void dot512_##KIND##_##NP##x##NT(const uint8_t *q, const float *d, const float *m, int64_t nb,  \
                                            const int8_t *xq, int64_t ldq, const float *sx,                \
                                            const float *xs, float *acc) {                                 \
        const int np = NP;                                                                                 \
        const int64_t qb = KIND == DOT_Q4 ? 128 : 256;                                                     \
        const __m512i low = _mm512_set1_epi8(0xF);                                                         \
        for (int i = 0; i < NT * 16; i++)                                                                  \
            acc[i] = 0.0f;                                                                                 \
        for (int64_t b = 0; b < nb; b++) {                                                                 \
            __m512i s[NT];                                                                                 \
            for (int t = 0; t < NT; t++)                                                                   \
                s[t] = _mm512_setzero_si512();                                                             \
            _Pragma("GCC unroll 1") for (int g = 0; g < 8; g++) {                                          \
                __m512i w;                                                                                 \
                __mmask64 neg = 0;                                                                         \
                if (KIND == DOT_Q4) { /* groups 2v and 2v + 1 are the low and high nibbles of row v */     \
                    const __m512i raw = pair256(q + b * qb + 32 * (g / 2), nb * qb, np);                   \
                    w = _mm512_and_si512(g % 2 ? _mm512_srli_epi16(raw, 4) : raw, low);                    \
                } else { /* |w| unsigned, w's sign moved onto x */                                         \
                    const __m512i raw = pair256(q + b * qb + 32 * g, nb * qb, np);                         \
                    neg = _mm512_movepi8_mask(raw);                                                        \
                    w = _mm512_abs_epi8(raw);                                                              \
                }                                                                                          \
                const int64_t k = 32 * b + 4 * g;                                                          \
                for (int t = 0; t < NT; t++) {                                                             \
                    int32_t v;                                                                             \
                    memcpy(&v, xq + t * ldq + k, 4);                                                       \
                    __m512i x4 = _mm512_set1_epi32(v);                                                     \
                    if (KIND == DOT_Q8)                                                                    \
                        x4 = _mm512_mask_sub_epi8(x4, neg, _mm512_setzero_si512(), x4);                    \
                    s[t] = _mm512_dpbusd_epi32(s[t], w, x4);                                               \
                }                                                                                          \
            }                                                                                              \
            const __m512 db = pair_ps(d + b * 8, nb * 8, np);                                              \
            const __m512 mb = KIND == DOT_Q4 ? pair_ps(m + b * 8, nb * 8, np) : _mm512_setzero_ps();       \
            for (int t = 0; t < NT; t++) {                                                                 \
                float *a = acc + t * 16;                                                                   \
                const __m512 scale = _mm512_mul_ps(db, _mm512_set1_ps(sx[t * nb + b]));                    \
                __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]), scale, _mm512_loadu_ps(a));           \
                if (KIND == DOT_Q4)                                                                        \
                    f = _mm512_fmadd_ps(mb, _mm512_set1_ps(xs[t * nb + b]), f);                            \
                _mm512_storeu_ps(a, f);                                                                    \
            }                                                                                              \
        }                                                                                                  \
    }
#define DOT512_ROW(KIND, NP)                                                                               \
    DOT512(KIND, NP, 1) DOT512(KIND, NP, 2) DOT512(KIND, NP, 3) DOT512(KIND, NP, 4)                        \
    DOT512(KIND, NP, 5) DOT512(KIND, NP, 6) DOT512(KIND, NP, 7) DOT512(KIND, NP, 8)
DOT512_ROW(DOT_Q4, 1) DOT512_ROW(DOT_Q4, 2) DOT512_ROW(DOT_Q8, 1) DOT512_ROW(DOT_Q8, 2)

#define DOT_NT 8 /* tokens per tile: 8 accumulators of 16 rows, a quarter of the 32 vector registers */
#define DOT512_FNS(KIND, NP)                                                                               \
    {dot512_##KIND##_##NP##x1, dot512_##KIND##_##NP##x2, dot512_##KIND##_##NP##x3, dot512_##KIND##_##NP##x4, \
     dot512_##KIND##_##NP##x5, dot512_##KIND##_##NP##x6, dot512_##KIND##_##NP##x7, dot512_##KIND##_##NP##x8}
static const dot_fn DOT_Q4_FNS[2][DOT_NT] = {DOT512_FNS(DOT_Q4, 1), DOT512_FNS(DOT_Q4, 2)};
static const dot_fn DOT_Q8_FNS[2][DOT_NT] = {DOT512_FNS(DOT_Q8, 1), DOT512_FNS(DOT_Q8, 2)};
#else
#define DOT_NT 4 /* tokens per tile: 2 panels x 4 tokens of 16-bit sums fill 8 of the 16 vector registers */
static const dot_fn DOT_Q4_FNS[2][DOT_NT] = {{dot_q4_1x1, dot_q4_1x2, dot_q4_1x3, dot_q4_1x4},
                                             {dot_q4_2x1, dot_q4_2x2, dot_q4_2x3, dot_q4_2x4}};
static const dot_fn DOT_Q8_FNS[2][DOT_NT] = {{dot_q8_1x1, dot_q8_1x2, dot_q8_1x3, dot_q8_1x4},
                                             {dot_q8_2x1, dot_q8_2x2, dot_q8_2x3, dot_q8_2x4}};
#endif

/* y[M, N] (row stride ldy) = x[M, K] (row stride ldx) @ W^T with int8 activations, W packed in the dot
 * layout above (kind DOT_Q4 or DOT_Q8). Returns 0; -1 for an unknown kind or K not a multiple of 32;
 * -2 when out of memory. */
int heron_q8_linear(const float *x, int64_t ldx, const uint8_t *q, const float *d, const float *m, int kind,
                    float *y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
    if (K % 32 != 0 || !(kind == DOT_Q4 || kind == DOT_Q8))
        return -1;
    const int64_t nb = K / 32;
    const int64_t panels = (N + 7) / 8;
    const int64_t pairs = (panels + 1) / 2;
    const int64_t qb = kind == DOT_Q4 ? 128 : 256;
    const dot_fn(*fns)[DOT_NT] = kind == DOT_Q4 ? DOT_Q4_FNS : DOT_Q8_FNS;
    int8_t *xq = malloc((size_t)(M * K));
    float *sx = malloc(sizeof(float) * (size_t)(2 * M * nb));
    if (!xq || !sx) {
        free(xq);
        free(sx);
        return -2;
    }
    float *xs = sx + M * nb;
    const int64_t tiles = (M + DOT_NT - 1) / DOT_NT;
    /* A job is a pair of panels times up to 8 tiles of tokens: the pair's weights stay in L1 while
     * the tiles stream past them, and the jobs are coarse enough not to contend on the scheduler. */
    const int64_t chunks = (tiles + 7) / 8;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < M; t++)
            quantize_row_q8(x + t * ldx, K, xq + t * K, sx + t * nb, xs + t * nb);
#pragma omp for schedule(dynamic, 2)
        for (int64_t job = 0; job < pairs * chunks; job++) {
            const int64_t g = job / chunks, c = job % chunks;
            const int64_t p0 = 2 * g;
            const int np = p0 + 1 < panels ? 2 : 1;
            const int64_t n0 = p0 * 8;
            const int64_t nr = N - n0 < 8 * np ? N - n0 : 8 * np;
            for (int64_t t0 = c * 8 * DOT_NT; t0 < M && t0 < (c + 1) * 8 * DOT_NT; t0 += DOT_NT) {
                const int nt = (int)(M - t0 < DOT_NT ? M - t0 : DOT_NT);
                float acc[DOT_NT * 16];
                const float *mp = m ? m + p0 * nb * 8 : NULL;
                fns[np - 1][nt - 1](q + p0 * nb * qb, d + p0 * nb * 8, mp, nb, xq + t0 * K, K, sx + t0 * nb,
                                    xs + t0 * nb, acc);
                for (int t = 0; t < nt; t++)
                    memcpy(y + (t0 + t) * ldy + n0, acc + t * 16, sizeof(float) * nr);
            }
        }
    }
    free(xq);
    free(sx);
    return 0;
}
