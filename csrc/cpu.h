// Which SIMD path the kernels take on this CPU.
//
// The CPU is probed once (the first call to detected_isa()); the active level starts at the best
// level the CPU supports, capped by the environment variable HETERO_PS_ISA if set
// (scalar|sse4.2|avx2|avx512), and can be lowered at run time with set_isa() so tests can exercise
// every path the machine can run. Each kernel family picks its implementation per call from
// active_isa() (one relaxed atomic load).
#pragma once

#include <string>
#include <vector>

namespace hps {

enum class Isa : int {
    scalar = 0,  // portable C++ (the compiler may still vectorise it for the baseline ISA)
    sse42 = 1,   // + hardware crc32 instruction
    avx2 = 2,    // + AVX2, F16C, FMA: 256-bit conversions, accumulate, int8
    avx512 = 3,  // + AVX-512 F/BW/VL: 512-bit versions of the same
};

const char* isa_name(Isa isa);
// Parses a level name; throws std::invalid_argument for an unknown one.
Isa parse_isa(const std::string& name);

// Highest level this CPU (and OS) supports.
Isa detected_isa();
// Level the kernels use now.
Isa active_isa();
// Selects a level; throws std::invalid_argument if the CPU cannot run it. Returns the previous one.
// Meant for tests and benchmarks: do not call it while kernels run on other threads.
Isa set_isa(Isa isa);
// Every level this CPU can run, lowest first.
std::vector<Isa> available_isas();

struct CpuFlags {
    bool sse42 = false, avx2 = false, f16c = false, fma = false;
    bool avx512f = false, avx512bw = false, avx512vl = false;
};
const CpuFlags& cpu_flags();

}  // namespace hps
