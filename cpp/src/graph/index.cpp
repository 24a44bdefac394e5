// Storage, insertion and search of the HNSW graph.
#include "hnswcache/index.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>

#include "graph_internal.hpp"
#include "hnswcache/thread_pool.hpp"

namespace hnswcache {

metric_t parse_metric(const std::string& name) {
    if (name == "cosine") return metric_t::cosine;
    if (name == "ip") return metric_t::ip;
    if (name == "l2") return metric_t::l2;
    throw std::invalid_argument("metric must be 'cosine', 'ip' or 'l2', got '" + name + "'");
}

dtype_t parse_dtype(const std::string& name) {
    if (name == "float32") return dtype_t::float32;
    if (name == "float16") return dtype_t::float16;
    if (name == "int8") return dtype_t::int8;
    throw std::invalid_argument("dtype must be 'float32', 'float16' or 'int8', got '" + name + "'");
}

const char* dtype_name(dtype_t d) {
    switch (d) {
        case dtype_t::float32: return "float32";
        case dtype_t::float16: return "float16";
        case dtype_t::int8: return "int8";
    }
    return "?";
}

const char* metric_name(metric_t m) {
    switch (m) {
        case metric_t::cosine: return "cosine";
        case metric_t::ip: return "ip";
        case metric_t::l2: return "l2";
    }
    return "?";
}

// ------------------------------------------------------------------------------ construction

index_t::index_t(std::size_t dim, metric_t metric, std::size_t M, std::size_t ef_construction,
                 std::size_t capacity_hint, std::uint64_t seed, dtype_t dtype, double alpha)
    : dim_(dim), M_(M), M0_(2 * M), ef_construction_(ef_construction), metric_(metric),
      dtype_(dtype), seed_(seed), alpha_(alpha), rng_(seed) {
    if (dim == 0 || dim > 65536) throw std::invalid_argument("dim must be in [1, 65536]");
    if (M < 2 || M > 2048) throw std::invalid_argument("M must be in [2, 2048]");
    if (!(alpha >= min_alpha && alpha <= max_alpha))  // (also refuses NaN)
        throw std::invalid_argument("alpha must be in [1, 2]");
    // The same factor for every metric: the cosine distance 1 - cos is |a - b|^2 / 2 on unit
    // vectors, a squared distance like l2's, so one alpha builds one graph either way
    // (squaring it for l2 built the graph cosine builds with alpha^2).
    prune_scale_ = static_cast<float>(alpha);
    if (ef_construction == 0 || ef_construction > max_ef)
        throw std::invalid_argument("ef_construction must be in [1, " + std::to_string(max_ef) + "]");
    dim_padded_ = round_up(dim, simd_floats);
    level_mult_ = 1.0 / std::log(static_cast<double>(M));
    // The expiry sits in the 8 bytes just before the vector: the admission check of a node
    // then reads a line its distance computation has just pulled in.
    vec_offset_ = round_up(sizeof(std::uint32_t) * (1 + M0_) + sizeof(std::int64_t), 16);
    vec_bytes_ = dtype == dtype_t::int8 ? i8_row_header + dim_padded_ : sizeof(half_t) * dim_padded_;
    stride_ = round_up(vec_offset_ + vec_bytes_, 16);
    code_words_ = upper_header_words + dim_padded_ / 4;
    sketch_words_ = (dim_padded_ + 63) / 64;
    kernels_ = &default_kernels();
    // The hint is checked, not acted on: chunks are allocated as slots are used (one every
    // 4096 inserts, under the allocation lock). Allocating them for the hint up front
    // zero-filled 77 KB of side arrays per chunk, 5.8 GB for a hint of 10^9, and bought no
    // measurable speed for a build of 100k rows.
    if (capacity_hint > max_slots)
        throw std::invalid_argument("capacity must be at most 2**28, the most slots an index holds");
    chunks_ = static_cast<std::atomic<chunk_t*>*>(
        zeroed_pages(max_chunks * sizeof(std::atomic<chunk_t*>)));
}

index_t::~index_t() {
    const std::size_t n = n_chunks_.load();
    for (std::size_t c = 0; c < n; ++c) free_chunk(chunks_[c].load());
    free_zeroed_pages(chunks_, max_chunks * sizeof(std::atomic<chunk_t*>));
}

void index_t::free_chunk(chunk_t* ch) {
    for (std::size_t i = 0; i < chunk_size; ++i) std::free(ch->upper[i]);
    std::free(ch->slab);
    std::free(ch->low);
    free_zeroed_pages(ch->sketch, ch->sketch_bytes);
    free_zeroed_pages(ch, sizeof(chunk_t));
}

void index_t::set_ef_search(std::size_t ef) {
    if (ef == 0 || ef > max_ef)
        throw std::invalid_argument("ef_search must be in [1, " + std::to_string(max_ef) + "]");
    ef_search_.store(ef);
}

void index_t::set_search_starts(std::size_t n) {
    if (n < 1 || n > max_search_starts)
        throw std::invalid_argument("search_starts must be in [1, " +
                                    std::to_string(max_search_starts) + "]");
    search_starts_.store(n);
}

void index_t::set_rescue_beam(std::size_t width) {
    if (width > max_rescue_beam)
        throw std::invalid_argument("rescue_beam must be in [0, " +
                                    std::to_string(max_rescue_beam) + "]");
    rescue_beam_.store(width);
    maybe_start_sketching();
}

void index_t::maybe_start_sketching() {
    // Only once the scan could be used (sketch_scan_pays: at least `width` upper nodes, ~M
    // times as many rows): a cache keeps an index per scope, most of a few entries, and
    // their sketches would cost a page each for nothing.
    const std::size_t width = rescue_beam_.load(std::memory_order_relaxed);
    if (metric_ != metric_t::cosine || kernels_->isa == isa_t::scalar || width == 0 ||
        sketching_.load() || n_slots() < M_ * width)
        return;
    // The codes of the upper nodes there are, built with no insert or search running.
    std::unique_lock<std::shared_mutex> exclusive(graph_mu_);
    if (sketching_.load()) return;
    const slot_t n = n_slots();
    try {
        for (slot_t id = 0; id < n; ++id)
            if (state(id) == state_ready && level(id) > 0) {
                sketch_map(id);
                sketch_add(id);
            }
    } catch (...) {  // (out of memory: no sketch at all, as before)
        const std::size_t chunks = n_chunks_.load();
        for (std::size_t c = 0; c < chunks; ++c)
            if (chunk_t* ch = chunks_[c].load()) ch->sketch_n.store(0);
        sketch_total_.store(0);
        throw;
    }
    sketching_.store(true, std::memory_order_release);
}

void index_t::set_rescue_distance(float d) {
    if (std::isnan(d)) throw std::invalid_argument("rescue_distance must not be NaN");
    rescue_distance_.store(d);
}

void index_t::set_auto_consolidate(double fraction) {
    if (!(fraction >= 0.0 && fraction <= 1.0))
        throw std::invalid_argument("auto_consolidate must be in [0, 1] (0 = off)");
    auto_consolidate_.store(fraction);
}

// ------------------------------------------------------------------------------ slot access

void index_t::lock_node(slot_t id) const {
    auto& l = chunk(id).lock[id & (chunk_size - 1)];
    while (l.exchange(1, std::memory_order_acquire) != 0)
        while (l.load(std::memory_order_relaxed) != 0) std::this_thread::yield();
}
void index_t::unlock_node(slot_t id) const {
    chunk(id).lock[id & (chunk_size - 1)].store(0, std::memory_order_release);
}

void index_t::ensure_chunk(std::size_t c) {
    // Called with alloc_mu_ held (or from the constructor): chunks are appended in order.
    while (n_chunks_.load(std::memory_order_relaxed) <= c) {
        const std::size_t next = n_chunks_.load(std::memory_order_relaxed);
        if (next >= max_chunks) throw std::length_error("index is full (2^28 slots)");
        auto* ch = static_cast<chunk_t*>(zeroed_pages(sizeof(chunk_t)));
        try {
            ch->slab = static_cast<char*>(slab_malloc(chunk_size * stride_, next > 0));
            if (dtype_ == dtype_t::float32)
                ch->low = static_cast<half_t*>(
                    aligned_malloc(chunk_size * dim_padded_ * sizeof(half_t)));
        } catch (...) {
            free_chunk(ch);
            throw;
        }
        chunks_[next].store(ch, std::memory_order_release);
        n_chunks_.store(next + 1, std::memory_order_release);
    }
}

// ------------------------------------------------------------------------------ distances

float index_t::dist(const float* q, slot_t id) const {
    float d;
    if (dtype_ == dtype_t::int8) {
        const char* row = raw(id);
        const std::int8_t* code = i8_codes(row);
        kernels_->dot_batch_i8(q, &code, 1, dim_padded_, &d);
        return from_i8_dot(d, i8_scale(row), i8_norm2(row), query_norm2(q));
    }
    const half_t* x = reinterpret_cast<const half_t*>(raw(id));
    const bool bf = dtype_ == dtype_t::float32;
    if (metric_ == metric_t::l2) {
        (bf ? kernels_->l2sq_batch_b : kernels_->l2sq_batch_h)(q, &x, 1, dim_padded_, &d);
        return d;
    }
    (bf ? kernels_->dot_batch_b : kernels_->dot_batch_h)(q, &x, 1, dim_padded_, &d);
    return 1.0f - d;
}

void index_t::dist_batch(const float* q, const slot_t* ids, std::size_t n, scratch_t& s,
                         float* out) const {
    // One indirect call for a whole neighbour list.
    if (dtype_ == dtype_t::int8) {
        const std::int8_t** codes = s.cptrs.data();
        for (std::size_t i = 0; i < n; ++i) codes[i] = i8_codes(raw(ids[i]));
        kernels_->dot_batch_i8(q, codes, n, dim_padded_, out);
        const float qnorm2 = query_norm2(q);
        for (std::size_t i = 0; i < n; ++i) {
            const char* row = reinterpret_cast<const char*>(codes[i]) - i8_row_header;
            out[i] = from_i8_dot(out[i], i8_scale(row), i8_norm2(row), qnorm2);
        }
        return;
    }
    for (std::size_t i = 0; i < n; ++i) s.hptrs[i] = reinterpret_cast<const half_t*>(raw(ids[i]));
    const bool bf = dtype_ == dtype_t::float32;
    if (metric_ == metric_t::l2)
        return (bf ? kernels_->l2sq_batch_b : kernels_->l2sq_batch_h)(q, s.hptrs.data(), n,
                                                                      dim_padded_, out);
    (bf ? kernels_->dot_batch_b : kernels_->dot_batch_h)(q, s.hptrs.data(), n, dim_padded_, out);
    for (std::size_t i = 0; i < n; ++i) out[i] = 1.0f - out[i];
}

float index_t::exact_dist(const float* q, slot_t id) const {
    if (dtype_ != dtype_t::float32) return dist(q, id);
    const float* x = decoded(id, scratch_t::local(M0_, dim_padded_).dec_c.data());
    if (metric_ == metric_t::l2) return kernels_->l2sq(q, x, dim_padded_);
    return 1.0f - kernels_->dot(q, x, dim_padded_);
}

void index_t::rerank(const float* q, std::vector<neighbor_t>& found, std::size_t k) const {
    if (dtype_ != dtype_t::float32) return;
    if (metric_ == metric_t::cosine && found.size() > k) {
        // found is sorted by walk distance. A bfloat16 value is its float32 cut to 8
        // significant bits, off by less than 2^-7 of it, so for unit vectors the walk's
        // distance is within eps = 2^-7 * sum|q_i x_i| <= 2^-7 of the exact one. A candidate
        // more than 2 eps behind the k-th cannot enter the exact top k: skip it.
        constexpr float eps = 1.01f / 128.0f;
        const float bound = found[k - 1].first + 2.0f * eps;
        std::size_t keep = k;
        while (keep < found.size() && found[keep].first <= bound) ++keep;
        found.resize(keep);
    }
    // The low halves are cold: ask for all of them before joining any.
    const std::size_t bytes = dim_padded_ * sizeof(half_t);
    for (const auto& nb : found) {
        const char* p = reinterpret_cast<const char*>(low_halves(nb.second));
        for (std::size_t off = 0; off < bytes; off += 64) prefetch(p + off);
    }
    for (auto& nb : found) nb.first = exact_dist(q, nb.second);
    std::sort(found.begin(), found.end());
}

void index_t::approx_batch(const float* q, float qnorm2, const slot_t* ids, std::size_t n,
                           scratch_t& s, float* out) const {
    // The blocks are few (1 node in M) and small, so they mostly stay in cache; ask for all
    // of them before computing.
    const std::size_t code_lines = (upper_header_words * 4 + dim_padded_ + 63) / 64;
    for (std::size_t i = 0; i < n; ++i) {
        const std::uint32_t* b = chunk(ids[i]).upper[ids[i] & (chunk_size - 1)];
        s.blocks[i] = b;
        for (std::size_t l = 0; l < code_lines; ++l) prefetch(reinterpret_cast<const char*>(b) + 64 * l);
    }
    const std::int8_t** codes = s.cptrs.data();
    for (std::size_t i = 0; i < n; ++i)
        codes[i] = reinterpret_cast<const std::int8_t*>(s.blocks[i] + upper_header_words);
    kernels_->dot_batch_i8(q, codes, n, dim_padded_, out);
    for (std::size_t i = 0; i < n; ++i) {
        float scale, norm2;
        std::memcpy(&scale, s.blocks[i], sizeof(float));
        std::memcpy(&norm2, s.blocks[i] + 1, sizeof(float));
        out[i] = from_i8_dot(out[i], scale, norm2, qnorm2);
    }
}

void index_t::encode_upper(slot_t id, std::uint32_t* block) const {
    const float* x = decoded(id, scratch_t::local(M0_, dim_padded_).dec_a.data());
    float scale;
    const float norm2 = quantize_i8(x, dim_padded_, reinterpret_cast<std::int8_t*>(block + upper_header_words), scale);
    std::memcpy(block, &scale, sizeof(float));
    std::memcpy(block + 1, &norm2, sizeof(float));
}

void index_t::alloc_upper(slot_t id, int lvl) {
    // Before the node is published: a sketch that cannot be mapped fails the insert here,
    // not after the node is searchable (sketch_add cannot fail).
    if (sketching_.load(std::memory_order_acquire)) sketch_map(id);
    const std::size_t words = code_words_ + static_cast<std::size_t>(lvl) * (1 + M_);
    auto* block = static_cast<std::uint32_t*>(std::calloc(words, sizeof(std::uint32_t)));
    if (block == nullptr) throw std::bad_alloc();
    encode_upper(id, block);
    chunk(id).upper[id & (chunk_size - 1)] = block;
}

std::uint64_t* index_t::sketch_block(const chunk_t& ch, std::uint32_t i) const {
    return ch.sketch + (i / 8) * sketch_words_ * 8;
}
std::uint16_t& index_t::sketch_slot(const chunk_t& ch, std::uint32_t i) const {
    // The slots follow the codes of the whole chunk: the scan reads them as one array (kept
    // in each block of codes, they made a random vector's rescue ~25 % slower).
    return reinterpret_cast<std::uint16_t*>(ch.sketch + chunk_size * sketch_words_)[i];
}

void index_t::sketch_map(slot_t id) {
    chunk_t& ch = chunk(id);
    std::lock_guard<std::mutex> lock(sketch_mu_);
    if (ch.sketch != nullptr) return;
    const std::size_t bytes = chunk_size * sketch_words_ * sizeof(std::uint64_t) +
                              chunk_size * sizeof(std::uint16_t);
    ch.sketch = static_cast<std::uint64_t*>(zeroed_pages(bytes));
    ch.sketch_bytes = bytes;
}

void index_t::sketch_add(slot_t id) {
    chunk_t& ch = chunk(id);
    const std::size_t off = id & (chunk_size - 1);
    const auto* code = reinterpret_cast<const std::int8_t*>(ch.upper[off] + upper_header_words);
    std::lock_guard<std::mutex> lock(sketch_mu_);
    // (Mapped by sketch_map before the node was published. A chunk holds each of its slots
    // once at most, so n < chunk_size: check_integrity would report otherwise.)
    const std::uint32_t n = ch.sketch_n.load(std::memory_order_relaxed);
    if (ch.sketch == nullptr || n >= chunk_size) return;
    // The sign of the 8-bit copy is the sign of the vector (symmetric quantisation); a value
    // that rounds to 0 counts as negative, as padding does, on both sides.
    std::uint64_t* block = sketch_block(ch, n);
    for (std::size_t w = 0; w < sketch_words_; ++w) {
        std::uint64_t bits = 0;
        const std::size_t end = std::min<std::size_t>(64, dim_padded_ - 64 * w);
        for (std::size_t b = 0; b < end; ++b)
            bits |= static_cast<std::uint64_t>(code[64 * w + b] > 0) << b;
        block[w * 8 + n % 8] = bits;
    }
    sketch_slot(ch, n) = static_cast<std::uint16_t>(off);
    ch.sketch_n.store(n + 1, std::memory_order_release);
    sketch_total_.fetch_add(1, std::memory_order_relaxed);
}

void index_t::sketch_compact() {
    if (!sketching_.load()) return;
    const std::size_t chunks = n_chunks_.load();
    std::size_t total = 0;
    for (std::size_t c = 0; c < chunks; ++c) {
        chunk_t* ch = chunks_[c].load();
        if (ch == nullptr || ch->sketch == nullptr) continue;
        const std::uint32_t n = ch->sketch_n.load();
        std::uint32_t kept = 0;
        for (std::uint32_t i = 0; i < n; ++i) {
            std::uint64_t* from = sketch_block(*ch, i);
            const std::uint16_t off = sketch_slot(*ch, i);
            const slot_t id = static_cast<slot_t>(c << chunk_bits) | off;
            if (state(id) != state_ready || level(id) == 0) continue;
            if (kept != i) {
                std::uint64_t* to = sketch_block(*ch, kept);
                for (std::size_t w = 0; w < sketch_words_; ++w) to[w * 8 + kept % 8] = from[w * 8 + i % 8];
                sketch_slot(*ch, kept) = off;
            }
            ++kept;
        }
        ch->sketch_n.store(kept, std::memory_order_release);
        total += kept;
    }
    sketch_total_.store(total);
}

bool index_t::sketch_scan_pays(std::size_t width) const {
    // The scan reads every code, the beam ~width * M 8-bit copies: at 100k sgd rows (6.2k
    // codes) the rescue's cost over a plain search fell from ~92 to ~33 µs at p50
    // (bench/rescue.py). By unit costs from an uncommitted session microbenchmark (~1.1 ns
    // a code with AVX-512's table kernel at 384 dims, ~0.6 with VPOPCNTQ, ~30 ns an 8-bit
    // copy) the beam is cheaper past ~25 * M * width codes (~50 with VPOPCNTQ); the cut at
    // 32 keeps the reach the cache's rescue had at width 128 with the cut at 16 (~520k rows
    // at M 16, width 64). A narrower scan also ranks better than a beam that wide
    // (bench/rescue.py, 100k sgd rows: of 14 paraphrases the plain walk lost, a 16-wide
    // beam still lost 13, the 16 nearest by sign bits 1).
    // (No codes are kept with the portable kernel: maybe_start_sketching.)
    const std::size_t codes = sketch_total_.load(std::memory_order_relaxed);
    return sketching_.load(std::memory_order_relaxed) && codes >= width &&
           codes <= 32 * M_ * width;
}

void index_t::sketch_starts(const float* q, float qnorm2, std::size_t width, std::size_t keep,
                            scratch_t& s, std::vector<neighbor_t>& out) const {
    const std::size_t words = sketch_words_;
    s.qbits.assign(words, 0);
    // (branch-free: each sign is a coin toss, which a branch would mispredict half the time)
    for (std::size_t i = 0; i < dim_padded_; ++i)
        s.qbits[i / 64] |= static_cast<std::uint64_t>(q[i] > 0) << (i % 64);
    const std::size_t chunks = n_chunks_.load(std::memory_order_acquire);
    auto& spans = s.ham_spans;  // (chunk, its first distance, its codes)
    spans.clear();
    std::size_t m = 0;
    for (std::size_t c = 0; c < chunks; ++c) {
        const chunk_t* ch = chunks_[c].load(std::memory_order_acquire);
        if (ch == nullptr) continue;
        const std::uint32_t n = ch->sketch_n.load(std::memory_order_acquire);
        if (n == 0) continue;
        if (s.ham.size() < m + n) s.ham.resize(m + n + 1024);
        kernels_->hamming8(s.qbits.data(), ch->sketch, n, words, s.ham.data() + m);
        spans.push_back({ch, static_cast<slot_t>(c << chunk_bits), m, n});
        m += n;
    }
    // The `width` nearest by Hamming distance, ties to the earlier in scan order. A bar that
    // ~2 * width codes beat, from a histogram of every 8th distance, lets the SIMD filter
    // keep those few and the nearest be ranked among them alone. (It replaced a histogram
    // of every distance and a scalar pass to select by its cut: ~2.8 + ~4.8 µs at 6.2k
    // codes.) When fewer than `width` beat it, the bar is the exact cut of a full histogram.
    const std::uint32_t* ham = s.ham.data();
    const std::size_t bins = 64 * words + 1;
    auto& hist = s.ham_hist;
    auto cut_of = [&](std::size_t stride, std::size_t want) {  // count(d < bar) >= want
        hist.assign(bins, 0);
        for (std::size_t i = 0; i < m; i += stride) ++hist[ham[i]];
        std::size_t bar = 0, below = 0;
        while (bar < bins && below < want) below += hist[bar++];
        return static_cast<std::uint32_t>(bar);
    };
    const std::size_t want = std::min(width, m);
    auto& kept = s.ham_kept;  // positions
    if (kept.size() < m) kept.resize(m);
    std::size_t n_kept = 0;
    if (m >= 16 * width) {
        const std::uint32_t bar = cut_of(8, (2 * width + 7) / 8);
        n_kept = kernels_->below(ham, m, bar, kept.data());
    }
    if (n_kept < want) n_kept = kernels_->below(ham, m, cut_of(1, want), kept.data());
    auto& pool = s.ham_pool;  // (distance << 32 | position, slot), positions ascending
    pool.clear();
    auto sp = s.ham_spans.begin();
    for (std::size_t j = 0; j < n_kept; ++j) {
        const std::uint32_t p = kept[j];
        while (p >= sp->first + sp->count) ++sp;
        const slot_t slot = sp->base | sketch_slot(*sp->chunk, static_cast<std::uint32_t>(p - sp->first));
        pool.push_back({(static_cast<std::uint64_t>(ham[p]) << 32) | p, slot});
    }
    if (pool.size() > want) {
        std::nth_element(pool.begin(), pool.begin() + static_cast<std::ptrdiff_t>(want - 1), pool.end());
        pool.resize(want);
    }
    auto& ids = s.selected;
    ids.resize(pool.size());
    for (std::size_t j = 0; j < pool.size(); ++j) ids[j] = pool[j].slot;
    // Ranked again on their 8-bit copies, as the beam ranks what it meets; only the `keep`
    // best are wanted (the walk's starts).
    if (s.batch.size() < ids.size()) s.grow(ids.size());
    approx_batch(q, qnorm2, ids.data(), ids.size(), s, s.dists.data());
    out.clear();
    for (std::size_t j = 0; j < ids.size(); ++j) out.emplace_back(s.dists[j], ids[j]);
    keep = std::min(keep, out.size());
    std::partial_sort(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(keep), out.end());
    out.resize(keep);
}

void index_t::store_vector(slot_t id, const float* v) {
    if (dtype_ == dtype_t::int8) {
        char* row = record(id) + vec_offset_;
        float scale;
        const float norm2 = quantize_i8(v, dim_padded_, reinterpret_cast<std::int8_t*>(row + i8_row_header), scale);
        std::memcpy(row, &scale, sizeof scale);
        std::memcpy(row + sizeof scale, &norm2, sizeof norm2);
        return;
    }
    auto* high = reinterpret_cast<half_t*>(record(id) + vec_offset_);
    if (dtype_ == dtype_t::float16) return kernels_->encode_h(v, high, dim_padded_);
    half_t* low = const_cast<half_t*>(low_halves(id));
    for (std::size_t i = 0; i < dim_padded_; ++i) split_halves(v[i], high[i], low[i]);
}

namespace {
// Under ip and l2 rows are stored as given: |q - x|^2 <= 4 max(|q|^2, |x|^2) must stay a finite
// float, or distances turn into inf - inf = NaN (and NaN keys break the heaps' order).
constexpr double max_norm2 = static_cast<double>(std::numeric_limits<float>::max()) / 4;
const char* const overflow_problem =
    "has a squared norm above 8.5e37: its distances would overflow float32";
// How far from 1 a stored cosine row's squared norm may be. A float32 row is rounded once
// from its normalisation in double: at most ~1.2e-7 off (~4e-7 for the first release, which
// normalised with a float 1/|x|); measured at most 8.5e-8 (114k all-MiniLM-L6-v2 rows and
// Gaussian rows of 7, 384 and 4096 dimensions). A float16 row has 11 significant bits: at
// most ~1e-3 off, measured 1.7e-4 on the real rows, 7.6e-4 in 7 dimensions. The tolerances
// leave margins of 25x and 4x over those bounds. (int8: see i8_row_problem.)
constexpr double unit_tolerance_f32 = 1e-5, unit_tolerance_f16 = 4e-3;
}  // namespace

const char* index_t::row_problem(const float* row, bool stored) const {
    double norm = 0;  // as prepare() computes it
    for (std::size_t i = 0; i < dim_; ++i) {
        if (!std::isfinite(row[i])) return "contains NaN or infinity";
        norm += static_cast<double>(row[i]) * row[i];
    }
    if (metric_ != metric_t::cosine) return norm > max_norm2 ? overflow_problem : nullptr;
    if (norm == 0.0) return "is a zero vector, which has no cosine direction";
    const double tolerance = dtype_ == dtype_t::float16 ? unit_tolerance_f16 : unit_tolerance_f32;
    if (stored && std::fabs(norm - 1.0) > tolerance)
        return "is not a unit vector (cosine rows are normalised on insert)";
    return nullptr;
}

const char* index_t::i8_row_problem(float scale, const std::int8_t* code, float& norm2) const {
    if (!std::isfinite(scale) || scale < 0) return "has an invalid scale";
    for (std::size_t i = 0; i < dim_; ++i)
        if (code[i] == -128) return "has an invalid 8-bit code";  // (never written)
    norm2 = i8_norm2_of(scale, code, dim_);
    if (!std::isfinite(norm2)) return "is not finite";
    if (metric_ != metric_t::cosine)
        return static_cast<double>(norm2) > max_norm2 ? overflow_problem : nullptr;
    // The codes of a unit vector x, quantised with scale = max|x_i| / 127: each x_i is within
    // half a step of scale * code_i and none is beyond 127 steps, so |x|^2 = 1 lies between
    // the least and the greatest squared norm these intervals allow. A fixed tolerance on
    // norm2 would not do: it is off 1 by up to 4e-3 on the real rows above, 7e-3 in 7
    // dimensions, and far more for valid rows built to round badly (codes 127, 1, 1, ... of a
    // row whose small values sit just above half a step: norm2 ~2.5 in 65536 dimensions).
    // On those real rows the bounds were at most 0.9964 and at least 1.0009.
    double lo = 0, hi = 0;
    int largest = 0;
    for (std::size_t i = 0; i < dim_; ++i) {
        const int c = std::abs(static_cast<int>(code[i]));
        const double a = c;
        largest = std::max(largest, c);
        lo += std::max(a - 0.5, 0.0) * std::max(a - 0.5, 0.0);
        hi += std::min(a + 0.5, 127.0) * std::min(a + 0.5, 127.0);
    }
    if (largest == 0 || scale == 0) return "is a zero vector, which has no cosine direction";
    // The scale is max|x_i| / 127, so the largest code is 127 in every row quantize_i8
    // writes. Small codes under a large scale passed the bounds below (codes 1, 1, 1, 1 at
    // scale 1: squared norm 4, a cosine distance of -1 that outranked exact matches; found by
    // fuzzing the loader).
    if (largest != 127)
        return "is not the 8-bit code of a unit vector (its largest code is not 127)";
    const double s2 = static_cast<double>(scale) * scale;
    lo *= s2;
    hi *= s2;
    constexpr double slack = 1e-3;  // float rounding of the normalisation and the quantisation
    if (!(lo <= 1.0 + slack && hi >= 1.0 - slack))
        return "is not the 8-bit code of a unit vector (cosine rows are normalised on insert)";
    return nullptr;
}

void index_t::check_row(const float* row, std::size_t r, const char* what) const {
    if (const char* problem = row_problem(row, false))
        throw std::invalid_argument(what + (" " + std::to_string(r)) + " " + problem);
}

float index_t::query_norm2(const float* q) const {
    return metric_ == metric_t::l2 ? kernels_->dot(q, q, dim_padded_) : 0.0f;
}

void index_t::prepare(const float* row, float* out) const {
    std::memcpy(out, row, dim_ * sizeof(float));
    std::fill(out + dim_, out + dim_padded_, 0.0f);
    if (metric_ == metric_t::cosine) {
        double norm = 0;
        for (std::size_t i = 0; i < dim_; ++i) norm += static_cast<double>(out[i]) * out[i];
        // In double: 1 / |x| overflows float for |x| < ~1e-38 (a tiny but valid row).
        const double inv = 1.0 / std::sqrt(norm);
        for (std::size_t i = 0; i < dim_; ++i)
            out[i] = static_cast<float>(static_cast<double>(out[i]) * inv);
    }
}

// ------------------------------------------------------------------------------ labels

void index_t::publish_label(std::int64_t lab, slot_t id) {
    std::lock_guard<std::mutex> lock(label_mu_);
    expiry_floor_ = std::min(expiry_floor_, expiry(id));
    auto [it, inserted] = label_map_.emplace(lab, id);
    if (!inserted) {
        // Upsert: the older slot becomes a tombstone that consolidation removes.
        set_expiry(it->second, deleted_mark);
        deleted_slots_.fetch_add(1, std::memory_order_relaxed);
        it->second = id;
    }
}

slot_t index_t::find_label(std::int64_t lab) const {
    std::lock_guard<std::mutex> lock(label_mu_);
    auto it = label_map_.find(lab);
    return it == label_map_.end() ? no_slot : it->second;
}

std::int64_t index_t::reserve_labels(std::size_t n) {
    std::int64_t cur = next_label_.load();
    do {
        if (cur > max_label + 1 || n > static_cast<std::uint64_t>(max_label + 1 - cur))
            throw std::overflow_error("the automatic label counter is exhausted");
    } while (!next_label_.compare_exchange_weak(cur, cur + static_cast<std::int64_t>(n)));
    return cur;
}

// ------------------------------------------------------------------------------ insertion

slot_t index_t::allocate_slot(int& level_out) {
    std::lock_guard<std::mutex> lock(alloc_mu_);
    std::uniform_real_distribution<double> uniform(0.0, 1.0);
    const double u = 1.0 - uniform(rng_);  // in (0, 1]
    level_out = std::min(static_cast<int>(-std::log(u) * level_mult_), max_levels - 1);
    if (!free_slots_.empty()) {
        std::pop_heap(free_slots_.begin(), free_slots_.end(), std::greater<slot_t>());
        const slot_t id = free_slots_.back();
        free_slots_.pop_back();
        return id;
    }
    const slot_t id = n_slots_.load(std::memory_order_relaxed);
    if (id == no_slot) throw std::length_error("index is full");
    ensure_chunk(id >> chunk_bits);
    n_slots_.store(id + 1, std::memory_order_release);
    return id;
}

void index_t::write_links(slot_t id, int lvl, const slot_t* ids, std::size_t count) {
    std::uint32_t* l = links(id, lvl);
    for (std::size_t i = 0; i < count; ++i) atomic_store_u32(l + 1 + i, ids[i]);
    atomic_store_u32(l, static_cast<std::uint32_t>(count));
}

void index_t::greedy_descent(const float* q, slot_t& cur, int from_level, int to_level) const {
    if (from_level <= to_level) return;
    // One batched distance call per hop: the kernel overlaps the neighbours' memory loads.
    scratch_t& s = scratch_t::local(M0_);
    slot_t ids[2048];
    float dists[2048];
    const float qnorm2 = query_norm2(q);
    float dcur;
    approx_batch(q, qnorm2, &cur, 1, s, &dcur);
    for (int lvl = from_level; lvl > to_level; --lvl) {
        bool improved = true;
        while (improved) {
            improved = false;
            const std::uint32_t* l = links(cur, lvl);
            const std::uint32_t n = std::min<std::uint32_t>(atomic_load_u32(l), 2048);
            for (std::uint32_t i = 0; i < n; ++i) ids[i] = atomic_load_u32(l + 1 + i);
            approx_batch(q, qnorm2, ids, n, s, dists);
            for (std::uint32_t i = 0; i < n; ++i) {
                if (dists[i] < dcur) {
                    dcur = dists[i];
                    cur = ids[i];
                    improved = true;
                }
            }
        }
    }
}

void index_t::search_level(const float* q, slot_t start, std::size_t ef, int lvl, bool live_only,
                           std::int64_t now, scratch_t& s, std::vector<neighbor_t>& out,
                           const std::vector<std::uint8_t>* mask) const {
    search_level(q, &start, 1, ef, lvl, live_only, now, s, out, mask);
}

void index_t::upper_beam(const float* q, float qnorm2, slot_t start, std::size_t ef, int lvl,
                         scratch_t& s, std::vector<neighbor_t>& out) const {
    auto& visited = s.upper_visited;
    visited.reset(n_slots());
    auto& cand = s.candidates;
    auto& res = s.results;
    cand.clear();
    res.clear();
    float d0;
    approx_batch(q, qnorm2, &start, 1, s, &d0);
    visited.mark(start);
    cand.emplace_back(d0, start);
    res.emplace_back(d0, start);
    slot_t ids[2048];
    float dists[2048];
    while (!cand.empty()) {
        std::pop_heap(cand.begin(), cand.end(), std::greater<neighbor_t>());
        const neighbor_t c = cand.back();
        cand.pop_back();
        if (res.size() >= ef && c.first > res.front().first) break;
        const std::uint32_t* l = links(c.second, lvl);
        const std::uint32_t n = std::min<std::uint32_t>(atomic_load_u32(l), 2048);
        std::uint32_t m = 0;
        for (std::uint32_t i = 0; i < n; ++i) {
            const slot_t v = atomic_load_u32(l + 1 + i);
            if (!visited.test_and_mark(v)) ids[m++] = v;
        }
        approx_batch(q, qnorm2, ids, m, s, dists);
        for (std::uint32_t i = 0; i < m; ++i) {
            if (res.size() < ef || dists[i] < res.front().first) {
                cand.emplace_back(dists[i], ids[i]);
                std::push_heap(cand.begin(), cand.end(), std::greater<neighbor_t>());
                res.emplace_back(dists[i], ids[i]);
                std::push_heap(res.begin(), res.end());
                if (res.size() > ef) {
                    std::pop_heap(res.begin(), res.end());
                    res.pop_back();
                }
            }
        }
    }
    out.assign(res.begin(), res.end());
    std::sort(out.begin(), out.end());
}

bool index_t::search_level(const float* q, const slot_t* starts, std::size_t n_starts,
                           std::size_t ef, int lvl, bool live_only, std::int64_t now,
                           scratch_t& s, std::vector<neighbor_t>& out,
                           const std::vector<std::uint8_t>* mask,
                           std::size_t sparse_budget,
                           const std::vector<neighbor_t>* resume, narrow_t* narrow) const {
    auto admit = [&](slot_t v) {
        return !live_only ||
               (live(v, now) && (mask == nullptr || (v < mask->size() && (*mask)[v])));
    };
    auto& cand = s.candidates;  // min-heap by distance (std heap with greater)
    auto& res = s.results;      // max-heap by distance
    cand.clear();
    res.clear();
    // resume: the answer of a walk just made (same query, same now, same admission), whose
    // visited marks are kept: this walk starts elsewhere but only expands what beats that
    // answer, and never computes a node of it again.
    if (resume == nullptr) {
        s.visited.reset(n_slots());
    } else {
        res.assign(resume->begin(), resume->end());
    }
    std::size_t fresh = 0;
    for (std::size_t i = 0; i < n_starts; ++i)
        if (!s.visited.test_and_mark(starts[i])) s.batch[fresh++] = starts[i];
    dist_batch(q, s.batch.data(), fresh, s, s.dists.data());
    for (std::size_t i = 0; i < fresh; ++i) {
        const slot_t v = s.batch[i];
        cand.emplace_back(s.dists[i], v);
        if (admit(v)) res.emplace_back(s.dists[i], v);
    }
    std::make_heap(cand.begin(), cand.end(), std::greater<neighbor_t>());
    std::make_heap(res.begin(), res.end());
    while (res.size() > ef) {
        std::pop_heap(res.begin(), res.end());
        res.pop_back();
    }
    float worst = res.empty() ? std::numeric_limits<float>::infinity() : res.front().first;

    const slot_t* batch = s.batch.data();
    std::size_t sparse_expansions = 0, expansions = 0;
    bool gave_up = false;
    while (!cand.empty()) {
        std::pop_heap(cand.begin(), cand.end(), std::greater<neighbor_t>());
        const neighbor_t c = cand.back();
        cand.pop_back();
        if (res.size() >= ef && c.first > worst) break;
        if (sparse_budget > 0 && res.size() < ef && ++sparse_expansions > sparse_budget) {
            gave_up = true;
            break;
        }
        if (!cand.empty()) prefetch(links(cand.front().second, lvl));  // the next expansion
        if (narrow != nullptr && ++expansions == narrow->after && narrow->ef < ef &&
            res.size() >= ef) {
            float nearest = std::numeric_limits<float>::infinity();
            for (const auto& r : res) nearest = std::min(nearest, r.first);
            if (nearest > narrow->distance) {
                ef = narrow->ef;
                while (res.size() > ef) {
                    std::pop_heap(res.begin(), res.end());
                    res.pop_back();
                }
                worst = res.front().first;
                narrow->narrowed = true;
            }
        }

        const std::uint32_t* l = links(c.second, lvl);
        const std::uint32_t n = atomic_load_u32(l);
        std::size_t m = 0;
        for (std::uint32_t i = 0; i < n; ++i) {
            const slot_t v = atomic_load_u32(l + 1 + i);
            if (s.visited.test_and_mark(v)) continue;
            s.batch[m++] = v;
        }
        if (m == 0) continue;
        // Ask for every line of every neighbour's expiry and 16-bit vector before computing
        // any: the loads overlap instead of waiting stream after stream (measured: 25-40%
        // faster per query than prefetching the first line only).
        const std::size_t bytes = vec_bytes_ + sizeof(std::int64_t);
        for (std::size_t i = 0; i < m; ++i) {
            const char* p = raw(batch[i]) - sizeof(std::int64_t);
            for (std::size_t off = 0; off < bytes; off += 64) prefetch(p + off);
        }
        dist_batch(q, s.batch.data(), m, s, s.dists.data());
        for (std::size_t i = 0; i < m; ++i) {
            const float d = s.dists[i];
            if (res.size() < ef || d < worst) {
                const slot_t v = batch[i];
                cand.emplace_back(d, v);
                std::push_heap(cand.begin(), cand.end(), std::greater<neighbor_t>());
                if (admit(v)) {
                    res.emplace_back(d, v);
                    std::push_heap(res.begin(), res.end());
                    if (res.size() > ef) {
                        std::pop_heap(res.begin(), res.end());
                        res.pop_back();
                    }
                    worst = res.front().first;
                }
            }
        }
    }
    out.assign(res.begin(), res.end());
    std::sort(out.begin(), out.end());
    return gave_up;
}

void index_t::select_heuristic(std::vector<neighbor_t>& cands, std::size_t m, std::int64_t now,
                               bool skip_dead, std::vector<slot_t>& out,
                               std::size_t* distances) const {
    // Keep a candidate only if it is closer to the base than to every neighbour kept so far,
    // so the links spread in different directions.
    std::sort(cands.begin(), cands.end());
    out.clear();
    std::size_t computed = 0;
    float* buf = scratch_t::local(M0_, dim_padded_).dec_b.data();
    for (const auto& [d, c] : cands) {
        if (out.size() >= m) break;
        if (skip_dead && !live(c, now)) continue;
        if (diverse(c, d, out, buf, computed)) out.push_back(c);
    }
    if (out.empty() && !cands.empty()) out.push_back(cands.front().second);
    if (distances != nullptr) *distances += computed;
}

bool index_t::diverse(slot_t c, float d, const std::vector<slot_t>& kept, float* buf,
                      std::size_t& computed) const {
    const float* cv = decoded(c, buf);
    for (slot_t k : kept) {
        ++computed;
        // max(): a negative inner-product distance is not scaled down into a prune.
        const float dk = dist(cv, k);
        if (std::max(dk, prune_scale_ * dk) < d) return false;
    }
    return true;
}

void index_t::link_back(slot_t from, slot_t to, int lvl, scratch_t& s) {
    const std::size_t cap = max_links(lvl);
    lock_node(from);
    std::uint32_t* l = links(from, lvl);
    const std::uint32_t n = atomic_load_u32(l);
    for (std::uint32_t i = 0; i < n; ++i)
        if (atomic_load_u32(l + 1 + i) == to) {
            unlock_node(from);
            return;
        }
    if (n < cap) {
        atomic_store_u32(l + 1 + n, to);
        atomic_store_u32(l, n + 1);
    } else {
        // Full: re-select among the old links and the newcomer.
        auto& cands = s.prune;
        cands.clear();
        const float* base = decoded(from, scratch_t::local(M0_, dim_padded_).dec_a.data());
        cands.emplace_back(dist(base, to), to);
        for (std::uint32_t i = 0; i < n; ++i) {
            const slot_t v = atomic_load_u32(l + 1 + i);
            cands.emplace_back(dist(base, v), v);
        }
        select_heuristic(cands, cap, 0, false, s.selected);
        write_links(from, lvl, s.selected.data(), s.selected.size());
    }
    unlock_node(from);
}

void index_t::insert(const float* v, std::int64_t lab, std::int64_t exp, std::int64_t now,
                     scratch_t& s) {
    int lvl = 0;
    const slot_t id = allocate_slot(lvl);
    chunk_t& ch = chunk(id);
    const std::size_t off = id & (chunk_size - 1);
    store_vector(id, v);
    atomic_store_u32(reinterpret_cast<std::uint32_t*>(record(id)), 0);
    // A fresh or freed slot has no upper links (consolidate() released them).
    if (lvl > 0) alloc_upper(id, lvl);
    ch.level[off] = static_cast<std::uint8_t>(lvl);
    ch.label[off] = lab;
    set_expiry(id, exp);
    ch.state[off].store(state_ready, std::memory_order_release);

    std::uint64_t ep = entry_.load(std::memory_order_acquire);
    if (ep == no_entry) {
        std::lock_guard<std::mutex> lock(entry_mu_);
        ep = entry_.load(std::memory_order_acquire);
        if (ep == no_entry) {
            entry_.store(pack_entry(id, lvl), std::memory_order_release);
            if (lvl > 0 && sketching_.load(std::memory_order_acquire)) sketch_add(id);
            publish_label(lab, id);
            return;
        }
    }
    slot_t cur = static_cast<slot_t>(ep & 0xffffffffu);
    const int top = static_cast<int>(ep >> 32);
    greedy_descent(v, cur, top, lvl);
    for (int l = std::min(lvl, top); l >= 0; --l) {
        search_level(v, cur, ef_construction_, l, false, now, s, s.found);
        s.found.erase(std::remove_if(s.found.begin(), s.found.end(),
                                     [id](const neighbor_t& x) { return x.second == id; }),
                      s.found.end());
        if (s.found.empty()) continue;
        cur = s.found.front().second;
        s.prune.assign(s.found.begin(), s.found.end());
        select_heuristic(s.prune, M_, now, true, s.selected);
        const std::vector<slot_t> chosen = s.selected;
        lock_node(id);
        // Another thread that reached this node through its upper levels may already have
        // linked itself here: merge with those links instead of overwriting them.
        const std::uint32_t* mine = links(id, l);
        const std::uint32_t already = atomic_load_u32(mine);
        if (already == 0) {
            write_links(id, l, chosen.data(), chosen.size());
        } else {
            s.prune.clear();
            for (slot_t c : chosen) s.prune.emplace_back(dist(v, c), c);
            for (std::uint32_t i = 0; i < already; ++i) {
                const slot_t c = atomic_load_u32(mine + 1 + i);
                if (std::find(chosen.begin(), chosen.end(), c) == chosen.end())
                    s.prune.emplace_back(dist(v, c), c);
            }
            if (s.prune.size() <= max_links(l)) {
                std::sort(s.prune.begin(), s.prune.end());
                s.selected.clear();
                for (const auto& nb : s.prune) s.selected.push_back(nb.second);
            } else {
                select_heuristic(s.prune, max_links(l), now, false, s.selected);
            }
            write_links(id, l, s.selected.data(), s.selected.size());
        }
        unlock_node(id);
        for (slot_t n : chosen) link_back(n, id, l, s);
    }
    if (lvl > top) {
        std::lock_guard<std::mutex> lock(entry_mu_);
        const std::uint64_t now_ep = entry_.load(std::memory_order_acquire);
        if (now_ep == no_entry || static_cast<int>(now_ep >> 32) < lvl)
            entry_.store(pack_entry(id, lvl), std::memory_order_release);
    }
    // Linked at every level now: a rescue may start from it.
    if (lvl > 0 && sketching_.load(std::memory_order_acquire)) sketch_add(id);
    publish_label(lab, id);
}

void index_t::validate(const float* rows, std::size_t n, const std::int64_t* labels) const {
    // int8 under ip and l2: the norm that counts is the quantised one, which the 8-bit
    // rounding can raise (up to 4x in high dimensions): the loader checks that one.
    std::vector<std::int8_t> codes(dtype_ == dtype_t::int8 && metric_ != metric_t::cosine ? dim_ : 0);
    for (std::size_t r = 0; r < n; ++r) {
        const float* row = rows + r * dim_;
        check_row(row, r, "row");
        if (dtype_ == dtype_t::float16 && metric_ != metric_t::cosine)
            for (std::size_t i = 0; i < dim_; ++i)
                if (std::fabs(row[i]) > 65504.0f)
                    throw std::invalid_argument("row " + std::to_string(r) +
                                                " has a value beyond float16's range (65504)");
        if (!codes.empty()) {
            float scale;
            if (static_cast<double>(quantize_i8(row, dim_, codes.data(), scale)) > max_norm2)
                throw std::invalid_argument("row " + std::to_string(r) +
                                            " has a squared norm above 8.5e37 once rounded to "
                                            "8 bits: its distances would overflow float32");
        }
        if (labels != nullptr && (labels[r] < 0 || labels[r] > max_label))
            throw std::invalid_argument("labels must be in [0, 2**63 - 2]");
    }
}

void index_t::add(const float* rows, std::size_t n, const std::int64_t* labels,
                  const std::int64_t* expiry_ns, std::int64_t now, std::size_t threads) {
    // Validate the whole batch before touching the graph: nothing is half-inserted on error.
    validate(rows, n, labels);
    insert_batch(rows, n, labels, expiry_ns, now, threads);
}

std::int64_t index_t::add_auto(const float* rows, std::size_t n, const std::int64_t* expiry_ns,
                               std::int64_t now, std::size_t threads) {
    validate(rows, n, nullptr);
    const std::int64_t first = reserve_labels(n);
    std::vector<std::int64_t> labels(n);
    for (std::size_t r = 0; r < n; ++r) labels[r] = first + static_cast<std::int64_t>(r);
    insert_batch(rows, n, labels.data(), expiry_ns, now, threads);
    return first;
}

void index_t::insert_batch(const float* rows, std::size_t n, const std::int64_t* labels,
                           const std::int64_t* expiry_ns, std::int64_t now, std::size_t threads) {
    if (n == 0) return;
    maybe_auto_consolidate(now, n, threads);
    {
        std::shared_lock<std::shared_mutex> writer(writers_mu_);
        insert_batches_.fetch_add(1);
        std::shared_lock<std::shared_mutex> lock(graph_mu_);
        // Keep the running counter ahead of explicit labels, as hnswlib does.
        std::int64_t hi = -1;
        for (std::size_t r = 0; r < n; ++r) hi = std::max(hi, labels[r]);
        std::int64_t cur = next_label_.load();
        while (cur <= hi && !next_label_.compare_exchange_weak(cur, hi + 1)) {
        }
        // The first rows go in one by one so that the top of the graph is built before the
        // threads start competing for the entry point.
        const std::size_t serial = std::min<std::size_t>(n, entry_.load() == no_entry ? 1 : 0);
        auto work = [&](std::size_t r) {
            scratch_t& s = scratch_t::local(M0_);
            float* v = s.query(dim_padded_);
            prepare(rows + r * dim_, v);
            insert(v, labels[r], expiry_ns[r], now, s);
        };
        for (std::size_t r = 0; r < serial; ++r) work(r);
        parallel_for(n - serial, threads, [&](std::size_t i) { work(i + serial); });
    }
    inserts_since_check_.fetch_add(n, std::memory_order_relaxed);
    maybe_start_sketching();  // (the batch may have made the index large enough)
}

void index_t::maybe_auto_consolidate(std::int64_t now, std::size_t incoming,
                                     std::size_t threads) {
    const double tau = auto_consolidate();
    if (tau <= 0) return;
    std::size_t allocated, free_count;
    {
        std::lock_guard<std::mutex> lock(alloc_mu_);
        allocated = n_slots_.load() - free_slots_.size();
        free_count = free_slots_.size();
    }
    if (allocated == 0) return;
    // Counting expired slots is a scan of the expiry array: done every ~1% of inserts, a
    // batch that would grow the index past its free slots counting as the rows it brings
    // (checking before every single-row add that grew read all the expiries each time, 3x
    // the cost of an add at 40k rows), or at once after a search found the graph mostly dead.
    const bool must_grow = incoming > free_count;
    const std::size_t since = inserts_since_check_.load(std::memory_order_relaxed);
    const std::size_t every = std::max<std::size_t>(64, allocated / 100);
    const bool sparse = sparse_seen_.exchange(false, std::memory_order_relaxed);
    if (!sparse && since + (must_grow ? incoming : 0) < every) return;
    inserts_since_check_.store(0, std::memory_order_relaxed);
    std::size_t dead;
    {
        std::shared_lock<std::shared_mutex> lock(graph_mu_);
        dead = dead_count(now);
    }
    if (static_cast<double>(dead) < tau * static_cast<double>(allocated)) return;
    if (defer_consolidation_.load())
        consolidation_due_.store(true);
    else
        consolidate(now, threads);
}

std::size_t index_t::dead_count(std::int64_t now) const {
    const slot_t n = n_slots();
    std::size_t dead = 0;
    for (slot_t id = 0; id < n; ++id)
        if (state(id) == state_ready && !live(id, now)) ++dead;
    return dead;
}

// ------------------------------------------------------------------------------ search

void index_t::brute_force(const float* q, std::size_t k, std::int64_t now,
                          std::vector<neighbor_t>& out, const std::vector<slot_t>* slots) const {
    out.clear();
    const slot_t n = slots ? static_cast<slot_t>(slots->size()) : n_slots();
    for (slot_t i = 0; i < n; ++i) {
        const slot_t id = slots ? (*slots)[i] : i;
        if (state(id) != state_ready || !live(id, now)) continue;
        const float d = exact_dist(q, id);
        if (out.size() < k) {
            out.emplace_back(d, id);
            std::push_heap(out.begin(), out.end());
        } else if (d < out.front().first) {
            std::pop_heap(out.begin(), out.end());
            out.back() = {d, id};
            std::push_heap(out.begin(), out.end());
        }
    }
    std::sort(out.begin(), out.end());
}

void index_t::search_one(const float* q, std::size_t k, std::size_t ef, std::int64_t now,
                         scratch_t& s, std::vector<neighbor_t>& out, const filter_t* filter) const {
    // An upsert makes the label's new slot searchable before it tombstones the old one, so a
    // search in between can reach both (61 of 107k result rows under a stream of upserts):
    // each label is answered once, at its closer slot. The labels are checked on the answer
    // only, not in the walk. When that leaves fewer than k, the search runs again for as many
    // more as were dropped (rare: it takes an upsert of a result while the search runs).
    std::size_t want = k;
    for (int attempt = 0;; ++attempt) {
        search_candidates(q, want, ef, now, s, out, filter);
        const std::size_t dropped = drop_duplicate_labels(out, k, s);
        if (dropped == 0 || out.size() >= k || attempt == 2) break;
        want += dropped;
    }
}

std::size_t index_t::drop_duplicate_labels(std::vector<neighbor_t>& out, std::size_t k,
                                           scratch_t& s) const {
    auto& answered = s.answered;
    if (k > 64) {
        // A large k: sorted, its labels show in k log k whether any repeats (a linear scan
        // per label would be quadratic); only then (rare) the pass below.
        const std::size_t m = std::min(k, out.size());
        answered.resize(m);
        for (std::size_t i = 0; i < m; ++i) answered[i] = label(out[i].second);
        std::sort(answered.begin(), answered.end());
        if (std::adjacent_find(answered.begin(), answered.end()) == answered.end()) {
            out.resize(m);
            return 0;
        }
    }
    answered.clear();
    std::size_t kept = 0, read = 0;
    for (; read < out.size() && kept < k; ++read) {
        const std::int64_t lab = label(out[read].second);
        if (std::find(answered.begin(), answered.end(), lab) != answered.end()) continue;
        answered.push_back(lab);
        out[kept++] = out[read];
    }
    out.resize(kept);
    return read - kept;
}

void index_t::search_candidates(const float* q, std::size_t k, std::size_t ef, std::int64_t now,
                                scratch_t& s, std::vector<neighbor_t>& out,
                                const filter_t* filter) const {
    out.clear();
    const std::uint64_t ep = entry_.load(std::memory_order_acquire);
    if (ep == no_entry) return;
    // A filter that admits few entries is answered exactly from them: cheaper than a walk
    // that would have to pass most of the graph to find them (Lucene's rule for filters).
    // "Few": a walk admitting a share f of the nodes computes ~width / f distances to fill
    // its results, the scan f * n, so the scan wins while slots^2 < c * width * n. c = 4
    // from sgd rows at ef 64 (bench/filtered_search.py): at 50k a scan of 2,000 slots took
    // 369 µs against a walk's 763, of 4,000 about what the walk does; at 100k a scan of
    // 3,000 541 µs against 1,190, of 6,000 the same as the walk. Below 4 * width it always
    // wins.
    if (filter != nullptr) {
        const std::size_t few = filter->slots.size(), width = std::max(ef, k);
        if (few <= 4 * width || few * few <= 4 * width * static_cast<std::size_t>(n_slots())) {
            brute_force(q, k, now, out, &filter->slots);
            return;
        }
    }
    slot_t cur = static_cast<slot_t>(ep & 0xffffffffu);
    // Greedy down to level 2, then a beam of width search_starts (default 2) at level 1 (on
    // the cached 8-bit copies, so nearly free) whose nodes all start the level-0 search: on
    // sgd 2 starts gain ~0.4 points of recall@10 at equal ef for no measurable time, and 8
    // reach a small foreign cluster among 100k rows at ef 32 as often as 2 do at ef 64.
    const int top = static_cast<int>(ep >> 32);
    const std::size_t want_starts = search_starts();
    slot_t starts[max_search_starts] = {cur};
    std::size_t n_starts = 1;
    float qnorm2 = 0.0f;
    if (top >= 1) {
        greedy_descent(q, cur, top, 1);
        qnorm2 = query_norm2(q);
        upper_beam(q, qnorm2, cur, want_starts, 1, s, s.prune);
        n_starts = 0;
        for (const auto& nb : s.prune)
            if (n_starts < want_starts) starts[n_starts++] = nb.second;
    }
    // When nearly every node the walk meets is dead (expired or deleted, not yet
    // consolidated) or refused by the filter, it would pass through most of the graph to
    // fill its results: 10 ms a query at 40k rows with 10 live, 140x a normal one. Past a
    // budget (its ~32 distances an expansion cost about what one scan of every slot does)
    // the exact scan of what is admissible answers instead, and the next insert checks
    // at once whether to consolidate.
    const std::size_t width = std::max(ef, k);
    const std::size_t budget = std::max<std::size_t>(4 * width, n_slots() / 256);
    const std::size_t beam = rescue_beam();
    const bool may_rescue = beam > want_starts && top >= 1;
    // A walk that may be rescued and is still far after 8 expansions (the nearest it met
    // beyond rescue_distance) has nothing near it or is lost among another topic's rows:
    // its answer will come from the rescue, or is far. It keeps only the k (at least 4)
    // nearest from there, which ends it sooner, is rescued wherever it ends, and the
    // rescue's walk runs 16 (at least k) wide instead of ef. Over 6 graphs of 100k sgd rows
    // at ef 24 (k 4, rescue 64), alternating with the code before: paraphrases lost 21-22
    // of 3,096 (before: 23), a random vector's search p50 65-67 -> 57 µs, p99 99 -> 74; the
    // 1,000 sgd requests' answers unchanged (bench/rescue_width.py, bench/rescue.py;
    // docs/results/rescue_narrow_20261206_s15.txt). Narrowing after 4 expansions lost 29;
    // the rescue's walk 12 wide 25; 24 wide saved nothing at p50.
    narrow_t narrow{rescue_distance(), 8, std::min(width, std::max<std::size_t>(k, 4))};
    if (search_level(q, starts, n_starts, width, 0, true, now, s, out,
                     filter ? &filter->mask : nullptr, budget, nullptr,
                     may_rescue ? &narrow : nullptr)) {
        if (filter == nullptr) sparse_seen_.store(true, std::memory_order_relaxed);
        brute_force(q, k, now, out, filter ? &filter->slots : nullptr);
        return;
    }
    if (may_rescue) s.first.assign(out.begin(), out.end());  // (the walk's own distances)
    rerank(q, out, k);
    // (A narrowed walk is rescued even when it then came near: narrow, it may have stopped
    // short of nearer rows; an sgd request did, at 0.49 for 0.80.)
    if (may_rescue && !out.empty() && (narrow.narrowed || out.front().first > rescue_distance())) {
        // The walk stopped far from the query. On 100k sgd rows holding 499 questions of
        // another domain, 14-15 paraphrases whose own question brute force finds at
        // similarity 0.85-0.98 ended among rows at 0.17-0.35; starting again from the best
        // of a 128-wide level-1 beam (on the 8-bit copies) finds all but one. Only such far
        // lookups pay for it: ~4x a search with the beam, ~2x with the scan of the sign bits
        // of the upper nodes that replaces it under cosine (1 paraphrase lost either way,
        // as with a beam of 4096; the 128 nearest by sign bits held the nearest upper node
        // for 99.7 % of the paraphrases: bench/rescue.py, bench/sign_bits.py). The cache ranks
        // the 64 nearest by sign bits again: over 6 graphs it lost as few paraphrases as 128
        // (23 of 3,096; 32: 25) for ~4 µs less (bench/rescue_width.py).
        // (Tried: walking again only when the wide beam meets a node nearer than the answer
        // saved a third of a random vector's cost and lost 2 of those found; a beam at level 2
        // instead, then 4-16 wide at level 1, cost a third less and lost 6 of them.)
        // The second walk resumes the first: it keeps the first's answer and visited marks,
        // so it expands only what beats that answer and computes no node twice.
        if (sketch_scan_pays(beam))
            sketch_starts(q, qnorm2, beam, want_starts, s, s.prune);
        else
            upper_beam(q, qnorm2, cur, beam, 1, s, s.prune);
        n_starts = 0;
        for (const auto& nb : s.prune)
            if (n_starts < want_starts) starts[n_starts++] = nb.second;
        // A narrowed walk whose nearest start is still below similarity 0.25 (under cosine)
        // has most likely nothing near it: the rescue walks 8 wide. Of the 477 rescued
        // paraphrases that ended at 0.83 or nearer over 4 graphs, 11 started that far; over
        // 6 graphs, alternating twice: 22 of 3,096 lost as at 16, a random vector's search
        // p50 40-41 -> 37 µs, p99 53-54 -> 49 (4 wide below 0.2: 23 lost, p50 29-32;
        // bench/rescue_width.py, docs/results/rescue_gate_20261206_s15.txt).
        const bool far_starts = metric_ == metric_t::cosine && !s.prune.empty() &&
                                s.prune.front().first > 0.75f;
        const std::size_t rescue_width =
            narrow.narrowed ? std::min(width, std::max<std::size_t>(k, far_starts ? 8 : 16))
                            : width;
        if (search_level(q, starts, n_starts, rescue_width, 0, true, now, s, out,
                         filter ? &filter->mask : nullptr, budget, &s.first))
            out.assign(s.first.begin(), s.first.end());  // (the first walk did not go sparse)
        rerank(q, out, k);
    }
    if (out.size() < k && filter != nullptr) {
        brute_force(q, k, now, out, &filter->slots);
    } else if (out.size() < k) {
        // Too few live entries were reachable (most of the neighbourhood is dead, or the live
        // set is tiny): answer exactly from a scan rather than return too few.
        std::size_t candidates;
        {
            std::lock_guard<std::mutex> lock(label_mu_);
            candidates = label_map_.size();
        }
        if (candidates > out.size()) brute_force(q, k, now, out);
    }
}

void index_t::search(const float* queries, std::size_t n, std::size_t k, std::size_t ef,
                     std::int64_t now, std::size_t threads, std::int64_t* out_labels,
                     float* out_distances, const std::int64_t* allowed,
                     std::size_t n_allowed) const {
    if (k == 0) throw std::invalid_argument("k must be positive");
    if (ef == 0) ef = ef_search();
    // A NaN or a zero query under cosine would rank every entry by NaN: refuse it instead.
    for (std::size_t r = 0; r < n; ++r) check_row(queries + r * dim_, r, "query row");
    std::shared_lock<std::shared_mutex> lock(graph_mu_);
    std::unique_ptr<filter_t> filter;
    if (allowed != nullptr) {
        filter = std::make_unique<filter_t>();
        filter->mask.assign(n_slots(), 0);
        std::lock_guard<std::mutex> lk(label_mu_);
        for (std::size_t i = 0; i < n_allowed; ++i) {
            auto it = label_map_.find(allowed[i]);
            if (it == label_map_.end() || it->second >= filter->mask.size() ||
                filter->mask[it->second])
                continue;
            filter->mask[it->second] = 1;
            filter->slots.push_back(it->second);
        }
    }
    auto work = [&](std::size_t r) {
        scratch_t& s = scratch_t::local(M0_);
        float* q = s.query(dim_padded_);
        prepare(queries + r * dim_, q);
        search_one(q, k, ef, now, s, s.found, filter.get());
        std::int64_t* lab = out_labels + r * k;
        float* dis = out_distances + r * k;
        for (std::size_t i = 0; i < k; ++i) {
            if (i < s.found.size()) {
                lab[i] = label(s.found[i].second);
                dis[i] = s.found[i].first;
            } else {
                lab[i] = -1;
                dis[i] = std::numeric_limits<float>::infinity();
            }
        }
    };
    // A single query is not worth waking the pool for.
    parallel_for(n, n == 1 ? 1 : threads, work);
}

// ------------------------------------------------------------------------------ point ops

std::size_t index_t::remove(const std::int64_t* labels, std::size_t n, std::int64_t now) {
    std::shared_lock<std::shared_mutex> lock(graph_mu_);
    std::lock_guard<std::mutex> lk(label_mu_);
    std::size_t removed = 0;
    for (std::size_t i = 0; i < n; ++i) {
        auto it = label_map_.find(labels[i]);
        if (it == label_map_.end()) continue;
        // (an expired entry is unmapped too, but was not there to delete: counting it made
        // the answer depend on whether consolidation had run yet)
        if (live(it->second, now)) ++removed;
        set_expiry(it->second, deleted_mark);
        label_map_.erase(it);
        deleted_slots_.fetch_add(1, std::memory_order_relaxed);
    }
    return removed;
}

std::size_t index_t::touch(const std::int64_t* labels, const std::int64_t* exp, std::size_t n,
                           std::int64_t now) {
    std::shared_lock<std::shared_mutex> lock(graph_mu_);
    std::lock_guard<std::mutex> lk(label_mu_);
    std::vector<slot_t> changed;  // distinct entries: a label given twice is one entry
    for (std::size_t i = 0; i < n; ++i) {
        auto it = label_map_.find(labels[i]);
        if (it == label_map_.end() || !live(it->second, now)) continue;
        if (expiry(it->second) <= consolidating_now_) continue;  // being freed (see there)
        set_expiry(it->second, exp[i]);
        expiry_floor_ = std::min(expiry_floor_, exp[i]);
        changed.push_back(it->second);
    }
    std::sort(changed.begin(), changed.end());
    return static_cast<std::size_t>(std::unique(changed.begin(), changed.end()) -
                                    changed.begin());
}

void index_t::get(const std::int64_t* labels, std::size_t n, std::int64_t now, float* out) const {
    std::shared_lock<std::shared_mutex> lock(graph_mu_);
    for (std::size_t i = 0; i < n; ++i) {
        const slot_t id = find_label(labels[i]);
        if (id == no_slot || !live(id, now))
            throw key_error("label " + std::to_string(labels[i]) + " is not in the index");
        std::memcpy(out + i * dim_, decoded(id, scratch_t::local(M0_, dim_padded_).dec_a.data()),
                    dim_ * sizeof(float));
    }
}

void index_t::expiry_of(const std::int64_t* labels, std::size_t n, std::int64_t now,
                        std::int64_t* out) const {
    std::shared_lock<std::shared_mutex> lock(graph_mu_);
    for (std::size_t i = 0; i < n; ++i) {
        const slot_t id = find_label(labels[i]);
        if (id == no_slot || !live(id, now))
            throw key_error("label " + std::to_string(labels[i]) + " is not in the index");
        out[i] = expiry(id);
    }
}

bool index_t::contains(std::int64_t lab, std::int64_t now) const {
    std::shared_lock<std::shared_mutex> lock(graph_mu_);
    const slot_t id = find_label(lab);
    return id != no_slot && live(id, now);
}

std::size_t index_t::size(std::int64_t now) const {
    std::shared_lock<std::shared_mutex> lock(graph_mu_);
    std::lock_guard<std::mutex> lk(label_mu_);
    if (now < expiry_floor_) return label_map_.size();  // (no mapped slot has expired)
    std::size_t n = 0;
    std::int64_t floor = std::numeric_limits<std::int64_t>::max();
    for (const auto& [lab, id] : label_map_) {
        const std::int64_t e = expiry(id);
        if (e > now) ++n;
        floor = std::min(floor, e);
    }
    expiry_floor_ = floor;
    return n;
}

std::vector<std::int64_t> index_t::live_labels(std::int64_t now) const {
    std::shared_lock<std::shared_mutex> lock(graph_mu_);
    std::lock_guard<std::mutex> lk(label_mu_);
    std::vector<std::int64_t> out;
    out.reserve(label_map_.size());
    for (const auto& [lab, id] : label_map_)
        if (live(id, now)) out.push_back(lab);
    return out;
}

index_stats_t index_t::stats(std::int64_t now) const {
    std::shared_lock<std::shared_mutex> lock(graph_mu_);
    index_stats_t st;
    const slot_t n = n_slots();
    st.nodes_per_level.assign(max_levels, 0);
    std::size_t upper_bytes = 0;
    for (slot_t id = 0; id < n; ++id) {
        if (state(id) != state_ready) {
            ++st.free_slots;
            continue;
        }
        ++st.allocated;
        if (live(id, now))
            ++st.live;
        else
            ++st.dead;
        const int lv = level(id);
        for (int l = 0; l <= lv; ++l) ++st.nodes_per_level[l];
        if (lv > 0)
            upper_bytes += (code_words_ + static_cast<std::size_t>(lv) * (1 + M_)) * sizeof(std::uint32_t);
    }
    const std::uint64_t ep = entry_.load();
    st.max_level = ep == no_entry ? -1 : static_cast<int>(ep >> 32);
    st.nodes_per_level.resize(static_cast<std::size_t>(st.max_level + 1));
    const std::size_t chunks = n_chunks_.load();
    st.capacity = chunks * chunk_size;
    std::size_t labels_bytes;
    {
        std::lock_guard<std::mutex> lk(label_mu_);
        // An unordered_map node holds key, value and next pointer; plus one bucket pointer.
        labels_bytes = label_map_.size() * (sizeof(void*) + 16 + 16) +
                       label_map_.bucket_count() * sizeof(void*);
    }
    // Slab pages are committed by the OS only when touched, so count the used part of it.
    const std::size_t low_bytes = dtype_ == dtype_t::float32 ? dim_padded_ * sizeof(half_t) : 0;
    // The sketches' pages in use (codes are appended in order: ~a block of 8 a page's worth).
    const std::size_t sketch_bytes =
        ((sketch_total_.load() + 8 * chunks) / 8 * sketch_words_ * 8 * sizeof(std::uint64_t) +
         sketch_total_.load() * sizeof(std::uint16_t)) * (sketching_.load() ? 1 : 0);
    st.memory_bytes = static_cast<std::size_t>(n) * (stride_ + low_bytes) + chunks * sizeof(chunk_t) +
                      upper_bytes + labels_bytes + max_chunks * sizeof(void*) + sketch_bytes;
    return st;
}

}  // namespace hnswcache
