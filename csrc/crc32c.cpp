// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as in iSCSI, ext4 and the `crc32c` package.
//
// crc32c(crc, data) continues a finished CRC, so crc32c(crc32c(0, a), b) == crc32c(0, a || b).
// Internally we work on the raw register (finished value with all bits inverted).
//
// Two implementations, same results:
//  * SSE4.2: the crc32 instruction (latency 3 cycles, one per cycle) on three independent streams of
//    LONG (then SHORT) bytes at a time, combined afterwards: appending m zero bytes to a message
//    multiplies its register by x^(8m) mod P, so  crc(A || B) = crc(A) * x^(8|B|) xor crc_0(B).
//    The two fixed multiplications are table lookups (4 tables of 256 entries per length, one per
//    byte of the register, built at start-up since the operator is linear);
//  * portable slicing-by-8 tables.
// Large buffers are also split between threads and their CRCs combined with the same identity,
// using x^(8m) for an arbitrary m by square-and-multiply in GF(2)[x] / P.
#include <cstdint>
#include <vector>

#include "common.h"
#include "cpu.h"
#include "kernels.h"
#include "parallel.h"

namespace hps {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;
constexpr size_t kLong = 8192;
constexpr size_t kShort = 256;

// a * b mod P for polynomials in reflected form (bit 31 is x^0).
uint32_t multmodp(uint32_t a, uint32_t b) {
    if (a == 0) return 0;
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0) break;
        }
        m >>= 1;
        b = (b & 1) ? (b >> 1) ^ kPoly : b >> 1;
    }
    return p;
}

struct Tables {
    uint32_t slice[8][256];     // slicing-by-8
    uint32_t x2n[72];           // x^(2^i) mod P
    uint32_t long_op[4][256];   // register * x^(8 * kLong), one table per register byte
    uint32_t short_op[4][256];  // register * x^(8 * kShort)

    Tables() {
        for (uint32_t b = 0; b < 256; ++b) {
            uint32_t c = b;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
            slice[0][b] = c;
        }
        for (int j = 1; j < 8; ++j)
            for (int b = 0; b < 256; ++b) slice[j][b] = (slice[j - 1][b] >> 8) ^ slice[0][slice[j - 1][b] & 0xFF];
        x2n[0] = 1u << 30;  // x^1
        for (int i = 1; i < 72; ++i) x2n[i] = multmodp(x2n[i - 1], x2n[i - 1]);
        fill_op(long_op, zeros_op(kLong));
        fill_op(short_op, zeros_op(kShort));
    }

    // x^(8 * nbytes) mod P
    uint32_t zeros_op(uint64_t nbytes) const {
        uint32_t p = 1u << 31;  // x^0
        for (int k = 3; nbytes; nbytes >>= 1, ++k)
            if (nbytes & 1) p = multmodp(x2n[k], p);
        return p;
    }

    static void fill_op(uint32_t (&t)[4][256], uint32_t op) {
        for (int j = 0; j < 4; ++j)
            for (uint32_t b = 0; b < 256; ++b) t[j][b] = multmodp(op, b << (8 * j));
    }
};

const Tables& tables() {
    static const Tables t;
    return t;
}

HPS_INLINE uint32_t apply_op(const uint32_t (&t)[4][256], uint32_t crc) {
    return t[0][crc & 0xFF] ^ t[1][(crc >> 8) & 0xFF] ^ t[2][(crc >> 16) & 0xFF] ^ t[3][crc >> 24];
}

// Raw-register update, portable.
uint32_t update_table(uint32_t crc, const unsigned char* p, size_t n) {
    const Tables& t = tables();
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    while (n >= 8) {
        const uint64_t w = ld<uint64_t>(p, 0) ^ crc;
        crc = t.slice[7][w & 0xFF] ^ t.slice[6][(w >> 8) & 0xFF] ^ t.slice[5][(w >> 16) & 0xFF] ^
              t.slice[4][(w >> 24) & 0xFF] ^ t.slice[3][(w >> 32) & 0xFF] ^ t.slice[2][(w >> 40) & 0xFF] ^
              t.slice[1][(w >> 48) & 0xFF] ^ t.slice[0][w >> 56];
        p += 8;
        n -= 8;
    }
#endif
    while (n--) crc = (crc >> 8) ^ t.slice[0][(crc ^ *p++) & 0xFF];
    return crc;
}

#if HPS_X86 && defined(__x86_64__)
// Raw-register update with the crc32 instruction.
HPS_TARGET_SSE42 uint32_t update_hw(uint32_t crc0, const unsigned char* p, size_t n) {
    const Tables& t = tables();
    while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {  // align the 8-byte loads
        crc0 = _mm_crc32_u8(crc0, *p++);
        --n;
    }
    uint64_t c0 = crc0;
    while (n >= 3 * kLong) {
        uint64_t c1 = 0, c2 = 0;
        const unsigned char* end = p + kLong;
        do {  // unrolled: the loop overhead would otherwise cost a crc32 slot per iteration
            for (int u = 0; u < 32; u += 8) {
                c0 = _mm_crc32_u64(c0, ld<uint64_t>(p + u, 0));
                c1 = _mm_crc32_u64(c1, ld<uint64_t>(p + kLong + u, 0));
                c2 = _mm_crc32_u64(c2, ld<uint64_t>(p + 2 * kLong + u, 0));
            }
            p += 32;
        } while (p < end);
        c0 = apply_op(t.long_op, static_cast<uint32_t>(c0)) ^ c1;
        c0 = apply_op(t.long_op, static_cast<uint32_t>(c0)) ^ c2;
        p += 2 * kLong;
        n -= 3 * kLong;
    }
    while (n >= 3 * kShort) {
        uint64_t c1 = 0, c2 = 0;
        const unsigned char* end = p + kShort;
        do {
            for (int u = 0; u < 32; u += 8) {
                c0 = _mm_crc32_u64(c0, ld<uint64_t>(p + u, 0));
                c1 = _mm_crc32_u64(c1, ld<uint64_t>(p + kShort + u, 0));
                c2 = _mm_crc32_u64(c2, ld<uint64_t>(p + 2 * kShort + u, 0));
            }
            p += 32;
        } while (p < end);
        c0 = apply_op(t.short_op, static_cast<uint32_t>(c0)) ^ c1;
        c0 = apply_op(t.short_op, static_cast<uint32_t>(c0)) ^ c2;
        p += 2 * kShort;
        n -= 3 * kShort;
    }
    for (; n >= 8; n -= 8, p += 8) c0 = _mm_crc32_u64(c0, ld<uint64_t>(p, 0));
    uint32_t c = static_cast<uint32_t>(c0);
    while (n--) c = _mm_crc32_u8(c, *p++);
    return c;
}
constexpr bool kHaveHw = true;
#else
uint32_t update_hw(uint32_t crc, const unsigned char* p, size_t n) { return update_table(crc, p, n); }
constexpr bool kHaveHw = false;
#endif

bool use_hw() { return kHaveHw && active_isa() >= Isa::sse42; }

}  // namespace

const char* crc32c_impl() { return use_hw() ? "sse4.2" : "table"; }

uint32_t crc32c(uint32_t crc, const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    auto update = use_hw() ? update_hw : update_table;
    uint32_t raw = ~crc;
    // Split like a float32 kernel over n / 4 elements would be (threads from 4 MiB up).
    const int parts = plan_threads(n / 4);
    if (parts <= 1) return ~update(raw, p, n);
    constexpr size_t kAlign = 4096;
    std::vector<uint32_t> part_crc(static_cast<size_t>(parts));
    run_parts(n, parts, kAlign, [&](size_t b, size_t e, int t) {
        part_crc[static_cast<size_t>(t)] = update(t == 0 ? raw : 0u, p + b, e - b);
    });
    const Tables& tab = tables();
    raw = part_crc[0];
    for (int t = 1; t < parts; ++t) {
        const size_t len = range_begin(n, parts, t + 1, kAlign) - range_begin(n, parts, t, kAlign);
        raw = multmodp(tab.zeros_op(len), raw) ^ part_crc[static_cast<size_t>(t)];
    }
    return ~raw;
}

}  // namespace hps
