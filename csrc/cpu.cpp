#include "cpu.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "common.h"

namespace hps {
namespace {

CpuFlags probe() {
    CpuFlags f;
#if HPS_X86 && defined(__GNUC__)
    // __builtin_cpu_supports also checks that the OS saves the YMM/ZMM state (XCR0).
    __builtin_cpu_init();
    f.sse42 = __builtin_cpu_supports("sse4.2");
    f.avx2 = __builtin_cpu_supports("avx2");
    f.f16c = __builtin_cpu_supports("f16c");
    f.fma = __builtin_cpu_supports("fma");
    f.avx512f = __builtin_cpu_supports("avx512f");
    f.avx512bw = __builtin_cpu_supports("avx512bw");
    f.avx512vl = __builtin_cpu_supports("avx512vl");
#endif
    return f;
}

Isa best_of(const CpuFlags& f) {
    if (!f.sse42) return Isa::scalar;
    if (!(f.avx2 && f.f16c && f.fma)) return Isa::sse42;
    if (!(f.avx512f && f.avx512bw && f.avx512vl)) return Isa::avx2;
    return Isa::avx512;
}

Isa initial_isa() {
    Isa best = detected_isa();
    if (const char* env = std::getenv("HETERO_PS_ISA")) {
        if (*env) {
            Isa cap = parse_isa(env);  // an unknown name fails the import loudly
            if (static_cast<int>(cap) < static_cast<int>(best)) best = cap;
        }
    }
    return best;
}

std::atomic<int>& active() {
    static std::atomic<int> level{static_cast<int>(initial_isa())};
    return level;
}

}  // namespace

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::scalar: return "scalar";
        case Isa::sse42: return "sse4.2";
        case Isa::avx2: return "avx2";
        case Isa::avx512: return "avx512";
    }
    return "?";
}

Isa parse_isa(const std::string& name) {
    for (Isa i : {Isa::scalar, Isa::sse42, Isa::avx2, Isa::avx512})
        if (name == isa_name(i)) return i;
    throw std::invalid_argument("unknown ISA level '" + name + "' (expected scalar, sse4.2, avx2 or avx512)");
}

const CpuFlags& cpu_flags() {
    static const CpuFlags flags = probe();
    return flags;
}

Isa detected_isa() {
    static const Isa best = best_of(cpu_flags());
    return best;
}

Isa active_isa() { return static_cast<Isa>(active().load(std::memory_order_relaxed)); }

Isa set_isa(Isa isa) {
    if (static_cast<int>(isa) > static_cast<int>(detected_isa()))
        throw std::invalid_argument(std::string("this CPU cannot run the ") + isa_name(isa) +
                                    " kernels (best: " + isa_name(detected_isa()) + ")");
    return static_cast<Isa>(active().exchange(static_cast<int>(isa)));
}

std::vector<Isa> available_isas() {
    std::vector<Isa> out;
    for (int i = 0; i <= static_cast<int>(detected_isa()); ++i) out.push_back(static_cast<Isa>(i));
    return out;
}

}  // namespace hps
