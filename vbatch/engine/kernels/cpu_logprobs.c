/* What log-probabilities need from a logits row, in two reads of it (cpu_kernels.py calls it).
 *
 * For each row x (V float32 or bfloat16 entries, rows `stride` elements apart):
 *   top[0..k-1]  the k largest entries, largest first; among equal values the lower index first
 *   max          = top[0]
 *   log_sum      = log(sum_i exp(x_i - max))
 * so that log_softmax(x)_i = (x_i - max) - log_sum, as torch's CPU log_softmax evaluates it.
 * Pass 1 finds the top k: a vector compare against the current k-th value skips nearly every
 * chunk, so it costs about one read; pass 2 sums the exponentials (the row is in cache by then).
 * A NaN never enters the top entries; it makes log_sum NaN (as it makes log_softmax's output).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_vec.h"

/* Insert (value, id) into the descending list of `count` entries (capacity k), after any equal
 * values (ids arrive in increasing order, so the lower id stays first). */
static inline void insert_top(float *values, int64_t *ids, int64_t *count, int64_t k,
                              float value, int64_t id) {
    int64_t pos = *count < k ? *count : k - 1;
    if (*count == k && !(value > values[k - 1])) return;
    while (pos > 0 && value > values[pos - 1]) {
        values[pos] = values[pos - 1];
        ids[pos] = ids[pos - 1];
        pos--;
    }
    values[pos] = value;
    ids[pos] = id;
    if (*count < k) (*count)++;
}

static inline __attribute__((always_inline)) void logprob_stats_impl(
    const void *logits, int64_t stride, int64_t rows, int64_t vocab, int64_t k,
    float *out_max, float *out_log_sum, int64_t *top_ids, float *top_values, int num_threads,
    const int is_bf16) {
    const size_t elem = is_bf16 ? 2 : 4;
    const int64_t vec_end = vocab / VEC * VEC;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)logits + (size_t)(r * stride) * elem;
        float *values = top_values + r * k;
        int64_t *ids = top_ids + r * k;
        int64_t count = 0;
        for (int64_t i = 0; i < vec_end; i += VEC) {
            const vfloat x = load_vec(row + i * elem, is_bf16);
            if (count == k) {
                const vint above = x > values[k - 1];
                int any = 0;
                for (int lane = 0; lane < VEC; lane++) any |= above[lane];
                if (!any) continue;
            }
            for (int lane = 0; lane < VEC; lane++)
                if (x[lane] == x[lane]) insert_top(values, ids, &count, k, x[lane], i + lane);
        }
        for (int64_t i = vec_end; i < vocab; i++) {
            const float x = load_one(row, i, is_bf16);
            if (x == x) insert_top(values, ids, &count, k, x, i);
        }
        for (int64_t j = count; j < k; j++) {   /* fewer than k non-NaN entries */
            values[j] = NAN;
            ids[j] = 0;
        }
        const float max = count > 0 ? values[0] : NAN;
        vfloat sums = {0};
        vint is_nan = {0};
        for (int64_t i = 0; i < vec_end; i += VEC) {
            const vfloat x = load_vec(row + i * elem, is_bf16);
            is_nan |= x != x;
            sums += exp_nonpositive(x - max);
        }
        float sum = horizontal_sum(sums);
        int any_nan = 0;
        for (int lane = 0; lane < VEC; lane++) any_nan |= is_nan[lane] != 0;
        for (int64_t i = vec_end; i < vocab; i++) {
            const float x = load_one(row, i, is_bf16);
            any_nan |= x != x;
            sum += expf(x - max);
        }
        out_max[r] = max;
        out_log_sum[r] = any_nan ? NAN : logf(sum);
    }
}

void vbatch_logprob_stats_f32(const void *logits, int64_t stride, int64_t rows, int64_t vocab,
                              int64_t k, float *out_max, float *out_log_sum, int64_t *top_ids,
                              float *top_values, int num_threads) {
    logprob_stats_impl(logits, stride, rows, vocab, k, out_max, out_log_sum, top_ids, top_values,
                       num_threads, 0);
}

void vbatch_logprob_stats_bf16(const void *logits, int64_t stride, int64_t rows, int64_t vocab,
                               int64_t k, float *out_max, float *out_log_sum, int64_t *top_ids,
                               float *top_values, int num_threads) {
    logprob_stats_impl(logits, stride, rows, vocab, k, out_max, out_log_sum, top_ids, top_values,
                       num_threads, 1);
}
