// Scalar IEEE binary16 and bfloat16 conversions, bit-exact with the SIMD paths.
//
// float32 -> binary16: round to nearest, ties to even; |x| >= 65520 becomes +-inf (65520 is the
//   midpoint between 65504 and 2^16 and ties go to the even side, which is inf); results below
//   2^-14 are binary16 subnormals, rounded the same way; NaN -> quiet NaN keeping the sign and the
//   top 10 payload bits (what F16C's vcvtps2ph does).
// binary16 -> float32: exact; NaN keeps sign and payload and is made quiet (as vcvtph2ps does).
// float32 -> bfloat16: round to nearest even on the top 16 bits (torch's rule), so overflow gives
//   +-inf and subnormals round like any other value; NaN -> quiet NaN keeping sign and top payload.
// bfloat16 -> float32: exact (shift left by 16); NaN is made quiet.
#pragma once

#include <cstdint>

#include "common.h"

namespace hps {

HPS_INLINE uint16_t f32_to_f16_bits(uint32_t x) {
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t a = x & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) {  // inf or NaN
        return static_cast<uint16_t>(sign | (a > 0x7F800000u ? 0x7E00u | ((a >> 13) & 0x3FFu) : 0x7C00u));
    }
    if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to inf
    if (a >= 0x38800000u) {                                              // binary16 normal
        // Re-bias the exponent (127 -> 15), then round the 23-bit mantissa to 10 bits; a carry
        // out of the mantissa correctly bumps the exponent.
        const uint32_t m = a - 0x38000000u;
        return static_cast<uint16_t>(sign | ((m + 0x0FFFu + ((m >> 13) & 1u)) >> 13));
    }
    if (a <= 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2^-25: rounds to zero
    // binary16 subnormal: value / 2^-24 = mant * 2^(e - 126), shift s in [14, 24].
    const uint32_t e = a >> 23;
    const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
    const uint32_t s = 126u - e;
    uint32_t r = mant >> s;
    const uint32_t rem = mant & ((1u << s) - 1u);
    const uint32_t half = 1u << (s - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
}

HPS_INLINE uint32_t f16_to_f32_bits(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1Fu;
    const uint32_t m = h & 0x3FFu;
    if (e == 0x1Fu) return sign | 0x7F800000u | (m << 13) | (m ? 0x00400000u : 0u);
    if (e != 0) return sign | ((e + 112u) << 23) | (m << 13);
    if (m == 0) return sign;
    // Subnormal: m * 2^-24 is exactly representable as a normal float32.
    return sign | f32_bits(static_cast<float>(m) * 5.9604644775390625e-08f);
}

HPS_INLINE uint16_t f32_to_bf16_bits(uint32_t x) {
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);
    return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

HPS_INLINE uint32_t bf16_to_f32_bits(uint16_t b) {
    uint32_t u = b;
    if ((u & 0x7FFFu) > 0x7F80u) u |= 0x0040u;
    return u << 16;
}

HPS_INLINE float f16_to_f32(uint16_t h) { return bits_f32(f16_to_f32_bits(h)); }
HPS_INLINE float bf16_to_f32(uint16_t b) { return bits_f32(bf16_to_f32_bits(b)); }

}  // namespace hps
