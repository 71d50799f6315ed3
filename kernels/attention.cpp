// Paged attention read in place through the block tables, and the K/V write that precedes it.
//
// Compiled once per instruction set (NS_ISA = scalar, avx2, avx512); one source, with a thin
// SIMD layer (vf: W floats) below and the algorithm written once above it.
//
// Attention design:
// - A unit of work is one KV head over a tile of a sequence's query tokens (one token in decode)
//   and a range of its keys. Its rows are every query head of the head's GQA group for every
//   token of the tile, so each K/V row, once loaded, serves all of them: in decode K and V are
//   read from memory once per (sequence, KV head), in place through the block table.
// - Keys go by chunks of KMAX = 2 W (32 with AVX-512): one online-softmax step a chunk. Scores:
//   dot products of the K rows as they lie, W keys' sums folded into one vector per row, a few
//   rows a pass (an earlier transposed-K path for prefill tiles was ~8% faster there, but gave a
//   row other bits than decode). Values: o[row] += p[key] * V[key] in register tiles, V read in
//   place (converted as loaded) or converted once per chunk. (Chunks of W keys, the earlier
//   size: cold fp32 decode at 32 x 512 ~2% slower, 1.31-1.33 against 1.29-1.31 ms, interleaved.)
// - An int8 cache on AVX-512 VNNI is read in int16 fixed point instead (vpdpwssd, chunks of 32
//   keys: see "int8 cache in int16" below). An fp8 chunk with no NaN byte skips the per-element
//   NaN fix-up of its conversion (fp8_any_nan).
// - Softmax is online in fp32 (running max m, sum l per row; o rescaled when m grows). int8/fp8
//   scales are folded in: the K scale into q (with the softmax scale), the V scale into 1 / l.
// - The next chunk's K and V rows are requested (into L2) a few lines at a time while this one is
//   computed.
// - The cache is block-major, then head: a block holds each KV head's block_size rows as one run
//   (as vLLM's CPU value cache and the Neuron NKI paged-attention kernels lay it out), so the
//   rows a unit reads of a block are contiguous (measured against token-major slots, which
//   interleave the heads: cold fp32 decode ~20% faster).
// - Threads (OpenMP) take tasks, longest first: a tile and key range for every KV head, chunk by
//   chunk with the heads in turn, as a block holds all heads' rows. Long tiles' keys
//   are split into fixed partitions whose partial (m, l, o) are merged afterwards
//   (flash-decoding), so that few sequences with long contexts keep every thread busy.
// - Batch invariance: how a token's row is computed (score arithmetic, key partitions, summation
//   order) depends only on its own sequence, never on the rest of the call or the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <vector>

#if defined(__AVX2__)
// GCC 12 reports the _mm512_undefined_* inside set1/convert/shuffle intrinsics as (maybe-)
// uninitialized (GCC bug 105593, a false positive): silenced for the intrinsics' header only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include "internal.h"

namespace ns::NS_ISA {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <class To, class From>
inline To bit_cast(From x) {
    static_assert(sizeof(To) == sizeof(From));
    To y;
    std::memcpy(&y, &x, sizeof y);
    return y;
}

// ------------------------------------------------------------------------------------ scalar codecs
// Byte-exact twins of torch's conversions (the vector versions below do the same arithmetic).

// int8: round half to even after the clamp to +-127 (both integers, so the order is immaterial);
// NaN becomes 0, as torch's float -> int8 conversion makes it.
inline uint8_t i8_encode(float y) {
    if (y != y) return 0;
    y = std::min(127.f, std::max(-127.f, y));
    return uint8_t(int8_t(std::nearbyint(y)));
}

// e4m3fn: clamp to +-448 (on the magnitude's bits), then round to nearest even: in the normal
// range by rounding the fp32 mantissa to 3 bits and rebiasing the exponent (127 - 7 = 120), below
// 2^-6 as the integer count of 2^-9 steps (8 steps is exactly the smallest normal, 0x08).
// NaN keeps its sign and becomes 0x7F.
inline uint8_t fp8_encode(float y) {
    const uint32_t bits = bit_cast<uint32_t>(y);
    const uint32_t sign = (bits >> 24) & 0x80;
    uint32_t mag = bits & 0x7FFFFFFF;
    if (mag > 0x7F800000) return uint8_t(sign | 0x7F);
    mag = std::min(mag, 0x43E00000u);  // 448
    if (mag >= 0x3C800000) {           // 2^-6
        return uint8_t(sign | (((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)));
    }
    return uint8_t(sign | uint32_t(std::nearbyint(bit_cast<float>(mag) * 512.f)));
}

// e4m3fn -> fp32, as its value times 2^-8 (the vector paths' natural result, see fp8_to_f32; the
// 2^8 is folded into the scales): normals by moving exponent and mantissa into place and
// rebiasing (127 - 7 - 8), subnormals (exponent field 0) as mantissa * 2^-17, so that no fp32
// denormal is involved (the result stays right with flush-to-zero / denormals-are-zero set).
constexpr float kFp8Unit = 256.f;  // decoded value = true value / kFp8Unit
inline float fp8_decode(uint8_t b) {
    const uint32_t mag = b & 0x7F;
    const float normal = bit_cast<float>((mag << 20) + (112u << 23)), sub = float(mag) * 0x1p-17f;
    const float f = mag == 0x7F ? std::numeric_limits<float>::quiet_NaN() : mag >= 0x08 ? normal : sub;
    return bit_cast<float>(bit_cast<uint32_t>(f) | (uint32_t(b & 0x80) << 24));
}

// ------------------------------------------------------------------------------------ SIMD layer
#if defined(__AVX512F__)

constexpr int W = 16;
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf x) { _mm512_storeu_ps(p, x); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vfmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline float vhmax(vf x) { return _mm512_reduce_max_ps(x); }
inline float vhsum(vf x) { return _mm512_reduce_add_ps(x); }
// x's first n lanes (0 <= n <= W), the others set to fill.
inline vf vfirst(vf x, int n, float fill) {
    return _mm512_mask_blend_ps(__mmask16((1u << n) - 1), _mm512_set1_ps(fill), x);
}

// e^x for x <= 0 (softmax arguments): x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-7 polynomial
// (Cephes' expf coefficients), times 2^n by vscalefps (which also underflows gracefully). The
// clamp's operands in this order let a NaN through (vmaxps returns its second operand when one is
// NaN): a NaN score (a NaN in the cache) makes its row NaN, as in the reference.
inline vf vexp(vf x) {
    x = _mm512_max_ps(_mm512_set1_ps(-100.f), x);
    const vf n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    vf p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

// W bytes as int8, widened to fp32.
inline vf i8_to_f32(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// W bytes as e4m3fn, to fp32 values times 2^-8 (kFp8Unit), through fp16: the sign-extended byte
// shifted left by 7 is S S EEEE MMM 0000000; clearing bit 14 leaves the fp16 S 0EEEE MMM0000000,
// whose value is the e4m3 one times 2^(7-15), subnormals included (vcvtph2ps converts fp16
// denormals exactly, whatever MXCSR's denormals-are-zero says). e4m3fn's NaN (S1111111, fp16
// 1.875) is made an fp16 NaN.
inline vf fp8_to_f32(const uint8_t* p) {
    const __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(x, 7), _mm256_set1_epi16(short(0xBFFF)));
    const __m256i nan_bits = _mm256_set1_epi16(0x3F80);
    const __mmask16 nan = _mm256_cmpeq_epi16_mask(_mm256_and_si256(h, nan_bits), nan_bits);
    return _mm512_cvtph_ps(_mm256_mask_blend_epi16(nan, h, _mm256_or_si256(h, _mm256_set1_epi16(0x7E00))));
}
// The same for bytes known not to be NaN (see fp8_any_nan): no NaN fix-up, the same bits.
inline vf fp8_to_f32_finite(const uint8_t* p) {
    const __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(x, 7), _mm256_set1_epi16(short(0xBFFF))));
}
// Whether any of n rows' hd bytes (offset past rows[j]) is an e4m3fn NaN (S1111111).
inline bool fp8_any_nan(const uint8_t* const* rows, int n, int64_t offset, int64_t hd) {
    const __m512i m = _mm512_set1_epi8(0x7F);
    __mmask64 any = 0;
    for (int j = 0; j < n; ++j) {
        for (int64_t d = 0; d < hd; d += 64) {
            const __mmask64 in = hd - d >= 64 ? ~__mmask64(0) : (__mmask64(1) << (hd - d)) - 1;
            const __m512i b = _mm512_maskz_loadu_epi8(in, rows[j] + offset + d);
            any |= _mm512_mask_cmpeq_epi8_mask(in, _mm512_and_si512(b, m), m);
        }
    }
    return any != 0;
}

// W values (already divided by the scale) quantized into W bytes, as i8_encode / fp8_encode.
inline void f32_to_i8(uint8_t* dst, vf y) {
    const __mmask16 nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
    y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-127.f)), _mm512_set1_ps(127.f));
    const __m512i q = _mm512_maskz_cvtps_epi32(__mmask16(~nan), y);  // rounds to nearest even
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(q));
}
inline void f32_to_fp8(uint8_t* dst, vf y) {
    const __m512i bits = _mm512_castps_si512(y);
    const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(bits, 24), _mm512_set1_epi32(0x80));
    __m512i mag = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF));
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(mag, _mm512_set1_epi32(0x7F800000));
    mag = _mm512_min_epi32(mag, _mm512_set1_epi32(0x43E00000));
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(mag, 20), _mm512_set1_epi32(1));
    const __m512i normal = _mm512_sub_epi32(
        _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(mag, _mm512_set1_epi32(0x7FFFF)), odd), 20),
        _mm512_set1_epi32(120 << 3));
    const __m512i sub = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_castsi512_ps(mag), _mm512_set1_ps(512.f)));
    __m512i q = _mm512_mask_blend_epi32(_mm512_cmpge_epi32_mask(mag, _mm512_set1_epi32(0x3C800000)), sub, normal);
    q = _mm512_or_si512(_mm512_mask_mov_epi32(q, nan, _mm512_set1_epi32(0x7F)), sign);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(q));
}

// Four keys' dot-product vectors (per-dimension partial sums) folded into one vector whose
// 128-bit lane L holds, for each of the four keys, the sum over lane L's dimensions.
inline vf fold4(vf a, vf b, vf c, vf d) {
    const vf ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const vf cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    return _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
}
// The W / 4 fold4 results of a chunk summed across lanes: lane j is key j's dot product.
inline vf fold_lanes(const vf* u) {
    const vf x = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
    const vf y = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
}

constexpr int DOT_ROWS = 4;              // rows per pass of the dot-product scores (16 accumulators)
constexpr int PV_ROWS = 4, PV_VECS = 4;  // output tile: 4 rows x 64 floats

#elif defined(__AVX2__)

constexpr int W = 8;
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf x) { _mm256_storeu_ps(p, x); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vfmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline float vhmax(vf x) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline float vhsum(vf x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline vf vfirst(vf x, int n, float fill) {
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_blendv_ps(_mm256_set1_ps(fill), x, _mm256_castsi256_ps(keep));
}

// As the AVX-512 vexp; 2^n built in the exponent field, so x is kept where n fits in [-126, 127].
inline vf vexp(vf x) {
    x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));  // (NaN passes)
    const vf n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    vf p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline vf i8_to_f32(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
// As the AVX-512 fp8_to_f32 (value times 2^-8 through fp16), eight at a time.
inline vf fp8_to_f32(const uint8_t* p) {
    const __m128i x = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m128i h = _mm_and_si128(_mm_slli_epi16(x, 7), _mm_set1_epi16(short(0xBFFF)));
    const __m128i nan_bits = _mm_set1_epi16(0x3F80);
    const __m128i nan = _mm_cmpeq_epi16(_mm_and_si128(h, nan_bits), nan_bits);
    return _mm256_cvtph_ps(_mm_or_si128(h, _mm_and_si128(nan, _mm_set1_epi16(0x7E00))));
}
inline vf fp8_to_f32_finite(const uint8_t* p) {  // as the AVX-512 one
    const __m128i x = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_cvtph_ps(_mm_and_si128(_mm_slli_epi16(x, 7), _mm_set1_epi16(short(0xBFFF))));
}
inline bool fp8_any_nan(const uint8_t* const* rows, int n, int64_t offset, int64_t hd) {
    const __m256i m = _mm256_set1_epi8(0x7F);
    __m256i any = _mm256_setzero_si256();
    bool tail = false;
    for (int j = 0; j < n; ++j) {
        const uint8_t* r = rows[j] + offset;
        int64_t d = 0;
        for (; d + 32 <= hd; d += 32) {
            const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + d));
            any = _mm256_or_si256(any, _mm256_cmpeq_epi8(_mm256_and_si256(b, m), m));
        }
        for (; d < hd; ++d) tail |= (r[d] & 0x7F) == 0x7F;
    }
    return tail || !_mm256_testz_si256(any, any);
}

// Eight int32 (each fitting a byte) stored as eight bytes.
inline void store8_i32_as_u8(uint8_t* dst, __m256i q) {
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packs_epi16(w, w));
}
inline void f32_to_i8(uint8_t* dst, vf y) {
    const __m256 ordered = _mm256_cmp_ps(y, y, _CMP_ORD_Q);
    y = _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(-127.f)), _mm256_set1_ps(127.f));
    const __m256i q = _mm256_and_si256(_mm256_cvtps_epi32(y), _mm256_castps_si256(ordered));
    store8_i32_as_u8(dst, q);
}
inline void f32_to_fp8(uint8_t* dst, vf y) {
    const __m256i bits = _mm256_castps_si256(y);
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(bits, 24), _mm256_set1_epi32(0x80));
    __m256i mag = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
    const __m256i nan = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7F800000));
    mag = _mm256_min_epi32(mag, _mm256_set1_epi32(0x43E00000));
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(mag, 20), _mm256_set1_epi32(1));
    const __m256i normal = _mm256_sub_epi32(
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(mag, _mm256_set1_epi32(0x7FFFF)), odd), 20),
        _mm256_set1_epi32(120 << 3));
    const __m256i sub = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_castsi256_ps(mag), _mm256_set1_ps(512.f)));
    const __m256i is_normal = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x3C800000 - 1));
    __m256i q = _mm256_blendv_epi8(sub, normal, is_normal);
    q = _mm256_or_si256(_mm256_blendv_epi8(q, _mm256_set1_epi32(0x7F), nan), sign);
    // Codes 0..255: through int16 (signed saturation is no-op) to bytes with unsigned saturation.
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(w, w));
}

inline vf fold4(vf a, vf b, vf c, vf d) {  // as the AVX-512 one
    const vf ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
    const vf cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
    return _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));
}
inline vf fold_lanes(const vf* u) {
    return _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
}

constexpr int DOT_ROWS = 3;              // 12 accumulators
constexpr int PV_ROWS = 4, PV_VECS = 2;  // 8 accumulators, 2 V vectors

#else  // scalar: the same algorithm on 8-float arrays (which the compiler vectorizes as it can)

constexpr int W = 8;
struct vf {
    float x[W];
};
inline vf vzero() { return vf{}; }
inline vf vset1(float a) {
    vf r;
    for (float& e : r.x) e = a;
    return r;
}
inline vf vload(const float* p) {
    vf r;
    std::memcpy(r.x, p, sizeof r.x);
    return r;
}
inline void vstore(float* p, const vf& a) { std::memcpy(p, a.x, sizeof a.x); }
template <class F>
inline vf vmap2(const vf& a, const vf& b, F f) {
    vf r;
    for (int i = 0; i < W; ++i) r.x[i] = f(a.x[i], b.x[i]);
    return r;
}
inline vf vadd(const vf& a, const vf& b) { return vmap2(a, b, [](float x, float y) { return x + y; }); }
inline vf vsub(const vf& a, const vf& b) { return vmap2(a, b, [](float x, float y) { return x - y; }); }
inline vf vmul(const vf& a, const vf& b) { return vmap2(a, b, [](float x, float y) { return x * y; }); }
inline vf vdiv(const vf& a, const vf& b) { return vmap2(a, b, [](float x, float y) { return x / y; }); }
inline vf vfmadd(const vf& a, const vf& b, const vf& c) { return vadd(vmul(a, b), c); }
inline vf vmax(const vf& a, const vf& b) { return vmap2(a, b, [](float x, float y) { return std::max(x, y); }); }
inline float vhmax(const vf& a) { return *std::max_element(a.x, a.x + W); }
inline float vhsum(const vf& a) {
    float s = 0;
    for (float e : a.x) s += e;
    return s;
}
inline vf vfirst(vf a, int n, float fill) {
    for (int i = n; i < W; ++i) a.x[i] = fill;
    return a;
}
inline vf vexp(vf a) {
    for (float& e : a.x) e = std::exp(e);
    return a;
}
inline vf i8_to_f32(const uint8_t* p) {
    vf r;
    for (int i = 0; i < W; ++i) r.x[i] = float(int8_t(p[i]));
    return r;
}
inline vf fp8_to_f32(const uint8_t* p) {
    vf r;
    for (int i = 0; i < W; ++i) r.x[i] = fp8_decode(p[i]);
    return r;
}
inline vf fp8_to_f32_finite(const uint8_t* p) { return fp8_to_f32(p); }
inline bool fp8_any_nan(const uint8_t* const*, int, int64_t, int64_t) { return false; }
inline void f32_to_i8(uint8_t* dst, const vf& y) {
    for (int i = 0; i < W; ++i) dst[i] = i8_encode(y.x[i]);
}
inline void f32_to_fp8(uint8_t* dst, const vf& y) {
    for (int i = 0; i < W; ++i) dst[i] = fp8_encode(y.x[i]);
}
// fold4: the four sums in lanes 0..3; fold_lanes: those of W / 4 fold4s side by side.
inline vf fold4(const vf& a, const vf& b, const vf& c, const vf& d) {
    vf r{};
    r.x[0] = vhsum(a), r.x[1] = vhsum(b), r.x[2] = vhsum(c), r.x[3] = vhsum(d);
    return r;
}
inline vf fold_lanes(const vf* u) {
    vf r;
    for (int i = 0; i < W; ++i) r.x[i] = u[i / 4].x[i % 4];
    return r;
}

constexpr int DOT_ROWS = 4;
constexpr int PV_ROWS = 2, PV_VECS = 2;

#endif

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ------------------------------------------------------------------------------------ cache rows
inline int64_t kv_elem_size(int dtype) { return dtype == KV_F32 ? 4 : 1; }

// An fp8 chunk whose rows hold no NaN byte (fp8_any_nan, checked per chunk and head): read
// without the per-element NaN fix-up, the same bits (cold fp8 decode attention: see kernels.json).
constexpr int KV_FP8_FINITE = 3;

// W elements of the cache at p, as fp32 (unscaled: the scales are folded in elsewhere; fp8 as
// its value / kFp8Unit).
template <int DT>
inline vf load_cvt(const uint8_t* p) {
    if constexpr (DT == KV_F32) return vload(reinterpret_cast<const float*>(p));
    if constexpr (DT == KV_I8) return i8_to_f32(p);
    if constexpr (DT == KV_FP8) return fp8_to_f32(p);
    if constexpr (DT == KV_FP8_FINITE) return fp8_to_f32_finite(p);
}

// The last count (< W) elements of a row, zero-padded: through a copy, so that nothing past the
// row (nor past the cache) is read.
template <int DT>
inline vf load_cvt_tail(const uint8_t* p, int64_t count) {
    constexpr int64_t es = DT == KV_F32 ? 4 : 1;
    alignas(64) uint8_t tail[W * es] = {};
    std::memcpy(tail, p, size_t(count * es));
    return load_cvt<DT>(tail);
}

// One head's cache row (hd elements) into dst as fp32, zero-padded to a multiple of W.
template <int DT>
void load_row(float* dst, const uint8_t* src, int64_t hd) {
    constexpr int64_t es = DT == KV_F32 ? 4 : 1;
    int64_t d = 0;
    for (; d + W <= hd; d += W) vstore(dst + d, load_cvt<DT>(src + d * es));
    if (d < hd) vstore(dst + d, load_cvt_tail<DT>(src + d * es, hd - d));
}

// One head's hd fp32 values into the cache row dst, quantized with the head's scale. Division
// (not a reciprocal's product) so that the bytes are those of torch's x / scale.
template <int DT>
void store_row(uint8_t* dst, const float* src, int64_t hd, float scale) {
    if constexpr (DT == KV_F32) {
        std::memcpy(dst, src, size_t(hd) * sizeof(float));
    } else {
        const vf s = vset1(scale);
        const auto put = DT == KV_I8 ? f32_to_i8 : f32_to_fp8;
        int64_t d = 0;
        for (; d + W <= hd; d += W) put(dst + d, vdiv(vload(src + d), s));
        if (d < hd) {
            alignas(64) float x[W] = {};
            uint8_t q[W];
            std::memcpy(x, src + d, size_t(hd - d) * sizeof(float));
            put(q, vdiv(vload(x), s));
            std::memcpy(dst + d, q, size_t(hd - d));
        }
    }
}

template <int DT>
void write_kv_typed(const WriteKvArgs& a) {
    const KvCache& c = a.cache;
    const int64_t es = kv_elem_size(c.kv_dtype), row = c.kv_heads * c.head_dim;
    const int64_t head_rows = c.block_size * c.head_dim * es;  // bytes of one head's rows in a block
    const int64_t v_off = c.num_blocks * c.block_size * row * es;  // bytes from K to V
    uint8_t* cache = static_cast<uint8_t*>(c.data);
    // A write is a few KB per token: threads only pay off for long prefills.
    const bool parallel = a.num_threads > 1 && a.num_tokens * row >= (int64_t(1) << 16);
#pragma omp parallel for num_threads(a.num_threads) if (parallel) schedule(static)
    for (int64_t t = 0; t < a.num_tokens; ++t) {
        // Block-major, then head: slot s is row s % block_size of each head's rows in block
        // s / block_size.
        const int64_t block = a.slot_mapping[t] / c.block_size, offset = a.slot_mapping[t] % c.block_size;
        uint8_t* slot = cache + (block * c.kv_heads * c.block_size + offset) * c.head_dim * es;
        for (int64_t h = 0; h < c.kv_heads; ++h) {
            const int64_t off = h * c.head_dim;
            uint8_t* dst = slot + h * head_rows;
            const float ks = DT == KV_F32 ? 1.f : c.kv_scale[h];
            const float vs = DT == KV_F32 ? 1.f : c.kv_scale[c.kv_heads + h];
            store_row<DT>(dst, a.k + t * row + off, c.head_dim, ks);
            store_row<DT>(dst + v_off, a.v + t * row + off, c.head_dim, vs);
        }
    }
}

}  // namespace

void write_kv(const WriteKvArgs& a) {
    switch (a.cache.kv_dtype) {
        case KV_I8: write_kv_typed<KV_I8>(a); break;
        case KV_FP8: write_kv_typed<KV_FP8>(a); break;
        default: write_kv_typed<KV_F32>(a); break;
    }
}

// ------------------------------------------------------------------------------------ attention
namespace {

constexpr int KMAX = 2 * W;              // keys a chunk holds at most (the int16 path's chunks)
constexpr int64_t kKeyCost = 8;           // staging one key costs about as much as this many rows
constexpr int64_t kPartKeys = 256;        // keys of a long tile's partitions (a multiple of KMAX)
static_assert(kPartKeys % KMAX == 0, "partitions start on a chunk boundary");
constexpr double kParallelCost = 4096;    // below this much work, threads cost more than they save

// The call's constants; the cache is addressed in bytes.
struct Problem {
    const AttentionArgs& a;
    int dtype;
    int64_t hd, hdp, group;  // hdp: head_dim rounded up to W
    int64_t tile_tokens;     // query tokens per tile (a tile's rows: tile_tokens x group)
    int64_t head_bytes;      // one key's row of one head
    int64_t head_stride;     // from a head's rows in a block to the next head's: block_size rows
    int64_t block_bytes;     // one block: kv_heads x block_size rows
    int64_t v_bytes;         // from a K row to its V row
    const uint8_t* cache;
    bool i16;  // int8 cache on AVX-512 VNNI, head_dim a multiple of 32: scores and values in int16
};

// The unit of scheduling: query tokens [t0, t1) of sequence seq (a tile) over keys [k0, k1), for
// every KV head on one thread. A block holds all heads' rows, so its pages are then
// translated and cached by one core once, not by each core taking a head (measured: decode 20%
// faster). A task of a tile whose keys were split (split >= 0) is part `part` of them.
struct Task {
    int64_t seq, t0, t1, k0, k1;
    int64_t split, part;
    double cost;
};

// One KV head's share of a task.
struct Unit {
    int64_t seq, kh, t0, t1, k0, k1;
};

// A tile whose keys were split in parts: their partial (o, m, l), [part][KV head], lie in the
// scratch buffer from offset `scratch`.
struct Split {
    int64_t seq, t0, t1, parts;
    int64_t scratch;
};

inline int64_t partial_floats(const Problem& p, int64_t rows) { return rows * (p.hdp + 2); }

// A thread's buffers for one unit at a time (64-byte aligned, all fp32 but pos).
class Workspace {
   public:
    Workspace(int64_t rows, int64_t hdp, bool i16) {
        const int64_t sizes[] = {rows * hdp, rows * hdp, rows * KMAX, W * hdp, KMAX * hdp, rows, rows, hdp};
        int64_t total = 0;
        for (int64_t n : sizes) total += round_up(n, 16);
        mem_ = static_cast<float*>(std::aligned_alloc(64, size_t(total) * sizeof(float)));
        float* zero;
        float** slots[] = {&q, &o, &s, &kb, &vb, &m, &l, &zero};
        float* at = mem_;
        for (int i = 0; i < 8; ++i) {
            *slots[i] = at;
            at += round_up(sizes[i], 16);
        }
        pos.resize(size_t(rows));
        if (i16) q16.resize(size_t(rows * hdp)), q16_scale.resize(size_t(rows));
        std::fill(zero, zero + hdp, 0.f);
        zero_row = reinterpret_cast<const uint8_t*>(zero);
    }
    ~Workspace() { std::free(mem_); }
    Workspace(const Workspace&) = delete;
    Workspace& operator=(const Workspace&) = delete;

    float* q;   // [rows][hdp]: queries times the softmax scale and K scale
    float* o;   // [rows][hdp]: unnormalized outputs
    float* s;   // [rows][KMAX]: a chunk's scores, then probabilities
    float* kb;  // [W][hdp]: a chunk's K rows, fp32 (when converted once for many rows)
    float* vb;  // [KMAX][hdp]: a chunk's V rows, fp32 (unless read in place)
    const uint8_t* v[KMAX];  // the chunk's V rows (in the cache, or in vb)
    float* m;   // [rows]: running max
    float* l;   // [rows]: running sum
    std::vector<int16_t> q16;     // [rows][hdp]: q in int16 fixed point (the int16 path)
    std::vector<float> q16_scale;  // [rows]: what one unit of a q16 row is worth
    std::vector<int64_t> pos;  // [rows]: each row's position (it sees keys 0..pos)
    const uint8_t* zero_row;   // hdp zero floats: the K "row" of keys past a chunk's end

   private:
    float* mem_;
};

// Walks a sequence's keys through its block table: the address of each key's K row of one head.
class KeyCursor {
   public:
    KeyCursor(const Problem& p, int64_t seq, int64_t kh, int64_t key)
        : table_(p.a.block_tables + seq * p.a.max_blocks),
          base_(p.cache + kh * p.head_stride),
          block_size_(p.a.cache.block_size),
          block_bytes_(p.block_bytes),
          head_bytes_(p.head_bytes),
          index_(key / block_size_),
          offset_(key % block_size_) {}

    void next(int n, const uint8_t** rows) {
        for (int j = 0; j < n; ++j) {
            rows[j] = base_ + table_[index_] * block_bytes_ + offset_ * head_bytes_;
            if (++offset_ == block_size_) offset_ = 0, ++index_;
        }
    }

   private:
    const int64_t* table_;
    const uint8_t* base_;
    int64_t block_size_, block_bytes_, head_bytes_, index_, offset_;
};

// The next chunk's cache rows, requested into L2 a chunk ahead of use: blocks are scattered, so
// the hardware prefetchers cannot guess where the next one lies. Into L2 rather than L1: the many
// requests of a chunk into L1 stall on its few miss buffers (measured: slower than none). Each
// line once, from the one holding a run's first byte to the one holding its last; rows that lie
// back to back (within one block, the usual case) are one run, found once a chunk (plan) for
// every head's K and V rows (arm: at an offset from them).
// fp32 rows are requested a few lines per turn of the loops that compute the current chunk
// (step()), so that memory streams while the arithmetic runs: all of a chunk's requests at once
// stall the core on its miss buffers with the arithmetic waiting behind them (measured: cold fp32
// decode at 32 x 512 ~10% faster spread, 1.53 -> 1.38 ms). So are the int16 path's 32-key
// chunks, 32 lines a head for K and as many for V (cold int8 decode at 32 x 512 ~5% faster spread,
// 0.505-0.517 -> 0.480-0.492 ms, interleaved); the other quantized chunks' rows, 32 lines a head,
// go at once (a quota of 0).
class Prefetcher {
   public:
    // The n rows (each `bytes` long) of the next chunk, as runs.
    void plan(const uint8_t* const* rows, int n, int64_t bytes) {
        runs_ = 0;
        for (int j = 0; j < n;) {
            int e = j + 1;
            while (e < n && rows[e] == rows[j] + (e - j) * bytes) ++e;
            run_[runs_++] = {rows[j], (e - j) * bytes};
            j = e;
        }
    }
    // Requests for the planned rows `offset` bytes further on, `quota` lines a step() (0: all of
    // them now).
    void arm(int64_t offset, int64_t quota) {
        offset_ = offset, quota_ = quota;
        cur_ = 0, left_ = 0;
        if (quota == 0) drain();
    }
    // The step's lines, crossing at most one run's end (what is left goes with the next step, or
    // drain()): straight-line code, no loop or call in the compiler's view (see request_lines).
    void step() {
        int64_t k = quota_, m = std::min(k, left_);
        request_lines(line_, m);
        line_ += 64 * m, left_ -= m, k -= m;
        if (k > 0 && cur_ < runs_) {
            next_run();
            m = std::min(k, left_);
            request_lines(line_, m);
            line_ += 64 * m, left_ -= m;
        }
    }
    void drain() { issue(std::numeric_limits<int64_t>::max()); }

   private:
    // The n >= 0 lines from p into L2. On x86-64 the loop is one asm statement: a loop (or call)
    // the compiler can see inside the score and value loops made GCC keep their register tiles in
    // memory too, storing every accumulator each turn (12 stores a key in fp32's value loop);
    // blocks in L2, fp32 decode went 16.5 -> 14.7 ns a key and head, int8 10.0 -> 9.5.
    static void request_lines(const uint8_t* p, int64_t n) {
#if defined(__x86_64__)
        asm volatile(
            "test %1, %1\n\t"
            "jle 2f\n"
            "1:\n\t"
            "prefetcht1 (%0)\n\t"
            "add $64, %0\n\t"
            "dec %1\n\t"
            "jnz 1b\n"
            "2:"
            : "+r"(p), "+r"(n)
            :
            : "cc");
#else
        for (int64_t i = 0; i < n; ++i) prefetch_l2(p + 64 * i);
#endif
    }
    // The next run's lines (cur_ < runs_).
    void next_run() {
        const uint8_t* first = run_[cur_].start + offset_;
        const int64_t skew = int64_t(reinterpret_cast<uintptr_t>(first) & 63);
        line_ = first - skew, left_ = (skew + run_[cur_].bytes + 63) / 64;
        ++cur_;
    }
    void issue(int64_t k) {
        while (k > 0) {
            if (left_ == 0) {
                if (cur_ == runs_) return;
                next_run();
            }
            const int64_t m = std::min(k, left_);
            for (int64_t i = 0; i < m; ++i) prefetch_l2(line_ + 64 * i);
            line_ += 64 * m, left_ -= m, k -= m;
        }
    }
    struct Run {
        const uint8_t* start;
        int64_t bytes;
    };
    Run run_[KMAX];
    int runs_ = 0, cur_ = 0;
    int64_t offset_ = 0, quota_ = 0, left_ = 0;
    const uint8_t* line_ = nullptr;
};

// Scores of R query rows against W keys read as rows (no transpose): a vector of per-dimension
// products per (row, key), folded into one score vector per row, stored at s[r * KMAX]. Each row
// has its own accumulators, so its result is the same whatever R is.
template <int DT, int R, int HD>
void qk_dot(const float* q, int64_t hdp, const uint8_t* const* rows, int64_t head_dim, float* s, Prefetcher* pf) {
    constexpr int64_t es = DT == KV_F32 ? 4 : 1;
    const int64_t hd = HD > 0 ? HD : head_dim, full = hd / W * W;
    vf folded[R][W / 4];
    // The q rows in registers when they fit beside the accumulators (head_dim a constant).
    constexpr int NQ = HD > 0 && HD % W == 0 && R * HD / W <= 12 ? HD / W : 0;
    vf qr[R][NQ > 0 ? NQ : 1];
    if constexpr (NQ > 0) {
        for (int r = 0; r < R; ++r)
            for (int v = 0; v < NQ; ++v) qr[r][v] = vload(q + r * hdp + v * W);
    }
    for (int g = 0; g < W / 4; ++g) {  // keys 4g..4g+3
        if constexpr (DT == KV_F32) {  // (a quantized chunk's requests went at once)
            if (pf != nullptr) pf->step();
        }
        const uint8_t* k[4] = {rows[4 * g], rows[4 * g + 1], rows[4 * g + 2], rows[4 * g + 3]};
        vf acc[R][4];
        for (int r = 0; r < R; ++r)
            for (int i = 0; i < 4; ++i) acc[r][i] = vzero();
        for (int64_t d = 0; d < hd; d += W) {
            for (int i = 0; i < 4; ++i) {
                const vf kv = d < full ? load_cvt<DT>(k[i] + d * es) : load_cvt_tail<DT>(k[i] + d * es, hd - d);
                for (int r = 0; r < R; ++r) {
                    const vf qv = NQ > 0 ? qr[r][NQ > 0 ? d / W : 0] : vload(q + r * hdp + d);
                    acc[r][i] = vfmadd(qv, kv, acc[r][i]);
                }
            }
        }
        for (int r = 0; r < R; ++r) folded[r][g] = fold4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    }
    for (int r = 0; r < R; ++r) vstore(s + r * KMAX, fold_lanes(folded[r]));
}

template <int DT, int R>
void qk_dot_rows(int rows, const float* q, int64_t hdp, const uint8_t* const* k, int64_t hd, float* s,
                 Prefetcher* pf) {
    if constexpr (R > 1) {
        if (rows < R) return qk_dot_rows<DT, R - 1>(rows, q, hdp, k, hd, s, pf);
    }
    // The usual head sizes as constants: their loops unrolled, their pointers in registers.
    if constexpr (DT == KV_F32) {
        if (hd == 64) return qk_dot<DT, R, 64>(q, hdp, k, hd, s, pf);
        if (hd == 128) return qk_dot<DT, R, 128>(q, hdp, k, hd, s, pf);
    }
    qk_dot<DT, R, 0>(q, hdp, k, hd, s, pf);
}

// Output tile of R rows x C vectors: o[r] += sum_{key < n} p[r * KMAX + key] v[key], v[key] being
// the C vectors at element `offset` of key's V row, stored as DT (converted as they are loaded).
template <int DT, int R, int C>
void pv_tile(float* o, int64_t hdp, const float* p, const uint8_t* const* v, int64_t offset, int n, Prefetcher* pf) {
    constexpr int64_t es = DT == KV_F32 ? 4 : 1;
    vf acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = vload(o + r * hdp + c * W);
    for (int j = 0; j < n; ++j) {
        if constexpr (DT == KV_F32) {  // (a quantized chunk's requests went at once)
            if (pf != nullptr) pf->step();
        }
        vf vv[C];
        for (int c = 0; c < C; ++c) vv[c] = load_cvt<DT>(v[j] + (offset + c * W) * es);
        for (int r = 0; r < R; ++r) {
            const vf pj = vset1(p[r * KMAX + j]);
            for (int c = 0; c < C; ++c) acc[r][c] = vfmadd(pj, vv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) vstore(o + r * hdp + c * W, acc[r][c]);
}

template <int DT, int R, int C>
void pv_tiles(int rows, int vecs, float* o, int64_t hdp, const float* p, const uint8_t* const* v, int64_t offset,
              int n, Prefetcher* pf) {
    if constexpr (R > 1) {
        if (rows < R) return pv_tiles<DT, R - 1, C>(rows, vecs, o, hdp, p, v, offset, n, pf);
    }
    if constexpr (C > 1) {
        if (vecs < C) return pv_tiles<DT, R, C - 1>(rows, vecs, o, hdp, p, v, offset, n, pf);
    }
    pv_tile<DT, R, C>(o, hdp, p, v, offset, n, pf);
}

#if defined(__AVX512F__)
// ------------------------------------------------------------------------------------ int8 cache in int16 (VNNI)
// With an int8 cache on AVX-512 VNNI (and head_dim a multiple of 32) the scores and values are
// integer dot products (vpdpwssd: two int16 products summed into an int32 lane), in place of
// converting every cache byte to fp32 and multiplying in fp32: a key's K or V row is widened to
// int16 once (1 instruction per 32 elements instead of 2 per 16) and a vpdpwssd does 32 products.
// - q: each row in int16 with its own scale (max |q| -> 32767, after the softmax and K scales
//   are folded in, so ~2^-16 of its largest element). A score is that scale times an exact
//   integer sum: its bits are the same in any summation order.
// - p: each row's probabilities of a chunk (32 keys, chunk_i16) in int16 with the chunk's own
//   scale (its largest probability -> 32767); the chunk's integer sums are scaled and added to o
//   in fp32. As the scales are per row and the chunks start at multiples of 32 from key 0 in
//   every plan, a row's bits still depend on its own sequence alone (batch invariance).
// Measured on SmolLM2's shapes (int8 cache, 1 x 2000 and 32 x 512 decode): see kernels.json.
#define NS_VNNI __attribute__((target("avx512vnni")))
constexpr float kI16Max = 32767.f;

// The unit's q rows (fp32, staged) into int16 rows with a scale each.
void quantize_q16(const float* q, int64_t rows, int64_t hd, int16_t* q16, float* scale) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* x = q + r * hd;
        __m512 top = _mm512_setzero_ps();
        for (int64_t d = 0; d < hd; d += W) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(x + d)));
        const float m = _mm512_reduce_max_ps(top);
        const __m512 inv = _mm512_set1_ps(m > 0.f ? kI16Max / m : 0.f);
        scale[r] = m / kI16Max;
        for (int64_t d = 0; d < hd; d += W) {
            const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + d), inv));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(q16 + r * hd + d), _mm512_cvtsepi32_epi16(v));
        }
    }
}

// fold4 / fold_lanes on int32 lanes (exact).
inline __m512i fold4_i32(__m512i a, __m512i b, __m512i c, __m512i d) {
    const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
}
inline __m512i fold_lanes_i32(const __m512i* u) {
    const __m512i x = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], 0x44), _mm512_shuffle_i32x4(u[0], u[1], 0xEE));
    const __m512i y = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2], u[3], 0x44), _mm512_shuffle_i32x4(u[2], u[3], 0xEE));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(x, y, 0x88), _mm512_shuffle_i32x4(x, y, 0xDD));
}
// 32 int8 as 32 int16.
inline __m512i widen32(const uint8_t* p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Scores of R int16 q rows against the chunk's W int8 K rows (hd bytes each; NV = hd / 32 when
// a constant, else 0).
template <int R, int NV>
NS_VNNI void qk_i16(const int16_t* q16, const float* scale, int64_t hd, const uint8_t* const* rows, float* s,
                    int64_t lds, Prefetcher* pf) {
    const int64_t nv = NV > 0 ? NV : hd / 32;
    __m512i folded[R][W / 4];
    for (int g = 0; g < W / 4; ++g) {
        if (pf != nullptr) pf->step();
        __m512i acc[R][4];
        for (int r = 0; r < R; ++r)
            for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_setzero_si512();
        for (int64_t v = 0; v < nv; ++v) {
            for (int i = 0; i < 4; ++i) {
                const __m512i k = widen32(rows[4 * g + i] + 32 * v);
                for (int r = 0; r < R; ++r) {
                    const __m512i qv = _mm512_loadu_si512(q16 + r * hd + 32 * v);
                    acc[r][i] = _mm512_dpwssd_epi32(acc[r][i], qv, k);
                }
            }
        }
        for (int r = 0; r < R; ++r) folded[r][g] = fold4_i32(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    }
    for (int r = 0; r < R; ++r)
        vstore(s + r * lds, _mm512_mul_ps(_mm512_cvtepi32_ps(fold_lanes_i32(folded[r])), _mm512_set1_ps(scale[r])));
}

template <int R>
void qk_i16_rows(int rows, const int16_t* q16, const float* scale, int64_t hd, const uint8_t* const* k, float* s,
                 int64_t lds, Prefetcher* pf) {
    if constexpr (R > 1) {
        if (rows < R) return qk_i16_rows<R - 1>(rows, q16, scale, hd, k, s, lds, pf);
    }
    if (hd == 64) return qk_i16<R, 2>(q16, scale, hd, k, s, lds, pf);
    if (hd == 128) return qk_i16<R, 4>(q16, scale, hd, k, s, lds, pf);
    qk_i16<R, 0>(q16, scale, hd, k, s, lds, pf);
}

// o[r][0, 32 H) += sum over the chunk's keys of p[r][key] v[key][offset, offset + 32 H), R rows:
// each row's probabilities in int16 with the chunk's scale, two keys a vpdpwssd (their int16 V
// rows interleaved), exact int32 sums, then scaled into o. v: n rows (n rounded up to even
// valid pointers; p is 0 past n). The interleave leaves lane i of the low / high sums holding
// element 8 (i / 4) + i % 4 (+ 4) of a 32-element group, put back in order as they are added.
template <int R, int H>
NS_VNNI void pv_i16(float* o, int64_t hdp, const float* p, const uint8_t* const* v, int64_t offset, int n,
                    Prefetcher* pf) {
    alignas(64) int16_t p16[R][KMAX];
    float pscale[R];
    for (int r = 0; r < R; ++r) {  // p: [R][KMAX]
        const __m512 x0 = _mm512_loadu_ps(p + r * KMAX), x1 = _mm512_loadu_ps(p + r * KMAX + W);
        const float m = _mm512_reduce_max_ps(_mm512_max_ps(x0, x1));  // probabilities: >= 0
        pscale[r] = m / kI16Max;
        const __m512 f = _mm512_set1_ps(m > 0.f ? kI16Max / m : 0.f);
        _mm256_store_si256(reinterpret_cast<__m256i*>(p16[r]), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(x0, f))));
        _mm256_store_si256(reinterpret_cast<__m256i*>(p16[r] + W), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(x1, f))));
    }
    __m512i acc[R][2 * H];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < 2 * H; ++c) acc[r][c] = _mm512_setzero_si512();
    for (int j = 0; j < n; j += 2) {
        if (pf != nullptr) pf->step();
        __m512i pair[2 * H];
        for (int h = 0; h < H; ++h) {
            const __m512i a = widen32(v[j] + offset + 32 * h), b = widen32(v[j + 1] + offset + 32 * h);
            pair[2 * h] = _mm512_unpacklo_epi16(a, b);
            pair[2 * h + 1] = _mm512_unpackhi_epi16(a, b);
        }
        for (int r = 0; r < R; ++r) {
            int32_t pp;
            std::memcpy(&pp, &p16[r][j], sizeof pp);
            const __m512i pj = _mm512_set1_epi32(pp);
            for (int c = 0; c < 2 * H; ++c) acc[r][c] = _mm512_dpwssd_epi32(acc[r][c], pair[c], pj);
        }
    }
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int r = 0; r < R; ++r) {
        const __m512 f = _mm512_set1_ps(pscale[r]);
        for (int h = 0; h < H; ++h) {
            const __m512 lo = _mm512_cvtepi32_ps(acc[r][2 * h]), hi = _mm512_cvtepi32_ps(acc[r][2 * h + 1]);
            float* dst = o + r * hdp + 32 * h;
            vstore(dst, _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, first, hi), f, vload(dst)));
            vstore(dst + W, _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, second, hi), f, vload(dst + W)));
        }
    }
}

template <int R>
void pv_i16_rows(int rows, int groups, float* o, int64_t hdp, const float* p, const uint8_t* const* v,
                 int64_t offset, int n, Prefetcher* pf) {
    if constexpr (R > 1) {
        if (rows < R) return pv_i16_rows<R - 1>(rows, groups, o, hdp, p, v, offset, n, pf);
    }
    if (groups == 2) return pv_i16<R, 2>(o, hdp, p, v, offset, n, pf);
    pv_i16<R, 1>(o, hdp, p, v, offset, n, pf);
}
#endif

// A row's running max raised to `top` if that is larger; the sum and the output accumulated under
// the old max are rescaled to the new one.
inline void raise_max(float top, float& m, float& l, float* o, int64_t hdp) {
    if (top > m) {
        if (l != 0.f) {  // m was finite: rescale what was accumulated under it
            const float alpha = std::exp(m - top);
            l *= alpha;
            for (int64_t d = 0; d < hdp; d += W) vstore(o + d, vmul(vload(o + d), vset1(alpha)));
        }
        m = top;
    }
}
// One row's online-softmax step over a chunk of V vectors of scores: its first `valid` (>= 1)
// become probabilities in place (the rest 0).
template <int V>
inline void softmax_row(float* s, int valid, float& m, float& l, float* o, int64_t hdp) {
    vf x[V];
    for (int v = 0; v < V; ++v) x[v] = vfirst(vload(s + v * W), std::clamp(valid - v * W, 0, W), kNegInf);
    vf top = x[0];
    for (int v = 1; v < V; ++v) top = vmax(top, x[v]);
    raise_max(vhmax(top), m, l, o, hdp);
    vf sum = vzero();
    for (int v = 0; v < V; ++v) {
        const vf e = vfirst(vexp(vsub(x[v], vset1(m))), std::clamp(valid - v * W, 0, W), 0.f);
        sum = v == 0 ? e : vadd(sum, e);
        vstore(s + v * W, e);
    }
    l += vhsum(sum);
}

// A chunk's first n cache rows (each `offset` bytes past rows[j]) as fp32 rows of buf ([n][hdp],
// zero-padded), and out[j] pointing at row j: rows read as KV_F32 from then on.
template <int DT>
void convert_rows(const Problem& p, const uint8_t* const* rows, int64_t offset, int n, float* buf,
                  const uint8_t** out) {
    for (int j = 0; j < n; ++j) {
        load_row<DT>(buf + j * p.hdp, rows[j] + offset, p.hd);
        out[j] = reinterpret_cast<const uint8_t*>(buf + j * p.hdp);
    }
}

// The unit's scores against W keys whose K rows are at krows (the ones past the sequence's keys
// pointing at zeros), into s (row r at s[r * KMAX]): dot products of the K rows as they lie,
// DOT_ROWS rows a pass. One method for every row, decode or prefill: a row's arithmetic (and so
// its bits) never depends on how many rows share the unit, which makes the kernel batch
// invariant (see the top). Quantized K rows are converted once into kb when more than one pass
// reads them (a prefill tile, a verification): the conversion is exact, so the scores' bits are
// those of converting as loaded.
template <int DT>
void scores_w(const Problem& p, Workspace& ws, int64_t rows, const uint8_t* const* krows, float* s, Prefetcher* pf) {
    if constexpr (DT == KV_FP8) {  // no NaN byte: the conversion without its fix-up
        if (!fp8_any_nan(krows, W, 0, p.hd)) return scores_w<KV_FP8_FINITE>(p, ws, rows, krows, s, pf);
    }
    if constexpr (DT != KV_F32) {
        if (rows > DOT_ROWS) {
            const uint8_t* converted[W];
            convert_rows<DT>(p, krows, 0, W, ws.kb, converted);
            return scores_w<KV_F32>(p, ws, rows, converted, s, pf);
        }
    }
    for (int64_t r0 = 0; r0 < rows; r0 += DOT_ROWS) {
        const int rr = int(std::min<int64_t>(DOT_ROWS, rows - r0));
        qk_dot_rows<DT, DOT_ROWS>(rr, ws.q + r0 * p.hdp, p.hdp, krows, p.hd, s + r0 * KMAX, r0 == 0 ? pf : nullptr);
    }
}

// The unit's scores against a chunk's KMAX K rows, W keys at a time.
template <int DT>
void chunk_scores(const Problem& p, Workspace& ws, int64_t rows, const uint8_t* const* krows, Prefetcher* pf) {
    for (int h = 0; h < KMAX / W; ++h) scores_w<DT>(p, ws, rows, krows + h * W, ws.s + h * W, pf);
}

// Scores into probabilities, row by row, for the chunk of n keys from key kc (causal: a row at
// position pos sees keys up to pos).
void chunk_softmax(const Problem& p, Workspace& ws, int64_t rows, int64_t kc, int n) {
    for (int64_t r = 0; r < rows; ++r) {
        float* s = ws.s + r * KMAX;
        const int valid = int(std::clamp<int64_t>(ws.pos[size_t(r)] - kc + 1, 0, n));
        if (valid == 0)
            std::fill(s, s + KMAX, 0.f);
        else
            softmax_row<KMAX / W>(s, valid, ws.m[r], ws.l[r], ws.o + r * p.hdp, p.hdp);
    }
}

// o += p v over the chunk's n keys (K rows at krows; V rows v_bytes further), in register tiles,
// V rows stored as DT.
template <int DT>
void values_tiles(const Problem& p, Workspace& ws, int64_t rows, const uint8_t* const* vrows, int n, Prefetcher* pf) {
    const int64_t hdp = p.hdp, vecs = hdp / W;
    for (int64_t r0 = 0; r0 < rows; r0 += PV_ROWS) {
        const int rr = int(std::min<int64_t>(PV_ROWS, rows - r0));
        for (int64_t c0 = 0; c0 < vecs; c0 += PV_VECS) {
            const int cc = int(std::min<int64_t>(PV_VECS, vecs - c0));
            pv_tiles<DT, PV_ROWS, PV_VECS>(rr, cc, ws.o + r0 * hdp + c0 * W, hdp, ws.s + r0 * KMAX, vrows, c0 * W, n,
                                           r0 == 0 && c0 == 0 ? pf : nullptr);
        }
    }
}

// o += p v over the chunk's n keys. V rows are read in place when whole vectors never cross a
// row's end (hd a multiple of W) and each is loaded once (fp32, or rows few enough for one row
// tile: converted as loaded); else converted once into vb, zero-padded.
template <int DT>
void chunk_values(const Problem& p, Workspace& ws, int64_t rows, const uint8_t* const* krows, int n, Prefetcher* pf) {
    if constexpr (DT == KV_FP8) {  // no NaN byte: the conversion without its fix-up
        if (!fp8_any_nan(krows, n, p.v_bytes, p.hd)) return chunk_values<KV_FP8_FINITE>(p, ws, rows, krows, n, pf);
    }
    if (p.hd % W == 0 && (DT == KV_F32 || rows <= PV_ROWS)) {
        for (int j = 0; j < n; ++j) ws.v[j] = krows[j] + p.v_bytes;
        return values_tiles<DT>(p, ws, rows, ws.v, n, pf);
    }
    convert_rows<DT>(p, krows, p.v_bytes, n, ws.vb, ws.v);
    values_tiles<KV_F32>(p, ws, rows, ws.v, n, pf);
}

#if defined(__AVX512F__)
// The int16 path's chunk: up to KMAX keys from key kc (n of them; krows holds KMAX K rows, the ones
// past n the zero row). Scores W keys a pass, then one online-softmax step and one value pass over
// all of them: the softmax's reductions and the values' per-chunk rounding and scaling come once
// per 32 keys. Chunks start at multiples of KMAX from key 0 in every plan (partitions are
// multiples of it), so a row's bits still depend on its own sequence alone.
// The next chunk's rows of KV head kh are requested during this one's loops, k_quota / v_quota
// lines a turn of the score / value loop (run_task's quotas).
void chunk_i16(const Problem& p, Workspace& ws, int64_t rows, const uint8_t* const* krows, int64_t kc, int n,
               Prefetcher* pf, int64_t kh, int64_t k_quota, int64_t v_quota) {
    pf->arm(kh * p.head_stride, k_quota);
    for (int64_t r0 = 0; r0 < rows; r0 += DOT_ROWS) {
        const int rr = int(std::min<int64_t>(DOT_ROWS, rows - r0));
        for (int h = 0; h * W < n; ++h)
            qk_i16_rows<DOT_ROWS>(rr, ws.q16.data() + r0 * p.hd, ws.q16_scale.data() + r0, p.hd, krows + h * W,
                                  ws.s + r0 * KMAX + h * W, KMAX, r0 == 0 ? pf : nullptr);
    }
    pf->drain();
    chunk_softmax(p, ws, rows, kc, n);
    // Values: keys in pairs, an odd chunk's last with the zero row (its p is 0).
    for (int j = 0; j < n; ++j) ws.v[j] = krows[j] + p.v_bytes;
    const int pairs = (n + 1) / 2 * 2;
    if (pairs > n) ws.v[n] = ws.zero_row;
    pf->arm(p.v_bytes + kh * p.head_stride, v_quota);
    for (int64_t r0 = 0; r0 < rows; r0 += PV_ROWS) {
        const int rr = int(std::min<int64_t>(PV_ROWS, rows - r0));
        for (int64_t c0 = 0; c0 < p.hd; c0 += 64) {
            const int groups = int(std::min<int64_t>(2, (p.hd - c0) / 32));
            pv_i16_rows<PV_ROWS>(rr, groups, ws.o + r0 * p.hdp + c0, p.hdp, ws.s + r0 * KMAX, ws.v, c0, pairs,
                                 r0 == 0 && c0 == 0 ? pf : nullptr);
        }
    }
    pf->drain();
}
#endif

// What a decoded K / V element is multiplied by: the head's scale (int8, fp8), and for fp8 the
// decoder's kFp8Unit.
inline float k_scale(const Problem& p, int64_t kh) {
    const float unit = p.dtype == KV_FP8 ? kFp8Unit : 1.f;
    return p.dtype == KV_F32 ? 1.f : p.a.cache.kv_scale[kh] * unit;
}
inline float v_scale(const Problem& p, int64_t kh) {
    const float unit = p.dtype == KV_FP8 ? kFp8Unit : 1.f;
    return p.dtype == KV_F32 ? 1.f : p.a.cache.kv_scale[p.a.cache.kv_heads + kh] * unit;
}

// The unit's query rows (token-major: row r is token t0 + r / group, head kh * group + r % group),
// scaled by the softmax scale and the K scale; their positions; an empty softmax state.
void stage_queries(const Problem& p, const Unit& u, Workspace& ws) {
    const AttentionArgs& a = p.a;
    const float qs = a.scale * k_scale(p, u.kh);
    const int64_t q0 = a.query_start_loc[u.seq], q_len = a.query_start_loc[u.seq + 1] - q0;
    const int64_t first_pos = a.context_lens[u.seq] - q_len - q0;  // position of token t: first_pos + t
    int64_t r = 0;
    for (int64_t t = u.t0; t < u.t1; ++t) {
        for (int64_t g = 0; g < p.group; ++g, ++r) {
            const float* src = a.q + (t * a.num_heads + u.kh * p.group + g) * p.hd;
            float* dst = ws.q + r * p.hdp;
            for (int64_t d = 0; d < p.hd; ++d) dst[d] = src[d] * qs;
            std::fill(dst + p.hd, dst + p.hdp, 0.f);
            ws.pos[size_t(r)] = first_pos + t;
            ws.m[r] = kNegInf;
            ws.l[r] = 0.f;
        }
    }
    std::fill(ws.o, ws.o + r * p.hdp, 0.f);
#if defined(__AVX512F__)
    if (p.i16) quantize_q16(ws.q, r, p.hd, ws.q16.data(), ws.q16_scale.data());
#endif
}

// A whole tile's rows, normalized (and times the V scale), into out; a part's into its scratch.
void finish_unit(const Problem& p, const Unit& u, const Workspace& ws, int64_t rows, float* partial) {
    if (partial != nullptr) {
        std::memcpy(partial, ws.o, size_t(rows * p.hdp) * sizeof(float));
        std::memcpy(partial + rows * p.hdp, ws.m, size_t(rows) * sizeof(float));
        std::memcpy(partial + rows * p.hdp + rows, ws.l, size_t(rows) * sizeof(float));
        return;
    }
    const float vs = v_scale(p, u.kh);
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = u.t0 + r / p.group, h = u.kh * p.group + r % p.group;
        float* dst = p.a.out + (t * p.a.num_heads + h) * p.hd;
        const float f = vs / ws.l[r];
        for (int64_t d = 0; d < p.hd; ++d) dst[d] = ws.o[r * p.hdp + d] * f;
    }
}

// A split tile's parts combined, for one KV head: each part's (o, l) weighted by
// e^(its max - the overall max).
void merge_split(const Problem& p, const Split& s, int64_t kh, const float* scratch) {
    const int64_t rows = (s.t1 - s.t0) * p.group, stride = partial_floats(p, rows) * p.a.cache.kv_heads;
    const float* base = scratch + s.scratch + kh * partial_floats(p, rows);
    const float vs = v_scale(p, kh);
    for (int64_t r = 0; r < rows; ++r) {
        float top = kNegInf;  // finite: part 0 holds key 0, which every row sees
        for (int64_t i = 0; i < s.parts; ++i) top = std::max(top, base[i * stride + rows * p.hdp + r]);
        const int64_t t = s.t0 + r / p.group, h = kh * p.group + r % p.group;
        float* dst = p.a.out + (t * p.a.num_heads + h) * p.hd;
        std::fill(dst, dst + p.hd, 0.f);
        float sum = 0.f;
        for (int64_t i = 0; i < s.parts; ++i) {
            const float* part = base + i * stride;
            const float m = part[rows * p.hdp + r];
            if (m == kNegInf) continue;  // every key of this part lies past the row's position
            const float w = std::exp(m - top);
            sum += w * part[rows * p.hdp + rows + r];
            for (int64_t d = 0; d < p.hd; ++d) dst[d] += w * part[r * p.hdp + d];
        }
        const float f = vs / sum;
        for (int64_t d = 0; d < p.hd; ++d) dst[d] *= f;
    }
}

// The call's work: per sequence, tiles of query tokens (one for a decode token), each over keys
// [0, its last token's position].
struct Plan {
    std::vector<Task> tasks;
    std::vector<Split> splits;
    int64_t scratch_floats = 0;
    double cost = 0;
};

// Split long tiles' keys into partitions of kPartKeys (from key 0), so that few sequences with
// long contexts still keep every thread busy (flash-decoding). The partitions depend on the
// tile's keys alone, not on the batch or the thread count: a row's keys are then summed in the
// same parts, merged in the same order, whatever else the call holds.
void split_long_tiles(const Problem& p, Plan& plan) {
    std::vector<Task> tasks;
    for (const Task& u : plan.tasks) {
        const int64_t keys = u.k1 - u.k0, len = kPartKeys;
        const int64_t parts = (keys + len - 1) / len;
        if (parts <= 1) {
            tasks.push_back(u);
            continue;
        }
        for (int64_t i = 0; i < parts; ++i) {
            Task v = u;
            v.k0 = u.k0 + i * len;
            v.k1 = std::min(u.k1, v.k0 + len);
            v.split = int64_t(plan.splits.size());
            v.part = i;
            v.cost = u.cost * double(v.k1 - v.k0) / double(keys);
            tasks.push_back(v);
        }
        plan.splits.push_back({u.seq, u.t0, u.t1, parts, plan.scratch_floats});
        plan.scratch_floats += parts * p.a.cache.kv_heads * partial_floats(p, (u.t1 - u.t0) * p.group);
    }
    plan.tasks.swap(tasks);
}

Plan make_plan(const Problem& p) {
    const AttentionArgs& a = p.a;
    Plan plan;
    for (int64_t b = 0; b < a.num_seqs; ++b) {
        const int64_t q0 = a.query_start_loc[b], q1 = a.query_start_loc[b + 1], ctx = a.context_lens[b];
        for (int64_t t0 = q0; t0 < q1; t0 += p.tile_tokens) {
            const int64_t t1 = std::min(q1, t0 + p.tile_tokens);
            const int64_t keys = ctx - (q1 - t1);  // the tile's last token sees keys [0, keys)
            const double cost = double(((t1 - t0) * p.group + kKeyCost) * a.cache.kv_heads) * double(keys);
            plan.tasks.push_back({b, t0, t1, 0, keys, -1, 0, cost});
            plan.cost += cost;
        }
    }
    split_long_tiles(p, plan);
    // Longest first: the dynamic schedule then ends with short tasks filling the gaps.
    const auto longer = [](const Task& x, const Task& y) { return x.cost > y.cost; };
    std::stable_sort(plan.tasks.begin(), plan.tasks.end(), longer);
    return plan;
}

// A task's keys chunk by chunk, every KV head of a chunk in turn (each head with its own
// workspace): the block table is walked once for all heads, and a block's rows are all used
// within a few chunks' time (measured against head after head over all keys: int8 and fp8 KV
// 3-15% faster from DRAM, fp32 unchanged). Head kh's K rows of the next chunk are
// requested while its scores of this chunk are computed, its V rows while its values are
// accumulated (a chunk ahead of their use).
template <int DT>
void run_task(const Problem& p, const Plan& plan, const Task& t, std::deque<Workspace>& ws, float* scratch) {
    const int64_t kvh = p.a.cache.kv_heads, rows = (t.t1 - t.t0) * p.group;
    for (int64_t kh = 0; kh < kvh; ++kh) stage_queries(p, Unit{t.seq, kh, t.t0, t.t1, t.k0, t.k1}, ws[size_t(kh)]);
    KeyCursor keys(p, t.seq, 0, t.k0);  // head 0's rows; head kh's lie kh * head_stride further
    const uint8_t *cur[KMAX], *next[KMAX], *head_rows[KMAX];
    const bool i16 = DT == KV_I8 && p.i16;
    constexpr int ck = KMAX;  // keys a chunk
    Prefetcher pf;
    // Lines a turn: the score loop's ck / 4 turns and the value loop's (a key a turn; a pair on the
    // int16 path) each request a chunk's rows of one head; other quantized chunks at once (0).
    const bool spread = DT == KV_F32 || i16;
    const int64_t chunk_lines = (ck * p.head_bytes + 63) / 64;
    const int64_t value_turns = i16 ? ck / 2 : ck;
    const int64_t k_quota = spread ? (chunk_lines + ck / 4 - 1) / (ck / 4) : 0;
    const int64_t v_quota = spread ? (chunk_lines + value_turns - 1) / value_turns : 0;
    int n_next = int(std::min<int64_t>(ck, t.k1 - t.k0));
    keys.next(n_next, next);
    pf.plan(next, n_next, p.head_bytes);
    for (int64_t kh = 0; kh < kvh; ++kh) {  // the first chunk's requests all in flight at once
        for (const int64_t offset : {kh * p.head_stride, p.v_bytes + kh * p.head_stride}) pf.arm(offset, 0);
    }
    for (int64_t kc = t.k0; kc < t.k1; kc += ck) {
        const int n = n_next;
        std::copy(next, next + n, cur);
        n_next = int(std::clamp<int64_t>(t.k1 - kc - ck, 0, ck));
        keys.next(n_next, next);
        pf.plan(next, n_next, p.head_bytes);
        for (int64_t kh = 0; kh < kvh; ++kh) {
            Workspace& w = ws[size_t(kh)];
            for (int j = 0; j < n; ++j) head_rows[j] = cur[j] + kh * p.head_stride;
            std::fill(head_rows + n, head_rows + ck, w.zero_row);
#if defined(__AVX512F__)
            if (i16) {
                chunk_i16(p, w, rows, head_rows, kc, n, &pf, kh, k_quota, v_quota);
                continue;
            }
#endif
            pf.arm(kh * p.head_stride, k_quota);
            chunk_scores<DT>(p, w, rows, head_rows, &pf);
            pf.drain();
            chunk_softmax(p, w, rows, kc, n);
            pf.arm(p.v_bytes + kh * p.head_stride, v_quota);
            chunk_values<DT>(p, w, rows, head_rows, n, &pf);
            pf.drain();
        }
    }
    const int64_t part_floats = partial_floats(p, rows);
    float* partial = nullptr;
    if (t.split >= 0) partial = scratch + plan.splits[size_t(t.split)].scratch + t.part * kvh * part_floats;
    for (int64_t kh = 0; kh < kvh; ++kh) {
        finish_unit(p, Unit{t.seq, kh, t.t0, t.t1, t.k0, t.k1}, ws[size_t(kh)], rows, partial);
        if (partial != nullptr) partial += part_floats;
    }
}

using RunTask = void (*)(const Problem&, const Plan&, const Task&, std::deque<Workspace>&, float*);

Problem make_problem(const AttentionArgs& a) {
    const KvCache& c = a.cache;
    const int64_t es = kv_elem_size(c.kv_dtype), hdp = round_up(c.head_dim, W), group = a.num_heads / c.kv_heads;
    // Tiles of about 2048 / hdp rows (32 for head_dim 64): queries and outputs stay in L1 / L2.
    const int64_t tile_tokens = std::max<int64_t>(1, std::max<int64_t>(8, 2048 / hdp) / group);
    const int64_t head_bytes = c.head_dim * es, head_stride = c.block_size * head_bytes;
    const int64_t block_bytes = c.kv_heads * head_stride;
    const int64_t v_bytes = c.num_blocks * block_bytes;
    const auto* cache = static_cast<const uint8_t*>(c.data);
#if defined(__AVX512F__)
    const bool i16 = a.vnni && c.kv_dtype == KV_I8 && c.head_dim % 32 == 0;
#else
    const bool i16 = false;
#endif
    return Problem{a, c.kv_dtype, c.head_dim, hdp, group, tile_tokens, head_bytes, head_stride, block_bytes, v_bytes,
                   cache, i16};
}

// Tokens that no sequence owns (before query_start_loc[0] and from query_start_loc[B]) are zeros.
void zero_unowned(const AttentionArgs& a) {
    const int64_t row = a.num_heads * a.cache.head_dim;
    const int64_t first = a.query_start_loc[0], last = a.query_start_loc[a.num_seqs];
    std::fill(a.out, a.out + first * row, 0.f);
    std::fill(a.out + last * row, a.out + a.num_tokens * row, 0.f);
}

}  // namespace

void paged_attention(const AttentionArgs& a) {
    zero_unowned(a);
    const int threads = std::max(1, a.num_threads);
    const Problem p = make_problem(a);
    const Plan plan = make_plan(p);
    std::vector<float> scratch(size_t(plan.scratch_floats));
    const RunTask run = p.dtype == KV_I8    ? run_task<KV_I8>
                        : p.dtype == KV_FP8 ? run_task<KV_FP8>
                                            : run_task<KV_F32>;
    const int64_t kvh = a.cache.kv_heads, n_tasks = int64_t(plan.tasks.size());
    const int64_t n_splits = int64_t(plan.splits.size());
    const bool parallel = threads > 1 && plan.cost >= kParallelCost;
#pragma omp parallel num_threads(threads) if (parallel)
    {
        std::deque<Workspace> ws;  // one per KV head (a deque: workspaces are not movable)
        for (int64_t kh = 0; kh < kvh; ++kh) ws.emplace_back(p.tile_tokens * p.group, p.hdp, p.i16);
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_tasks; ++i) run(p, plan, plan.tasks[size_t(i)], ws, scratch.data());
        if (n_splits > 0) {  // the same on every thread, as a worksharing construct must be
#pragma omp for schedule(dynamic, 1) collapse(2)
            for (int64_t i = 0; i < n_splits; ++i)
                for (int64_t kh = 0; kh < kvh; ++kh) merge_split(p, plan.splits[size_t(i)], kh, scratch.data());
        }
    }
}

}  // namespace ns::NS_ISA
