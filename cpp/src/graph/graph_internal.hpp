// Pieces shared by the graph's translation units; not part of the public C++ API.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <sys/mman.h>
#include <vector>

#include "hnswcache/index.hpp"

namespace hnswcache {

// Vectors are padded to a multiple of 16 floats (one AVX-512 register), so kernels on stored
// data never run a tail.
constexpr std::size_t simd_floats = 16;

inline std::size_t round_up(std::size_t x, std::size_t to) { return (x + to - 1) / to * to; }

// Zeroed memory that costs nothing until written: anonymous pages, which the kernel maps on
// first touch. A cache keeps an index per scope, and a chat app a scope per conversation:
// zero-filled by `new`, the chunk table (512 KiB) and the first chunk's side arrays (77 KiB)
// made every index of one entry cost ~600 KiB of memory (2,000 conversations: 1.2 GB).
// Objects here are of implicit-lifetime types (trivial members, no constructor or
// destructor), created by the mapping with every value zero (null pointers, label 0).
inline void* zeroed_pages(std::size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    return p;
}
inline void free_zeroed_pages(void* p, std::size_t bytes) {
    if (p != nullptr) munmap(p, bytes);
}

inline void* aligned_malloc(std::size_t bytes) {
    void* p = std::aligned_alloc(64, round_up(bytes, 64));
    if (p == nullptr) throw std::bad_alloc();
    return p;
}

// The vector slab is read at random places: with 4 KiB pages nearly every vector costs a TLB
// miss (and, in a virtual machine, a two-dimensional page walk). A slab asks Linux for
// transparent huge pages (a hint; ignored where unsupported) over every whole 2 MiB extent
// it holds, and starts on a 2 MiB boundary so that a slab of 2-4 MiB holds one at all (the
// skipped head is address space, never touched); the tail keeps small pages, so no memory is
// committed for nothing. Measured: an 8-bit slab (2.2 MiB) had ~0% of its pages huge before
// and 90% after. `huge` = false (an index's first chunk) keeps small pages: a tiny index
// must not cost 2 MiB.
inline void* slab_malloc(std::size_t bytes, bool huge) {
    constexpr std::size_t extent = std::size_t{2} << 20;
    if (!huge || bytes < extent) return aligned_malloc(bytes);
    // posix_memalign: aligned_alloc requires the size to be a multiple of the alignment.
    void* p = nullptr;
    if (posix_memalign(&p, extent, round_up(bytes, 64)) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, bytes / extent * extent, MADV_HUGEPAGE);
#endif
    return p;
}

// Link ids and counts are read while other threads rewrite them. Acquire/release on every
// access keeps this free of data races in the C++ memory model (plain moves on x86).
inline std::uint32_t atomic_load_u32(const std::uint32_t* p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
inline void atomic_store_u32(std::uint32_t* p, std::uint32_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

// Made by zeroed_pages and freed by index_t's destructor (see there): no initialisers, no
// destructor, so that it is created zeroed without a page written.
struct index_t::chunk_t {
    char* slab;  // chunk_size records of stride_ bytes
    half_t* low;  // float32 storage: low halves, chunk_size x dim_padded
    // The sign bits of this chunk's nodes of level >= 1, which a rescue scans (cosine, once
    // a rescue is set: index_t::sketching_): sketch_n codes in blocks of 8, each block
    // 8 * sketch_words_ u64 = the 8 codes word-major (as hamming8 reads them), then after the
    // chunk's codes the slot offset (u16) of each. One zeroed mapping of sketch_bytes, made
    // when the chunk's first such node is allocated (before it is published): only the
    // pages written cost memory. Appended under sketch_mu_ (a code is complete before
    // sketch_n counts it); compacted only under graph_mu_ held exclusively. (Here, on the
    // chunk's first page, which every index writes anyway.)
    std::uint64_t* sketch;
    std::size_t sketch_bytes;
    std::atomic<std::uint32_t> sketch_n;
    std::int64_t label[chunk_size];
    std::uint32_t* upper[chunk_size];
    std::uint8_t level[chunk_size];
    std::atomic<std::uint8_t> state[chunk_size];
    std::atomic<std::uint8_t> lock[chunk_size];
};

// Visited marks by epoch: a new search bumps the epoch instead of clearing the array.
struct visited_t {
    std::vector<std::uint16_t> marks;
    std::uint16_t epoch = 0;

    void reset(std::size_t n) {
        if (marks.size() < n) marks.resize(n + n / 4 + 64, 0);
        if (++epoch == 0) {
            std::fill(marks.begin(), marks.end(), 0);
            epoch = 1;
        }
    }
    void mark(std::uint32_t id) {
        if (id >= marks.size()) marks.resize(id + id / 4 + 64, 0);
        marks[id] = epoch;
    }
    // Returns whether id was already visited, and marks it.
    bool test_and_mark(std::uint32_t id) {
        if (id >= marks.size()) marks.resize(id + id / 4 + 64, 0);
        if (marks[id] == epoch) return true;
        marks[id] = epoch;
        return false;
    }
};

// Slot accessors: inline, since every distance computation goes through them.
inline index_t::chunk_t& index_t::chunk(slot_t id) const {
    return *chunks_[id >> chunk_bits].load(std::memory_order_acquire);
}
inline char* index_t::record(slot_t id) const {
    return chunk(id).slab + (id & (chunk_size - 1)) * stride_;
}
// An upper block: u32 words
//     f32 scale | f32 norm2 | 2 pad | int8 code[dim_padded] | levels 1..L of [count, ids[M]]
// where vector ~= scale * code (symmetric 8-bit quantisation, one scale per vector) and norm2
// is |scale * code|^2 (for L2). code_words_ = 4 + dim_padded / 4.
constexpr std::size_t upper_header_words = 4;
inline std::uint32_t* index_t::links(slot_t id, int level) const {
    if (level == 0) return reinterpret_cast<std::uint32_t*>(record(id));
    return chunk(id).upper[id & (chunk_size - 1)] + code_words_ +
           static_cast<std::size_t>(level - 1) * (1 + M_);
}
inline const char* index_t::raw(slot_t id) const { return record(id) + vec_offset_; }
inline const half_t* index_t::low_halves(slot_t id) const {
    return chunk(id).low + (id & (chunk_size - 1)) * dim_padded_;
}
// Symmetric 8-bit quantisation with one scale per vector (x ~= scale * code, |code| <= 127):
// the level-0 rows of dtype int8 and the upper levels' copies. Returns |scale * code|^2.
// |scale * code|^2, summed in order. One function for add() (through quantize_i8) and the
// loader, so that a row add() accepts under ip and l2 is never refused when loaded.
inline float i8_norm2_of(float scale, const std::int8_t* code, std::size_t n) {
    float norm2 = 0;
    for (std::size_t i = 0; i < n; ++i) {
        const float v = scale * static_cast<float>(code[i]);
        norm2 += v * v;
    }
    return norm2;
}
inline float quantize_i8(const float* x, std::size_t n, std::int8_t* code, float& scale) {
    float mx = 0;
    for (std::size_t i = 0; i < n; ++i) mx = std::max(mx, std::fabs(x[i]));
    scale = mx / 127.0f;
    for (std::size_t i = 0; i < n; ++i) {
        const long c = scale > 0 ? std::lrint(x[i] / scale) : 0;
        code[i] = static_cast<std::int8_t>(std::clamp(c, -127L, 127L));
    }
    return i8_norm2_of(scale, code, n);
}

// An int8 row: f32 scale | f32 norm2 | 8 pad | i8 code[dim_padded] (16-byte aligned codes).
constexpr std::size_t i8_row_header = 16;
inline float i8_scale(const char* row) {
    float s;
    std::memcpy(&s, row, sizeof s);
    return s;
}
inline float i8_norm2(const char* row) {
    float s;
    std::memcpy(&s, row + sizeof(float), sizeof s);
    return s;
}
inline const std::int8_t* i8_codes(const char* row) {
    return reinterpret_cast<const std::int8_t*>(row + i8_row_header);
}

inline const float* index_t::decoded(slot_t id, float* buf) const {
    if (dtype_ == dtype_t::int8) {
        const char* row = raw(id);
        const float scale = i8_scale(row);
        const std::int8_t* code = i8_codes(row);
        for (std::size_t i = 0; i < dim_padded_; ++i) buf[i] = scale * static_cast<float>(code[i]);
        return buf;
    }
    const half_t* high = reinterpret_cast<const half_t*>(raw(id));
    if (dtype_ == dtype_t::float16) {
        kernels_->decode_h(high, buf, dim_padded_);
        return buf;
    }
    kernels_->join_b(high, low_halves(id), buf, dim_padded_);
    return buf;
}
inline std::int64_t index_t::expiry(slot_t id) const {
    return __atomic_load_n(reinterpret_cast<const std::int64_t*>(record(id) + vec_offset_) - 1,
                           __ATOMIC_RELAXED);
}
inline void index_t::set_expiry(slot_t id, std::int64_t t) {
    __atomic_store_n(reinterpret_cast<std::int64_t*>(record(id) + vec_offset_) - 1, t,
                     __ATOMIC_RELAXED);
}
inline std::int64_t index_t::label(slot_t id) const { return chunk(id).label[id & (chunk_size - 1)]; }
inline int index_t::level(slot_t id) const { return chunk(id).level[id & (chunk_size - 1)]; }
inline std::uint8_t index_t::state(slot_t id) const {
    return chunk(id).state[id & (chunk_size - 1)].load(std::memory_order_acquire);
}

// Per-thread scratch space reused across calls, so a search allocates nothing.
struct index_t::scratch_t {
    visited_t visited;
    visited_t upper_visited;  // upper_beam's own: a rescue keeps the level-0 walk's marks
    std::vector<neighbor_t> candidates, results, found, prune, first;  // first: a rescued walk's
    std::vector<slot_t> selected, batch;
    std::vector<const float*> ptrs;
    std::vector<const half_t*> hptrs;
    std::vector<const std::int8_t*> cptrs;  // 8-bit rows (upper copies, dtype int8)
    std::vector<const std::uint32_t*> blocks;
    std::vector<float> dists;
    std::vector<std::int64_t> answered;  // labels of one answer (drop_duplicate_labels)
    // A rescue's scan of the sketches: the query's sign bits, each code's distance, each
    // chunk's span of them, a histogram of the distances, the nearest codes.
    std::vector<std::uint64_t> qbits;
    std::vector<std::uint32_t> ham, ham_hist;
    struct ham_span_t {
        const chunk_t* chunk;
        slot_t base;        // the chunk's first slot
        std::size_t first;  // where its codes' distances start in ham
        std::uint32_t count;
    };
    std::vector<ham_span_t> ham_spans;
    struct ham_entry_t {
        std::uint64_t key;  // distance << 32 | scan position: ordered as the scan ranks
        slot_t slot;
        bool operator<(const ham_entry_t& o) const { return key < o.key; }
    };
    std::vector<ham_entry_t> ham_pool;
    std::vector<std::uint32_t> ham_kept;  // positions of the distances the filter kept
    // Decoded stored vectors: `a` for the base/query side, `b` for heuristic candidates.
    std::vector<float> dec_a, dec_b, dec_c;  // dec_c: exact distances
    float* qbuf = nullptr;
    std::size_t qcap = 0;

    ~scratch_t() { std::free(qbuf); }

    // Room for a batch of n distances (a neighbour list, a beam's lists or the starts).
    void grow(std::size_t n) {
        batch.resize(n);
        ptrs.resize(n);
        hptrs.resize(n);
        cptrs.resize(n);
        blocks.resize(n);
        dists.resize(n);
    }
    static scratch_t& local(std::size_t max_degree, std::size_t dim_padded = 0) {
        thread_local scratch_t s;
        // A batch is a neighbour list or the level-0 starting points.
        max_degree = std::max(max_degree, max_search_starts);
        if (s.batch.size() < max_degree + 1) s.grow(max_degree + 1);
        if (s.dec_a.size() < dim_padded) {
            s.dec_a.resize(dim_padded);
            s.dec_b.resize(dim_padded);
            s.dec_c.resize(dim_padded);
        }
        return s;
    }
    float* query(std::size_t floats) {
        if (qcap < floats) {
            std::free(qbuf);
            qbuf = static_cast<float*>(aligned_malloc(floats * sizeof(float)));
            qcap = floats;
        }
        return qbuf;
    }
};

}  // namespace hnswcache
