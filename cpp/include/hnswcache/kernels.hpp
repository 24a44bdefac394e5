// Distance kernels on float32, one implementation per instruction set, chosen at run time.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace hnswcache {

enum class isa_t { scalar, avx2, avx512, neon };

// Computes out[i] = <q, xs[i]> for i < count. Batching lets one indirect call cover a whole
// neighbour list and lets the kernel overlap the memory streams of several vectors.
using dot_batch_fn = void (*)(const float* q, const float* const* xs, std::size_t count,
                              std::size_t dim, float* out);

struct kernels_t {
    isa_t isa;
    const char* name;
    float (*dot)(const float* a, const float* b, std::size_t dim);
    float (*l2sq)(const float* a, const float* b, std::size_t dim);
    dot_batch_fn dot_batch;
    dot_batch_fn l2sq_batch;  // out[i] = |q - xs[i]|^2
};

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
const kernels_t* avx512_kernels();
const kernels_t* neon_kernels();

}  // namespace hnswcache
