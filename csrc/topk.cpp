// Top-k by magnitude with a radix select, optionally fused with error feedback.
//
// Order: the key of x is its bit pattern with the sign cleared, read as uint32. For floats that
// order is |x| order (+0 and -0 tie), inf is above every finite value and every NaN is above inf.
// The k largest keys are selected; among equal keys the lowest indices win. Indices come out
// ascending, which is what the wire wants and what makes a stream of them cheap to check.
//
// Algorithm (n values, T threads, every pass over contiguous per-thread ranges):
//   1. histogram of the top 10 key bits (1024 bins), fused with residual += g; per-thread
//      histograms, 4 interleaved copies each so that runs of equal bins do not serialise on one
//      counter;
//   2. from the summed histogram find the bin b1 holding the k-th largest key: everything above b1
//      is selected, `need` more come from b1. The per-thread histograms give each thread its exact
//      output offsets, so one parallel pass writes the indices above b1 (ascending) and the
//      candidates in b1 (ascending, with their keys) straight into place;
//   3. refine on the candidates only: histogram of key bits 20..10, then of bits 9..0, which pins
//      the exact threshold key; candidates above it are taken, and then as many equal to it as
//      are still needed, lowest index first;
//   4. merge the two ascending lists, gather the values, and (error feedback) zero them in the
//      residual.
// Cost: two streaming passes over the data plus work proportional to the candidates.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "cpu.h"
#include "kernels.h"
#include "parallel.h"

namespace hps {
namespace {

constexpr uint32_t kAbs = 0x7FFFFFFFu;
// Pass 1 bins on the top 10 key bits (keys are < 2^31): sign-cleared exponent + 2 mantissa bits.
// 1024 bins x 4 interleaved copies = 16 KiB, half an L1 data cache.
constexpr int kShift1 = 21;
constexpr size_t kBins1 = size_t(1) << (31 - kShift1);
constexpr int kShift2 = 10;  // refine 1: key bits 20..10
constexpr size_t kBins2 = size_t(1) << (kShift1 - kShift2);
constexpr size_t kBins3 = size_t(1) << kShift2;  // refine 2: key bits 9..0

// Pass 1 over [b, e): (ADD) x += g, and histogram of key >> kShift1 into hist (kBins1 counters).
template <bool ADD>
void histogram_pass(const void* g, const void* x_in, size_t b, size_t e, uint32_t* hist) {
    void* x = const_cast<void*>(x_in);  // written only when ADD (x is then the residual)
    constexpr size_t kChunk = 1024;
    uint32_t sub[4][kBins1] = {};
    uint16_t bins[kChunk];
    for (size_t c = b; c < e; c += kChunk) {
        const size_t m = std::min(kChunk, e - c);
        // Vectorisable: add, store, extract the bin.
        for (size_t j = 0; j < m; ++j) {
            float r = ld<float>(x, c + j);
            if constexpr (ADD) {
                r = r + ld<float>(g, c + j);
                st<float>(x, c + j, r);
            }
            bins[j] = static_cast<uint16_t>((f32_bits(r) & kAbs) >> kShift1);
        }
        size_t j = 0;
        for (; j + 4 <= m; j += 4) {
            ++sub[0][bins[j]];
            ++sub[1][bins[j + 1]];
            ++sub[2][bins[j + 2]];
            ++sub[3][bins[j + 3]];
        }
        for (; j < m; ++j) ++sub[0][bins[j]];
    }
    for (size_t i = 0; i < kBins1; ++i) hist[i] = sub[0][i] + sub[1][i] + sub[2][i] + sub[3][i];
}

// The bin holding the need-th largest key (need >= 1 and <= sum of hist): returns it and sets
// *above to the number of keys in higher bins.
template <class Count>
size_t find_bin(const Count* hist, size_t bins, size_t need, size_t* above) {
    size_t c = 0;
    for (size_t b = bins; b-- > 0;) {
        if (c + hist[b] >= need) {
            *above = c;
            return b;
        }
        c += hist[b];
    }
    throw std::logic_error("topk: histogram holds fewer than k keys");  // unreachable
}

// Pass 2: where the indices (and candidate keys) go, and the bin b1 that splits them.
struct Pass2 {
    int32_t* above;      // indices of keys in bins above b1
    int32_t* cand;       // indices of keys in bin b1 ...
    uint32_t* cand_key;  // ... and their keys
    uint32_t lo_key;     // smallest key in bin b1
    size_t b1;
};

HPS_INLINE void visit(const void* x, size_t i, const Pass2& o, size_t& a, size_t& c) {
    const uint32_t key = ld<uint32_t>(x, i) & kAbs;
    if (key < o.lo_key) return;
    if ((key >> kShift1) > o.b1) {
        o.above[a++] = static_cast<int32_t>(i);
    } else {
        o.cand[c] = static_cast<int32_t>(i);
        o.cand_key[c++] = key;
    }
}

using ScanFn = void (*)(const void* x, size_t b, size_t e, const Pass2& o, size_t& a, size_t& c);

void scan_scalar(const void* x, size_t b, size_t e, const Pass2& o, size_t& a, size_t& c) {
    for (size_t i = b; i < e; ++i) visit(x, i, o, a, c);
}

#if HPS_X86
// 32 keys per step compared at once; only the (rare) hits are visited, one set bit at a time, so
// the cost is a streaming read plus work per hit instead of a branch per element.
HPS_TARGET_AVX2 void scan_avx2(const void* x, size_t b, size_t e, const Pass2& o, size_t& a, size_t& c) {
    const __m256i abs = _mm256_set1_epi32(0x7FFFFFFF);
    const __m256i lim = _mm256_set1_epi32(static_cast<int32_t>(o.lo_key) - 1);  // key > lim <=> key >= lo_key
    size_t i = b;
    for (; i + 32 <= e; i += 32) {
        const __m256i* p = reinterpret_cast<const __m256i*>(at<float>(x, i));
        uint32_t m = 0;
        for (int v = 0; v < 4; ++v) {
            const __m256i key = _mm256_and_si256(_mm256_loadu_si256(p + v), abs);
            const int bitsv = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, lim)));
            m |= static_cast<uint32_t>(bitsv) << (8 * v);
        }
        while (m) {
            visit(x, i + static_cast<size_t>(__builtin_ctz(m)), o, a, c);
            m &= m - 1;
        }
    }
    scan_scalar(x, i, e, o, a, c);
}
#endif

ScanFn pick_scan() {
#if HPS_X86
    if (active_isa() >= Isa::avx2) return scan_avx2;
#endif
    return scan_scalar;
}

template <bool EF>
void topk_impl(const void* g, const void* x_in, size_t n, size_t k, void* idx_out, void* val_out) {
    if (k > n) throw std::invalid_argument("topk: k = " + std::to_string(k) + " > n = " + std::to_string(n));
    if (n > static_cast<size_t>(INT32_MAX))
        throw std::invalid_argument("topk: at most 2^31 - 1 values (indices are int32)");
    void* x = const_cast<void*>(x_in);  // written only when EF (x is then the residual)
    const int parts = plan_threads(n);
    constexpr size_t kAlign = 64;
    std::vector<uint32_t> hists(static_cast<size_t>(parts) * kBins1);
    run_parts(n, parts, kAlign, [&](size_t b, size_t e, int t) {
        histogram_pass<EF>(g, x, b, e, hists.data() + static_cast<size_t>(t) * kBins1);
    });
    if (k == 0) return;

    std::vector<size_t> total(kBins1, 0);
    for (int t = 0; t < parts; ++t)
        for (size_t i = 0; i < kBins1; ++i) total[i] += hists[static_cast<size_t>(t) * kBins1 + i];
    size_t n_above = 0;
    const size_t b1 = find_bin(total.data(), kBins1, k, &n_above);
    const size_t n_cand = total[b1];

    // Per-thread output offsets: thread t writes its "above" indices at a_off[t] and its
    // candidates at c_off[t]; ranges are in index order so both lists come out ascending.
    std::vector<size_t> a_off(static_cast<size_t>(parts) + 1, 0), c_off(static_cast<size_t>(parts) + 1, 0);
    for (int t = 0; t < parts; ++t) {
        const uint32_t* h = hists.data() + static_cast<size_t>(t) * kBins1;
        size_t above = 0;
        for (size_t i = b1 + 1; i < kBins1; ++i) above += h[i];
        a_off[t + 1] = a_off[t] + above;
        c_off[t + 1] = c_off[t] + h[b1];
    }
    std::vector<int32_t> above_idx(n_above), cand_idx(n_cand);
    std::vector<uint32_t> cand_key(n_cand);
    const uint32_t lo_key = static_cast<uint32_t>(b1) << kShift1;  // smallest key in bin b1
    Pass2 outs{above_idx.data(), cand_idx.data(), cand_key.data(), lo_key, b1};
    const ScanFn scan = pick_scan();
    run_parts(n, parts, kAlign, [&](size_t b, size_t e, int t) {
        size_t a = a_off[t], c = c_off[t];
        scan(x, b, e, outs, a, c);
    });

    // Refine inside bin b1 when only part of it is taken: pin the exact threshold key and how many
    // keys equal to it to take (the lowest-index ones: candidates are in index order).
    const size_t need = k - n_above;
    std::vector<int32_t> chosen;
    if (need == n_cand) {
        chosen.swap(cand_idx);
    } else {
        std::vector<size_t> h2(kBins2, 0);
        for (size_t j = 0; j < n_cand; ++j) ++h2[(cand_key[j] >> kShift2) & (kBins2 - 1)];
        size_t above2 = 0;
        const size_t b2 = find_bin(h2.data(), kBins2, need, &above2);
        std::vector<size_t> h3(kBins3, 0);
        for (size_t j = 0; j < n_cand; ++j)
            if (((cand_key[j] >> kShift2) & (kBins2 - 1)) == b2) ++h3[cand_key[j] & (kBins3 - 1)];
        size_t above3 = 0;
        const size_t b3 = find_bin(h3.data(), kBins3, need - above2, &above3);
        const uint32_t thresh = lo_key | static_cast<uint32_t>(b2 << kShift2) | static_cast<uint32_t>(b3);
        size_t take_equal = need - above2 - above3;
        chosen.reserve(need);
        for (size_t j = 0; j < n_cand; ++j) {
            const uint32_t key = cand_key[j];
            if (key > thresh) {
                chosen.push_back(cand_idx[j]);
            } else if (key == thresh && take_equal > 0) {
                --take_equal;
                chosen.push_back(cand_idx[j]);
            }
        }
    }
    if (chosen.size() != need) throw std::logic_error("topk: selected the wrong number of values");  // unreachable

    // Merge the two ascending lists into the outputs.
    size_t ia = 0, ic = 0;
    for (size_t o = 0; o < k; ++o) {
        int32_t i;
        if (ic == chosen.size() || (ia < above_idx.size() && above_idx[ia] < chosen[ic])) i = above_idx[ia++];
        else i = chosen[ic++];
        st<int32_t>(idx_out, o, i);
        st<float>(val_out, o, ld<float>(x, static_cast<size_t>(i)));
        if constexpr (EF) st<float>(x, static_cast<size_t>(i), 0.0f);
    }
}

}  // namespace

void topk(const void* x, size_t n, size_t k, void* idx_out, void* val_out) {
    topk_impl<false>(nullptr, x, n, k, idx_out, val_out);
}

void topk_error_feedback(const void* g, void* residual, size_t n, size_t k, void* idx_out, void* val_out) {
    topk_impl<true>(g, residual, n, k, idx_out, val_out);
}

template <class IndexT>
void scatter_accumulate(void* acc, size_t n, const void* idx, const void* values, size_t k, float w) {
    // Check everything first: an invalid index must leave acc untouched.
    for (size_t j = 0; j < k; ++j) {
        const IndexT i = ld<IndexT>(idx, j);
        if (i < 0 || static_cast<uint64_t>(i) >= n)
            throw std::invalid_argument("scatter_accumulate: index " + std::to_string(i) + " at position " +
                                        std::to_string(j) + " is outside [0, " + std::to_string(n) + ")");
    }
    for (size_t j = 0; j < k; ++j) {
        const size_t i = static_cast<size_t>(ld<IndexT>(idx, j));
        st<float>(acc, i, ld<float>(acc, i) + w * ld<float>(values, j));
    }
}

template void scatter_accumulate<int32_t>(void*, size_t, const void*, const void*, size_t, float);
template void scatter_accumulate<int64_t>(void*, size_t, const void*, const void*, size_t, float);

}  // namespace hps
