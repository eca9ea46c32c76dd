#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>

namespace hps {
namespace {

int default_threads() {
    unsigned hw = std::thread::hardware_concurrency();
    return static_cast<int>(std::clamp(hw, 1u, 8u));
}

std::atomic<int>& threads_setting() {
    static std::atomic<int> n{default_threads()};
    return n;
}

}  // namespace

int num_threads() { return threads_setting().load(std::memory_order_relaxed); }

void set_num_threads(int n) {
    if (n < 1) throw std::invalid_argument("set_num_threads: n must be >= 1, got " + std::to_string(n));
    threads_setting().store(n, std::memory_order_relaxed);
}

int plan_threads(size_t n) {
    if (n < kParallelMinElems) return 1;
    size_t by_size = n / (kParallelMinElems / 4);
    return static_cast<int>(std::min<size_t>(static_cast<size_t>(num_threads()), by_size));
}

}  // namespace hps
