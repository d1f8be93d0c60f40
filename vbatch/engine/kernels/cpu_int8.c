/* The elementwise halves of a dynamic W8A8 linear layer on CPU (parallel/int8_linear.py), called
 * through ctypes (cpu_kernels.py); the int8 GEMM between them stays torch._int_mm (oneDNN).
 *
 * Both reproduce int8_linear.py's PyTorch expressions bit for bit:
 *
 *   quantize_rows:  per row of x (float32 or bfloat16, rows `x_stride` elements apart),
 *                   s = max(max_k |x_k|, float32(1e-12)) / 127,
 *                   q_k = clamp(round_half_even(x_k / s), -127, 127)            (int8)
 *                   (torch: x.float().abs().amax().clamp_(min=1e-12).div_(127), then
 *                    round(x / s).clamp_(-127, 127).to(int8))
 *   dequant_int32:  out[m, n] = ((float)acc[m, n] * x_scale[m]) * w_scale[n] (+ bias[n]),
 *                   each step rounded to float32 in that order, then (bfloat16 output) rounded
 *                   to nearest even, as torch's acc.float().mul_(s_x).mul_(s_w).add_(b).to(dt)
 *
 * Bit-equality needs every product and sum rounded on its own: GCC contracts a * b + c into an
 * FMA across statements by default (-ffp-contract=fast), so this file turns contraction off.
 * The quotient x / s is a true division (no reciprocal: x * (1 / s) differs in the last bit).
 * A row holding a NaN gets a NaN scale (as torch's amax gives); its int8 values are then
 * unspecified, as torch's float -> int8 cast of NaN is.
 */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_vec.h"

#define QMAX 127
/* Below this many elements a call runs on the calling thread (an OpenMP team costs more). */
#define PARALLEL_MIN_ELEMENTS 32768

typedef int8_t vchar __attribute__((vector_size(VEC * sizeof(int8_t))));

/* 1.5 * 2^23: for |v| <= 2^22, v + MAGIC is an integer-valued float whose low mantissa bits
 * hold round_half_even(v) (under the default rounding mode), i.e. nearbyintf lane-wise. */
#define ROUND_MAGIC 12582912.0f
#define ROUND_MAGIC_BITS 0x4B400000

static inline __attribute__((always_inline)) vuint abs_bits_vec(const void *src,
                                                                const int is_bf16) {
    const vfloat v = load_vec(src, is_bf16);
    vuint bits;
    memcpy(&bits, &v, sizeof bits);
    return bits & 0x7fffffffu;
}

static inline __attribute__((always_inline)) void quantize_rows_impl(
    int8_t *q, float *scales, const void *x, int64_t x_stride, int64_t rows, int64_t cols,
    int num_threads, const int is_bf16) {
    const size_t elem = is_bf16 ? 2 : 4;
    const int64_t vec_end = cols / VEC * VEC;
    const float eps = (float)1e-12;   /* torch's clamp_(min=1e-12) on a float32 tensor */
#pragma omp parallel for num_threads(num_threads) schedule(static) \
    if (rows > 1 && rows * cols >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)x + (size_t)(r * x_stride) * elem;
        int8_t *q_row = q + r * cols;
        /* max |x|: non-negative floats order as their bit patterns (a NaN, above +inf, wins
         * and makes the scale NaN, as torch's amax propagates it) */
        vuint max_bits = {0};
        for (int64_t i = 0; i < vec_end; i += VEC) {
            const vuint a = abs_bits_vec(row + i * elem, is_bf16);
            const vuint greater = (vuint)(a > max_bits);
            max_bits = (a & greater) | (max_bits & ~greater);
        }
        uint32_t amax_bits = 0;
        for (int j = 0; j < VEC; j++)
            if (max_bits[j] > amax_bits) amax_bits = max_bits[j];
        for (int64_t i = vec_end; i < cols; i++) {
            const float v = load_one(row, i, is_bf16);
            uint32_t bits;
            memcpy(&bits, &v, sizeof bits);
            bits &= 0x7fffffffu;
            if (bits > amax_bits) amax_bits = bits;
        }
        float amax;
        memcpy(&amax, &amax_bits, sizeof amax);
        const float scale = (amax < eps ? eps : amax) / (float)QMAX;   /* NaN stays NaN */
        scales[r] = scale;
        for (int64_t i = 0; i < vec_end; i += VEC) {
            const vfloat rounded = load_vec(row + i * elem, is_bf16) / scale + ROUND_MAGIC;
            vint k;
            memcpy(&k, &rounded, sizeof k);
            k -= ROUND_MAGIC_BITS;
            const vint low = (vint)(k < -QMAX), high = (vint)(k > QMAX);
            k = (k & ~low) | (-QMAX & low);
            k = (k & ~high) | (QMAX & high);
            const vchar packed = __builtin_convertvector(k, vchar);
            memcpy(q_row + i, &packed, sizeof packed);
        }
        for (int64_t i = vec_end; i < cols; i++) {
            float v = nearbyintf(load_one(row, i, is_bf16) / scale);
            v = v < -QMAX ? -QMAX : v > QMAX ? QMAX : v;
            q_row[i] = (int8_t)(v == v ? v : 0.0f);
        }
    }
}

static inline __attribute__((always_inline)) void dequant_int32_impl(
    void *out, int64_t out_stride, const int32_t *acc, int64_t rows, int64_t cols,
    const float *x_scales, const float *w_scales, const float *bias, int num_threads,
    const int is_bf16) {
    const size_t elem = is_bf16 ? 2 : 4;
    const int64_t vec_end = cols / VEC * VEC;
#pragma omp parallel for num_threads(num_threads) schedule(static) \
    if (rows > 1 && rows * cols >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *acc_row = acc + r * cols;
        char *out_row = (char *)out + (size_t)(r * out_stride) * elem;
        const float s_x = x_scales[r];
        for (int64_t i = 0; i < vec_end; i += VEC) {
            vint a;
            memcpy(&a, acc_row + i, sizeof a);
            vfloat s_w;
            memcpy(&s_w, w_scales + i, sizeof s_w);
            vfloat y = __builtin_convertvector(a, vfloat) * s_x;
            y = y * s_w;
            if (bias != NULL) {
                vfloat b;
                memcpy(&b, bias + i, sizeof b);
                y = y + b;
            }
            store_vec(out_row + i * elem, y, is_bf16);
        }
        for (int64_t i = vec_end; i < cols; i++) {
            float y = (float)acc_row[i] * s_x;
            y = y * w_scales[i];
            if (bias != NULL) y = y + bias[i];
            store_one(out_row, i, y, is_bf16);
        }
    }
}

void vbatch_quantize_rows_f32(int8_t *q, float *scales, const void *x, int64_t x_stride,
                              int64_t rows, int64_t cols, int num_threads) {
    quantize_rows_impl(q, scales, x, x_stride, rows, cols, num_threads, 0);
}

void vbatch_quantize_rows_bf16(int8_t *q, float *scales, const void *x, int64_t x_stride,
                               int64_t rows, int64_t cols, int num_threads) {
    quantize_rows_impl(q, scales, x, x_stride, rows, cols, num_threads, 1);
}

void vbatch_dequant_int32_f32(void *out, int64_t out_stride, const int32_t *acc, int64_t rows,
                              int64_t cols, const float *x_scales, const float *w_scales,
                              const float *bias, int num_threads) {
    dequant_int32_impl(out, out_stride, acc, rows, cols, x_scales, w_scales, bias, num_threads, 0);
}

void vbatch_dequant_int32_bf16(void *out, int64_t out_stride, const int32_t *acc, int64_t rows,
                               int64_t cols, const float *x_scales, const float *w_scales,
                               const float *bias, int num_threads) {
    dequant_int32_impl(out, out_stride, acc, rows, cols, x_scales, w_scales, bias, num_threads, 1);
}
