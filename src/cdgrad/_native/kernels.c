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
 * Laplacian (docs/math.md 2):  (I - sigma L) g = f, L the periodic second difference, solved in linear time
 *                            with I - sigma L = (sigma/r) (I - r S)(I - r S^T), S the cyclic shift and
 *                            r = 2 sigma / (1 + 2 sigma + sqrt(1 + 4 sigma)) < 1:  d = f - fbar,
 *                            y[o] = d[o] + r y[o-1],  z[o] = y[o] + r z[o+1] (both periodic),
 *                            out = fbar + (r/sigma) z            params (r, 1 - r, r/sigma)
 * Centralisation (math.md 3): out = f - mean of the row (a job is (B rows, N, 1); each row of length N)
 * float32 data is accumulated in float32 along short axes (N <= 1024) and in double along longer ones, and in
 * double wherever float32 could overflow (entries or parameters near the float32 range); the Laplacian and
 * centralisation always accumulate in double.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define CH 64
/* The rows of the work item after the current one, requested while the current item's last pass runs (the
 * hardware prefetcher follows one stream, not a chunk's many short rows M apart).  Prefetches are hints: an
 * address past the end of memory never faults. */
typedef struct {
    const char *p;
    int64_t rows, stride, width; /* width and stride in bytes */
} ahead_t;

static inline void prefetch_row(ahead_t a, int64_t o) {
    if (o < a.rows)
        for (int64_t b = 0; b < a.width; b += 64) __builtin_prefetch(a.p + o * a.stride + b);
}
/* Below this much work one thread is faster than waking a team (measured on 2 cores).  The work of an element is
 * 1 for the Laplacian solve and the power iteration; 1/16 for H0, Sobolev and centralisation, whose passes run
 * from cache at close to memory speed: on 2 cores two threads were slower for all 55 ResNet-56 conv gradients
 * (0.85 M elements) and 12% faster for all of VGG-16's (14.7 M). */
#define PARALLEL_MIN (1 << 18)
#define LIGHT_WORK 16

/* Whether float accumulation could overflow for entries up to amax: then the double variant runs instead. */
static inline int risky(double amax, double growth, double inv, double beta) {
    return !(amax * growth * (1.0 + inv + fabs(beta)) < 1e36) || !(inv < 1e30) || !(fabs(beta) < 1e30);
}

#define DEFINE_KERNELS(T, A, SUFFIX, SAFE, ABS)                                                                 \
static inline __attribute__((always_inline)) int h0_chunk_##SUFFIX(const T *src, T *dst, int64_t N, int64_t M, int64_t w, double inv,        \
                              double beta, ahead_t ahead) {                                                            \
    A mean[CH], mx[CH];                                                                            \
    _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) { mean[j] = 0.0; mx[j] = 0.0; }                                     \
    for (int64_t o = 0; o < N; o++) {                                                                   \
        const T *r = src + o * M;                                                                       \
        _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) { const A v = (A)r[j], av = ABS(v); mean[j] += v; mx[j] = mx[j] > av ? mx[j] : av; } \
    }                                                                                                   \
    if (SAFE) {                                                                                         \
        A amax = 0.0;                                                                                   \
        for (int64_t j = 0; j < w; j++) amax = amax > mx[j] ? amax : mx[j];                             \
        if (risky((double)amax, (double)N, inv, beta)) return 1;                                      \
    }                                                                                                   \
    _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) mean[j] /= (A)N;                                               \
    const A a = (A)(inv + beta), b = (A)(1.0 - inv);                                                                        \
    for (int64_t o = 0; o < N; o++) {                                                                   \
        const T *r = src + o * M;                                                                       \
        T *q = dst + o * M;                                                                             \
        prefetch_row(ahead, o);                                                                         \
        _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) q[j] = (T)(mean[j] * b + a * (A)r[j]);           \
    }                                                                                                   \
    return 0;                                                                                           \
}                                                                                                       \
                                                                                                        \
static inline __attribute__((always_inline)) int sobolev_chunk_##SUFFIX(const T *src, T *dst, int64_t N, int64_t M, int64_t w, double inv,   \
                                   double beta, ahead_t ahead) {                                                       \
    A mean[CH], run[CH], s0[CH], s1[CH], mc[CH], base[CH];                                         \
    _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) { mean[j] = 0.0; run[j] = 0.0; s0[j] = 0.0; s1[j] = 0.0; }          \
    for (int64_t o = 0; o < N; o++) {                       /* pass 1: fbar (s1: largest |f|) */        \
        const T *r = src + o * M;                                                                       \
        _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) { const A v = (A)r[j], av = ABS(v); mean[j] += v; s1[j] = s1[j] > av ? s1[j] : av; } \
    }                                                                                                   \
    if (SAFE) {                                                                                         \
        A amax = 0.0;                                                                                   \
        for (int64_t j = 0; j < w; j++) amax = amax > s1[j] ? amax : s1[j];                             \
        const double n = (double)N;                                                                     \
        if (risky((double)amax, 4.0 * n * n * n, inv, beta)) return 1; \
    }                                                                                                   \
    _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) s1[j] = 0.0;                                                        \
    _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) mean[j] /= (A)N;                                               \
    for (int64_t o = 0; o < N; o++) {         /* pass 2: sum C[o], sum o*C[o] (C = run * inv: inv applied after) */ \
        const T *r = src + o * M;                                                                       \
        const A od = (A)o;                                                                              \
        _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) {                                          \
            run[j] += (A)r[j] - mean[j];                                                                \
            s0[j] += run[j];                                                                            \
            s1[j] += od * run[j];                                                                       \
        }                                                                                               \
    }                                                                                                   \
    /* mean(C) = s0/N;  sum_o U[o] = mean(C) N(N+1)/2 - sum_j (N-1-j) C[j] */                            \
    const A Nd = (A)N;                                                                                  \
    _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) {                                              \
        s0[j] *= (A)inv;                                                                                \
        s1[j] *= (A)inv;                                                                                \
        mc[j] = s0[j] / Nd;                                                                             \
        const A sum_u = mc[j] * Nd * (Nd + (A)1) * (A)0.5 - ((Nd - (A)1) * s0[j] - s1[j]);             \
        base[j] = mean[j] - sum_u / Nd;                     /* fbar - mean(U) */                        \
        run[j] = 0.0;                                                                                   \
        s0[j] = 0.0;                                        /* now: sum_{j<o} C[j] */                   \
    }                                                                                                   \
    for (int64_t o = 0; o < N; o++) {                       /* pass 3: output, row by row */            \
        const T *r = src + o * M;                                                                       \
        prefetch_row(ahead, o);                                                                         \
        T *q = dst + o * M;                                                                             \
        const A o1 = (A)(o + 1);                                                              \
        _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) {                                                               \
            const A f = (A)r[j];                                                              \
            q[j] = (T)(base[j] + o1 * mc[j] - s0[j] + (A)beta * f);                                        \
            run[j] += f - mean[j];                                                                      \
            s0[j] += run[j] * (A)inv;                                                                      \
        }                                                                                               \
    }                                                                                                   \
    return 0;                                                                                           \
}

DEFINE_KERNELS(float, float, f32, 1, fabsf)  /* short axes: float accumulation vectorises twice as wide */
DEFINE_KERNELS(float, double, f32d, 0, fabs)  /* long axes, or entries near the float32 range: double accumulation */
DEFINE_KERNELS(double, double, f64, 0, fabs)

#define SEG 8     /* chains side by side on one long line */
#define KMAX 512  /* the longest start-up the line solver takes; longer (sigma > ~1e4) uses the exact wrap */

#define DEFINE_LAPLACIAN(T, SUFFIX)                                                                     \
static void laplacian_line_##SUFFIX(const T *, T *, int64_t, int64_t, int64_t, double, double, double);   \
static inline __attribute__((always_inline)) void laplacian_chunk_##SUFFIX(const T *src, T *dst, int64_t N, int64_t M, int64_t w,          \
                                     double r, double omr, double c) {                                  \
    double mean[CH], y[CH];                                                                             \
    const double lr0 = log1p(-omr);                                                                     \
    if (w == 1 && lr0 < 0.0 && -41.6 / lr0 < (double)KMAX && 2.0 * ceil(-41.6 / lr0) * SEG <= (double)N) {  \
        laplacian_line_##SUFFIX(src, dst, N, M, (int64_t)ceil(-41.6 / lr0), r, omr, c);                 \
        return;                                                                                         \
    }                                                                                                   \
    _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) { mean[j] = 0.0; y[j] = 0.0; }                  \
    for (int64_t o = 0; o < N; o++) {                       /* pass 1: fbar */                          \
        const T *q = src + o * M;                                                                       \
        _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) mean[j] += (double)q[j];                   \
    }                                                                                                   \
    _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) mean[j] /= (double)N;                          \
    /* r^K < 2^-60: terms further away do not change a double; 1 - r^N computed without cancellation */ \
    const double lr = log1p(-omr);                                                                      \
    const int64_t K = (lr < 0.0 && -41.6 / lr < (double)N) ? (int64_t)ceil(-41.6 / lr) : N;             \
    const double wrap = -1.0 / expm1((double)N * lr);      /* 1 / (1 - r^N) */                          \
    const double keep = 0.5 * omr, unkeep = 1.0 / keep;   /* y is kept as y (1 - r) / 2: |.| <= max |f| */ \
    for (int64_t o = N - K; o < N; o++) {                   /* y[-1] = sum_k r^k d[N-1-k] / (1 - r^N) */ \
        const T *q = src + o * M;                                                                       \
        _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) y[j] = y[j] * r + ((double)q[j] - mean[j]); \
    }                                                                                                   \
    _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) y[j] *= wrap;                                  \
    for (int64_t o = 0; o < N; o++) {                       /* pass 2: y, kept in dst */                \
        const T *q = src + o * M;                                                                       \
        T *p = dst + o * M;                                                                             \
        _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) { y[j] = ((double)q[j] - mean[j]) + r * y[j]; p[j] = (T)(y[j] * keep); } \
    }                                                                                                   \
    _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) y[j] = 0.0;                                    \
    for (int64_t o = K - 1; o >= 0; o--) {                  /* z[N] = z[0] = sum_k r^k y[k] / (1 - r^N) */ \
        const T *p = dst + o * M;                                                                       \
        _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) y[j] = y[j] * r + (double)p[j] * unkeep;   \
    }                                                                                                   \
    _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) y[j] *= wrap;                                  \
    for (int64_t o = N - 1; o >= 0; o--) {                  /* pass 3: z, out = fbar + c z */           \
        T *p = dst + o * M;                                                                             \
        _Pragma("GCC ivdep") for (int64_t j = 0; j < w; j++) { y[j] = (double)p[j] * unkeep + r * y[j]; p[j] = (T)(mean[j] + c * y[j]); } \
    }                                                                                                   \
}                                                                                                       \
                                                                                                        \
/* One long line (w = 1): SEG independent chains, each started KMAX-truncated from zero K steps before its segment
 * (r^K < 2^-60, so the start is exact in double), run side by side so that their latencies overlap.  The K inputs
 * before each segment are copied first, so the chains may run in any order, in place or not. */                   \
static void laplacian_line_##SUFFIX(const T *src, T *dst, int64_t N, int64_t M, int64_t K, double r, double omr,    \
                                    double c) {                                                                     \
    double acc[SEG] = {0.0}, y[SEG], warm[SEG][KMAX];                                                               \
    const int64_t L = N / SEG, rest = N - SEG * L;                                                                  \
    for (int64_t t = 0; t < L; t++)                                                                                 \
        for (int s = 0; s < SEG; s++) acc[s] += (double)src[(s * L + t) * M];                                       \
    for (int64_t o = SEG * L; o < N; o++) acc[0] += (double)src[o * M];                                            \
    double total = 0.0;                                                                                             \
    for (int s = 0; s < SEG; s++) total += acc[s];                                                                  \
    const double mean = total / (double)N, keep = 0.5 * omr, unkeep = 1.0 / keep;                                   \
    for (int s = 0; s < SEG; s++)                           /* forward: y[o] = d[o] + r y[o-1] */                   \
        for (int64_t i = 0; i < K; i++) warm[s][i] = (double)src[((s * L - K + i + N) % N) * M] - mean;            \
    for (int s = 0; s < SEG; s++) {                                                                                 \
        y[s] = 0.0;                                                                                                 \
        for (int64_t i = 0; i < K; i++) y[s] = warm[s][i] + r * y[s];                                               \
    }                                                                                                               \
    for (int64_t t = 0; t < L; t++)                                                                                 \
        for (int s = 0; s < SEG; s++) {                                                                            \
            const int64_t o = (s * L + t) * M;                                                                      \
            y[s] = ((double)src[o] - mean) + r * y[s];                                                              \
            dst[o] = (T)(y[s] * keep);                                                                              \
        }                                                                                                           \
    for (int64_t o = SEG * L; o < N; o++) {                                                                         \
        y[SEG - 1] = ((double)src[o * M] - mean) + r * y[SEG - 1];                                                  \
        dst[o * M] = (T)(y[SEG - 1] * keep);                                                                        \
    }                                                                                                               \
    for (int s = 0; s < SEG; s++) {                         /* backward: z[o] = y[o] + r z[o+1] */                  \
        const int64_t end = s == SEG - 1 ? N : (s + 1) * L;                                                         \
        for (int64_t i = 0; i < K; i++) warm[s][i] = (double)dst[((end + K - 1 - i) % N) * M] * unkeep;            \
    }                                                                                                               \
    for (int s = 0; s < SEG; s++) {                                                                                 \
        y[s] = 0.0;                                                                                                 \
        for (int64_t i = 0; i < K; i++) y[s] = warm[s][i] + r * y[s];                                               \
    }                                                                                                               \
    for (int64_t o = N - 1; o >= SEG * L; o--) {                                                                    \
        y[SEG - 1] = (double)dst[o * M] * unkeep + r * y[SEG - 1];                                                  \
        dst[o * M] = (T)(mean + c * y[SEG - 1]);                                                                    \
    }                                                                                                               \
    (void)rest;                                                                                                     \
    for (int64_t t = L - 1; t >= 0; t--)                                                                            \
        for (int s = 0; s < SEG; s++) {                                                                            \
            const int64_t o = (s * L + t) * M;                                                                      \
            y[s] = (double)dst[o] * unkeep + r * y[s];                                                              \
            dst[o] = (T)(mean + c * y[s]);                                                                          \
        }                                                                                                           \
}                                                                                                                   \
                                                                                                                    \
static void centralize_rows_##SUFFIX(const T *src, T *dst, int64_t rows, int64_t L) {                   \
    for (int64_t b = 0; b < rows; b++) {                                                                \
        const T *q = src + b * L;                                                                       \
        T *p = dst + b * L;                                                                             \
        double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};                                       \
        int64_t l = 0;                                                                                  \
        for (; l + 8 <= L; l += 8) {                                                                    \
            _Pragma("GCC ivdep") for (int t = 0; t < 8; t++) acc[t] += (double)q[l + t];                \
        }                                                                                               \
        for (; l < L; l++) acc[0] += (double)q[l];                                                      \
        const double mean = (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))) / (double)L; \
        _Pragma("GCC ivdep") for (int64_t k = 0; k < L; k++) p[k] = (T)((double)q[k] - mean);            \
    }                                                                                                   \
}

DEFINE_LAPLACIAN(float, f32)
DEFINE_LAPLACIAN(double, f64)

#define DISPATCH(W)                                                                                     \
    switch (kind) {                                                                                 \
    case 0: { if (h0_chunk_f32((const float *)src[i] + off, (float *)dst[i] + off, N, M, W, inv, beta, ahead)) h0_chunk_f32d((const float *)src[i] + off, (float *)dst[i] + off, N, M, W, inv, beta, ahead); } break;  \
    case 1: h0_chunk_f32d((const float *)src[i] + off, (float *)dst[i] + off, N, M, W, inv, beta, ahead); break; \
    case 2: h0_chunk_f64((const double *)src[i] + off, (double *)dst[i] + off, N, M, W, inv, beta, ahead); break; \
    case 3: { if (sobolev_chunk_f32((const float *)src[i] + off, (float *)dst[i] + off, N, M, W, inv, beta, ahead)) sobolev_chunk_f32d((const float *)src[i] + off, (float *)dst[i] + off, N, M, W, inv, beta, ahead); } break; \
    case 4: sobolev_chunk_f32d((const float *)src[i] + off, (float *)dst[i] + off, N, M, W, inv, beta, ahead); break; \
    case 5: sobolev_chunk_f64((const double *)src[i] + off, (double *)dst[i] + off, N, M, W, inv, beta, ahead); break; \
    case 6: case 7: laplacian_chunk_f32((const float *)src[i] + off, (float *)dst[i] + off, N, M, W, p[0], p[1], p[2]); break; \
    case 8: laplacian_chunk_f64((const double *)src[i] + off, (double *)dst[i] + off, N, M, W, p[0], p[1], p[2]); break; \
    default: break;                                                                                     \
    }

#define ROWS 16 /* centralisation: rows per work item */

/* A job as the caller packs it once per tensor layout (56 bytes, native byte order): kind = 3 * metric +
 * variant, metric 0 = H0, 1 = Sobolev, 2 = Laplacian, 3 = centralisation, variant 0 = f32, 1 = f32d, 2 = f64;
 * (B, N, M) the C-ordered layout with the smoothed axis N (centralisation: (rows, row length, 1)); (p0, p1, p2) =
 * (inv, beta, unused) or, for the Laplacian, (r, 1 - r, r / sigma). */
typedef struct {
    int64_t B, N, M;
    double p0, p1, p2;
    int32_t kind, unused;
} job_t;

/* A work item: rows b.. of job i (centralisation: ROWS rows; otherwise row block b) and columns c .. c + CH. */
static int has_items(const job_t *j) { return j->B > 0 && j->N > 0 && j->M > 0; }

/* The item after (i, b, c) in job order; i = n after the last. */
static void next_item(const job_t *job, int64_t n, int64_t *i, int64_t *b, int64_t *c) {
    const job_t *j = job + *i;
    if (j->kind >= 9) {
        if ((*b += ROWS) < j->B) return;
    } else {
        if ((*c += CH) < j->M) return;
        *c = 0;
        if (++*b < j->B) return;
    }
    *b = 0;
    *c = 0;
    do ++*i; while (*i < n && !has_items(job + *i));
}

/* The rows of item (i, b, c) for prefetching, when it is a column chunk. */
static ahead_t ahead_of(const job_t *job, const int64_t *src, int64_t n, int64_t i, int64_t b, int64_t c) {
    if (i >= n || job[i].kind >= 9) return (ahead_t){NULL, 0, 0, 0};
    const int64_t size = job[i].kind % 3 == 2 ? 8 : 4, N = job[i].N, M = job[i].M;
    return (ahead_t){(const char *)src[i] + (b * N * M + c) * size, N, M * size, (M - c < CH ? M - c : CH) * size};
}

static void run_item(const job_t *j, int64_t src_address, int64_t dst_address, int64_t b, int64_t c, ahead_t ahead) {
    const int64_t N = j->N, M = j->M;
    const int32_t kind = j->kind;
    if (kind >= 9) {
        const int64_t rows = (j->B - b) < ROWS ? (j->B - b) : ROWS;
        if (kind == 11)
            centralize_rows_f64((const double *)src_address + b * N, (double *)dst_address + b * N, rows, N);
        else
            centralize_rows_f32((const float *)src_address + b * N, (float *)dst_address + b * N, rows, N);
        return;
    }
    const int64_t *src = &src_address, *dst = &dst_address, i = 0;  /* the names DISPATCH uses */
    const int64_t w = (M - c) < CH ? (M - c) : CH, off = b * N * M + c;
    const double p[3] = {j->p0, j->p1, j->p2}, inv = p[0], beta = p[1];
    if (w == CH) {
        DISPATCH(CH)
    } else {
        DISPATCH(w)
    }
}

/* n jobs: job[i] on the memory at src[i], written to dst[i] (which may equal src[i]).  Small batches, or one
 * thread, run item after item with no work list; larger ones are shared among nthreads OpenMP threads. */
int cdg_run(int64_t n, const int64_t *src, const int64_t *dst, const job_t *job, int32_t nthreads) {
    int64_t total = 0, work = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!has_items(job + i)) continue;
        total += job[i].kind >= 9 ? (job[i].B + ROWS - 1) / ROWS : job[i].B * ((job[i].M + CH - 1) / CH);
        const int64_t count = job[i].B * job[i].N * job[i].M;
        work += job[i].kind >= 6 && job[i].kind < 9 ? count : count / LIGHT_WORK;
    }
    if (total == 0) return 0;
    int64_t i = 0, b = 0, c = 0;
    while (!has_items(job + i)) i++;
#ifdef _OPENMP
    if (work >= PARALLEL_MIN && nthreads > 1) {
        int64_t *items = (int64_t *)malloc((size_t)total * 3 * sizeof(int64_t));
        if (!items) return -1;
        for (int64_t k = 0; k < total; k++, next_item(job, n, &i, &b, &c)) {
            items[3 * k] = i; items[3 * k + 1] = b; items[3 * k + 2] = c;
        }
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads)
        for (int64_t t = 0; t < total; t++) {
            const int64_t k = items[3 * t];
            const ahead_t ahead = t + 1 < total ? ahead_of(job, src, n, items[3 * t + 3], items[3 * t + 4], items[3 * t + 5])
                                                : (ahead_t){NULL, 0, 0, 0};
            run_item(job + k, src[k], dst[k], items[3 * t + 1], items[3 * t + 2], ahead);
        }
        free(items);
        return 0;
    }
#endif
    (void)nthreads;
    while (i < n) {
        int64_t i2 = i, b2 = b, c2 = c;
        next_item(job, n, &i2, &b2, &c2);
        run_item(job + i, src[i], dst[i], b, c, ahead_of(job, src, n, i2, b2, c2));
        i = i2, b = b2, c = c2;
    }
    return 0;
}

/* One job (the pure functions): no address arrays to build on the caller's side. */
int cdg_run_one(int64_t src, int64_t dst, const job_t *job, int32_t nthreads) {
    return cdg_run(1, &src, &dst, job, nthreads);
}

/* Per-frequency power iteration (cdgrad.norm_bounds.conv_norm_power, per_frequency=True), vectorised across
 * frequencies and computed from the kernel itself: K holds the O x I x T taps (C order, T = kh kw of the folded
 * kernel), B the half-spectrum DFT basis as (T, 2, Fp): cos, then -sin of the phase of tap t at frequency f,
 * zero for the padding f >= F (Fp a multiple of the vector width), so that
 * P[f][o, i] = sum_t K[o, i, t] (B[t, 0, f] + i B[t, 1, f]).  x holds F complex vectors of length I
 * (interleaved re, im; updated in place).  At each frequency, `iters` times: z = P x, y = P^H z, x = y / ||y||;
 * ratio[f] = ||y||^2 / ||z||^2 of the last one.  One vector (GCC vector extension) holds CF frequencies: the
 * chunk's spectrum is built in a per-thread buffer and every product is one vector operation across it. */
#define DEFINE_POWER(T, SUFFIX, CF)                                                                           \
typedef T vec_##SUFFIX __attribute__((vector_size(CF * sizeof(T)), aligned(sizeof(T))));                      \
static void power_chunk_##SUFFIX(const T *K, const T *B, T *x, double *ratio, int64_t Fp, int64_t O, int64_t I, \
                                 int64_t taps, int32_t iters, int64_t w, vec_##SUFFIX *work) {                \
    typedef vec_##SUFFIX V;                                                                                   \
    V *spec = work, *xr = spec + 2 * O * I, *xi = xr + I, *yr = xi + I, *yi = yr + I, *zr = yi + I, *zi = zr + O; \
    const V zero = {0};                                                                                       \
    int64_t k = 0;                                                  /* the chunk's spectrum */                \
    for (; k + 4 <= O * I; k += 4) {                                /* four entries: eight independent sums */ \
        V r0 = zero, i0 = zero, r1 = zero, i1 = zero, r2 = zero, i2 = zero, r3 = zero, i3 = zero;             \
        const T *q = K + k * taps;                                                                            \
        for (int64_t t = 0; t < taps; t++) {                                                                  \
            const V c = *(const V *)(B + 2 * t * Fp), s = *(const V *)(B + (2 * t + 1) * Fp);                 \
            r0 += q[t] * c; i0 += q[t] * s; r1 += q[taps + t] * c; i1 += q[taps + t] * s;                     \
            r2 += q[2 * taps + t] * c; i2 += q[2 * taps + t] * s; r3 += q[3 * taps + t] * c; i3 += q[3 * taps + t] * s; \
        }                                                                                                     \
        spec[2 * k] = r0; spec[2 * k + 1] = i0; spec[2 * k + 2] = r1; spec[2 * k + 3] = i1;                   \
        spec[2 * k + 4] = r2; spec[2 * k + 5] = i2; spec[2 * k + 6] = r3; spec[2 * k + 7] = i3;               \
    }                                                                                                         \
    for (; k < O * I; k++) {                                                                                  \
        V re = zero, im = zero;                                                                               \
        for (int64_t t = 0; t < taps; t++) {                                                                  \
            re += K[k * taps + t] * *(const V *)(B + 2 * t * Fp);                                             \
            im += K[k * taps + t] * *(const V *)(B + (2 * t + 1) * Fp);                                       \
        }                                                                                                     \
        spec[2 * k] = re; spec[2 * k + 1] = im;                                                               \
    }                                                                                                         \
    for (int64_t i = 0; i < I; i++) {                                                                         \
        xr[i] = zero; xi[i] = zero;                                                                           \
        for (int64_t f = 0; f < w; f++) { xr[i][f] = x[2 * (f * I + i)]; xi[i][f] = x[2 * (f * I + i) + 1]; }  \
    }                                                                                                         \
    V zn = zero, yn = zero;                                                                                   \
    for (int32_t it = 0; it < iters; it++) {                                                                  \
        zn = zero; yn = zero;                                                                                 \
        for (int64_t o = 0; o < O; o++) {                           /* z = P x */                             \
            V rr = zero, ii = zero, ri = zero, ir = zero;                                                     \
            const V *p = spec + 2 * o * I;                                                                    \
            for (int64_t i = 0; i < I; i++) {                                                                 \
                rr += p[2 * i] * xr[i]; ii += p[2 * i + 1] * xi[i];                                           \
                ri += p[2 * i] * xi[i]; ir += p[2 * i + 1] * xr[i];                                           \
            }                                                                                                 \
            zr[o] = rr - ii; zi[o] = ri + ir;                                                                 \
            zn += zr[o] * zr[o] + zi[o] * zi[o];                                                              \
        }                                                                                                     \
        for (int64_t i = 0; i < I; i++) {                           /* y = P^H z */                           \
            V a = zero, b = zero, c = zero, d = zero;                                                         \
            for (int64_t o = 0; o < O; o++) {                                                                 \
                const V *p = spec + 2 * (o * I + i);                                                          \
                a += p[0] * zr[o]; b += p[1] * zi[o]; c += p[0] * zi[o]; d += p[1] * zr[o];                   \
            }                                                                                                 \
            yr[i] = a + b; yi[i] = c - d;                                                                     \
            yn += yr[i] * yr[i] + yi[i] * yi[i];                                                              \
        }                                                                                                     \
        V scale = zero;                                                                                       \
        for (int64_t f = 0; f < CF; f++) scale[f] = yn[f] > 0 ? (T)(1.0 / sqrt((double)yn[f])) : (T)0;        \
        for (int64_t i = 0; i < I; i++) { xr[i] = yr[i] * scale; xi[i] = yi[i] * scale; }                     \
    }                                                                                                         \
    for (int64_t i = 0; i < I; i++)                                                                           \
        for (int64_t f = 0; f < w; f++) { x[2 * (f * I + i)] = xr[i][f]; x[2 * (f * I + i) + 1] = xi[i][f]; }  \
    for (int64_t f = 0; f < w; f++) ratio[f] = zn[f] > 0 ? (double)yn[f] / (double)zn[f] : 0.0;               \
}                                                                                                             \
                                                                                                              \
static void power_##SUFFIX(const T *K, const T *B, T *x, double *ratio, int64_t F, int64_t O, int64_t I,     \
                           int64_t taps, int32_t iters, int32_t nthreads, int *failed) {                      \
    const int64_t Fp = (F + CF - 1) / CF * CF;                                                                \
    (void)nthreads;                                                                                           \
    _Pragma("omp parallel num_threads(nthreads) if (F * O * I >= PARALLEL_MIN && nthreads > 1)")              \
    {                                                                                                         \
        vec_##SUFFIX *work = (vec_##SUFFIX *)malloc((size_t)(4 * I + 2 * O + 2 * O * I) * sizeof(vec_##SUFFIX)); \
        if (!work) *failed = 1;                                                                               \
        _Pragma("omp for schedule(static)")                                                                   \
        for (int64_t f0 = 0; f0 < F; f0 += CF) {                                                              \
            if (work)                                                                                         \
                power_chunk_##SUFFIX(K, B + f0, x + 2 * f0 * I, ratio + f0, Fp, O, I, taps, iters,             \
                                     F - f0 < CF ? F - f0 : CF, work);                                        \
        }                                                                                                     \
        free(work);                                                                                           \
    }                                                                                                         \
}

DEFINE_POWER(float, f32, 16)
DEFINE_POWER(double, f64, 8)

/* Fp = F rounded up to a multiple of the vector width: 16 (float) or 8 (double); B has Fp columns. */
int cdg_power_width(int32_t is_double) { return is_double ? 8 : 16; }

int cdg_power(int64_t F, int64_t O, int64_t I, int64_t taps, int64_t kernel, int64_t basis, int64_t x, int64_t ratio,
              int32_t iters, int32_t is_double, int32_t nthreads) {
    int failed = 0;
    if (is_double)
        power_f64((const double *)kernel, (const double *)basis, (double *)x, (double *)ratio, F, O, I, taps, iters,
                  nthreads, &failed);
    else
        power_f32((const float *)kernel, (const float *)basis, (float *)x, (double *)ratio, F, O, I, taps, iters,
                  nthreads, &failed);
    return failed ? -1 : 0;
}
