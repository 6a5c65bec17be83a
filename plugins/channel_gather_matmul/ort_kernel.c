/* chmc::ChannelGatherMatMul for ONNX Runtime's CPU provider: a custom-op library.

       y[b, s, c] = sum_i x[b, s, i] * bank[index[expert_id[b], c], c, i]

   x [B, S, in] float, bank [K, out, in] float, index [N, out] int32, expert_id [B] int64.

   Why native: standard ONNX ops cannot read an expert's weight rows in place. Gather copies
   W_e on every call (2.5x dense at batch-1 decode); computing every bank then selecting reads
   K x the bytes. Here every output channel's row is read straight from its group's bank
   through the index table, so a step reads the bytes a dense model reads.

   Two paths, picked per call:
   - few rows (decode): per channel, each distinct bank row the batch needs is read once and
     dotted with every row that uses it (at most K bank rows per channel, whatever the batch);
     with AVX2, in tiles of 4 channels x 2 rows of one expert, a bank row two experts share
     read from memory once and from cache again;
   - many rows (prefill): per expert, a GEMM in register tiles of 6 channels x 64 rows (AVX-512;
     6 x 16 with AVX2), the channels' weight rows broadcast straight from the banks, x packed
     once per call.
   Work is split over ONNX Runtime's own intra-op threads (KernelContext_ParallelFor), so the
   op never competes with the session's thread pool.

   No ONNX Runtime headers are needed (they are not on PyPI): the library uses a dozen slots of
   the OrtApi function table, which is append-only; their positions are listed below. */

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* On x86-64, AVX-512 kernels, else AVX2 + FMA ones, chosen at load time by what the CPU has;
   plain C everywhere else. -DCHMC_PORTABLE (plain C only) and -DCHMC_NO_AVX512 (AVX2 at best)
   are how the tests check each path on a machine that has the wider one. */
#if defined(__x86_64__) && !defined(CHMC_PORTABLE)
#define CHMC_X86 1
#include <immintrin.h>
#ifndef CHMC_NO_AVX512
#define CHMC_AVX512 1
#endif
#endif

/* ---- the slice of ONNX Runtime's C ABI used here ------------------------------------------ */

typedef struct OrtStatus OrtStatus;
typedef void (*ApiFn)(void); /* a slot; GCC lets it cast to any function type */
typedef struct {
    const ApiFn *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

enum { ORT_API_VERSION_USED = 17 }; /* ONNX Runtime >= 1.17: KernelContext_ParallelFor */
enum { OP_VERSION = 16 };           /* OrtCustomOp fields up to KernelComputeV2 */
enum {                              /* positions in OrtApi (onnxruntime_c_api.h order) */
    API_CreateStatus = 0,
    API_CreateCustomOpDomain = 26,
    API_CustomOpDomain_Add = 27,
    API_AddCustomOpDomain = 28,
    API_GetTensorMutableData = 51,
    API_GetDimensionsCount = 61,
    API_GetDimensions = 62,
    API_GetTensorTypeAndShape = 65,
    API_KernelContext_GetInput = 90,
    API_KernelContext_GetOutput = 91,
    API_ReleaseTensorTypeAndShapeInfo = 99,
    API_KernelContext_ParallelFor = 274,
};
enum { ORT_INVALID_ARGUMENT = 2, ORT_RUNTIME_EXCEPTION = 6 };
enum { TYPE_FLOAT = 1, TYPE_INT32 = 6, TYPE_INT64 = 7 };

static const ApiFn *api;
#define CALL(slot, type) ((type)api[slot])
#define RETURN_IF_ERROR(expr)          \
    do {                               \
        OrtStatus *status_ = (expr);   \
        if (status_) return status_;   \
    } while (0)

static OrtStatus *fail(int code, const char *msg) {
    return CALL(API_CreateStatus, OrtStatus * (*)(int, const char *))(code, msg);
}

/* A tensor input or output: its data and dims. */
typedef struct {
    void *data;
    int64_t dims[4];
    size_t rank;
} Tensor;

static OrtStatus *describe(const void *value, Tensor *t) {
    void *info = NULL;
    RETURN_IF_ERROR(CALL(API_GetTensorMutableData, OrtStatus * (*)(const void *, void **))(
        value, &t->data));
    RETURN_IF_ERROR(CALL(API_GetTensorTypeAndShape, OrtStatus * (*)(const void *, void **))(
        value, &info));
    OrtStatus *s = CALL(API_GetDimensionsCount, OrtStatus * (*)(const void *, size_t *))(
        info, &t->rank);
    if (!s && t->rank > 4) s = fail(ORT_INVALID_ARGUMENT, "ChannelGatherMatMul: rank above 4");
    if (!s)
        s = CALL(API_GetDimensions, OrtStatus * (*)(const void *, int64_t *, size_t))(
            info, t->dims, t->rank);
    CALL(API_ReleaseTensorTypeAndShapeInfo, void (*)(void *))(info);
    return s;
}

/* ---- the work of one call -------------------------------------------------------------------- */

enum { TILE_CH = 6, TILE_VECS = 4, TILE_ROWS = 16 * TILE_VECS, TASK_CH = 8 * TILE_CH,
       GEMV_CHANNELS = 64, GEMV_MAX_ROWS = 16, PREFETCH_AHEAD = 2 };

typedef struct {
    const float *x, *bank;
    const int32_t *index;
    float *y;
    int64_t in, out;
    /* rows of the problem: x row r is x + row_x[r] * in, y row r is y + row_x[r] * out */
    int64_t n_rows;
    const int64_t *row_x;    /* [n_rows] */
    const int64_t *row_exp;  /* [n_rows] expert of each row */
    /* GEMM over one expert's rows */
    int64_t expert;
} Work;

static inline const float *bank_row(const Work *w, int64_t expert, int64_t c) {
    return w->bank + ((int64_t)w->index[expert * w->out + c] * w->out + c) * w->in;
}

/* Portable fallback (any CPU): plain loops, same results up to summation order. */
static void dot_rows_generic(const float *wrow, const float *const *xs, float *const *ys,
                             int n, int64_t in, int64_t c) {
    for (int j = 0; j < n; j++) {
        float acc = 0.f;
        for (int64_t k = 0; k < in; k++) acc += wrow[k] * xs[j][k];
        ys[j][c] = acc;
    }
}

#ifdef CHMC_AVX512
/* The sums of four vectors at once, in lanes 0, 4, 8 and 12 (a third of four reductions). */
__attribute__((target("avx512f"))) static inline __m512 sum4(__m512 v0, __m512 v1, __m512 v2,
                                                             __m512 v3) {
    __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x44), _mm512_shuffle_f32x4(v0, v1, 0xEE));
    __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(v2, v3, 0x44), _mm512_shuffle_f32x4(v2, v3, 0xEE));
    __m512 w = _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, 0x88),
                             _mm512_shuffle_f32x4(u01, u23, 0xDD)); /* lane L: 4 partials of v_L */
    w = _mm512_add_ps(w, _mm512_permute_ps(w, 0x4E));
    return _mm512_add_ps(w, _mm512_permute_ps(w, 0xB1));
}

__attribute__((target("avx512f,fma"))) static void dot_rows_avx512(
    const float *wrow, const float *const *xs, float *const *ys, int n, int64_t in, int64_t c) {
    if (n == 1) { /* batch-1 decode: four independent sums over one row */
        const float *x = xs[0];
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k + 64 <= in; k += 64) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wrow + k), _mm512_loadu_ps(x + k), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(wrow + k + 16), _mm512_loadu_ps(x + k + 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(wrow + k + 32), _mm512_loadu_ps(x + k + 32), a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(wrow + k + 48), _mm512_loadu_ps(x + k + 48), a3);
        }
        for (; k < in; k += 16) {
            __mmask16 mask = in - k >= 16 ? 0xFFFF : (__mmask16)((1u << (in - k)) - 1);
            a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, wrow + k),
                                 _mm512_maskz_loadu_ps(mask, x + k), a0);
        }
        ys[0][c] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        return;
    }
    for (int j0 = 0; j0 < n; j0 += 4) { /* four rows at a time; wrow stays in L1 */
        int m = n - j0 < 4 ? n - j0 : 4;
        const float *x0 = xs[j0], *x1 = xs[j0 + (m > 1)], *x2 = xs[j0 + (m > 2 ? 2 : 0)],
                    *x3 = xs[j0 + (m > 3 ? 3 : 0)];
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        __m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        int64_t k = 0;
        for (; k + 32 <= in; k += 32) {
            __m512 w0 = _mm512_loadu_ps(wrow + k), w1 = _mm512_loadu_ps(wrow + k + 16);
            a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x0 + k), a0);
            b0 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x0 + k + 16), b0);
            a1 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x1 + k), a1);
            b1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x1 + k + 16), b1);
            a2 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x2 + k), a2);
            b2 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x2 + k + 16), b2);
            a3 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x3 + k), a3);
            b3 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x3 + k + 16), b3);
        }
        for (; k < in; k += 16) {
            __mmask16 mask = in - k >= 16 ? 0xFFFF : (__mmask16)((1u << (in - k)) - 1);
            __m512 w0 = _mm512_maskz_loadu_ps(mask, wrow + k);
            a0 = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mask, x0 + k), a0);
            a1 = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mask, x1 + k), a1);
            a2 = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mask, x2 + k), a2);
            a3 = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mask, x3 + k), a3);
        }
        float r[16] __attribute__((aligned(64)));
        _mm512_store_ps(r, sum4(_mm512_add_ps(a0, b0), _mm512_add_ps(a1, b1),
                                _mm512_add_ps(a2, b2), _mm512_add_ps(a3, b3)));
        for (int j = 0; j < m; j++) ys[j0 + j][c] = r[4 * j];
    }
}

#endif

static void (*dot_rows)(const float *, const float *const *, float *const *, int, int64_t,
                        int64_t) = dot_rows_generic;

/* The batch's rows grouped by expert: expert d (experts[d]) has rows [start[d], start[d + 1])
   of xr / yr. Returns the number of distinct experts. */
static int group_rows(const Work *w, const float **xr, float **yr, int64_t *experts, int *start) {
    int ne = 0, n = 0;
    for (int r0 = 0; r0 < (int)w->n_rows; r0++) {
        int seen = 0;
        for (int d = 0; d < ne; d++) seen |= experts[d] == w->row_exp[r0];
        if (seen) continue;
        experts[ne] = w->row_exp[r0];
        start[ne++] = n;
        for (int r = r0; r < (int)w->n_rows; r++)
            if (w->row_exp[r] == w->row_exp[r0]) {
                xr[n] = w->x + w->row_x[r] * w->in;
                yr[n++] = w->y + w->row_x[r] * w->out;
            }
    }
    start[ne] = n;
    return ne;
}

/* Channel c's bank rows the batch's experts use, each distinct one fetched once: neighbouring
   channels' rows sit in different banks, so the hardware prefetcher restarts at each. */
static void prefetch_channel(const Work *w, const int64_t *experts, int ne, int64_t c) {
    uint64_t fetched = 0; /* groups already asked for */
    for (int d = 0; d < ne; d++) {
        int32_t g = w->index[experts[d] * w->out + c];
        if (g < 64 && (fetched >> g & 1)) continue;
        if (g < 64) fetched |= 1ull << g;
        const char *row = (const char *)(w->bank + (g * w->out + c) * w->in);
        for (int64_t k = 0; k < w->in * 4; k += 64) __builtin_prefetch(row + k, 0, 1);
    }
}

/* Few rows: channels [c0, c0 + GEMV_CHANNELS); each distinct bank row read once. Rows are
   grouped by expert once per task, so a channel costs one index lookup per distinct expert (a
   batch of one expert, the common case, goes straight to one multi-row dot). */
static void gemv_task(void *arg, size_t task) {
    const Work *w = arg;
    const float *xr[GEMV_MAX_ROWS], *xs[GEMV_MAX_ROWS];
    float *yr[GEMV_MAX_ROWS], *ys[GEMV_MAX_ROWS];
    int64_t experts[GEMV_MAX_ROWS];
    int start[GEMV_MAX_ROWS + 1];
    int ne = group_rows(w, xr, yr, experts, start);
    int64_t c0 = (int64_t)task * GEMV_CHANNELS;
    int64_t c1 = c0 + GEMV_CHANNELS < w->out ? c0 + GEMV_CHANNELS : w->out;
    for (int64_t c = c0; c < c1; c++) {
        if (c + PREFETCH_AHEAD < c1) prefetch_channel(w, experts, ne, c + PREFETCH_AHEAD);
        int32_t g[GEMV_MAX_ROWS];
        for (int d = 0; d < ne; d++) g[d] = w->index[experts[d] * w->out + c];
        uint32_t done = 0;
        for (int d = 0; d < ne; d++) {
            if (done >> d & 1) continue;
            const float *row = w->bank + ((int64_t)g[d] * w->out + c) * w->in;
            int m = 0;
            for (int e = d; e < ne; e++)
                if (!(done >> e & 1) && g[e] == g[d]) {
                    done |= 1u << e;
                    for (int r = start[e]; r < start[e + 1]; r++) xs[m] = xr[r], ys[m++] = yr[r];
                }
            dot_rows(row, xs, ys, m, w->in, c);
        }
    }
}

#ifdef CHMC_X86
enum { TILE_GEMV_CH = 4 };

/* The sums of four vectors, in the four lanes of the result. */
__attribute__((target("avx2"))) static inline __m128 sum4_avx2(__m256 v0, __m256 v1, __m256 v2,
                                                                __m256 v3) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* y_j[c + i] = w_i . x_j for 4 channels' rows and M (1 or 2) x rows: each x vector loaded once
   for 4 channels (a row at a time, x's loads from L2 were what a batch of 8 waited on). Rows
   past nc are copies of the first; their sums are dropped. */
__attribute__((always_inline, target("avx2,fma"))) static inline void tile_avx2(
    const float *const *wr, int nc, const float *const *xs, float *const *ys, int64_t in,
    int64_t c, const int M) {
    __m256 acc[TILE_GEMV_CH][2];
#pragma GCC unroll 4
    for (int i = 0; i < TILE_GEMV_CH; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= in; k += 8) {
        __m256 xv[2];
#pragma GCC unroll 2
        for (int j = 0; j < M; j++) xv[j] = _mm256_loadu_ps(xs[j] + k);
#pragma GCC unroll 4
        for (int i = 0; i < TILE_GEMV_CH; i++) {
            __m256 wv = _mm256_loadu_ps(wr[i] + k);
#pragma GCC unroll 2
            for (int j = 0; j < M; j++) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
#pragma GCC unroll 2
    for (int j = 0; j < M; j++) {
        float sum[4];
        _mm_storeu_ps(sum, sum4_avx2(acc[0][j], acc[1][j], acc[2][j], acc[3][j]));
        for (int i = 0; i < nc; i++) {
            for (int64_t t = k; t < in; t++) sum[i] += wr[i][t] * xs[j][t];
            ys[j][c + i] = sum[i];
        }
    }
}

__attribute__((target("avx2,fma"))) static void tile4x1_avx2(
    const float *const *wr, int nc, const float *const *xs, float *const *ys, int64_t in,
    int64_t c) {
    tile_avx2(wr, nc, xs, ys, in, c, 1);
}

__attribute__((target("avx2,fma"))) static void tile4x2_avx2(
    const float *const *wr, int nc, const float *const *xs, float *const *ys, int64_t in,
    int64_t c) {
    tile_avx2(wr, nc, xs, ys, in, c, 2);
}

/* gemv_task in tiles of 4 channels x 2 rows of one expert: a bank row two experts share is read
   from memory once and from cache for the second. */
static void gemv_tiled_task(void *arg, size_t task) {
    const Work *w = arg;
    const float *xr[GEMV_MAX_ROWS];
    float *yr[GEMV_MAX_ROWS];
    int64_t experts[GEMV_MAX_ROWS];
    int start[GEMV_MAX_ROWS + 1];
    int ne = group_rows(w, xr, yr, experts, start);
    int64_t c0 = (int64_t)task * GEMV_CHANNELS;
    int64_t c1 = c0 + GEMV_CHANNELS < w->out ? c0 + GEMV_CHANNELS : w->out;
    for (int64_t c = c0; c < c1; c += TILE_GEMV_CH) {
        int nc = c1 - c < TILE_GEMV_CH ? (int)(c1 - c) : TILE_GEMV_CH;
        for (int64_t n = c + TILE_GEMV_CH; n < c + 2 * TILE_GEMV_CH && n < c1; n++)
            prefetch_channel(w, experts, ne, n);
        for (int d = 0; d < ne; d++) {
            const float *wr[TILE_GEMV_CH];
            for (int i = 0; i < TILE_GEMV_CH; i++) wr[i] = bank_row(w, experts[d], c + (i < nc ? i : 0));
            int r = start[d];
            for (; r + 2 <= start[d + 1]; r += 2) tile4x2_avx2(wr, nc, xr + r, yr + r, w->in, c);
            if (r < start[d + 1]) tile4x1_avx2(wr, nc, xr + r, yr + r, w->in, c);
        }
    }
}
#endif

static void (*gemv)(void *, size_t) = gemv_task;

/* Many rows of one expert (prefill): tiles of 6 channels x 64 rows (24 accumulators; fewer loads
   per FMA and fewer row pointers than 12 x 32, measured 8-13% faster). The channels' weight rows
   are read in place through the index table and broadcast; x's rows are packed once per call
   into panels xt [in, 64] (rows beyond the last are zeros), so no weight is ever copied.
   A tile is y^T: it goes to a per-task buffer yt [48 channels, rows] with vector stores, and
   the task writes y's rows 48 contiguous channels at a time (scalar stores straight into y's
   rows, a page apart, cost a quarter of the time). */
static void gemm_generic(const Work *w, const float *xt, float *yt, int64_t ld, int64_t c0,
                         int nc) {
    for (int i = 0; i < nc; i++) {
        const float *wrow = bank_row(w, w->expert, c0 + i);
        for (int64_t r = 0; r < ld; r++) {
            const float *p = xt + (r / TILE_ROWS) * w->in * TILE_ROWS + r % TILE_ROWS;
            float acc = 0.f;
            for (int64_t k = 0; k < w->in; k++) acc += wrow[k] * p[k * TILE_ROWS];
            yt[i * ld + r] = acc;
        }
    }
}

#ifdef CHMC_AVX512
__attribute__((target("avx512f,fma"))) static void gemm_avx512(
    const Work *w, const float *xt, float *yt, int64_t ld, int64_t c0, int nc) {
    const float *a[TILE_CH], *next[TILE_CH];
    for (int i = 0; i < TILE_CH; i++) a[i] = bank_row(w, w->expert, c0 + (i < nc ? i : 0));
    for (int i = 0; i < TILE_CH; i++) /* the next tile's rows, fetched while this one computes */
        next[i] = bank_row(w, w->expert, c0 + TILE_CH + i < w->out ? c0 + TILE_CH + i : c0);
    for (int64_t r0 = 0; r0 < ld; r0 += TILE_ROWS) {
        const float *p = xt + r0 * w->in; /* this tile's panel [in, TILE_ROWS] */
        __m512 acc[TILE_CH][TILE_VECS];
#pragma GCC unroll 8
        for (int i = 0; i < TILE_CH; i++)
#pragma GCC unroll 4
            for (int v = 0; v < TILE_VECS; v++) acc[i][v] = _mm512_setzero_ps();
        for (int64_t k = 0; k < w->in; k++) {
            if (r0 == 0 && (k & 15) == 0)
                for (int i = 0; i < TILE_CH; i++) __builtin_prefetch(next[i] + k, 0, 2);
            __m512 b[TILE_VECS];
#pragma GCC unroll 4
            for (int v = 0; v < TILE_VECS; v++) b[v] = _mm512_load_ps(p + k * TILE_ROWS + 16 * v);
#pragma GCC unroll 8
            for (int i = 0; i < TILE_CH; i++) {
                __m512 av = _mm512_set1_ps(a[i][k]);
#pragma GCC unroll 4
                for (int v = 0; v < TILE_VECS; v++) acc[i][v] = _mm512_fmadd_ps(av, b[v], acc[i][v]);
            }
        }
        for (int i = 0; i < nc; i++)
            for (int v = 0; v < TILE_VECS; v++)
                _mm512_store_ps(yt + i * ld + r0 + 16 * v, acc[i][v]);
    }
}
#endif

#ifdef CHMC_X86
/* gemm_avx512's tile in 8-float vectors: 6 channels x 16 rows (12 accumulators of 16 registers)
   at a time, over the panel's four sub-panels [in, 16] (pack_avx2's layout: each read straight
   down, where [in, 64] would be walked a quarter-line per k), those wholly past the last row
   skipped. */
__attribute__((target("avx2,fma"))) static void gemm_avx2(
    const Work *w, const float *xt, float *yt, int64_t ld, int64_t c0, int nc) {
    enum { SUB = 16 };
    const float *a[TILE_CH], *next[TILE_CH];
    for (int i = 0; i < TILE_CH; i++) a[i] = bank_row(w, w->expert, c0 + (i < nc ? i : 0));
    for (int i = 0; i < TILE_CH; i++) /* the next tile's rows, fetched while this one computes */
        next[i] = bank_row(w, w->expert, c0 + TILE_CH + i < w->out ? c0 + TILE_CH + i : c0);
    for (int64_t r0 = 0; r0 < ld; r0 += TILE_ROWS) {
        for (int s = 0; s < TILE_ROWS && r0 + s < w->n_rows; s += SUB) {
            const float *p = xt + (r0 + s) * w->in; /* this sub-panel [in, SUB] */
            __m256 acc[TILE_CH][2];
#pragma GCC unroll 8
            for (int i = 0; i < TILE_CH; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
            for (int64_t k = 0; k < w->in; k++) {
                if (r0 == 0 && s == 0 && (k & 15) == 0)
                    for (int i = 0; i < TILE_CH; i++) __builtin_prefetch(next[i] + k, 0, 2);
                __m256 b0 = _mm256_load_ps(p + k * SUB), b1 = _mm256_load_ps(p + k * SUB + 8);
#pragma GCC unroll 8
                for (int i = 0; i < TILE_CH; i++) {
                    __m256 av = _mm256_broadcast_ss(a[i] + k);
                    acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
                }
            }
#pragma GCC unroll 8 /* unrolled, so that acc stays in registers */
            for (int i = 0; i < TILE_CH; i++)
                if (i < nc) {
                    _mm256_store_ps(yt + i * ld + r0 + s, acc[i][0]);
                    _mm256_store_ps(yt + i * ld + r0 + s + 8, acc[i][1]);
                }
        }
    }
}
#endif

static void (*gemm)(const Work *, const float *, float *, int64_t, int64_t, int) = gemm_generic;

/* yt [ncs, ld] (channel-major) into y's rows: y[r][c0 + i] = yt[i][r]. */
static void write_rows_generic(const float *yt, int64_t ld, float *const *yr, int64_t n_rows,
                               int64_t c0, int ncs) {
    for (int64_t r = 0; r < n_rows; r++)
        for (int i = 0; i < ncs; i++) yr[r][c0 + i] = yt[i * ld + r];
}

#ifdef CHMC_AVX512
/* a[i][j] -> a[j][i] for a 16 x 16 block held in 16 registers. */
__attribute__((target("avx512f"))) static inline void transpose16(__m512 a[16]) {
    __m512 t[16];
    for (int k = 0; k < 16; k += 2) { /* pairs of rows, per 128-bit lane */
        t[k] = _mm512_unpacklo_ps(a[k], a[k + 1]);
        t[k + 1] = _mm512_unpackhi_ps(a[k], a[k + 1]);
    }
    for (int k = 0; k < 16; k += 4) { /* a[k + m] lane L: column 4L + m of rows k..k+3 */
        a[k] = _mm512_shuffle_ps(t[k], t[k + 2], 0x44);
        a[k + 1] = _mm512_shuffle_ps(t[k], t[k + 2], 0xEE);
        a[k + 2] = _mm512_shuffle_ps(t[k + 1], t[k + 3], 0x44);
        a[k + 3] = _mm512_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
    }
    for (int m = 0; m < 4; m++) { /* each column's four lanes together */
        __m512 v0 = _mm512_shuffle_f32x4(a[m], a[4 + m], 0x88);
        __m512 v1 = _mm512_shuffle_f32x4(a[m], a[4 + m], 0xDD);
        __m512 w0 = _mm512_shuffle_f32x4(a[8 + m], a[12 + m], 0x88);
        __m512 w1 = _mm512_shuffle_f32x4(a[8 + m], a[12 + m], 0xDD);
        t[m] = _mm512_shuffle_f32x4(v0, w0, 0x88);
        t[8 + m] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
        t[4 + m] = _mm512_shuffle_f32x4(v1, w1, 0x88);
        t[12 + m] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
    }
    for (int k = 0; k < 16; k++) a[k] = t[k];
}

/* The same in 16 x 16 blocks transposed in registers: one masked vector store per row. */
__attribute__((target("avx512f"))) static void write_rows_avx512(
    const float *yt, int64_t ld, float *const *yr, int64_t n_rows, int64_t c0, int ncs) {
    for (int i0 = 0; i0 < ncs; i0 += 16) {
        int nci = ncs - i0 < 16 ? ncs - i0 : 16;
        __mmask16 mask = (__mmask16)((1u << nci) - 1);
        for (int64_t r0 = 0; r0 < n_rows; r0 += 16) {
            __m512 a[16];
            for (int i = 0; i < 16; i++) a[i] = _mm512_load_ps(yt + (i0 + (i < nci ? i : 0)) * ld + r0);
            transpose16(a);
            int nr = n_rows - r0 < 16 ? (int)(n_rows - r0) : 16;
            for (int j = 0; j < nr; j++) _mm512_mask_storeu_ps(yr[r0 + j] + c0 + i0, mask, a[j]);
        }
    }
}

/* x's rows into a panel [in, TILE_ROWS] by 16 x 16 blocks (rows past the last are zeros). */
__attribute__((target("avx512f"))) static void pack_avx512(const float *const *rows, int nr,
                                                           int64_t in, float *p) {
    for (int j0 = 0; j0 < TILE_ROWS; j0 += 16)
        for (int64_t k0 = 0; k0 < in; k0 += 16) {
            int nk = in - k0 < 16 ? (int)(in - k0) : 16;
            __mmask16 mask = (__mmask16)((1u << nk) - 1);
            __m512 a[16];
            for (int j = 0; j < 16; j++)
                a[j] = j0 + j < nr ? _mm512_maskz_loadu_ps(mask, rows[j0 + j] + k0)
                                   : _mm512_setzero_ps();
            transpose16(a);
            for (int k = 0; k < nk; k++) _mm512_store_ps(p + (k0 + k) * TILE_ROWS + j0, a[k]);
        }
}
#endif

static void (*write_rows)(const float *, int64_t, float *const *, int64_t, int64_t, int) =
    write_rows_generic;

/* A per-thread buffer reused across calls (slot 0: x's panels on the calling thread, slot 1: a
   task's yt): a fresh allocation this size is mmap'd and page-faulted on every call. Freed when
   its thread ends (ONNX Runtime's pool threads end with their session); the library is linked
   -z nodelete so that the destructor outlives any dlclose. */
typedef struct {
    float *buf[2];
    size_t cap[2];
} Scratch;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void free_scratch(void *p) {
    Scratch *s = p;
    free(s->buf[0]), free(s->buf[1]), free(s);
}

static void make_scratch_key(void) { pthread_key_create(&scratch_key, free_scratch); }

static float *scratch(int slot, size_t floats) {
    pthread_once(&scratch_once, make_scratch_key);
    Scratch *s = pthread_getspecific(scratch_key);
    if (!s) {
        if (!(s = calloc(1, sizeof *s))) return NULL;
        pthread_setspecific(scratch_key, s);
    }
    if (floats > s->cap[slot]) {
        free(s->buf[slot]);
        s->buf[slot] = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
        s->cap[slot] = s->buf[slot] ? floats : 0;
    }
    return s->buf[slot];
}

typedef struct {
    const Work *w;
    const float *xt;
    float *const *yr;
    int64_t ld; /* rows, padded to TILE_ROWS */
    int status; /* nonzero: a task could not allocate its buffer */
} GemmArgs;

static void gemm_task(void *arg, size_t task) {
    GemmArgs *g = arg;
    const Work *w = g->w;
    int64_t c0 = (int64_t)task * TASK_CH;
    int ncs = w->out - c0 < TASK_CH ? (int)(w->out - c0) : TASK_CH;
    float *yt = scratch(1, (size_t)(TASK_CH * g->ld));
    if (!yt) {
        g->status = 1;
        return;
    }
    for (int64_t r = 0; r < w->n_rows; r++) /* y's lines arrive while the tiles compute */
        for (int i = 0; i < ncs; i += 16) __builtin_prefetch(g->yr[r] + c0 + i, 1, 3);
    for (int t = 0; t < ncs; t += TILE_CH)
        gemm(w, g->xt, yt + t * g->ld, g->ld, c0 + t, ncs - t < TILE_CH ? ncs - t : TILE_CH);
    write_rows(yt, g->ld, g->yr, w->n_rows, c0, ncs);
}

/* x's rows (by pointer) into panels [in, TILE_ROWS], one task per TILE_ROWS rows, zero-padded. */
typedef struct {
    const float *const *xr;
    int64_t n_rows, in;
    float *xt;
} PackArgs;

static void pack_generic(const float *const *rows, int nr, int64_t in, float *p) {
    for (int64_t k = 0; k < in; k++, p += TILE_ROWS) { /* panel rows written in order */
        for (int j = 0; j < nr; j++) p[j] = rows[j][k];
        for (int j = nr; j < TILE_ROWS; j++) p[j] = 0.f;
    }
}

#ifdef CHMC_X86
/* a[i][j] -> a[j][i] for an 8 x 8 block held in 8 registers. */
__attribute__((target("avx"))) static inline void transpose8(__m256 a[8]) {
    __m256 t[8], u[8];
    for (int k = 0; k < 8; k += 2) { /* pairs of rows, per 128-bit lane */
        t[k] = _mm256_unpacklo_ps(a[k], a[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(a[k], a[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) { /* u[k + m]: columns m | m + 4 of rows k..k+3 */
        u[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
        u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
        u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
        u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
    }
    for (int m = 0; m < 4; m++) {
        a[m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x20);
        a[m + 4] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x31);
    }
}

/* x's rows into a panel of four sub-panels [in, 16] (what gemm_avx2 streams), by 8 x 8 blocks
   transposed in registers; rows past nr are zeros, sub-panels wholly past them left out. */
__attribute__((target("avx"))) static void pack_avx2(const float *const *rows, int nr, int64_t in,
                                                     float *p) {
    for (int j0 = 0; j0 < TILE_ROWS && !(j0 >= nr && j0 % 16 == 0); j0 += 8) {
        float *q = p + (j0 / 16) * 16 * in + j0 % 16;
        int64_t k0 = 0;
        for (; k0 + 8 <= in; k0 += 8) {
            __m256 a[8];
            for (int j = 0; j < 8; j++)
                a[j] = j0 + j < nr ? _mm256_loadu_ps(rows[j0 + j] + k0) : _mm256_setzero_ps();
            transpose8(a);
            for (int k = 0; k < 8; k++) _mm256_store_ps(q + (k0 + k) * 16, a[k]);
        }
        for (; k0 < in; k0++)
            for (int j = 0; j < 8; j++) q[k0 * 16 + j] = j0 + j < nr ? rows[j0 + j][k0] : 0.f;
    }
}

/* write_rows_generic in 8 x 8 blocks transposed in registers: one masked store per row. */
__attribute__((target("avx2"))) static void write_rows_avx2(
    const float *yt, int64_t ld, float *const *yr, int64_t n_rows, int64_t c0, int ncs) {
    for (int i0 = 0; i0 < ncs; i0 += 8) {
        int nci = ncs - i0 < 8 ? ncs - i0 : 8;
        __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(nci),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (int64_t r0 = 0; r0 < n_rows; r0 += 8) {
            __m256 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm256_load_ps(yt + (i0 + (i < nci ? i : 0)) * ld + r0);
            transpose8(a);
            int nr = n_rows - r0 < 8 ? (int)(n_rows - r0) : 8;
            for (int j = 0; j < nr; j++) _mm256_maskstore_ps(yr[r0 + j] + c0 + i0, mask, a[j]);
        }
    }
}
#endif

static void (*pack)(const float *const *, int, int64_t, float *) = pack_generic;

static void pack_task(void *arg, size_t task) {
    const PackArgs *a = arg;
    int64_t r0 = (int64_t)task * TILE_ROWS;
    int nr = a->n_rows - r0 < TILE_ROWS ? (int)(a->n_rows - r0) : TILE_ROWS;
    pack(a->xr + r0, nr, a->in, a->xt + r0 * a->in);
}

/* ParallelFor runs everything on the calling thread when num_batch is 0; batches of a few
   tasks each let the pool balance them dynamically. */
static size_t batches(size_t tasks) { return tasks < 64 ? tasks : 64; }

typedef OrtStatus *(*ParallelForFn)(const void *, void (*)(void *, size_t), size_t, size_t,
                                    void *);

static OrtStatus *compute(void *kernel, void *ctx) {
    (void)kernel;
    const void *v[4];
    Tensor x, bank, index, expert;
    for (size_t i = 0; i < 4; i++)
        RETURN_IF_ERROR(CALL(API_KernelContext_GetInput,
                             OrtStatus * (*)(const void *, size_t, const void **))(ctx, i, &v[i]));
    RETURN_IF_ERROR(describe(v[0], &x));
    RETURN_IF_ERROR(describe(v[1], &bank));
    RETURN_IF_ERROR(describe(v[2], &index));
    RETURN_IF_ERROR(describe(v[3], &expert));
    char msg[256];
    if (x.rank != 3 || bank.rank != 3 || index.rank != 2 || expert.rank != 1 ||
        x.dims[2] != bank.dims[2] || index.dims[1] != bank.dims[1] || x.dims[0] != expert.dims[0]) {
        snprintf(msg, sizeof msg,
                 "ChannelGatherMatMul: x, bank, index, expert_id shapes disagree (ranks %zu %zu "
                 "%zu %zu; want x [B,S,in], bank [K,out,in], index [N,out], expert_id [B])",
                 x.rank, bank.rank, index.rank, expert.rank);
        return fail(ORT_INVALID_ARGUMENT, msg);
    }
    int64_t B = x.dims[0], S = x.dims[1], in = x.dims[2];
    int64_t K = bank.dims[0], out = bank.dims[1], N = index.dims[0];
    const int64_t *eid = expert.data;
    const int32_t *idx = index.data;
    for (int64_t b = 0; b < B; b++)
        if (eid[b] < 0 || eid[b] >= N) {
            snprintf(msg, sizeof msg, "ChannelGatherMatMul: expert_id %lld out of range [0, %lld)",
                     (long long)eid[b], (long long)N);
            return fail(ORT_INVALID_ARGUMENT, msg);
        }
    for (int64_t i = 0; i < N * out; i++)
        if (idx[i] < 0 || idx[i] >= K) {
            snprintf(msg, sizeof msg, "ChannelGatherMatMul: index %d out of range [0, %lld)",
                     idx[i], (long long)K);
            return fail(ORT_INVALID_ARGUMENT, msg);
        }
    int64_t dims[3] = {B, S, out};
    void *yv = NULL;
    float *y = NULL;
    RETURN_IF_ERROR(CALL(API_KernelContext_GetOutput,
                         OrtStatus * (*)(void *, size_t, const int64_t *, size_t, void **))(
        ctx, 0, dims, 3, &yv));
    RETURN_IF_ERROR(CALL(API_GetTensorMutableData, OrtStatus * (*)(const void *, void **))(
        yv, (void **)&y));
    int64_t n_rows = B * S;
    if (n_rows == 0 || out == 0) return NULL;
    if (in == 0) {
        memset(y, 0, (size_t)(n_rows * out) * sizeof(float));
        return NULL;
    }
    ParallelForFn parallel_for = CALL(API_KernelContext_ParallelFor, ParallelForFn);
    int64_t *rows = malloc((size_t)n_rows * 2 * sizeof(int64_t));
    const float **xr = malloc((size_t)n_rows * sizeof(float *));
    float **yr = malloc((size_t)n_rows * sizeof(float *));
    OrtStatus *s = NULL;
    if (!rows || !xr || !yr) {
        s = fail(ORT_RUNTIME_EXCEPTION, "ChannelGatherMatMul: out of memory");
        goto done;
    }
    Work w = {x.data, bank.data, idx, y, in, out, 0, rows, rows + n_rows, 0};
    if (n_rows <= GEMV_MAX_ROWS) { /* decode: every row in one pass over the channels */
        for (int64_t r = 0; r < n_rows; r++) rows[r] = r, rows[n_rows + r] = eid[r / S];
        w.n_rows = n_rows;
        size_t tasks = (size_t)((out + GEMV_CHANNELS - 1) / GEMV_CHANNELS);
        s = parallel_for(ctx, gemv, tasks, batches(tasks), &w);
        goto done;
    }
    for (int64_t e = 0; e < N && !s; e++) { /* prefill: one GEMM per expert present */
        int64_t m = 0;
        for (int64_t b = 0; b < B; b++)
            if (eid[b] == e)
                for (int64_t t = 0; t < S; t++) {
                    xr[m] = (const float *)x.data + (b * S + t) * in;
                    yr[m++] = y + (b * S + t) * out;
                }
        if (!m) continue;
        int64_t padded = (m + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
        float *xt = scratch(0, (size_t)(padded * in));
        if (!xt) {
            s = fail(ORT_RUNTIME_EXCEPTION, "ChannelGatherMatMul: out of memory");
            break;
        }
        PackArgs packing = {xr, m, in, xt};
        s = parallel_for(ctx, pack_task, (size_t)(padded / TILE_ROWS),
                         batches((size_t)(padded / TILE_ROWS)), &packing);
        if (s) break;
        w.n_rows = m, w.expert = e;
        GemmArgs g = {&w, xt, yr, padded, 0};
        size_t tasks = (size_t)((out + TASK_CH - 1) / TASK_CH);
        s = parallel_for(ctx, gemm_task, tasks, batches(tasks), &g);
        if (!s && g.status) s = fail(ORT_RUNTIME_EXCEPTION, "ChannelGatherMatMul: out of memory");
    }
done:
    free(rows), free(xr), free(yr);
    return s;
}

/* ---- the op's schema ------------------------------------------------------------------------- */

typedef struct OrtCustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct OrtCustomOp *, const void *, const void *);
    const char *(*GetName)(const struct OrtCustomOp *);
    const char *(*GetExecutionProviderType)(const struct OrtCustomOp *);
    int (*GetInputType)(const struct OrtCustomOp *, size_t);
    size_t (*GetInputTypeCount)(const struct OrtCustomOp *);
    int (*GetOutputType)(const struct OrtCustomOp *, size_t);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOp *);
    void (*KernelCompute)(void *, void *);
    void (*KernelDestroy)(void *);
    int (*GetInputCharacteristic)(const struct OrtCustomOp *, size_t);
    int (*GetOutputCharacteristic)(const struct OrtCustomOp *, size_t);
    int (*GetInputMemoryType)(const struct OrtCustomOp *, size_t);
    int (*GetVariadicInputMinArity)(const struct OrtCustomOp *);
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *);
    OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *, const void *, const void *, void **);
    OrtStatus *(*KernelComputeV2)(void *, void *);
} OrtCustomOp;

static const char *op_name(const OrtCustomOp *op) { return (void)op, "ChannelGatherMatMul"; }
static const char *op_provider(const OrtCustomOp *op) { return (void)op, NULL; } /* CPU */
static int input_type(const OrtCustomOp *op, size_t i) {
    static const int types[4] = {TYPE_FLOAT, TYPE_FLOAT, TYPE_INT32, TYPE_INT64};
    return (void)op, i < 4 ? types[i] : 0;
}
static size_t input_count(const OrtCustomOp *op) { return (void)op, 4; }
static int output_type(const OrtCustomOp *op, size_t i) { return (void)op, (void)i, TYPE_FLOAT; }
static size_t output_count(const OrtCustomOp *op) { return (void)op, 1; }
static int zero_at(const OrtCustomOp *op, size_t i) { return (void)op, (void)i, 0; } /* required; default memory */
static int one(const OrtCustomOp *op) { return (void)op, 1; }
static void destroy_kernel(void *kernel) { (void)kernel; }
static OrtStatus *create_kernel(const OrtCustomOp *op, const void *api_, const void *info,
                                void **kernel) {
    (void)op, (void)api_, (void)info;
    *kernel = (void *)&api; /* stateless: any non-null pointer */
    return NULL;
}

static const OrtCustomOp channel_gather_matmul_op = {
    .version = OP_VERSION,
    .GetName = op_name,
    .GetExecutionProviderType = op_provider,
    .GetInputType = input_type,
    .GetInputTypeCount = input_count,
    .GetOutputType = output_type,
    .GetOutputTypeCount = output_count,
    .KernelDestroy = destroy_kernel,
    .GetInputCharacteristic = zero_at,
    .GetOutputCharacteristic = zero_at,
    .GetInputMemoryType = zero_at,
    .GetVariadicInputMinArity = one,
    .GetVariadicInputHomogeneity = one,
    .GetVariadicOutputMinArity = one,
    .GetVariadicOutputHomogeneity = one,
    .CreateKernelV2 = create_kernel,
    .KernelComputeV2 = compute,
};

/* The widest kernels the CPU has (the plain C ones stay otherwise). */
static void choose_kernels(void) {
#ifdef CHMC_X86
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        gemv = gemv_tiled_task, gemm = gemm_avx2, pack = pack_avx2, /* pack's layout is gemm's */
        write_rows = write_rows_avx2;
#endif
#ifdef CHMC_AVX512
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"))
        dot_rows = dot_rows_avx512, gemm = gemm_avx512, write_rows = write_rows_avx512,
        pack = pack_avx512, gemv = gemv_task;
#endif
}

/* ONNX Runtime calls this when a session registers the library (register_custom_ops_library). */
__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(void *options,
                                                                    const OrtApiBase *base) {
    api = base->GetApi(ORT_API_VERSION_USED);
    if (!api) return NULL; /* an ONNX Runtime older than 1.17 cannot report an error here */
    choose_kernels();
    void *domain = NULL;
    RETURN_IF_ERROR(CALL(API_CreateCustomOpDomain, OrtStatus * (*)(const char *, void **))(
        "chmc", &domain));
    RETURN_IF_ERROR(CALL(API_CustomOpDomain_Add, OrtStatus * (*)(void *, const OrtCustomOp *))(
        domain, &channel_gather_matmul_op));
    /* the domain must outlive every session: it is kept for the life of the process */
    return CALL(API_AddCustomOpDomain, OrtStatus * (*)(void *, void *))(options, domain);
}
