/* Paged attention and KV-cache writes for CPUs, called through ctypes (cpu_kernels.py).
 *
 * Layouts (element type float32 or bfloat16, the model's dtype):
 *   k_cache, v_cache  [num_kv_heads, num_blocks, block_size, head_dim], contiguous
 *   q, out            [num_tokens, num_heads, head_dim], rows `q_stride` / `out_stride` apart
 *   block_tables      [num_seqs, block_table_stride] int64: a sequence's cache blocks, in order
 *   token_seq         [num_tokens] int64: the block_tables row of each query token
 *   token_context     [num_tokens] int64: keys visible to the token (cache positions 0..n-1)
 *
 * Query head h uses KV head h / (num_heads / num_kv_heads). For each token and KV head the
 * group's query heads are computed together, so each cached key/value row is read once:
 *   out = softmax(scale * q K^T) V over the token's visible keys, all arithmetic in float32
 * (two passes: scores, then exp-normalised weights times values).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_vec.h"

/* One query head of one token against its visible keys: out = softmax(scale q K^T) V.
 * `nvec` (head_dim / VEC) is a compile-time constant in each caller below, so q and the
 * accumulator live in registers. `scores` has room for max_context floats. */
static inline __attribute__((always_inline)) void attend_one_head(
    void *out_row, const void *q_row, const char *k_head, const char *v_head,
    const int64_t *blocks, int64_t context, int64_t block_size, float scale, float *scores,
    const int64_t nvec, const int is_bf16) {
    const size_t elem = is_bf16 ? 2 : 4;
    const size_t row_bytes = (size_t)nvec * VEC * elem;
    vfloat query[nvec], acc[nvec];
    for (int64_t x = 0; x < nvec; x++) {
        query[x] = load_vec((const char *)q_row + (size_t)x * VEC * elem, is_bf16) * scale;
        acc[x] = (vfloat){0};
    }
    /* pass 1: scores (four keys at a time, so their lane sums share one reduction tree) */
    float max_score = -3.0e38f;
    for (int64_t first = 0; first < context; first += block_size) {
        const char *key = k_head + (size_t)(blocks[first / block_size] * block_size) * row_bytes;
        const int64_t n = context - first < block_size ? context - first : block_size;
        int64_t j = 0;
        for (; j + 4 <= n; j += 4, key += 4 * row_bytes) {
            vfloat dots[4];
            for (int k = 0; k < 4; k++) {
                const char *row = key + (size_t)k * row_bytes;
                dots[k] = query[0] * load_vec(row, is_bf16);
                for (int64_t x = 1; x < nvec; x++)
                    dots[k] += query[x] * load_vec(row + (size_t)x * VEC * elem, is_bf16);
            }
            horizontal_sum4(dots[0], dots[1], dots[2], dots[3], scores + first + j);
        }
        for (; j < n; j++, key += row_bytes) {
            vfloat dot = query[0] * load_vec(key, is_bf16);
            for (int64_t x = 1; x < nvec; x++)
                dot += query[x] * load_vec(key + (size_t)x * VEC * elem, is_bf16);
            scores[first + j] = horizontal_sum(dot);
        }
    }
    for (int64_t j = 0; j < context; j++) max_score = scores[j] > max_score ? scores[j] : max_score;
    /* softmax numerators, VEC at a time (the tail padded with -inf-like values) */
    vfloat sum_vec = {0};
    const int64_t padded = (context + VEC - 1) / VEC * VEC;
    for (int64_t j = context; j < padded; j++) scores[j] = -1.0e30f;
    for (int64_t j = 0; j < padded; j += VEC) {
        vfloat s;
        memcpy(&s, scores + j, sizeof s);
        s = exp_nonpositive(s - max_score);
        memcpy(scores + j, &s, sizeof s);
        sum_vec += s;
    }
    const float inv_total = 1.0f / horizontal_sum(sum_vec);
    /* pass 2: acc = sum_j p_j v_j */
    for (int64_t first = 0; first < context; first += block_size) {
        const char *value = v_head + (size_t)(blocks[first / block_size] * block_size) * row_bytes;
        const int64_t n = context - first < block_size ? context - first : block_size;
        for (int64_t j = 0; j < n; j++, value += row_bytes) {
            const float p = scores[first + j];
            for (int64_t x = 0; x < nvec; x++)
                acc[x] += p * load_vec(value + (size_t)x * VEC * elem, is_bf16);
        }
    }
    for (int64_t x = 0; x < nvec; x++)
        store_vec((char *)out_row + (size_t)x * VEC * elem, acc[x] * inv_total, is_bf16);
}

/* Ask for a task's cached keys and values ahead of time: its blocks are scattered, so the
 * hardware prefetcher cannot guess them, and waiting on each row's first cache line dominated
 * the kernel. Issued one task ahead, they arrive while the current task computes. */
static inline void prefetch_task(const char *k_head, const char *v_head, const int64_t *blocks,
                                 int64_t context, int64_t block_size, size_t row_bytes) {
    for (int64_t first = 0; first < context; first += block_size) {
        const size_t offset = (size_t)(blocks[first / block_size] * block_size) * row_bytes;
        const int64_t n = context - first < block_size ? context - first : block_size;
        for (size_t byte = 0; byte < (size_t)n * row_bytes; byte += 64) {
            __builtin_prefetch(k_head + offset + byte, 0, 2);
            __builtin_prefetch(v_head + offset + byte, 0, 2);
        }
    }
}

static inline __attribute__((always_inline)) void attention_impl(
    void *out, int64_t out_stride, const void *q, int64_t q_stride, const void *k_cache,
    const void *v_cache, const int64_t *block_tables, int64_t block_table_stride,
    const int64_t *token_seq, const int64_t *token_context, int64_t num_tokens,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t num_blocks,
    int64_t block_size, int64_t max_context, float scale, int num_threads, const int is_bf16) {
    const int64_t group = num_heads / num_kv_heads;
    const size_t elem = is_bf16 ? 2 : 4;
    const size_t head_bytes = (size_t)(num_blocks * block_size * head_dim) * elem;
    const int64_t num_tasks = num_tokens * num_kv_heads;
    const size_t scores_size = (size_t)((max_context + VEC) / VEC * VEC);
#pragma omp parallel num_threads(num_threads)
    {
        float *scores = aligned_alloc(sizeof(vfloat), sizeof(float) * scores_size);
#pragma omp for schedule(dynamic, 4)
        for (int64_t task = 0; task < num_tasks; task++) {
            const int64_t t = task / num_kv_heads, kv_head = task % num_kv_heads;
            if (task + 1 < num_tasks) {
                const int64_t next_t = (task + 1) / num_kv_heads;
                const int64_t next_head = (task + 1) % num_kv_heads;
                prefetch_task((const char *)k_cache + next_head * head_bytes,
                              (const char *)v_cache + next_head * head_bytes,
                              block_tables + token_seq[next_t] * block_table_stride,
                              token_context[next_t], block_size, (size_t)head_dim * elem);
            }
            const int64_t *blocks = block_tables + token_seq[t] * block_table_stride;
            const char *k_head = (const char *)k_cache + kv_head * head_bytes;
            const char *v_head = (const char *)v_cache + kv_head * head_bytes;
            for (int64_t g = 0; g < group; g++) {
                const int64_t head = kv_head * group + g;
                const void *q_row = (const char *)q + (size_t)(t * q_stride + head * head_dim) * elem;
                void *out_row = (char *)out + (size_t)(t * out_stride + head * head_dim) * elem;
#define ATTEND(NVEC) attend_one_head(out_row, q_row, k_head, v_head, blocks, token_context[t], \
                                     block_size, scale, scores, NVEC, is_bf16)
                switch (head_dim / VEC) {
                    case 4: ATTEND(4); break;     /* head_dim 64 */
                    case 8: ATTEND(8); break;     /* head_dim 128 */
                    default: ATTEND(head_dim / VEC);
                }
#undef ATTEND
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
                                int64_t max_context, float scale, int num_threads) {
    attention_impl(out, out_stride, q, q_stride, k_cache, v_cache, block_tables,
                   block_table_stride, token_seq, token_context, num_tokens, num_heads,
                   num_kv_heads, head_dim, num_blocks, block_size, max_context, scale,
                   num_threads, 0);
}

void vbatch_paged_attention_bf16(void *out, int64_t out_stride, const void *q, int64_t q_stride,
                                 const void *k_cache, const void *v_cache,
                                 const int64_t *block_tables, int64_t block_table_stride,
                                 const int64_t *token_seq, const int64_t *token_context,
                                 int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
                                 int64_t head_dim, int64_t num_blocks, int64_t block_size,
                                 int64_t max_context, float scale, int num_threads) {
    attention_impl(out, out_stride, q, q_stride, k_cache, v_cache, block_tables,
                   block_table_stride, token_seq, token_context, num_tokens, num_heads,
                   num_kv_heads, head_dim, num_blocks, block_size, max_context, scale,
                   num_threads, 1);
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
