// The kernels' C++ interface. Plain functions over untyped pointers (any alignment) and element
// counts; bindings.cpp only checks Python arguments and calls these. Semantics are specified in
// docs/KERNELS.md and mirrored bit for bit by hetero_ps/kernels/_reference.py.
//
// Argument errors that only the kernel can see (an out-of-range index) throw std::invalid_argument
// before anything is written.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hps {

enum class GradType { f32, f16, bf16 };

// acc[i] = acc[i] + w * float(g[i])  (a float32 multiply, then a float32 add: no fused multiply-add)
void weighted_accumulate(void* acc, const void* g, GradType g_type, float w, size_t n);

void f32_to_f16(const void* src, void* dst, size_t n);
void f16_to_f32(const void* src, void* dst, size_t n);
void f32_to_bf16(const void* src, void* dst, size_t n);
void bf16_to_f32(const void* src, void* dst, size_t n);

// Blockwise absmax int8. scales has ceil(n / block) entries. block >= 1.
void quantize_int8(const void* src, size_t n, size_t block, void* q, void* scales);
// out[i] = float(q[i]) * scales[i / block]
void dequantize_int8(const void* q, const void* scales, size_t n, size_t block, void* out);
// acc[i] = acc[i] + float(q[i]) * (w * scales[i / block])
void dequantize_accumulate_int8(void* acc, const void* q, const void* scales, float w, size_t n, size_t block);

// Top-k by |x| (ties: lowest index; NaN ranks above inf). Writes k ascending int32 indices and
// the values at them. n must fit in int32; k <= n.
void topk(const void* x, size_t n, size_t k, void* idx_out, void* val_out);
// residual += g, then topk(residual), then residual[idx] = 0.
void topk_error_feedback(const void* g, void* residual, size_t n, size_t k, void* idx_out, void* val_out);

// acc[idx[j]] += w * values[j], j in order (duplicates add up). Every index is checked against n
// first; IndexT is int32_t or int64_t.
template <class IndexT>
void scatter_accumulate(void* acc, size_t n, const void* idx, const void* values, size_t k, float w);

// One optimizer step over n float32 values (docs/KERNELS.md, "Optimizer steps"); every value is
// rounded to float32 after each multiply, add, divide or square root, in the order written there.
struct SgdHyper {
    float lr, momentum, weight_decay;
};
// p -= lr * d, where d = g (+ weight_decay * p) and, with a momentum buffer, buf = momentum * buf + d; d = buf.
void sgd_step(void* param, const void* grad, void* momentum_buf, size_t n, const SgdHyper& h);

struct AdamHyper {
    float step_size;   // lr / (1 - beta1^t)
    float bias2_sqrt;  // sqrt(1 - beta2^t)
    float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
    float weight_decay;  // Adam: added to the gradient as weight_decay * p
    float decay;         // AdamW: p *= decay (1 - lr * weight_decay) first
    bool decoupled;      // AdamW
};
void adam_step(void* param, const void* grad, void* exp_avg, void* exp_avg_sq, size_t n, const AdamHyper& h);

// CRC-32C (Castagnoli) of data, continuing from a previous finished CRC `crc` (0 to start).
uint32_t crc32c(uint32_t crc, const void* data, size_t n);
// Which CRC implementation crc32c() uses at the active ISA level ("sse4.2" or "table").
const char* crc32c_impl();

}  // namespace hps
