// Concurrency stress test of the core, without Python: inserting, upserting, searching,
// deleting, touching, consolidating and saving threads run at once. Built with
// ThreadSanitizer (.ci/tsan) it shows the index has no data race; in any build it checks that
// no search ever returns an entry deleted before the search began or one label twice, and
// that the graph is intact at the end.
#include <atomic>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "hnswcache/index.hpp"

using namespace hnswcache;

// One run per storage type (the int8 rows are read through another path of the walk).
static int run(dtype_t dtype) {
    const std::size_t dim = 24, n0 = 3000, n1 = 3000, k = 10;
    std::mt19937 rng(1);
    std::normal_distribution<float> gauss;
    std::vector<float> data((n0 + n1) * dim);
    for (float& v : data) v = gauss(rng);
    index_t idx(dim, metric_t::cosine, 8, 64, 0, 7, dtype);
    const std::int64_t now = 1000;
    std::vector<std::int64_t> labels(n0 + n1), never(n0 + n1, never_expires);
    for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<std::int64_t>(i);
    idx.add(data.data(), n0, labels.data(), never.data(), now, 2);

    // deleted_upto: every label below it was deleted before the value was published.
    std::atomic<std::int64_t> deleted_upto{0};
    std::atomic<bool> stop{false}, failed{false};

    std::thread inserter([&] {
        for (std::size_t s = n0; s < n0 + n1; s += 100)
            idx.add(data.data() + s * dim, 100, labels.data() + s, never.data() + s, now, 2);
    });
    std::thread deleter([&] {
        for (std::int64_t lab = 0; lab < 1500; lab += 25) {
            idx.remove(labels.data() + lab, 25, now);
            deleted_upto.store(lab + 25, std::memory_order_release);
        }
    });
    // Upserts of live labels: each makes a new slot searchable before the old one is
    // tombstoned, which a search in between could return as well (the same label twice).
    std::thread upserter([&] {
        for (int r = 0; r < 10; ++r)
            idx.add(data.data() + 2500 * dim, 300, labels.data() + 2500, never.data(), now, 1);
    });
    std::thread toucher([&] {
        std::vector<std::int64_t> exp(50, never_expires);
        for (int r = 0; r < 40; ++r) idx.touch(labels.data() + 2000 + r, exp.data(), 50, now);
    });
    std::thread consolidator([&] {
        while (!stop.load()) idx.consolidate(now, 1);
    });
    // Saves run alongside searches, deletes and touches (only inserts and consolidation wait
    // for them): each must load back, its checksum and structure intact.
    std::atomic<int> saves{0};
    std::thread saver([&] {
        while (!stop.load()) {
            const std::string bytes = idx.serialize();
            const auto loaded = index_t::deserialize(bytes.data(), bytes.size());
            if (loaded->check_integrity(now).allocated == 0) failed.store(true);
            saves.fetch_add(1);
        }
    });
    std::vector<std::thread> searchers;
    for (int t = 0; t < 2; ++t)
        searchers.emplace_back([&, t] {
            std::vector<std::int64_t> out_l(4 * k);
            std::vector<float> out_d(4 * k);
            std::size_t q = static_cast<std::size_t>(t) * 97;
            while (!stop.load()) {
                const std::int64_t dead_below = deleted_upto.load(std::memory_order_acquire);
                q = (q + 13) % n0;
                idx.search(data.data() + q * dim, 4, k, 32, now, 1, out_l.data(), out_d.data());
                for (std::int64_t l : out_l)
                    if (l >= 0 && l < dead_below) failed.store(true);
                for (std::size_t r = 0; r < 4; ++r)
                    for (std::size_t i = 0; i < k; ++i)
                        for (std::size_t j = 0; j < i; ++j)
                            if (out_l[r * k + i] >= 0 && out_l[r * k + i] == out_l[r * k + j])
                                failed.store(true);
            }
        });
    inserter.join();
    upserter.join();
    deleter.join();
    toucher.join();
    stop.store(true);
    consolidator.join();
    saver.join();
    for (auto& s : searchers) s.join();
    if (saves.load() == 0) {
        std::puts("FAIL: no save ran during the stress");
        return 1;
    }

    idx.consolidate(now, 2);
    const integrity_report_t rep = idx.check_integrity(now);
    std::printf("%s: live %zu allocated %zu free %zu unreachable %zu, %d saves\n",
                dtype_name(dtype), rep.live, rep.allocated, rep.free_slots,
                rep.unreachable_live, saves.load());
    if (failed.load()) {
        std::puts("FAIL: a deleted entry or a label twice was returned, or a save did not "
                  "load back");
        return 1;
    }
    if (rep.live != n0 + n1 - 1500 || rep.unreachable_live != 0) {
        std::puts("FAIL: wrong live count or unreachable nodes");
        return 1;
    }
    return 0;
}

int main() {
    for (dtype_t d : {dtype_t::float32, dtype_t::int8})
        if (run(d) != 0) return 1;
    std::puts("stress test passed");
    return 0;
}
