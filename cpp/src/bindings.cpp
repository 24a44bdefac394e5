// pybind11 only: numpy arrays in (no copy when already C-contiguous float32/int64), the GIL
// released around every call into the core, C++ errors mapped to Python exceptions.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <optional>
#include <memory>
#include <thread>

#include "hnswcache/index.hpp"
#include "hnswcache/kernels.hpp"

namespace py = pybind11;
using hnswcache::index_t;

namespace {

using f32_array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using i64_array = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

// The fork gate. A forked child inherits the index locks as they were, held by threads it
// does not have: a fork while another thread searched left the child's first consolidation
// or save waiting for ever (19 forks in 20 under a searching thread). So os.fork() waits
// until no call into the core is under way, and calls starting meanwhile wait for it to
// end (index.py registers fork_gate_close/open with os.register_at_fork, after Python's own
// gate has drained the long calls). Not pthread_atfork: a subprocess's fork+exec needs no
// such wait. Atomics only: a mutex held at the fork would itself be inherited held.
std::atomic<long> gate_busy{0};
std::atomic<bool> gate_forking{false};

void fork_gate_enter() {
    for (;;) {
        gate_busy.fetch_add(1);  // (seq_cst, as the loads: the fork sees it or it sees the fork)
        if (!gate_forking.load()) return;
        gate_busy.fetch_sub(1);
        while (gate_forking.load()) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
}

void fork_gate_leave() { gate_busy.fetch_sub(1); }

// The GIL released around a call into the core. Python 3.11-3.13 ends a daemon thread
// that asks for the GIL back while the interpreter finalises with pthread_exit, a forced
// unwind: out of pybind11's gil_scoped_release, whose destructor is noexcept, that is
// std::terminate (every exit with a daemon thread searching aborted), and unwinding further
// would drop Python references without the GIL. So the thread stays here instead, holding
// nothing, until the process ends (what Python 3.14 itself does with such threads).
//
// Every such call also passes the fork gate below: a fork waits until none is under way.
class nogil {
public:
    nogil() : state_(PyEval_SaveThread()) { fork_gate_enter(); }
    nogil(const nogil&) = delete;
    nogil& operator=(const nogil&) = delete;
    ~nogil() {
        fork_gate_leave();
        try {
            PyEval_RestoreThread(state_);
        } catch (...) {  // (only the forced unwind: the C API throws nothing else)
            for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
        }
    }

private:
    PyThreadState* state_;
};

// Rows of a 2-D array, or one row of a 1-D array; returns the row count.
std::size_t rows_of(const f32_array& a, std::size_t dim, const char* what) {
    if (a.ndim() != 1 && a.ndim() != 2)
        throw std::invalid_argument(std::string(what) + " must be a 1-D or 2-D array");
    const std::size_t width = a.shape(a.ndim() - 1);
    if (width != dim)
        throw std::invalid_argument(std::string(what) + " have dimension " +
                                    std::to_string(width) + ", the index has " +
                                    std::to_string(dim));
    return a.ndim() == 1 ? 1 : a.shape(0);
}

const std::int64_t* vec_of(const i64_array& a, std::size_t n, const char* what) {
    if (a.ndim() != 1 || static_cast<std::size_t>(a.shape(0)) != n)
        throw std::invalid_argument(std::string(what) + " must be a 1-D array of length " +
                                    std::to_string(n));
    return a.data();
}

py::dict consolidate_dict(const hnswcache::consolidate_report_t& r) {
    py::dict d;
    d["removed"] = r.removed;
    d["repaired"] = r.repaired;
    d["distances"] = r.distances;
    d["reconnected"] = r.reconnected;
    d["seconds"] = r.seconds;
    d["blocked_seconds"] = r.blocked_seconds;
    d["inserts_blocked_seconds"] = r.inserts_blocked_seconds;
    d["merged"] = r.merged;
    d["pruned"] = r.pruned;
    return d;
}

const hnswcache::kernels_t& kernels_named(const std::string& isa) {
    return hnswcache::kernels_for(hnswcache::parse_isa(isa));
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "Native core of hnswcache: a time-aware HNSW index with SIMD kernels.";
    m.def(
        "fork_gate_close",
        [] {
            gate_forking.store(true);
            PyThreadState* st = PyEval_SaveThread();  // (not nogil: that enters the gate)
            while (gate_busy.load() != 0)
                std::this_thread::sleep_for(std::chrono::microseconds(50));
            PyEval_RestoreThread(st);
        },
        "Before os.fork(): wait until no call into the core is under way; calls starting "
        "meanwhile wait for fork_gate_open.");
    m.def(
        "fork_gate_open",
        [](bool child) {
            if (child) gate_busy.store(0);  // (a parent's thread backing off counted itself)
            gate_forking.store(false);
        },
        py::arg("child"), "After os.fork(), in the parent and in the child.");

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const hnswcache::key_error& e) {
            PyErr_SetString(PyExc_KeyError, e.what());
        } catch (const hnswcache::io_error& e) {
            // OSError(errno, strerror, filename) is the errno's subclass (FileNotFoundError,
            // IsADirectoryError, PermissionError...), as Python's own open() raises.
            PyObject* file = e.code != 0 ? PyUnicode_DecodeFSDefaultAndSize(
                                               e.path.data(), static_cast<Py_ssize_t>(e.path.size()))
                                         : nullptr;
            if (file != nullptr) {
                errno = e.code;
                PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, file);
                Py_DECREF(file);
            } else {
                PyErr_Clear();  // (a path that does not decode: the message names it)
                PyErr_SetString(PyExc_OSError, e.what());
            }
        }
    });

    m.def("supported_isas", &hnswcache::supported_isas,
          "Instruction sets compiled in and supported by this CPU.");
    m.def("default_isa", [] { return std::string(hnswcache::default_kernels().name); });
    m.def(
        "kernel_dot",
        [](const std::string& isa, const f32_array& a, const f32_array& b) {
            if (a.ndim() != 1 || b.ndim() != 1 || a.shape(0) != b.shape(0))
                throw std::invalid_argument("a and b must be 1-D arrays of one length");
            return kernels_named(isa).dot(a.data(), b.data(), a.shape(0));
        },
        py::arg("isa"), py::arg("a"), py::arg("b"));
    m.def(
        "kernel_l2sq",
        [](const std::string& isa, const f32_array& a, const f32_array& b) {
            if (a.ndim() != 1 || b.ndim() != 1 || a.shape(0) != b.shape(0))
                throw std::invalid_argument("a and b must be 1-D arrays of one length");
            return kernels_named(isa).l2sq(a.data(), b.data(), a.shape(0));
        },
        py::arg("isa"), py::arg("a"), py::arg("b"));
    m.def(
        "kernel_batch",
        [](const std::string& isa, const std::string& op, const f32_array& q, const f32_array& xs) {
            if (q.ndim() != 1 || xs.ndim() != 2 || xs.shape(1) != q.shape(0))
                throw std::invalid_argument("q must be 1-D and xs 2-D with the same width");
            const auto& k = kernels_named(isa);
            const std::size_t n = xs.shape(0), dim = q.shape(0);
            std::vector<const float*> ptrs(n);
            for (std::size_t i = 0; i < n; ++i) ptrs[i] = xs.data() + i * dim;
            py::array_t<float> out(n);
            if (op == "dot_h" || op == "l2sq_h") {
                // Rows are rounded to float16 first, as the index stores them.
                std::vector<hnswcache::half_t> halves(n * dim);
                k.encode_h(xs.data(), halves.data(), n * dim);
                std::vector<const hnswcache::half_t*> hp(n);
                for (std::size_t i = 0; i < n; ++i) hp[i] = halves.data() + i * dim;
                (op == "dot_h" ? k.dot_batch_h : k.l2sq_batch_h)(q.data(), hp.data(), n, dim,
                                                                 out.mutable_data());
                return out;
            }
            if (op == "dot_b" || op == "l2sq_b") {
                // Rows cut to their bfloat16 high halves first, as the graph walk reads them.
                std::vector<hnswcache::half_t> highs(n * dim);
                hnswcache::half_t low;
                for (std::size_t i = 0; i < n * dim; ++i)
                    hnswcache::split_halves(xs.data()[i], highs[i], low);
                std::vector<const hnswcache::half_t*> hp(n);
                for (std::size_t i = 0; i < n; ++i) hp[i] = highs.data() + i * dim;
                (op == "dot_b" ? k.dot_batch_b : k.l2sq_batch_b)(q.data(), hp.data(), n, dim,
                                                                 out.mutable_data());
                return out;
            }
            auto fn = op == "dot" ? k.dot_batch : op == "l2sq" ? k.l2sq_batch : nullptr;
            if (fn == nullptr)
                throw std::invalid_argument(
                    "op must be 'dot', 'l2sq', 'dot_h', 'l2sq_h', 'dot_b' or 'l2sq_b'");
            fn(q.data(), ptrs.data(), n, dim, out.mutable_data());
            return out;
        },
        py::arg("isa"), py::arg("op"), py::arg("q"), py::arg("xs"));

    m.def(
        "kernel_dot_i8",
        [](const std::string& isa, const f32_array& q,
           const py::array_t<std::int8_t, py::array::c_style | py::array::forcecast>& codes) {
            // <q, codes[i]> for each row of int8 codes (the upper levels' 8-bit copies).
            if (q.ndim() != 1 || codes.ndim() != 2 || codes.shape(1) != q.shape(0))
                throw std::invalid_argument("q must be 1-D and codes 2-D with the same width");
            const std::size_t n = codes.shape(0), dim = q.shape(0);
            std::vector<const std::int8_t*> ptrs(n);
            for (std::size_t i = 0; i < n; ++i) ptrs[i] = codes.data() + i * dim;
            py::array_t<float> out(n);
            kernels_named(isa).dot_batch_i8(q.data(), ptrs.data(), n, dim, out.mutable_data());
            return out;
        },
        py::arg("isa"), py::arg("q"), py::arg("codes"));

    m.def(
        "split_round_trip",
        [](const std::string& isa, const f32_array& x) {
            // float32 -> high and low 16-bit halves -> joined by one kernel set (for the tests).
            const std::size_t n = x.size();
            std::vector<hnswcache::half_t> high(n), low(n);
            for (std::size_t i = 0; i < n; ++i) hnswcache::split_halves(x.data()[i], high[i], low[i]);
            py::array_t<float> out(n);
            kernels_named(isa).join_b(high.data(), low.data(), out.mutable_data(), n);
            return out;
        },
        py::arg("isa"), py::arg("x"));

    m.def(
        "half_round_trip",
        [](const std::string& isa, const f32_array& x) {
            // float32 -> float16 -> float32 through one kernel set (for the tests).
            const auto& k = kernels_named(isa);
            const std::size_t n = x.size();
            std::vector<hnswcache::half_t> h(n);
            k.encode_h(x.data(), h.data(), n);
            py::array_t<float> out(n);
            k.decode_h(h.data(), out.mutable_data(), n);
            return out;
        },
        py::arg("isa"), py::arg("x"));

    m.attr("max_slots") = index_t::max_slots;

    py::class_<index_t>(m, "Index")
        .def(py::init([](std::size_t dim, const std::string& metric, std::size_t M,
                         std::size_t ef_construction, std::size_t capacity, std::uint64_t seed,
                         const std::string& dtype, double alpha) {
                 return std::make_unique<index_t>(dim, hnswcache::parse_metric(metric), M,
                                                  ef_construction, capacity, seed,
                                                  hnswcache::parse_dtype(dtype), alpha);
             }),
             py::arg("dim"), py::arg("metric"), py::arg("M"), py::arg("ef_construction"),
             py::arg("capacity"), py::arg("seed"), py::arg("dtype") = "float32",
             py::arg("alpha") = index_t::default_alpha)
        .def(
            "add",
            [](index_t& self, const f32_array& x, const std::optional<i64_array>& labels,
               const i64_array& expiry, std::int64_t now, std::size_t threads) {
                // Without labels, the running counter's: returned, taken only if the batch
                // is valid.
                const std::size_t n = rows_of(x, self.dim(), "vectors");
                const float* rows = x.data();
                const std::int64_t* exp = vec_of(expiry, n, "expiry");
                if (labels) {
                    const std::int64_t* lab = vec_of(*labels, n, "labels");
                    {
                        nogil release;
                        self.add(rows, n, lab, exp, now, threads);
                    }
                    return *labels;
                }
                std::int64_t first;
                {
                    nogil release;
                    first = self.add_auto(rows, n, exp, now, threads);
                }
                i64_array out(n);
                for (std::size_t i = 0; i < n; ++i)
                    out.mutable_data()[i] = first + static_cast<std::int64_t>(i);
                return out;
            },
            py::arg("vectors"), py::arg("labels"), py::arg("expiry"), py::arg("now"),
            py::arg("num_threads"))
        .def(
            "search",
            [](const index_t& self, const f32_array& q, std::size_t k, std::size_t ef,
               std::int64_t now, std::size_t threads, const std::optional<i64_array>& allowed) {
                const std::size_t n = rows_of(q, self.dim(), "queries");
                const std::int64_t* al = nullptr;
                std::size_t n_al = 0;
                if (allowed) {
                    n_al = allowed->size();
                    al = vec_of(*allowed, n_al, "filter");
                }
                const float* rows = q.data();
                if (k == 0 || k > index_t::max_slots)
                    throw std::invalid_argument("k must be in [1, 2**28]");
                py::array_t<std::int64_t> labels({n, k});
                py::array_t<float> dists({n, k});
                std::int64_t* lp = labels.mutable_data();
                float* dp = dists.mutable_data();
                {
                    nogil release;
                    self.search(rows, n, k, ef, now, threads, lp, dp, al, n_al);
                }
                return py::make_tuple(labels, dists);
            },
            py::arg("queries"), py::arg("k"), py::arg("ef"), py::arg("now"),
            py::arg("num_threads"), py::arg("allowed") = py::none())
        .def(
            "delete",
            [](index_t& self, const i64_array& labels, std::int64_t now) {
                const std::int64_t* lab = vec_of(labels, labels.size(), "labels");
                nogil release;
                return self.remove(lab, labels.size(), now);
            },
            py::arg("labels"), py::arg("now"))
        .def(
            "touch",
            [](index_t& self, const i64_array& labels, const i64_array& expiry, std::int64_t now) {
                const std::size_t n = labels.size();
                const std::int64_t* lab = vec_of(labels, n, "labels");
                const std::int64_t* exp = vec_of(expiry, n, "expiry");
                nogil release;
                return self.touch(lab, exp, n, now);
            },
            py::arg("labels"), py::arg("expiry"), py::arg("now"))
        .def(
            "get",
            [](const index_t& self, const i64_array& labels, std::int64_t now) {
                const std::size_t n = labels.size();
                const std::int64_t* lab = vec_of(labels, n, "labels");
                py::array_t<float> out({n, self.dim()});
                float* op = out.mutable_data();
                {
                    nogil release;
                    self.get(lab, n, now, op);
                }
                return out;
            },
            py::arg("labels"), py::arg("now"))
        .def(
            "expiry",
            [](const index_t& self, const i64_array& labels, std::int64_t now) {
                const std::size_t n = labels.size();
                const std::int64_t* lab = vec_of(labels, n, "labels");
                py::array_t<std::int64_t> out(n);
                std::int64_t* op = out.mutable_data();
                {
                    nogil release;
                    self.expiry_of(lab, n, now, op);
                }
                return out;
            },
            py::arg("labels"), py::arg("now"))
        .def(
            "live_labels",
            [](const index_t& self, std::int64_t now) {
                std::vector<std::int64_t> v;
                {
                    nogil release;
                    v = self.live_labels(now);
                }
                py::array_t<std::int64_t> out(v.size());
                if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * 8);
                return out;
            },
            py::arg("now"))
        .def("contains", &index_t::contains, py::arg("label"), py::arg("now"),
             py::call_guard<nogil>())
        .def("size", &index_t::size, py::arg("now"), py::call_guard<nogil>())
        .def(
            "next_labels",
            [](index_t& self, std::size_t n) {
                const std::int64_t first = self.reserve_labels(n);
                py::array_t<std::int64_t> out(n);
                for (std::size_t i = 0; i < n; ++i) out.mutable_data()[i] = first + i;
                return out;
            },
            py::arg("n"))
        .def(
            "consolidate",
            [](index_t& self, std::int64_t now, std::size_t threads) {
                hnswcache::consolidate_report_t r;
                {
                    nogil release;
                    r = self.consolidate(now, threads);
                }
                return consolidate_dict(r);
            },
            py::arg("now"), py::arg("num_threads"))
        .def(
            "check_integrity",
            [](const index_t& self, std::int64_t now) {
                hnswcache::integrity_report_t r;
                {
                    nogil release;
                    r = self.check_integrity(now);
                }
                py::dict d;
                d["allocated"] = r.allocated;
                d["live"] = r.live;
                d["dead"] = r.dead;
                d["free"] = r.free_slots;
                d["unreachable_live"] = r.unreachable_live;
                d["min_degree0"] = r.min_degree0;
                d["max_degree0"] = r.max_degree0;
                d["mean_degree0"] = r.mean_degree0;
                d["max_level"] = r.max_level;
                return d;
            },
            py::arg("now"))
        .def(
            "stats",
            [](const index_t& self, std::int64_t now) {
                hnswcache::index_stats_t s;
                {
                    nogil release;
                    s = self.stats(now);
                }
                py::dict d;
                d["live"] = s.live;
                d["dead"] = s.dead;
                d["free"] = s.free_slots;
                d["allocated"] = s.allocated;
                d["capacity"] = s.capacity;
                d["max_level"] = s.max_level;
                d["nodes_per_level"] = s.nodes_per_level;
                d["memory_bytes"] = s.memory_bytes;
                d["isa"] = std::string(self.isa());
                d["dim"] = self.dim();
                d["metric"] = std::string(hnswcache::metric_name(self.metric()));
                d["dtype"] = std::string(hnswcache::dtype_name(self.dtype()));
                d["M"] = self.M();
                d["ef_construction"] = self.ef_construction();
                d["alpha"] = self.alpha();
                d["ef_search"] = self.ef_search();
                return d;
            },
            py::arg("now"))
        .def("save", &index_t::save, py::arg("path"), py::call_guard<nogil>())
        .def_static("load", &index_t::load, py::arg("path"),
                    py::call_guard<nogil>())
        .def("to_bytes",
             [](const index_t& self) {
                 std::string s;
                 {
                     nogil release;
                     s = self.serialize();
                 }
                 return py::bytes(s);
             })
        .def_static(
            "from_bytes",
            [](const py::bytes& data) {
                char* buf = nullptr;
                Py_ssize_t len = 0;
                if (PyBytes_AsStringAndSize(data.ptr(), &buf, &len) != 0) throw py::error_already_set();
                nogil release;
                return index_t::deserialize(buf, static_cast<std::size_t>(len));
            },
            py::arg("data"))
        .def_property_readonly("dim", &index_t::dim)
        .def_property_readonly("metric",
                               [](const index_t& s) { return std::string(hnswcache::metric_name(s.metric())); })
        .def_property_readonly("dtype",
                               [](const index_t& s) { return std::string(hnswcache::dtype_name(s.dtype())); })
        .def_property_readonly("M", &index_t::M)
        .def_property_readonly("ef_construction", &index_t::ef_construction)
        .def_property_readonly("alpha", &index_t::alpha)
        .def_property("ef_search", &index_t::ef_search, &index_t::set_ef_search)
        .def_property("auto_consolidate", &index_t::auto_consolidate, &index_t::set_auto_consolidate)
        .def_property("defer_consolidation", &index_t::defer_consolidation,
                      &index_t::set_defer_consolidation)
        .def("take_consolidation_due", &index_t::take_consolidation_due)
        .def_property("search_starts", &index_t::search_starts, &index_t::set_search_starts)
        .def_property("rescue_beam", &index_t::rescue_beam, &index_t::set_rescue_beam)
        .def_property("rescue_distance", &index_t::rescue_distance,
                      &index_t::set_rescue_distance)
        .def_property_readonly("isa", [](const index_t& s) { return std::string(s.isa()); });
}
