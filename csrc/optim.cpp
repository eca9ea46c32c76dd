// Optimizer steps over one chunk of the master's flat parameters: SGD (with or without heavy-ball
// momentum) and Adam/AdamW, each one pass over memory instead of the three to six passes torch's
// foreach implementation makes (one per tensor operation).
//
// The loops are plain C++ compiled three times (baseline, AVX2, AVX-512 target attributes) and left
// to the compiler's vectoriser. -ffp-contract=off keeps every multiply and add separately rounded,
// and IEEE square root and division are exact in every ISA, so all three give the same bits, and so
// does the numpy reference (hetero_ps/kernels/_reference.py), which does the same float32 operations
// in the same order (docs/KERNELS.md, "Optimizer steps").
#include <cstddef>

#include "common.h"
#include "cpu.h"
#include "kernels.h"
#include "parallel.h"

namespace hps {
namespace {

template <bool Decay, bool Momentum>
HPS_INLINE void sgd_body(float* p, const float* g, float* buf, const SgdHyper& h, size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
        float d = g[i];
        if constexpr (Decay) d = d + h.weight_decay * p[i];
        if constexpr (Momentum) {
            d = h.momentum * buf[i] + d;
            buf[i] = d;
        }
        p[i] = p[i] - h.lr * d;
    }
}

template <bool Decay, bool Decoupled>
HPS_INLINE void adam_body(float* p, const float* g, float* m, float* v, const AdamHyper& h, size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
        float gi = g[i];
        float pi = p[i];
        if constexpr (Decay && !Decoupled) gi = gi + h.weight_decay * pi;
        if constexpr (Decay && Decoupled) pi = pi * h.decay;
        const float mi = h.beta1 * m[i] + h.one_minus_beta1 * gi;
        const float vi = h.beta2 * v[i] + h.one_minus_beta2 * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        const float denom = __builtin_sqrtf(vi) / h.bias2_sqrt + h.eps;
        p[i] = pi - h.step_size * (mi / denom);
    }
}

using SgdFn = void (*)(float*, const float*, float*, const SgdHyper&, size_t, size_t);
using AdamFn = void (*)(float*, const float*, float*, float*, const AdamHyper&, size_t, size_t);

// One function per ISA and flag combination; the body is the same source each time.
#define HPS_OPT_VARIANTS(SUFFIX, ATTR)                                                                              \
    template <bool A, bool B>                                                                                       \
    ATTR void sgd_##SUFFIX(float* p, const float* g, float* buf, const SgdHyper& h, size_t b, size_t e) {           \
        sgd_body<A, B>(p, g, buf, h, b, e);                                                                         \
    }                                                                                                               \
    template <bool A, bool B>                                                                                       \
    ATTR void adam_##SUFFIX(float* p, const float* g, float* m, float* v, const AdamHyper& h, size_t b, size_t e) { \
        adam_body<A, B>(p, g, m, v, h, b, e);                                                                       \
    }

HPS_OPT_VARIANTS(scalar, )
#if HPS_X86
HPS_OPT_VARIANTS(avx2, HPS_TARGET_AVX2)
HPS_OPT_VARIANTS(avx512, HPS_TARGET_AVX512)
#endif

template <bool A, bool B>
SgdFn pick_sgd() {
#if HPS_X86
    switch (active_isa()) {
        case Isa::avx512: return sgd_avx512<A, B>;
        case Isa::avx2: return sgd_avx2<A, B>;
        default: break;
    }
#endif
    return sgd_scalar<A, B>;
}

template <bool A, bool B>
AdamFn pick_adam() {
#if HPS_X86
    switch (active_isa()) {
        case Isa::avx512: return adam_avx512<A, B>;
        case Isa::avx2: return adam_avx2<A, B>;
        default: break;
    }
#endif
    return adam_scalar<A, B>;
}

}  // namespace

void sgd_step(void* param, const void* grad, void* momentum_buf, size_t n, const SgdHyper& h) {
    const bool decay = h.weight_decay != 0.0f, momentum = momentum_buf != nullptr;
    const SgdFn fn = decay ? (momentum ? pick_sgd<true, true>() : pick_sgd<true, false>())
                           : (momentum ? pick_sgd<false, true>() : pick_sgd<false, false>());
    float* p = static_cast<float*>(param);
    const float* g = static_cast<const float*>(grad);
    float* buf = static_cast<float*>(momentum_buf);
    parallel_for(n, 64, [&](size_t b, size_t e, int) { fn(p, g, buf, h, b, e); });
}

void adam_step(void* param, const void* grad, void* exp_avg, void* exp_avg_sq, size_t n, const AdamHyper& h) {
    const bool decay = h.weight_decay != 0.0f;
    const AdamFn fn =
        decay ? (h.decoupled ? pick_adam<true, true>() : pick_adam<true, false>()) : pick_adam<false, false>();
    float* p = static_cast<float*>(param);
    const float* g = static_cast<const float*>(grad);
    float* m = static_cast<float*>(exp_avg);
    float* v = static_cast<float*>(exp_avg_sq);
    parallel_for(n, 64, [&](size_t b, size_t e, int) { fn(p, g, m, v, h, b, e); });
}

}  // namespace hps
