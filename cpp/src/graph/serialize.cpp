// The on-disk format, version 2. Little-endian, every section a fixed function of the header:
//
//   "HNSWCACH" | u32 major | u32 minor | u64 header fields (see `header_t`) | f64 alpha
//   levels   u8  [n_slots]           0xff marks a free slot
//   labels   i64 [n_slots]
//   expiry   i64 [n_slots]           absolute, ns; INT64_MIN = deleted
//   links0   u32 [n_slots][1 + M0]   count, then ids
//   vectors  [n_slots] rows as stored (normalised under cosine; dtype in the header):
//            f32[dim] | f16[dim] | int8: f32 scale, i8 code[dim] (|code| <= 127)
//   upper    u32 [sum of levels][1 + M]   per slot in order, levels 1..level
//   crc32    u32                     of everything before it
//
// Version 1 (before 2026-12-05) is the same without alpha: it is read with alpha = 1, the
// pruning it was built with, and an index with alpha = 1 is still written as version 1, so
// that earlier releases read it.
//
// A file is untrusted input: the size must match the header exactly, the checksum must match,
// and then every count, level, link and label is checked before the index is used.
#include <algorithm>
#include <cmath>
#include <cerrno>
#include <cstring>
#include <cstdio>
#include <limits>
#include <mutex>
#include <unordered_set>

#include <sys/stat.h>

#include "graph_internal.hpp"

namespace hnswcache {

namespace {

constexpr char magic[8] = {'H', 'N', 'S', 'W', 'C', 'A', 'C', 'H'};
constexpr std::uint32_t format_major = 2, format_minor = 0;
constexpr std::uint8_t free_level = 0xff;

struct header_t {
    std::uint64_t dim, metric, M, ef_construction, ef_search, seed, n_slots, entry, top_level,
        next_label, upper_words, dtype;
};
constexpr std::size_t header_words = sizeof(header_t) / sizeof(std::uint64_t);
// Bytes before the per-slot sections: version 1 has no alpha.
constexpr std::size_t prefix_bytes_v1 = sizeof(magic) + 2 * sizeof(std::uint32_t) + sizeof(header_t);
constexpr std::size_t prefix_bytes = prefix_bytes_v1 + sizeof(double);

// Bytes of one stored row in the file.
std::uint64_t row_bytes(std::uint64_t dtype, std::uint64_t dim) {
    switch (static_cast<dtype_t>(dtype)) {
        case dtype_t::float16: return 2 * dim;
        case dtype_t::int8: return sizeof(float) + dim;
        case dtype_t::float32: break;
    }
    return 4 * dim;
}

std::uint32_t crc32(const char* data, std::size_t n) {
    // IEEE CRC-32, slicing-by-4 tables built once.
    static const auto tables = [] {
        std::vector<std::uint32_t> t(4 * 256);
        for (std::uint32_t i = 0; i < 256; ++i) {
            std::uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            t[i] = c;
        }
        for (std::uint32_t i = 0; i < 256; ++i)
            for (int s = 1; s < 4; ++s) t[s * 256 + i] = (t[(s - 1) * 256 + i] >> 8) ^ t[t[(s - 1) * 256 + i] & 0xff];
        return t;
    }();
    std::uint32_t c = 0xFFFFFFFFu;
    const auto* p = reinterpret_cast<const unsigned char*>(data);
    while (n >= 4) {
        c ^= static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
             (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
        c = tables[3 * 256 + (c & 0xff)] ^ tables[2 * 256 + ((c >> 8) & 0xff)] ^
            tables[256 + ((c >> 16) & 0xff)] ^ tables[c >> 24];
        p += 4;
        n -= 4;
    }
    while (n--) c = tables[(c ^ *p++) & 0xff] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

class writer_t {
   public:
    // Sized, and its pages touched, up front: the caller does this before taking the lock
    // (page faults on a fresh 50 MB buffer were most of the time searches waited).
    explicit writer_t(std::size_t size) : buf_(size, '\0') {}
    template <class T>
    void put(const T& v) { append(&v, sizeof(T)); }
    void append(const void* p, std::size_t n) {
        if (n == 0) return;
        if (pos_ + n > buf_.size()) buf_.resize(std::max(pos_ + n, buf_.size() + buf_.size() / 2));
        std::memcpy(buf_.data() + pos_, p, n);
        pos_ += n;
    }
    const char* data() const { return buf_.data(); }
    std::size_t size() const { return pos_; }
    std::string take() {
        buf_.resize(pos_);
        return std::move(buf_);
    }

   private:
    std::string buf_;
    std::size_t pos_ = 0;
};

class reader_t {
   public:
    reader_t(const char* p, std::size_t n) : p_(p), n_(n) {}
    template <class T>
    T get() {
        T v;
        take(&v, sizeof(T));
        return v;
    }
    void take(void* out, std::size_t bytes) {
        if (bytes == 0) return;  // out may be the null data() of an empty vector
        if (bytes > n_ - off_) throw format_error("index data is truncated");
        std::memcpy(out, p_ + off_, bytes);
        off_ += bytes;
    }

   private:
    const char* p_;
    std::size_t n_, off_ = 0;
};

// a * b + c, refusing anything that would overflow 64 bits.
std::uint64_t checked_mul_add(std::uint64_t a, std::uint64_t b, std::uint64_t c) {
    if (b != 0 && a > (UINT64_MAX - c) / b) throw format_error("index header sizes overflow");
    return a * b + c;
}

// What the bytes before the per-slot sections say: enough to know the file's size.
struct prefix_t {
    header_t h;
    std::uint32_t major;
    double alpha;
    std::size_t bytes;     // of the prefix
    std::uint64_t total;   // the whole file's size, as the header implies it
};

// Reads and checks the prefix (magic, version, header, alpha) from the first `n` bytes of a
// file (n may be less than the file: load() reads the prefix alone first).
prefix_t read_prefix(const char* data, std::size_t n) {
    if (n < prefix_bytes_v1 + 4 || std::memcmp(data, magic, sizeof(magic)) != 0)
        throw format_error("not an hnswcache index (bad magic or too short)");
    reader_t r(data + sizeof(magic), n - sizeof(magic));
    prefix_t p{};
    p.major = r.get<std::uint32_t>();
    const auto minor = r.get<std::uint32_t>();
    if (p.major != format_major && p.major != 1)
        throw format_error("index format version " + std::to_string(p.major) + "." +
                           std::to_string(minor) + " is not supported (this build reads 1.x and " +
                           std::to_string(format_major) + ".x)");
    p.h = r.get<header_t>();
    static_assert(header_words == 12, "header layout changed: bump the format version");
    p.alpha = p.major == 1 ? 1.0 : r.get<double>();
    if (!(p.alpha >= index_t::min_alpha && p.alpha <= index_t::max_alpha))
        throw format_error("index header holds out-of-range parameters");
    p.bytes = p.major == 1 ? prefix_bytes_v1 : prefix_bytes;
    const header_t& h = p.h;
    if (h.dim == 0 || h.dim > 65536 || h.M < 2 || h.M > 2048 || h.metric > 2 ||
        h.ef_construction == 0 || h.ef_search == 0 || h.ef_construction > max_ef ||
        h.ef_search > max_ef || h.n_slots > index_t::max_slots ||
        h.top_level >= max_levels || h.dtype > 2)
        throw format_error("index header holds out-of-range parameters");
    const std::uint64_t per_slot = 1 + 8 + 8 + 4 * (1 + 2 * h.M) + row_bytes(h.dtype, h.dim);
    p.total = checked_mul_add(h.upper_words, 4, checked_mul_add(h.n_slots, per_slot, p.bytes + 4));
    return p;
}

std::string size_mismatch(std::uint64_t size, std::uint64_t expected) {
    return "index data has " + std::to_string(size) + " bytes, its header says " +
           std::to_string(expected) + " (truncated or corrupted)";
}

}  // namespace

std::string index_t::serialize() const {
    // Links, levels, labels and vectors change only under inserts and consolidation, which
    // hold writers_mu_: holding it (and graph_mu_ shared) keeps them still while searches,
    // deletes and touches go on (an expiry is one atomic word: each is saved as it was at
    // some instant of the copy). The buffer is sized and touched before, and the checksum
    // computed after, so the writers wait for the copy alone.
    const std::size_t row = row_bytes(static_cast<std::uint64_t>(dtype_), dim_);
    auto upper_words = [this](slot_t n) {
        std::uint64_t words = 0;
        for (slot_t id = 0; id < n; ++id)
            if (state(id) == state_ready) words += static_cast<std::uint64_t>(level(id)) * (1 + M_);
        return words;
    };
    auto bytes = [&](slot_t n, std::uint64_t upper) {
        return prefix_bytes + n * (1 + 16 + 4 * (1 + M0_) + row) + upper * 4 + 4;
    };
    std::size_t estimate;
    {
        std::shared_lock<std::shared_mutex> shared(graph_mu_);
        const slot_t n = n_slots();
        estimate = bytes(n, upper_words(n));  // (an estimate: inserts may go on)
    }
    writer_t copy = [&] {
        writer_t w(estimate + estimate / 64);  // (room for inserts made meanwhile)
        std::unique_lock<std::shared_mutex> no_writers(writers_mu_);
        std::shared_lock<std::shared_mutex> shared(graph_mu_);
        const slot_t n = n_slots();
        header_t h{};
        h.dim = dim_;
        h.metric = static_cast<std::uint64_t>(metric_);
        h.M = M_;
        h.ef_construction = ef_construction_;
        h.ef_search = ef_search();
        h.seed = seed_;
        h.n_slots = n;
        const std::uint64_t ep = entry_.load();
        h.entry = ep == no_entry ? UINT64_MAX : (ep & 0xffffffffu);
        h.top_level = ep == no_entry ? 0 : (ep >> 32);
        h.next_label = static_cast<std::uint64_t>(next_label_.load());
        h.dtype = static_cast<std::uint64_t>(dtype_);
        h.upper_words = upper_words(n);
        const bool v1 = alpha_ == 1.0;
        w.append(magic, sizeof(magic));
        w.put<std::uint32_t>(v1 ? 1 : format_major);
        w.put(format_minor);
        w.put(h);
        if (!v1) w.put(alpha_);
        for (slot_t id = 0; id < n; ++id)
            w.put<std::uint8_t>(state(id) == state_ready ? static_cast<std::uint8_t>(level(id)) : free_level);
        for (slot_t id = 0; id < n; ++id) w.put<std::int64_t>(state(id) == state_ready ? label(id) : -1);
        for (slot_t id = 0; id < n; ++id) w.put<std::int64_t>(expiry(id));
        // A free slot is written as zeros: its record may hold whatever was there before (a
        // loaded index never writes free records), and the loader refuses a free slot with links.
        // One append per link list, not per word: the copy is what searches wait for.
        std::vector<std::uint32_t> list(1 + std::max(M0_, M_));
        auto put_links = [&](const std::uint32_t* l, std::uint32_t cnt, std::size_t cap) {
            list[0] = cnt;
            for (std::size_t i = 0; i < cap; ++i) list[1 + i] = i < cnt ? atomic_load_u32(l + 1 + i) : 0;
            w.append(list.data(), (1 + cap) * sizeof(std::uint32_t));
        };
        for (slot_t id = 0; id < n; ++id) {
            const std::uint32_t* l = links(id, 0);
            const bool ready = state(id) == state_ready;
            put_links(l, ready ? atomic_load_u32(l) : 0, M0_);
        }
        // float32 is written whole (the same format as ever): the two halves joined.
        std::vector<float> buf(dim_padded_);
        const std::vector<char> zeros(row_bytes(static_cast<std::uint64_t>(dtype_), dim_), 0);
        for (slot_t id = 0; id < n; ++id) {
            if (state(id) != state_ready)
                w.append(zeros.data(), zeros.size());
            else if (dtype_ == dtype_t::float32)
                w.append(reinterpret_cast<const char*>(decoded(id, buf.data())), dim_ * 4);
            else if (dtype_ == dtype_t::float16)
                w.append(raw(id), dim_ * 2);
            else {  // int8: the scale, then the codes (norm2 is derived from them on load)
                w.append(raw(id), sizeof(float));
                w.append(raw(id) + i8_row_header, dim_);
            }
        }
        for (slot_t id = 0; id < n; ++id) {
            if (state(id) != state_ready) continue;
            for (int l = 1; l <= level(id); ++l) {
                const std::uint32_t* lk = links(id, l);
                put_links(lk, atomic_load_u32(lk), M_);
            }
        }
        return w;
    }();
    const std::uint32_t crc = crc32(copy.data(), copy.size());
    copy.put(crc);
    return copy.take();
}

std::unique_ptr<index_t> index_t::deserialize(const char* data, std::size_t size) {
    const prefix_t p = read_prefix(data, size);
    const header_t& h = p.h;
    if (p.total != size) throw format_error(size_mismatch(size, p.total));
    std::uint32_t stored_crc;
    std::memcpy(&stored_crc, data + size - 4, 4);
    if (crc32(data, size - 4) != stored_crc) throw format_error("index checksum mismatch (corrupted data)");
    reader_t r(data + p.bytes, size - p.bytes);
    const std::uint64_t M0 = 2 * h.M;
    const std::uint64_t per_row = row_bytes(h.dtype, h.dim);

    auto idx = std::make_unique<index_t>(h.dim, static_cast<metric_t>(h.metric), h.M,
                                         h.ef_construction, 0, h.seed,
                                         static_cast<dtype_t>(h.dtype), p.alpha);
    idx->ef_search_.store(h.ef_search);
    const slot_t n = static_cast<slot_t>(h.n_slots);
    std::vector<std::uint8_t> levels(n);
    r.take(levels.data(), n);
    std::vector<std::int64_t> labels(n), expiries(n);
    r.take(labels.data(), n * 8ull);
    r.take(expiries.data(), n * 8ull);

    std::uint64_t upper_needed = 0;
    for (slot_t id = 0; id < n; ++id) {
        if (levels[id] == free_level) continue;
        if (levels[id] > h.top_level) throw format_error("a node's level is above the top level");
        upper_needed += static_cast<std::uint64_t>(levels[id]) * (1 + h.M);
    }
    if (upper_needed != h.upper_words) throw format_error("upper link section size does not match the levels");
    if (n > 0) idx->ensure_chunk((n - 1) >> chunk_bits);
    idx->n_slots_.store(n);

    std::vector<std::uint32_t> in_list(n, 0);  // stamp of the last list that linked to a slot
    std::uint32_t stamp = 0;
    auto check_links = [&](slot_t id, int lvl, const std::uint32_t* lk, std::size_t cap) {
        if (lk[0] > cap) throw format_error("slot " + std::to_string(id) + " has too many links");
        if (++stamp == 0) {
            std::fill(in_list.begin(), in_list.end(), 0);
            stamp = 1;
        }
        for (std::uint32_t i = 0; i < lk[0]; ++i) {
            const std::uint32_t v = lk[1 + i];
            if (v >= n || levels[v] == free_level || v == id || levels[v] < lvl)
                throw format_error("slot " + std::to_string(id) + " has an invalid link");
            if (in_list[v] == stamp)
                throw format_error("slot " + std::to_string(id) + " links to one node twice");
            in_list[v] = stamp;
        }
    };

    std::vector<std::uint32_t> buf(1 + M0);
    for (slot_t id = 0; id < n; ++id) {
        r.take(buf.data(), buf.size() * 4);
        if (levels[id] == free_level) {
            if (buf[0] != 0) throw format_error("a free slot has links");
            std::memset(idx->record(id), 0, idx->stride_);  // never left as raw heap memory
            continue;
        }
        check_links(id, 0, buf.data(), M0);
        std::memcpy(idx->record(id), buf.data(), buf.size() * 4);
    }
    const dtype_t dt = static_cast<dtype_t>(h.dtype);
    std::vector<char> row(std::max<std::size_t>(idx->dim_padded_ * 4, per_row), 0);
    std::vector<float> values(idx->dim_padded_);
    // Every row is checked as add() checks what it stores (index_t::row_problem): a file with
    // a valid checksum could otherwise hold rows whose distances are NaN (ip, l2) or outside
    // [0, 2] (cosine: a row that is not a unit vector).
    auto refuse = [](slot_t id, const char* problem) {
        throw format_error("the stored vector of slot " + std::to_string(id) + " " + problem);
    };
    for (slot_t id = 0; id < n; ++id) {
        r.take(row.data(), per_row);
        if (levels[id] == free_level) continue;
        if (dt == dtype_t::int8) {
            // Rebuilt through the decoder so that norm2 is what the codes say.
            float scale, norm2;
            std::memcpy(&scale, row.data(), sizeof scale);
            const auto* code = reinterpret_cast<const std::int8_t*>(row.data() + sizeof(float));
            if (const char* problem = idx->i8_row_problem(scale, code, norm2)) refuse(id, problem);
            char* dst = idx->record(id) + idx->vec_offset_;
            std::memcpy(dst, &scale, sizeof scale);
            std::memcpy(dst + sizeof scale, &norm2, sizeof norm2);
            std::memcpy(dst + i8_row_header, code, h.dim);
            std::memset(dst + i8_row_header + h.dim, 0, idx->dim_padded_ - h.dim);
            continue;
        }
        const std::uint64_t elem = dt == dtype_t::float16 ? 2 : 4;
        if (elem == 4) {
            std::memcpy(values.data(), row.data(), idx->dim_padded_ * 4);
        } else {
            std::vector<half_t> halves(idx->dim_padded_);
            std::memcpy(halves.data(), row.data(), idx->dim_padded_ * 2);
            idx->kernels_->decode_h(halves.data(), values.data(), idx->dim_padded_);
        }
        if (const char* problem = idx->row_problem(values.data(), true)) refuse(id, problem);
        if (elem == 4)
            idx->store_vector(id, values.data());
        else
            std::memcpy(idx->record(id) + idx->vec_offset_, row.data(), idx->dim_padded_ * elem);
    }
    std::unordered_set<std::int64_t> seen;
    std::int64_t top_label = -1;
    for (slot_t id = 0; id < n; ++id) {
        chunk_t& ch = idx->chunk(id);
        const std::size_t off = id & (chunk_size - 1);
        if (levels[id] == free_level) {
            idx->set_expiry(id, deleted_mark);
            idx->free_slots_.push_back(id);
            continue;
        }
        ch.level[off] = levels[id];
        ch.label[off] = labels[id];
        idx->set_expiry(id, expiries[id]);
        if (levels[id] > 0) {
            // The 8-bit copy is not stored: it is derived from the vector, read above.
            const std::size_t words = static_cast<std::size_t>(levels[id]) * (1 + h.M);
            idx->alloc_upper(id, levels[id]);
            r.take(idx->links(id, 1), words * 4);
            for (int l = 1; l <= levels[id]; ++l) check_links(id, l, idx->links(id, l), h.M);
        }
        ch.state[off].store(state_ready);
        if (expiries[id] == deleted_mark) {
            idx->deleted_slots_.fetch_add(1);
            continue;
        }
        if (labels[id] < 0 || labels[id] == max_label + 1 || !seen.insert(labels[id]).second)
            throw format_error("a label is out of range or appears twice");
        idx->label_map_.emplace(labels[id], id);
        idx->expiry_floor_ = std::min(idx->expiry_floor_, expiries[id]);
        top_label = std::max(top_label, labels[id]);
    }
    std::make_heap(idx->free_slots_.begin(), idx->free_slots_.end(), std::greater<slot_t>());
    if (h.entry == UINT64_MAX) {
        if (n != idx->free_slots_.size()) throw format_error("nodes exist but there is no entry point");
    } else {
        if (h.entry >= n || levels[h.entry] == free_level || levels[h.entry] != h.top_level)
            throw format_error("the entry point is invalid");
        idx->entry_.store(pack_entry(static_cast<slot_t>(h.entry), static_cast<int>(h.top_level)));
    }
    if (h.next_label > static_cast<std::uint64_t>(max_label) + 1)
        throw format_error("label counter out of range");
    // Automatic labels must never land on a stored one, whatever the file's counter says.
    idx->next_label_.store(std::max(static_cast<std::int64_t>(h.next_label), top_label + 1));
    return idx;
}

namespace {
struct file_closer {
    void operator()(std::FILE* f) const { std::fclose(f); }
};
using file_ptr = std::unique_ptr<std::FILE, file_closer>;

// Reads up to n bytes; fewer only at the end of the file. A read error is an io_error.
std::size_t read_some(std::FILE* f, char* out, std::size_t n, const std::string& path) {
    const std::size_t got = std::fread(out, 1, n, f);
    if (got < n && std::ferror(f)) {
        const int code = errno;
        throw io_error("cannot read '" + path + "': " + std::strerror(code), code, path);
    }
    return got;
}
}  // namespace

void index_t::save(const std::string& path) const {
    const std::string data = serialize();
    errno = 0;
    file_ptr out(std::fopen(path.c_str(), "wb"));
    if (!out) {
        const int code = errno;
        throw io_error("cannot open '" + path + "' for writing: " + std::strerror(code), code, path);
    }
    int code = 0;  // the first error's errno
    if (std::fwrite(data.data(), 1, data.size(), out.get()) != data.size() ||
        std::fflush(out.get()) != 0)
        code = errno != 0 ? errno : EIO;
    if (std::fclose(out.release()) != 0 && code == 0) code = errno != 0 ? errno : EIO;
    if (code != 0) throw io_error("cannot write '" + path + "': " + std::strerror(code), code, path);
}

std::unique_ptr<index_t> index_t::load(const std::string& path) {
    // The header first: a foreign, truncated or padded file is refused before its bytes are
    // read (a 1 GiB file that was not an index took 7.6 s and 1.9 GiB to be refused).
    errno = 0;
    file_ptr in(std::fopen(path.c_str(), "rb"));
    if (!in) {
        const int code = errno;
        throw io_error("cannot open '" + path + "': " + std::strerror(code), code, path);
    }
    struct stat st {};
    if (fstat(fileno(in.get()), &st) != 0) {
        const int code = errno;
        throw io_error("cannot read '" + path + "': " + std::strerror(code), code, path);
    }
    if (S_ISDIR(st.st_mode))
        throw io_error("cannot read '" + path + "': " + std::strerror(EISDIR), EISDIR, path);
    // st_size is known for a regular file only (not for a pipe): then it is checked first.
    const bool regular = S_ISREG(st.st_mode);
    char head[prefix_bytes];
    const std::size_t got = read_some(in.get(), head, sizeof head, path);
    const prefix_t p = read_prefix(head, got);
    if (regular && static_cast<std::uint64_t>(st.st_size) != p.total)
        throw format_error(size_mismatch(static_cast<std::uint64_t>(st.st_size), p.total));
    if (p.total > std::numeric_limits<std::size_t>::max())
        throw format_error("index header sizes overflow");
    const std::size_t total = static_cast<std::size_t>(p.total);
    if (got > total) throw format_error(size_mismatch(got, p.total));  // (shorter than a prefix)
    // Read exactly what the header says (in steps for a pipe, whose length is not known), then
    // make sure nothing follows.
    std::vector<char> data;
    data.reserve(regular ? total : std::min<std::size_t>(total, std::size_t{64} << 20));
    data.assign(head, head + got);
    while (data.size() < total) {
        const std::size_t step = std::min<std::size_t>(total - data.size(), std::size_t{64} << 20);
        const std::size_t at = data.size();
        data.resize(at + step);
        const std::size_t n = read_some(in.get(), data.data() + at, step, path);
        data.resize(at + n);
        if (n < step) throw format_error(size_mismatch(data.size(), p.total));
    }
    char extra;
    if (read_some(in.get(), &extra, 1, path) != 0)
        throw format_error("index data is longer than its header says (corrupted)");
    return deserialize(data.data(), data.size());
}

}  // namespace hnswcache
