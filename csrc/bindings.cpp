// Python bindings of the kernels (module hetero_ps._C). This file only binds: it checks each
// argument's dtype, layout, writability and size, releases the GIL and calls the C++ kernel.
// Nothing is ever copied or converted: a wrong dtype is a TypeError, a wrong size, a
// non-contiguous array or a read-only output a ValueError. Inputs here are numpy arrays;
// hetero_ps.kernels turns torch tensors and byte buffers into zero-copy numpy views first.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "cpu.h"
#include "kernels.h"
#include "parallel.h"

namespace py = pybind11;

namespace {

enum class DT { f32, f16, u16, i8, i32, i64 };

const char* dt_name(DT d) {
    switch (d) {
        case DT::f32: return "float32";
        case DT::f16: return "float16";
        case DT::u16: return "uint16";
        case DT::i8: return "int8";
        case DT::i32: return "int32";
        case DT::i64: return "int64";
    }
    return "?";
}

const py::dtype& dtype_of(DT d) {
    static const py::dtype f32 = py::dtype::of<float>(), f16("float16"), u16 = py::dtype::of<uint16_t>(),
                           i8 = py::dtype::of<int8_t>(), i32 = py::dtype::of<int32_t>(), i64 = py::dtype::of<int64_t>();
    switch (d) {
        case DT::f32: return f32;
        case DT::f16: return f16;
        case DT::u16: return u16;
        case DT::i8: return i8;
        case DT::i32: return i32;
        case DT::i64: return i64;
    }
    return f32;
}

bool has_dtype(const py::array& a, DT d) { return a.dtype().equal(dtype_of(d)); }

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

// Checks layout (and writability for outputs) and, if expected >= 0, the element count.
void check_layout(const py::array& a, const char* name, bool out, py::ssize_t expected) {
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(std::string(name) + " must be C-contiguous (no copy is made)");
    if (out && !a.writeable()) throw py::value_error(std::string(name) + " is read-only");
    if (expected >= 0 && a.size() != expected)
        throw py::value_error(std::string(name) + " has " + std::to_string(a.size()) + " elements, expected " +
                              std::to_string(expected));
}

// One accepted dtype.
const void* check(const py::array& a, const char* name, DT d, bool out, py::ssize_t expected = -1) {
    if (!has_dtype(a, d)) throw py::type_error(std::string(name) + " must be " + dt_name(d) + ", got " + dtype_str(a));
    check_layout(a, name, out, expected);
    return a.data();
}

// Two accepted dtypes; returns which one matched through *which.
const void* check2(const py::array& a, const char* name, DT d1, DT d2, bool out, py::ssize_t expected, DT* which) {
    if (has_dtype(a, d1)) *which = d1;
    else if (has_dtype(a, d2)) *which = d2;
    else
        throw py::type_error(std::string(name) + " must be " + dt_name(d1) + " or " + dt_name(d2) + ", got " +
                             dtype_str(a));
    check_layout(a, name, out, expected);
    return a.data();
}

void* mut(const void* p) { return const_cast<void*>(p); }

size_t check_count(long long v, const char* name, long long min) {
    if (v < min)
        throw py::value_error(std::string(name) + " must be >= " + std::to_string(min) + ", got " + std::to_string(v));
    return static_cast<size_t>(v);
}

hps::GradType parse_grad_type(const std::string& s) {
    if (s == "f32") return hps::GradType::f32;
    if (s == "f16") return hps::GradType::f16;
    if (s == "bf16") return hps::GradType::bf16;
    throw py::value_error("g_dtype must be 'f32', 'f16' or 'bf16', got '" + s + "'");
}

// A contiguous read-only view of any buffer-protocol object, released on scope exit.
struct BufferView {
    Py_buffer view{};
    explicit BufferView(const py::handle& obj) {
        if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_SIMPLE) != 0) {
            PyErr_Clear();
            if (!PyObject_CheckBuffer(obj.ptr()))
                throw py::type_error("checksum needs a bytes-like object, got " +
                                     py::str(py::type::handle_of(obj)).cast<std::string>());
            throw py::value_error("checksum needs a contiguous buffer (no copy is made)");
        }
    }
    ~BufferView() { PyBuffer_Release(&view); }
    BufferView(const BufferView&) = delete;
    BufferView& operator=(const BufferView&) = delete;
};

void weighted_accumulate(const py::array& acc, const py::array& g, double w, const std::string& g_dtype) {
    const hps::GradType gt = parse_grad_type(g_dtype);
    const void* pa = check(acc, "acc", DT::f32, true);
    const void* pg;
    DT which;
    if (gt == hps::GradType::f32) pg = check(g, "g", DT::f32, false, acc.size());
    else if (gt == hps::GradType::f16) pg = check2(g, "g", DT::u16, DT::f16, false, acc.size(), &which);
    else pg = check(g, "g", DT::u16, false, acc.size());
    const size_t n = static_cast<size_t>(acc.size());
    py::gil_scoped_release nogil;
    hps::weighted_accumulate(mut(pa), pg, gt, static_cast<float>(w), n);
}

using ConvKernel = void (*)(const void*, void*, size_t);

// A conversion binding: src of dtype src_dt (or src_alt), out of dtype out_dt (or out_alt).
template <ConvKernel K>
void convert(const py::array& src, const py::array& out, DT src_dt, DT src_alt, DT out_dt, DT out_alt) {
    DT which;
    const void* ps = check2(src, "src", src_dt, src_alt, false, -1, &which);
    const void* po = check2(out, "out", out_dt, out_alt, true, src.size(), &which);
    const size_t n = static_cast<size_t>(src.size());
    py::gil_scoped_release nogil;
    K(ps, mut(po), n);
}

size_t n_blocks(size_t n, size_t block) { return n / block + (n % block != 0); }

void quantize_int8(const py::array& src, long long block_, const py::array& q, const py::array& scales) {
    const size_t block = check_count(block_, "block", 1);
    const void* ps = check(src, "src", DT::f32, false);
    const size_t n = static_cast<size_t>(src.size());
    const void* pq = check(q, "q", DT::i8, true, src.size());
    const void* pscales = check(scales, "scales", DT::f32, true, static_cast<py::ssize_t>(n_blocks(n, block)));
    py::gil_scoped_release nogil;
    hps::quantize_int8(ps, n, block, mut(pq), mut(pscales));
}

void dequantize_int8(const py::array& q, const py::array& scales, long long block_, const py::array& out) {
    const size_t block = check_count(block_, "block", 1);
    const void* pq = check(q, "q", DT::i8, false);
    const size_t n = static_cast<size_t>(q.size());
    const void* pscales = check(scales, "scales", DT::f32, false, static_cast<py::ssize_t>(n_blocks(n, block)));
    const void* po = check(out, "out", DT::f32, true, q.size());
    py::gil_scoped_release nogil;
    hps::dequantize_int8(pq, pscales, n, block, mut(po));
}

void dequantize_accumulate_int8(const py::array& acc, const py::array& q, const py::array& scales, double w,
                                long long block_) {
    const size_t block = check_count(block_, "block", 1);
    const void* pa = check(acc, "acc", DT::f32, true);
    const size_t n = static_cast<size_t>(acc.size());
    const void* pq = check(q, "q", DT::i8, false, acc.size());
    const void* pscales = check(scales, "scales", DT::f32, false, static_cast<py::ssize_t>(n_blocks(n, block)));
    py::gil_scoped_release nogil;
    hps::dequantize_accumulate_int8(mut(pa), pq, pscales, static_cast<float>(w), n, block);
}

size_t check_k(long long k_, py::ssize_t n) {
    const size_t k = check_count(k_, "k", 0);
    if (k > static_cast<size_t>(n))
        throw py::value_error("k = " + std::to_string(k) + " is larger than the number of values (" +
                              std::to_string(n) + ")");
    if (n > INT32_MAX) throw py::value_error("top-k handles at most 2^31 - 1 values (int32 indices)");
    return k;
}

void topk(const py::array& x, long long k_, const py::array& idx_out, const py::array& val_out) {
    const void* px = check(x, "x", DT::f32, false);
    const size_t k = check_k(k_, x.size());
    const void* pi = check(idx_out, "idx_out", DT::i32, true, static_cast<py::ssize_t>(k));
    const void* pv = check(val_out, "val_out", DT::f32, true, static_cast<py::ssize_t>(k));
    const size_t n = static_cast<size_t>(x.size());
    py::gil_scoped_release nogil;
    hps::topk(px, n, k, mut(pi), mut(pv));
}

void topk_error_feedback(const py::array& g, const py::array& residual, long long k_, const py::array& idx_out,
                         const py::array& val_out) {
    const void* pr = check(residual, "residual", DT::f32, true);
    const void* pg = check(g, "g", DT::f32, false, residual.size());
    const size_t k = check_k(k_, residual.size());
    const void* pi = check(idx_out, "idx_out", DT::i32, true, static_cast<py::ssize_t>(k));
    const void* pv = check(val_out, "val_out", DT::f32, true, static_cast<py::ssize_t>(k));
    const size_t n = static_cast<size_t>(residual.size());
    py::gil_scoped_release nogil;
    hps::topk_error_feedback(pg, mut(pr), n, k, mut(pi), mut(pv));
}

void scatter_accumulate(const py::array& acc, const py::array& indices, const py::array& values, double w) {
    const void* pa = check(acc, "acc", DT::f32, true);
    DT it;
    const void* pi = check2(indices, "indices", DT::i32, DT::i64, false, -1, &it);
    const void* pv = check(values, "values", DT::f32, false, indices.size());
    const size_t n = static_cast<size_t>(acc.size()), k = static_cast<size_t>(indices.size());
    py::gil_scoped_release nogil;
    if (it == DT::i32) hps::scatter_accumulate<int32_t>(mut(pa), n, pi, pv, k, static_cast<float>(w));
    else hps::scatter_accumulate<int64_t>(mut(pa), n, pi, pv, k, static_cast<float>(w));
}

uint32_t checksum(const py::object& buf, uint32_t value) {
    BufferView v(buf);
    const size_t n = static_cast<size_t>(v.view.len);
    if (n < (size_t(1) << 16)) return hps::crc32c(value, v.view.buf, n);  // not worth a GIL round trip
    py::gil_scoped_release nogil;
    return hps::crc32c(value, v.view.buf, n);
}

// The optimizer steps: every array float32, C-contiguous, as long as `param`.
void sgd_step(const py::array& param, const py::array& grad, const py::object& momentum_buf, double lr, double momentum,
              double weight_decay) {
    const void* pp = check(param, "param", DT::f32, true);
    const void* pg = check(grad, "grad", DT::f32, false, param.size());
    const void* pb = nullptr;
    if (!momentum_buf.is_none()) {
        const py::array buf = momentum_buf.cast<py::array>();
        pb = check(buf, "momentum_buf", DT::f32, true, param.size());
    }
    const hps::SgdHyper h{static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(weight_decay)};
    const size_t n = static_cast<size_t>(param.size());
    py::gil_scoped_release nogil;
    hps::sgd_step(mut(pp), pg, mut(pb), n, h);
}

void adam_step(const py::array& param, const py::array& grad, const py::array& exp_avg, const py::array& exp_avg_sq,
               double step_size, double bias2_sqrt, double beta1, double beta2, double eps, double weight_decay,
               double decay, bool decoupled) {
    const void* pp = check(param, "param", DT::f32, true);
    const void* pg = check(grad, "grad", DT::f32, false, param.size());
    const void* pm = check(exp_avg, "exp_avg", DT::f32, true, param.size());
    const void* pv = check(exp_avg_sq, "exp_avg_sq", DT::f32, true, param.size());
    hps::AdamHyper h{};
    h.step_size = static_cast<float>(step_size);
    h.bias2_sqrt = static_cast<float>(bias2_sqrt);
    h.beta1 = static_cast<float>(beta1);
    h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
    h.beta2 = static_cast<float>(beta2);
    h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
    h.eps = static_cast<float>(eps);
    h.weight_decay = static_cast<float>(weight_decay);
    h.decay = static_cast<float>(decay);
    h.decoupled = decoupled;
    const size_t n = static_cast<size_t>(param.size());
    py::gil_scoped_release nogil;
    hps::adam_step(mut(pp), pg, mut(pm), mut(pv), n, h);
}

py::dict cpu_features() {
    const hps::CpuFlags& f = hps::cpu_flags();
    py::dict flags;
    flags["sse4.2"] = f.sse42;
    flags["avx2"] = f.avx2;
    flags["f16c"] = f.f16c;
    flags["fma"] = f.fma;
    flags["avx512f"] = f.avx512f;
    flags["avx512bw"] = f.avx512bw;
    flags["avx512vl"] = f.avx512vl;
    const hps::Isa active = hps::active_isa();
    const char* simd = active >= hps::Isa::avx2 ? hps::isa_name(active) : "scalar";
    py::dict paths;
    paths["weighted_accumulate"] = simd;
    paths["convert"] = simd;
    paths["int8"] = simd;
    paths["topk"] = active >= hps::Isa::avx2 ? "avx2" : "scalar";  // the candidate scan; AVX2 also on avx512
    paths["scatter_accumulate"] = "scalar";
    paths["optimizer"] = simd;
    paths["checksum"] = hps::crc32c_impl();
    py::dict out;
    out["detected"] = hps::isa_name(hps::detected_isa());
    out["active"] = hps::isa_name(active);
    out["flags"] = flags;
    out["paths"] = paths;
    out["num_threads"] = hps::num_threads();
    return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "hetero_ps native kernels (use hetero_ps.kernels, not this module)";
    hps::active_isa();  // probe the CPU and read HETERO_PS_ISA now, so a bad value fails the import

    m.def("weighted_accumulate", &weighted_accumulate, py::arg("acc"), py::arg("g"), py::arg("w"), py::arg("g_dtype"),
          "acc += w * g for g float32/float16/bfloat16 ('f32'|'f16'|'bf16')");

    m.def(
        "f32_to_f16",
        [](const py::array& s, const py::array& o) {
            convert<hps::f32_to_f16>(s, o, DT::f32, DT::f32, DT::u16, DT::f16);
        },
        py::arg("src"), py::arg("out"));
    m.def(
        "f16_to_f32",
        [](const py::array& s, const py::array& o) {
            convert<hps::f16_to_f32>(s, o, DT::u16, DT::f16, DT::f32, DT::f32);
        },
        py::arg("src"), py::arg("out"));
    m.def(
        "f32_to_bf16",
        [](const py::array& s, const py::array& o) {
            convert<hps::f32_to_bf16>(s, o, DT::f32, DT::f32, DT::u16, DT::u16);
        },
        py::arg("src"), py::arg("out"));
    m.def(
        "bf16_to_f32",
        [](const py::array& s, const py::array& o) {
            convert<hps::bf16_to_f32>(s, o, DT::u16, DT::u16, DT::f32, DT::f32);
        },
        py::arg("src"), py::arg("out"));

    m.def("quantize_int8", &quantize_int8, py::arg("src"), py::arg("block"), py::arg("q"), py::arg("scales"));
    m.def("dequantize_int8", &dequantize_int8, py::arg("q"), py::arg("scales"), py::arg("block"), py::arg("out"));
    m.def("dequantize_accumulate_int8", &dequantize_accumulate_int8, py::arg("acc"), py::arg("q"), py::arg("scales"),
          py::arg("w"), py::arg("block"));
    m.def("topk", &topk, py::arg("x"), py::arg("k"), py::arg("idx_out"), py::arg("val_out"));
    m.def("topk_error_feedback", &topk_error_feedback, py::arg("g"), py::arg("residual"), py::arg("k"),
          py::arg("idx_out"), py::arg("val_out"));
    m.def("scatter_accumulate", &scatter_accumulate, py::arg("acc"), py::arg("indices"), py::arg("values"),
          py::arg("w"));
    m.def("sgd_step", &sgd_step, py::arg("param"), py::arg("grad"), py::arg("momentum_buf"), py::arg("lr"),
          py::arg("momentum"), py::arg("weight_decay"));
    m.def("adam_step", &adam_step, py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
          py::arg("step_size"), py::arg("bias2_sqrt"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
          py::arg("weight_decay"), py::arg("decay"), py::arg("decoupled"));
    m.def("checksum", &checksum, py::arg("buf"), py::arg("value") = 0, "CRC-32C, continuing from `value`");

    m.def("set_num_threads", [](int n) { hps::set_num_threads(n); }, py::arg("n"));
    m.def("get_num_threads", &hps::num_threads);
    m.def("cpu_features", &cpu_features, "CPU flags seen and the code path each kernel takes");
    m.def("available_isas", [] {
        py::list out;
        for (hps::Isa i : hps::available_isas()) out.append(hps::isa_name(i));
        return out;
    });
    m.def("get_isa", [] { return std::string(hps::isa_name(hps::active_isa())); });
    m.def(
        "set_isa",
        [](const std::string& name) { return std::string(hps::isa_name(hps::set_isa(hps::parse_isa(name)))); },
        py::arg("name"), "select a lower SIMD level (tests/benchmarks); returns the previous one");
    m.attr("PARALLEL_THRESHOLD") = hps::kParallelMinElems;
}
