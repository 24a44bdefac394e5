// Every kernel this CPU runs against the scalar reference and a double-precision sum, for
// every dimension 1..1025 and unaligned starts. The Python suite does the same through the
// bindings; this binary also runs where Python does not, e.g. an arm64 build under qemu.
#include <cmath>
#include <cstring>
#include <cstdio>
#include <random>
#include <vector>

#include "hnswcache/kernels.hpp"

using namespace hnswcache;

// 1-bit codes: Hamming distances of 0..40 codes of 1..70 words (past the 31 words whose byte
// sums the table kernels widen), against a plain popcount; nothing may be written past
// `count`. Returns the failures.
int check_hamming(const std::string& name, hamming8_fn fn) {
    int failures = 0;
    std::mt19937_64 bits(11);
    for (std::size_t words = 1; words <= 70; words += (words < 8 ? 1 : 9)) {
        std::vector<std::uint64_t> q(words);
        for (auto& w : q) w = bits();
        for (std::size_t count = 0; count <= 40; ++count) {
            const std::size_t blocks = (count + 7) / 8;
            std::vector<std::uint64_t> codes(blocks * words * 8);
            for (auto& w : codes) w = bits();
            std::vector<std::uint32_t> got(count + 8, 0xdeadbeefu);
            fn(q.data(), codes.data(), count, words, got.data());
            bool ham_ok = got[count] == 0xdeadbeefu;
            for (std::size_t i = 0; i < count; ++i) {
                std::uint32_t want = 0;
                for (std::size_t w = 0; w < words; ++w) {
                    std::uint64_t x = codes[((i / 8) * words + w) * 8 + i % 8] ^ q[w];
                    for (; x; x &= x - 1) ++want;
                }
                ham_ok = ham_ok && got[i] == want;
            }
            if (!ham_ok) {
                std::printf("FAIL %s hamming8 words %zu count %zu\n", name.c_str(), words, count);
                ++failures;
            }
        }
    }
    std::printf("%s: 1-bit Hamming distances checked\n", name.c_str());
    return failures;
}

// The scan's filter: positions of distances below a bar, for 0..70 distances and bars from
// 0 to past every distance (and the largest), against a plain loop. Returns the failures.
int check_below(const std::string& name, below_fn fn) {
    int failures = 0;
    std::mt19937 rng(13);
    for (std::size_t n = 0; n <= 70; ++n) {
        std::vector<std::uint32_t> d(n);
        for (auto& x : d) x = rng() % 400;
        for (std::uint32_t bar : {0u, 1u, 150u, 190u, 200u, 260u, 400u, 401u, 0xffffffffu}) {
            std::vector<std::uint32_t> got(n + 1, 0xdeadbeefu), want;
            for (std::size_t i = 0; i < n; ++i)
                if (d[i] < bar) want.push_back(static_cast<std::uint32_t>(i));
            const std::size_t k = fn(d.data(), n, bar, got.data());
            bool ok = k == want.size() && got[n] == 0xdeadbeefu;
            for (std::size_t i = 0; ok && i < k; ++i) ok = got[i] == want[i];
            if (!ok) {
                std::printf("FAIL %s below n %zu bar %u\n", name.c_str(), n, bar);
                ++failures;
            }
        }
    }
    std::printf("%s: distances below a bar checked\n", name.c_str());
    return failures;
}

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
            // float16 rows: conversions agree bit for bit with the portable ones, and the
            // distances with a double sum over the rounded values.
            std::vector<half_t> hb(dim);
            std::vector<float> back(dim);
            k.encode_h(b, hb.data(), dim);
            k.decode_h(hb.data(), back.data(), dim);
            bool halves_ok = true;
            double hdot = 0, hl2 = 0, hscale = 0;
            for (std::size_t i = 0; i < dim; ++i) {
                halves_ok = halves_ok && hb[i] == float_to_half(b[i]) && back[i] == half_to_float(hb[i]);
                hdot += static_cast<double>(a[i]) * back[i];
                hscale += std::fabs(static_cast<double>(a[i]) * back[i]);
                hl2 += (static_cast<double>(a[i]) - back[i]) * (static_cast<double>(a[i]) - back[i]);
            }
            const half_t* hx[1] = {hb.data()};
            float hd, hl;
            k.dot_batch_h(a, hx, 1, dim, &hd);
            k.l2sq_batch_h(a, hx, 1, dim, &hl);
            // int8 codes (the upper-level copy read by the greedy descent).
            std::vector<std::int8_t> codes(dim + 1);
            std::uniform_int_distribution<int> code(-127, 127);
            for (auto& c : codes) c = static_cast<std::int8_t>(code(rng));
            double idot = 0, iscale = 0;
            for (std::size_t i = 0; i < dim; ++i) {
                idot += static_cast<double>(a[i]) * codes[i + 1];
                iscale += std::fabs(static_cast<double>(a[i]) * codes[i + 1]);
            }
            const std::int8_t* ix[2] = {codes.data() + 1, codes.data() + 1};
            float id[2];
            k.dot_batch_i8(a, ix, 2, dim, id);
            // bfloat16 rows (the high halves the graph walk reads).
            std::vector<half_t> bb(dim);
            double bdot = 0, bl2 = 0, bscale = 0;
            for (std::size_t i = 0; i < dim; ++i) {
                std::uint32_t u;
                std::memcpy(&u, &b[i], 4);
                bb[i] = static_cast<half_t>(u >> 16);
                const double bv = bf16_to_float(bb[i]);
                bdot += a[i] * bv;
                bscale += std::fabs(a[i] * bv);
                bl2 += (a[i] - bv) * (a[i] - bv);
            }
            // Joining the high and low halves gives back the float32 bit for bit.
            std::vector<half_t> lb(dim);
            for (std::size_t i = 0; i < dim; ++i) {
                std::uint32_t u;
                std::memcpy(&u, &b[i], 4);
                lb[i] = static_cast<half_t>(u & 0xffffu);
            }
            std::vector<float> joined(dim);
            k.join_b(bb.data(), lb.data(), joined.data(), dim);
            const bool joins_ok = std::memcmp(joined.data(), b, dim * sizeof(float)) == 0;
            const half_t* bx[1] = {bb.data()};
            float bd, bl;
            k.dot_batch_b(a, bx, 1, dim, &bd);
            k.l2sq_batch_b(a, bx, 1, dim, &bl);
            const bool ok = std::fabs(k.dot(a, b, dim) - dot) <= 1e-5 * scale + 1e-30 &&
                            std::fabs(bd - bdot) <= 1e-5 * bscale + 1e-30 && joins_ok &&
                            std::fabs(bl - bl2) <= 1e-5 * bl2 + 1e-30 &&
                            std::fabs(id[0] - idot) <= 1e-5 * iscale + 1e-30 && id[1] == id[0] &&
                            std::fabs(k.l2sq(a, b, dim) - l2) <= 1e-5 * l2 + 1e-30 &&
                            std::fabs(batch[1] - dot) <= 1e-5 * scale + 1e-30 && halves_ok &&
                            std::fabs(hd - hdot) <= 1e-5 * hscale + 1e-30 &&
                            std::fabs(hl - hl2) <= 1e-5 * hl2 + 1e-30;
            if (!ok) {
                std::printf("FAIL %s dim %zu\n", name.c_str(), dim);
                ++failures;
            }
        }
        std::printf("%s: dims 1..1025 checked (float32, float16, bfloat16, int8)\n", name.c_str());
        failures += check_hamming(name, k.hamming8);
        failures += check_below(name, k.below);
        if (name == "avx512")  // (the table holds one of them: check every one this CPU runs)
            for (const auto& [variant, fn] : avx512_hamming8_variants(cpu_has_vpopcntdq()))
                failures += check_hamming(variant, fn);
    }
    if (failures) return 1;
    std::puts("kernel test passed");
    return 0;
}
