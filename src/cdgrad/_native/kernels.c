/* Channel-directed gradient kernels for the CPU (cdgrad).
 *
 * A job is one tensor seen as (B, N, M) in C order; the transform acts along N (the smoothed axis)
 * independently for every (b, m).  Rows of one (b) block are processed in column chunks of CH columns,
 * so the three passes below re-read the chunk from cache, not from memory; full chunks are compiled with
 * the constant width CH so the column loops unroll into vector registers.  dst may equal src.
 *
 * H0 (docs/math.md 1.1):        out = fbar + (f - fbar) * inv + beta * f                 inv = 1/lambda
 * Sobolev (docs/math.md 1.2):   d = f - fbar,  C = cumsum(d) * inv,                        inv = 1/(lambda N^2)
 *                            U[o] = (o+1) mean(C) - sum_{j<o} C[j],
 *                            out = fbar + U - mean(U) + beta * f
 * float32 data is accumulated in float32 along short axes (N <= 1024) and in double along longer ones.
 */
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define CH 64
/* Below this many elements one thread is faster than waking a team (measured on 2 cores). */
#define PARALLEL_MIN (1 << 18)

#define DEFINE_KERNELS(T, A, SUFFIX)                                                                       \
static inline __attribute__((always_inline)) void h0_chunk_##SUFFIX(const T *src, T *dst, int64_t N, int64_t M, int64_t w, double inv,        \
                              double beta) {                                                            \
    A mean[CH];                                                                                    \
    _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) mean[j] = 0.0;                                                      \
    for (int64_t o = 0; o < N; o++) {                                                                   \
        const T *r = src + o * M;                                                                       \
        _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) mean[j] += (A)r[j];                                        \
    }                                                                                                   \
    _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) mean[j] /= (A)N;                                               \
    const A a = (A)(inv + beta), b = (A)(1.0 - inv);                                                                        \
    for (int64_t o = 0; o < N; o++) {                                                                   \
        const T *r = src + o * M;                                                                       \
        T *q = dst + o * M;                                                                             \
        _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) q[j] = (T)(mean[j] * b + a * (A)r[j]);           \
    }                                                                                                   \
}                                                                                                       \
                                                                                                        \
static inline __attribute__((always_inline)) void sobolev_chunk_##SUFFIX(const T *src, T *dst, int64_t N, int64_t M, int64_t w, double inv,   \
                                   double beta) {                                                       \
    A mean[CH], run[CH], s0[CH], s1[CH], mc[CH], base[CH];                                         \
    _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) { mean[j] = 0.0; run[j] = 0.0; s0[j] = 0.0; s1[j] = 0.0; }          \
    for (int64_t o = 0; o < N; o++) {                       /* pass 1: fbar */                          \
        const T *r = src + o * M;                                                                       \
        _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) mean[j] += (A)r[j];                                        \
    }                                                                                                   \
    _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) mean[j] /= (A)N;                                               \
    for (int64_t o = 0; o < N; o++) {                       /* pass 2: sum C[o], sum o*C[o] */          \
        const T *r = src + o * M;                                                                       \
        const A od = (A)o;                                                                    \
        _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) {                                                               \
            run[j] += (A)r[j] - mean[j];                                                           \
            const A c = run[j] * (A)inv;                                                              \
            s0[j] += c;                                                                                 \
            s1[j] += od * c;                                                                            \
        }                                                                                               \
    }                                                                                                   \
    /* mean(C) = s0/N;  sum_o U[o] = mean(C) N(N+1)/2 - sum_j (N-1-j) C[j] */                            \
    const A Nd = (A)N;                                                                        \
    _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) {                                                                   \
        mc[j] = s0[j] / Nd;                                                                             \
        const A sum_u = mc[j] * Nd * (Nd + (A)1) * (A)0.5 - ((Nd - (A)1) * s0[j] - s1[j]);             \
        base[j] = mean[j] - sum_u / Nd;                     /* fbar - mean(U) */                        \
        run[j] = 0.0;                                                                                   \
        s0[j] = 0.0;                                        /* now: sum_{j<o} C[j] */                   \
    }                                                                                                   \
    for (int64_t o = 0; o < N; o++) {                       /* pass 3: output, row by row */            \
        const T *r = src + o * M;                                                                       \
        T *q = dst + o * M;                                                                             \
        const A o1 = (A)(o + 1);                                                              \
        _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) {                                                               \
            const A f = (A)r[j];                                                              \
            q[j] = (T)(base[j] + o1 * mc[j] - s0[j] + (A)beta * f);                                        \
            run[j] += f - mean[j];                                                                      \
            s0[j] += run[j] * (A)inv;                                                                      \
        }                                                                                               \
    }                                                                                                   \
}

DEFINE_KERNELS(float, float, f32)      /* short axes: float accumulation vectorises twice as wide */
DEFINE_KERNELS(float, double, f32d)    /* long axes: float data, double accumulation */
DEFINE_KERNELS(double, double, f64)

#define DISPATCH(W)                                                                                     \
    switch (kinds[i]) {                                                                                 \
    case 0: h0_chunk_f32((const float *)src[i] + off, (float *)dst[i] + off, N, M, W, inv, beta); break;  \
    case 1: h0_chunk_f32d((const float *)src[i] + off, (float *)dst[i] + off, N, M, W, inv, beta); break; \
    case 2: h0_chunk_f64((const double *)src[i] + off, (double *)dst[i] + off, N, M, W, inv, beta); break; \
    case 3: sobolev_chunk_f32((const float *)src[i] + off, (float *)dst[i] + off, N, M, W, inv, beta); break; \
    case 4: sobolev_chunk_f32d((const float *)src[i] + off, (float *)dst[i] + off, N, M, W, inv, beta); break; \
    case 5: sobolev_chunk_f64((const double *)src[i] + off, (double *)dst[i] + off, N, M, W, inv, beta); break; \
    default: break;                                                                                     \
    }

/* kinds[i] = 3 * metric + variant; metric 0 = H0, 1 = Sobolev; variant 0 = f32, 1 = f32d, 2 = f64.
 * dims[3i..3i+2] = (B, N, M); params[2i..2i+1] = (inv, beta); src/dst are addresses. */
int cdg_run(int64_t n, const int64_t *src, const int64_t *dst, const int64_t *dims, const double *params,
            const int32_t *kinds, int32_t nthreads) {
    int64_t total = 0, elements = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t B = dims[3 * i], N = dims[3 * i + 1], M = dims[3 * i + 2];
        if (N > 0) total += B * ((M + CH - 1) / CH);
        elements += B * N * M;
    }
    if (total == 0) return 0;
    int64_t *items = (int64_t *)malloc((size_t)total * 3 * sizeof(int64_t));
    if (!items) return -1;
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t B = dims[3 * i], N = dims[3 * i + 1], M = dims[3 * i + 2];
        if (N == 0) continue;
        for (int64_t b = 0; b < B; b++)
            for (int64_t c = 0; c < M; c += CH) { items[3 * k] = i; items[3 * k + 1] = b; items[3 * k + 2] = c; k++; }
    }
    (void)nthreads;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads) if (elements >= PARALLEL_MIN && nthreads > 1)
#endif
    for (int64_t t = 0; t < total; t++) {
        const int64_t i = items[3 * t], b = items[3 * t + 1], c = items[3 * t + 2];
        const int64_t N = dims[3 * i + 1], M = dims[3 * i + 2];
        const int64_t w = (M - c) < CH ? (M - c) : CH;
        const int64_t off = b * N * M + c;
        const double inv = params[2 * i], beta = params[2 * i + 1];
        if (w == CH) {
            DISPATCH(CH)
        } else {
            DISPATCH(w)
        }
    }
    free(items);
    return 0;
}
