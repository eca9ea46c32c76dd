// Shared helpers for the hetero_ps kernels: unaligned element access, bit casts and the
// target attributes used by the runtime-dispatched SIMD paths.
//
// Every kernel takes untyped pointers (`const void*`/`void*`) and reads elements with memcpy:
// numpy hands us views that need not be aligned to their element size (np.frombuffer(buf,
// offset=2)), and a `float*` that is not 4-byte aligned lets the compiler's vectoriser emit aligned
// loads after peeling. memcpy of a scalar compiles to one plain load/store.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#define HPS_X86 1
#include <immintrin.h>
// Functions carrying these attributes are only ever called after cpu.h said the CPU has them.
#define HPS_TARGET_SSE42 __attribute__((target("sse4.2")))
#define HPS_TARGET_AVX2 __attribute__((target("avx2,f16c,fma")))
#define HPS_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,f16c,fma")))
#else
#define HPS_X86 0
#endif

#if defined(__GNUC__)
#define HPS_INLINE inline __attribute__((always_inline))
#define HPS_LIKELY(x) __builtin_expect(!!(x), 1)
#define HPS_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define HPS_INLINE inline
#define HPS_LIKELY(x) (x)
#define HPS_UNLIKELY(x) (x)
#endif

namespace hps {

// Element i of an array of T starting at p (any alignment).
template <class T>
HPS_INLINE T ld(const void* p, size_t i) {
    T v;
    std::memcpy(&v, static_cast<const char*>(p) + i * sizeof(T), sizeof(T));
    return v;
}

template <class T>
HPS_INLINE void st(void* p, size_t i, T v) {
    std::memcpy(static_cast<char*>(p) + i * sizeof(T), &v, sizeof(T));
}

HPS_INLINE uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

HPS_INLINE float bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

template <class T>
HPS_INLINE const char* at(const void* p, size_t i) {
    return static_cast<const char*>(p) + i * sizeof(T);
}

template <class T>
HPS_INLINE char* at(void* p, size_t i) {
    return static_cast<char*>(p) + i * sizeof(T);
}

}  // namespace hps
