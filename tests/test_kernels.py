"""The kernels (hetero_ps.kernels) on both backends: against each other, against numpy/torch
ground truth, on edge inputs, and on bad arguments.

Every kernel test runs on the native backend (at the best SIMD level of this CPU) and on the numpy
reference; test_isa_levels_agree replays a battery at every SIMD level the CPU can run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import crc32c
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hetero_ps import kernels

NAMES = ["native", "reference"]
RNG = np.random.default_rng(20240601)
ODD_SIZES = [0, 1, 2, 7, 15, 17, 31, 33, 255, 257, 1001]
BIG = 1_000_003  # above the native threading threshold once doubled; odd on purpose
THRESHOLD = 1 << 20


def _backend(name):
    try:
        return kernels.get_backend(name)
    except ImportError as e:
        pytest.skip(str(e))


@pytest.fixture(params=NAMES, ids=NAMES)
def K(request):
    return _backend(request.param)


@pytest.fixture
def native():
    return _backend("native")


@pytest.fixture
def reference():
    return kernels.get_backend("reference")


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[a.dtype.itemsize])


def same_bits(a, b) -> bool:
    return np.asarray(a).shape == np.asarray(b).shape and bool(np.array_equal(bits(a), bits(b)))


def same_values(a, b) -> bool:
    """Bit-equal except that NaNs only need to be NaN in both: when both operands of an add are NaN,
    IEEE 754 leaves open whose payload survives, and numpy and the CPU may pick differently."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    na, nb = np.isnan(a), np.isnan(b)
    return bool(np.array_equal(na, nb) and np.array_equal(bits(a)[~na], bits(b)[~nb]))


def special_f32(n: int) -> np.ndarray:
    """A mix of normal values, ±0, ±inf, NaNs, float32 and float16 subnormals and huge values."""
    x = RNG.standard_normal(n).astype(np.float32)
    if n:
        picks = np.array(
            [
                0.0,
                -0.0,
                np.inf,
                -np.inf,
                np.nan,
                1e-40,
                -1e-45,
                3e-8,
                6e-8,
                65504.0,
                65520.0,
                -65519.0,
                1e38,
                -3.4e38,
                2.0**-24,
                2.0**-25,
                1.5 * 2.0**-24,
            ],
            dtype=np.float32,
        )
        where = RNG.integers(0, n, max(1, n // 4))
        x[where] = picks[RNG.integers(0, picks.size, where.size)]
    return x


def random_bits_f32(n: int) -> np.ndarray:
    return RNG.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)


def unaligned_f32(values: np.ndarray) -> np.ndarray:
    """A writable float32 copy of `values` whose data pointer is 2 bytes off 4-byte alignment."""
    buf = bytearray(values.nbytes + 2)
    a = np.frombuffer(buf, dtype=np.float32, offset=2, count=values.size)
    a[...] = values
    assert not a.flags.aligned
    return a


def np_f16_bits(x: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return x.astype(np.float16).view(np.uint16)


def torch_bf16_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def assert_f16_truth(x: np.ndarray, h: np.ndarray) -> None:
    """h equals numpy's float16 cast bit for bit, except that NaNs only need to be quiet NaNs."""
    h = np.asarray(h).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(h[~nan], np_f16_bits(x[~nan]))
    assert np.all((h[nan] & 0x7E00) == 0x7E00)


def assert_bf16_truth(x: np.ndarray, b: np.ndarray) -> None:
    b = np.asarray(b).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(b[~nan], torch_bf16_bits(x[~nan]))
    assert np.all((b[nan] & 0x7FC0) == 0x7FC0)


def brute_topk(x: np.ndarray, k: int) -> np.ndarray:
    key = (x.view(np.uint32) & 0x7FFFFFFF).astype(np.int64)
    order = np.lexsort((np.arange(x.size), -key))  # largest key first, then lowest index
    return np.sort(order[:k]).astype(np.int32)


# ------------------------------------------------------------------ backend selection
def test_backend_choice_and_inventory():
    assert kernels.BACKEND in ("native", "reference")
    names = kernels.backends()
    assert "reference" in names and set(names) <= {"native", "reference"}
    if os.environ.get("HETERO_PS_KERNELS") != "reference" and "native" in names:
        assert kernels.BACKEND == "native"
    with pytest.raises(ValueError):
        kernels.get_backend("fortran")


def _run_import(code: str, env_value: str | None, block_native: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("HETERO_PS_KERNELS", None)
    if env_value is not None:
        env["HETERO_PS_KERNELS"] = env_value
    prelude = "import sys, warnings\nwarnings.simplefilter('always')\n"
    if block_native:
        prelude += "sys.modules['hetero_ps._C'] = None  # makes `from hetero_ps import _C` fail\n"
    return subprocess.run([sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True, timeout=60)


def test_fallback_warns_once_when_extension_is_missing():
    code = (
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import hetero_ps.kernels as k\n"
        "    import hetero_ps.kernels\n"
        "hits = [x for x in w if x.category is RuntimeWarning and 'hetero_ps._C' in str(x.message)]\n"
        "print(k.BACKEND, len(hits))\n"
        "print(hits[0].message)\n"
        "import numpy as np\n"
        "print(k.checksum(b'123456789'))\n"
    )
    r = _run_import(code, None, block_native=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "reference 1"
    assert "pip install --no-build-isolation -e ." in lines[1] and "HETERO_PS_KERNELS=reference" in lines[1]
    assert lines[2] == str(0xE3069283)


def test_env_forces_reference_without_warning():
    code = (
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import hetero_ps.kernels as k\n"
        "print(k.BACKEND, sorted(k.backends()), len([x for x in w if x.category is RuntimeWarning]))\n"
    )
    r = _run_import(code, "reference", block_native=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "reference ['reference'] 0"


def test_env_native_requires_extension_and_bad_value_is_rejected():
    r = _run_import("import hetero_ps.kernels\n", "native", block_native=True)
    assert r.returncode != 0 and "ImportError" in r.stderr and "HETERO_PS_KERNELS=native" in r.stderr
    r = _run_import("import hetero_ps.kernels\n", "fast", block_native=False)
    assert r.returncode != 0 and "ConfigError" in r.stderr
    r = _run_import(
        "import os\nos.environ['HETERO_PS_ISA'] = 'sse9'\nimport hetero_ps.kernels\n", None, block_native=False
    )
    assert r.returncode != 0 and "ConfigError" in r.stderr and "HETERO_PS_ISA" in r.stderr


# ------------------------------------------------------------------ float16 / bfloat16
@pytest.mark.parametrize("n", ODD_SIZES)
def test_f16_conversions_match_numpy(K, n):
    x = special_f32(n)
    h = K.f32_to_f16(x)
    assert h.dtype == np.uint16 and h.shape == (n,)
    assert_f16_truth(x, h)
    back = K.f16_to_f32(h)
    ref = h.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(bits(back)[~nan], bits(ref)[~nan]) and np.isnan(back[nan]).all()


@pytest.mark.parametrize("n", ODD_SIZES)
def test_bf16_conversions_match_torch(K, n):
    x = special_f32(n)
    b = K.f32_to_bf16(x)
    assert b.dtype == np.uint16
    assert_bf16_truth(x, b)
    back = K.bf16_to_f32(b)
    ref = torch.from_numpy(b.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    nan = np.isnan(ref)
    assert np.array_equal(bits(back)[~nan], bits(ref)[~nan]) and np.isnan(back[nan]).all()


def test_f16_rounding_edges(K):
    # ties to even, overflow threshold, subnormal boundaries, exactly representable extremes
    x = np.array(
        [
            1 + 2**-11,
            1 + 3 * 2**-11,
            1 + 2**-11 + 2**-20,
            65504,
            65519.996,
            65520,
            1e6,
            -1e6,
            2**-24,
            2**-25,
            2**-25 * 1.0000001,
            3 * 2**-25,
            2**-14,
            2**-14 - 2**-25,
            6.0975552e-05,
            1e-45,
            -0.0,
        ],
        dtype=np.float32,
    )
    assert_f16_truth(x, K.f32_to_f16(x))
    h = K.f32_to_f16(x).view(np.float16)
    assert h[0] == 1.0 and h[1] == np.float16(1 + 2**-9) and h[2] == np.float16(1 + 2**-10)
    assert h[3] == 65504 and h[4] == 65504 and np.isinf(h[5]) and h[5] > 0 and np.isinf(h[7]) and h[7] < 0
    assert h[8] == np.float16(2**-24) and h[9] == 0 and h[10] == np.float16(2**-24)
    assert h[11] == np.float16(2**-23) and h[12] == np.float16(2**-14)


def test_bf16_rounding_edges(K):
    x = np.array(
        [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 3.4e38, -3.4e38, 1e-40, -1e-45, 1e-39], dtype=np.float32
    )
    assert_bf16_truth(x, K.f32_to_bf16(x))


def test_nan_stays_quiet_nan(K):
    payloads = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0x7FBFFFFF, 0xFFFFFFFF, 0x7F802000], dtype=np.uint32)
    x = payloads.view(np.float32)
    h = K.f32_to_f16(x)
    assert np.all((h & 0x7E00) == 0x7E00)
    assert np.array_equal(h >> 15, (payloads >> 31).astype(np.uint16))  # sign kept
    b = K.f32_to_bf16(x)
    assert np.all((b & 0x7FC0) == 0x7FC0)
    signalling_h = np.array([0x7C01, 0xFD00], dtype=np.uint16)
    assert np.all((bits(K.f16_to_f32(signalling_h)) & 0x7FC00000) == 0x7FC00000)
    signalling_b = np.array([0x7F81, 0xFF81], dtype=np.uint16)
    assert np.all((bits(K.bf16_to_f32(signalling_b)) & 0x7FC00000) == 0x7FC00000)


def test_all_halves_widen_exactly(K):
    h = np.arange(65536, dtype=np.uint16)
    f = K.f16_to_f32(h)
    ref = h.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(bits(f)[~nan], bits(ref)[~nan]) and np.isnan(f[nan]).all()
    # and narrowing the widened value gives the half back (NaNs: quiet versions of themselves)
    back = K.f32_to_f16(f)
    assert np.array_equal(back[~nan], h[~nan]) and np.array_equal(back[nan], h[nan] | 0x0200)
    fb = K.bf16_to_f32(h)
    nanb = (h & 0x7FFF) > 0x7F80
    assert np.array_equal(bits(fb)[~nanb], h[~nanb].astype(np.uint32) << 16)
    assert np.array_equal(K.f32_to_bf16(fb)[~nanb], h[~nanb])


def test_conversions_random_bit_patterns(K):
    x = random_bits_f32(200_001)
    assert_f16_truth(x, K.f32_to_f16(x))
    assert_bf16_truth(x, K.f32_to_bf16(x))


def test_conversions_take_out_and_other_containers(K):
    x = special_f32(1001)
    out = np.empty(1001, dtype=np.float16)
    assert K.f32_to_f16(x, out=out) is out
    assert_f16_truth(x, out)
    back = np.empty(1001, dtype=np.float32)
    assert K.f16_to_f32(out, out=back) is back  # float16 input accepted for binary16
    # torch tensors in and out, bfloat16 tensors included
    t = torch.from_numpy(x.copy())
    tb = torch.empty(1001, dtype=torch.bfloat16)
    assert K.f32_to_bf16(t, out=tb) is tb
    assert np.array_equal(tb.view(torch.int16).numpy().view(np.uint16)[~np.isnan(x)], torch_bf16_bits(x)[~np.isnan(x)])
    widened = K.bf16_to_f32(tb)
    assert same_bits(widened, K.bf16_to_f32(tb.view(torch.int16).numpy().view(np.uint16)))
    # raw bytes are read as the dtype the argument needs
    raw = bytearray(x.tobytes())
    assert same_bits(K.f32_to_f16(raw), K.f32_to_f16(x))
    assert same_bits(K.f32_to_f16(memoryview(raw)), K.f32_to_f16(x))
    assert same_bits(K.f16_to_f32(bytes(K.f32_to_f16(x).tobytes())), K.f16_to_f32(K.f32_to_f16(x)))
    # a typed memoryview keeps its dtype
    assert same_bits(K.f32_to_f16(memoryview(x)), K.f32_to_f16(x))


def test_conversions_unaligned_and_offset_views(K):
    x = special_f32(1003)
    ua = unaligned_f32(x)
    assert same_bits(K.f32_to_f16(ua), K.f32_to_f16(x))
    assert same_bits(K.f32_to_bf16(x[1:]), K.f32_to_bf16(x)[1:])
    out_buf = bytearray(2 * 1003 + 1)
    out = np.frombuffer(out_buf, dtype=np.uint16, offset=1, count=1003)
    K.f32_to_f16(ua, out=out)
    assert same_bits(out, K.f32_to_f16(x))
    wide_buf = bytearray(4 * 1003 + 2)
    wide = np.frombuffer(wide_buf, dtype=np.float32, offset=2, count=1003)
    K.f16_to_f32(out, out=wide)
    assert same_bits(wide, K.f16_to_f32(K.f32_to_f16(x)))


# ------------------------------------------------------------------ weighted accumulate
@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("kind", ["f32", "f16", "bf16"])
def test_weighted_accumulate_exact(K, n, kind):
    acc0 = special_f32(n)
    g32 = special_f32(n)
    g = {"f32": g32, "f16": np_f16_bits(g32), "bf16": torch_bf16_bits(g32)}[kind]
    with np.errstate(all="ignore"):
        widened = {
            "f32": g32,
            "f16": g.view(np.float16).astype(np.float32),
            "bf16": (g.astype(np.uint32) << 16).view(np.float32),
        }[kind]
    w = 0.3
    acc = acc0.copy()
    out = K.weighted_accumulate(acc, g, w, g_dtype=kind)
    assert out is acc
    with np.errstate(all="ignore"):
        truth = acc0 + np.float32(w) * widened
    nan = np.isnan(truth)
    assert np.array_equal(bits(acc)[~nan], bits(truth)[~nan]) and np.isnan(acc[nan]).all()


def test_weighted_accumulate_infers_dtype_and_matches_torch(K):
    n = 4099
    acc0, g = RNG.standard_normal(n).astype(np.float32), RNG.standard_normal(n).astype(np.float32)
    t_acc = torch.from_numpy(acc0.copy())
    K.weighted_accumulate(t_acc, torch.from_numpy(g), 0.25)
    ref = torch.from_numpy(acc0.copy()).add_(torch.from_numpy(g), alpha=0.25)
    assert torch.allclose(t_acc, ref, rtol=1e-6, atol=1e-7)
    # float16 and bfloat16 inferred from the dtype
    a1 = acc0.copy()
    K.weighted_accumulate(a1, g.astype(np.float16), 2.0)
    assert same_bits(a1, acc0 + np.float32(2.0) * g.astype(np.float16).astype(np.float32))
    a2 = torch.from_numpy(acc0.copy())
    gb = torch.from_numpy(g).to(torch.bfloat16)
    K.weighted_accumulate(a2, gb, -1.5)
    assert same_bits(a2.numpy(), acc0 + np.float32(-1.5) * gb.float().numpy())
    # raw bytes with an explicit dtype
    a3 = acc0.copy()
    K.weighted_accumulate(a3, memoryview(g.tobytes()), 0.5, g_dtype="f32")
    assert same_bits(a3, acc0 + np.float32(0.5) * g)


def test_weighted_accumulate_unaligned_and_large(K):
    n = 2 * THRESHOLD + 77  # several threads on the native side
    acc0, g = RNG.standard_normal(n).astype(np.float32), RNG.standard_normal(n).astype(np.float32)
    acc = unaligned_f32(acc0)
    K.weighted_accumulate(acc, unaligned_f32(g), 1.25)
    assert same_bits(acc, acc0 + np.float32(1.25) * g)
    h = np_f16_bits(g)
    acc2 = acc0.copy()
    K.weighted_accumulate(acc2[1:], h[1:], 0.5, g_dtype="f16")
    assert same_bits(acc2[1:], acc0[1:] + np.float32(0.5) * h[1:].view(np.float16).astype(np.float32))
    assert acc2[0] == acc0[0]


# ------------------------------------------------------------------ int8
def _int8_truth(x: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int) -> None:
    """The documented int8 rules, checked block by block."""
    for b, s in enumerate(scales):
        xb, qb = x[b * block : (b + 1) * block], q[b * block : (b + 1) * block]
        if not np.isfinite(xb).all():
            assert np.isnan(s) and not qb.any()
            continue
        amax = np.float32(np.abs(xb).max()) if xb.size else np.float32(0)
        with np.errstate(all="ignore"):
            overflow = np.float32(127) / amax == np.inf
        if amax == 0 or overflow:
            assert s == 0 and not qb.any()
            continue
        assert s == amax / np.float32(127)
        assert np.abs(qb).max() <= 127
        expect = np.clip(np.rint(xb * (np.float32(127) / amax)), -127, 127).astype(np.int8)
        assert np.array_equal(qb, expect)
        err = np.abs(xb.astype(np.float64) - qb.astype(np.float64) * np.float64(s))
        assert err.max() <= 0.5 * np.float64(s) * (1 + 1e-5)


@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("block", [1, 3, 64, 256])
def test_quantize_int8_rules(K, n, block):
    x = RNG.standard_normal(n).astype(np.float32) * np.float32(RNG.uniform(1e-3, 1e3))
    if n > 40:
        x[5] = np.nan
        x[-3] = -np.inf
        x[17 : 17 + block] = 0.0
        x[30] = 1e-38
    q, scales = K.quantize_int8(x, block=block)
    assert q.dtype == np.int8 and q.shape == (n,) and scales.dtype == np.float32
    assert scales.shape == (-(-n // block),)
    _int8_truth(x, q, scales, block)
    d = K.dequantize_int8(q, scales, block=block)
    with np.errstate(all="ignore"):
        assert same_bits(d, q.astype(np.float32) * np.repeat(scales, block)[:n])
    # a block with NaN/inf decodes to NaN everywhere
    for b in range(scales.size):
        if not np.isfinite(x[b * block : (b + 1) * block]).all():
            assert np.isnan(d[b * block : (b + 1) * block]).all()


def test_quantize_int8_ties_and_tiny_blocks(K):
    # x * 127 / amax lands exactly on .5: rint goes to even
    x = np.array([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5], dtype=np.float32)
    q, s = K.quantize_int8(x, block=8)
    assert s[0] == np.float32(1.0) and list(q) == [127, 0, 2, 2, 0, -2, -2, 126]
    tiny = np.array([1e-38, -2e-38, 0, 0], dtype=np.float32)  # 127 / amax overflows
    q, s = K.quantize_int8(tiny, block=4)
    assert s[0] == 0 and not q.any()
    q, s = K.quantize_int8(np.zeros(5, np.float32), block=2)
    assert not q.any() and not s.any()


def test_dequantize_accumulate_int8(K):
    n, block = 10_007, 256
    x = RNG.standard_normal(n).astype(np.float32)
    x[300] = np.nan
    q, scales = K.quantize_int8(x, block=block)
    acc0 = RNG.standard_normal(n).astype(np.float32)
    acc = acc0.copy()
    assert K.dequantize_accumulate_int8(acc, q, scales, 0.75, block=block) is acc
    ws = np.float32(0.75) * scales
    with np.errstate(all="ignore"):
        truth = acc0 + q.astype(np.float32) * np.repeat(ws, block)[:n]
    assert same_bits(acc, truth)
    assert np.isnan(acc[256:512]).all() and np.isfinite(acc[:256]).all()
    # close to acc + w * x for the finite blocks
    fin = np.isfinite(truth)
    assert np.allclose(acc[fin], (acc0 + 0.75 * x)[fin], atol=0.75 * float(np.nanmax(scales)))


def test_int8_outputs_unaligned_large_and_torch(K):
    n, block = 2 * THRESHOLD + 5, 256
    x = RNG.standard_normal(n).astype(np.float32)
    q_ref, s_ref = kernels.get_backend("reference").quantize_int8(x, block=block)
    xs = unaligned_f32(x)
    q_buf, s_buf = bytearray(n + 1), bytearray(4 * (-(-n // block)) + 2)
    q = np.frombuffer(q_buf, dtype=np.int8, offset=1, count=n)
    s = np.frombuffer(s_buf, dtype=np.float32, offset=2)
    K.quantize_int8(xs, block=block, out=q, scales_out=s)
    assert same_bits(q, q_ref) and same_bits(s, s_ref)
    tq, ts = torch.empty(n, dtype=torch.int8), torch.empty(s_ref.size)
    rq, rs = K.quantize_int8(torch.from_numpy(x), block=block, out=tq, scales_out=ts)
    assert rq is tq and rs is ts and same_bits(tq.numpy(), q_ref)
    out = unaligned_f32(np.zeros(n, np.float32))
    K.dequantize_int8(q, s, block=block, out=out)
    assert same_bits(out, q_ref.astype(np.float32) * np.repeat(s_ref, block)[:n])


# ------------------------------------------------------------------ top-k
@pytest.mark.parametrize("n", [1, 2, 7, 33, 1001, 65_537])
def test_topk_matches_brute_force(K, n):
    x = special_f32(n)
    for k in sorted({0, 1, max(1, n // 100), n // 2, n}):
        idx, vals = K.topk(x, k)
        assert idx.dtype == np.int32 and vals.dtype == np.float32 and idx.shape == (k,)
        assert np.array_equal(idx, brute_topk(x, k))
        assert same_bits(vals, x[idx])


def test_topk_ties_nan_and_signed_zero(K):
    x = np.array([1.0, -3.0, 3.0, np.nan, -0.0, 0.0, 3.0, -np.inf, 2.0], dtype=np.float32)
    idx, vals = K.topk(x, 3)
    assert list(idx) == [1, 3, 7]  # NaN, -inf, then the first 3-magnitude (index 1)
    idx, _ = K.topk(x, 5)
    assert list(idx) == [1, 2, 3, 6, 7]
    idx, _ = K.topk(np.zeros(10, np.float32), 4)
    assert list(idx) == [0, 1, 2, 3]
    eq = np.full(5000, -2.5, np.float32)
    idx, vals = K.topk(eq, 1234)
    assert np.array_equal(idx, np.arange(1234)) and np.all(vals == -2.5)


def test_topk_matches_torch_on_distinct_values(K):
    x = RNG.standard_normal(100_000).astype(np.float32)
    idx, vals = K.topk(x, 1000)
    tv, ti = torch.topk(torch.from_numpy(np.abs(x)), 1000)
    assert np.array_equal(idx, np.sort(ti.numpy()).astype(np.int32))


def test_topk_error_feedback(K):
    n, k = 50_001, 500
    g = RNG.standard_normal(n).astype(np.float32)
    r0 = (RNG.standard_normal(n) * 0.1).astype(np.float32)
    residual = r0.copy()
    idx, vals = K.topk_error_feedback(g, residual, k)
    total = r0 + g
    assert np.array_equal(idx, brute_topk(total, k))
    assert same_bits(vals, total[idx])
    assert not residual[idx].any()
    keep = np.ones(n, bool)
    keep[idx] = False
    assert same_bits(residual[keep], total[keep])
    # sent + residual is exactly what was accumulated
    recon = residual.copy()
    recon[idx] += vals
    assert same_bits(recon, total)


def test_topk_large_unaligned_and_torch_residual(K):
    n = 2 * THRESHOLD + 3
    g = RNG.standard_normal(n).astype(np.float32)
    r = torch.zeros(n)
    idx, vals = K.topk_error_feedback(unaligned_f32(g), r, n // 100)
    assert np.array_equal(idx, brute_topk(g, n // 100))
    assert not r.numpy()[idx].any() and same_bits(vals, g[idx])


def test_topk_k_and_sizes(K):
    with pytest.raises(ValueError):
        K.topk(np.zeros(3, np.float32), 4)
    with pytest.raises(ValueError):
        K.topk(np.zeros(3, np.float32), -1)
    with pytest.raises(TypeError):
        K.topk(np.zeros(3, np.float32), 1.5)
    idx, vals = K.topk(np.zeros(0, np.float32), 0)
    assert idx.size == 0 and vals.size == 0
    r = np.ones(4, np.float32)
    idx, _ = K.topk_error_feedback(np.ones(4, np.float32), r, 0)
    assert idx.size == 0 and np.all(r == 2)  # residual still accumulates
    with pytest.raises(ValueError):
        K.topk_error_feedback(np.ones(3, np.float32), np.ones(4, np.float32), 1)


# ------------------------------------------------------------------ scatter
def test_scatter_accumulate(K):
    n = 1000
    acc0 = RNG.standard_normal(n).astype(np.float32)
    idx = np.array([5, 999, 0, 5, 5, 17], dtype=np.int32)
    vals = np.array([1.0, 2.0, 3.0, 0.1, 0.2, np.nan], dtype=np.float32)
    acc = acc0.copy()
    assert K.scatter_accumulate(acc, idx, vals, 0.5) is acc
    truth = acc0.copy()
    for i, v in zip(idx, vals):  # in order, duplicates add up
        truth[i] = truth[i] + np.float32(0.5) * v
    assert same_bits(acc, truth)
    acc64 = acc0.copy()
    K.scatter_accumulate(acc64, idx.astype(np.int64), vals, 0.5)
    assert same_bits(acc64, truth)
    raw = acc0.copy()
    K.scatter_accumulate(raw, idx.tobytes(), vals.tobytes(), 0.5)  # raw bytes: int32 + float32
    assert same_bits(raw, truth)
    empty = acc0.copy()
    K.scatter_accumulate(empty, np.zeros(0, np.int32), np.zeros(0, np.float32), 1.0)
    assert same_bits(empty, acc0)


@pytest.mark.parametrize("bad", [-1, 1000, 2**40])
def test_scatter_out_of_range_writes_nothing(K, bad):
    acc = np.zeros(1000, np.float32)
    idx = np.array([1, 2, bad, 3], dtype=np.int64)
    with pytest.raises(ValueError, match="outside"):
        K.scatter_accumulate(acc, idx, np.ones(4, np.float32), 1.0)
    assert not acc.any()


def test_scatter_decodes_topk(K):
    n = 20_000
    g = RNG.standard_normal(n).astype(np.float32)
    idx, vals = K.topk(g, 300)
    out = np.zeros(n, np.float32)
    K.scatter_accumulate(out, idx, vals, 1.0)
    assert same_bits(out[idx], g[idx]) and np.count_nonzero(out) == 300


# ------------------------------------------------------------------ checksum
def test_checksum_known_vectors(K):
    assert K.checksum(b"123456789") == 0xE3069283
    assert K.checksum(b"") == 0
    # RFC 3720 (iSCSI) B.4 test vectors
    assert K.checksum(bytes(32)) == 0x8A9136AA
    assert K.checksum(b"\xff" * 32) == 0x62A8AB43
    assert K.checksum(bytes(range(32))) == 0x46DD794E
    assert K.checksum(bytes(range(31, -1, -1))) == 0x113FDB5C


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 255, 767, 768, 769, 24_575, 24_576, 24_577, 100_003, 5 * THRESHOLD + 11])
def test_checksum_matches_crc32c_package(K, n):
    data = RNG.integers(0, 256, n, dtype=np.uint8).tobytes()
    expect = crc32c.crc32c(data)
    assert K.checksum(data) == expect
    cut = n // 3
    assert K.checksum(data[cut:], K.checksum(data[:cut])) == expect
    assert K.checksum(memoryview(data)[1:], K.checksum(data[:1])) == expect  # unaligned start
    assert K.checksum(data, 0x12345678) == crc32c.crc32c(data, 0x12345678)


def test_checksum_containers(K):
    x = RNG.standard_normal(1001).astype(np.float32)
    expect = crc32c.crc32c(x.tobytes())
    assert K.checksum(x) == expect
    assert K.checksum(bytearray(x.tobytes())) == expect
    assert K.checksum(memoryview(x)) == expect
    assert K.checksum(torch.from_numpy(x)) == expect
    assert K.checksum(x.reshape(7, 143)) == expect
    assert K.checksum(np.frombuffer(x.tobytes(), dtype=np.uint8, offset=3)) == crc32c.crc32c(x.tobytes()[3:])
    with pytest.raises(ValueError):
        K.checksum(memoryview(x)[::2])
    with pytest.raises(ValueError):
        K.checksum(x[::2])
    with pytest.raises(TypeError):
        K.checksum("text")
    with pytest.raises(ValueError):
        K.checksum(b"x", -1)
    with pytest.raises(ValueError):
        K.checksum(b"x", 2**32)
    assert zlib.crc32(b"123456789") != K.checksum(b"123456789")  # not the zlib polynomial


# ------------------------------------------------------------------ argument errors
def _f32(n=8):
    return np.zeros(n, np.float32)


BAD_DTYPE_CALLS = {
    "wacc_acc_f64": lambda K: K.weighted_accumulate(np.zeros(8), _f32(), 1.0),
    "wacc_g_f64": lambda K: K.weighted_accumulate(_f32(), np.zeros(8), 1.0),
    "wacc_g_uint16_no_dtype": lambda K: K.weighted_accumulate(_f32(), np.zeros(8, np.uint16), 1.0),
    "wacc_raw_no_dtype": lambda K: K.weighted_accumulate(_f32(), bytes(32), 1.0),
    "wacc_g_mismatch": lambda K: K.weighted_accumulate(_f32(), _f32(), 1.0, g_dtype="f16"),
    "wacc_bf16_tensor_as_f16": lambda K: K.weighted_accumulate(
        _f32(), torch.zeros(8, dtype=torch.bfloat16), 1.0, g_dtype="f16"
    ),
    "wacc_w_str": lambda K: K.weighted_accumulate(_f32(), _f32(), "1"),
    "to_f16_src_f64": lambda K: K.f32_to_f16(np.zeros(8)),
    "to_f16_out_f32": lambda K: K.f32_to_f16(_f32(), out=_f32()),
    "to_bf16_out_f16": lambda K: K.f32_to_bf16(_f32(), out=np.zeros(8, np.float16)),
    "from_bf16_src_f32": lambda K: K.bf16_to_f32(_f32()),
    "from_f16_bf16_tensor": lambda K: K.f16_to_f32(torch.zeros(8, dtype=torch.bfloat16)),
    "quant_src_f64": lambda K: K.quantize_int8(np.zeros(8)),
    "quant_out_u8": lambda K: K.quantize_int8(_f32(), out=np.zeros(8, np.uint8)),
    "dequant_q_f32": lambda K: K.dequantize_int8(_f32(), np.zeros(1, np.float32)),
    "topk_f64": lambda K: K.topk(np.zeros(8), 1),
    "scatter_idx_f32": lambda K: K.scatter_accumulate(_f32(), _f32(2), _f32(2), 1.0),
    "scatter_idx_u32": lambda K: K.scatter_accumulate(_f32(), np.zeros(2, np.uint32), _f32(2), 1.0),
    "not_an_array": lambda K: K.f32_to_f16([1.0, 2.0]),
    "big_endian": lambda K: K.f32_to_f16(np.zeros(8, ">f4")),
    "block_float": lambda K: K.quantize_int8(_f32(), block=2.0),
}

BAD_VALUE_CALLS = {
    "wacc_size": lambda K: K.weighted_accumulate(_f32(8), _f32(9), 1.0),
    "wacc_noncontig_g": lambda K: K.weighted_accumulate(_f32(4), _f32(8)[::2], 1.0),
    "wacc_noncontig_acc": lambda K: K.weighted_accumulate(_f32(8)[::2], _f32(4), 1.0),
    "wacc_readonly": lambda K: K.weighted_accumulate(np.frombuffer(bytes(32), np.float32), _f32(), 1.0),
    "wacc_bad_g_dtype": lambda K: K.weighted_accumulate(_f32(), _f32(), 1.0, g_dtype="f64"),
    "wacc_torch_noncontig": lambda K: K.weighted_accumulate(torch.zeros(8)[::2], torch.zeros(4), 1.0),
    "wacc_raw_not_multiple": lambda K: K.weighted_accumulate(_f32(2), bytes(7), 1.0, g_dtype="f32"),
    "to_f16_out_size": lambda K: K.f32_to_f16(_f32(8), out=np.zeros(7, np.uint16)),
    "to_f16_out_readonly": lambda K: K.f32_to_f16(_f32(8), out=np.frombuffer(bytes(16), np.uint16)),
    "to_f16_noncontig_2d": lambda K: K.f32_to_f16(np.zeros((4, 4), np.float32)[:, :2]),
    "quant_block_zero": lambda K: K.quantize_int8(_f32(), block=0),
    "quant_scales_size": lambda K: K.quantize_int8(_f32(8), block=4, scales_out=np.zeros(3, np.float32)),
    "dequant_scales_size": lambda K: K.dequantize_int8(np.zeros(8, np.int8), np.zeros(1, np.float32), block=4),
    "dequant_acc_size": lambda K: K.dequantize_accumulate_int8(
        _f32(8), np.zeros(7, np.int8), np.zeros(1, np.float32), 1.0
    ),
    "topk_readonly_residual": lambda K: K.topk_error_feedback(_f32(), np.frombuffer(bytes(32), np.float32), 1),
    "scatter_values_size": lambda K: K.scatter_accumulate(_f32(), np.zeros(2, np.int32), _f32(3), 1.0),
    "threads_zero": lambda K: K.set_num_threads(0),
}


@pytest.mark.parametrize("call", list(BAD_DTYPE_CALLS.values()), ids=list(BAD_DTYPE_CALLS))
def test_wrong_dtype_is_type_error(K, call):
    with pytest.raises(TypeError):
        call(K)


@pytest.mark.parametrize("call", list(BAD_VALUE_CALLS.values()), ids=list(BAD_VALUE_CALLS))
def test_bad_layout_or_size_is_value_error(K, call):
    with pytest.raises(ValueError):
        call(K)


def test_errors_leave_outputs_untouched(K):
    acc = np.ones(8, np.float32)
    with pytest.raises(ValueError):
        K.weighted_accumulate(acc, _f32(9), 1.0)
    assert np.all(acc == 1)


# ------------------------------------------------------------------ native extension specifics
def test_native_bindings_check_arguments_themselves(native):
    C = native.impl
    with pytest.raises(TypeError):
        C.f32_to_f16(np.zeros(4), np.zeros(4, np.uint16))
    with pytest.raises(TypeError):
        C.f32_to_f16([0.0], np.zeros(1, np.uint16))  # lists are not converted (no silent copy)
    with pytest.raises(ValueError):
        C.f32_to_f16(_f32(8)[::2], np.zeros(4, np.uint16))
    with pytest.raises(ValueError):
        C.f32_to_f16(_f32(4), np.frombuffer(bytes(8), np.uint16))
    with pytest.raises(ValueError):
        C.weighted_accumulate(_f32(4), _f32(5), 1.0, "f32")
    with pytest.raises(ValueError):
        C.weighted_accumulate(_f32(4), _f32(4), 1.0, "f64")
    with pytest.raises(ValueError):
        C.quantize_int8(_f32(4), 0, np.zeros(4, np.int8), np.zeros(1, np.float32))
    with pytest.raises(ValueError):
        C.topk(_f32(4), 5, np.zeros(5, np.int32), np.zeros(5, np.float32))
    with pytest.raises(ValueError):
        C.scatter_accumulate(_f32(4), np.array([4], np.int32), _f32(1), 1.0)
    with pytest.raises(ValueError):
        C.checksum(memoryview(b"abcd")[::2])
    with pytest.raises(TypeError):
        C.checksum(12)
    with pytest.raises(ValueError):
        C.set_isa("avx9000")


def test_native_threads_and_features(native):
    C = native.impl
    feats = native.cpu_features()
    assert feats["active"] in C.available_isas() and feats["detected"] == C.available_isas()[-1]
    assert set(feats["paths"]) >= {"weighted_accumulate", "convert", "int8", "checksum"}
    assert C.PARALLEL_THRESHOLD == THRESHOLD
    before = native.get_num_threads()
    n = 3 * THRESHOLD + 1
    x = random_bits_f32(n)
    data = x.tobytes()
    try:
        results = []
        for threads in (1, 3, 8):
            native.set_num_threads(threads)
            assert native.get_num_threads() == threads
            results.append(
                (native.f32_to_f16(x), native.quantize_int8(x)[0], native.topk(x, 1000)[0], native.checksum(data))
            )
        for r in results[1:]:
            assert all(same_bits(a, b) for a, b in zip(r[:3], results[0][:3])) and r[3] == results[0][3]
        assert results[0][3] == crc32c.crc32c(data)
    finally:
        native.set_num_threads(before)


def _battery(B, ref) -> None:
    """Every kernel on awkward sizes, native at the current ISA level vs the reference."""
    for n in (0, 1, 15, 16, 17, 31, 33, 63, 65, 100, 257, 4111):
        x = special_f32(n)
        rb = random_bits_f32(n)
        for src in (x, rb):
            assert same_bits(B.f32_to_f16(src), ref.f32_to_f16(src))
            assert same_bits(B.f32_to_bf16(src), ref.f32_to_bf16(src))
            h = bits(src).astype(np.uint16)
            assert same_bits(B.f16_to_f32(h), ref.f16_to_f32(h))
            assert same_bits(B.bf16_to_f32(h), ref.bf16_to_f32(h))
            for kind, g in (("f32", src), ("f16", h), ("bf16", h)):
                a1, a2 = x.copy(), x.copy()
                B.weighted_accumulate(a1, g, 0.7, g_dtype=kind)
                ref.weighted_accumulate(a2, g, 0.7, g_dtype=kind)
                assert same_values(a1, a2), kind
            for block in (1, 7, 32, 256):
                q1, s1 = B.quantize_int8(src, block=block)
                q2, s2 = ref.quantize_int8(src, block=block)
                assert same_bits(q1, q2) and same_bits(s1, s2)
                assert same_bits(B.dequantize_int8(q1, s1, block=block), ref.dequantize_int8(q1, s1, block=block))
                a1, a2 = x.copy(), x.copy()
                B.dequantize_accumulate_int8(a1, q1, s1, -0.3, block=block)
                ref.dequantize_accumulate_int8(a2, q1, s1, -0.3, block=block)
                assert same_values(a1, a2)
        _optimizer_battery(B, ref, x, rb)
        data = rb.tobytes()
        assert B.checksum(data) == ref.checksum(data)
        assert B.checksum(data[1:]) == ref.checksum(data[1:])


def _optimizer_battery(B, ref, x: np.ndarray, g: np.ndarray) -> None:
    """The optimizer steps on special values and random bit patterns: the same values on both."""
    for kw in ({}, {"weight_decay": 0.01}):
        for buf in (None, np.abs(g[::-1])):
            p1, p2 = x.copy(), x.copy()
            b1, b2 = (None, None) if buf is None else (buf.copy(), buf.copy())
            B.sgd_step(p1, g, b1, lr=0.1, momentum=0.9 if buf is not None else 0.0, **kw)
            ref.sgd_step(p2, g, b2, lr=0.1, momentum=0.9 if buf is not None else 0.0, **kw)
            assert same_values(p1, p2) and (buf is None or same_values(b1, b2))
        for decoupled in (False, True):
            state = [x.copy(), np.abs(x)]
            out = []
            for K in (B, ref):
                p, m, v = x[::-1].copy(), state[0].copy(), state[1].copy()
                K.adam_step(p, g, m, v, lr=1e-3, step=3, decoupled=decoupled, **kw)
                out.append((p, m, v))
            assert all(same_values(a, b) for a, b in zip(*out)), (kw, decoupled)


@pytest.mark.parametrize("isa", ["scalar", "sse4.2", "avx2", "avx512"])
def test_isa_levels_agree(native, reference, isa):
    C = native.impl
    if isa not in C.available_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels (best: {C.available_isas()[-1]})")
    previous = C.set_isa(isa)
    try:
        assert C.get_isa() == isa
        assert native.cpu_features()["paths"]["checksum"] == ("table" if isa == "scalar" else "sse4.2")
        _battery(native, reference)
    finally:
        C.set_isa(previous)


def test_isa_env_cap_in_subprocess(native):
    code = "import hetero_ps.kernels as k; print(k.cpu_features()['active'])"
    env = dict(os.environ, HETERO_PS_ISA="scalar")
    env.pop("HETERO_PS_KERNELS", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "scalar", r.stderr


# ------------------------------------------------------------------ properties
@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.uint32, st.integers(0, 300), elements=st.integers(0, 2**32 - 1)))
def test_property_conversions_any_bit_pattern(pattern):
    x = pattern.view(np.float32)
    for B in kernels.backends().values():
        assert_f16_truth(x, B.f32_to_f16(x))
        assert_bf16_truth(x, B.f32_to_bf16(x))


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3000), st.integers(0, 3000), st.integers(0, 2**32 - 1))
def test_property_checksum_is_incremental(data, cut, start):
    cut = min(cut, len(data))
    for B in kernels.backends().values():
        assert B.checksum(data[cut:], B.checksum(data[:cut], start)) == crc32c.crc32c(data, start)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.integers(1, 400),
        elements=st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 1e-40, np.inf, -np.inf, np.nan, 7.0]),
    ),
    st.floats(0, 1),
)
def test_property_topk_equals_brute_force(x, frac):
    k = int(frac * x.size)
    expect = brute_topk(x, k)
    for B in kernels.backends().values():
        idx, vals = B.topk(x, k)
        assert np.array_equal(idx, expect) and same_bits(vals, x[expect])


# ------------------------------------------------------------------ optimizer steps
def _torch_steps(opt_cls, p0: np.ndarray, grads: list[np.ndarray], **kw) -> np.ndarray:
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = torch.from_numpy(g)
        opt.step()
    return p.detach().numpy()


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.0, 1e-3), (0.9, 0.0), (0.9, 5e-4)])
def test_sgd_step_is_torchs_sgd(K, momentum, weight_decay):
    n = BIG  # threaded on the native backend
    p0 = RNG.standard_normal(n).astype(np.float32)
    grads = [RNG.standard_normal(n).astype(np.float32) for _ in range(3)]
    p, buf = p0.copy(), np.zeros(n, np.float32) if momentum else None
    for g in grads:
        K.sgd_step(p, g, buf, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    want = _torch_steps(torch.optim.SGD, p0, grads, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    np.testing.assert_allclose(p, want, rtol=1e-6, atol=1e-6)  # torch may fuse its multiply-adds
    assert not np.array_equal(p, p0)
    # Without momentum or decay: exactly p − lr·g, one rounding (what the chaos test's exact updates need).
    q, g = p0.copy(), grads[0]
    K.sgd_step(q, g, None, lr=0.5)
    assert same_bits(q, p0 - np.float32(0.5) * g)


@pytest.mark.parametrize("decoupled,weight_decay", [(False, 0.0), (False, 0.01), (True, 0.01)])
def test_adam_step_is_torchs_adam(K, decoupled, weight_decay):
    n = BIG
    p0 = RNG.standard_normal(n).astype(np.float32)
    grads = [RNG.standard_normal(n).astype(np.float32) for _ in range(3)]
    p, m, v = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    for t, g in enumerate(grads, start=1):
        K.adam_step(p, g, m, v, lr=1e-3, step=t, weight_decay=weight_decay, decoupled=decoupled)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    want = _torch_steps(cls, p0, grads, lr=1e-3, weight_decay=weight_decay)
    np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-6)


def test_optimizer_steps_refuse_bad_arguments(K):
    p, g = np.zeros(8, np.float32), np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="grad has 7 elements"):
        K.sgd_step(p, g[:7], None, lr=0.1)
    with pytest.raises(ValueError, match="momentum_buf has 4 elements"):
        K.sgd_step(p, g, np.zeros(4, np.float32), lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match="param must be float32"):
        K.sgd_step(p.astype(np.float64), g, None, lr=0.1)
    with pytest.raises(ValueError, match="param is read-only"):
        ro = p.copy()
        ro.flags.writeable = False
        K.sgd_step(ro, g, None, lr=0.1)
    with pytest.raises(ValueError, match="step must be >= 1"):
        K.adam_step(p, g, p.copy(), p.copy(), lr=0.1, step=0)
