// AVX-512F kernels (this file alone is compiled with -mavx512f/dq/bw/vl -mfma). Tails use masked
// loads, so any dimension runs without a scalar loop. Kept in an anonymous namespace so none of
// this code can leak into paths that run on CPUs without AVX-512.
#include <immintrin.h>

#include "hnswcache/kernels.hpp"

namespace hnswcache {
namespace {

// Horizontal sum. (GCC 12's _mm512_reduce_add_ps trips -Wuninitialized in its own header.)
inline float hsum512(__m512 v) {
    const __m256 h = _mm256_add_ps(_mm512_extractf32x8_ps(v, 0), _mm512_extractf32x8_ps(v, 1));
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

inline __mmask16 tail_mask(std::size_t rem) {
    return static_cast<__mmask16>((1u << rem) - 1u);
}

float dot_avx512(const float* a, const float* b, std::size_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    __m512 s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    std::size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
    }
    for (; i + 16 <= n; i += 16)
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    if (i < n) {
        const __mmask16 m = tail_mask(n - i);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
    }
    return hsum512(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

float l2sq_avx512(const float* a, const float* b, std::size_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    std::size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i));
        const __m512 d1 = _mm512_sub_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16));
        s0 = _mm512_fmadd_ps(d0, d0, s0);
        s1 = _mm512_fmadd_ps(d1, d1, s1);
    }
    for (; i + 16 <= n; i += 16) {
        const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i));
        s0 = _mm512_fmadd_ps(d, d, s0);
    }
    if (i < n) {
        const __mmask16 m = tail_mask(n - i);
        const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i));
        s1 = _mm512_fmadd_ps(d, d, s1);
    }
    return hsum512(_mm512_add_ps(s0, s1));
}

// Four vectors per pass: q is loaded once per 16 lanes and four memory streams overlap.
void dot_batch_avx512(const float* q, const float* const* xs, std::size_t count, std::size_t n,
                      float* out) {
    std::size_t j = 0;
    for (; j + 4 <= count; j += 4) {
            const float *x0 = xs[j], *x1 = xs[j + 1], *x2 = xs[j + 2], *x3 = xs[j + 3];
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        __m512 s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
        std::size_t i = 0;
        for (; i + 16 <= n; i += 16) {
            const __m512 qv = _mm512_loadu_ps(q + i);
            s0 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(x0 + i), s0);
            s1 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(x1 + i), s1);
            s2 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(x2 + i), s2);
            s3 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(x3 + i), s3);
        }
        if (i < n) {
            const __mmask16 m = tail_mask(n - i);
            const __m512 qv = _mm512_maskz_loadu_ps(m, q + i);
            s0 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, x0 + i), s0);
            s1 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, x1 + i), s1);
            s2 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, x2 + i), s2);
            s3 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, x3 + i), s3);
        }
        out[j] = hsum512(s0);
        out[j + 1] = hsum512(s1);
        out[j + 2] = hsum512(s2);
        out[j + 3] = hsum512(s3);
    }
    for (; j < count; ++j) out[j] = dot_avx512(q, xs[j], n);
}

void l2sq_batch_avx512(const float* q, const float* const* xs, std::size_t count,
                       std::size_t n, float* out) {
    for (std::size_t j = 0; j < count; ++j) out[j] = l2sq_avx512(q, xs[j], n);
}

// The two 16-bit row formats: float16 (vcvtph2ps widens 16 halves per load) and bfloat16
// (the high half of a float32, widened by a shift). Tails use masked loads. (maskz forms:
// GCC 12 warns on the unmasked ones' own headers.) One kernel body serves both.
struct half_fmt {
    static __m512 load(const half_t* p) {
        return _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    static __m512 load_masked(const half_t* p, __mmask16 m) {
        return _mm512_maskz_cvtph_ps(0xffff, _mm256_maskz_loadu_epi16(m, p));
    }
};
struct bf16_fmt {
    static __m512 widen(__m256i v) {
        return _mm512_castsi512_ps(
            _mm512_maskz_slli_epi32(0xffff, _mm512_maskz_cvtepu16_epi32(0xffff, v), 16));
    }
    static __m512 load(const half_t* p) {
        return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    static __m512 load_masked(const half_t* p, __mmask16 m) {
        return widen(_mm256_maskz_loadu_epi16(m, p));
    }
};

// float32 query against 16-bit rows, four rows per pass.
template <class F>
void dot_batch16_avx512(const float* q, const half_t* const* xs, std::size_t count,
                        std::size_t n, float* out) {
    std::size_t j = 0;
    for (; j + 4 <= count; j += 4) {
        const half_t *x0 = xs[j], *x1 = xs[j + 1], *x2 = xs[j + 2], *x3 = xs[j + 3];
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        __m512 s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
        std::size_t i = 0;
        for (; i + 16 <= n; i += 16) {
            const __m512 qv = _mm512_loadu_ps(q + i);
            s0 = _mm512_fmadd_ps(qv, F::load(x0 + i), s0);
            s1 = _mm512_fmadd_ps(qv, F::load(x1 + i), s1);
            s2 = _mm512_fmadd_ps(qv, F::load(x2 + i), s2);
            s3 = _mm512_fmadd_ps(qv, F::load(x3 + i), s3);
        }
        if (i < n) {
            const __mmask16 m = tail_mask(n - i);
            const __m512 qv = _mm512_maskz_loadu_ps(m, q + i);
            s0 = _mm512_fmadd_ps(qv, F::load_masked(x0 + i, m), s0);
            s1 = _mm512_fmadd_ps(qv, F::load_masked(x1 + i, m), s1);
            s2 = _mm512_fmadd_ps(qv, F::load_masked(x2 + i, m), s2);
            s3 = _mm512_fmadd_ps(qv, F::load_masked(x3 + i, m), s3);
        }
        out[j] = hsum512(s0);
        out[j + 1] = hsum512(s1);
        out[j + 2] = hsum512(s2);
        out[j + 3] = hsum512(s3);
    }
    for (; j < count; ++j) {
        __m512 s0 = _mm512_setzero_ps();
        std::size_t i = 0;
        for (; i + 16 <= n; i += 16)
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), F::load(xs[j] + i), s0);
        if (i < n) {
            const __mmask16 m = tail_mask(n - i);
            s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i), F::load_masked(xs[j] + i, m), s0);
        }
        out[j] = hsum512(s0);
    }
}

template <class F>
void l2sq_batch16_avx512(const float* q, const half_t* const* xs, std::size_t count,
                         std::size_t n, float* out) {
    for (std::size_t j = 0; j < count; ++j) {
        __m512 s0 = _mm512_setzero_ps();
        std::size_t i = 0;
        for (; i + 16 <= n; i += 16) {
            const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(q + i), F::load(xs[j] + i));
            s0 = _mm512_fmadd_ps(d, d, s0);
        }
        if (i < n) {
            const __mmask16 m = tail_mask(n - i);
            const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, q + i), F::load_masked(xs[j] + i, m));
            s0 = _mm512_fmadd_ps(d, d, s0);
        }
        out[j] = hsum512(s0);
    }
}

void join_b_avx512(const half_t* high, const half_t* low, float* out, std::size_t n) {
    std::size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512i h = _mm512_maskz_cvtepu16_epi32(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(high + i)));
        const __m512i l = _mm512_maskz_cvtepu16_epi32(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(low + i)));
        _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_or_si512(_mm512_maskz_slli_epi32(0xffff, h, 16), l)));
    }
    for (; i < n; ++i) out[i] = join_halves(high[i], low[i]);
}

void encode_h_avx512(const float* in, half_t* out, std::size_t n) {
    std::size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                            _mm512_maskz_cvtps_ph(0xffff, _mm512_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) out[i] = float_to_half(in[i]);
}

void decode_h_avx512(const half_t* in, float* out, std::size_t n) {
    std::size_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, half_fmt::load(in + i));
    for (; i < n; ++i) out[i] = half_to_float(in[i]);
}

// 16 codes widened to 16 floats (vpmovsxbd + vcvtdq2ps); the tail load is masked.
// (maskz forms: GCC 12 warns on the unmasked ones' own headers.)
inline __m512 widen_i8(__m128i v) {
    return _mm512_maskz_cvtepi32_ps(0xffff, _mm512_maskz_cvtepi8_epi32(0xffff, v));
}
inline __m512 load_i8(const std::int8_t* p) {
    return widen_i8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m512 load_i8_masked(const std::int8_t* p, __mmask16 m) {
    return widen_i8(_mm_maskz_loadu_epi8(m, p));
}

void dot_batch_i8_avx512(const float* q, const std::int8_t* const* xs, std::size_t count,
                         std::size_t n, float* out) {
    for (std::size_t j = 0; j < count; ++j) {
        const std::int8_t* x = xs[j];
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        std::size_t i = 0;
        for (; i + 32 <= n; i += 32) {
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load_i8(x + i), s0);
            s1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 16), load_i8(x + i + 16), s1);
        }
        for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load_i8(x + i), s0);
        if (i < n) {
            const __mmask16 m = tail_mask(n - i);
            s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i), load_i8_masked(x + i, m), s1);
        }
        out[j] = hsum512(_mm512_add_ps(s0, s1));
    }
}

// Per-byte popcount by a 16-entry table of nibbles (vpshufb: AVX-512BW, unlike VPOPCNTQ,
// is on every AVX-512 CPU this file runs on). Bytes add up to 8 per word: 31 words at most
// before the sums go wide (vpsadbw), so any dimension is safe.
void hamming8_avx512(const std::uint64_t* q, const std::uint64_t* codes, std::size_t count,
                     std::size_t words, std::uint32_t* out) {
    // Bytes 0..15 = popcount(0..15), in each 128-bit lane. (Not _mm512_broadcast_i32x4 or
    // _mm512_cvtepi64_epi32: GCC 12's headers trip -Wuninitialized in them.)
    const __m512i table = _mm512_set4_epi32(0x04030302, 0x03020201, 0x03020201, 0x02010100);
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    for (std::size_t first = 0; first < count; first += 8, codes += words * 8) {
        const std::size_t lanes = count - first < 8 ? count - first : 8;
        const __mmask8 m = static_cast<__mmask8>((1u << lanes) - 1u);
        __m512i sums = _mm512_setzero_si512();  // 8 x u64
        for (std::size_t w0 = 0; w0 < words; w0 += 31) {
            const std::size_t w1 = words - w0 < 31 ? words : w0 + 31;
            __m512i bytes = _mm512_setzero_si512();
            for (std::size_t w = w0; w < w1; ++w) {
                const __m512i x = _mm512_xor_si512(_mm512_maskz_loadu_epi64(m, codes + w * 8),
                                                   _mm512_set1_epi64(static_cast<long long>(q[w])));
                bytes = _mm512_add_epi8(bytes, _mm512_shuffle_epi8(table, _mm512_and_si512(x, nibble)));
                bytes = _mm512_add_epi8(
                    bytes, _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(x, 4), nibble)));
            }
            sums = _mm512_add_epi64(sums, _mm512_sad_epu8(bytes, _mm512_setzero_si512()));
        }
        // (masked-off lanes were loaded as zero and xored with q: their sums are dropped)
        _mm512_mask_cvtepi64_storeu_epi32(out + first, m, sums);
    }
}

// With VPOPCNTQ (Ice Lake and later, Zen 4): one popcount per word of 8 codes, against the
// table's two shuffles and five other steps. A random vector's scan of 6.2k codes (100k sgd
// rows) went from ~9 to ~4.5 µs. Compiled for that extension alone, called only where cpuid
// reports it (avx512_kernels).
__attribute__((target("avx512vpopcntdq"))) void hamming8_avx512_vpopcnt(
    const std::uint64_t* q, const std::uint64_t* codes, std::size_t count, std::size_t words,
    std::uint32_t* out) {
    std::size_t first = 0;
    if (words <= 8) {
        // Up to 512 dimensions (all-MiniLM's 384: 6 words): the query's words stay in
        // registers and two blocks are summed at once, whose popcounts then overlap. The
        // scan of 6.2k codes: ~5.6 -> ~4.2 µs (timed inside a session build).
        __m512i qv[8];
        for (std::size_t w = 0; w < words; ++w) qv[w] = _mm512_set1_epi64(static_cast<long long>(q[w]));
        for (; first + 16 <= count; first += 16, codes += words * 16) {
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            for (std::size_t w = 0; w < words; ++w) {
                s0 = _mm512_add_epi64(s0, _mm512_popcnt_epi64(_mm512_xor_si512(
                                              _mm512_loadu_si512(codes + w * 8), qv[w])));
                s1 = _mm512_add_epi64(s1, _mm512_popcnt_epi64(_mm512_xor_si512(
                                              _mm512_loadu_si512(codes + (words + w) * 8), qv[w])));
            }
            _mm512_mask_cvtepi64_storeu_epi32(out + first, 0xff, s0);
            _mm512_mask_cvtepi64_storeu_epi32(out + first + 8, 0xff, s1);
        }
    }
    for (; first < count; first += 8, codes += words * 8) {  // (the rest: masked, 8 a block)
        const std::size_t lanes = count - first < 8 ? count - first : 8;
        const __mmask8 m = static_cast<__mmask8>((1u << lanes) - 1u);
        __m512i sums = _mm512_setzero_si512();  // 8 x u64
        for (std::size_t w = 0; w < words; ++w) {
            const __m512i x = _mm512_xor_si512(_mm512_maskz_loadu_epi64(m, codes + w * 8),
                                               _mm512_set1_epi64(static_cast<long long>(q[w])));
            sums = _mm512_add_epi64(sums, _mm512_popcnt_epi64(x));
        }
        _mm512_mask_cvtepi64_storeu_epi32(out + first, m, sums);
    }
}

// 16 distances a compare; the kept positions are compressed in a register and written with
// a contiguous mask (vpcompressd straight to memory is microcoded and slow on Zen 4).
std::size_t below_avx512(const std::uint32_t* d, std::size_t n, std::uint32_t bar,
                         std::uint32_t* out) {
    const __m512i b = _mm512_set1_epi32(static_cast<int>(bar));
    const __m512i step = _mm512_set1_epi32(16);
    __m512i pos = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    std::size_t k = 0;
    for (std::size_t i = 0; i < n; i += 16, pos = _mm512_add_epi32(pos, step)) {
        const __mmask16 live = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
        const __mmask16 m = _mm512_mask_cmplt_epu32_mask(live, _mm512_maskz_loadu_epi32(live, d + i), b);
        const unsigned kept = static_cast<unsigned>(__builtin_popcount(m));
        _mm512_mask_storeu_epi32(out + k, static_cast<__mmask16>((1u << kept) - 1u),
                                 _mm512_maskz_compress_epi32(m, pos));
        k += kept;
    }
    return k;
}

constexpr kernels_t table{isa_t::avx512,
                          "avx512",
                          dot_avx512,
                          l2sq_avx512,
                          dot_batch_avx512,
                          l2sq_batch_avx512,
                          dot_batch16_avx512<half_fmt>,
                          l2sq_batch16_avx512<half_fmt>,
                          encode_h_avx512,
                          decode_h_avx512,
                          dot_batch_i8_avx512,
                          dot_batch16_avx512<bf16_fmt>,
                          l2sq_batch16_avx512<bf16_fmt>,
                          join_b_avx512,
                          hamming8_avx512,
                          below_avx512};

constexpr kernels_t with_hamming(kernels_t k, hamming8_fn hamming) {
    k.hamming8 = hamming;
    return k;
}

// The same kernels but the Hamming one (all of VPOPCNTQ's use). Both tables are compile-time
// constants: handing one out runs no instruction of this file (dispatch calls these
// functions on any x86 CPU and chooses by cpuid; building a table at run time here ran
// AVX-512 code first and killed the process on CPUs without it).
constexpr kernels_t table_vpopcnt = with_hamming(table, hamming8_avx512_vpopcnt);

}  // namespace

const kernels_t* avx512_kernels(bool vpopcnt) { return vpopcnt ? &table_vpopcnt : &table; }

std::vector<std::pair<std::string, hamming8_fn>> avx512_hamming8_variants(bool vpopcnt) {
    std::vector<std::pair<std::string, hamming8_fn>> out{{"avx512 (nibble table)", hamming8_avx512}};
    if (vpopcnt) out.emplace_back("avx512 (vpopcntq)", hamming8_avx512_vpopcnt);
    return out;
}

}  // namespace hnswcache
