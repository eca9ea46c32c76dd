// Blockwise absmax int8 quantisation (the int8 codec) and its two decoders.
//
// For each block of `block` values (the last one may be shorter):
//   amax  = max |x|, taken on the bit patterns with the sign cleared (uint32 order is |x| order,
//           and NaN's pattern is above inf's, so one integer max also tells us the block is finite)
//   scale = amax / 127              (float32 division; this is what goes on the wire)
//   q     = clip(rint(x * (127 / amax)), -127, 127)   (float32 multiply, round half to even)
// Special blocks: amax == 0 -> q = 0, scale = 0. A NaN or inf in the block -> q = 0, scale = NaN,
// so every decoded value of that block is NaN (a broken gradient is never hidden). amax so small
// (< 127 / FLT_MAX, about 3.7e-37) that 127 / amax overflows -> sent as zeros (q = 0, scale = 0).
//
// Decoding: out = float(q) * scale; fused accumulate: acc += float(q) * (w * scale), where w * scale
// is rounded to float32 once per block.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>

#include "common.h"
#include "cpu.h"
#include "kernels.h"
#include "parallel.h"

namespace hps {
namespace {

struct BlockScale {
    float scale;  // stored on the wire
    float inv;    // 127 / amax
    bool zero;    // the block's q are all 0
};

HPS_INLINE BlockScale block_scale(uint32_t amax_bits) {
    if (amax_bits >= 0x7F800000u) return {std::numeric_limits<float>::quiet_NaN(), 0.0f, true};
    if (amax_bits == 0) return {0.0f, 0.0f, true};
    const float amax = bits_f32(amax_bits);
    const float inv = 127.0f / amax;
    if (f32_bits(inv) == 0x7F800000u) return {0.0f, 0.0f, true};
    return {amax / 127.0f, inv, false};
}

// rint for |v| < 2^22 in the default rounding mode: adding 1.5 * 2^23 leaves no fraction bits.
// (Without -ffast-math the compiler may not simplify (v + m) - m to v.)
HPS_INLINE float round_even(float v) {
    const float magic = 12582912.0f;
    return (v + magic) - magic;
}

HPS_INLINE int8_t quant_one(float x, float inv) {
    float v = round_even(x * inv);
    v = std::min(std::max(v, -127.0f), 127.0f);
    return static_cast<int8_t>(static_cast<int>(v));
}

using QuantFn = void (*)(const void* src, size_t n, size_t block, void* q, void* scales, size_t bb, size_t be);
using DequantFn = void (*)(const void* q, const void* scales, size_t n, size_t block, float w, void* out, size_t bb,
                           size_t be);

// ---------------------------------------------------------------- scalar
HPS_INLINE uint32_t amax_scalar(const void* src, size_t b, size_t e, uint32_t m) {
    for (size_t i = b; i < e; ++i) m = std::max(m, ld<uint32_t>(src, i) & 0x7FFFFFFFu);
    return m;
}

HPS_INLINE void quant_tail(const void* src, void* q, const BlockScale& s, size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) st<int8_t>(q, i, s.zero ? int8_t(0) : quant_one(ld<float>(src, i), s.inv));
}

void quant_scalar(const void* src, size_t n, size_t block, void* q, void* scales, size_t bb, size_t be) {
    for (size_t blk = bb; blk < be; ++blk) {
        const size_t b = blk * block, e = std::min(n, b + block);
        const BlockScale s = block_scale(amax_scalar(src, b, e, 0));
        st<float>(scales, blk, s.scale);
        if (s.zero) std::memset(at<int8_t>(q, b), 0, e - b);
        else quant_tail(src, q, s, b, e);
    }
}

// ACC = false: out = q * scale.  ACC = true: out += q * (w * scale).
template <bool ACC>
HPS_INLINE void dequant_tail(const void* q, float s, void* out, size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
        const float v = static_cast<float>(ld<int8_t>(q, i)) * s;
        st<float>(out, i, ACC ? ld<float>(out, i) + v : v);
    }
}

template <bool ACC>
void dequant_scalar(const void* q, const void* scales, size_t n, size_t block, float w, void* out, size_t bb,
                    size_t be) {
    for (size_t blk = bb; blk < be; ++blk) {
        const size_t b = blk * block, e = std::min(n, b + block);
        const float s = ACC ? w * ld<float>(scales, blk) : ld<float>(scales, blk);
        dequant_tail<ACC>(q, s, out, b, e);
    }
}

#if HPS_X86
// ---------------------------------------------------------------- AVX2
HPS_TARGET_AVX2 HPS_INLINE __m256i avx2_quant8(const void* src, size_t i, __m256 inv) {
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(reinterpret_cast<const float*>(at<float>(src, i))), inv);
    v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
    return _mm256_cvtps_epi32(v);  // exact: v is already an integer
}

HPS_TARGET_AVX2 void quant_avx2(const void* src, size_t n, size_t block, void* q, void* scales, size_t bb, size_t be) {
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (size_t blk = bb; blk < be; ++blk) {
        const size_t b = blk * block, e = std::min(n, b + block);
        size_t i = b;
        __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
        for (; i + 16 <= e; i += 16) {
            const __m256i* p = reinterpret_cast<const __m256i*>(at<float>(src, i));
            m0 = _mm256_max_epu32(m0, _mm256_and_si256(_mm256_loadu_si256(p), abs_mask));
            m1 = _mm256_max_epu32(m1, _mm256_and_si256(_mm256_loadu_si256(p + 1), abs_mask));
        }
        m0 = _mm256_max_epu32(m0, m1);
        __m128i m = _mm_max_epu32(_mm256_castsi256_si128(m0), _mm256_extracti128_si256(m0, 1));
        m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
        m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
        const BlockScale s = block_scale(amax_scalar(src, i, e, static_cast<uint32_t>(_mm_cvtsi128_si32(m))));
        st<float>(scales, blk, s.scale);
        if (s.zero) {
            std::memset(at<int8_t>(q, b), 0, e - b);
            continue;
        }
        const __m256 inv = _mm256_set1_ps(s.inv);
        i = b;
        for (; i + 32 <= e; i += 32) {
            const __m256i p01 = _mm256_packs_epi32(avx2_quant8(src, i, inv), avx2_quant8(src, i + 8, inv));
            const __m256i p23 = _mm256_packs_epi32(avx2_quant8(src, i + 16, inv), avx2_quant8(src, i + 24, inv));
            // The packs interleave 128-bit lanes; put the eight 4-byte groups back in order.
            const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), order);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(at<int8_t>(q, i)), bytes);
        }
        quant_tail(src, q, s, i, e);
    }
}

template <bool ACC>
HPS_TARGET_AVX2 void dequant_avx2(const void* q, const void* scales, size_t n, size_t block, float w, void* out,
                                  size_t bb, size_t be) {
    for (size_t blk = bb; blk < be; ++blk) {
        const size_t b = blk * block, e = std::min(n, b + block);
        const float s = ACC ? w * ld<float>(scales, blk) : ld<float>(scales, blk);
        const __m256 sv = _mm256_set1_ps(s);
        size_t i = b;
        for (; i + 16 <= e; i += 16) {
            const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at<int8_t>(q, i)));
            __m256 v0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), sv);
            __m256 v1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8))), sv);
            float* o = reinterpret_cast<float*>(at<float>(out, i));
            if (ACC) {
                v0 = _mm256_add_ps(_mm256_loadu_ps(o), v0);
                v1 = _mm256_add_ps(_mm256_loadu_ps(o + 8), v1);
            }
            _mm256_storeu_ps(o, v0);
            _mm256_storeu_ps(o + 8, v1);
        }
        dequant_tail<ACC>(q, s, out, i, e);
    }
}

// ---------------------------------------------------------------- AVX-512
HPS_TARGET_AVX512 void quant_avx512(const void* src, size_t n, size_t block, void* q, void* scales, size_t bb,
                                    size_t be) {
    const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
    for (size_t blk = bb; blk < be; ++blk) {
        const size_t b = blk * block, e = std::min(n, b + block);
        size_t i = b;
        __m512i m0 = _mm512_setzero_si512(), m1 = _mm512_setzero_si512();
        for (; i + 32 <= e; i += 32) {
            m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_loadu_si512(at<float>(src, i)), abs_mask));
            m1 = _mm512_max_epu32(m1, _mm512_and_si512(_mm512_loadu_si512(at<float>(src, i + 16)), abs_mask));
        }
        const uint32_t vmax = _mm512_reduce_max_epu32(_mm512_max_epu32(m0, m1));
        const BlockScale s = block_scale(amax_scalar(src, i, e, vmax));
        st<float>(scales, blk, s.scale);
        if (s.zero) {
            std::memset(at<int8_t>(q, b), 0, e - b);
            continue;
        }
        const __m512 inv = _mm512_set1_ps(s.inv);
        const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
        i = b;
        for (; i + 16 <= e; i += 16) {
            __m512 v = _mm512_mul_ps(_mm512_loadu_ps(at<float>(src, i)), inv);
            v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(at<int8_t>(q, i)),
                             _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
        }
        quant_tail(src, q, s, i, e);
    }
}

template <bool ACC>
HPS_TARGET_AVX512 void dequant_avx512(const void* q, const void* scales, size_t n, size_t block, float w, void* out,
                                      size_t bb, size_t be) {
    for (size_t blk = bb; blk < be; ++blk) {
        const size_t b = blk * block, e = std::min(n, b + block);
        const float s = ACC ? w * ld<float>(scales, blk) : ld<float>(scales, blk);
        const __m512 sv = _mm512_set1_ps(s);
        size_t i = b;
        for (; i + 16 <= e; i += 16) {
            const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at<int8_t>(q, i)));
            __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), sv);
            char* o = at<float>(out, i);
            if (ACC) v = _mm512_add_ps(_mm512_loadu_ps(o), v);
            _mm512_storeu_ps(o, v);
        }
        dequant_tail<ACC>(q, s, out, i, e);
    }
}
#endif  // HPS_X86

QuantFn pick_quant() {
#if HPS_X86
    switch (active_isa()) {
        case Isa::avx512: return quant_avx512;
        case Isa::avx2: return quant_avx2;
        default: break;
    }
#endif
    return quant_scalar;
}

template <bool ACC>
DequantFn pick_dequant() {
#if HPS_X86
    switch (active_isa()) {
        case Isa::avx512: return dequant_avx512<ACC>;
        case Isa::avx2: return dequant_avx2<ACC>;
        default: break;
    }
#endif
    return dequant_scalar<ACC>;
}

// Split the blocks (not the elements) between threads.
template <class F>
void over_blocks(size_t n, size_t block, F&& fn) {
    const size_t nblocks = (n + block - 1) / block;
    const int parts = static_cast<int>(std::min<size_t>(static_cast<size_t>(plan_threads(n)), nblocks));
    run_parts(nblocks, parts, 1, [&](size_t bb, size_t be, int) { fn(bb, be); });
}

void check_block(size_t block) {
    if (block == 0) throw std::invalid_argument("int8 block size must be >= 1");
}

}  // namespace

void quantize_int8(const void* src, size_t n, size_t block, void* q, void* scales) {
    check_block(block);
    if (n == 0) return;
    QuantFn fn = pick_quant();
    over_blocks(n, block, [&](size_t bb, size_t be) { fn(src, n, block, q, scales, bb, be); });
}

void dequantize_int8(const void* q, const void* scales, size_t n, size_t block, void* out) {
    check_block(block);
    if (n == 0) return;
    DequantFn fn = pick_dequant<false>();
    over_blocks(n, block, [&](size_t bb, size_t be) { fn(q, scales, n, block, 1.0f, out, bb, be); });
}

void dequantize_accumulate_int8(void* acc, const void* q, const void* scales, float w, size_t n, size_t block) {
    check_block(block);
    if (n == 0) return;
    DequantFn fn = pick_dequant<true>();
    over_blocks(n, block, [&](size_t bb, size_t be) { fn(q, scales, n, block, w, acc, bb, be); });
}

}  // namespace hps
