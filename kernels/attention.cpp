// Paged attention and the K/V write (placeholder: plain loops; vectorized kernels replace these).
#include <cmath>
#include <cstring>
#include <vector>
#include <algorithm>

#include "internal.h"

namespace ns::NS_ISA {

namespace {
float fp8_to_float(uint8_t b) {
    uint32_t bits = uint32_t(b & 0x7F) << 20;
    float f;
    std::memcpy(&f, &bits, 4);
    f *= 0x1p120f;
    return (b & 0x80) ? -f : f;
}
uint8_t float_to_fp8(float x) {
    // round to nearest even e4m3fn, clamped to +-448
    float a = std::fabs(x);
    uint8_t sign = std::signbit(x) ? 0x80 : 0;
    if (!(a == a)) return 0x7F;
    if (a >= 448.f) return sign | 0x7E;
    if (a < 0x1p-10f) return sign;  // below half the smallest subnormal (2^-9)
    int e;
    std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
    int exp = e - 1;    // a = 1.x * 2^exp
    if (exp < -6) exp = -6;  // subnormal range shares the step 2^-9
    float step = std::ldexp(1.f, exp - 3);
    float q = std::nearbyint(a / step) * step;
    // re-encode q
    if (q >= 448.f) return sign | 0x7E;
    int qe;
    float qm = std::frexp(q, &qe);
    int E = qe - 1 + 7;
    if (q < 0x1p-6f) {  // subnormal: q = m * 2^-9
        return sign | uint8_t(std::lrint(q / 0x1p-9f));
    }
    int mant = int(std::lrint((qm * 2.f - 1.f) * 8.f));
    return sign | uint8_t(E << 3) | uint8_t(mant);
}
float load_kv(const KvCache& c, int64_t idx, int which_head_scale_kv, int64_t head) {
    switch (c.kv_dtype) {
        case KV_I8: return float(static_cast<const int8_t*>(c.data)[idx]) * c.kv_scale[which_head_scale_kv * c.kv_heads + head];
        case KV_FP8: return fp8_to_float(static_cast<const uint8_t*>(c.data)[idx]) * c.kv_scale[which_head_scale_kv * c.kv_heads + head];
        default: return static_cast<const float*>(c.data)[idx];
    }
}
}  // namespace

void write_kv(const WriteKvArgs& a) {
    const KvCache& c = a.cache;
    const int64_t row = c.kv_heads * c.head_dim;
    const int64_t v_off = c.num_blocks * c.block_size * row;
    for (int64_t t = 0; t < a.num_tokens; ++t) {
        for (int which = 0; which < 2; ++which) {
            const float* src = (which ? a.v : a.k) + t * row;
            const int64_t dst = which * v_off + a.slot_mapping[t] * row;
            for (int64_t h = 0; h < c.kv_heads; ++h) {
                for (int64_t d = 0; d < c.head_dim; ++d) {
                    const float x = src[h * c.head_dim + d];
                    const int64_t i = dst + h * c.head_dim + d;
                    if (c.kv_dtype == KV_F32) {
                        static_cast<float*>(c.data)[i] = x;
                    } else {
                        const float s = x / c.kv_scale[which * c.kv_heads + h];
                        if (c.kv_dtype == KV_I8)
                            static_cast<int8_t*>(c.data)[i] = int8_t(std::max(-127.f, std::min(127.f, std::nearbyint(s))));
                        else
                            static_cast<uint8_t*>(c.data)[i] = float_to_fp8(s);
                    }
                }
            }
        }
    }
}

void paged_attention(const AttentionArgs& a) {
    const KvCache& c = a.cache;
    const int64_t hd = c.head_dim, kvh = c.kv_heads, group = a.num_heads / kvh;
    const int64_t row = kvh * hd;
    const int64_t v_off = c.num_blocks * c.block_size * row;
    std::memset(a.out, 0, sizeof(float) * a.num_tokens * a.num_heads * hd);
    std::vector<float> scores;
    for (int64_t b = 0; b < a.num_seqs; ++b) {
        const int64_t q0 = a.query_start_loc[b], q1 = a.query_start_loc[b + 1], ctx = a.context_lens[b];
        for (int64_t t = q0; t < q1; ++t) {
            const int64_t pos = ctx - (q1 - q0) + (t - q0);
            for (int64_t h = 0; h < a.num_heads; ++h) {
                const int64_t kh = h / group;
                const float* q = a.q + (t * a.num_heads + h) * hd;
                scores.assign(pos + 1, 0.f);
                float m = -INFINITY;
                for (int64_t j = 0; j <= pos; ++j) {
                    const int64_t slot = a.block_tables[b * a.max_blocks + j / c.block_size] * c.block_size + j % c.block_size;
                    float s = 0;
                    for (int64_t d = 0; d < hd; ++d) s += q[d] * load_kv(c, slot * row + kh * hd + d, 0, kh);
                    scores[j] = s * a.scale;
                    m = std::max(m, scores[j]);
                }
                float denom = 0;
                for (auto& s : scores) { s = std::exp(s - m); denom += s; }
                float* o = a.out + (t * a.num_heads + h) * hd;
                for (int64_t j = 0; j <= pos; ++j) {
                    const int64_t slot = a.block_tables[b * a.max_blocks + j / c.block_size] * c.block_size + j % c.block_size;
                    for (int64_t d = 0; d < hd; ++d) o[d] += scores[j] / denom * load_kv(c, v_off + slot * row + kh * hd + d, 1, kh);
                }
            }
        }
    }
}

}  // namespace ns::NS_ISA
