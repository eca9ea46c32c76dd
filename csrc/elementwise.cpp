// Element-wise kernels: widen/narrow between float32 and binary16/bfloat16, and the weighted
// accumulate acc += w * g for float32/binary16/bfloat16 gradients.
//
// Each kernel exists three times: portable scalar C++, AVX2+F16C and AVX-512, all with the same
// results bit for bit (the SIMD versions do the scalar tail with the scalar code). The float maths
// is one multiply then one add, never a fused multiply-add, so numpy reproduces it exactly.
#include <cstdint>

#include "common.h"
#include "cpu.h"
#include "half.h"
#include "kernels.h"
#include "parallel.h"

namespace hps {
namespace {

// Kernels work on [b, e) so that parallel_for can hand each thread its own range.
using WaccFn = void (*)(void* acc, const void* g, float w, size_t b, size_t e);
using ConvFn = void (*)(const void* src, void* dst, size_t b, size_t e);

// ---------------------------------------------------------------- scalar
template <GradType G>
HPS_INLINE float load_g(const void* g, size_t i) {
    if constexpr (G == GradType::f32) return ld<float>(g, i);
    else if constexpr (G == GradType::f16) return f16_to_f32(ld<uint16_t>(g, i));
    else return bf16_to_f32(ld<uint16_t>(g, i));
}

template <GradType G>
HPS_INLINE void wacc_tail(void* acc, const void* g, float w, size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) st<float>(acc, i, ld<float>(acc, i) + w * load_g<G>(g, i));
}

template <GradType G>
void wacc_scalar(void* acc, const void* g, float w, size_t b, size_t e) {
    wacc_tail<G>(acc, g, w, b, e);
}

void f32_to_f16_scalar(const void* s, void* d, size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) st<uint16_t>(d, i, f32_to_f16_bits(ld<uint32_t>(s, i)));
}
void f16_to_f32_scalar(const void* s, void* d, size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) st<uint32_t>(d, i, f16_to_f32_bits(ld<uint16_t>(s, i)));
}
void f32_to_bf16_scalar(const void* s, void* d, size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) st<uint16_t>(d, i, f32_to_bf16_bits(ld<uint32_t>(s, i)));
}
void bf16_to_f32_scalar(const void* s, void* d, size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) st<uint32_t>(d, i, bf16_to_f32_bits(ld<uint16_t>(s, i)));
}

#if HPS_X86
// ---------------------------------------------------------------- AVX2 + F16C
// bfloat16 bits (zero-extended to 32-bit lanes) -> float32, NaNs made quiet.
HPS_TARGET_AVX2 HPS_INLINE __m256 avx2_bf16_widen(__m128i h) {
    __m256i v = _mm256_cvtepu16_epi32(h);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0x7FFF)), _mm256_set1_epi32(0x7F80));
    v = _mm256_or_si256(v, _mm256_and_si256(nan, _mm256_set1_epi32(0x40)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

// float32 bits -> bfloat16 bits in the low half of each 32-bit lane.
HPS_TARGET_AVX2 HPS_INLINE __m256i avx2_bf16_round(__m256i u) {
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    const __m256i nan =
        _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
    const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(r, qnan, nan);
}

template <GradType G>
HPS_TARGET_AVX2 HPS_INLINE __m256 avx2_load8(const void* g, size_t i) {
    if constexpr (G == GradType::f32) {
        return _mm256_loadu_ps(reinterpret_cast<const float*>(at<float>(g, i)));
    } else {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at<uint16_t>(g, i)));
        if constexpr (G == GradType::f16) return _mm256_cvtph_ps(h);
        else return avx2_bf16_widen(h);
    }
}

template <GradType G>
HPS_TARGET_AVX2 void wacc_avx2(void* acc, const void* g, float w, size_t b, size_t e) {
    const __m256 wv = _mm256_set1_ps(w);
    size_t i = b;
    for (; i + 16 <= e; i += 16) {
        float* a = reinterpret_cast<float*>(at<float>(acc, i));
        const __m256 g0 = avx2_load8<G>(g, i), g1 = avx2_load8<G>(g, i + 8);
        const __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8);
        _mm256_storeu_ps(a, _mm256_add_ps(a0, _mm256_mul_ps(wv, g0)));
        _mm256_storeu_ps(a + 8, _mm256_add_ps(a1, _mm256_mul_ps(wv, g1)));
    }
    for (; i + 8 <= e; i += 8) {
        float* a = reinterpret_cast<float*>(at<float>(acc, i));
        _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), _mm256_mul_ps(wv, avx2_load8<G>(g, i))));
    }
    wacc_tail<G>(acc, g, w, i, e);
}

HPS_TARGET_AVX2 void f32_to_f16_avx2(const void* s, void* d, size_t b, size_t e) {
    size_t i = b;
    for (; i + 16 <= e; i += 16) {
        const float* p = reinterpret_cast<const float*>(at<float>(s, i));
        __m128i* q = reinterpret_cast<__m128i*>(at<uint16_t>(d, i));
        _mm_storeu_si128(q, _mm256_cvtps_ph(_mm256_loadu_ps(p), _MM_FROUND_TO_NEAREST_INT));
        _mm_storeu_si128(q + 1, _mm256_cvtps_ph(_mm256_loadu_ps(p + 8), _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i + 8 <= e; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(at<uint16_t>(d, i)),
                         _mm256_cvtps_ph(_mm256_loadu_ps(reinterpret_cast<const float*>(at<float>(s, i))),
                                         _MM_FROUND_TO_NEAREST_INT));
    f32_to_f16_scalar(s, d, i, e);
}

HPS_TARGET_AVX2 void f16_to_f32_avx2(const void* s, void* d, size_t b, size_t e) {
    size_t i = b;
    for (; i + 16 <= e; i += 16) {
        const __m128i* p = reinterpret_cast<const __m128i*>(at<uint16_t>(s, i));
        float* q = reinterpret_cast<float*>(at<float>(d, i));
        _mm256_storeu_ps(q, _mm256_cvtph_ps(_mm_loadu_si128(p)));
        _mm256_storeu_ps(q + 8, _mm256_cvtph_ps(_mm_loadu_si128(p + 1)));
    }
    for (; i + 8 <= e; i += 8)
        _mm256_storeu_ps(reinterpret_cast<float*>(at<float>(d, i)),
                         _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at<uint16_t>(s, i)))));
    f16_to_f32_scalar(s, d, i, e);
}

HPS_TARGET_AVX2 void f32_to_bf16_avx2(const void* s, void* d, size_t b, size_t e) {
    size_t i = b;
    for (; i + 16 <= e; i += 16) {
        const __m256i* p = reinterpret_cast<const __m256i*>(at<float>(s, i));
        const __m256i r0 = avx2_bf16_round(_mm256_loadu_si256(p));
        const __m256i r1 = avx2_bf16_round(_mm256_loadu_si256(p + 1));
        // packus works per 128-bit lane: [r0 lo, r1 lo, r0 hi, r1 hi] -> reorder the 64-bit quarters.
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r0, r1), _MM_SHUFFLE(3, 1, 2, 0));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(at<uint16_t>(d, i)), packed);
    }
    f32_to_bf16_scalar(s, d, i, e);
}

HPS_TARGET_AVX2 void bf16_to_f32_avx2(const void* s, void* d, size_t b, size_t e) {
    size_t i = b;
    for (; i + 8 <= e; i += 8)
        _mm256_storeu_ps(reinterpret_cast<float*>(at<float>(d, i)),
                         avx2_bf16_widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at<uint16_t>(s, i)))));
    bf16_to_f32_scalar(s, d, i, e);
}

// ---------------------------------------------------------------- AVX-512 F/BW/VL
HPS_TARGET_AVX512 HPS_INLINE __m512 avx512_bf16_widen(__m256i h) {
    __m512i v = _mm512_cvtepu16_epi32(h);
    const __mmask16 nan =
        _mm512_cmpgt_epi32_mask(_mm512_and_si512(v, _mm512_set1_epi32(0x7FFF)), _mm512_set1_epi32(0x7F80));
    v = _mm512_mask_or_epi32(v, nan, v, _mm512_set1_epi32(0x40));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

HPS_TARGET_AVX512 HPS_INLINE __m256i avx512_bf16_round(__m512i u) {
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    const __mmask16 nan =
        _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
    const __m512i qnan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, r, qnan));  // truncating narrow
}

template <GradType G>
HPS_TARGET_AVX512 HPS_INLINE __m512 avx512_load16(const void* g, size_t i) {
    if constexpr (G == GradType::f32) {
        return _mm512_loadu_ps(at<float>(g, i));
    } else {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at<uint16_t>(g, i)));
        if constexpr (G == GradType::f16) return _mm512_cvtph_ps(h);
        else return avx512_bf16_widen(h);
    }
}

template <GradType G>
HPS_TARGET_AVX512 void wacc_avx512(void* acc, const void* g, float w, size_t b, size_t e) {
    const __m512 wv = _mm512_set1_ps(w);
    size_t i = b;
    for (; i + 32 <= e; i += 32) {
        char* a = at<float>(acc, i);
        const __m512 g0 = avx512_load16<G>(g, i), g1 = avx512_load16<G>(g, i + 16);
        const __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a + 64);
        _mm512_storeu_ps(a, _mm512_add_ps(a0, _mm512_mul_ps(wv, g0)));
        _mm512_storeu_ps(a + 64, _mm512_add_ps(a1, _mm512_mul_ps(wv, g1)));
    }
    for (; i + 16 <= e; i += 16) {
        char* a = at<float>(acc, i);
        _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), _mm512_mul_ps(wv, avx512_load16<G>(g, i))));
    }
    wacc_tail<G>(acc, g, w, i, e);
}

HPS_TARGET_AVX512 void f32_to_f16_avx512(const void* s, void* d, size_t b, size_t e) {
    size_t i = b;
    for (; i + 16 <= e; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(at<uint16_t>(d, i)),
                            _mm512_cvtps_ph(_mm512_loadu_ps(at<float>(s, i)), _MM_FROUND_TO_NEAREST_INT));
    f32_to_f16_scalar(s, d, i, e);
}

HPS_TARGET_AVX512 void f16_to_f32_avx512(const void* s, void* d, size_t b, size_t e) {
    size_t i = b;
    for (; i + 16 <= e; i += 16)
        _mm512_storeu_ps(at<float>(d, i),
                         _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at<uint16_t>(s, i)))));
    f16_to_f32_scalar(s, d, i, e);
}

HPS_TARGET_AVX512 void f32_to_bf16_avx512(const void* s, void* d, size_t b, size_t e) {
    size_t i = b;
    for (; i + 16 <= e; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(at<uint16_t>(d, i)),
                            avx512_bf16_round(_mm512_loadu_si512(at<float>(s, i))));
    f32_to_bf16_scalar(s, d, i, e);
}

HPS_TARGET_AVX512 void bf16_to_f32_avx512(const void* s, void* d, size_t b, size_t e) {
    size_t i = b;
    for (; i + 16 <= e; i += 16)
        _mm512_storeu_ps(at<float>(d, i),
                         avx512_bf16_widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at<uint16_t>(s, i)))));
    bf16_to_f32_scalar(s, d, i, e);
}
#endif  // HPS_X86

template <GradType G>
WaccFn pick_wacc() {
#if HPS_X86
    switch (active_isa()) {
        case Isa::avx512: return wacc_avx512<G>;
        case Isa::avx2: return wacc_avx2<G>;
        default: break;
    }
#endif
    return wacc_scalar<G>;
}

ConvFn pick_conv(ConvFn scalar, ConvFn avx2, ConvFn avx512) {
    (void)avx2;
    (void)avx512;
#if HPS_X86
    switch (active_isa()) {
        case Isa::avx512: return avx512;
        case Isa::avx2: return avx2;
        default: break;
    }
#endif
    return scalar;
}

void run_conv(ConvFn fn, const void* src, void* dst, size_t n) {
    // Ranges start at multiples of 64 elements so no two threads share a cache line of output.
    parallel_for(n, 64, [&](size_t b, size_t e, int) { fn(src, dst, b, e); });
}

#if HPS_X86
#define HPS_CONV_FNS(name) name##_scalar, name##_avx2, name##_avx512
#else
#define HPS_CONV_FNS(name) name##_scalar, nullptr, nullptr
#endif

}  // namespace

void weighted_accumulate(void* acc, const void* g, GradType g_type, float w, size_t n) {
    WaccFn fn = g_type == GradType::f32   ? pick_wacc<GradType::f32>()
                : g_type == GradType::f16 ? pick_wacc<GradType::f16>()
                                          : pick_wacc<GradType::bf16>();
    parallel_for(n, 64, [&](size_t b, size_t e, int) { fn(acc, g, w, b, e); });
}

void f32_to_f16(const void* src, void* dst, size_t n) { run_conv(pick_conv(HPS_CONV_FNS(f32_to_f16)), src, dst, n); }
void f16_to_f32(const void* src, void* dst, size_t n) { run_conv(pick_conv(HPS_CONV_FNS(f16_to_f32)), src, dst, n); }
void f32_to_bf16(const void* src, void* dst, size_t n) { run_conv(pick_conv(HPS_CONV_FNS(f32_to_bf16)), src, dst, n); }
void bf16_to_f32(const void* src, void* dst, size_t n) { run_conv(pick_conv(HPS_CONV_FNS(bf16_to_f32)), src, dst, n); }

}  // namespace hps
