// A stack of Llama decoder layers in one call: what neuronserve.model.llama's DecoderLayer computes
// per layer, on this ISA's kernels, with no Python between the steps of a layer or between layers.
// At one token a step the model's ~25 small torch ops and four library calls per layer cost more
// than reading the layer's weights (~200 us against ~130 us on SmolLM2-135M with int8 weights).
//
//   t = rms_norm(x) * input_norm
//   q, k, v = split(t @ Wqkv^T); q, k = rope(q), rope(k)      (rotate-half, cos / rolled sin given)
//   cache[slot] = k, v; a = paged_attention(q)                (attention.cpp)
//   x += a @ Wo^T
//   t = rms_norm(x) * post_norm
//   g, u = split(t @ Wgate_up^T); x += (silu(g) * u) @ Wdown^T (gemm.cpp, or gemm_vnni.cpp)
//
// The elementwise parts are plain loops the compiler vectorizes for this file's ISA; each token row
// is computed on its own, in the same order whatever else shares the step.
#include <cmath>
#include <cstring>
#include <vector>

#include "internal.h"

namespace ns::NS_ISA {

namespace {

// Steps of at least this many tokens run the elementwise loops on the team (a row each at a time).
constexpr int64_t PARALLEL_ROWS = 8;

// exp for the SiLU: 2^n * p(r), r = x - n ln 2 in [-ln2/2, ln2/2], p a degree-6 Taylor polynomial
// (relative error < 2e-7 over the range the clamp leaves). A branch-free loop body, so it vectorizes:
// the clamp is written with comparisons, as std::fmin / std::fmax are calls into libm (their NaN
// rules keep GCC from inlining them), which left the SiLU loop scalar.
inline float fast_exp(float x) {
    x = x > -87.f ? x : -87.f;  // NaN becomes -87, as std::fmax made it
    x = x < 88.f ? x : 88.f;
    const float n = std::floor(x * 1.44269504f + 0.5f);
    const float r = x - n * 0.693145752f - n * 1.42860677e-6f;
    float p = 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const int32_t bits = (int32_t(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

// out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, each row of H.
void rms_norm(const float* x, const float* w, float* out, int64_t T, int64_t H, float eps, int threads) {
#pragma omp parallel for num_threads(threads) if (T >= PARALLEL_ROWS)
    for (int64_t t = 0; t < T; ++t) {
        const float* xr = x + t * H;
        float part[16] = {};
        int64_t i = 0;
        for (; i + 16 <= H; i += 16)
            for (int l = 0; l < 16; ++l) part[l] += xr[i + l] * xr[i + l];
        float sum = 0.f;
        for (; i < H; ++i) sum += xr[i] * xr[i];
        for (int l = 0; l < 16; ++l) sum += part[l];
        const float inv = 1.f / std::sqrt(sum / float(H) + eps);
        float* o = out + t * H;
        for (int64_t j = 0; j < H; ++j) o[j] = xr[j] * inv * w[j];
    }
}

// RoPE in place on `heads` heads of each token's row (row stride ld): x * cos + roll(x, hd/2) * rsin,
// rsin being sin with its first half negated (the model's rolled_sin): the rotate-half form.
void rope(float* x, int64_t ld, int64_t T, int64_t heads, int64_t hd, const float* cos, const float* rsin,
          int threads) {
    const int64_t half = hd / 2;
#pragma omp parallel for num_threads(threads) if (T >= PARALLEL_ROWS)
    for (int64_t t = 0; t < T; ++t) {
        const float* c = cos + t * hd;
        const float* s = rsin + t * hd;
        for (int64_t h = 0; h < heads; ++h) {
            float* r = x + t * ld + h * hd;
            for (int64_t i = 0; i < half; ++i) {
                const float a = r[i], b = r[i + half];
                r[i] = a * c[i] + b * s[i];
                r[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

// out[t, :I] = silu(gu[t, :I]) * gu[t, I:2I].
void silu_mul(const float* gu, float* out, int64_t T, int64_t I, int threads) {
#pragma omp parallel for num_threads(threads) if (T >= PARALLEL_ROWS)
    for (int64_t t = 0; t < T; ++t) {
        const float* g = gu + t * 2 * I;
        const float* u = g + I;
        float* o = out + t * I;
        for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.f + fast_exp(-g[i])) * u[i];
    }
}

void add_into(float* x, const float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

// Columns [c0, c0 + width) of each of T rows of src (stride ld) into dst [T, width].
void copy_columns(const float* src, int64_t ld, int64_t c0, int64_t width, int64_t T, float* dst) {
    for (int64_t t = 0; t < T; ++t) std::memcpy(dst + t * width, src + t * ld + c0, size_t(width) * sizeof(float));
}

void run_linear(const LayerLinear& l, const float* x, float* y, int64_t M, int threads) {
    const LinearArgs a{x, y, M, l.K, l.N, l.w, l.wtype, l.scale, l.minimum, l.group_size, l.bias, threads,
                       l.int8_activations == 2};
#if defined(__AVX512F__)
    if (l.int8_activations) return avx512vnni::linear_int8(a);
#endif
    linear(a);
}

// Scratch for one call, kept between calls (the calling thread's).
struct Scratch {
    std::vector<float> t, qkv, q, k, v, attn, proj, gu, act;
    void size_for(const DecoderStep& s) {
        const int64_t T = s.num_tokens, qs = s.num_heads * s.head_dim, kvs = s.kv_heads * s.head_dim;
        t.resize(size_t(T * s.hidden)), proj.resize(size_t(T * s.hidden));
        qkv.resize(size_t(T * (qs + 2 * kvs))), q.resize(size_t(T * qs)), attn.resize(size_t(T * qs));
        k.resize(size_t(T * kvs)), v.resize(size_t(T * kvs));
        gu.resize(size_t(T * 2 * s.intermediate)), act.resize(size_t(T * s.intermediate));
    }
};

}  // namespace

void decoder_layers(const DecoderLayer* layers, int64_t num_layers, const DecoderStep& s, bool vnni) {
    const int64_t T = s.num_tokens, H = s.hidden, hd = s.head_dim;
    if (T == 0) return;
    const int64_t qs = s.num_heads * hd, kvs = s.kv_heads * hd, qkv_width = qs + 2 * kvs;
    thread_local Scratch buffers;
    Scratch& b = buffers;
    b.size_for(s);
    const int64_t cache_elems = 2 * s.num_blocks * s.block_size * kvs;
    const int64_t elem_bytes = s.kv_dtype == KV_F32 ? 4 : 1;
    for (int64_t i = 0; i < num_layers; ++i) {
        const DecoderLayer& l = layers[i];
        void* cache = static_cast<char*>(s.cache) + i * cache_elems * elem_bytes;
        const KvCache kv{cache, s.kv_dtype, s.num_blocks, s.block_size, s.kv_heads, hd, l.kv_scale};

        rms_norm(s.x, l.input_norm, b.t.data(), T, H, s.eps, s.num_threads);
        run_linear(l.qkv, b.t.data(), b.qkv.data(), T, s.num_threads);
        rope(b.qkv.data(), qkv_width, T, s.num_heads + s.kv_heads, hd, s.cos, s.rolled_sin, s.num_threads);
        copy_columns(b.qkv.data(), qkv_width, 0, qs, T, b.q.data());
        copy_columns(b.qkv.data(), qkv_width, qs, kvs, T, b.k.data());
        copy_columns(b.qkv.data(), qkv_width, qs + kvs, kvs, T, b.v.data());
        write_kv(WriteKvArgs{b.k.data(), b.v.data(), T, s.slot_mapping, kv, s.num_threads});
        paged_attention(AttentionArgs{b.q.data(), b.attn.data(), T, s.num_heads, s.block_tables, s.num_seqs,
                                      s.max_blocks, s.query_start_loc, s.context_lens, s.attn_scale, kv,
                                      s.num_threads, vnni});
        run_linear(l.o, b.attn.data(), b.proj.data(), T, s.num_threads);
        add_into(s.x, b.proj.data(), T * H);

        rms_norm(s.x, l.post_norm, b.t.data(), T, H, s.eps, s.num_threads);
        run_linear(l.gate_up, b.t.data(), b.gu.data(), T, s.num_threads);
        silu_mul(b.gu.data(), b.act.data(), T, s.intermediate, s.num_threads);
        run_linear(l.down, b.act.data(), b.proj.data(), T, s.num_threads);
        add_into(s.x, b.proj.data(), T * H);
    }
}

}  // namespace ns::NS_ISA
