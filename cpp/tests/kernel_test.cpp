// Every kernel this CPU runs against the scalar reference and a double-precision sum, for
// every dimension 1..1025 and unaligned starts. The Python suite does the same through the
// bindings; this binary also runs where Python does not, e.g. an arm64 build under qemu.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "hnswcache/kernels.hpp"

using namespace hnswcache;

int main() {
    std::mt19937 rng(7);
    std::normal_distribution<float> gauss;
    int failures = 0;
    for (const std::string& name : supported_isas()) {
        const kernels_t& k = kernels_for(parse_isa(name));
        for (std::size_t dim = 1; dim <= 1025; ++dim) {
            std::vector<float> buf(2 * dim + 3);
            for (float& v : buf) v = gauss(rng);
            const float* a = buf.data() + 1;
            const float* b = buf.data() + dim + 2;
            double dot = 0, l2 = 0, scale = 0;
            for (std::size_t i = 0; i < dim; ++i) {
                dot += static_cast<double>(a[i]) * b[i];
                scale += std::fabs(static_cast<double>(a[i]) * b[i]);
                l2 += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
            }
            const float* xs[3] = {a, b, a};
            float batch[3];
            k.dot_batch(a, xs, 3, dim, batch);
            const bool ok = std::fabs(k.dot(a, b, dim) - dot) <= 1e-5 * scale + 1e-30 &&
                            std::fabs(k.l2sq(a, b, dim) - l2) <= 1e-5 * l2 + 1e-30 &&
                            std::fabs(batch[1] - dot) <= 1e-5 * scale + 1e-30;
            if (!ok) {
                std::printf("FAIL %s dim %zu\n", name.c_str(), dim);
                ++failures;
            }
        }
        std::printf("%s: dims 1..1025 checked\n", name.c_str());
    }
    if (failures) return 1;
    std::puts("kernel test passed");
    return 0;
}
