// A tiny fork-join helper: split [0, n) into contiguous ranges, one per thread.
//
// No OpenMP on purpose: its runtime and torch's fight over threads. Threads are started per call;
// that costs tens of microseconds, so work is only split when it is large enough
// (kParallelMinElems elements) for that to vanish against the kernel itself.
#pragma once

#include <cstddef>
#include <exception>
#include <thread>
#include <vector>

namespace hps {

// Below this many elements a kernel runs on the calling thread.
constexpr size_t kParallelMinElems = size_t(1) << 20;

// Threads the kernels may use (>= 1). Default min(hardware_concurrency, 8).
int num_threads();
// Throws std::invalid_argument if n < 1.
void set_num_threads(int n);

// How many threads a kernel over n elements uses: 1 below kParallelMinElems, otherwise
// num_threads(), but never so many that a range gets fewer than kParallelMinElems / 4 elements.
int plan_threads(size_t n);

// Start of range t when [0, n) is cut into `parts` ranges whose boundaries are multiples of `align`
// (the last range takes the remainder).
inline size_t range_begin(size_t n, int parts, int t, size_t align) {
    if (t <= 0) return 0;
    if (t >= parts) return n;
    size_t units = (n + align - 1) / align;
    size_t b = units * static_cast<size_t>(t) / static_cast<size_t>(parts) * align;
    return b < n ? b : n;
}

// Calls fn(begin, end, t) for t in [0, parts) on `parts` threads (the caller runs t = 0) and waits
// for all. An exception thrown by any call is re-thrown here after every thread has finished.
template <class F>
void run_parts(size_t n, int parts, size_t align, F&& fn) {
    if (parts <= 1) {
        fn(size_t(0), n, 0);
        return;
    }
    std::vector<std::exception_ptr> errors(static_cast<size_t>(parts));
    std::vector<std::thread> threads;
    threads.reserve(static_cast<size_t>(parts - 1));
    auto body = [&](int t) {
        try {
            fn(range_begin(n, parts, t, align), range_begin(n, parts, t + 1, align), t);
        } catch (...) {
            errors[static_cast<size_t>(t)] = std::current_exception();
        }
    };
    int started = 1;
    try {
        for (; started < parts; ++started) threads.emplace_back(body, started);
    } catch (...) {
        // Could not start a thread (resource limits): do its share here instead.
    }
    body(0);
    for (int t = started; t < parts; ++t) body(t);
    for (auto& th : threads) th.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
}

// run_parts with the plan_threads(n) split.
template <class F>
void parallel_for(size_t n, size_t align, F&& fn) {
    run_parts(n, plan_threads(n), align, static_cast<F&&>(fn));
}

}  // namespace hps
