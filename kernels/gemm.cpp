// GEMM / GEMV with fp32 activations over fp32, int8, fp8 (e4m3fn) and int4 weights:
// y[M, N] = x[M, K] @ W^T (+ bias), W kept as nn.Linear stores it ([N, K] rows, no repacking).
//
// Both operands run contiguously along K, so the micro-kernel is a "dot" tile: MR rows of x against
// NR rows of W, one vector accumulator per (x row, W row) pair, reduced horizontally once per tile
// (four accumulators at a time). Each weight vector is loaded and widened (int8 / fp8 / int4 to
// fp32, in registers) once per k step and used for all MR x rows; int8 / fp8 per-channel scales go
// on the reduced sums, not on every weight.
//
// Threads (OpenMP, torch's libgomp) take contiguous slices of W's rows ("tasks", a few per thread,
// each small enough to stay in L2); x is shared. A task runs x tile after x tile (the tile stays in
// L1) over all its weight tiles: the first x tile reads the weights from memory, fetching the next
// weight tile ahead in software (short rows defeat the hardware prefetchers), the later x tiles
// read them from L2. At M = 1 (decode) every weight byte is read once, at its stored size.
//
// int4 with groups that are a multiple of 32 inputs (the format's default) decodes 2 * VL inputs
// at a time through a per-group lookup table; x is first copied with each 2 * VL-input chunk
// reordered to [even inputs, odd inputs], the order the nibbles come out of a byte vector in (low
// nibble = even input), so the decode needs no interleave. As int4's decode costs more than int8's
// widening, a task with more than one x tile decodes its slice once into an fp32 panel; other even
// group sizes always take that panel, in natural order.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
// GCC 12's intrinsics headers trip -Wuninitialized on their own _mm*_undefined_* helpers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include "internal.h"

namespace ns::NS_ISA {

namespace {

// ------------------------------------------------------------------------------ vector layer
// The one place that differs by instruction set: the vector width VL, the tile shape, loads,
// widening conversions, and the 4-way horizontal reduction.

#if defined(__AVX512F__)

constexpr int VL = 16;
constexpr int MR_MAX = 4;  // 4x4 accumulators + 4 weight vectors + 1 x vector of the 32 zmm registers
constexpr int NR = 4;      // weight rows per tile (also for one x row: 8, more streams, measured slower)
using vf = __m512;

inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline __mmask16 first(int n) { return __mmask16((1u << n) - 1); }
inline vf vload_n(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }

inline vf i8_to_f(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)); }
inline vf cvt_i8(const int8_t* p) { return i8_to_f(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline vf cvt_i8_n(const int8_t* p, int n) { return i8_to_f(_mm_maskz_loadu_epi8(first(n), p)); }

// e4m3fn bytes -> fp32 scaled by 2^-120, exactly: sign-extend the byte, move its 7 low bits
// (exponent, mantissa) to the float's bits 20..26 and keep bit 31 (the sign, which the extension
// copied up). The float's exponent field is then the fp8 one, so the value is the fp8 value times
// 2^(7 - 127), fp8 subnormals landing on float subnormals. See FP8_X_SHIFT for where 2^120 goes.
inline vf fp8_bits(__m128i b) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(_mm512_cvtepi8_epi32(b), 20),
                                                _mm512_set1_epi32(int32_t(0x87F00000u))));
}
inline vf cvt_fp8_raw(const uint8_t* p) { return fp8_bits(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline vf cvt_fp8_raw_n(const uint8_t* p, int n) { return fp8_bits(_mm_maskz_loadu_epi8(first(n), p)); }

// Sums of four accumulators, in one vector's worth of shuffles: pairwise interleave-and-add halves
// the lanes twice (a,b,c,d side by side in each 128-bit lane), then the four 128-bit lanes are added.
inline void reduce4(vf a, vf b, vf c, vf d, float* out) {
    const vf ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const vf cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
    const vf abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                  _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1)));
}

// int4: one group's 16 dequantized values q * scale + minimum, q = 0..15, as a lookup table; a
// byte's nibble indexes it directly (vpermps reads only the index's low 4 bits).
struct I4Group {
    vf table;
};
inline I4Group i4_group(float scale, float minimum) {
    const vf q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return {_mm512_fmadd_ps(q, _mm512_set1_ps(scale), _mm512_set1_ps(minimum))};
}
// 2 * VL inputs (VL bytes) -> w[0] = the even inputs, w[1] = the odd ones.
inline void decode_i4(const uint8_t* p, const I4Group& g, vf* w) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    w[0] = _mm512_permutexvar_ps(b, g.table);
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), g.table);
}

#elif defined(__AVX2__)

constexpr int VL = 8;
constexpr int MR_MAX = 3;  // 3x4 accumulators of the 16 ymm registers; the rest stream
constexpr int NR = 4;
using vf = __m256;

inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline __m256i first(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vf vload_n(const float* p, int n) { return _mm256_maskload_ps(p, first(n)); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }

// AVX2 has no byte-masked load: a tail of n < 8 bytes goes through a zero-padded copy.
inline __m128i load8(const void* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
inline __m128i load8_n(const void* p, int n) {
    uint8_t buf[8] = {};
    std::memcpy(buf, p, size_t(n));
    return load8(buf);
}
inline vf i8_to_f(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }
inline vf cvt_i8(const int8_t* p) { return i8_to_f(load8(p)); }
inline vf cvt_i8_n(const int8_t* p, int n) { return i8_to_f(load8_n(p, n)); }
// See the AVX-512 version.
inline vf fp8_bits(__m128i b) {
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(_mm256_cvtepi8_epi32(b), 20),
                                                _mm256_set1_epi32(int32_t(0x87F00000u))));
}
inline vf cvt_fp8_raw(const uint8_t* p) { return fp8_bits(load8(p)); }
inline vf cvt_fp8_raw_n(const uint8_t* p, int n) { return fp8_bits(load8_n(p, n)); }

inline void reduce4(vf a, vf b, vf c, vf d, float* out) {
    const vf abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
}

// int4 on AVX2: vpermps has 8 entries, so the nibbles are converted and scaled instead.
struct I4Group {
    vf scale, minimum;
};
inline I4Group i4_group(float scale, float minimum) { return {_mm256_set1_ps(scale), _mm256_set1_ps(minimum)}; }
// 2 * VL inputs (VL bytes) -> w[0] = the even inputs, w[1] = the odd ones.
inline void decode_i4(const uint8_t* p, const I4Group& g, vf* w) {
    const __m256i b = _mm256_cvtepu8_epi32(load8(p));
    const __m256i lo = _mm256_and_si256(b, _mm256_set1_epi32(0xF)), hi = _mm256_srli_epi32(b, 4);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), g.scale, g.minimum);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), g.scale, g.minimum);
}

#else  // portable scalar build: a "vector" is one float

constexpr int VL = 1;
constexpr int MR_MAX = 4;
constexpr int NR = 4;
using vf = float;

inline vf vzero() { return 0.f; }
inline vf vload(const float* p) { return *p; }
inline vf vload_n(const float* p, int) { return *p; }
inline void vstore(float* p, vf v) { *p = v; }
inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
inline vf cvt_i8(const int8_t* p) { return float(*p); }
inline vf cvt_i8_n(const int8_t* p, int) { return float(*p); }
inline vf cvt_fp8_raw(const uint8_t* p) {
    // See the AVX-512 version; here the sign goes from bit 7 to bit 31 directly.
    const uint32_t bits = (uint32_t(*p & 0x7F) << 20) | (uint32_t(*p & 0x80) << 24);
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
inline vf cvt_fp8_raw_n(const uint8_t* p, int) { return cvt_fp8_raw(p); }
inline void reduce4(vf a, vf b, vf c, vf d, float* out) {
    out[0] = a, out[1] = b, out[2] = c, out[3] = d;
}
struct I4Group {
    float scale, minimum;
};
inline I4Group i4_group(float scale, float minimum) { return {scale, minimum}; }
// One byte -> its two inputs (the even/odd order of a 2-input chunk is the natural one).
inline void decode_i4(const uint8_t* p, const I4Group& g, vf* w) {
    w[0] = float(*p & 0xF) * g.scale + g.minimum;
    w[1] = float(*p >> 4) * g.scale + g.minimum;
}

#endif

// ------------------------------------------------------------------------------ weight formats
// fp8 codes are read as floats 2^120 too small (cvt_fp8_raw: three instructions, no multiply, which
// matters where the GEMV is bound by the widening rather than by memory). linear() instead
// multiplies x by 2^FP8_X_SHIFT beforehand and the sums by 2^(120 - FP8_X_SHIFT) afterwards: both
// exact, and halfway, so that neither x (unless |x| > 2^68) overflows nor products of ordinary
// sizes fall to subnormals, and every product and sum rounds as it would unscaled.
constexpr int FP8_RAW_EXP = 120;
constexpr int FP8_X_SHIFT = 60;

// A weight row as VL floats at a time (unscaled: int8 / fp8 scales are applied to the sums).
struct F32Row {
    using T = float;
    static vf load(const T* p) { return vload(p); }
    static vf load_n(const T* p, int n) { return vload_n(p, n); }
};
struct I8Row {
    using T = int8_t;
    static vf load(const T* p) { return cvt_i8(p); }
    static vf load_n(const T* p, int n) { return cvt_i8_n(p, n); }
};
struct FP8RawRow {  // times 2^-FP8_RAW_EXP
    using T = uint8_t;
    static vf load(const T* p) { return cvt_fp8_raw(p); }
    static vf load_n(const T* p, int n) { return cvt_fp8_raw_n(p, n); }
};

// ------------------------------------------------------------------------------ micro-kernels
// One call: rows of x (row stride ldx) and where to write y, shared by every tile.
struct Job {
    const float* x;
    int64_t ldx;
    float* y;
    int64_t ldy;
    int64_t M, K;
    const float* scale;  // per output column, applied to the sums (int8 / fp8), or null
    float scale_mult;    // with it, a power of two (fp8: see FP8_X_SHIFT)
    const float* bias;   // or null
};

// y[m0 + i, n + j] = out[i][j] (* scale) (+ bias) for the tile's valid mr x nr corner.
inline void store_tile(const Job& job, int64_t m0, int mr, int64_t n, int nr, const float (*out)[NR]) {
    for (int i = 0; i < mr; ++i) {
        float* y = job.y + (m0 + i) * job.ldy + n;
        for (int j = 0; j < nr; ++j) {
            float v = out[i][j];
            if (job.scale) v = v * job.scale_mult * job.scale[n + j];
            if (job.bias) v += job.bias[n + j];
            y[j] = v;
        }
    }
}

// The reduced accumulators of an MR x NR tile into out.
template <int MR>
inline void reduce_tile(const vf (&acc)[MR][NR], float (*out)[NR]) {
    static_assert(NR == 4, "a tile's row of accumulators is reduced by one reduce4");
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) reduce4(acc[i][0], acc[i][1], acc[i][2], acc[i][3], out[i]);
}

// Software prefetch of the next tile's weights while this one runs (first x tile only). A tile's NR
// rows are one contiguous run of memory, read as NR short streams (a 576-input int8 row is nine
// cache lines, an fp32 one 36), too short for the hardware prefetchers to get ahead of; the tile's
// k loop consumes STEP bytes of it per step, and fetches the same number of bytes one tile ahead,
// in order. (fp32 too: measured cold at M = 1, SmolLM2's gate_up 0.372 -> 0.292 ms and LM head
// 5.43 -> 3.88 ms, its whole fp32 decode step at one sequence 29.9 -> 23.1 ms.)
template <int STEP>
struct NextTile {
    static constexpr bool on = STEP >= 64;  // (at least a cache line a step: vector builds)
    const char* p;
    void step() {
        if constexpr (on) {
            for (int b = 0; b < STEP; b += 64) prefetch_l1(p + b);
            p += STEP;
        }
    }
};

// Dot tile: MR rows of x against NR weight rows (w: row 0, rows ldw elements apart; only the first
// nr are real: the others repeat the last one and their sums are dropped) over all K inputs.
// PREFETCH: fetch the next tile, the NR rows after these (see NextTile).
template <int MR, class Row, bool PREFETCH>
void dot_tile(const float* x, int64_t ldx, const typename Row::T* w, int64_t ldw, int nr, int64_t K,
              float (*out)[NR]) {
    const typename Row::T* wr[NR];
    for (int j = 0; j < NR; ++j) wr[j] = w + std::min(j, nr - 1) * ldw;
    vf acc[MR][NR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < NR; ++j) acc[i][j] = vzero();

    constexpr int STEP = PREFETCH ? int(NR * VL * sizeof(typename Row::T)) : 0;  // bytes of W a k step
    NextTile<STEP> next{reinterpret_cast<const char*>(w + NR * ldw)};
    int64_t k = 0;
    for (; k + VL <= K; k += VL) {
        next.step();
        vf wv[NR];
#pragma GCC unroll 8
        for (int j = 0; j < NR; ++j) wv[j] = Row::load(wr[j] + k);
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) {
            const vf xv = vload(x + i * ldx + k);
#pragma GCC unroll 8
            for (int j = 0; j < NR; ++j) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
        }
    }
    if (k < K) {  // K not a multiple of VL: the last inputs, zero-padded on both sides
        const int n = int(K - k);
        vf wv[NR];
        for (int j = 0; j < NR; ++j) wv[j] = Row::load_n(wr[j] + k, n);
        for (int i = 0; i < MR; ++i) {
            const vf xv = vload_n(x + i * ldx + k, n);
            for (int j = 0; j < NR; ++j) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
        }
    }
    reduce_tile<MR>(acc, out);
}

// int4 dot tile half (groups a multiple of 32 inputs; x in reorder_x's order): MR rows of x against
// two weight rows w0, w1 (ldw bytes apart), each read straight through. A group's lookup table is
// built in registers as the row reaches it, and each 2*VL-input piece is decoded once for the MR
// rows. One x row keeps the even and odd halves in separate accumulators (four chains in flight).
// GS: the group size when known at compile time (32, the format's default: no inner loop), else 0.
template <int MR, int GS>
void dot_pair_i4(const float* x, int64_t ldx, const uint8_t* w0, const uint8_t* w1, const float* s0,
                 const float* s1, const float* m0, const float* m1, int64_t groups, int64_t K, int64_t ldw,
                 vf (&out)[MR][2]) {
    vf acc[MR][2][2];  // [x row][weight row][even, odd]
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) acc[i][0][0] = acc[i][0][1] = acc[i][1][0] = acc[i][1][1] = vzero();
    const int64_t group_size = GS ? GS : K / groups;
    for (int64_t g = 0; g < groups; ++g) {
        const I4Group t0 = i4_group(s0[g], m0[g]), t1 = i4_group(s1[g], m1[g]);
        // The same rows of the next tile (4 rows on), a group ahead at a time (see NextTile; with
        // groups of 32 inputs, a line is asked for four times, which costs less than a test).
        prefetch_l1(w0 + 4 * ldw + g * group_size / 2);
        prefetch_l1(w1 + 4 * ldw + g * group_size / 2);
        for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 2 * VL) {
            vf u[2], v[2];
            decode_i4(w0 + k / 2, t0, u);
            decode_i4(w1 + k / 2, t1, v);
#pragma GCC unroll 8
            for (int i = 0; i < MR; ++i) {
                const vf xe = vload(x + i * ldx + k), xo = vload(x + i * ldx + k + VL);
                const int odd = MR == 1;  // (else even and odd share the accumulator)
                acc[i][0][0] = vfma(xe, u[0], acc[i][0][0]), acc[i][0][odd] = vfma(xo, u[1], acc[i][0][odd]);
                acc[i][1][0] = vfma(xe, v[0], acc[i][1][0]), acc[i][1][odd] = vfma(xo, v[1], acc[i][1][odd]);
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
        out[i][0] = MR == 1 ? acc[i][0][0] + acc[i][0][1] : acc[i][0][0];
        out[i][1] = MR == 1 ? acc[i][1][0] + acc[i][1][1] : acc[i][1][0];
    }
}

// MR x 4 int4 tile: two pairs of weight rows (only the first nr real), reduced together.
template <int MR>
void dot_tile_i4(const float* x, int64_t ldx, const uint8_t* w, int64_t ldw, const float* scale,
                 const float* minimum, int64_t groups, int nr, int64_t K, float (*out)[NR]) {
    static_assert(NR == 4, "two pairs of weight rows");
    int64_t r[4];
    for (int j = 0; j < 4; ++j) r[j] = std::min(j, nr - 1);
    vf acc[MR][4];
    for (int half = 0; half < 2; ++half) {
        const int64_t a = r[2 * half], b = r[2 * half + 1];
        vf pair[MR][2];
        if (K == groups * 32)
            dot_pair_i4<MR, 32>(x, ldx, w + a * ldw, w + b * ldw, scale + a * groups, scale + b * groups,
                                minimum + a * groups, minimum + b * groups, groups, K, ldw, pair);
        else
            dot_pair_i4<MR, 0>(x, ldx, w + a * ldw, w + b * ldw, scale + a * groups, scale + b * groups,
                               minimum + a * groups, minimum + b * groups, groups, K, ldw, pair);
        for (int i = 0; i < MR; ++i) acc[i][2 * half] = pair[i][0], acc[i][2 * half + 1] = pair[i][1];
    }
    reduce_tile<MR>(acc, out);
}

// ------------------------------------------------------------------------------ strips
// x rows [m0, m0 + MR) against weight rows [n0, n1) (w points at row n0), tile by tile.
template <int MR, class Row, bool PREFETCH>
void strip(const Job& job, int64_t m0, const typename Row::T* w, int64_t ldw, int64_t n0, int64_t n1) {
    float out[MR][NR];
    for (int64_t n = n0; n < n1; n += NR) {
        const int nr = int(std::min<int64_t>(NR, n1 - n));
        dot_tile<MR, Row, PREFETCH>(job.x + m0 * job.ldx, job.ldx, w + (n - n0) * ldw, ldw, nr, job.K, out);
        store_tile(job, m0, MR, n, nr, out);
    }
}

template <int MR>
void strip_i4(const Job& job, int64_t m0, const LinearArgs& a, int64_t n0, int64_t n1) {
    const int64_t groups = a.K / a.group_size;
    const auto* w = static_cast<const uint8_t*>(a.w);
    float out[MR][NR];
    for (int64_t n = n0; n < n1; n += NR) {
        const int nr = int(std::min<int64_t>(NR, n1 - n));
        dot_tile_i4<MR>(job.x + m0 * job.ldx, job.ldx, w + n * (a.K / 2), a.K / 2, a.scale + n * groups,
                        a.minimum + n * groups, groups, nr, job.K, out);
        store_tile(job, m0, MR, n, nr, out);
    }
}

// The same for any mr <= MR_MAX.
template <class Row, bool PREFETCH>
void strip_mr(int mr, const Job& job, int64_t m0, const typename Row::T* w, int64_t ldw, int64_t n0, int64_t n1) {
    if (mr == 1) return strip<1, Row, PREFETCH>(job, m0, w, ldw, n0, n1);
    if (mr == 2) return strip<2, Row, PREFETCH>(job, m0, w, ldw, n0, n1);
    if constexpr (MR_MAX >= 4) {
        if (mr == 3) return strip<3, Row, PREFETCH>(job, m0, w, ldw, n0, n1);
    }
    strip<MR_MAX, Row, PREFETCH>(job, m0, w, ldw, n0, n1);
}

void strip_i4_mr(int mr, const Job& job, int64_t m0, const LinearArgs& a, int64_t n0, int64_t n1) {
    if (mr == 1) return strip_i4<1>(job, m0, a, n0, n1);
    if (mr == 2) return strip_i4<2>(job, m0, a, n0, n1);
    if constexpr (MR_MAX >= 4) {
        if (mr == 3) return strip_i4<3>(job, m0, a, n0, n1);
    }
    strip_i4<MR_MAX>(job, m0, a, n0, n1);
}

// ------------------------------------------------------------------------------ panels
// Weight rows [n0, n0 + rows) of int4 dequantized to fp32 into panel [rows, K]: natural input
// order, any even group size.
void widen_rows_i4(const LinearArgs& a, int64_t n0, int64_t rows, float* panel) {
    const int64_t K = a.K, gs = a.group_size, groups = K / gs;
    const auto* w = static_cast<const uint8_t*>(a.w);
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* src = w + (n0 + r) * (K / 2);
        float* dst = panel + r * K;
        for (int64_t g = 0; g < groups; ++g) {
            const float s = a.scale[(n0 + r) * groups + g], m = a.minimum[(n0 + r) * groups + g];
            for (int64_t k = g * gs; k < (g + 1) * gs; k += 2) {
                const uint8_t b = src[k / 2];
                dst[k] = float(b & 0xF) * s + m;
                dst[k + 1] = float(b >> 4) * s + m;
            }
        }
    }
}

// int4, groups a multiple of 32: decoded in the even/odd order (x is reordered to match).
void widen_rows_i4_reordered(const LinearArgs& a, int64_t n0, int64_t rows, float* panel) {
    const int64_t K = a.K, gs = a.group_size, groups = K / gs;
    const auto* w = static_cast<const uint8_t*>(a.w);
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* src = w + (n0 + r) * (K / 2);
        float* dst = panel + r * K;
        for (int64_t g = 0; g < groups; ++g) {
            const I4Group tab = i4_group(a.scale[(n0 + r) * groups + g], a.minimum[(n0 + r) * groups + g]);
            for (int64_t k = g * gs; k < (g + 1) * gs; k += 2 * VL) {
                vf v[2];
                decode_i4(src + k / 2, tab, v);
                vstore(dst + k, v[0]), vstore(dst + k + VL, v[1]);
            }
        }
    }
}

// x rows with each 2*VL-input chunk reordered to [even inputs, odd inputs] (decode_i4's order).
void reorder_x(const float* x, int64_t M, int64_t K, float* out) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < K; c += 2 * VL)
            for (int l = 0; l < VL; ++l) {
                out[m * K + c + l] = x[m * K + c + 2 * l];
                out[m * K + c + VL + l] = x[m * K + c + 2 * l + 1];
            }
}

// ------------------------------------------------------------------------------ driver
// int4's decode costs more than int8's widening: with more than one x tile, a task decodes its
// slice of W once into an fp32 panel rather than once per x tile (measured on Zen 4: level at 8-16
// rows, 1.2-1.6x faster from 24). int8 / fp8 widen in registers at any M: a panel was slower at every
// M measured (5 to 512).
constexpr int64_t I4_DIRECT_MAX_ROWS = MR_MAX;
static_assert(I4_DIRECT_MAX_ROWS <= MR_MAX, "run_task gives direct int4 one x tile");
// A task's slice of W, as the tiles read it (stored, or as the fp32 panel), stays in L2 (1 MiB a core
// on Zen 4) while the x tiles pass over it.
constexpr int64_t SLICE_BYTES = 256 << 10;
// Below this many multiply-adds a call runs on one thread (the team's wake-up costs more).
constexpr int64_t MIN_MACS_PER_THREAD = 1 << 16;

struct Plan {
    bool panel;         // int4: decode the task's weights into an fp32 panel first (else read as stored)
    bool i4_vector;     // int4 with groups a multiple of 32: the vector decode (x reordered)
    int64_t task_rows;  // weight rows per task (a multiple of NR)
    int64_t tasks;
    int threads;
};

Plan make_plan(const LinearArgs& a) {
    Plan p{};
    p.i4_vector = a.wtype == W_I4 && a.group_size % 32 == 0;
    p.panel = a.wtype == W_I4 && (!p.i4_vector || a.M > I4_DIRECT_MAX_ROWS);
    const int64_t by_work = std::max<int64_t>(1, a.M * a.N * a.K / MIN_MACS_PER_THREAD);
    p.threads = int(std::min<int64_t>(std::max(a.num_threads, 1), by_work));
    // Contiguous slices of W's rows, at least four per thread (even shares) and few enough bytes to
    // stay in L2.
    const int64_t row_bytes = p.panel || a.wtype == W_F32 ? 4 * a.K : a.wtype == W_I4 ? a.K / 2 : a.K;
    const int64_t per_thread = std::max<int64_t>(4, a.N * row_bytes / (p.threads * SLICE_BYTES) + 1);
    const int64_t want = p.threads * per_thread;
    p.task_rows = std::max<int64_t>(NR, ((a.N + want - 1) / want + NR - 1) / NR * NR);
    p.tasks = (a.N + p.task_rows - 1) / p.task_rows;
    return p;
}

// A thread's panel, kept between calls (grown as needed).
float* panel_buffer(int64_t floats) {
    thread_local std::vector<float> buf;
    if (int64_t(buf.size()) < floats) buf.resize(size_t(floats));
    return buf.data();
}

// A task's tiles, for weight rows [n0, n1) (w: row n0, K apart): x tile after x tile (each stays in
// L1) against all the task's weight tiles (they stay in L2; the first x tile brings them from
// memory, fetching ahead). (Slicing K, for K = 1536, measured no faster.)
template <class Row, bool PREFETCH>
void run_tiles(const Job& job, const typename Row::T* w, int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < job.M; m0 += MR_MAX) {
        const int mr = int(std::min<int64_t>(MR_MAX, job.M - m0));
        if (PREFETCH && m0 == 0) strip_mr<Row, true>(mr, job, m0, w, job.K, n0, n1);
        else strip_mr<Row, false>(mr, job, m0, w, job.K, n0, n1);
    }
}

void run_task(const LinearArgs& a, const Plan& p, const Job& job, int64_t n0, int64_t n1) {
    if (p.panel) {
        float* panel = panel_buffer((n1 - n0) * a.K);
        if (p.i4_vector) widen_rows_i4_reordered(a, n0, n1 - n0, panel);
        else widen_rows_i4(a, n0, n1 - n0, panel);
        return run_tiles<F32Row, false>(job, panel, n0, n1);
    }
    switch (a.wtype) {
        case W_I8: return run_tiles<I8Row, true>(job, static_cast<const int8_t*>(a.w) + n0 * a.K, n0, n1);
        case W_FP8: return run_tiles<FP8RawRow, true>(job, static_cast<const uint8_t*>(a.w) + n0 * a.K, n0, n1);
        case W_I4:  // (one x tile: see I4_DIRECT_MAX_ROWS)
            return strip_i4_mr(int(a.M), job, 0, a, n0, n1);
        default: return run_tiles<F32Row, true>(job, static_cast<const float*>(a.w) + n0 * a.K, n0, n1);
    }
}

}  // namespace

void linear(const LinearArgs& a) {
    if (a.M == 0) return;
    const Plan p = make_plan(a);
    Job job{a.x, a.K, a.y, a.N, a.M, a.K, nullptr, 1.f, a.bias};
    std::vector<float> xcopy;  // x as the tiles want it, where that is not as given
    if (p.i4_vector) {
        xcopy.resize(size_t(a.M * a.K));
        reorder_x(a.x, a.M, a.K, xcopy.data());
        job.x = xcopy.data();
    }
    // int8 / fp8 tiles sum unscaled weights; the per-channel scale goes on the sums.
    if (a.wtype == W_I8 || a.wtype == W_FP8) job.scale = a.scale;
    if (a.wtype == W_FP8) {
        xcopy.resize(size_t(a.M * a.K));
        const float up = std::ldexp(1.f, FP8_X_SHIFT);
        for (int64_t i = 0; i < a.M * a.K; ++i) xcopy[size_t(i)] = a.x[i] * up;
        job.x = xcopy.data();
        job.scale_mult = std::ldexp(1.f, FP8_RAW_EXP - FP8_X_SHIFT);
    }

#pragma omp parallel for num_threads(p.threads) schedule(static)
    for (int64_t t = 0; t < p.tasks; ++t) run_task(a, p, job, t * p.task_rows, std::min(a.N, (t + 1) * p.task_rows));
}

}  // namespace ns::NS_ISA
