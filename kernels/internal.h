// Internal contract between the dispatcher (api.cpp) and the per-ISA kernels.
//
// Each kernel source (attention.cpp, gemm.cpp) is compiled once per instruction set with
// NS_ISA set to scalar, avx2 or avx512 (and the matching -m flags); its functions live in
// namespace ns::NS_ISA. gemm_vnni.cpp is compiled for avx512 + VNNI only. api.cpp checks
// every argument before calling a kernel, so kernels may assume valid, in-range inputs.
#pragma once
#include <cstdint>

namespace ns {

enum KvDtype : int { KV_F32 = 0, KV_I8 = 1, KV_FP8 = 2 };  // fp8 = float8 e4m3fn bytes
enum WeightType : int { W_F32 = 0, W_I8 = 1, W_FP8 = 2, W_I4 = 3 };

// A request for the cache line holding p, into L1 (prefetch_l1, prefetcht0) or L2 (prefetch_l2,
// prefetcht1). asm statements rather than __builtin_prefetch: GCC counts the builtin as free of
// side effects and deletes a loop of nothing else when it can count the loop's turns, which once
// silently took whole chunks' requests away from the attention (measured: twice as slow from DRAM).
inline void prefetch_l1(const void* p) {
#if defined(__x86_64__)
    asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
    __builtin_prefetch(p, 0, 3);
#endif
}
inline void prefetch_l2(const void* p) {
#if defined(__x86_64__)
    asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
    __builtin_prefetch(p, 0, 2);
#endif
}

// One layer's KV cache: [2, num_blocks, kv_heads, block_size, head_dim], contiguous, of kv_dtype.
// Slot s (block s / block_size, row s % block_size) of head h of K is at element
// ((block * kv_heads + h) * block_size + row) * head_dim; V starts num_blocks blocks later.
struct KvCache {
    void* data;
    int kv_dtype;
    int64_t num_blocks, block_size, kv_heads, head_dim;
    const float* kv_scale;  // [2, kv_heads]: K's then V's per-head scale (int8 / fp8 only)
};

// Write the step's new K/V ([T, kv_heads, head_dim] fp32 each) into slot_mapping[t], quantizing
// with the head's scale for an int8 / fp8 cache (int8: round to nearest, clamp to +-127;
// fp8: clamp to +-448, round to nearest even e4m3fn).
struct WriteKvArgs {
    const float* k;
    const float* v;
    int64_t num_tokens;
    const int64_t* slot_mapping;  // [T]
    KvCache cache;
    int num_threads;
};

// Paged attention over the cache, read in place through block tables.
// Sequence b owns query tokens [query_start_loc[b], query_start_loc[b+1]); it has
// context_lens[b] tokens after this step, so its i-th query token sits at position
// context_lens[b] - q_len + i and attends causally over keys [0, that position].
// Query head h uses KV head h / (num_heads / kv_heads) (GQA). Tokens owned by no sequence
// (padding past query_start_loc[B]) get zeros. Softmax in fp32, online (no score matrix).
struct AttentionArgs {
    const float* q;  // [T, num_heads, head_dim]
    float* out;      // [T, num_heads, head_dim]
    int64_t num_tokens, num_heads;
    const int64_t* block_tables;  // [B, max_blocks]
    int64_t num_seqs, max_blocks;
    const int64_t* query_start_loc;  // [B + 1]
    const int64_t* context_lens;     // [B]
    float scale;                     // softmax scale (head_dim ** -0.5)
    KvCache cache;
    int num_threads;
    // AVX-512 VNNI (api.cpp's choice): an int8 cache's scores and values in int16 fixed point with
    // vpdpwssd (attention.cpp); else converted to fp32 as loaded.
    bool vnni = false;
};

// y[M, N] = x[M, K] @ W^T (+ bias), W stored [N, K] by row ("dot" form, as nn.Linear stores it):
//   W_F32: float [N, K]
//   W_I8:  int8 [N, K], w = q * scale[n]
//   W_FP8: e4m3fn bytes [N, K], w = fp8(q) * scale[n]
//   W_I4:  uint8 [N, K / 2] (input 2j in the low nibble, 2j+1 in the high), groups of group_size
//          inputs: w = q * scale[n, g] + minimum[n, g]
struct LinearArgs {
    const float* x;
    float* y;
    int64_t M, K, N;
    const void* w;
    int wtype;
    const float* scale;    // [N] (int8, fp8) or [N, K / group_size] (int4); unused for fp32
    const float* minimum;  // [N, K / group_size] (int4 only)
    int64_t group_size;    // int4 only
    const float* bias;     // [N] or null
    int num_threads;
    int w_packed = 0;      // VNNI path: w already in pack_int8's order (else [N, K], packed per call)
};

// The int8 path on VNNI (linear_int8, wtype W_I8, K a multiple of 32): x quantized on the fly per
// row in blocks of 32 inputs (one fp32 scale per block, symmetric, like llama.cpp's Q8_0) and
// multiplied with vpdpbusd; the integer sums are exact. Its weights in VNNI order (pack_int8):
// [ceil(N / 16)][K / 4][16][4] bytes, w + 128, columns past N zero weights. int8_activations in
// LayerLinear / ns_linear: 0 off, 1 on with [N, K] weights, 2 on with packed ones.

// A stack of decoder layers in one call (decoder.cpp). A linear layer's weights and format, as
// LinearArgs takes them (int8_activations: the VNNI path; AVX-512 VNNI only).
struct LayerLinear {
    const void* w;
    const float* scale;
    const float* minimum;
    const float* bias;
    int64_t group_size, K, N;
    int32_t wtype, int8_activations;
};

struct DecoderLayer {
    const float* input_norm;  // [hidden]
    const float* post_norm;   // [hidden]
    const float* kv_scale;    // [2, kv_heads]
    LayerLinear qkv, o, gate_up, down;  // gate_up: [2 * intermediate, hidden], gate rows first
};

// One step of the whole stack. x [T, hidden] is the residual stream, updated in place. The KV
// cache holds every layer's [2, num_blocks, block_size, kv_heads, head_dim] back to back.
struct DecoderStep {
    float* x;
    const float* cos;         // [T, head_dim]
    const float* rolled_sin;  // [T, head_dim]: sin, its first half negated
    const int64_t* slot_mapping;     // [T]
    const int64_t* block_tables;     // [num_seqs, max_blocks]
    const int64_t* query_start_loc;  // [num_seqs + 1]
    const int64_t* context_lens;     // [num_seqs]
    void* cache;
    int64_t num_tokens, hidden, intermediate, num_heads, kv_heads, head_dim;
    int64_t num_seqs, max_blocks, num_blocks, block_size;
    float eps, attn_scale;
    int32_t kv_dtype, num_threads;
};

#define NS_DECLARE_KERNELS(isa)                           \
    namespace isa {                                       \
    void write_kv(const WriteKvArgs& a);                  \
    void paged_attention(const AttentionArgs& a);         \
    void linear(const LinearArgs& a);                     \
    void decoder_layers(const DecoderLayer* layers, int64_t num_layers, const DecoderStep& s, bool vnni); \
    }

NS_DECLARE_KERNELS(scalar)
NS_DECLARE_KERNELS(avx2)
NS_DECLARE_KERNELS(avx512)

namespace avx512vnni {
void linear_int8(const LinearArgs& a);
void pack_int8(const int8_t* w, int64_t N, int64_t K, uint8_t* out);
}

}  // namespace ns
