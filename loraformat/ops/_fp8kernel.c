/* The FP8 E4M3 passes of a merge, one loop each (the Python side is loraformat/ops/fp8_native.py; the numpy
 * reference they are tested bit for bit against is loraformat/ops/fp8.py).
 *
 * numpy needs about 40 passes over a merged weight to decode it, re-quantize it with fresh scales and measure what
 * the re-quantization cost; here each row is decoded in one pass and encoded-and-measured in one pass, in cache,
 * with the GIL released. The arithmetic is the reference's, operation by operation, in IEEE single precision, and
 * no multiply and add may be contracted into one rounding:
 *
 *   decode:  w = fl(value(q) * s)
 *   encode:  y = clip(fl(w / s'), -448, 448); q' = E4M3(y) rounded to nearest even (NaN -> 0x7F with y's sign);
 *            e = fl(value(q') * s') - w  and  d = w - fl(value(q) * s): the re-quantization error and the delta
 *            against the stored base, reduced to max |.| and sum of squares (statistics, summed in any order)
 *
 * A scale is scale[i * row_step + j * col_step] for element (i, j): steps (0, 0) per tensor, (1, 0) per output
 * channel, (0, 1) for the per-column scales of one block-row. The row loops are compiled for x86-64-v4 (AVX-512),
 * x86-64-v3 (AVX2) and the baseline, and the best the CPU has is picked at import. No file or network I/O.
 */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off", "no-trapping-math")
#elif defined(_MSC_VER)
#pragma fp_contract(off)
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MULTI_ISA 1
#define TARGET_V4 __attribute__((target("arch=x86-64-v4,prefer-vector-width=512")))
#define TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#endif

INLINE uint32_t f32_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

INLINE float f32_from_bits(uint32_t u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* value(c) of an E4M3 code in integer arithmetic (vectorizes, unlike a table lookup): normal codes put their 7
 * value bits at bits 20-26 of a float32 and re-bias the exponent; subnormal ones are m / 512; 0x7F is NaN. */
INLINE float e4m3_value(uint32_t c) {
    uint32_t sign = (c & 0x80u) << 24, v = c & 0x7Fu;
    float normal = f32_from_bits(sign | ((v << 20) + (120u << 23)));
    float sub = f32_from_bits(f32_bits((float)(int32_t)(v & 7u) * (1.0f / 512.0f)) | sign);
    float r = (v >> 3) ? normal : sub;
    return v == 0x7Fu ? NAN : r;
}

/* E4M3 code of y (|y| <= 448 or NaN) and its value, as loraformat.ops.fp8.f32_to_e4m3, branch-free: normal
 * values round float32's mantissa at bit 20 (a carry moves into the exponent, as rounding up should); values below
 * 2^-6 are rint(|y| * 512), ties to even, by adding and subtracting 2^23 (exact below 2^22). */
INLINE uint32_t e4m3_code(float y, float *value) {
    uint32_t bits = f32_bits(y);
    uint32_t rounded = (bits + ((bits >> 20) & 1u) + 0x7FFFFu) & 0xFFF00000u;
    uint32_t u = (rounded - (120u << 23)) >> 20;
    uint32_t normal = (u | ((u >> 4) & 0x80u)) & 0xFFu;
    uint32_t sign = (bits >> 24) & 0x80u;
    uint32_t mag = bits & 0x7FFFFFFFu;
    float small = (fabsf(y) * 512.0f + 8388608.0f) - 8388608.0f;
    float small_value = f32_from_bits(f32_bits(small * (1.0f / 512.0f)) | (sign << 24));
    uint32_t special = (mag > 0x7F800000u) ? (0x7Fu | sign) : ((uint32_t)(int32_t)small | sign);
    int is_special = mag - 0x3C800000u > 0x43E00000u - 0x3C800000u;
    *value = is_special ? (mag > 0x7F800000u ? y : small_value) : f32_from_bits(rounded);
    return is_special ? special : normal;
}

typedef struct {
    uint32_t max_err, max_delta; /* bits of non-negative floats: integers order them alike, NaN above inf */
    double sq_err, sq_delta;
} Sums;

#define DECODE_ROW(NAME, TARGET)                                                                                  \
    TARGET static void NAME(const uint8_t *restrict q, const float *restrict s, Py_ssize_t cs,                    \
                            float *restrict out, Py_ssize_t n) {                                                  \
        if (cs) {                                                                                                 \
            for (Py_ssize_t j = 0; j < n; j++) out[j] = e4m3_value(q[j]) * s[j];                                  \
        } else {                                                                                                  \
            float sv = s[0];                                                                                      \
            for (Py_ssize_t j = 0; j < n; j++) out[j] = e4m3_value(q[j]) * sv;                                    \
        }                                                                                                         \
    }

/* max |v| and the sum of squares, reassociated so that the loop vectorizes */
#define REDUCE(NAME, TARGET)                                                                                      \
    TARGET static void NAME(const float *restrict v, Py_ssize_t n, uint32_t *max_bits, double *sum_sq) {          \
        uint32_t m = *max_bits;                                                                                   \
        float acc = 0.0f;                                                                                         \
        _Pragma("omp simd reduction(max : m) reduction(+ : acc)") for (Py_ssize_t j = 0; j < n; j++) {           \
            uint32_t a = f32_bits(v[j]) & 0x7FFFFFFFu;                                                            \
            m = a > m ? a : m;                                                                                    \
            acc += v[j] * v[j];                                                                                   \
        }                                                                                                         \
        *max_bits = m;                                                                                            \
        *sum_sq += acc;                                                                                           \
    }

/* One row with contiguous per-column scales: codes into q, the error into e and the delta into d, then reduced */
#define ENCODE_ROW(NAME, REDUCE_NAME, TARGET)                                                                     \
    TARGET static void NAME(const float *restrict w, const float *restrict s, const uint8_t *restrict bq,         \
                            const float *restrict bs, uint8_t *restrict q, float *restrict e, float *restrict d, \
                            Py_ssize_t n, Sums *st) {                                                             \
        for (Py_ssize_t j = 0; j < n; j++) {                                                                      \
            float x = w[j], sv = s[j], r;                                                                         \
            float y = x / sv;                                                                                     \
            y = y < -448.0f ? -448.0f : (y > 448.0f ? 448.0f : y);                                                \
            q[j] = (uint8_t)e4m3_code(y, &r);                                                                     \
            e[j] = r * sv - x;                                                                                    \
            d[j] = x - e4m3_value(bq[j]) * bs[j];                                                                 \
        }                                                                                                         \
        REDUCE_NAME(e, n, &st->max_err, &st->sq_err);                                                             \
        REDUCE_NAME(d, n, &st->max_delta, &st->sq_delta);                                                         \
    }

/* running max |w| of one row into per-column maxima (float bits: NaN stays above everything) */
#define ABSMAX_ROW(NAME, TARGET)                                                                                  \
    TARGET static void NAME(const float *restrict w, uint32_t *restrict m, Py_ssize_t n) {                       \
        for (Py_ssize_t j = 0; j < n; j++) {                                                                      \
            uint32_t a = f32_bits(w[j]) & 0x7FFFFFFFu;                                                            \
            m[j] = a > m[j] ? a : m[j];                                                                           \
        }                                                                                                         \
    }

typedef void (*decode_row_fn)(const uint8_t *, const float *, Py_ssize_t, float *, Py_ssize_t);
typedef void (*encode_row_fn)(const float *, const float *, const uint8_t *, const float *, uint8_t *, float *,
                              float *, Py_ssize_t, Sums *);
typedef void (*absmax_row_fn)(const float *, uint32_t *, Py_ssize_t);
typedef struct {
    const char *name;
    decode_row_fn decode_row;
    encode_row_fn encode_row;
    absmax_row_fn absmax_row;
} Isa;

#define NO_TARGET
DECODE_ROW(decode_row_base, NO_TARGET)
REDUCE(reduce_base, NO_TARGET)
ENCODE_ROW(encode_row_base, reduce_base, NO_TARGET)
ABSMAX_ROW(absmax_row_base, NO_TARGET)
#ifdef MULTI_ISA
DECODE_ROW(decode_row_v3, TARGET_V3)
REDUCE(reduce_v3, TARGET_V3)
ENCODE_ROW(encode_row_v3, reduce_v3, TARGET_V3)
ABSMAX_ROW(absmax_row_v3, TARGET_V3)
DECODE_ROW(decode_row_v4, TARGET_V4)
REDUCE(reduce_v4, TARGET_V4)
ENCODE_ROW(encode_row_v4, reduce_v4, TARGET_V4)
ABSMAX_ROW(absmax_row_v4, TARGET_V4)
#endif

static const Isa ISAS[] = {
#ifdef MULTI_ISA
    {"x86-64-v4", decode_row_v4, encode_row_v4, absmax_row_v4},
    {"x86-64-v3", decode_row_v3, encode_row_v3, absmax_row_v3},
#endif
    {"baseline", decode_row_base, encode_row_base, absmax_row_base},
};
#define N_ISAS ((int)(sizeof(ISAS) / sizeof(ISAS[0])))
static const Isa *isa = &ISAS[N_ISAS - 1];

static int isa_supported(const Isa *candidate) {
#ifdef MULTI_ISA
    __builtin_cpu_init();
    if (candidate->decode_row == decode_row_v4)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2");
    if (candidate->decode_row == decode_row_v3)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
#endif
    return candidate->decode_row != NULL;
}

static void release(Py_buffer *b, int n) {
    for (int k = 0; k < n; k++)
        if (b[k].obj) PyBuffer_Release(&b[k]);
}

/* rows x cols elements of item bytes fit in buf, and the last scale addressed by the steps fits in scale */
static int check(Py_ssize_t rows, Py_ssize_t cols, Py_buffer *buf, Py_ssize_t item, Py_buffer *scale, Py_ssize_t rs,
                 Py_ssize_t cs) {
    if (rows < 0 || cols < 0 || rs < 0 || cs < 0 || cs > 1) {
        PyErr_SetString(PyExc_ValueError, "negative size or step, or a column step other than 0 or 1");
        return -1;
    }
    if (rows && cols && buf->len / item / cols < rows) {
        PyErr_SetString(PyExc_ValueError, "buffer smaller than rows x cols");
        return -1;
    }
    /* the last scale addressed, (rows - 1) * rs + (cols - 1) * cs, must lie in the buffer: checked by division,
     * so that no step however large can overflow the product */
    Py_ssize_t n_scale = scale->len / (Py_ssize_t)sizeof(float);
    Py_ssize_t r = rows ? rows - 1 : 0, c = cols ? (cols - 1) * cs : 0;
    if (c >= n_scale || (rs && r > (n_scale - 1 - c) / rs)) {
        PyErr_SetString(PyExc_ValueError, "scale buffer too small for its steps");
        return -1;
    }
    return 0;
}

/* decode(q, scale, row_step, col_step, rows, cols, out): out = value(q) * scale, float32 */
static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer b[3] = {{0}};
    Py_ssize_t rs, cs, rows, cols;
    if (!PyArg_ParseTuple(args, "y*y*nnnnw*", &b[0], &b[1], &rs, &cs, &rows, &cols, &b[2])) {
        release(b, 3);
        return NULL;
    }
    if (check(rows, cols, &b[0], 1, &b[1], rs, cs) || check(rows, cols, &b[2], 4, &b[1], rs, cs)) {
        release(b, 3);
        return NULL;
    }
    const uint8_t *q = b[0].buf;
    const float *s = b[1].buf;
    float *out = b[2].buf;
    decode_row_fn row = isa->decode_row;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < rows; i++) row(q + i * cols, s + i * rs, cs, out + i * cols, cols);
    Py_END_ALLOW_THREADS
    release(b, 3);
    Py_RETURN_NONE;
}

/* The scales of row i as contiguous per-column scales: the buffer itself when they step by column, else ``tmp``
 * filled with the row's one scale. */
static const float *row_scales(const float *s, Py_ssize_t i, Py_ssize_t rs, Py_ssize_t cs, float *tmp,
                               Py_ssize_t cols) {
    if (cs) return s + i * rs;
    for (Py_ssize_t j = 0; j < cols; j++) tmp[j] = s[i * rs];
    return tmp;
}

/* encode(w, scale, row_step, col_step, base_q, base_scale, base_row_step, base_col_step, rows, cols, q_out)
 *   -> (max |e|, sum e^2, max |d|, sum d^2) */
static PyObject *encode(PyObject *self, PyObject *args) {
    Py_buffer b[5] = {{0}};
    Py_ssize_t rs, cs, brs, bcs, rows, cols;
    if (!PyArg_ParseTuple(args, "y*y*nny*y*nnnnw*", &b[0], &b[1], &rs, &cs, &b[2], &b[3], &brs, &bcs, &rows,
                          &cols, &b[4])) {
        release(b, 5);
        return NULL;
    }
    if (check(rows, cols, &b[0], 4, &b[1], rs, cs) || check(rows, cols, &b[2], 1, &b[3], brs, bcs) ||
        check(rows, cols, &b[4], 1, &b[1], rs, cs)) {
        release(b, 5);
        return NULL;
    }
    const float *w = b[0].buf, *s = b[1].buf, *bsc = b[3].buf;
    const uint8_t *bq = b[2].buf;
    uint8_t *q = b[4].buf;
    float *tmp = PyMem_RawMalloc(4 * (size_t)(cols ? cols : 1) * sizeof(float));
    if (!tmp) {
        release(b, 5);
        return PyErr_NoMemory();
    }
    Sums st = {0, 0, 0.0, 0.0};
    encode_row_fn row = isa->encode_row;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < rows; i++) {
        const float *si = row_scales(s, i, rs, cs, tmp, cols);
        const float *bi = row_scales(bsc, i, brs, bcs, tmp + cols, cols);
        row(w + i * cols, si, bq + i * cols, bi, q + i * cols, tmp + 2 * cols, tmp + 3 * cols, cols, &st);
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(tmp);
    release(b, 5);
    return Py_BuildValue("(dddd)", (double)f32_from_bits(st.max_err), st.sq_err, (double)f32_from_bits(st.max_delta),
                         st.sq_delta);
}

/* column_absmax(w, rows, cols, out): out[j] = max_i |w[i, j]| (float32; NaN if any is NaN) */
static PyObject *column_absmax(PyObject *self, PyObject *args) {
    Py_buffer b[2] = {{0}};
    Py_ssize_t rows, cols;
    if (!PyArg_ParseTuple(args, "y*nnw*", &b[0], &rows, &cols, &b[1])) {
        release(b, 2);
        return NULL;
    }
    if (rows < 0 || cols < 0 || (rows && cols && b[0].len / 4 / cols < rows) || b[1].len / 4 < cols) {
        PyErr_SetString(PyExc_ValueError, "buffer smaller than rows x cols, or out smaller than cols");
        release(b, 2);
        return NULL;
    }
    const float *w = b[0].buf;
    uint32_t *m = b[1].buf;
    absmax_row_fn row = isa->absmax_row;
    Py_BEGIN_ALLOW_THREADS
    memset(m, 0, (size_t)cols * sizeof(uint32_t));
    for (Py_ssize_t i = 0; i < rows; i++) row(w + i * cols, m, cols);
    Py_END_ALLOW_THREADS
    release(b, 2);
    Py_RETURN_NONE;
}

/* isas() -> the instruction sets this CPU can run, best first; use(name) switches to one (tests run them all) */
static PyObject *isas(PyObject *self, PyObject *unused) {
    PyObject *out = PyList_New(0);
    for (int k = 0; out && k < N_ISAS; k++)
        if (isa_supported(&ISAS[k])) {
            PyObject *name = PyUnicode_FromString(ISAS[k].name);
            if (!name || PyList_Append(out, name) < 0) Py_CLEAR(out);
            Py_XDECREF(name);
        }
    return out;
}

static PyObject *use(PyObject *self, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    for (int k = 0; k < N_ISAS; k++)
        if (strcmp(ISAS[k].name, name) == 0 && isa_supported(&ISAS[k])) {
            isa = &ISAS[k];
            Py_RETURN_NONE;
        }
    PyErr_Format(PyExc_ValueError, "instruction set %s is not available here", name);
    return NULL;
}

static PyObject *current(PyObject *self, PyObject *unused) { return PyUnicode_FromString(isa->name); }

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS, "decode(q, scale, row_step, col_step, rows, cols, out): E4M3 -> fp32"},
    {"encode", encode, METH_VARARGS,
     "encode(w, scale, row_step, col_step, base_q, base_scale, base_row_step, base_col_step, rows, cols, q_out)"
     " -> (max_err, sq_err, max_delta, sq_delta)"},
    {"column_absmax", column_absmax, METH_VARARGS, "column_absmax(w, rows, cols, out): max |w| per column"},
    {"isas", isas, METH_NOARGS, "instruction sets this CPU runs, best first"},
    {"use", use, METH_O, "use(name): run the loops compiled for that instruction set"},
    {"current", current, METH_NOARGS, "the instruction set in use"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fp8kernel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fp8kernel(void) {
    for (int k = 0; k < N_ISAS; k++)
        if (isa_supported(&ISAS[k])) {
            isa = &ISAS[k];
            break;
        }
    return PyModule_Create(&module);
}
