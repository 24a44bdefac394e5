// Physical removal of dead entries, with the graph repaired around them.
//
// For every live node u that links to a dead node d at some level, the new link list is u's
// surviving links, filled with the live neighbours of d (one more hop through dead clusters)
// chosen by the HNSW heuristic, as in FreshDiskANN's delete consolidation (Singh et al.,
// 2021) and IP-DiskANN. A node left with fewer than half its target degree gets fresh
// candidates from a search of its level, so degrees cannot decay over many cycles (the decay
// Lucene saw, apache/lucene#16552). Then the dead slots go to the free list, the entry point
// moves to a live node of the top level, and a last pass links back any live node that
// nothing reaches any more.
//
// All new lists are computed (in parallel) before any is written. Searches and inserts go on
// meanwhile; both wait only while the lists are published (inserts also while the dead set
// is taken), and the publication keeps what inserts linked in the meantime.
#include <algorithm>
#include <chrono>
#include <deque>
#include <functional>
#include <mutex>

#include "graph_internal.hpp"
#include "hnswcache/thread_pool.hpp"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace hnswcache {

namespace {
struct repair_t {
    slot_t node;
    int level;
    std::vector<slot_t> links;  // the new list
    std::vector<slot_t> seen;   // the list it was computed from
};
}  // namespace

void index_t::free_slot(slot_t id) {
    chunk_t& ch = chunk(id);
    const std::size_t off = id & (chunk_size - 1);
    std::free(ch.upper[off]);
    ch.upper[off] = nullptr;
    ch.level[off] = 0;
    set_expiry(id, deleted_mark);
    atomic_store_u32(reinterpret_cast<std::uint32_t*>(record(id)), 0);
    ch.state[off].store(state_free, std::memory_order_release);
    free_slots_.push_back(id);
    std::push_heap(free_slots_.begin(), free_slots_.end(), std::greater<slot_t>());
}

std::vector<std::uint8_t> index_t::reachable_level0() const {
    const slot_t n = n_slots();
    std::vector<std::uint8_t> seen(n, 0);
    const std::uint64_t ep = entry_.load();
    if (ep == no_entry) return seen;
    std::vector<slot_t> stack{static_cast<slot_t>(ep & 0xffffffffu)};
    seen[stack.back()] = 1;
    while (!stack.empty()) {
        const slot_t u = stack.back();
        stack.pop_back();
        const std::uint32_t* l = links(u, 0);
        const std::uint32_t cnt = atomic_load_u32(l);
        for (std::uint32_t i = 0; i < cnt; ++i) {
            const slot_t v = atomic_load_u32(l + 1 + i);
            if (v < n && !seen[v]) {
                seen[v] = 1;
                stack.push_back(v);
            }
        }
    }
    return seen;
}

std::size_t index_t::reconnect_unreachable(std::int64_t now, std::size_t& distances) {
    // Each orphan gets an in-link from a close reachable node: one with a free link slot if
    // there is one, else one whose list holds a node that has another in-link (so replacing
    // it orphans nobody). Rounds repeat until a traversal finds every live node.
    std::size_t reconnected = 0;
    scratch_t& s = scratch_t::local(M0_, dim_padded_);
    auto contains = [](const std::uint32_t* l, slot_t v) {
        const std::uint32_t cnt = atomic_load_u32(l);
        for (std::uint32_t i = 0; i < cnt; ++i)
            if (atomic_load_u32(l + 1 + i) == v) return true;
        return false;
    };
    for (int round = 0; round < 8; ++round) {
        const std::vector<std::uint8_t> seen = reachable_level0();
        const slot_t n = n_slots();
        std::vector<slot_t> orphans;
        std::vector<std::uint32_t> indeg(n, 0);
        for (slot_t id = 0; id < n; ++id) {
            if (state(id) != state_ready) continue;
            if (!seen[id]) {
                orphans.push_back(id);
                continue;  // in-links that count are those from reachable nodes
            }
            const std::uint32_t* l = links(id, 0);
            const std::uint32_t cnt = atomic_load_u32(l);
            for (std::uint32_t i = 0; i < cnt; ++i) ++indeg[atomic_load_u32(l + 1 + i)];
        }
        if (orphans.empty()) break;
        const slot_t entry = static_cast<slot_t>(entry_.load() & 0xffffffffu);
        for (slot_t v : orphans) {
            std::vector<neighbor_t> found;
            search_level(decoded(v, s.dec_a.data()), entry, std::max<std::size_t>(M0_, 32), 0, true,
                         now, s, found);
            distances += found.size();
            found.erase(std::remove_if(found.begin(), found.end(),
                                       [v](const neighbor_t& x) { return x.second == v; }),
                        found.end());
            if (found.empty()) continue;
            const std::size_t tries = found.size();
            bool linked = false;
            for (std::size_t i = 0; i < tries && !linked; ++i) {
                std::uint32_t* l = links(found[i].second, 0);
                if (contains(l, v)) {
                    linked = true;
                } else if (atomic_load_u32(l) < M0_) {
                    const std::uint32_t cnt = atomic_load_u32(l);
                    atomic_store_u32(l + 1 + cnt, v);
                    atomic_store_u32(l, cnt + 1);
                    ++indeg[v];
                    linked = true;
                }
            }
            for (std::size_t i = 0; i < tries && !linked; ++i) {
                std::uint32_t* l = links(found[i].second, 0);
                const std::uint32_t cnt = atomic_load_u32(l);
                std::uint32_t best = cnt;
                for (std::uint32_t j = 0; j < cnt; ++j) {
                    const slot_t w = atomic_load_u32(l + 1 + j);
                    if (indeg[w] >= 2 && (best == cnt || indeg[w] > indeg[atomic_load_u32(l + 1 + best)]))
                        best = j;
                }
                if (best == cnt) continue;
                --indeg[atomic_load_u32(l + 1 + best)];
                atomic_store_u32(l + 1 + best, v);
                ++indeg[v];
                linked = true;
            }
            if (!linked) {
                // Every close list is full of sole in-links: take the nearest one's farthest
                // link; the node that loses it is an orphan for the next round.
                std::uint32_t* l = links(found.front().second, 0);
                const std::uint32_t cnt = atomic_load_u32(l);
                --indeg[atomic_load_u32(l + cnt)];
                atomic_store_u32(l + cnt, v);
                ++indeg[v];
                linked = true;
            }
            // Its own out-links: keep those it has, add the closest found up to M.
            std::uint32_t* vl = links(v, 0);
            if (linked) {
                const std::uint32_t cnt = atomic_load_u32(vl);
                for (std::uint32_t j = 0; j < cnt; ++j) ++indeg[atomic_load_u32(vl + 1 + j)];
            }
            for (const auto& [d, c] : found) {
                const std::uint32_t cnt = atomic_load_u32(vl);
                if (cnt >= M_) break;
                if (contains(vl, c)) continue;
                atomic_store_u32(vl + 1 + cnt, c);
                atomic_store_u32(vl, cnt + 1);
                if (linked) ++indeg[c];
            }
            if (linked) ++reconnected;
        }
    }
    return reconnected;
}

std::vector<slot_t> index_t::relink(slot_t node, int lvl, const std::vector<slot_t>& list,
                                    const std::vector<std::uint8_t>& dead, std::uint64_t entry,
                                    std::int64_t now, scratch_t& s,
                                    std::size_t& dcount) const {
    const auto is_dead = [&](slot_t v) { return v < dead.size() && dead[v] == 1; };
    const float* base = decoded(node, s.dec_a.data());
    const std::size_t cap = max_links(lvl);
    std::vector<slot_t> keep, extra;
    for (const slot_t v : list) {
        if (!is_dead(v)) {
            keep.push_back(v);
            continue;
        }
        // Candidates through the dead node: its live neighbours, or theirs if none.
        const std::uint32_t* dl = links(v, lvl);
        const std::uint32_t dc = atomic_load_u32(dl);
        bool any_live = false;
        for (std::uint32_t j = 0; j < dc; ++j) {
            const slot_t x = atomic_load_u32(dl + 1 + j);
            if (!is_dead(x) && x != node) {
                extra.push_back(x);
                any_live = true;
            }
        }
        if (!any_live) {
            for (std::uint32_t j = 0; j < dc; ++j) {
                const slot_t x = atomic_load_u32(dl + 1 + j);
                if (level(x) < lvl) continue;
                const std::uint32_t* xl = links(x, lvl);
                const std::uint32_t xc = atomic_load_u32(xl);
                for (std::uint32_t t = 0; t < xc; ++t) {
                    const slot_t y = atomic_load_u32(xl + 1 + t);
                    if (!is_dead(y) && y != node) extra.push_back(y);
                }
            }
        }
    }
    std::sort(extra.begin(), extra.end());
    extra.erase(std::unique(extra.begin(), extra.end()), extra.end());
    auto& cands = s.prune;
    cands.clear();
    for (slot_t x : extra)
        if (std::find(keep.begin(), keep.end(), x) == keep.end())
            cands.emplace_back(dist(base, x), x);
    dcount += cands.size();
    std::sort(cands.begin(), cands.end());
    // Fill: survivors stay, a candidate joins when no kept link is closer to it than the
    // base node is (the heuristic of Malkov & Yashunin, Algorithm 4).
    std::vector<slot_t> out = keep;
    for (const auto& [d, c] : cands) {
        if (out.size() >= cap) break;
        if (diverse(c, d, out, s.dec_b.data(), dcount)) out.push_back(c);
    }
    // Keep the degree the node had: the closest remaining candidates fill the holes the
    // heuristic left (as hnswlib's keepPrunedConnections does), so degrees do not decay
    // over many cycles.
    for (const auto& [d, c] : cands) {
        if (out.size() >= list.size() || out.size() >= cap) break;
        if (std::find(out.begin(), out.end(), c) == out.end()) out.push_back(c);
    }
    const std::size_t floor_degree = std::max<std::size_t>(1, M_ / 2);
    const int top = static_cast<int>(entry >> 32);
    if (out.size() < floor_degree && entry != no_entry && lvl <= top) {
        // Too few (its dead links led only to the dead): look for more around the node
        // itself, at its own level.
        slot_t cur = static_cast<slot_t>(entry & 0xffffffffu);
        greedy_descent(base, cur, top, lvl);
        std::vector<neighbor_t> found;
        search_level(base, cur, std::max<std::size_t>(cap, 32), lvl, true, now, s, found);
        dcount += found.size() * 4;
        for (const auto& [d, c] : found) {
            if (out.size() >= cap) break;
            if (c == node || std::find(out.begin(), out.end(), c) != out.end()) continue;
            // Below the floor take the closest; above it, only diverse ones.
            if (out.size() < floor_degree || diverse(c, d, out, s.dec_b.data(), dcount))
                out.push_back(c);
        }
    }
    return out;
}

consolidate_report_t index_t::consolidate(std::int64_t now, std::size_t threads) {
    const auto t0 = std::chrono::steady_clock::now();
    consolidate_report_t rep;
    std::lock_guard<std::mutex> one_pass(consolidate_mu_);
    // Inserts wait only while the dead set is taken (every ready slot is then fully linked)
    // and while the new lists are published; they go on while the repairs are computed.
    std::unique_lock<std::shared_mutex> no_inserts(writers_mu_);
    auto inserts_blocked_from = std::chrono::steady_clock::now();
    std::shared_lock<std::shared_mutex> shared(graph_mu_);
    const auto inserts_wait = [&] {
        rep.inserts_blocked_seconds += std::chrono::duration<double>(
            std::chrono::steady_clock::now() - inserts_blocked_from).count();
    };
    const slot_t n = n_slots();
    // From here on touch() leaves alone what is dead at `now` (it could revive an entry
    // that this pass then frees: a touch reported done, and lost).
    struct touch_guard_t {
        index_t& idx;
        touch_guard_t(index_t& i, std::int64_t t) : idx(i) {
            std::lock_guard<std::mutex> lock(idx.label_mu_);
            idx.consolidating_now_ = t;
        }
        ~touch_guard_t() {
            std::lock_guard<std::mutex> lock(idx.label_mu_);
            idx.consolidating_now_ = std::numeric_limits<std::int64_t>::min();
        }
    } touch_guard(*this, now);

    // Slots from n on are inserted after this point and are never in the dead set; a list
    // read later may name them, hence the bound. dead: 1 dead, 2 live, 0 not in use (a slot
    // an insert may take from the free list meanwhile).
    std::vector<std::uint8_t> dead(n, 0);
    std::vector<slot_t> dead_ids;
    for (slot_t id = 0; id < n; ++id) {
        if (state(id) != state_ready) continue;
        dead[id] = live(id, now) ? 2 : 1;
        if (dead[id] == 1) dead_ids.push_back(id);
    }
    const auto is_dead = [&](slot_t v) { return v < n && dead[v] == 1; };

    std::unique_lock<std::shared_mutex> exclusive(graph_mu_, std::defer_lock);
    if (!dead_ids.empty()) {
        // 1. Which (node, level) lists point at a dead node.
        std::vector<repair_t> work;
        for (slot_t u = 0; u < n; ++u) {
            if (dead[u] != 2) continue;
            for (int l = 0; l <= level(u); ++l) {
                const std::uint32_t* lk = links(u, l);
                const std::uint32_t cnt = atomic_load_u32(lk);
                for (std::uint32_t i = 0; i < cnt; ++i)
                    if (is_dead(atomic_load_u32(lk + 1 + i))) {
                        work.push_back({u, l, {}, {}});
                        break;
                    }
            }
        }
        const std::uint64_t batches_before = insert_batches_.load();
        no_inserts.unlock();
        inserts_wait();

        // 2. Compute every new list from the graph as it is.
        const std::uint64_t ep = entry_.load();
        std::atomic<std::size_t> distances{0};
        parallel_for(work.size(), threads, [&](std::size_t w) {
            repair_t& r = work[w];
            scratch_t& s = scratch_t::local(M0_, dim_padded_);
            {
                // The node's own list as one snapshot: inserts may be linking to it.
                lock_node(r.node);
                const std::uint32_t* lk = links(r.node, r.level);
                const std::uint32_t c = atomic_load_u32(lk);
                r.seen.resize(c);
                for (std::uint32_t i = 0; i < c; ++i) r.seen[i] = atomic_load_u32(lk + 1 + i);
                unlock_node(r.node);
            }
            std::size_t dcount = 0;
            r.links = relink(r.node, r.level, r.seen, dead, ep, now, s, dcount);
            distances.fetch_add(dcount, std::memory_order_relaxed);
        });
        rep.distances = distances.load();

        // 3. Publish: inserts and searches wait, for as long as it takes to write. Inserts
        // made while the lists were computed may have linked a listed node to a new node
        // (kept: it may be that node's only way in), and a new node may link to a dead one.
        shared.unlock();
        no_inserts.lock();
        inserts_blocked_from = std::chrono::steady_clock::now();
        exclusive.lock();
        const auto blocked_from = std::chrono::steady_clock::now();
        std::unique_lock<std::mutex> alloc_lock(alloc_mu_);
        // Without an insert in between, the lists are as they were computed from.
        const bool inserted = insert_batches_.load() != batches_before;
        std::vector<slot_t> merged;
        for (const repair_t& r : work) {
            if (!inserted) {
                write_links(r.node, r.level, r.links.data(), r.links.size());
                continue;
            }
            const std::uint32_t* lk = links(r.node, r.level);
            const std::uint32_t c = atomic_load_u32(lk);
            bool same = c == r.seen.size();
            for (std::uint32_t i = 0; i < c && same; ++i) same = atomic_load_u32(lk + 1 + i) == r.seen[i];
            merged.clear();
            for (std::uint32_t i = 0; i < c && !same; ++i) {
                const slot_t v = atomic_load_u32(lk + 1 + i);
                if (!is_dead(v) && std::find(r.seen.begin(), r.seen.end(), v) == r.seen.end())
                    merged.push_back(v);
            }
            if (merged.empty()) {
                write_links(r.node, r.level, r.links.data(), r.links.size());
                continue;
            }
            ++rep.merged;
            const std::size_t cap = max_links(r.level);
            for (slot_t v : r.links) {
                if (merged.size() >= cap) break;
                if (std::find(merged.begin(), merged.end(), v) == merged.end()) merged.push_back(v);
            }
            write_links(r.node, r.level, merged.data(), merged.size());
        }
        rep.repaired = work.size();
        // Lists that name a dead node and were not repaired: those of nodes inserted
        // meanwhile (a node live then gained only links to new nodes, none dead).
        const slot_t n_now = n_slots();
        for (slot_t u = 0; inserted && u < n_now; ++u) {
            if ((u < n && dead[u] != 0) || state(u) != state_ready) continue;
            for (int l = 0; l <= level(u); ++l) {
                const std::uint32_t* lk = links(u, l);
                const std::uint32_t c = atomic_load_u32(lk);
                bool any = false;
                for (std::uint32_t i = 0; i < c && !any; ++i) any = is_dead(atomic_load_u32(lk + 1 + i));
                if (!any) continue;
                // The dead links go and are replaced as in step 2: a node that linked only to
                // the dead would be left a dead end.
                std::vector<slot_t> list(c);
                for (std::uint32_t i = 0; i < c; ++i) list[i] = atomic_load_u32(lk + 1 + i);
                std::size_t dcount = 0;
                merged = relink(u, l, list, dead, entry_.load(), now,
                                scratch_t::local(M0_, dim_padded_), dcount);
                rep.distances += dcount;
                write_links(u, l, merged.data(), merged.size());
                ++rep.pruned;
            }
        }

        // 4. Free the dead slots and forget their labels.
        std::size_t tombstones = 0;
        {
            std::lock_guard<std::mutex> lk(label_mu_);
            for (slot_t id : dead_ids) {
                if (expiry(id) == deleted_mark) ++tombstones;
                auto it = label_map_.find(label(id));
                if (it != label_map_.end() && it->second == id) label_map_.erase(it);
                free_slot(id);
            }
        }
        sketch_compact();  // (no search or insert runs: graph_mu_ is held exclusively)
        // (Deletes made meanwhile stay counted.)
        std::size_t was = deleted_slots_.load(std::memory_order_relaxed);
        while (!deleted_slots_.compare_exchange_weak(was, was - std::min(was, tombstones))) {
        }
        rep.removed = dead_ids.size();

        // 5. The entry point: a live node of the highest level (inserts may have moved it).
        const std::uint64_t ep_now = entry_.load();
        if (ep_now != no_entry && is_dead(static_cast<slot_t>(ep_now & 0xffffffffu))) {
            slot_t best = no_slot;
            int best_level = -1;
            for (slot_t id = 0; id < n_now; ++id)
                if (state(id) == state_ready && level(id) > best_level) {
                    best = id;
                    best_level = level(id);
                }
            entry_.store(best == no_slot ? no_entry : pack_entry(best, best_level));
        }
        rep.blocked_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                                             blocked_from).count();
        alloc_lock.unlock();
        exclusive.unlock();  // searches go on while the repair lists are freed
    }

    // 6. Every live node reachable again from the entry point at level 0.
    if (shared.owns_lock()) shared.unlock();
    if (!exclusive.owns_lock()) exclusive.lock();
    const auto reconnect_from = std::chrono::steady_clock::now();
    std::size_t extra_distances = 0;
    rep.reconnected = reconnect_unreachable(now, extra_distances);
    rep.distances += extra_distances;
    rep.blocked_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                                         reconnect_from).count();
    exclusive.unlock();
    no_inserts.unlock();
    inserts_wait();
#if defined(__GLIBC__)
    // The repair lists were many small allocations, freed now: hand the pages back so the
    // process's memory stays flat over many cycles, not only the index's own accounting.
    if (rep.removed > 0) malloc_trim(0);
#endif
    rep.seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return rep;
}

}  // namespace hnswcache
