// One persistent pool of worker threads per process: batch calls share it instead of spawning
// threads on every call.
#pragma once

#include <cstddef>
#include <functional>

namespace hnswcache {

// Runs fn(i) for every i in [0, n), spread over up to `threads` threads (0 = all cores) with
// dynamic scheduling; the calling thread takes part. The first exception thrown by fn stops
// the remaining work and is rethrown here.
void parallel_for(std::size_t n, std::size_t threads, const std::function<void(std::size_t)>& fn);

std::size_t hardware_threads();

}  // namespace hnswcache
