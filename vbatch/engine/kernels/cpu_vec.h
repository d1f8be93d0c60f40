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
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

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
#ifndef VEC
#define VEC 16
#endif
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

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector) && VEC == 16
#define VBATCH_HAVE_SHUFFLE 1
#endif
#endif

#ifdef VBATCH_HAVE_SHUFFLE
/* Sum of the lanes, halving in registers. */
static inline float horizontal_sum(vfloat v) {
    const vfloat h = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15,
                                                 0, 0, 0, 0, 0, 0, 0, 0);
    const vfloat q = h + __builtin_shufflevector(h, h, 4, 5, 6, 7, 0, 0, 0, 0,
                                                 0, 0, 0, 0, 0, 0, 0, 0);
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* The lane sums of four vectors at once (a transposing tree: 4 shuffle-add levels for all four
 * instead of one each). */
static inline void horizontal_sum4(vfloat a, vfloat b, vfloat c, vfloat d, float sums[4]) {
    const vfloat ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7,
                                              16, 17, 18, 19, 20, 21, 22, 23) +
                      __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15,
                                              24, 25, 26, 27, 28, 29, 30, 31);
    const vfloat cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7,
                                              16, 17, 18, 19, 20, 21, 22, 23) +
                      __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15,
                                              24, 25, 26, 27, 28, 29, 30, 31);
    /* ab = [a: 8 partials | b: 8], cd likewise -> [a: 4 | b: 4 | c: 4 | d: 4] */
    const vfloat abcd = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11,
                                                16, 17, 18, 19, 24, 25, 26, 27) +
                        __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15,
                                                20, 21, 22, 23, 28, 29, 30, 31);
    const vfloat pairs = abcd + __builtin_shufflevector(abcd, abcd, 2, 3, 0, 1, 6, 7, 4, 5,
                                                        10, 11, 8, 9, 14, 15, 12, 13);
    sums[0] = pairs[0] + pairs[1];
    sums[1] = pairs[4] + pairs[5];
    sums[2] = pairs[8] + pairs[9];
    sums[3] = pairs[12] + pairs[13];
}
#else
static inline float horizontal_sum(vfloat v) {
    float total = 0.0f;
    for (int i = 0; i < VEC; i++) total += v[i];
    return total;
}

static inline void horizontal_sum4(vfloat a, vfloat b, vfloat c, vfloat d, float sums[4]) {
    sums[0] = horizontal_sum(a);
    sums[1] = horizontal_sum(b);
    sums[2] = horizontal_sum(c);
    sums[3] = horizontal_sum(d);
}
#endif

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

/* float32 lanes rounded to the nearest bfloat16 (ties to even), still as float32 bit patterns
 * (low 16 bits zero); NaN stays a quiet NaN. */
static inline __attribute__((always_inline)) vuint bf16_round_bits(vfloat v) {
    vuint bits;
    memcpy(&bits, &v, sizeof bits);
    const vuint is_nan = (vuint)((bits & 0x7fffffffu) > 0x7f800000u);
    const vuint rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    return (rounded & ~is_nan) | ((bits | 0x400000u) & is_nan);
}

/* The VEC lanes rounded to bfloat16, packed (one instruction where AVX512-BF16 has it). */
static inline __attribute__((always_inline)) vhalf to_bf16_vec(vfloat v) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && VEC == 16
    __m512 lanes;
    memcpy(&lanes, &v, sizeof lanes);
    const __m256bh packed = _mm512_cvtneps_pbh(lanes);
    vhalf h;
    memcpy(&h, &packed, sizeof h);
    return h;
#else
    return __builtin_convertvector(bf16_round_bits(v) >> 16, vhalf);
#endif
}

/* Lane-wise store, rounding to bfloat16 when the array is bfloat16. */
static inline __attribute__((always_inline)) void store_vec(void *dst, vfloat v, const int is_bf16) {
    if (is_bf16) {
        const vhalf h = to_bf16_vec(v);
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
    const vuint bits = __builtin_convertvector(to_bf16_vec(v), vuint) << 16;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) float round_one(float x, const int is_bf16) {
    return is_bf16 ? bf16_to_float(float_to_bf16(x)) : x;
}

#endif
