// check_integrity(): every invariant of index.hpp, checked from scratch.
#include <algorithm>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

#include "graph_internal.hpp"

namespace hnswcache {

namespace {
[[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error("index integrity violated: " + what);
}
}  // namespace

integrity_report_t index_t::check_integrity(std::int64_t now) const {
    std::unique_lock<std::shared_mutex> exclusive(graph_mu_);
    std::lock_guard<std::mutex> alloc_lock(alloc_mu_);
    integrity_report_t rep;
    const slot_t n = n_slots();
    const std::uint64_t ep = entry_.load();
    const int top = ep == no_entry ? -1 : static_cast<int>(ep >> 32);
    rep.max_level = top;
    std::size_t degree_sum = 0, not_deleted = 0;
    rep.min_degree0 = SIZE_MAX;

    std::vector<std::uint32_t> code;
    std::vector<float> vec(dim_padded_);
    for (slot_t id = 0; id < n; ++id) {
        const std::string where = "slot " + std::to_string(id);
        if (state(id) != state_ready) {
            ++rep.free_slots;
            if (chunk(id).upper[id & (chunk_size - 1)] != nullptr || level(id) != 0)
                fail(where + " is free but keeps upper links");
            continue;
        }
        ++rep.allocated;
        const bool is_live = live(id, now);
        if (is_live)
            ++rep.live;
        else
            ++rep.dead;
        if (expiry(id) != deleted_mark) ++not_deleted;
        // The stored vector is one add() could have stored (the loader's check, kept).
        const char* problem;
        if (dtype_ == dtype_t::int8) {
            float norm2;
            problem = i8_row_problem(i8_scale(raw(id)), i8_codes(raw(id)), norm2);
        } else {
            problem = row_problem(decoded(id, vec.data()), true);
        }
        if (problem != nullptr) fail(where + " holds a vector that " + problem);
        const int lv = level(id);
        if (lv > top) fail(where + " has level " + std::to_string(lv) + " above the top " +
                           std::to_string(top));
        if ((lv > 0) != (chunk(id).upper[id & (chunk_size - 1)] != nullptr))
            fail(where + " upper links do not match its level");
        if (lv > 0) {
            // The 8-bit copy the descent reads must be the encoding of the stored vector.
            code.assign(code_words_, 0);
            encode_upper(id, code.data());
            if (std::memcmp(code.data(), chunk(id).upper[id & (chunk_size - 1)],
                            code_words_ * sizeof(std::uint32_t)) != 0)
                fail(where + " has an 8-bit copy that does not match its vector");
        }
        for (int l = 0; l <= lv; ++l) {
            const std::uint32_t* lk = links(id, l);
            const std::uint32_t cnt = atomic_load_u32(lk);
            if (cnt > max_links(l)) fail(where + " has too many links at level " + std::to_string(l));
            for (std::uint32_t i = 0; i < cnt; ++i) {
                const slot_t v = atomic_load_u32(lk + 1 + i);
                if (v >= n) fail(where + " links to slot " + std::to_string(v) + " out of range");
                if (v == id) fail(where + " links to itself");
                if (state(v) != state_ready)
                    fail(where + " links to freed slot " + std::to_string(v));
                if (level(v) < l) fail(where + " links at level " + std::to_string(l) +
                                       " to a node of a lower level");
                for (std::uint32_t j = 0; j < i; ++j)
                    if (atomic_load_u32(lk + 1 + j) == v) fail(where + " has a duplicate link");
            }
            if (l == 0 && is_live) {
                degree_sum += cnt;
                rep.min_degree0 = std::min<std::size_t>(rep.min_degree0, cnt);
                rep.max_degree0 = std::max<std::size_t>(rep.max_degree0, cnt);
            }
        }
    }
    if (rep.live == 0) rep.min_degree0 = 0;
    rep.mean_degree0 = rep.live ? static_cast<double>(degree_sum) / rep.live : 0.0;

    if (rep.allocated > 0) {
        if (ep == no_entry) fail("nodes exist but there is no entry point");
        const slot_t e = static_cast<slot_t>(ep & 0xffffffffu);
        if (e >= n || state(e) != state_ready) fail("the entry point is not an allocated slot");
        if (level(e) != top) fail("the entry point is not at the top level");
    }

    // The free list holds exactly the free slots, once each.
    std::vector<slot_t> fl(free_slots_);
    std::sort(fl.begin(), fl.end());
    if (std::adjacent_find(fl.begin(), fl.end()) != fl.end()) fail("free list has duplicates");
    for (slot_t id : fl)
        if (id >= n || state(id) != state_free) fail("free list holds a used slot");
    if (fl.size() != rep.free_slots) fail("a free slot is missing from the free list");

    // The sketches hold every node of level >= 1 once, with the signs of its 8-bit copy
    // (pad bits 0), and nothing else, once they are kept; nothing before (I7).
    {
        std::vector<std::uint8_t> coded(n, 0);
        std::size_t held = 0, upper_nodes = 0;
        for (slot_t id = 0; id < n; ++id)
            if (state(id) == state_ready && level(id) > 0) ++upper_nodes;
        const std::size_t chunks = n_chunks_.load();
        for (std::size_t c = 0; c < chunks; ++c) {
            const chunk_t* ch = chunks_[c].load();
            const std::uint32_t cnt = ch == nullptr ? 0 : ch->sketch_n.load();
            if (cnt == 0) continue;
            if (!sketching_.load()) fail("a sketch holds codes, but none are kept");
            if (ch->sketch == nullptr || cnt > chunk_size) fail("a sketch count has no codes");
            for (std::uint32_t i = 0; i < cnt; ++i) {
                std::uint64_t* block = sketch_block(*ch, i);
                const slot_t id = static_cast<slot_t>(c << chunk_bits) | sketch_slot(*ch, i);
                const std::string where = "the sketch of slot " + std::to_string(id);
                if (id >= n || state(id) != state_ready || level(id) == 0)
                    fail(where + " is not of a node of level >= 1");
                if (coded[id]++) fail(where + " is held twice");
                const auto* code = reinterpret_cast<const std::int8_t*>(
                    chunk(id).upper[id & (chunk_size - 1)] + upper_header_words);
                for (std::size_t d = 0; d < 64 * sketch_words_; ++d) {
                    const std::uint64_t bit = (block[(d / 64) * 8 + i % 8] >> (d % 64)) & 1u;
                    if (bit != (d < dim_padded_ && code[d] > 0 ? 1u : 0u))
                        fail(where + " does not hold the signs of its 8-bit copy");
                }
                ++held;
            }
        }
        if (sketching_.load() && held != upper_nodes)
            fail("the sketches hold " + std::to_string(held) + " of " +
                 std::to_string(upper_nodes) + " nodes of level >= 1");
        if (sketch_total_.load() != held) fail("the sketches' total is off");
    }

    // Labels map one-to-one onto slots that were not deleted.
    {
        std::lock_guard<std::mutex> lk(label_mu_);
        for (const auto& [lab, id] : label_map_) {
            if (id >= n || state(id) != state_ready)
                fail("label " + std::to_string(lab) + " maps to a free slot");
            if (label(id) != lab) fail("label " + std::to_string(lab) + " maps to another's slot");
            if (expiry(id) == deleted_mark)
                fail("label " + std::to_string(lab) + " maps to a deleted slot");
        }
        if (label_map_.size() != not_deleted)
            fail("label map has " + std::to_string(label_map_.size()) + " entries for " +
                 std::to_string(not_deleted) + " undeleted slots");
    }

    const std::vector<std::uint8_t> seen = reachable_level0();
    for (slot_t id = 0; id < n; ++id)
        if (state(id) == state_ready && live(id, now) && !seen[id]) ++rep.unreachable_live;
    return rep;
}

}  // namespace hnswcache
