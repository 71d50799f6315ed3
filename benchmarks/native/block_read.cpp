// The rows of a paged K/V cache that one decode attention call reads, read in the attention
// kernel's order with no arithmetic: what this machine's memory delivers for that access pattern
// (scattered blocks, each head's rows a short run), the ceiling the kernel's cold figure sits
// under. Built and loaded by benchmarks/block_read.py; not part of the library.
//
// Per sequence (threads take sequences in turn), keys go by chunks; a chunk's rows are read head
// by head, K rows then V rows, a block's rows of a head as one run (as the kernel finds them), and
// each run read requests the same rows of the next chunk into L2 (the kernel's requests). Returns
// the XOR of every 8-byte word read, so that a caller can check that the call's bytes were read
// (each row once: a row read twice would cancel out).
//
// `work` adds about that many multiply-adds (vpdpwssd on AVX-512 VNNI, vpmaddwd + vpaddd on other
// AVX-512, a 64-bit multiply-add elsewhere) after each line read, on the line's data (Work): a
// stand-in for a kernel's arithmetic, to measure how much of it this machine hides behind the
// reads (cpu_kernels.py's overlap sweep). It does not change the result.
//
// Rows are addressed a run at a time, not a row at a time: the earlier reader found each row's
// block with a division, which with one-line int8 / fp8 rows (head_dim 64) cost more than the
// read and held it at ~67% of the plain read; a run at a time it reads them at ~86%, as fp32.
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
using Line = __m512i;  // one 64-byte line as read
#else
using Line = uint64_t;  // its first word
#endif

// XORs n bytes (a multiple of 8) as 8-byte words into x: one cheap instruction a line, so that
// reading, not checking, is what is timed.
struct Xor {
#if defined(__AVX512F__)
    __m512i acc = _mm512_setzero_si512();
#endif
    uint64_t x = 0;

    // The n bytes at p (whole 8-byte words); after each whole line, per_line(line) (the stand-in
    // arithmetic, the next chunk's requests).
    template <class F>
    void add(const uint8_t* p, int64_t n, F per_line) {
        int64_t i = 0;
        for (; i + 64 <= n; i += 64) {
#if defined(__AVX512F__)
            const Line line = _mm512_loadu_si512(p + i);
            acc = _mm512_xor_si512(acc, line);
#else
            for (int64_t j = 0; j < 64; j += 8) x ^= word(p + i + j);
            const Line line = word(p + i);
#endif
            per_line(line);
        }
        for (; i < n; i += 8) x ^= word(p + i);
    }
    static uint64_t word(const uint8_t* p) {
        uint64_t w;
        __builtin_memcpy(&w, p, 8);
        return w;
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

volatile uint64_t g_sink;  // where Work's result goes, so that it is not optimized away

// The stand-in arithmetic: `per_line` multiply-adds on each line read (rounded up to a multiple
// of 8), in 8 independent chains named one by one (an array of them was kept in memory by GCC).
struct Work {
    int64_t per_line = 0;
#if defined(__AVX512F__)
    __m512i c0 = _mm512_set1_epi32(0), c1 = _mm512_set1_epi32(1), c2 = _mm512_set1_epi32(2),
            c3 = _mm512_set1_epi32(3), c4 = _mm512_set1_epi32(4), c5 = _mm512_set1_epi32(5),
            c6 = _mm512_set1_epi32(6), c7 = _mm512_set1_epi32(7);
    static __m512i madd(__m512i c, __m512i v) {
#if defined(__AVX512VNNI__)
        return _mm512_dpwssd_epi32(c, v, v);
#else
        return _mm512_add_epi32(c, _mm512_madd_epi16(v, v));
#endif
    }
    void spin(Line v) {
        for (int64_t i = 0; i < per_line; i += 8) {
            c0 = madd(c0, v), c1 = madd(c1, v), c2 = madd(c2, v), c3 = madd(c3, v);
            c4 = madd(c4, v), c5 = madd(c5, v), c6 = madd(c6, v), c7 = madd(c7, v);
        }
    }
    void sink() const {
        alignas(64) uint64_t lanes[8];
        const __m512i a = _mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3));
        const __m512i b = _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7));
        _mm512_store_si512(lanes, _mm512_add_epi32(a, b));
        g_sink = lanes[0];
    }
#else
    uint64_t c0 = 0, c1 = 1, c2 = 2, c3 = 3, c4 = 4, c5 = 5, c6 = 6, c7 = 7;
    void spin(Line w) {
        constexpr uint64_t k = 0x9E3779B97F4A7C15ull;
        for (int64_t i = 0; i < per_line; i += 8) {
            c0 = c0 * k + w, c1 = c1 * k + w, c2 = c2 * k + w, c3 = c3 * k + w;
            c4 = c4 * k + w, c5 = c5 * k + w, c6 = c6 * k + w, c7 = c7 * k + w;
        }
    }
    void sink() const { g_sink = c0 ^ c1 ^ c2 ^ c3 ^ c4 ^ c5 ^ c6 ^ c7; }
#endif
};

inline void request(const uint8_t* p, int64_t n) {
    for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(p + i, 0, 2);  // prefetcht1
}

// The next chunk's runs of one head and kind, requested a line for each line read of the current
// chunk (spread, as the kernel spreads them: all at once measured ~5% slower for fp32), the rest
// when the current chunk's rows are read (drain).
struct Requests {
    static constexpr int kMax = 80;  // runs a chunk may hold (chunk_keys / block_size + 1)
    const uint8_t* at[kMax];
    int64_t left[kMax];
    int count = 0, i = 0;

    void add(const uint8_t* p, int64_t n) {
        if (count == kMax) return request(p, n);
        at[count] = p;
        left[count++] = n;
    }
    void step() {
        if (i == count) return;
        __builtin_prefetch(at[i], 0, 2);
        at[i] += 64;
        if ((left[i] -= 64) <= 0) ++i;
    }
    void drain() {
        for (; i < count; ++i) request(at[i], left[i]);
        count = i = 0;
    }
};

}  // namespace

// The rows of keys [key, key + count) of one head and kind, run by run (a run: the rows of one
// block); f(p, bytes) for each.
template <class F>
inline void for_runs(const uint8_t* base, const int64_t* table, int64_t block_size, int64_t block_bytes,
                     int64_t head_bytes, int64_t key, int64_t count, F f) {
    for (const int64_t end = key + count; key < end;) {
        const int64_t block = key / block_size, offset = key - block * block_size;
        const int64_t rows = block_size - offset < end - key ? block_size - offset : end - key;
        f(base + table[block] * block_bytes + offset * head_bytes, rows * head_bytes);
        key += rows;
    }
}

extern "C" uint64_t ns_read_blocks(const uint8_t* cache, const int64_t* tables, const int64_t* context_lens,
                                   int64_t num_seqs, int64_t max_blocks, int64_t kv_heads, int64_t block_size,
                                   int64_t head_bytes, int64_t v_bytes, int64_t chunk_keys, int threads,
                                   int64_t work) {
    const int64_t head_stride = block_size * head_bytes, block_bytes = kv_heads * head_stride;
    uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(^ : total)
    {
        Xor words;
        Work stand_in{work};
        Requests ahead;
#pragma omp for schedule(dynamic, 1)
        for (int64_t seq = 0; seq < num_seqs; ++seq) {
            const int64_t* table = tables + seq * max_blocks;
            const int64_t keys = context_lens[seq];
            for (int64_t k0 = 0; k0 < keys; k0 += chunk_keys) {
                const int64_t n = k0 + chunk_keys < keys ? chunk_keys : keys - k0;
                const int64_t next = k0 + chunk_keys;
                const int64_t next_n = next + chunk_keys < keys ? chunk_keys : keys - next;  // <= 0: none
                for (int64_t head = 0; head < kv_heads; ++head) {
                    for (int64_t kind = 0; kind < 2; ++kind) {  // K rows, then V rows
                        const uint8_t* base = cache + kind * v_bytes + head * head_stride;
                        if (next_n > 0)
                            for_runs(base, table, block_size, block_bytes, head_bytes, next, next_n,
                                     [&](const uint8_t* p, int64_t bytes) { ahead.add(p, bytes); });
                        for_runs(base, table, block_size, block_bytes, head_bytes, k0, n,
                                 [&](const uint8_t* p, int64_t bytes) {
                                     words.add(p, bytes, [&](Line line) {
                                         if (work > 0) stand_in.spin(line);
                                         ahead.step();
                                     });
                                 });
                        ahead.drain();
                    }
                }
            }
        }
        total ^= words.value();
        if (work > 0) stand_in.sink();
    }
    return total;
}
