// Picks the kernels once, from what the CPU reports at run time (never from the build machine).
#include <cstdlib>
#include <stdexcept>

#include "hnswcache/kernels.hpp"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace hnswcache {

#ifndef HNSWCACHE_HAVE_AVX2
const kernels_t* avx2_kernels() { return nullptr; }
#endif
#ifndef HNSWCACHE_HAVE_AVX512
const kernels_t* avx512_kernels(bool) { return nullptr; }
std::vector<std::pair<std::string, hamming8_fn>> avx512_hamming8_variants(bool) { return {}; }
#endif
#ifndef HNSWCACHE_HAVE_NEON
const kernels_t* neon_kernels() { return nullptr; }
#endif

namespace {

#if defined(__x86_64__) || defined(_M_X64)
unsigned long long xgetbv0() {
    unsigned eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return (static_cast<unsigned long long>(edx) << 32) | eax;
}

struct x86_features {
    bool avx2 = false, avx512 = false, vpopcntdq = false;
    x86_features() {
        unsigned a, b, c, d;
        if (!__get_cpuid(1, &a, &b, &c, &d)) return;
        const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
        if (!osxsave) return;
        const unsigned long long xcr0 = xgetbv0();
        const bool ymm_os = (xcr0 & 0x6) == 0x6;           // SSE + AVX state saved by the OS
        const bool zmm_os = (xcr0 & 0xe6) == 0xe6;         // + opmask and ZMM state
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return;
        avx2 = ymm_os && fma && f16c && (b & (1u << 5));
        const bool f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30),
                   vl = b & (1u << 31);
        avx512 = avx2 && zmm_os && f && dq && bw && vl;
        vpopcntdq = avx512 && (c & (1u << 14));
    }
};
const x86_features& features() {
    static const x86_features f;
    return f;
}
#endif

bool cpu_has(isa_t isa) {
    switch (isa) {
        case isa_t::scalar: return true;
#if defined(__x86_64__) || defined(_M_X64)
        case isa_t::avx2: return features().avx2;
        case isa_t::avx512: return features().avx512;
#else
        case isa_t::avx2:
        case isa_t::avx512: return false;
#endif
        case isa_t::neon:
#if defined(__aarch64__)
            return true;
#else
            return false;
#endif
    }
    return false;
}

const kernels_t* compiled(isa_t isa) {
    switch (isa) {
        case isa_t::scalar: return scalar_kernels();
        case isa_t::avx2: return avx2_kernels();
        case isa_t::avx512: return avx512_kernels(cpu_has_vpopcntdq());
        case isa_t::neon: return neon_kernels();
    }
    return nullptr;
}

const char* isa_name(isa_t isa) {
    switch (isa) {
        case isa_t::scalar: return "scalar";
        case isa_t::avx2: return "avx2";
        case isa_t::avx512: return "avx512";
        case isa_t::neon: return "neon";
    }
    return "?";
}

}  // namespace

bool cpu_has_vpopcntdq() {
#if defined(__x86_64__) || defined(_M_X64)
    return features().vpopcntdq;
#else
    return false;
#endif
}

isa_t parse_isa(const std::string& name) {
    if (name == "scalar") return isa_t::scalar;
    if (name == "avx2") return isa_t::avx2;
    if (name == "avx512") return isa_t::avx512;
    if (name == "neon") return isa_t::neon;
    throw std::invalid_argument("unknown instruction set '" + name +
                                "' (expected scalar, avx2, avx512 or neon)");
}

// (cpu_has before compiled, everywhere: nothing of an instruction set's file may run on a
// CPU without it.)
const kernels_t& kernels_for(isa_t isa) {
    const kernels_t* k = cpu_has(isa) ? compiled(isa) : nullptr;
    if (k == nullptr)
        throw std::invalid_argument(std::string("instruction set '") + isa_name(isa) +
                                    "' is not available on this CPU or in this build");
    return *k;
}

std::vector<std::string> supported_isas() {
    std::vector<std::string> out;
    for (isa_t isa : {isa_t::scalar, isa_t::neon, isa_t::avx2, isa_t::avx512})
        if (cpu_has(isa) && compiled(isa) != nullptr) out.emplace_back(isa_name(isa));
    return out;
}

const kernels_t& default_kernels() {
    if (const char* forced = std::getenv("HNSWCACHE_ISA"); forced != nullptr && *forced)
        return kernels_for(parse_isa(forced));
    for (isa_t isa : {isa_t::avx512, isa_t::avx2, isa_t::neon})
        if (cpu_has(isa) && compiled(isa) != nullptr) return *compiled(isa);
    return *scalar_kernels();
}

}  // namespace hnswcache
