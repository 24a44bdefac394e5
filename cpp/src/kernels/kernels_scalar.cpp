// The reference kernels: plain C++, compiled with the baseline flags. Every SIMD kernel is
// tested against these. Four accumulators let the compiler pipeline the adds even without
// reassociating floating-point math.
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

const kernels_t table{isa_t::scalar, "scalar", dot_scalar, l2sq_scalar, dot_batch_scalar,
                      l2sq_batch_scalar};

}  // namespace

const kernels_t* scalar_kernels() { return &table; }

}  // namespace hnswcache
