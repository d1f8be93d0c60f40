/* Paged attention and KV-cache writes for CPUs, called through ctypes (cpu_kernels.py).
 *
 * Layouts (element type float32 or bfloat16, the model's dtype):
 *   k_cache, v_cache  [num_kv_heads, num_blocks, block_size, head_dim], contiguous
 *   q, out            [num_tokens, num_heads, head_dim], rows `q_stride` / `out_stride` apart
 *   block_tables      [num_seqs, block_table_stride] int64: a sequence's cache blocks, in order
 *   token_seq         [num_tokens] int64: the block_tables row of each query token
 *   token_context     [num_tokens] int64: the token's causal context n (its position + 1)
 *
 * A token sees cache positions begin..n-1, begin = max(0, n - window) (window 0: begin = 0;
 * Hugging Face's sliding window, key k visible to query p iff p - window < k <= p). Keys
 * before begin, whole blocks included, are never read, so a window also saves their work.
 *
 * Query head h uses KV head h / (num_heads / num_kv_heads). For each token and KV head the
 * group's query heads are computed together (up to four at a time), so each cached key/value
 * row is read once per four heads; the next task's blocks are prefetched meanwhile:
 *   out = softmax(scale * q K^T) V over the token's visible keys, all arithmetic in float32
 * (two passes: scores, then exp-normalised weights times values). With softcap c > 0 each
 * score s = scale q.k becomes c tanh(s / c) before the softmax (Gemma 2's logit soft-capping).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_vec.h"

/* tanh lane-wise, within 3 float32 ulps (checked against double tanh on [-12, 12]): the odd
 * Taylor polynomial through x^9 below |x| = 1/4 (truncation < 1e-8 relative), above it
 * sign(x) (1 - t) / (1 + t) with t = e^(-2|x|) (there 1 - t >= 0.39, so exp's ~1e-7 error does
 * not grow); |x| > 43.5 gives exactly +-1. */
static inline vfloat tanh_vec(vfloat x) {
    vint bits;
    memcpy(&bits, &x, sizeof bits);
    const vint sign = bits & (int32_t)0x80000000u;
    const vint abs_bits = bits & 0x7fffffff;
    vfloat a;
    memcpy(&a, &abs_bits, sizeof a);
    const vfloat t = exp_nonpositive(-2.0f * a);
    const vfloat large = (1.0f - t) / (1.0f + t);
    const vfloat a2 = a * a;
    const vfloat small =
        a + a * a2 * (-1.0f / 3 + a2 * (2.0f / 15 + a2 * (-17.0f / 315 + a2 * (62.0f / 2835))));
    const vint use_small = a < 0.25f;
    vint small_bits, large_bits;
    memcpy(&small_bits, &small, sizeof small_bits);
    memcpy(&large_bits, &large, sizeof large_bits);
    const vint result_bits = ((small_bits & use_small) | (large_bits & ~use_small)) | sign;
    vfloat result;
    memcpy(&result, &result_bits, sizeof result);
    return result;
}

/* `heads` query heads (consecutive rows of head_dim in q and out) of one token that share one
 * KV head, against the token's visible keys (positions begin..context-1):
 * out_h = softmax(cap(scale q_h K^T)) V, cap(s) = softcap tanh(s / softcap) (s if softcap is 0).
 * Each cached key/value row is loaded and converted once for all of them. `heads` and `nvec`
 * (head_dim / VEC) are compile-time constants in each caller, so q and the accumulators stay in
 * registers.
 * `scores` has room for heads * padded (context - begin) floats, indexed from begin. */
static inline __attribute__((always_inline)) void attend_heads(
    char *out_row, const char *q_row, const char *k_head, const char *v_head,
    const int64_t *blocks, int64_t begin, int64_t context, int64_t block_size, float scale,
    float softcap, float *scores, const int64_t heads, const int64_t nvec, const int is_bf16) {
    const size_t elem = is_bf16 ? 2 : 4;
    const size_t vec_bytes = (size_t)VEC * elem;
    const size_t row_bytes = (size_t)nvec * vec_bytes;
    const int64_t count = context - begin;
    const int64_t padded = (count + VEC - 1) / VEC * VEC;
    vfloat query[heads][nvec], acc[heads][nvec];
    for (int64_t h = 0; h < heads; h++)
        for (int64_t x = 0; x < nvec; x++) {
            query[h][x] = load_vec(q_row + h * row_bytes + x * vec_bytes, is_bf16) * scale;
            acc[h][x] = (vfloat){0};
        }
    /* pass 1: scores, four keys at a time (their lane sums share one reduction tree); each
     * iteration covers the visible keys first..first+n-1 of one block (the first block from
     * `skip` on). One division per call: one per block measurably slowed long prefills. */
    for (int64_t block = begin / block_size, skip = begin % block_size;
         block * block_size < context; block++, skip = 0) {
        const int64_t first = block * block_size + skip;
        const int64_t n = context - first < block_size - skip ? context - first : block_size - skip;
        const char *key = k_head + (size_t)(blocks[block] * block_size + skip) * row_bytes;
        float *block_scores = scores + (first - begin);
        int64_t j = 0;
        for (; j + 4 <= n; j += 4, key += 4 * row_bytes) {
            vfloat dots[heads][4];
            for (int64_t h = 0; h < heads; h++)
                for (int k = 0; k < 4; k++) dots[h][k] = (vfloat){0};
            for (int k = 0; k < 4; k++)
                for (int64_t x = 0; x < nvec; x++) {
                    const vfloat kx = load_vec(key + k * row_bytes + x * vec_bytes, is_bf16);
                    for (int64_t h = 0; h < heads; h++) dots[h][k] += query[h][x] * kx;
                }
            for (int64_t h = 0; h < heads; h++)
                horizontal_sum4(dots[h][0], dots[h][1], dots[h][2], dots[h][3],
                                block_scores + h * padded + j);
        }
        for (; j < n; j++, key += row_bytes) {
            vfloat dots[heads];
            for (int64_t h = 0; h < heads; h++) dots[h] = (vfloat){0};
            for (int64_t x = 0; x < nvec; x++) {
                const vfloat kx = load_vec(key + x * vec_bytes, is_bf16);
                for (int64_t h = 0; h < heads; h++) dots[h] += query[h][x] * kx;
            }
            for (int64_t h = 0; h < heads; h++)
                block_scores[h * padded + j] = horizontal_sum(dots[h]);
        }
    }
    /* softmax numerators per head, VEC at a time (the tail padded with -inf-like values) */
    float inv_total[heads];
    for (int64_t h = 0; h < heads; h++) {
        float *s = scores + h * padded;
        if (softcap > 0.0f)     /* the tail past count is overwritten below */
            for (int64_t j = 0; j < padded; j += VEC) {
                vfloat v;
                memcpy(&v, s + j, sizeof v);
                v = softcap * tanh_vec(v / softcap);
                memcpy(s + j, &v, sizeof v);
            }
        float max_score = s[0];
        for (int64_t j = 1; j < count; j++) max_score = s[j] > max_score ? s[j] : max_score;
        for (int64_t j = count; j < padded; j++) s[j] = -1.0e30f;
        vfloat sum_vec = {0};
        for (int64_t j = 0; j < padded; j += VEC) {
            vfloat v;
            memcpy(&v, s + j, sizeof v);
            v = exp_nonpositive(v - max_score);
            memcpy(s + j, &v, sizeof v);
            sum_vec += v;
        }
        inv_total[h] = 1.0f / horizontal_sum(sum_vec);
    }
    /* pass 2: acc_h = sum_j p_hj v_j */
    for (int64_t block = begin / block_size, skip = begin % block_size;
         block * block_size < context; block++, skip = 0) {
        const int64_t first = block * block_size + skip;
        const int64_t n = context - first < block_size - skip ? context - first : block_size - skip;
        const char *value = v_head + (size_t)(blocks[block] * block_size + skip) * row_bytes;
        const float *block_scores = scores + (first - begin);
        for (int64_t j = 0; j < n; j++, value += row_bytes) {
            float p[heads];
            for (int64_t h = 0; h < heads; h++) p[h] = block_scores[h * padded + j];
            for (int64_t x = 0; x < nvec; x++) {
                const vfloat vx = load_vec(value + x * vec_bytes, is_bf16);
                for (int64_t h = 0; h < heads; h++) acc[h][x] += p[h] * vx;
            }
        }
    }
    for (int64_t h = 0; h < heads; h++)
        for (int64_t x = 0; x < nvec; x++)
            store_vec(out_row + h * row_bytes + x * vec_bytes, acc[h][x] * inv_total[h], is_bf16);
}

/* Up to MAX_HEADS_TOGETHER heads per call: beyond that the accumulators would not fit in the
 * 32 vector registers of AVX-512 anyway. */
#define MAX_HEADS_TOGETHER 4

/* attend_heads with `heads` (1..4) and nvec specialised for the common head sizes. */
static inline __attribute__((always_inline)) void attend_heads_dispatch(
    char *out_row, const char *q_row, const char *k_head, const char *v_head,
    const int64_t *blocks, int64_t begin, int64_t context, int64_t block_size, float scale,
    float softcap, float *scores, int64_t heads, int64_t nvec, const int is_bf16) {
#define ATTEND(H, N) attend_heads(out_row, q_row, k_head, v_head, blocks, begin, context, \
                                  block_size, scale, softcap, scores, H, N, is_bf16)
#define FOR_HEADS(N)                \
    switch (heads) {                \
        case 1: ATTEND(1, N); break; \
        case 2: ATTEND(2, N); break; \
        case 3: ATTEND(3, N); break; \
        default: ATTEND(4, N);       \
    }
    switch (nvec) {
        case 4: FOR_HEADS(4); break;     /* head_dim 64 */
        case 8: FOR_HEADS(8); break;     /* head_dim 128 */
        default: FOR_HEADS(nvec);
    }
#undef FOR_HEADS
#undef ATTEND
}

/* Ask for a task's cached keys and values ahead of time: its blocks are scattered, so the
 * hardware prefetcher cannot guess them, and waiting on each row's first cache line dominated
 * the kernel. Issued one task ahead, they arrive while the current task computes. */
static inline void prefetch_task(const char *k_head, const char *v_head, const int64_t *blocks,
                                 int64_t begin, int64_t context, int64_t block_size,
                                 size_t row_bytes) {
    /* whole blocks from the one holding `begin` */
    for (int64_t first = begin - begin % block_size; first < context; first += block_size) {
        const size_t offset = (size_t)(blocks[first / block_size] * block_size) * row_bytes;
        const int64_t n = context - first < block_size ? context - first : block_size;
        for (size_t byte = 0; byte < (size_t)n * row_bytes; byte += 64) {
            __builtin_prefetch(k_head + offset + byte, 0, 2);
            __builtin_prefetch(v_head + offset + byte, 0, 2);
        }
    }
}

/* The first key position a token with causal context `context` sees (see the top). */
static inline int64_t window_begin(int64_t context, int64_t window) {
    return window > 0 && context > window ? context - window : 0;
}

static inline __attribute__((always_inline)) void attention_impl(
    void *out, int64_t out_stride, const void *q, int64_t q_stride, const void *k_cache,
    const void *v_cache, const int64_t *block_tables, int64_t block_table_stride,
    const int64_t *token_seq, const int64_t *token_context, int64_t num_tokens,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t num_blocks,
    int64_t block_size, int64_t max_context, float scale, int64_t window, float softcap,
    int num_threads, const int is_bf16) {
    const int64_t group = num_heads / num_kv_heads;
    const size_t elem = is_bf16 ? 2 : 4;
    const size_t head_bytes = (size_t)(num_blocks * block_size * head_dim) * elem;
    const int64_t num_tasks = num_tokens * num_kv_heads;
    const size_t scores_size = (size_t)((max_context + VEC) / VEC * VEC) * MAX_HEADS_TOGETHER;
#pragma omp parallel num_threads(num_threads)
    {
        float *scores = aligned_alloc(sizeof(vfloat), sizeof(float) * scores_size);
#pragma omp for schedule(dynamic, 4)
        for (int64_t task = 0; task < num_tasks; task++) {
            const int64_t t = task / num_kv_heads, kv_head = task % num_kv_heads;
            if (task + 1 < num_tasks) {
                const int64_t next_t = (task + 1) / num_kv_heads;
                const int64_t next_head = (task + 1) % num_kv_heads;
                const int64_t next_context = token_context[next_t];
                prefetch_task((const char *)k_cache + next_head * head_bytes,
                              (const char *)v_cache + next_head * head_bytes,
                              block_tables + token_seq[next_t] * block_table_stride,
                              window_begin(next_context, window), next_context, block_size,
                              (size_t)head_dim * elem);
            }
            const int64_t context = token_context[t], begin = window_begin(context, window);
            const int64_t *blocks = block_tables + token_seq[t] * block_table_stride;
            const char *k_head = (const char *)k_cache + kv_head * head_bytes;
            const char *v_head = (const char *)v_cache + kv_head * head_bytes;
            for (int64_t g = 0; g < group; g += MAX_HEADS_TOGETHER) {
                const int64_t head = kv_head * group + g;
                const int64_t heads = group - g < MAX_HEADS_TOGETHER ? group - g : MAX_HEADS_TOGETHER;
                attend_heads_dispatch(
                    (char *)out + (size_t)(t * out_stride + head * head_dim) * elem,
                    (const char *)q + (size_t)(t * q_stride + head * head_dim) * elem, k_head,
                    v_head, blocks, begin, context, block_size, scale, softcap, scores, heads,
                    head_dim / VEC, is_bf16);
            }
        }
        free(scores);
    }
}

void vbatch_paged_attention_f32(void *out, int64_t out_stride, const void *q, int64_t q_stride,
                                const void *k_cache, const void *v_cache,
                                const int64_t *block_tables, int64_t block_table_stride,
                                const int64_t *token_seq, const int64_t *token_context,
                                int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
                                int64_t head_dim, int64_t num_blocks, int64_t block_size,
                                int64_t max_context, float scale, int64_t window,
                                float softcap, int num_threads) {
    attention_impl(out, out_stride, q, q_stride, k_cache, v_cache, block_tables,
                   block_table_stride, token_seq, token_context, num_tokens, num_heads,
                   num_kv_heads, head_dim, num_blocks, block_size, max_context, scale, window,
                   softcap, num_threads, 0);
}

void vbatch_paged_attention_bf16(void *out, int64_t out_stride, const void *q, int64_t q_stride,
                                 const void *k_cache, const void *v_cache,
                                 const int64_t *block_tables, int64_t block_table_stride,
                                 const int64_t *token_seq, const int64_t *token_context,
                                 int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
                                 int64_t head_dim, int64_t num_blocks, int64_t block_size,
                                 int64_t max_context, float scale, int64_t window,
                                 float softcap, int num_threads) {
    attention_impl(out, out_stride, q, q_stride, k_cache, v_cache, block_tables,
                   block_table_stride, token_seq, token_context, num_tokens, num_heads,
                   num_kv_heads, head_dim, num_blocks, block_size, max_context, scale, window,
                   softcap, num_threads, 1);
}

/* k_cache/v_cache slot s of KV head h <- row t of k/v (rows `k_stride` / `v_stride` elements
 * apart, heads contiguous within a row), for every token t with slot_mapping[t] = s. */
void vbatch_write_kv_cache(void *k_cache, void *v_cache, const void *k, int64_t k_stride,
                           const void *v, int64_t v_stride, const int64_t *slot_mapping,
                           int64_t num_tokens, int64_t num_kv_heads, int64_t head_dim,
                           int64_t num_slots, int64_t elem_size) {
    const size_t row_bytes = (size_t)(head_dim * elem_size);
    for (int64_t t = 0; t < num_tokens; t++) {
        const int64_t slot = slot_mapping[t];
        for (int64_t h = 0; h < num_kv_heads; h++) {
            const int64_t dst = (h * num_slots + slot) * head_dim * elem_size;
            memcpy((char *)k_cache + dst, (const char *)k + (t * k_stride + h * head_dim) * elem_size,
                   row_bytes);
            memcpy((char *)v_cache + dst, (const char *)v + (t * v_stride + h * head_dim) * elem_size,
                   row_bytes);
        }
    }
}
