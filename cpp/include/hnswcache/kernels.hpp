// Distance kernels on float32, one implementation per instruction set, chosen at run time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace hnswcache {

enum class isa_t { scalar, avx2, avx512, neon };

// Computes out[i] = <q, xs[i]> for i < count. Batching lets one indirect call cover a whole
// neighbour list and lets the kernel overlap the memory streams of several vectors.
using dot_batch_fn = void (*)(const float* q, const float* const* xs, std::size_t count,
                              std::size_t dim, float* out);

// IEEE binary16 storage: half the memory and memory traffic of float32, exact enough for
// normalised embeddings (11 significant bits). Queries stay float32.
using half_t = std::uint16_t;
using half_batch_fn = void (*)(const float* q, const half_t* const* xs, std::size_t count,
                               std::size_t dim, float* out);

// Signed 8-bit codes (a per-vector scale is applied by the caller): the compact copy of the
// upper-level vectors that the greedy descent reads. out[i] = sum_j q[j] * xs[i][j].
using i8_batch_fn = void (*)(const float* q, const std::int8_t* const* xs, std::size_t count,
                             std::size_t dim, float* out);

// 1-bit codes (the sign of each value, 64 to a word): out[i] = popcount(q ^ code_i), the
// Hamming distance, for i < count. Codes are stored in blocks of 8, word-major: word w of
// code j of block b is codes[(b * words + w) * 8 + j], so that one 512-bit load holds a
// word of 8 codes. Lanes of the last block past `count` are never read (another thread may
// be writing them).
using hamming8_fn = void (*)(const std::uint64_t* q, const std::uint64_t* codes,
                             std::size_t count, std::size_t words, std::uint32_t* out);

// The positions i < n with d[i] < bar, ascending, written to out (room for n); returns how
// many. Distances are below 2^31 (Hamming distances are). What a scan keeps of its
// distances: ~1 % of them, so the pass is the cost.
using below_fn = std::size_t (*)(const std::uint32_t* d, std::size_t n, std::uint32_t bar,
                                 std::uint32_t* out);

struct kernels_t {
    isa_t isa;
    const char* name;
    float (*dot)(const float* a, const float* b, std::size_t dim);
    float (*l2sq)(const float* a, const float* b, std::size_t dim);
    dot_batch_fn dot_batch;
    dot_batch_fn l2sq_batch;  // out[i] = |q - xs[i]|^2
    half_batch_fn dot_batch_h;
    half_batch_fn l2sq_batch_h;
    void (*encode_h)(const float* in, half_t* out, std::size_t n);  // round to nearest even
    void (*decode_h)(const half_t* in, float* out, std::size_t n);
    i8_batch_fn dot_batch_i8;
    half_batch_fn dot_batch_b;   // rows of bfloat16 (half_t holds the bits)
    half_batch_fn l2sq_batch_b;
    // out[i] = the float32 whose high and low 16 bits are high[i] and low[i] (exact).
    void (*join_b)(const half_t* high, const half_t* low, float* out, std::size_t n);
    hamming8_fn hamming8;
    below_fn below;
};

// The portable Hamming kernel: the reference, and the whole scalar and NEON one.
void hamming8_portable(const std::uint64_t* q, const std::uint64_t* codes, std::size_t count,
                       std::size_t words, std::uint32_t* out);
// The portable filter: the reference, and the scalar and NEON one.
std::size_t below_portable(const std::uint32_t* d, std::size_t n, std::uint32_t bar,
                           std::uint32_t* out);

// Portable conversions, the reference for every kernel.
half_t float_to_half(float f);
float half_to_float(half_t h);

// bfloat16 is the high half of a float32: widening is exact, a 16-bit shift. The index keeps
// float32 vectors as two 16-bit halves and walks the graph on the high ones.
inline float bf16_to_float(std::uint16_t h) {
    const std::uint32_t u = static_cast<std::uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
// The float32 whose high and low 16 bits are given, and its two halves.
inline float join_halves(std::uint16_t high, std::uint16_t low) {
    const std::uint32_t u = (static_cast<std::uint32_t>(high) << 16) | low;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline void split_halves(float x, std::uint16_t& high, std::uint16_t& low) {
    std::uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    high = static_cast<std::uint16_t>(u >> 16);
    low = static_cast<std::uint16_t>(u & 0xffffu);
}

// The kernels of one instruction set; throws std::invalid_argument if this build or this CPU
// lacks it.
const kernels_t& kernels_for(isa_t isa);

// The best kernels this CPU runs, or those named by HNSWCACHE_ISA (scalar|avx2|avx512|neon).
const kernels_t& default_kernels();

// Instruction sets both compiled in and supported by this CPU (scalar first).
std::vector<std::string> supported_isas();
isa_t parse_isa(const std::string& name);

// Per-ISA tables, defined in kernels_<isa>.cpp (those absent from the build return nullptr).
const kernels_t* scalar_kernels();
const kernels_t* avx2_kernels();
// vpopcnt: the table whose Hamming kernel uses VPOPCNTQ (the caller has checked the CPU).
const kernels_t* avx512_kernels(bool vpopcnt);
// The AVX-512 Hamming kernels, by name (the kernel test checks each this CPU runs: a CPU
// with VPOPCNTQ is handed only that one). Only to be called where AVX-512 runs.
std::vector<std::pair<std::string, hamming8_fn>> avx512_hamming8_variants(bool vpopcnt);
// Whether this CPU has AVX-512 VPOPCNTDQ (cpuid leaf 7, ECX bit 14); false off x86.
bool cpu_has_vpopcntdq();
const kernels_t* neon_kernels();

}  // namespace hnswcache
