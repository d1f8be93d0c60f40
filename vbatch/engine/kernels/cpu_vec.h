/* Float32 vectors and bfloat16 conversions shared by the CPU kernels.
 *
 * vfloat holds VEC float32 lanes through GCC/Clang vector extensions, which compile to whatever
 * the target offers (AVX-512, AVX2, NEON, ...). Element arrays are float32 or bfloat16 (the
 * model's dtype), chosen by `is_bf16`; callers pass it as a compile-time constant into
 * always-inline code, so each dtype gets its own straight-line loop. */
#ifndef VBATCH_CPU_VEC_H
#define VBATCH_CPU_VEC_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest even, like torch; NaN stays a (quiet) NaN. */
static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* Vectors of VEC float32 lanes (GCC/Clang vector extensions: AVX-512, AVX2, NEON... as the
 * target allows). The kernel needs head_dim % VEC == 0 (cpu_kernels.py checks). */
#define VEC 16
typedef float vfloat __attribute__((vector_size(VEC * sizeof(float))));
typedef uint16_t vhalf __attribute__((vector_size(VEC * sizeof(uint16_t))));
typedef uint32_t vuint __attribute__((vector_size(VEC * sizeof(uint32_t))));
typedef int32_t vint __attribute__((vector_size(VEC * sizeof(int32_t))));

static inline __attribute__((always_inline)) vfloat load_vec(const void *src, const int is_bf16) {
    vfloat f;
    if (is_bf16) {
        vhalf h;
        memcpy(&h, src, sizeof h);
        vuint bits = __builtin_convertvector(h, vuint) << 16;
        memcpy(&f, &bits, sizeof f);
    } else {
        memcpy(&f, src, sizeof f);
    }
    return f;
}

typedef float vfloat_half __attribute__((vector_size(VEC / 2 * sizeof(float))));
typedef float vfloat_quarter __attribute__((vector_size(VEC / 4 * sizeof(float))));

/* Sum of the lanes as a tree of halvings (a serial chain of VEC adds would stall the loop). */
static inline float horizontal_sum(vfloat v) {
    vfloat_half lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
    lo += hi;
    vfloat_quarter a, b;
    memcpy(&a, &lo, sizeof a);
    memcpy(&b, (const char *)&lo + sizeof a, sizeof b);
    a += b;
    return (a[0] + a[2]) + (a[1] + a[3]);
}

/* e^x for x <= 0 lane-wise (softmax weights): e^x = 2^n e^r with n = round(x / ln 2) and
 * |r| <= ln(2)/2, e^r by its degree-7 Taylor polynomial (relative error ~1e-7, float32's own
 * rounding). Lanes below -87 (where float32 would go subnormal) give exactly 0. */
static inline vfloat exp_nonpositive(vfloat x) {
    const vint underflow = x < -87.0f;            /* all-ones lanes where true */
    vint x_bits;
    memcpy(&x_bits, &x, sizeof x_bits);
    x_bits &= ~underflow;                         /* underflowing lanes -> 0.0, fixed below */
    memcpy(&x, &x_bits, sizeof x);
    const vint n_int = __builtin_convertvector(x * 1.44269504f - 0.5f, vint);  /* x <= 0 */
    const vfloat n = __builtin_convertvector(n_int, vfloat);
    const vfloat r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    vfloat p = r * (1.0f / 5040) + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vint bits;
    memcpy(&bits, &p, sizeof bits);
    bits = (bits + (n_int << 23)) & ~underflow;
    memcpy(&p, &bits, sizeof p);
    return p;
}

/* Round-to-nearest-even float32 -> bfloat16 lane-wise (NaN stays NaN), stored to dst. */
static inline __attribute__((always_inline)) void store_vec(void *dst, vfloat v, const int is_bf16) {
    if (is_bf16) {
        vuint bits;
        memcpy(&bits, &v, sizeof bits);
        const vuint is_nan = (bits & 0x7fffffffu) > 0x7f800000u;
        const vuint rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
        const vuint quiet = (bits >> 16) | 0x40u;
        const vhalf h = __builtin_convertvector((rounded & ~is_nan) | (quiet & is_nan), vhalf);
        memcpy(dst, &h, sizeof h);
    } else {
        memcpy(dst, &v, sizeof v);
    }
}

/* Element i of a float32 or bfloat16 array, as float32; and the store back (rounded). */
static inline __attribute__((always_inline)) float load_one(const void *src, int64_t i,
                                                            const int is_bf16) {
    return is_bf16 ? bf16_to_float(((const uint16_t *)src)[i]) : ((const float *)src)[i];
}

static inline __attribute__((always_inline)) void store_one(void *dst, int64_t i, float x,
                                                            const int is_bf16) {
    if (is_bf16) ((uint16_t *)dst)[i] = float_to_bf16(x);
    else ((float *)dst)[i] = x;
}

/* x rounded to the element type and back (the rounding a bf16 tensor op applies). */
static inline __attribute__((always_inline)) vfloat round_vec(vfloat v, const int is_bf16) {
    if (!is_bf16) return v;
    uint16_t tmp[VEC];
    store_vec(tmp, v, 1);
    return load_vec(tmp, 1);
}

static inline __attribute__((always_inline)) float round_one(float x, const int is_bf16) {
    return is_bf16 ? bf16_to_float(float_to_bf16(x)) : x;
}

#endif
