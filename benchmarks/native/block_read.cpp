// The rows of a paged K/V cache that one decode attention call reads, read in the attention
// kernel's order with no arithmetic: what this machine's memory delivers for that access pattern
// (scattered blocks, each head's rows a short run), the ceiling the kernel's cold figure sits
// under. Built and loaded by benchmarks/block_read.py; not part of the library.
//
// Per sequence (threads take sequences in turn), keys go by chunks; a chunk's rows are read head
// by head, K rows then V rows, and each row read requests the same row of the next chunk into L2
// (the kernel's requests, spread one row a turn). Returns the XOR of every 8-byte word read, so
// that a caller can check that the call's bytes were read (each row once: a row read twice
// would cancel out).
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// XORs n bytes (a multiple of 8) as 8-byte words into x: one cheap instruction a line, so that
// reading, not checking, is what is timed.
struct Xor {
#if defined(__AVX512F__)
    __m512i acc = _mm512_setzero_si512();
#endif
    uint64_t x = 0;

    void add(const uint8_t* p, int64_t n) {
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 64 <= n; i += 64) acc = _mm512_xor_si512(acc, _mm512_loadu_si512(p + i));
#endif
        for (; i < n; i += 8) {
            uint64_t w;
            __builtin_memcpy(&w, p + i, 8);
            x ^= w;
        }
    }
    uint64_t value() const {
        uint64_t v = x;
#if defined(__AVX512F__)
        alignas(64) uint64_t lanes[8];
        _mm512_store_si512(lanes, acc);
        for (uint64_t lane : lanes) v ^= lane;
#endif
        return v;
    }
};

inline void request(const uint8_t* p, int64_t n) {
    for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(p + i, 0, 2);  // prefetcht1
}

}  // namespace

extern "C" uint64_t ns_read_blocks(const uint8_t* cache, const int64_t* tables, const int64_t* context_lens,
                                   int64_t num_seqs, int64_t max_blocks, int64_t kv_heads, int64_t block_size,
                                   int64_t head_bytes, int64_t v_bytes, int64_t chunk_keys, int threads) {
    const int64_t head_stride = block_size * head_bytes, block_bytes = kv_heads * head_stride;
    uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(^ : total)
    {
        Xor words;
#pragma omp for schedule(dynamic, 1)
        for (int64_t seq = 0; seq < num_seqs; ++seq) {
            const int64_t* table = tables + seq * max_blocks;
            const int64_t keys = context_lens[seq];
            const auto row = [&](int64_t key, int64_t head, int64_t kind) {
                return cache + kind * v_bytes + table[key / block_size] * block_bytes + head * head_stride +
                       key % block_size * head_bytes;
            };
            for (int64_t k0 = 0; k0 < keys; k0 += chunk_keys) {
                const int64_t k1 = k0 + chunk_keys < keys ? k0 + chunk_keys : keys;
                for (int64_t head = 0; head < kv_heads; ++head) {
                    for (int64_t kind = 0; kind < 2; ++kind) {  // K rows, then V rows
                        for (int64_t key = k0; key < k1; ++key) {
                            if (key + chunk_keys < keys) request(row(key + chunk_keys, head, kind), head_bytes);
                            words.add(row(key, head, kind), head_bytes);
                        }
                    }
                }
            }
        }
        total ^= words.value();
    }
    return total;
}
