// The C entry points the Python face (neuronserve/ops) calls through ctypes: argument checks
// (a kernel never reads out of bounds: every index it will follow is checked here first), then
// the kernel of the requested instruction set. Each returns 0, or -1 with ns_last_error() set.
#include <Python.h>

#include <cstdarg>
#include <cstdio>
#include <string>

#include "internal.h"

namespace {

thread_local std::string last_error;

int fail(const char* fmt, ...) {
    char buf[512];
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, args);
    va_end(args);
    last_error = buf;
    return -1;
}

enum Isa : int { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512_VNNI = 3 };

int best_isa() {
#ifdef NS_SCALAR_ONLY
    return ISA_SCALAR;
#else
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
        return __builtin_cpu_supports("avx512vnni") ? ISA_AVX512_VNNI : ISA_AVX512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
        return ISA_AVX2;
    }
    return ISA_SCALAR;
#endif
}

const char* isa_name(int isa) {
    static const char* const names[] = {"scalar", "avx2", "avx512", "avx512_vnni"};
    return names[isa];
}

// The VNNI path (int8 activations) on the ISA a call runs.
int check_vnni(int chosen) {
    if (chosen == ISA_AVX512_VNNI) return 0;
    return fail("int8_activations: the VNNI path needs AVX-512 VNNI; this call runs %s", isa_name(chosen));
}

// The ISA a call runs: the one asked for, capped at what this CPU has.
int pick(int requested) {
    static const int best = best_isa();
    return (requested < 0 || requested > best) ? best : requested;
}

int check_cache(int kv_dtype, int64_t num_blocks, int64_t block_size, int64_t kvh, int64_t hd) {
    if (kv_dtype < ns::KV_F32 || kv_dtype > ns::KV_FP8) return fail("kv_cache: unknown dtype code %d", kv_dtype);
    if (num_blocks <= 0 || block_size <= 0 || kvh <= 0 || hd <= 0)
        return fail("kv_cache: bad shape (%lld blocks, block_size %lld, %lld heads, head_dim %lld)",
                    (long long)num_blocks, (long long)block_size, (long long)kvh, (long long)hd);
    return 0;
}

// Every sequence's query tokens within the step and its context within its block table, whose
// entries it will read lie inside the cache.
int check_sequences(int64_t num_tokens, int64_t num_heads, const int64_t* block_tables, int64_t num_seqs,
                    int64_t max_blocks, const int64_t* query_start_loc, const int64_t* context_lens,
                    int64_t num_blocks, int64_t block_size, int64_t kvh) {
    if (num_heads <= 0 || num_heads % kvh)
        return fail("q: %lld query heads are not a multiple of the cache's %lld KV heads", (long long)num_heads,
                    (long long)kvh);
    if (query_start_loc[0] < 0) return fail("query_start_loc: starts at %lld", (long long)query_start_loc[0]);
    for (int64_t b = 0; b < num_seqs; ++b) {
        const int64_t q_len = query_start_loc[b + 1] - query_start_loc[b];
        if (q_len < 0 || query_start_loc[b + 1] > num_tokens)
            return fail("query_start_loc: sequence %lld spans tokens [%lld, %lld) of %lld", (long long)b,
                        (long long)query_start_loc[b], (long long)query_start_loc[b + 1], (long long)num_tokens);
        const int64_t ctx = context_lens[b];
        if (ctx < q_len || ctx > max_blocks * block_size)
            return fail("context_lens: sequence %lld has %lld tokens (%lld new; the block table holds %lld)",
                        (long long)b, (long long)ctx, (long long)q_len, (long long)(max_blocks * block_size));
        if (q_len == 0) continue;  // a padding sequence reads nothing
        for (int64_t j = 0; j < (ctx + block_size - 1) / block_size; ++j) {
            const int64_t block = block_tables[b * max_blocks + j];
            if (block < 0 || block >= num_blocks)
                return fail("block_tables: block %lld (sequence %lld, entry %lld) is outside the cache's %lld blocks",
                            (long long)block, (long long)b, (long long)j, (long long)num_blocks);
        }
    }
    return 0;
}

int check_slots(const int64_t* slot_mapping, int64_t num_tokens, int64_t num_slots) {
    for (int64_t t = 0; t < num_tokens; ++t) {
        if (slot_mapping[t] < 0 || slot_mapping[t] >= num_slots)
            return fail("slot_mapping: slot %lld of token %lld is outside the cache's %lld slots",
                        (long long)slot_mapping[t], (long long)t, (long long)num_slots);
    }
    return 0;
}

}  // namespace

extern "C" {

const char* ns_last_error() { return last_error.c_str(); }

// 0 scalar, 1 AVX2/FMA, 2 AVX-512, 3 AVX-512 with VNNI.
int ns_best_isa() { return pick(-1); }

int ns_write_kv(const float* k, const float* v, int64_t num_tokens, const int64_t* slot_mapping, void* cache,
                int kv_dtype, int64_t num_blocks, int64_t block_size, int64_t kvh, int64_t hd,
                const float* kv_scale, int isa, int num_threads) {
    if (check_cache(kv_dtype, num_blocks, block_size, kvh, hd)) return -1;
    if (check_slots(slot_mapping, num_tokens, num_blocks * block_size)) return -1;
    ns::WriteKvArgs a{k, v, num_tokens, slot_mapping,
                      {cache, kv_dtype, num_blocks, block_size, kvh, hd, kv_scale}, num_threads};
    switch (pick(isa)) {
        case ISA_SCALAR: ns::scalar::write_kv(a); break;
#ifndef NS_SCALAR_ONLY
        case ISA_AVX2: ns::avx2::write_kv(a); break;
        default: ns::avx512::write_kv(a); break;
#else
        default: ns::scalar::write_kv(a); break;
#endif
    }
    return 0;
}

int ns_paged_attention(const float* q, float* out, int64_t num_tokens, int64_t num_heads,
                       const int64_t* block_tables, int64_t num_seqs, int64_t max_blocks,
                       const int64_t* query_start_loc, const int64_t* context_lens, float scale,
                       const void* cache, int kv_dtype, int64_t num_blocks, int64_t block_size, int64_t kvh,
                       int64_t hd, const float* kv_scale, int isa, int num_threads) {
    if (check_cache(kv_dtype, num_blocks, block_size, kvh, hd)) return -1;
    if (check_sequences(num_tokens, num_heads, block_tables, num_seqs, max_blocks, query_start_loc, context_lens,
                        num_blocks, block_size, kvh))
        return -1;
    ns::AttentionArgs a{q, out, num_tokens, num_heads, block_tables, num_seqs, max_blocks, query_start_loc,
                        context_lens, scale, {const_cast<void*>(cache), kv_dtype, num_blocks, block_size, kvh, hd,
                        kv_scale}, num_threads};
    const int chosen = pick(isa);
    a.vnni = chosen == ISA_AVX512_VNNI;
    switch (chosen) {
        case ISA_SCALAR: ns::scalar::paged_attention(a); break;
#ifndef NS_SCALAR_ONLY
        case ISA_AVX2: ns::avx2::paged_attention(a); break;
        default: ns::avx512::paged_attention(a); break;
#else
        default: ns::scalar::paged_attention(a); break;
#endif
    }
    return 0;
}

int ns_linear(const float* x, float* y, int64_t M, int64_t K, int64_t N, const void* w, int wtype,
              const float* scale, const float* minimum, int64_t group_size, const float* bias,
              int int8_activations, int isa, int num_threads) {
    if (M < 0 || K <= 0 || N <= 0) return fail("x: bad shape (M=%lld, K=%lld, N=%lld)", (long long)M, (long long)K, (long long)N);
    if (wtype < ns::W_F32 || wtype > ns::W_I4) return fail("weight: unknown type code %d", wtype);
    if (wtype == ns::W_I4 && (group_size <= 0 || group_size % 2 || K % group_size))
        return fail("group_size: %lld does not divide the %lld inputs into even groups", (long long)group_size,
                    (long long)K);
    if (int8_activations < 0 || int8_activations > 2)
        return fail("int8_activations: %d is not 0 (off), 1 (on) or 2 (on, packed weights)", int8_activations);
    ns::LinearArgs a{x, y, M, K, N, w, wtype, scale, minimum, group_size, bias, num_threads, int8_activations == 2};
    const int chosen = pick(isa);
    if (int8_activations) {  // the dynamically quantized int8 path
        if (wtype != ns::W_I8 || K % 32)
            return fail("int8_activations: the VNNI path takes int8 weights with K a multiple of 32");
        if (check_vnni(chosen)) return -1;
#ifndef NS_SCALAR_ONLY
        ns::avx512vnni::linear_int8(a);
#endif
        return 0;
    }
    switch (chosen) {
        case ISA_SCALAR: ns::scalar::linear(a); break;
#ifndef NS_SCALAR_ONLY
        case ISA_AVX2: ns::avx2::linear(a); break;
        default: ns::avx512::linear(a); break;
#else
        default: ns::scalar::linear(a); break;
#endif
    }
    return 0;
}


// int8 weights [N, K] into the VNNI path's order (internal.h), out: ceil(N / 16) * 16 * K bytes.
int ns_pack_int8(const int8_t* w, int64_t N, int64_t K, uint8_t* out) {
    if (N <= 0 || K <= 0 || K % 32) return fail("weight: [%lld, %lld] is not [N, a multiple of 32]", (long long)N, (long long)K);
    if (check_vnni(pick(-1))) return -1;
#ifndef NS_SCALAR_ONLY
    ns::avx512vnni::pack_int8(w, N, K, out);
#endif
    return 0;
}

// The decoder stack (decoder.cpp). The layers' weights are checked when the stack is built
// (neuronserve/ops/layers.py); here, the step: its sequences, slots and the VNNI path's needs.
int ns_decoder_layers(const ns::DecoderLayer* layers, int64_t num_layers, const ns::DecoderStep* step, int isa) {
    const ns::DecoderStep& s = *step;
    if (num_layers < 0) return fail("layers: %lld layers", (long long)num_layers);
    if (s.num_tokens < 0 || s.hidden <= 0 || s.intermediate <= 0)
        return fail("x: bad shape (%lld tokens, hidden %lld, intermediate %lld)", (long long)s.num_tokens,
                    (long long)s.hidden, (long long)s.intermediate);
    if (check_cache(s.kv_dtype, s.num_blocks, s.block_size, s.kv_heads, s.head_dim)) return -1;
    if (s.head_dim % 2) return fail("head_dim: %lld is odd (RoPE rotates halves)", (long long)s.head_dim);
    if (check_slots(s.slot_mapping, s.num_tokens, s.num_blocks * s.block_size)) return -1;
    if (check_sequences(s.num_tokens, s.num_heads, s.block_tables, s.num_seqs, s.max_blocks, s.query_start_loc,
                        s.context_lens, s.num_blocks, s.block_size, s.kv_heads))
        return -1;
    const int chosen = pick(isa);
    for (int64_t i = 0; i < num_layers; ++i) {
        for (const ns::LayerLinear* l : {&layers[i].qkv, &layers[i].o, &layers[i].gate_up, &layers[i].down}) {
            if (l->int8_activations && check_vnni(chosen)) return -1;
        }
    }
    switch (chosen) {
        case ISA_SCALAR: ns::scalar::decoder_layers(layers, num_layers, s, false); break;
#ifndef NS_SCALAR_ONLY
        case ISA_AVX2: ns::avx2::decoder_layers(layers, num_layers, s, false); break;
        default: ns::avx512::decoder_layers(layers, num_layers, s, chosen == ISA_AVX512_VNNI); break;
#else
        default: ns::scalar::decoder_layers(layers, num_layers, s, false); break;
#endif
    }
    return 0;
}

}  // extern "C"

// An importable (empty) module, so the package's import system finds the library wherever the
// install put it; the functions above are called through ctypes.
static PyModuleDef kernels_module = {PyModuleDef_HEAD_INIT, "_kernels",
                                     "neuronserve's native CPU kernels (called through ctypes).", -1, nullptr,
                                     nullptr, nullptr, nullptr, nullptr};
PyMODINIT_FUNC PyInit__kernels() { return PyModule_Create(&kernels_module); }
