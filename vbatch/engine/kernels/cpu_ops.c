/* Fused elementwise kernels of the LLaMA layer for CPUs, called through ctypes (cpu_kernels.py).
 *
 * Rows are `stride` elements apart, each row contiguous; arrays are float32 or bfloat16. In
 * bfloat16 each kernel rounds where the equivalent chain of PyTorch ops (as Hugging Face's
 * LLaMA runs them) rounds, so results match that chain, not just a float32 evaluation:
 *
 *   rms_norm:      [residual <- x + residual]; y = residual (or x);
 *                  out = w * round(y / sqrt(mean(y^2) + eps))
 *   silu_and_mul:  out[i] = round(silu(gate[i])) * up[i], for a row [gate | up]
 *   rotary (NeoX): per head, with c = cos[position], s = sin[position] (tables of head_dim),
 *                  x[i]        <- round(x[i] c[i]) + round(-x[i + h] s[i])
 *                  x[i + h]    <- round(x[i + h] c[i + h]) + round(x[i] s[i + h]),  h = head_dim / 2
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_vec.h"

static inline __attribute__((always_inline)) void rms_norm_impl(
    void *out, int64_t out_stride, const void *x, int64_t x_stride, void *residual,
    int64_t residual_stride, const void *weight, int64_t num_tokens, int64_t hidden, float eps,
    int num_threads, const int is_bf16) {
    const size_t elem = is_bf16 ? 2 : 4;
    const int64_t vec_end = hidden / VEC * VEC;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < num_tokens; t++) {
        const char *x_row = (const char *)x + (size_t)(t * x_stride) * elem;
        char *out_row = (char *)out + (size_t)(t * out_stride) * elem;
        const char *y_row = x_row;
        if (residual != NULL) {   /* residual <- x + residual, rounded as a tensor add */
            char *r_row = (char *)residual + (size_t)(t * residual_stride) * elem;
            for (int64_t i = 0; i < vec_end; i += VEC)
                store_vec(r_row + i * elem, load_vec(x_row + i * elem, is_bf16) +
                          load_vec(r_row + i * elem, is_bf16), is_bf16);
            for (int64_t i = vec_end; i < hidden; i++)
                store_one(r_row, i, load_one(x_row, i, is_bf16) + load_one(r_row, i, is_bf16),
                          is_bf16);
            y_row = r_row;
        }
        vfloat squares = {0};
        for (int64_t i = 0; i < vec_end; i += VEC) {
            const vfloat y = load_vec(y_row + i * elem, is_bf16);
            squares += y * y;
        }
        float sum = horizontal_sum(squares);
        for (int64_t i = vec_end; i < hidden; i++) {
            const float y = load_one(y_row, i, is_bf16);
            sum += y * y;
        }
        const float inv_rms = 1.0f / sqrtf(sum / (float)hidden + eps);
        for (int64_t i = 0; i < vec_end; i += VEC) {
            const vfloat normed = round_vec(load_vec(y_row + i * elem, is_bf16) * inv_rms, is_bf16);
            store_vec(out_row + i * elem, normed * load_vec((const char *)weight + i * elem, is_bf16),
                      is_bf16);
        }
        for (int64_t i = vec_end; i < hidden; i++)
            store_one(out_row, i, round_one(load_one(y_row, i, is_bf16) * inv_rms, is_bf16) *
                      load_one(weight, i, is_bf16), is_bf16);
    }
}

/* sigmoid(x) = 1 / (1 + e^-x) via e^-|x| only (no overflow): for x < 0 it is e^x / (1 + e^x). */
static inline vfloat sigmoid_vec(vfloat x) {
    vuint bits;
    memcpy(&bits, &x, sizeof bits);
    const vuint negative = (vuint)((bits >> 31) == 1u);
    vuint abs_bits = bits & 0x7fffffffu;
    vfloat minus_abs;
    abs_bits |= 0x80000000u;
    memcpy(&minus_abs, &abs_bits, sizeof minus_abs);
    const vfloat e = exp_nonpositive(minus_abs);
    const vfloat positive_value = 1.0f / (1.0f + e);
    const vfloat negative_value = e * positive_value;
    vuint p, n;
    memcpy(&p, &positive_value, sizeof p);
    memcpy(&n, &negative_value, sizeof n);
    const vuint chosen = (p & ~negative) | (n & negative);
    vfloat result;
    memcpy(&result, &chosen, sizeof result);
    return result;
}

static inline float sigmoid_one(float x) {
    const float e = expf(-fabsf(x));
    return x >= 0 ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

static inline __attribute__((always_inline)) void silu_and_mul_impl(
    void *out, int64_t out_stride, const void *x, int64_t x_stride, int64_t num_tokens,
    int64_t width, int num_threads, const int is_bf16) {
    const size_t elem = is_bf16 ? 2 : 4;
    const int64_t vec_end = width / VEC * VEC;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < num_tokens; t++) {
        const char *gate = (const char *)x + (size_t)(t * x_stride) * elem;
        const char *up = gate + (size_t)width * elem;
        char *out_row = (char *)out + (size_t)(t * out_stride) * elem;
        for (int64_t i = 0; i < vec_end; i += VEC) {
            const vfloat g = load_vec(gate + i * elem, is_bf16);
            const vfloat activated = round_vec(g * sigmoid_vec(g), is_bf16);
            store_vec(out_row + i * elem, activated * load_vec(up + i * elem, is_bf16), is_bf16);
        }
        for (int64_t i = vec_end; i < width; i++) {
            const float g = load_one(gate, i, is_bf16);
            store_one(out_row, i, round_one(g * sigmoid_one(g), is_bf16) * load_one(up, i, is_bf16),
                      is_bf16);
        }
    }
}

static inline __attribute__((always_inline)) void rotary_impl(
    void *x, int64_t x_stride, const int64_t *positions, const void *cos_table,
    const void *sin_table, int64_t num_tokens, int64_t num_heads, int64_t head_dim,
    int num_threads, const int is_bf16) {
    const size_t elem = is_bf16 ? 2 : 4;
    const int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < num_tokens; t++) {
        const char *c = (const char *)cos_table + (size_t)(positions[t] * head_dim) * elem;
        const char *s = (const char *)sin_table + (size_t)(positions[t] * head_dim) * elem;
        for (int64_t h = 0; h < num_heads; h++) {
            char *head = (char *)x + (size_t)(t * x_stride + h * head_dim) * elem;
            int64_t i = 0;
            for (; i + VEC <= half; i += VEC) {
                const vfloat x1 = load_vec(head + i * elem, is_bf16);
                const vfloat x2 = load_vec(head + (i + half) * elem, is_bf16);
                const vfloat c1 = load_vec(c + i * elem, is_bf16), s1 = load_vec(s + i * elem, is_bf16);
                const vfloat c2 = load_vec(c + (i + half) * elem, is_bf16);
                const vfloat s2 = load_vec(s + (i + half) * elem, is_bf16);
                store_vec(head + i * elem, round_vec(x1 * c1, is_bf16) + round_vec(-x2 * s1, is_bf16),
                          is_bf16);
                store_vec(head + (i + half) * elem,
                          round_vec(x2 * c2, is_bf16) + round_vec(x1 * s2, is_bf16), is_bf16);
            }
            for (; i < half; i++) {
                const float x1 = load_one(head, i, is_bf16), x2 = load_one(head, i + half, is_bf16);
                store_one(head, i, round_one(x1 * load_one(c, i, is_bf16), is_bf16) +
                          round_one(-x2 * load_one(s, i, is_bf16), is_bf16), is_bf16);
                store_one(head, i + half, round_one(x2 * load_one(c, i + half, is_bf16), is_bf16) +
                          round_one(x1 * load_one(s, i + half, is_bf16), is_bf16), is_bf16);
            }
        }
    }
}

void vbatch_rms_norm_f32(void *out, int64_t out_stride, const void *x, int64_t x_stride,
                        void *residual, int64_t residual_stride, const void *weight,
                        int64_t num_tokens, int64_t hidden, float eps, int num_threads) {
    rms_norm_impl(out, out_stride, x, x_stride, residual, residual_stride, weight, num_tokens,
                  hidden, eps, num_threads, 0);
}

void vbatch_rms_norm_bf16(void *out, int64_t out_stride, const void *x, int64_t x_stride,
                         void *residual, int64_t residual_stride, const void *weight,
                         int64_t num_tokens, int64_t hidden, float eps, int num_threads) {
    rms_norm_impl(out, out_stride, x, x_stride, residual, residual_stride, weight, num_tokens,
                  hidden, eps, num_threads, 1);
}

void vbatch_silu_and_mul_f32(void *out, int64_t out_stride, const void *x, int64_t x_stride,
                             int64_t num_tokens, int64_t width, int num_threads) {
    silu_and_mul_impl(out, out_stride, x, x_stride, num_tokens, width, num_threads, 0);
}

void vbatch_silu_and_mul_bf16(void *out, int64_t out_stride, const void *x, int64_t x_stride,
                              int64_t num_tokens, int64_t width, int num_threads) {
    silu_and_mul_impl(out, out_stride, x, x_stride, num_tokens, width, num_threads, 1);
}

void vbatch_rotary_f32(void *x, int64_t x_stride, const int64_t *positions, const void *cos_table,
                       const void *sin_table, int64_t num_tokens, int64_t num_heads,
                       int64_t head_dim, int num_threads) {
    rotary_impl(x, x_stride, positions, cos_table, sin_table, num_tokens, num_heads, head_dim,
                num_threads, 0);
}

void vbatch_rotary_bf16(void *x, int64_t x_stride, const int64_t *positions, const void *cos_table,
                        const void *sin_table, int64_t num_tokens, int64_t num_heads,
                        int64_t head_dim, int num_threads) {
    rotary_impl(x, x_stride, positions, cos_table, sin_table, num_tokens, num_heads, head_dim,
                num_threads, 1);
}
