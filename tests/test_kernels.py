"""Every SIMD kernel this machine supports agrees with the scalar reference and with float64."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hnswcache import _core

ISAS = _core.supported_isas()
DIMS = list(range(1, 1026))


def test_scalar_is_always_there():
    assert ISAS[0] == "scalar"
    assert _core.default_isa() in ISAS


@pytest.mark.parametrize("isa", ISAS)
def test_kernels_match_reference_for_every_dimension(isa):
    rng = np.random.default_rng(7)
    for dim in DIMS:
        # Offsets into a larger buffer give unaligned starts, as numpy slices do.
        buf = rng.standard_normal(2 * dim + 3).astype(np.float32)
        a, b = buf[1 : dim + 1], buf[dim + 2 : 2 * dim + 2]
        scale = float(np.abs(a.astype(np.float64) * b).sum()) + 1e-30
        exact_dot = float(a.astype(np.float64) @ b.astype(np.float64))
        exact_l2 = float(((a.astype(np.float64) - b) ** 2).sum())
        got_dot = _core.kernel_dot(isa, a, b)
        got_l2 = _core.kernel_l2sq(isa, a, b)
        assert abs(got_dot - exact_dot) <= 1e-5 * scale, (isa, dim)
        assert abs(got_l2 - exact_l2) <= 1e-5 * max(exact_l2, 1e-30), (isa, dim)
        assert abs(got_dot - _core.kernel_dot("scalar", a, b)) <= 1e-5 * scale, (isa, dim)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dim", [1, 3, 15, 16, 17, 97, 384, 1025])
def test_batch_kernels_match_single(isa, dim):
    rng = np.random.default_rng(dim)
    q = rng.standard_normal(dim).astype(np.float32)
    xs = rng.standard_normal((11, dim)).astype(np.float32)
    dots = _core.kernel_batch(isa, "dot", q, xs)
    l2s = _core.kernel_batch(isa, "l2sq", q, xs)
    np.testing.assert_allclose(dots, xs.astype(np.float64) @ q, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(l2s, ((xs.astype(np.float64) - q) ** 2).sum(1), rtol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dim", [1, 3, 7, 8, 15, 16, 17, 31, 97, 384, 1025])
def test_bfloat16_kernels_match_float64_on_the_high_halves(isa, dim):
    # float32 vectors are stored as two 16-bit halves; the graph walk reads the high ones.
    rng = np.random.default_rng(dim + 5)
    q = rng.standard_normal(dim).astype(np.float32)
    xs = rng.standard_normal((9, dim)).astype(np.float32)
    highs = (xs.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32).astype(np.float64)
    np.testing.assert_allclose(
        _core.kernel_batch(isa, "dot_b", q, xs), highs @ q, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        _core.kernel_batch(isa, "l2sq_b", q, xs), ((highs - q) ** 2).sum(1), rtol=1e-5
    )
    ref = _core.kernel_batch("scalar", "dot_b", q, xs)
    np.testing.assert_allclose(_core.kernel_batch(isa, "dot_b", q, xs), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
def test_float32_split_into_halves_joins_back_bit_for_bit(isa):
    rng = np.random.default_rng(2)
    x = np.concatenate([
        rng.standard_normal(1025).astype(np.float32),
        np.array([0.0, -0.0, 1e-45, -3.4e38, np.inf, -np.inf, 65504.0], np.float32),
    ])
    for n in (1, 7, 8, 15, 16, 17, 31, 33, len(x)):
        got = _core.split_round_trip(isa, x[:n])
        np.testing.assert_array_equal(got.view(np.uint32), x[:n].view(np.uint32))


@pytest.mark.parametrize("isa", ISAS)
def test_int8_kernel_matches_reference_for_every_dimension(isa):
    # The greedy descent through the upper levels reads 8-bit copies of the vectors.
    rng = np.random.default_rng(11)
    for dim in DIMS:
        q = rng.standard_normal(dim + 1).astype(np.float32)[1:]  # unaligned start
        codes = rng.integers(-127, 128, size=(3, dim + 1)).astype(np.int8)[:, 1:]
        exact = codes.astype(np.float64) @ q.astype(np.float64)
        scale = np.abs(codes.astype(np.float64)) @ np.abs(q.astype(np.float64)) + 1e-30
        got = _core.kernel_dot_i8(isa, q, codes)
        assert np.all(np.abs(got - exact) <= 1e-5 * scale), (isa, dim)
        ref = _core.kernel_dot_i8("scalar", q, codes)
        assert np.all(np.abs(got - ref) <= 1e-5 * scale), (isa, dim)


def test_unknown_or_unsupported_isa_is_a_clear_error():
    a = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="unknown instruction set"):
        _core.kernel_dot("sse9", a, a)
    missing = [i for i in ("avx2", "avx512", "neon") if i not in ISAS]
    for isa in missing:
        with pytest.raises(ValueError, match="not available"):
            _core.kernel_dot(isa, a, a)


@pytest.mark.parametrize("isa", ISAS)
def test_env_var_forces_the_kernel_and_results_agree(isa):
    code = (
        "import json, numpy as np, hnswcache;"
        "x=np.random.default_rng(1).standard_normal((300,37)).astype('float32');"
        "i=hnswcache.Index(37, seed=3); i.add(x, num_threads=1);"
        "l,d=i.search(x[:20],k=5,ef=300,num_threads=1);"
        "print(i.isa); print(json.dumps(l.tolist()))"
    )
    env = dict(os.environ, HNSWCACHE_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    name, labels = out.stdout.splitlines()
    assert name == isa
    ref = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, HNSWCACHE_ISA="scalar"),
        capture_output=True,
        text=True,
    )
    # Same graph, same answers up to ties: the first neighbour of a stored point is itself.
    ref_labels = json.loads(ref.stdout.splitlines()[1])
    assert [row[0] for row in json.loads(labels)] == [row[0] for row in ref_labels]


def test_env_var_naming_a_missing_kernel_fails_loudly():
    missing = [i for i in ("avx2", "avx512", "neon") if i not in ISAS]
    if not missing:
        missing = ["bogus"]
    code = "import hnswcache; hnswcache.Index(4)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, HNSWCACHE_ISA=missing[0]),
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "ValueError" in out.stderr


@pytest.mark.parametrize("isa", ISAS)
def test_float16_conversion_rounds_like_ieee(isa):
    rng = np.random.default_rng(5)
    x = np.concatenate(
        [
            rng.standard_normal(4001).astype(np.float32),
            (rng.standard_normal(500) * 1e-6).astype(np.float32),  # float16 subnormals
            np.float32([0.0, -0.0, 65504.0, -65504.0, 65519.0, 65520.0, 1e9, 6e-8, 2e-8]),
            # exact ties between two halves: round to even
            (np.arange(1, 200, dtype=np.float32) * 2.0**-10 + 2.0**-11).astype(np.float32),
        ]
    )
    with np.errstate(over="ignore"):  # 65520 and 1e9 overflow to inf, as they should
        want = x.astype(np.float16).astype(np.float32)
    got = _core.half_round_trip(isa, x)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dim", [1, 3, 15, 16, 17, 97, 384, 1025])
def test_float16_batch_kernels_match_reference(isa, dim):
    rng = np.random.default_rng(dim + 1)
    q = rng.standard_normal(dim).astype(np.float32)
    xs = rng.standard_normal((9, dim)).astype(np.float32)
    rounded = xs.astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(
        _core.kernel_batch(isa, "dot_h", q, xs), rounded @ q, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        _core.kernel_batch(isa, "l2sq_h", q, xs), ((rounded - q) ** 2).sum(1), rtol=1e-5
    )
