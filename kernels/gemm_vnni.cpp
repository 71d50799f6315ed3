// int8 GEMM / GEMV on AVX-512 VNNI with activations quantized on the fly (LinearArgs, wtype W_I8):
// y[m, n] = scale[n] * sum_blk xscale[m, blk] * sum_{k in blk} q[m, k] * w[n, k] (+ bias[n]),
// q = round(x / xscale) per block of 32 inputs, xscale = max |x| / 127 (q8_activations in
// neuronserve/ops/linear.py). vpdpbusd multiplies unsigned by signed bytes, so x is stored as
// u = q + 128. Each 64-byte weight vector's share of the offset, 128 * (its four-byte sums), is
// itself one vpdpbusd (of 128s with the weights); negated, it is the accumulator the x rows' vpdpbusd
// start from, so every integer lane holds sum q * w exactly (any int8 weight, -128 included), with no
// per-row weight sums to store or read. (That costs two instructions per weight vector, shared by the
// tile's x rows.)
//
// Layout: a zmm of 64 bytes spans two blocks; after vpdpbusd its dword lanes 0..7 hold four-product
// sums of the first block and lanes 8..15 of the second, so one int32 -> fp32 conversion and one
// multiply-add with the two blocks' scales (lanes 0..7 / 8..15) fold them into a float accumulator.
// (Different blocks' integer sums cannot share lanes, their scales differ.) The tile and the loops
// are gemm.cpp's: MR x rows against NR weight rows, one accumulator per pair, reduced four at a time;
// W read in place ([N, K] int8 rows); threads take contiguous slices of W's rows that stay in L2;
// the first x tile fetches the next weight tile ahead. The result is exact integer products scaled
// in fp32, so a row's result does not depend on the rows that share its call.
#include <algorithm>
#include <vector>

// GCC 12's intrinsics headers trip -Wuninitialized on their own _mm*_undefined_* helpers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "internal.h"

namespace ns::avx512vnni {

namespace {

constexpr int64_t QBLOCK = 32;  // inputs per activation scale
constexpr int64_t CHUNK = 64;   // inputs per zmm (two blocks)
constexpr int MR_MAX = 4;       // 16 float accumulators + 4 weight vectors + x + temporaries
constexpr int NR = 4;           // (also for one x row: 8 rows, more streams, measured slower)
// A task's slice of W stays in L2 (1 MiB a core on Zen 4) while the x tiles pass over it.
constexpr int64_t SLICE_BYTES = 256 << 10;
// Below this many multiply-adds a call runs on one thread (the team's wake-up costs more).
constexpr int64_t MIN_MACS_PER_THREAD = 1 << 16;

// x quantized, for all rows: u = q + 128 [M, K]; per 64-input chunk the two blocks' scales as a
// vector (lanes 0..7: first block, 8..15: second; zero past K).
struct QuantX {
    std::vector<uint8_t> u;
    std::vector<float> chunk_scale;  // [M, chunks, 16]
    int64_t K, chunks, blocks;
};

// One block of 32 inputs: u (32 bytes) and its scale; exactly q8_activations' arithmetic
// (x / scale, rounded half to even, clamped to +-127; an all-zero block gets q = 0).
float quantize_block(const float* x, uint8_t* u) {
    const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float scale = amax / 127.f;
    __m512i qa = _mm512_setzero_si512(), qb = _mm512_setzero_si512();
    if (scale > 0.f) {
        const __m512 s = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
        constexpr int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        const __m512 fa = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_div_ps(a, s), round), lo), hi);
        const __m512 fb = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_div_ps(b, s), round), lo), hi);
        qa = _mm512_cvtps_epi32(fa), qb = _mm512_cvtps_epi32(fb);
    }
    const __m512i offset = _mm512_set1_epi32(128);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(u), _mm512_cvtepi32_epi8(_mm512_add_epi32(qa, offset)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(u + 16), _mm512_cvtepi32_epi8(_mm512_add_epi32(qb, offset)));
    return scale;
}

void quantize_row(const float* x, int64_t m, QuantX& q) {
    float* cs = q.chunk_scale.data() + m * q.chunks * 16;
    for (int64_t blk = 0; blk < q.blocks; ++blk) {
        const float s = quantize_block(x + blk * QBLOCK, q.u.data() + m * q.K + blk * QBLOCK);
        std::fill_n(cs + blk * 16 / 2, 8, s);  // block blk fills lanes (blk % 2) * 8 .. +8 of its chunk
    }
    if (q.blocks % 2) std::fill_n(cs + q.blocks * 8, 8, 0.f);  // the last chunk's missing block
}

// Tile: MR quantized x rows against NR int8 weight rows (only the first nr real; the others repeat
// the last one and are dropped), sums into out (unscaled by the weights' scales). PREFETCH: fetch
// the next tile's weights (the NR rows after these, contiguous) as this tile reads as many bytes:
// rows of a few cache lines are too short for the hardware prefetchers to get ahead of.
template <int MR, bool PREFETCH>
void vnni_tile(const QuantX& q, int64_t m0, const int8_t* w, int nr, float (*out)[NR]) {
    const int64_t K = q.K;
    const int8_t* wr[NR];
    for (int j = 0; j < NR; ++j) wr[j] = w + std::min(j, nr - 1) * K;
    const uint8_t* xr[MR];
    const float* cs[MR];
    for (int i = 0; i < MR; ++i) {
        xr[i] = q.u.data() + (m0 + i) * K;
        cs[i] = q.chunk_scale.data() + (m0 + i) * q.chunks * 16;
    }

    __m512 acc[MR][NR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();

    const char* next = reinterpret_cast<const char*>(w + NR * K);

    // One chunk: mask selects its bytes (all 64, or the first 32 for a last lone block).
    auto chunk = [&](int64_t c, __mmask64 mask) __attribute__((always_inline)) {
        if constexpr (PREFETCH) {
#pragma GCC unroll 8
            for (int j = 0; j < NR; ++j) __builtin_prefetch(next + j * CHUNK, 0, 3);
            next += NR * CHUNK;
        }
        // base: -128 * (each lane's four weights' sum), where the x rows' sums start (see the top).
        const __m512i zero = _mm512_setzero_si512(), u128 = _mm512_set1_epi8(char(0x80));
        __m512i wv[NR], base[NR];
#pragma GCC unroll 8
        for (int j = 0; j < NR; ++j) {
            wv[j] = _mm512_maskz_loadu_epi8(mask, wr[j] + c * CHUNK);
            base[j] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, u128, wv[j]));
        }
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) {
            const __m512i xv = _mm512_maskz_loadu_epi8(mask, xr[i] + c * CHUNK);
            const __m512 s = _mm512_loadu_ps(cs[i] + c * 16);
#pragma GCC unroll 8
            for (int j = 0; j < NR; ++j) {
                const __m512i d = _mm512_dpbusd_epi32(base[j], xv, wv[j]);
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[i][j]);
            }
        }
    };
    const int64_t full = K / CHUNK;
    for (int64_t c = 0; c < full; ++c) chunk(c, ~__mmask64(0));
    if (K % CHUNK) chunk(full, __mmask64(0xFFFFFFFFu));

    // Four accumulators at a time: interleave-and-add twice, then add the four 128-bit lanes.
    static_assert(NR == 4, "a tile's row of accumulators is reduced at once");
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
        const __m512 a = acc[i][0], b = acc[i][1], c = acc[i][2], d = acc[i][3];
        const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
        const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
        const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                          _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
        const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
        _mm_storeu_ps(out[i], _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1)));
    }
}

// x rows [m0, m0 + MR) against weight rows [n0, n1).
template <int MR, bool PREFETCH>
void strip(const LinearArgs& a, const QuantX& q, int64_t m0, int64_t n0, int64_t n1) {
    float out[MR][NR];
    for (int64_t n = n0; n < n1; n += NR) {
        const int nr = int(std::min<int64_t>(NR, n1 - n));
        vnni_tile<MR, PREFETCH>(q, m0, static_cast<const int8_t*>(a.w) + n * a.K, nr, out);
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < nr; ++j)
                a.y[(m0 + i) * a.N + n + j] = out[i][j] * a.scale[n + j] + (a.bias ? a.bias[n + j] : 0.f);
    }
}

template <bool PREFETCH>
void strip_mr(int mr, const LinearArgs& a, const QuantX& q, int64_t m0, int64_t n0, int64_t n1) {
    switch (mr) {
        case 1: return strip<1, PREFETCH>(a, q, m0, n0, n1);
        case 2: return strip<2, PREFETCH>(a, q, m0, n0, n1);
        case 3: return strip<3, PREFETCH>(a, q, m0, n0, n1);
        default: return strip<MR_MAX, PREFETCH>(a, q, m0, n0, n1);
    }
}

}  // namespace

void linear_int8(const LinearArgs& a) {
    if (a.M == 0) return;
    // The quantized rows live in buffers kept between calls, one set per calling thread; the team
    // shares the caller's through this reference (a thread_local named in the region would be each
    // thread's own).
    thread_local QuantX buffers;
    QuantX& q = buffers;
    q.K = a.K, q.blocks = a.K / QBLOCK, q.chunks = (a.K + CHUNK - 1) / CHUNK;
    q.u.resize(size_t(a.M * a.K));
    q.chunk_scale.resize(size_t(a.M * q.chunks * 16));

    const int64_t by_work = std::max<int64_t>(1, a.M * a.N * a.K / MIN_MACS_PER_THREAD);
    const int threads = int(std::min<int64_t>(std::max(a.num_threads, 1), by_work));
    // Contiguous slices of W's rows, at least four per thread (even shares), each within SLICE_BYTES.
    const int64_t want = threads * std::max<int64_t>(4, a.N * a.K / (threads * SLICE_BYTES) + 1);
    const int64_t task_rows = std::max<int64_t>(NR, ((a.N + want - 1) / want + NR - 1) / NR * NR);
    const int64_t tasks = (a.N + task_rows - 1) / task_rows;
    // A few rows are quantized here, before the team starts (a shared loop and its barrier cost more).
    const bool serial_quantize = a.M < 2 * threads;
    if (serial_quantize)
        for (int64_t m = 0; m < a.M; ++m) quantize_row(a.x + m * a.K, m, q);

#pragma omp parallel num_threads(threads)
    {
        if (!serial_quantize) {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < a.M; ++m) quantize_row(a.x + m * a.K, m, q);
            // (the implicit barrier: every row is quantized before any tile reads it)
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; ++t) {
            const int64_t n0 = t * task_rows, n1 = std::min(a.N, n0 + task_rows);
            strip_mr<true>(int(std::min<int64_t>(MR_MAX, a.M)), a, q, 0, n0, n1);  // (weights from memory)
            for (int64_t m0 = MR_MAX; m0 < a.M; m0 += MR_MAX)                     // (weights from L2)
                strip_mr<false>(int(std::min<int64_t>(MR_MAX, a.M - m0)), a, q, m0, n0, n1);
        }
    }
}

}  // namespace ns::avx512vnni
