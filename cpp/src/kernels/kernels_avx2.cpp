// AVX2 + FMA + F16C kernels (this file alone is compiled with -mavx2 -mfma -mf16c). Everything here sits in
// an anonymous namespace so no inline function compiled with these flags can be picked by the
// linker for code that runs on CPUs without AVX2.
#include <immintrin.h>

#include "hnswcache/kernels.hpp"

namespace hnswcache {
namespace {

inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    lo = _mm_add_ss(lo, sh);
    return _mm_cvtss_f32(lo);
}

float dot_avx2(const float* a, const float* b, std::size_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    std::size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

float l2sq_avx2(const float* a, const float* b, std::size_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    std::size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
        const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8));
        s0 = _mm256_fmadd_ps(d0, d0, s0);
        s1 = _mm256_fmadd_ps(d1, d1, s1);
    }
    for (; i + 8 <= n; i += 8) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
        s0 = _mm256_fmadd_ps(d, d, s0);
    }
    float s = hsum256(_mm256_add_ps(s0, s1));
    for (; i < n; ++i) {
        const float d = a[i] - b[i];
        s += d * d;
    }
    return s;
}

// Four vectors at once keep q in registers and overlap four independent memory streams.
void dot_batch_avx2(const float* q, const float* const* xs, std::size_t count, std::size_t n,
                    float* out) {
    std::size_t j = 0;
    for (; j + 4 <= count; j += 4) {
        const float *x0 = xs[j], *x1 = xs[j + 1], *x2 = xs[j + 2], *x3 = xs[j + 3];
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
        std::size_t i = 0;
        for (; i + 8 <= n; i += 8) {
            const __m256 qv = _mm256_loadu_ps(q + i);
            s0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(x0 + i), s0);
            s1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(x1 + i), s1);
            s2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(x2 + i), s2);
            s3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(x3 + i), s3);
        }
        float r0 = hsum256(s0), r1 = hsum256(s1), r2 = hsum256(s2), r3 = hsum256(s3);
        for (; i < n; ++i) {
            r0 += q[i] * x0[i];
            r1 += q[i] * x1[i];
            r2 += q[i] * x2[i];
            r3 += q[i] * x3[i];
        }
        out[j] = r0;
        out[j + 1] = r1;
        out[j + 2] = r2;
        out[j + 3] = r3;
    }
    for (; j < count; ++j) out[j] = dot_avx2(q, xs[j], n);
}

void l2sq_batch_avx2(const float* q, const float* const* xs, std::size_t count, std::size_t n,
                     float* out) {
    for (std::size_t j = 0; j < count; ++j) out[j] = l2sq_avx2(q, xs[j], n);
}

// The two 16-bit row formats: float16 (F16C widens 8 halves per load) and bfloat16 (the high
// half of a float32, widened by a shift: vpmovzxwd then vpslld 16). One kernel body each.
struct half_fmt {
    static __m256 load(const half_t* p) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
    static float one(half_t h) { return half_to_float(h); }
};
struct bf16_fmt {
    static __m256 load(const half_t* p) {
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
    }
    static float one(half_t h) { return bf16_to_float(h); }
};

// float32 query against 16-bit rows, four rows per pass.
template <class F>
void dot_batch16_avx2(const float* q, const half_t* const* xs, std::size_t count, std::size_t n,
                      float* out) {
    std::size_t j = 0;
    for (; j + 4 <= count; j += 4) {
        const half_t *x0 = xs[j], *x1 = xs[j + 1], *x2 = xs[j + 2], *x3 = xs[j + 3];
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
        std::size_t i = 0;
        for (; i + 8 <= n; i += 8) {
            const __m256 qv = _mm256_loadu_ps(q + i);
            s0 = _mm256_fmadd_ps(qv, F::load(x0 + i), s0);
            s1 = _mm256_fmadd_ps(qv, F::load(x1 + i), s1);
            s2 = _mm256_fmadd_ps(qv, F::load(x2 + i), s2);
            s3 = _mm256_fmadd_ps(qv, F::load(x3 + i), s3);
        }
        float r0 = hsum256(s0), r1 = hsum256(s1), r2 = hsum256(s2), r3 = hsum256(s3);
        for (; i < n; ++i) {
            r0 += q[i] * F::one(x0[i]);
            r1 += q[i] * F::one(x1[i]);
            r2 += q[i] * F::one(x2[i]);
            r3 += q[i] * F::one(x3[i]);
        }
        out[j] = r0;
        out[j + 1] = r1;
        out[j + 2] = r2;
        out[j + 3] = r3;
    }
    for (; j < count; ++j) {
        __m256 s0 = _mm256_setzero_ps();
        std::size_t i = 0;
        for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), F::load(xs[j] + i), s0);
        float r = hsum256(s0);
        for (; i < n; ++i) r += q[i] * F::one(xs[j][i]);
        out[j] = r;
    }
}

template <class F>
void l2sq_batch16_avx2(const float* q, const half_t* const* xs, std::size_t count,
                       std::size_t n, float* out) {
    for (std::size_t j = 0; j < count; ++j) {
        __m256 s0 = _mm256_setzero_ps();
        std::size_t i = 0;
        for (; i + 8 <= n; i += 8) {
            const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(q + i), F::load(xs[j] + i));
            s0 = _mm256_fmadd_ps(d, d, s0);
        }
        float r = hsum256(s0);
        for (; i < n; ++i) {
            const float d = q[i] - F::one(xs[j][i]);
            r += d * d;
        }
        out[j] = r;
    }
}

void join_b_avx2(const half_t* high, const half_t* low, float* out, std::size_t n) {
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(high + i)));
        const __m256i l = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(low + i)));
        _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_or_si256(_mm256_slli_epi32(h, 16), l)));
    }
    for (; i < n; ++i) out[i] = join_halves(high[i], low[i]);
}

void encode_h_avx2(const float* in, half_t* out, std::size_t n) {
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) out[i] = float_to_half(in[i]);
}

void decode_h_avx2(const half_t* in, float* out, std::size_t n) {
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, half_fmt::load(in + i));
    for (; i < n; ++i) out[i] = half_to_float(in[i]);
}

// 8 codes widened to 8 floats (vpmovsxbd + vcvtdq2ps).
inline __m256 load_i8(const std::int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

void dot_batch_i8_avx2(const float* q, const std::int8_t* const* xs, std::size_t count,
                       std::size_t n, float* out) {
    for (std::size_t j = 0; j < count; ++j) {
        const std::int8_t* x = xs[j];
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        std::size_t i = 0;
        for (; i + 16 <= n; i += 16) {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load_i8(x + i), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load_i8(x + i + 8), s1);
        }
        for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load_i8(x + i), s0);
        float r = 0;
        for (; i < n; ++i) r += q[i] * static_cast<float>(x[i]);
        out[j] = hsum256(_mm256_add_ps(s0, s1)) + r;
    }
}

// Per-byte popcount by a table of nibbles (vpshufb), 4 codes a register: see the AVX-512
// version. Tail lanes are masked loads (vpmaskmovq), so they are never read.
inline __m256i popcount_bytes(__m256i x, __m256i table, __m256i nibble) {
    return _mm256_add_epi8(_mm256_shuffle_epi8(table, _mm256_and_si256(x, nibble)),
                           _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(x, 4), nibble)));
}

void hamming8_avx2(const std::uint64_t* q, const std::uint64_t* codes, std::size_t count,
                   std::size_t words, std::uint32_t* out) {
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                           0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
    for (std::size_t first = 0; first < count; first += 8, codes += words * 8) {
        const long long lanes = static_cast<long long>(count - first < 8 ? count - first : 8);
        // A lane is loaded when its index is below `lanes` (the mask's sign bits).
        const __m256i m_lo = _mm256_cmpgt_epi64(_mm256_set1_epi64x(lanes), lane);
        const __m256i m_hi = _mm256_cmpgt_epi64(_mm256_set1_epi64x(lanes - 4), lane);
        __m256i sum_lo = _mm256_setzero_si256(), sum_hi = _mm256_setzero_si256();
        for (std::size_t w0 = 0; w0 < words; w0 += 31) {
            const std::size_t w1 = words - w0 < 31 ? words : w0 + 31;
            __m256i b_lo = _mm256_setzero_si256(), b_hi = _mm256_setzero_si256();
            for (std::size_t w = w0; w < w1; ++w) {
                const __m256i qw = _mm256_set1_epi64x(static_cast<long long>(q[w]));
                const auto* p = reinterpret_cast<const long long*>(codes + w * 8);
                b_lo = _mm256_add_epi8(b_lo, popcount_bytes(
                    _mm256_xor_si256(_mm256_maskload_epi64(p, m_lo), qw), table, nibble));
                b_hi = _mm256_add_epi8(b_hi, popcount_bytes(
                    _mm256_xor_si256(_mm256_maskload_epi64(p + 4, m_hi), qw), table, nibble));
            }
            sum_lo = _mm256_add_epi64(sum_lo, _mm256_sad_epu8(b_lo, _mm256_setzero_si256()));
            sum_hi = _mm256_add_epi64(sum_hi, _mm256_sad_epu8(b_hi, _mm256_setzero_si256()));
        }
        alignas(32) std::uint64_t h[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(h), sum_lo);
        _mm256_store_si256(reinterpret_cast<__m256i*>(h + 4), sum_hi);
        for (long long j = 0; j < lanes; ++j) out[first + static_cast<std::size_t>(j)] = static_cast<std::uint32_t>(h[j]);
    }
}

// 8 distances a compare; each set bit of its mask is a kept position.
std::size_t below_avx2(const std::uint32_t* d, std::size_t n, std::uint32_t bar,
                       std::uint32_t* out) {
    // (signed compares: distances are below 2^31, and a bar above is as good as 2^31 - 1)
    const std::uint32_t b31 = bar > 0x7fffffffu ? 0x7fffffffu : bar;
    const __m256i b = _mm256_set1_epi32(static_cast<int>(b31));
    std::size_t k = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + i));
        auto m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(b, x))));
        for (; m != 0; m &= m - 1) out[k++] = static_cast<std::uint32_t>(i + static_cast<unsigned>(__builtin_ctz(m)));
    }
    for (; i < n; ++i)
        if (d[i] < b31) out[k++] = static_cast<std::uint32_t>(i);
    return k;
}

const kernels_t table{isa_t::avx2,
                      "avx2",
                      dot_avx2,
                      l2sq_avx2,
                      dot_batch_avx2,
                      l2sq_batch_avx2,
                      dot_batch16_avx2<half_fmt>,
                      l2sq_batch16_avx2<half_fmt>,
                      encode_h_avx2,
                      decode_h_avx2,
                      dot_batch_i8_avx2,
                      dot_batch16_avx2<bf16_fmt>,
                      l2sq_batch16_avx2<bf16_fmt>,
                      join_b_avx2,
                      hamming8_avx2,
                      below_avx2};

}  // namespace

const kernels_t* avx2_kernels() { return &table; }

}  // namespace hnswcache
