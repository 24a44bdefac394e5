// The reference kernels: plain C++, compiled with the baseline flags. Every SIMD kernel is
// tested against these. Four accumulators let the compiler pipeline the adds even without
// reassociating floating-point math.
#include <cmath>
#include <cstring>

#include "hnswcache/kernels.hpp"

namespace hnswcache {
namespace {

float dot_scalar(const float* a, const float* b, std::size_t n) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    std::size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; ++i) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

float l2sq_scalar(const float* a, const float* b, std::size_t n) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    std::size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const float d0 = a[i] - b[i], d1 = a[i + 1] - b[i + 1];
        const float d2 = a[i + 2] - b[i + 2], d3 = a[i + 3] - b[i + 3];
        s0 += d0 * d0;
        s1 += d1 * d1;
        s2 += d2 * d2;
        s3 += d3 * d3;
    }
    for (; i < n; ++i) {
        const float d = a[i] - b[i];
        s0 += d * d;
    }
    return (s0 + s1) + (s2 + s3);
}

void dot_batch_scalar(const float* q, const float* const* xs, std::size_t count, std::size_t dim,
                      float* out) {
    for (std::size_t i = 0; i < count; ++i) out[i] = dot_scalar(q, xs[i], dim);
}

void l2sq_batch_scalar(const float* q, const float* const* xs, std::size_t count,
                       std::size_t dim, float* out) {
    for (std::size_t i = 0; i < count; ++i) out[i] = l2sq_scalar(q, xs[i], dim);
}

// float32 query against 16-bit rows; One widens a value (float16 or bfloat16).
template <float (*One)(half_t)>
void dot_batch16_scalar(const float* q, const half_t* const* xs, std::size_t count,
                        std::size_t dim, float* out) {
    for (std::size_t j = 0; j < count; ++j) {
        float s0 = 0, s1 = 0;
        std::size_t i = 0;
        for (; i + 2 <= dim; i += 2) {
            s0 += q[i] * One(xs[j][i]);
            s1 += q[i + 1] * One(xs[j][i + 1]);
        }
        for (; i < dim; ++i) s0 += q[i] * One(xs[j][i]);
        out[j] = s0 + s1;
    }
}

template <float (*One)(half_t)>
void l2sq_batch16_scalar(const float* q, const half_t* const* xs, std::size_t count,
                         std::size_t dim, float* out) {
    for (std::size_t j = 0; j < count; ++j) {
        float s = 0;
        for (std::size_t i = 0; i < dim; ++i) {
            const float d = q[i] - One(xs[j][i]);
            s += d * d;
        }
        out[j] = s;
    }
}

void join_b_scalar(const half_t* high, const half_t* low, float* out, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) out[i] = join_halves(high[i], low[i]);
}

void encode_h_scalar(const float* in, half_t* out, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) out[i] = float_to_half(in[i]);
}

void decode_h_scalar(const half_t* in, float* out, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) out[i] = half_to_float(in[i]);
}

void dot_batch_i8_scalar(const float* q, const std::int8_t* const* xs, std::size_t count,
                         std::size_t dim, float* out) {
    for (std::size_t j = 0; j < count; ++j) {
        float s0 = 0, s1 = 0;
        std::size_t i = 0;
        for (; i + 2 <= dim; i += 2) {
            s0 += q[i] * static_cast<float>(xs[j][i]);
            s1 += q[i + 1] * static_cast<float>(xs[j][i + 1]);
        }
        for (; i < dim; ++i) s0 += q[i] * static_cast<float>(xs[j][i]);
        out[j] = s0 + s1;
    }
}

const kernels_t table{isa_t::scalar,
                      "scalar",
                      dot_scalar,
                      l2sq_scalar,
                      dot_batch_scalar,
                      l2sq_batch_scalar,
                      dot_batch16_scalar<half_to_float>,
                      l2sq_batch16_scalar<half_to_float>,
                      encode_h_scalar,
                      decode_h_scalar,
                      dot_batch_i8_scalar,
                      dot_batch16_scalar<bf16_to_float>,
                      l2sq_batch16_scalar<bf16_to_float>,
                      join_b_scalar,
                      hamming8_portable,
                      below_portable};

}  // namespace

void hamming8_portable(const std::uint64_t* q, const std::uint64_t* codes, std::size_t count,
                       std::size_t words, std::uint32_t* out) {
    for (std::size_t i = 0; i < count; ++i) {
        const std::uint64_t* c = codes + (i / 8) * words * 8 + i % 8;
        std::uint32_t h = 0;
        for (std::size_t w = 0; w < words; ++w)
            h += static_cast<std::uint32_t>(__builtin_popcountll(c[w * 8] ^ q[w]));
        out[i] = h;
    }
}

std::size_t below_portable(const std::uint32_t* d, std::size_t n, std::uint32_t bar,
                           std::uint32_t* out) {
    std::size_t k = 0;
    for (std::size_t i = 0; i < n; ++i) {  // (branch-free: writes every position, keeps some)
        out[k] = static_cast<std::uint32_t>(i);
        k += d[i] < bar;
    }
    return k;
}

half_t float_to_half(float x) {
    std::uint32_t f;
    std::memcpy(&f, &x, 4);
    const std::uint32_t sign = (f >> 16) & 0x8000u;
    f &= 0x7fffffffu;
    if (f > 0x7f800000u) return static_cast<half_t>(sign | 0x7e00u);   // NaN
    if (f >= 0x477ff000u) return static_cast<half_t>(sign | 0x7c00u);  // >= 65520: inf
    if (f < 0x38800000u) {                                              // below 2^-14
        float a;
        std::memcpy(&a, &f, 4);
        // Subnormal halves are multiples of 2^-24: scaling is exact, rounding to even.
        return static_cast<half_t>(sign | static_cast<std::uint32_t>(std::nearbyint(a * 16777216.0f)));
    }
    // Rebias the exponent and round the dropped 13 bits to nearest, ties to even.
    f += 0xc8000fffu + ((f >> 13) & 1u);
    return static_cast<half_t>(sign | (f >> 13));
}

float half_to_float(half_t h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    std::uint32_t f;
    if (exp == 0) {
        float v = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24
        std::memcpy(&f, &v, 4);
        f |= sign;
    } else if (exp == 31) {
        f = sign | 0x7f800000u | (mant << 13);
    } else {
        f = sign | ((exp + 112u) << 23) | (mant << 13);
    }
    float out;
    std::memcpy(&out, &f, 4);
    return out;
}

const kernels_t* scalar_kernels() { return &table; }

}  // namespace hnswcache
