/* Fused float64 loops for the two passes of nctools.measure (see nctools/native.py).
 *
 * Pass 1 sums the rows of each class. Pass 2 visits every row once: it centres the row
 * on its class mean in float64, adds it to the class's sums and squared norm, projects
 * it on the eigenvectors of Sigma_B (the second moments NC1 needs), and takes the
 * classifier's and the nearest class centre's decisions (NC4), all while the row is in
 * the L1 cache. Papyan, Han & Donoho (PNAS 2020): NC1 = Tr(Sigma_W Sigma_B^+) / C,
 * NC4 = argmax_k w_k.h + b_k against argmin_k ||h - mu_k||.
 *
 * The classifier's scores are float32 dot products with a proven rounding bound, re-scored
 * in float64 where the bound cannot settle the decision (nctools.decisions.SureArgmax);
 * every other product is a float64 dot product. Rows go four at a time so that each
 * matrix row loaded serves four samples. Built with -fopenmp-simd, the marked loops vectorise
 * without -ffast-math (only the marked sums are reassociated, into vector lanes).
 */
#include <math.h>
#include <stdint.h>

#define TILE 4

int64_t nct_abi(void) { return 4; }

/* out[r * ldo + q] = a_r . m_q for r < TILE, q < cols: a_r = a + r * lda, m_q = mat + q * ldm,
 * both of length len, accumulated in T. */
#define TILE_DOTS(NAME, T)                                                                  \
static void NAME(const T *a, int64_t lda, const T *mat, int64_t ldm,                        \
                      int64_t cols, int64_t len, T *out, int64_t ldo)                       \
{                                                                                           \
    const T *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda;                   \
    int64_t q = 0;                                                                          \
    for (; q + 2 <= cols; q += 2) {                                                         \
        const T *m0 = mat + q * ldm, *m1 = m0 + ldm;                                        \
        T s00 = 0, s01 = 0, s10 = 0, s11 = 0, s20 = 0, s21 = 0, s30 = 0, s31 = 0;           \
_Pragma("omp simd reduction(+ : s00, s01, s10, s11, s20, s21, s30, s31)")                   \
        for (int64_t j = 0; j < len; j++) {                                                 \
            T x0 = m0[j], x1 = m1[j];                                                       \
            s00 += a0[j] * x0; s01 += a0[j] * x1;                                           \
            s10 += a1[j] * x0; s11 += a1[j] * x1;                                           \
            s20 += a2[j] * x0; s21 += a2[j] * x1;                                           \
            s30 += a3[j] * x0; s31 += a3[j] * x1;                                           \
        }                                                                                   \
        out[q] = s00; out[q + 1] = s01;                                                     \
        out[ldo + q] = s10; out[ldo + q + 1] = s11;                                         \
        out[2 * ldo + q] = s20; out[2 * ldo + q + 1] = s21;                                 \
        out[3 * ldo + q] = s30; out[3 * ldo + q + 1] = s31;                                 \
    }                                                                                       \
    for (; q < cols; q++) {                                                                 \
        const T *m0 = mat + q * ldm;                                                        \
        T s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                                   \
_Pragma("omp simd reduction(+ : s0, s1, s2, s3)")                                           \
        for (int64_t j = 0; j < len; j++) {                                                 \
            s0 += a0[j] * m0[j]; s1 += a1[j] * m0[j];                                       \
            s2 += a2[j] * m0[j]; s3 += a3[j] * m0[j];                                       \
        }                                                                                   \
        out[q] = s0; out[ldo + q] = s1; out[2 * ldo + q] = s2; out[3 * ldo + q] = s3;       \
    }                                                                                       \
}
TILE_DOTS(tile_dots, double)
TILE_DOTS(tile_dots_f32, float)

/* The first index of the largest score[q] + offset[q], q < cols (torch.argmax's rule). */
static int64_t first_argmax(const double *score, const double *offset, int64_t cols)
{
    int64_t best = 0;
    double top = score[0] + offset[0];
    for (int64_t q = 1; q < cols; q++) {
        double value = score[q] + offset[q];
        if (value > top) { top = value; best = q; }
    }
    return best;
}

/* The first index of the largest score[q] + offset[q] (float32) when no other lies within
 * slack of it, so that float64 would pick it too; -1 when float32 cannot tell. */
static int64_t sure_argmax_f32(const float *score, const float *offset, int64_t cols,
                               double slack)
{
    int64_t best = 0;
    float top = score[0] + offset[0];
    for (int64_t q = 1; q < cols; q++) {
        float value = score[q] + offset[q];
        if (value > top) { top = value; best = q; }
    }
    double floor = (double)top - slack;
    for (int64_t q = 0; q < cols; q++)
        if (q != best && (double)(score[q] + offset[q]) >= floor) return -1;
    return best;
}

/* argmax_q x.w_q + offset[q] in float64, w_q = w + q * D. */
static int64_t exact_argmax(const double *x, const double *w, const double *offset,
                            int64_t cols, int64_t D)
{
    int64_t best = 0;
    double top = 0.0;
    for (int64_t q = 0; q < cols; q++) {
        const double *wq = w + q * D;
        double value = 0.0;
#pragma omp simd reduction(+ : value)
        for (int64_t j = 0; j < D; j++) value += x[j] * wq[j];
        value += offset[q];
        if (q == 0 || value > top) { top = value; best = q; }
    }
    return best;
}

/* Pass 1: sums[y_i] += h_i for n rows h (n x D) with labels y in [0, C). */
#define CLASS_SUMS(NAME, T)                                                     \
    void NAME(const T *h, const int64_t *y, int64_t n, int64_t D, double *sums) \
    {                                                                           \
        for (int64_t i = 0; i < n; i++) {                                       \
            const T *row = h + i * D;                                           \
            double *sum = sums + y[i] * D;                                      \
            _Pragma("omp simd")                                                 \
            for (int64_t j = 0; j < D; j++) sum[j] += (double)row[j];           \
        }                                                                       \
    }
CLASS_SUMS(nct_class_sums_f32, float)
CLASS_SUMS(nct_class_sums_f64, double)

/* Pass 2 over n rows h (n x D), labels y in [0, C):
 *   x = h - shift[y]; sums[y] += x; sq_norms[y] += ||x||^2;
 *   p = basis^T x (k values: rows 0..k-1 of mat); moments[t] += p_t^2;
 *   nearest centre: argmax_q p.coords[q] + ncc_offset[y, q] when coords (C x k) is given,
 *     else x.c_q + ncc_offset[y, q] with c_q = rows k..k+C-1 of mat (m = k or k + C);
 *   classifier: argmax_q h.w_q + b_q, scored in float32 (w32, b32) and re-scored in
 *     float64 as x.w_q + cls_offset[y, q] (w64; cls_offset[y, q] = shift[y].w_q + b_q)
 *     for the rows where another score lies within the float32 rounding bound of the
 *     top one: bound[0] * (||h|| bound[1] + bound[2]) (nctools.decisions.SureArgmax);
 *   events += (classifier != centre, classifier == y, centre == y).
 * Rows go in blocks of block_rows (a multiple of TILE) and mat in slices of as many
 * rows, so that a block and a slice stay in the L2 cache together. work holds
 * block_rows * (D + m + C + 1) doubles, work32 block_rows * (D + C) floats. */
#define IS_F32(T) (sizeof(T) == sizeof(float))
#define SECOND_PASS(NAME, T)                                                                 \
    void NAME(const T *h, const int64_t *y, int64_t n, int64_t D, int64_t C,                 \
              const double *shift, const double *mat, int64_t m, int64_t k,                  \
              const double *coords, const double *ncc_offset, const float *w32,              \
              const float *b32, const double *w64, const double *cls_offset,                 \
              const double *bound, double *sums, double *sq_norms, double *moments,          \
              int64_t *events, double *work, float *work32, int64_t block_rows)              \
    {                                                                                        \
        double *x = work, *out = x + block_rows * D, *near = out + block_rows * m;           \
        double *norms = near + block_rows * C;                                               \
        float *h32 = work32, *scores = h32 + block_rows * D;                                 \
        for (int64_t start = 0; start < n; start += block_rows) {                            \
            int64_t rows = n - start < block_rows ? n - start : block_rows;                  \
            int64_t tiles = (rows + TILE - 1) / TILE, whole = rows / TILE * TILE;            \
            for (int64_t r = 0; r < tiles * TILE; r++) {                                     \
                double *xr = x + r * D;                                                      \
                float *hr = h32 + r * D;                                                     \
                if (r >= rows) {                                                             \
                    for (int64_t j = 0; j < D; j++) { xr[j] = 0.0; hr[j] = 0.0f; }           \
                    continue;                                                                \
                }                                                                            \
                const T *row = h + (start + r) * D;                                          \
                int64_t c = y[start + r];                                                    \
                const double *s = shift + c * D;                                             \
                double *sum = sums + c * D, sq = 0.0, hh = 0.0;                              \
                _Pragma("omp simd reduction(+ : sq, hh)")                                    \
                for (int64_t j = 0; j < D; j++) {                                            \
                    double v = (double)row[j] - s[j];                                        \
                    xr[j] = v; sum[j] += v; sq += v * v;                                     \
                    hh += (double)row[j] * (double)row[j];                                   \
                }                                                                            \
                sq_norms[c] += sq;                                                           \
                norms[r] = sqrt(hh);                                                         \
                if (!IS_F32(T) || r >= whole) /* float32 rows, padded to whole tiles */      \
                    for (int64_t j = 0; j < D; j++) hr[j] = (float)row[j];                   \
            }                                                                                \
            for (int64_t q = 0; q < m; q += block_rows) {                                    \
                int64_t cols = m - q < block_rows ? m - q : block_rows;                      \
                for (int64_t t = 0; t < tiles; t++)                                          \
                    tile_dots(x + t * TILE * D, D, mat + q * D, D, cols, D,                  \
                              out + t * TILE * m + q, m);                                    \
            }                                                                                \
            for (int64_t t = 0; t < tiles; t++) {                                            \
                const float *h32_tile = IS_F32(T) && (t + 1) * TILE <= whole                 \
                    ? (const float *)(h + (start + t * TILE) * D) : h32 + t * TILE * D;      \
                tile_dots_f32(h32_tile, D, w32, D, C, D, scores + t * TILE * C, C);          \
                if (coords)                                                                  \
                    tile_dots(out + t * TILE * m, m, coords, k, C, k, near + t * TILE * C, C); \
            }                                                                                \
            for (int64_t r = 0; r < rows; r++) {                                             \
                const double *o = out + r * m;                                               \
                int64_t c = y[start + r];                                                    \
                for (int64_t t = 0; t < k; t++) moments[t] += o[t] * o[t];                   \
                int64_t nearest = first_argmax(coords ? near + r * C : o + k,                \
                                               ncc_offset + c * C, C);                       \
                double slack = bound[0] * (norms[r] * bound[1] + bound[2]);                  \
                int64_t said = sure_argmax_f32(scores + r * C, b32, C, slack);               \
                if (said < 0) said = exact_argmax(x + r * D, w64, cls_offset + c * C, C, D); \
                events[0] += said != nearest;                                                \
                events[1] += said == c;                                                      \
                events[2] += nearest == c;                                                   \
            }                                                                                \
        }                                                                                    \
    }
SECOND_PASS(nct_second_pass_f32, float)
SECOND_PASS(nct_second_pass_f64, double)
