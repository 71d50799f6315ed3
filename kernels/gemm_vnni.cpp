// int8 GEMM / GEMV on AVX-512 VNNI with activations quantized on the fly (LinearArgs, wtype W_I8):
// y[m, n] = scale[n] * sum_blk xscale[m, blk] * sum_{k in blk} q[m, k] * w[n, k] (+ bias[n]),
// q = round(x / xscale) per block of 32 inputs, xscale = max |x| / 127 (q8_activations in
// neuronserve/ops/linear.py).
//
// Weights are repacked on the fly, 16 output columns at a time, into VNNI order: for each four
// inputs k..k+3, the 16 columns' four bytes side by side (one zmm). One vpdpbusd then adds four
// products to each of 16 columns' sums, with the row's four inputs broadcast: no horizontal sums.
// vpdpbusd multiplies unsigned by signed bytes: the packed weights are stored as w + 128 (w xor
// 0x80, so -128 too) and each block's sum starts from -128 * (the block's q sum), which the
// quantizer computes once per row; every integer lane then holds sum q * w exactly.
//
// Arithmetic, the same whatever M and whichever rows share a call (batch invariance): for each
// (m, n), acc = fma(float(block's integer sum), xscale[m, blk], acc) block after block, then
// y = fma(acc, scale[n], bias[n]). Only the loop structure changes with M.
//
// Tile: MR x rows against NV x 16 columns, each block's integer sums split over two accumulator
// sets (even and odd groups of four inputs) to hide vpdpbusd's latency. Work: threads take groups
// of 32 columns (their 32 weight rows, contiguous in memory, read once and packed into L1), and
// run every x tile over them (x stays in L2). Measured against the earlier in-place row kernel
// (per-chunk conversions, horizontal sums): ~2x the GFLOP/s at M >= 32.
#include <algorithm>
#include <cstring>
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
constexpr int MR = 4;           // x rows per tile
constexpr int NV = 2;           // 16-column vectors per tile
constexpr int64_t GROUP = 16 * NV;  // columns a task packs and runs
// Below this many multiply-adds a call runs on one thread (the team's wake-up costs more).
constexpr int64_t MIN_MACS_PER_THREAD = 1 << 16;

// x quantized, for all rows: q [M, K] (int8), per block its scale and -128 * its q sum.
struct QuantX {
    std::vector<int8_t> q;
    std::vector<float> scale;    // [M, blocks]
    std::vector<int32_t> start;  // [M, blocks]
    int64_t K, blocks;
};

// One block of 32 inputs: exactly q8_activations' arithmetic (x / scale, rounded half to even,
// clamped to +-127; an all-zero block gets q = 0).
void quantize_block(const float* x, int8_t* q, float& scale_out, int32_t& start_out) {
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
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qb));
    scale_out = scale;
    start_out = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
}

void quantize_row(const float* x, int64_t m, QuantX& q) {
    for (int64_t blk = 0; blk < q.blocks; ++blk) {
        const int64_t i = m * q.blocks + blk;
        quantize_block(x + blk * QBLOCK, q.q.data() + m * q.K + blk * QBLOCK, q.scale[size_t(i)], q.start[size_t(i)]);
    }
}

// 16 weight rows (rows past `rows` read as zeros) packed into dst [K / 4][16][4] as w + 128:
// a 16 x 16 transpose of four-byte groups, 64 inputs at a time. `ahead` (or null): the same
// place in the rows a group further on, requested into L2 meanwhile (when the rows are streamed
// from memory, as at small M, the packing otherwise waits on each row in turn).
void pack16(const int8_t* w, int64_t K, int rows, uint8_t* dst, const int8_t* ahead) {
    const __m512i flip = _mm512_set1_epi8(char(0x80));
    for (int64_t k = 0; k < K; k += 64) {
        const int64_t n = std::min<int64_t>(64, K - k);  // 64, or 32 for a last lone block
        const __mmask64 mask = n == 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1;
        __m512i a[16], t[16], u[16];
        if (ahead != nullptr)
            for (int r = 0; r < 16; ++r) prefetch_l2(ahead + r * K + k);
        for (int r = 0; r < 16; ++r)
            a[r] = r < rows ? _mm512_maskz_loadu_epi8(mask, w + r * K + k) : _mm512_setzero_si512();
        for (int r = 0; r < 16; r += 2) {  // per 128-bit lane L: rows r, r+1 of groups 4L..4L+3
            t[r] = _mm512_unpacklo_epi32(a[r], a[r + 1]);
            t[r + 1] = _mm512_unpackhi_epi32(a[r], a[r + 1]);
        }
        for (int r = 0; r < 16; r += 4) {  // u[r + c], lane L: rows r..r+3 of group 4L + c
            u[r] = _mm512_unpacklo_epi64(t[r], t[r + 2]);
            u[r + 1] = _mm512_unpackhi_epi64(t[r], t[r + 2]);
            u[r + 2] = _mm512_unpacklo_epi64(t[r + 1], t[r + 3]);
            u[r + 3] = _mm512_unpackhi_epi64(t[r + 1], t[r + 3]);
        }
        uint8_t* out = dst + k * 16;  // group g = k / 4 + j lies at out + j * 64
        for (int c = 0; c < 4; ++c) {  // 4 x 4 transpose of 128-bit lanes: group 4L + c, rows 0..15
            const __m512i s0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
            const __m512i s1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
            const __m512i s2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
            const __m512i s3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
            const __m512i g[4] = {_mm512_shuffle_i32x4(s0, s2, 0x88), _mm512_shuffle_i32x4(s0, s2, 0xDD),
                                  _mm512_shuffle_i32x4(s1, s3, 0x88), _mm512_shuffle_i32x4(s1, s3, 0xDD)};
            for (int L = 0; L < 4; ++L) {
                const int j = 4 * L + c;
                if (j * 4 < n) _mm512_storeu_si512(out + j * 64, _mm512_xor_si512(g[L], flip));
            }
        }
    }
}

// The next group's packed weights (streamed from memory), to request into L2 while a group's x
// tiles run, a share each: a group's only tile requests all of them block by block in the order
// the next group reads them; with more tiles, tile t requests lines [first, first + lines) of
// them, in order, spread over its blocks. (At 32 rows, all of them from the first tile had
// stalled it on the core's outstanding requests: cold ~1.3-1.45x the warm time.)
struct Ahead {
    const uint8_t* p = nullptr;
    bool whole = false;
    int64_t first = 0, lines = 0;
};

// MR_ rows of quantized x from row m0 against NV_ packed 16-column vectors at wp (each K * 16
// bytes); results for columns [n0, n0 + cols) of y; `ahead`: see Ahead.
template <int MR_, int NV_>
void tile(const LinearArgs& a, const QuantX& q, int64_t m0, const uint8_t* wp, int64_t n0, int64_t cols,
          const Ahead& ahead) {
    const int64_t K = q.K, blocks = q.blocks;
    __m512 acc[MR_][NV_];
    for (int i = 0; i < MR_; ++i)
        for (int v = 0; v < NV_; ++v) acc[i][v] = _mm512_setzero_ps();
    const int8_t* x = q.q.data() + m0 * K;
    const int64_t step = ahead.lines / blocks, extra = ahead.lines % blocks;  // lines a block
    const uint8_t* next = ahead.p + ahead.first * 64;
    for (int64_t b = 0; b < blocks; ++b) {
        if (ahead.whole) {
            for (int v = 0; v < NV_; ++v)
                for (int line = 0; line < 8; ++line) prefetch_l2(ahead.p + v * K * 16 + b * 512 + line * 64);
        } else if (ahead.lines > 0) {
            for (int64_t i = 0, n = step + (b < extra); i < n; ++i, next += 64) prefetch_l2(next);
        }
        __m512i even[MR_][NV_], odd[MR_][NV_];
        for (int i = 0; i < MR_; ++i) {
            const __m512i start = _mm512_set1_epi32(q.start[size_t((m0 + i) * blocks + b)]);
            for (int v = 0; v < NV_; ++v) even[i][v] = start, odd[i][v] = _mm512_setzero_si512();
        }
#pragma GCC unroll 4
        for (int g = 0; g < 8; g += 2) {  // groups of four inputs: g even, g + 1 odd
            const int64_t k = b * QBLOCK + g * 4;
            __m512i w0[NV_], w1[NV_];
            for (int v = 0; v < NV_; ++v) {
                w0[v] = _mm512_loadu_si512(wp + v * K * 16 + k * 16);
                w1[v] = _mm512_loadu_si512(wp + v * K * 16 + k * 16 + 64);
            }
            for (int i = 0; i < MR_; ++i) {
                int32_t x0, x1;
                std::memcpy(&x0, x + i * K + k, 4);
                std::memcpy(&x1, x + i * K + k + 4, 4);
                const __m512i b0 = _mm512_set1_epi32(x0), b1 = _mm512_set1_epi32(x1);
                for (int v = 0; v < NV_; ++v) {
                    even[i][v] = _mm512_dpbusd_epi32(even[i][v], w0[v], b0);
                    odd[i][v] = _mm512_dpbusd_epi32(odd[i][v], w1[v], b1);
                }
            }
        }
        for (int i = 0; i < MR_; ++i) {
            const __m512 s = _mm512_set1_ps(q.scale[size_t((m0 + i) * blocks + b)]);
            for (int v = 0; v < NV_; ++v)
                acc[i][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(even[i][v], odd[i][v])), s, acc[i][v]);
        }
    }
    for (int v = 0; v < NV_; ++v) {
        const int64_t c0 = n0 + v * 16, live = std::min<int64_t>(16, cols - v * 16);
        const __mmask16 mask = __mmask16((1u << live) - 1);
        const __m512 scale = _mm512_maskz_loadu_ps(mask, a.scale + c0);
        const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(mask, a.bias + c0) : _mm512_setzero_ps();
        for (int i = 0; i < MR_; ++i) _mm512_mask_storeu_ps(a.y + (m0 + i) * a.N + c0, mask, _mm512_fmadd_ps(acc[i][v], scale, bias));
    }
}

template <int NV_>
void tile_rows(int mr, const LinearArgs& a, const QuantX& q, int64_t m0, const uint8_t* wp, int64_t n0, int64_t cols,
               const Ahead& ahead) {
    switch (mr) {
        case 1: return tile<1, NV_>(a, q, m0, wp, n0, cols, ahead);
        case 2: return tile<2, NV_>(a, q, m0, wp, n0, cols, ahead);
        case 3: return tile<3, NV_>(a, q, m0, wp, n0, cols, ahead);
        default: return tile<MR, NV_>(a, q, m0, wp, n0, cols, ahead);
    }
}

// Columns [n0, n0 + cols)'s packed weights: in place when the call has them packed, else packed
// into buf.
const uint8_t* group_weights(const LinearArgs& a, int64_t n0, int64_t cols, uint8_t* buf) {
    if (a.w_packed) return static_cast<const uint8_t*>(a.w) + n0 * a.K;
    const int8_t* w = static_cast<const int8_t*>(a.w);
    for (int64_t row = n0; row < n0 + cols; row += 16) {
        const int64_t next = row + GROUP;  // (the next group's rows, if whole)
        pack16(w + row * a.K, a.K, int(std::min<int64_t>(16, n0 + cols - row)), buf + (row - n0) * a.K,
               next + 16 <= a.N ? w + next * a.K : nullptr);
    }
    return buf;
}

// Columns [n0, n0 + cols) (cols <= GROUP): their weights, then every x tile.
void run_group(const LinearArgs& a, const QuantX& q, int64_t n0, int64_t cols, uint8_t* buf) {
    const uint8_t* wp = group_weights(a, n0, cols, buf);
    const int vecs = int((cols + 15) / 16);
    // Packed weights come from memory: the x tiles request the next group's (whole) ahead.
    const bool next_whole = n0 + 2 * GROUP <= a.N;
    const int64_t tiles = (a.M + MR - 1) / MR, lines = GROUP * a.K / 64;
    for (int64_t m0 = 0, t = 0; m0 < a.M; m0 += MR, ++t) {
        const int mr = int(std::min<int64_t>(MR, a.M - m0));
        Ahead ahead;
        if (a.w_packed && next_whole) {
            ahead.p = wp + GROUP * a.K;
            ahead.whole = tiles == 1;
            ahead.first = lines * t / tiles, ahead.lines = lines * (t + 1) / tiles - ahead.first;
        }
        if (vecs == NV)
            tile_rows<NV>(mr, a, q, m0, wp, n0, cols, ahead);
        else
            tile_rows<1>(mr, a, q, m0, wp, n0, cols, Ahead{});
    }
}

}  // namespace

void pack_int8(const int8_t* w, int64_t N, int64_t K, uint8_t* out) {
    const int64_t vecs = (N + 15) / 16;
#pragma omp parallel for schedule(static)
    for (int64_t v = 0; v < vecs; ++v) pack16(w + v * 16 * K, K, int(std::min<int64_t>(16, N - v * 16)), out + v * 16 * K, nullptr);
}

void linear_int8(const LinearArgs& a) {
    if (a.M == 0) return;
    // The quantized rows live in buffers kept between calls, one set per calling thread; the team
    // shares the caller's through this reference (a thread_local named in the region would be each
    // thread's own).
    thread_local QuantX buffers;
    QuantX& q = buffers;
    q.K = a.K, q.blocks = a.K / QBLOCK;
    q.q.resize(size_t(a.M * a.K));
    q.scale.resize(size_t(a.M * q.blocks));
    q.start.resize(size_t(a.M * q.blocks));

    const int64_t by_work = std::max<int64_t>(1, a.M * a.N * a.K / MIN_MACS_PER_THREAD);
    const int threads = int(std::min<int64_t>(std::max(a.num_threads, 1), by_work));
    const int64_t groups = (a.N + GROUP - 1) / GROUP;
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
        std::vector<uint8_t> buf(a.w_packed ? 0 : size_t(GROUP * a.K));  // one group's packed weights (L1)
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; ++g) run_group(a, q, g * GROUP, std::min<int64_t>(GROUP, a.N - g * GROUP), buf.data());
    }
}

}  // namespace ns::avx512vnni
