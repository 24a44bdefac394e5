// A layered HNSW graph (Malkov & Yashunin, 2018) whose entries expire.
//
// Memory layout. Slots live in chunks of `chunk_size`; a chunk never moves once allocated, so
// capacity grows without stopping readers. A slot's record is
//     u32 count0 | u32 links0[M0] | pad | i64 expiry | u16 vector[dim_padded]
// (dtype int8: ... | i64 expiry | f32 scale | f32 norm2 | 8 pad | i8 code[dim_padded])
// so expanding a node touches its links and then nearby vector lines. The u16 are float16
// values (dtype float16) or, for float32, the high halves of the float32 bits (bfloat16):
// the graph walk reads only those, half the bytes, and the final candidates are re-ranked
// with the exact float32, whose low halves live in a cold per-chunk array. Memory is the
// same as plain float32 storage, results and stored values are exact. Upper-level nodes are
// rare (1 node in M per level) and keep apart, in a per-slot block, an 8-bit copy of their
// vector followed by level * (1 + M) u32 of links: the greedy descent through the upper
// levels reads only these small blocks, which stay in cache (layout in graph_internal.hpp).
// Labels, levels and states are side arrays of the chunk: they are read only for results
// and bookkeeping, not on every distance.
//
// Invariants (checked by check_integrity()):
//   I1. Every id in a published link list refers to a slot in state `ready` whose vector,
//       label and expiry were written before the link was stored (release/acquire).
//   I2. Search never returns a node whose expiry <= now (deleted nodes have expiry INT64_MIN).
//   I3. After consolidate(): no link points to a freed slot, every live node is reachable
//       from the entry point at level 0, and the entry point is live at the top level.
//   I4. A freed slot is reused only by add(); consolidate() holds the index exclusively, so
//       no search can still hold the id of a slot it frees.
//   I5. The label map is a bijection between labels and non-deleted slots.
//   I6. A node of level >= 1 has an upper block whose 8-bit copy encodes its stored vector;
//       it is written before the node is published, like its vector.
//   I7. Under cosine, once sketches are kept (sketching_), the sketch of its chunk holds the
//       sign bits of that 8-bit copy, once, from when the node is linked at every level
//       until consolidate() frees it; nothing else is in a sketch, and no sketch holds
//       anything before (the rescue's scan of the upper level reads them).
//
// Concurrency. add/search/delete/touch/get hold `graph_mu_` shared. consolidate() computes
// its repairs holding it shared too (searches go on; inserts wait on `writers_mu_`), then
// holds it exclusively only to publish the new lists and free the slots. save holds
// `writers_mu_` (inserts and consolidation wait) and `graph_mu_` shared (searches, deletes
// and touches go on); check_integrity holds `graph_mu_` exclusively. Link lists are written under a per-slot
// spinlock; readers never lock: they load a count (acquire) and then the ids (acquire).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <random>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "hnswcache/kernels.hpp"

namespace hnswcache {

enum class metric_t : std::uint8_t { cosine = 0, ip = 1, l2 = 2 };
metric_t parse_metric(const std::string& name);
const char* metric_name(metric_t m);

// How vectors are stored. Queries and all arithmetic stay float32. float32 is exact (kept as
// two 16-bit halves, see the record layout); float16 rounds the stored values; int8 keeps
// each vector as a float32 scale and 8-bit codes (symmetric, one scale per vector): a
// quarter of float32's bytes, for users that re-score their hits elsewhere (the cache).
enum class dtype_t : std::uint8_t { float32 = 0, float16 = 1, int8 = 2 };
dtype_t parse_dtype(const std::string& name);
const char* dtype_name(dtype_t d);

using slot_t = std::uint32_t;
constexpr slot_t no_slot = std::numeric_limits<slot_t>::max();
constexpr std::int64_t never_expires = std::numeric_limits<std::int64_t>::max();
constexpr std::int64_t deleted_mark = std::numeric_limits<std::int64_t>::min();
constexpr int max_levels = 32;
// Labels are in [0, max_label]: one below INT64_MAX, so the automatic counter (kept one past
// the largest label) never overflows.
constexpr std::int64_t max_label = std::numeric_limits<std::int64_t>::max() - 1;
// The largest ef (search or construction): a longer candidate list walks most of any graph.
constexpr std::size_t max_ef = std::size_t{1} << 20;

// A label asked for is not in the index (mapped to KeyError in Python).
struct key_error : std::out_of_range {
    using std::out_of_range::out_of_range;
};
// A file or byte string is not a valid index (mapped to ValueError).
struct format_error : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

// A file could not be read or written (mapped to OSError; with an errno, to its subclass:
// FileNotFoundError, IsADirectoryError, PermissionError...).
struct io_error : std::runtime_error {
    io_error(const std::string& what, int errno_code, std::string file)
        : std::runtime_error(what), code(errno_code), path(std::move(file)) {}
    int code;          // errno, or 0 when there is none
    std::string path;  // the file concerned
};

struct consolidate_report_t {
    std::size_t removed = 0;      // dead slots freed
    std::size_t repaired = 0;     // (node, level) link lists rewritten
    std::size_t distances = 0;    // distance computations spent
    std::size_t reconnected = 0;  // live nodes made reachable again
    double seconds = 0;
    double blocked_seconds = 0;  // of which searches had to wait (the publish phases)
    double inserts_blocked_seconds = 0;  // of which inserts had to wait
    std::size_t merged = 0;  // repaired lists that kept links an insert made meanwhile
    std::size_t pruned = 0;  // lists of nodes inserted meanwhile cleared of dead links
};

struct integrity_report_t {
    std::size_t allocated = 0, live = 0, dead = 0, free_slots = 0;
    std::size_t unreachable_live = 0;
    std::size_t min_degree0 = 0, max_degree0 = 0;
    double mean_degree0 = 0;
    int max_level = -1;
};

struct index_stats_t {
    std::size_t live = 0, dead = 0, free_slots = 0, allocated = 0, capacity = 0;
    int max_level = -1;
    std::vector<std::size_t> nodes_per_level;
    std::size_t memory_bytes = 0;
};

class index_t {
   public:
    // alpha: the pruning slack of the neighbour selection (see diverse()), in
    // [min_alpha, max_alpha]; 1 is the HNSW paper's heuristic.
    static constexpr double default_alpha = 1.2, min_alpha = 1.0, max_alpha = 2.0;
    // The most slots an index can hold (chunks of 4096 records, at most 2^16 of them).
    static constexpr std::size_t max_slots = std::size_t{1} << 28;
    // capacity_hint (at most max_slots) allocates nothing: chunks are allocated as slots are
    // used, so a hint costs no memory.
    index_t(std::size_t dim, metric_t metric, std::size_t M, std::size_t ef_construction,
            std::size_t capacity_hint, std::uint64_t seed, dtype_t dtype = dtype_t::float32,
            double alpha = default_alpha);
    ~index_t();
    index_t(const index_t&) = delete;
    index_t& operator=(const index_t&) = delete;

    // Upsert n rows (row-major, dim floats each). Validates the whole batch first: finite
    // values, non-zero rows under cosine, non-negative labels. Nothing is inserted on error.
    void add(const float* rows, std::size_t n, const std::int64_t* labels,
             const std::int64_t* expiry, std::int64_t now, std::size_t threads);
    // The same with labels from the running counter, taken only once the batch is valid (a
    // refused batch consumes none); returns the first (the batch has first .. first + n - 1).
    std::int64_t add_auto(const float* rows, std::size_t n, const std::int64_t* expiry,
                          std::int64_t now, std::size_t threads);

    // k nearest live entries per query; pads with -1 / +inf. With `allowed` (n_allowed labels),
    // only those labels can be returned (the filter walks the graph like expiry does).
    void search(const float* queries, std::size_t n, std::size_t k, std::size_t ef,
                std::int64_t now, std::size_t threads, std::int64_t* out_labels,
                float* out_distances, const std::int64_t* allowed = nullptr,
                std::size_t n_allowed = 0) const;

    // Both return how many distinct entries live at `now` they changed (an expired entry not
    // yet consolidated is still unmapped by remove, but not counted).
    std::size_t remove(const std::int64_t* labels, std::size_t n, std::int64_t now);
    std::size_t touch(const std::int64_t* labels, const std::int64_t* expiry, std::size_t n,
                      std::int64_t now);
    void get(const std::int64_t* labels, std::size_t n, std::int64_t now, float* out) const;
    void expiry_of(const std::int64_t* labels, std::size_t n, std::int64_t now,
                   std::int64_t* out) const;
    bool contains(std::int64_t label, std::int64_t now) const;
    std::size_t size(std::int64_t now) const;
    std::vector<std::int64_t> live_labels(std::int64_t now) const;
    std::int64_t reserve_labels(std::size_t n);

    consolidate_report_t consolidate(std::int64_t now, std::size_t threads);
    integrity_report_t check_integrity(std::int64_t now) const;
    index_stats_t stats(std::int64_t now) const;

    std::string serialize() const;
    static std::unique_ptr<index_t> deserialize(const char* data, std::size_t size);
    void save(const std::string& path) const;
    static std::unique_ptr<index_t> load(const std::string& path);

    std::size_t dim() const { return dim_; }
    metric_t metric() const { return metric_; }
    dtype_t dtype() const { return dtype_; }
    std::size_t M() const { return M_; }
    std::size_t ef_construction() const { return ef_construction_; }
    double alpha() const { return alpha_; }
    std::size_t ef_search() const { return ef_search_.load(std::memory_order_relaxed); }
    void set_ef_search(std::size_t ef);
    // How many nodes of the level-1 beam start the level-0 search (1..max_search_starts).
    // More starts find isolated clusters at a lower ef, for a few cached 8-bit distances.
    static constexpr std::size_t max_search_starts = 64;
    std::size_t search_starts() const { return search_starts_.load(std::memory_order_relaxed); }
    void set_search_starts(std::size_t n);
    // A search whose nearest result lies farther than rescue_distance (e.g. the walk never
    // entered a small cluster of another domain, so it stopped among unrelated rows) walks
    // level 0 again from the best of rescue_beam level-1 nodes, and answers the merge of
    // both: under cosine the nearest by a scan of the sign bits of every node of level >= 1
    // (sketch_starts), else a level-1 beam that wide. 0 (the default) turns it off; the
    // distance defaults to never.
    static constexpr std::size_t max_rescue_beam = 4096;
    std::size_t rescue_beam() const { return rescue_beam_.load(std::memory_order_relaxed); }
    void set_rescue_beam(std::size_t width);
    float rescue_distance() const { return rescue_distance_.load(std::memory_order_relaxed); }
    void set_rescue_distance(float d);
    double auto_consolidate() const { return auto_consolidate_.load(std::memory_order_relaxed); }
    void set_auto_consolidate(double fraction);
    // Deferred: an add that finds the dead share past auto_consolidate does not run the
    // pass itself but marks it due; the caller runs consolidate() elsewhere (a thread).
    bool defer_consolidation() const { return defer_consolidation_.load(); }
    void set_defer_consolidation(bool on) { defer_consolidation_.store(on); }
    // Whether a pass is due (deferred mode), and clears the mark.
    bool take_consolidation_due() { return consolidation_due_.exchange(false); }
    const char* isa() const { return kernels_->name; }

   private:
    static constexpr std::size_t chunk_bits = 12;
    static constexpr std::size_t chunk_size = std::size_t{1} << chunk_bits;
    static constexpr std::size_t max_chunks = std::size_t{1} << 16;
    static_assert(max_slots == max_chunks * chunk_size, "max_slots is what the chunks hold");
    enum : std::uint8_t { state_free = 0, state_ready = 1 };

    struct chunk_t;
    struct scratch_t;
    using neighbor_t = std::pair<float, slot_t>;  // (distance, slot)

    // --- slot access (index.cpp)
    chunk_t& chunk(slot_t id) const;
    char* record(slot_t id) const;
    std::uint32_t* links(slot_t id, int level) const;  // [count, ids...]
    const char* raw(slot_t id) const;  // the stored vector, float32 or float16
    // The stored vector as float32 (exact for float32 storage), decoded into buf.
    const float* decoded(slot_t id, float* buf) const;
    const half_t* low_halves(slot_t id) const;  // float32 storage only
    void store_vector(slot_t id, const float* v);
    std::int64_t expiry(slot_t id) const;
    void set_expiry(slot_t id, std::int64_t t);
    std::int64_t label(slot_t id) const;
    int level(slot_t id) const;
    std::uint8_t state(slot_t id) const;
    bool live(slot_t id, std::int64_t now) const { return expiry(id) > now; }
    std::size_t max_links(int level) const { return level == 0 ? M0_ : M_; }
    void lock_node(slot_t id) const;
    void unlock_node(slot_t id) const;
    std::size_t n_slots() const { return n_slots_.load(std::memory_order_acquire); }

    // --- distances: q is a float32 vector (padded), the other side a stored slot. dist and
    //     dist_batch read the 16-bit values the graph walk uses; exact_dist the stored vector.
    float dist(const float* q, slot_t id) const;
    float exact_dist(const float* q, slot_t id) const;
    // Replaces the distances of `found` (sorted by walk distance) by exact ones and sorts it
    // (float32 storage), dropping candidates that provably cannot be among the k best.
    void rerank(const float* q, std::vector<neighbor_t>& found, std::size_t k) const;
    void dist_batch(const float* q, const slot_t* ids, std::size_t n, scratch_t& s,
                    float* out) const;
    void prepare(const float* row, float* out) const;  // pad (and normalise under cosine)
    // Throws for a row with NaN or infinity, or a zero row under cosine ("<what> <r> ...").
    void check_row(const float* row, std::size_t r, const char* what) const;
    // What makes a row of dim_ values unfit for the index, or nullptr: NaN or infinity, a zero
    // row under cosine, under ip and l2 a squared norm above 8.5e37 (its distances would
    // overflow float32). With `stored` (a row as kept, e.g. read from a file), under cosine
    // also a squared norm off 1 by more than the dtype's rounding allows (rows are
    // normalised on insert). check_row, the loader and check_integrity share it.
    const char* row_problem(const float* row, bool stored) const;
    // The same for an int8 row (scale, dim_ codes): also an invalid scale or a code of -128;
    // under cosine the codes must be the quantisation of some unit vector. Sets norm2 to
    // |scale * code|^2 (i8_norm2_of, as quantize_i8() computes it).
    const char* i8_row_problem(float scale, const std::int8_t* code, float& norm2) const;
    // Checks a batch for add(): rows (row_problem, float16's range, int8's quantised norm)
    // and, when given, labels.
    void validate(const float* rows, std::size_t n, const std::int64_t* labels) const;
    void insert_batch(const float* rows, std::size_t n, const std::int64_t* labels,
                      const std::int64_t* expiry, std::int64_t now, std::size_t threads);
    float query_norm2(const float* q) const;  // |q|^2 under L2 (the 8-bit copies need it)
    // The distance to an 8-bit vector (scale * code, |scale * code|^2 = norm2) from
    // dot = sum q_i code_i: 1 - scale * dot, or |q|^2 + norm2 - 2 scale dot under L2.
    float from_i8_dot(float dot, float scale, float norm2, float qnorm2) const {
        return metric_ == metric_t::l2 ? qnorm2 + norm2 - 2.0f * scale * dot : 1.0f - scale * dot;
    }

    // --- graph (index.cpp)
    slot_t allocate_slot(int& level_out);
    void ensure_chunk(std::size_t chunk_index);
    static void free_chunk(chunk_t* ch);
    void insert(const float* v, std::int64_t label, std::int64_t expiry, std::int64_t now,
                scratch_t& s);
    // Greedy walk from `cur` at from_level down to to_level (exclusive) on the 8-bit copies:
    // it only chooses where the exact search starts, so approximate distances do.
    void greedy_descent(const float* q, slot_t& cur, int from_level, int to_level) const;
    // Allocates the upper block of a node of level >= 1 whose vector is already stored.
    void alloc_upper(slot_t id, int level);
    void encode_upper(slot_t id, std::uint32_t* block) const;
    void approx_batch(const float* q, float qnorm2, const slot_t* ids, std::size_t n,
                      scratch_t& s, float* out) const;
    // --- sketches: the sign bits of the nodes of level >= 1 (cosine), for a rescue
    // Starts keeping sketches (codes every upper node, under graph_mu_ exclusive) once a
    // rescue is set under cosine and the index has M * rescue_beam slots. Holds no lock.
    void maybe_start_sketching();
    // Maps the sketch of id's chunk if it has none yet (throws bad_alloc), under sketch_mu_.
    void sketch_map(slot_t id);
    // Appends slot id's code (from its 8-bit copy) to its chunk's mapped sketch: no throw.
    // Under graph_mu_ (or before the index is shared).
    void sketch_add(slot_t id);
    // Drops the codes of slots freed or no longer of level >= 1. Under graph_mu_ exclusive.
    void sketch_compact();
    std::uint64_t* sketch_block(const chunk_t& ch, std::uint32_t i) const;
    std::uint16_t& sketch_slot(const chunk_t& ch, std::uint32_t i) const;
    // Whether a rescue `width` wide scans the sketches instead of walking a level-1 beam.
    bool sketch_scan_pays(std::size_t width) const;
    // The rescue's starting points: of the `width` level-1 nodes nearest q by sign bits,
    // the `keep` nearest by their 8-bit copies (sorted, in out).
    void sketch_starts(const float* q, float qnorm2, std::size_t width, std::size_t keep,
                       scratch_t& s, std::vector<neighbor_t>& out) const;
    // Best-first search of an upper level on the 8-bit copies; out sorted, approx distances.
    void upper_beam(const float* q, float qnorm2, slot_t start, std::size_t ef, int level,
                    scratch_t& s, std::vector<neighbor_t>& out) const;
    // Best-first search of one level from `starts`. With live_only, only nodes live at `now`
    // (and, given a mask, allowed by it) enter the results; the others are walked through.
    // With `sparse_budget` > 0 the walk gives up after that many expansions made while it
    // holds fewer than `ef` results, and returns true (see search_candidates).
    // A walk that may narrow: about to expand its `after`-th node, if its results are full
    // and their nearest is farther than `distance`, it keeps only the `ef` nearest from there
    // on (and says so in `narrowed`); checked that once.
    struct narrow_t {
        float distance;
        std::size_t after, ef;
        bool narrowed = false;
    };
    bool search_level(const float* q, const slot_t* starts, std::size_t n_starts,
                      std::size_t ef, int level, bool live_only, std::int64_t now,
                      scratch_t& s, std::vector<neighbor_t>& out,
                      const std::vector<std::uint8_t>* mask = nullptr,
                      std::size_t sparse_budget = 0,
                      const std::vector<neighbor_t>* resume = nullptr,
                      narrow_t* narrow = nullptr) const;
    void search_level(const float* q, slot_t start, std::size_t ef, int level, bool live_only,
                      std::int64_t now, scratch_t& s, std::vector<neighbor_t>& out,
                      const std::vector<std::uint8_t>* mask = nullptr) const;
    // Up to m of cands (distances to the base node), diverse by the heuristic below.
    void select_heuristic(std::vector<neighbor_t>& cands, std::size_t m, std::int64_t now,
                          bool skip_dead, std::vector<slot_t>& out,
                          std::size_t* distances = nullptr) const;
    // The HNSW heuristic's test (Malkov & Yashunin, Algorithm 4) relaxed by alpha as in
    // Vamana's RobustPrune (Subramanya et al., DiskANN, NeurIPS 2019): candidate c, at
    // distance d from the base, is kept unless a kept node k has alpha * dist(k, c) < d.
    // alpha > 1 keeps some longer links, and with them the way into a small cluster far
    // from the bulk of the data (docs/architecture.md, "Pruning slack").
    bool diverse(slot_t c, float d, const std::vector<slot_t>& kept, float* buf,
                 std::size_t& computed) const;
    void write_links(slot_t id, int level, const slot_t* ids, std::size_t count);
    void link_back(slot_t from, slot_t to, int level, scratch_t& s);
    // Exact k nearest live entries among `slots` (all slots when null).
    void brute_force(const float* q, std::size_t k, std::int64_t now,
                     std::vector<neighbor_t>& out, const std::vector<slot_t>* slots = nullptr) const;
    struct filter_t {
        std::vector<std::uint8_t> mask;  // by slot
        std::vector<slot_t> slots;       // the allowed slots
    };
    void search_one(const float* q, std::size_t k, std::size_t ef, std::int64_t now,
                    scratch_t& s, std::vector<neighbor_t>& out, const filter_t* filter) const;
    // search_one's candidates (sorted, at least k when that many are live), labels unchecked.
    void search_candidates(const float* q, std::size_t k, std::size_t ef, std::int64_t now,
                           scratch_t& s, std::vector<neighbor_t>& out,
                           const filter_t* filter) const;
    // Keeps the first k distinct labels of `out` (sorted: each at its closer slot), dropping
    // later entries of a label already kept; returns how many were dropped. Reads the labels
    // of the answer only (k of them when none repeats).
    std::size_t drop_duplicate_labels(std::vector<neighbor_t>& out, std::size_t k,
                                      scratch_t& s) const;
    std::size_t dead_count(std::int64_t now) const;
    void maybe_auto_consolidate(std::int64_t now, std::size_t incoming, std::size_t threads);
    void publish_label(std::int64_t label, slot_t id);
    slot_t find_label(std::int64_t label) const;
    void free_slot(slot_t id);

    // --- consolidation helpers (consolidate.cpp)
    std::size_t reconnect_unreachable(std::int64_t now, std::size_t& distances);
    std::vector<std::uint8_t> reachable_level0() const;
    // The new list of `node` at level `lvl` from `list` (its links as read): the links not dead
    // stay (dead: by slot, 1 = dead), the dead ones' live neighbours (or theirs) fill in by
    // the heuristic and then up to the old degree, and below M/2 a search of the level from
    // `entry` (packed slot and top level) adds more. Adds the distances it computed.
    std::vector<slot_t> relink(slot_t node, int lvl, const std::vector<slot_t>& list,
                               const std::vector<std::uint8_t>& dead, std::uint64_t entry,
                               std::int64_t now, scratch_t& s, std::size_t& dcount) const;

    // --- parameters
    std::size_t dim_, dim_padded_, M_, M0_, ef_construction_;
    metric_t metric_;
    dtype_t dtype_;
    std::uint64_t seed_;
    double alpha_;
    float prune_scale_ = 1.0f;  // alpha_ as diverse() multiplies a distance by it
    double level_mult_;
    std::size_t vec_offset_, vec_bytes_, stride_;  // vec_bytes_: the stored vector's region
    std::size_t code_words_;  // u32 words of an upper block before its links
    std::size_t sketch_words_;  // u64 words of a sign-bit code: dim_padded_ / 64, rounded up
    const kernels_t* kernels_;
    std::atomic<std::size_t> ef_search_{64};
    std::atomic<double> auto_consolidate_{0.10};
    std::atomic<bool> defer_consolidation_{false}, consolidation_due_{false};
    std::atomic<std::size_t> search_starts_{2};
    std::atomic<std::size_t> rescue_beam_{0};
    std::atomic<float> rescue_distance_{std::numeric_limits<float>::infinity()};

    // --- storage
    std::atomic<chunk_t*>* chunks_ = nullptr;  // max_chunks entries, zeroed_pages
    std::atomic<std::size_t> n_chunks_{0};
    std::atomic<slot_t> n_slots_{0};  // slots ever handed out (the high-water mark)
    std::vector<slot_t> free_slots_;  // a min-heap: low ids are reused first
    mutable std::mutex alloc_mu_;     // guards free_slots_, rng_, chunk growth
    std::mt19937_64 rng_;

    // --- entry point: (slot, level) packed, updated under entry_mu_
    std::atomic<std::uint64_t> entry_{no_entry};
    std::mutex entry_mu_;
    static constexpr std::uint64_t no_entry = std::numeric_limits<std::uint64_t>::max();
    static std::uint64_t pack_entry(slot_t id, int level) {
        return (static_cast<std::uint64_t>(level) << 32) | id;
    }

    // --- labels
    std::unordered_map<std::int64_t, slot_t> label_map_;
    mutable std::mutex label_mu_;
    // The `now` of a running consolidate() (INT64_MIN when none), under label_mu_: touch()
    // must not extend an entry that consolidation has already found dead and will free.
    std::int64_t consolidating_now_ = std::numeric_limits<std::int64_t>::min();
    // At most the expiry of every mapped slot, under label_mu_ (lowered when a slot is
    // mapped or touched, recomputed by size()'s scan): while `now` is below it nothing
    // mapped has expired, so size() is the map's size, not a scan of every entry (a scan
    // per call made the hnswlib face's single knn_query 7.9x hnswlib's at 100k rows:
    // bench/single_calls.py).
    mutable std::int64_t expiry_floor_ = std::numeric_limits<std::int64_t>::max();
    std::atomic<std::int64_t> next_label_{0};

    // --- dead-slot bookkeeping for auto consolidation
    std::atomic<std::size_t> deleted_slots_{0};  // slots tombstoned by delete/upsert
    std::atomic<std::size_t> inserts_since_check_{0};
    // Set by a search that found the graph mostly dead (its walk gave up): the next insert
    // checks at once whether to consolidate, not after 1% more inserts.
    mutable std::atomic<bool> sparse_seen_{false};

    mutable std::shared_mutex graph_mu_;
    // Held shared by add() and exclusively by serialize() (which copies the graph while
    // searches go on, graph_mu_ shared, but no insert changes a link list) and by
    // consolidate() while it takes its dead set and publishes its repairs.
    mutable std::shared_mutex writers_mu_;
    // Insert batches begun (under writers_mu_): consolidate() sees whether any ran while
    // it computed its repairs.
    std::atomic<std::uint64_t> insert_batches_{0};
    // One consolidation at a time (they no longer hold writers_mu_ throughout).
    std::mutex consolidate_mu_;
    // Sketch appends (inserts run in parallel); the codes held, all chunks together.
    std::mutex sketch_mu_;
    std::atomic<std::size_t> sketch_total_{0};
    // Whether sketches are kept: under cosine, from when a rescue is set and the index has
    // M * rescue_beam slots (an index without a rescue, or too small for the scan to be
    // used, pays neither their memory nor their upkeep). Set under graph_mu_ held
    // exclusively, with every upper node's code built, so an insert (graph_mu_ shared) sees
    // one value throughout.
    std::atomic<bool> sketching_{false};
};

}  // namespace hnswcache
