#include "hnswcache/thread_pool.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif
#include <thread>
#include <vector>

namespace hnswcache {
namespace {

// Set on pool workers (and on a caller while it works on its own job): work submitted from
// such a thread runs inline, so nested parallel_for calls cannot deadlock.
thread_local bool inside_pool_job = false;

// A job shared by the caller and the helpers it asked for: they pull indices from `next`.
struct job_t {
    std::size_t n;
    const std::function<void(std::size_t)>* fn;
    std::atomic<std::size_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex mu;
    std::condition_variable done_cv;
    std::size_t helpers_left = 0;
    std::exception_ptr error;

    void run() {
        for (;;) {
            if (failed.load(std::memory_order_relaxed)) return;
            const std::size_t i = next.fetch_add(1, std::memory_order_relaxed);
            if (i >= n) return;
            try {
                (*fn)(i);
            } catch (...) {
                std::lock_guard<std::mutex> lock(mu);
                if (!error) error = std::current_exception();
                failed.store(true, std::memory_order_relaxed);
            }
        }
    }
};

class pool_t {
   public:
    explicit pool_t(std::size_t workers) {
        for (std::size_t i = 0; i < workers; ++i) threads_.emplace_back([this] { loop(); });
    }
    ~pool_t() {
        {
            std::lock_guard<std::mutex> lock(mu_);
            stop_ = true;
        }
        cv_.notify_all();
        for (auto& t : threads_) t.join();
    }
    std::size_t size() const { return threads_.size(); }

    void submit(const std::shared_ptr<job_t>& job, std::size_t copies) {
        {
            std::lock_guard<std::mutex> lock(mu_);
            for (std::size_t i = 0; i < copies; ++i) queue_.push_back(job);
        }
        cv_.notify_all();
    }

   private:
    void loop() {
        inside_pool_job = true;
        for (;;) {
            std::shared_ptr<job_t> job;
            {
                std::unique_lock<std::mutex> lock(mu_);
                cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
                if (stop_ && queue_.empty()) return;
                job = std::move(queue_.front());
                queue_.pop_front();
            }
            job->run();
            std::lock_guard<std::mutex> lock(job->mu);
            if (--job->helpers_left == 0) job->done_cv.notify_all();
        }
    }

    std::vector<std::thread> threads_;
    std::deque<std::shared_ptr<job_t>> queue_;
    std::mutex mu_;
    std::condition_variable cv_;
    bool stop_ = false;
};

// Leaked on purpose: joining threads from a static destructor at interpreter exit can
// deadlock, and the OS reclaims them anyway.
std::atomic<pool_t*> the_pool{nullptr};
std::mutex pool_create_mu;

#if defined(__unix__) || defined(__APPLE__)
// A forked child has the pool object but none of its threads (and maybe a held lock): it
// forgets the parent's pool and starts its own on first use.
void forget_pool_in_child() { the_pool.store(nullptr); }
#endif

pool_t& pool() {
    pool_t* p = the_pool.load(std::memory_order_acquire);
    if (p != nullptr) return *p;
    std::lock_guard<std::mutex> lock(pool_create_mu);
    p = the_pool.load(std::memory_order_acquire);
    if (p == nullptr) {
#if defined(__unix__) || defined(__APPLE__)
        static const int registered = pthread_atfork(nullptr, nullptr, forget_pool_in_child);
        (void)registered;
#endif
        p = new pool_t(hardware_threads() > 1 ? hardware_threads() - 1 : 0);
        the_pool.store(p, std::memory_order_release);
    }
    return *p;
}

}  // namespace

std::size_t hardware_threads() {
    const unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : n;
}

void parallel_for(std::size_t n, std::size_t threads, const std::function<void(std::size_t)>& fn) {
    if (n == 0) return;
    if (threads == 0) threads = hardware_threads();
    threads = std::min(threads, n);
    if (threads <= 1 || pool().size() == 0 || inside_pool_job) {
        for (std::size_t i = 0; i < n; ++i) fn(i);
        return;
    }
    auto job = std::make_shared<job_t>();
    job->n = n;
    job->fn = &fn;
    const std::size_t helpers = std::min(threads - 1, pool().size());
    job->helpers_left = helpers;
    pool().submit(job, helpers);
    inside_pool_job = true;
    job->run();
    inside_pool_job = false;
    {
        std::unique_lock<std::mutex> lock(job->mu);
        job->done_cv.wait(lock, [&] { return job->helpers_left == 0; });
    }
    if (job->error) std::rethrow_exception(job->error);
}

}  // namespace hnswcache
