"""Compression without a process group: compressors, overflow-safe scaling, rounding with error feedback,
chunking and the stage schedule, stream workers.

Tolerances: float16 rounds to nearest with unit roundoff u = 2**-11 (relative error <= u for normal
numbers), bfloat16 with u = 2**-8.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from shoal.core.algorithms._levels import _cast, scale_factors
from shoal.core.algorithms._pipeline import Worker, chunk_bounds, run_stages
from shoal.core.compression import COMPRESSION_NAMES, Compression, get_compressor, resolve_compression

_U = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
_MAX = {torch.float16: 65504.0, torch.bfloat16: 3.39e38}


@pytest.mark.parametrize("comp", [Compression.fp16, Compression.bf16, Compression.mixed_fp16,
                                  Compression.mixed_bf16])
def test_round_trip_within_unit_roundoff(comp):
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 100
    wire = comp.compress(x)
    assert wire.dtype == comp.wire_dtype
    back = comp.decompress(wire, torch.empty_like(x))
    assert back.dtype == torch.float32
    assert ((back - x).abs() <= _U[comp.wire_dtype] * x.abs()).all()


def test_none_and_non_float_pass_through():
    x = torch.randn(5)
    assert Compression.none.compress(x) is x
    assert Compression.none.decompress(x, x) is x
    ints = torch.arange(5)
    assert Compression.fp16.compress(ints) is ints


def test_fp16_overflows_where_bf16_does_not():
    # Why "scale before the sum" matters: two values near float16's max sum to inf in float16.
    x = torch.full((4,), 60000.0)
    assert torch.isinf((x + x).half()).all()
    assert torch.isfinite(Compression.fp16.compress(x / 2 + x / 2)).all()
    assert torch.isfinite((x + x).bfloat16()).all()


def test_names_and_resolution():
    assert COMPRESSION_NAMES == ("none", "fp16", "bf16", "mixed_fp16", "mixed_bf16", "int8", "mixed_int8",
                                 "powersgd", "mixed_powersgd")
    for name in COMPRESSION_NAMES:
        assert get_compressor(name).name == name
        assert resolve_compression(name) == name
        assert resolve_compression(get_compressor(name)) == name
    assert resolve_compression(None) is None
    assert Compression.mixed_fp16.cross_node_only and not Compression.fp16.cross_node_only
    with pytest.raises(ValueError, match="mixed_bf16"):
        get_compressor("fp8")
    with pytest.raises(ValueError, match="unknown compression"):
        resolve_compression("int4")


def test_config_accepts_every_compression_and_error_feedback():
    from shoal.core.env import read_config  # noqa: PLC0415

    for name in COMPRESSION_NAMES:
        assert read_config({"SHOAL_COMPRESSION": name}).compression == name
    assert read_config({}).error_feedback is False
    assert read_config({"SHOAL_ERROR_FEEDBACK": "1"}).error_feedback is True
    with pytest.raises(ValueError, match="SHOAL_COMPRESSION"):
        read_config({"SHOAL_COMPRESSION": "fp8"})


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_scale_factors_overflow_safe(world):
    # Average: postscale = 1/n. Everything before the cast.
    assert scale_factors(1.0, 1.0 / world, world, compressed=True) == (1.0 / world, 1.0)
    # Sum: divided by n before the cast, multiplied by n after (in float32).
    before, after = scale_factors(1.0, 1.0, world, compressed=True)
    assert before == pytest.approx(1.0 / world) and after == pytest.approx(world)
    # Horovod's gradient_predivide_factor f: prescale 1/f, postscale f/n.
    before, after = scale_factors(0.5, 2.0 / world, world, compressed=True)
    assert before * after == pytest.approx(1.0 / world) and before <= 1.0 / world + 1e-12
    # Full precision: Horovod's meaning, untouched.
    assert scale_factors(0.5, 3.0, world, compressed=False) == (0.5, 3.0)
    # The point: n contributions near float16's max, each scaled, sum to a finite float16.
    x = torch.full((3,), 65000.0)
    before, _ = scale_factors(1.0, 1.0, world, compressed=True)
    assert torch.isfinite((x * before).half().float() * world).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_with_residual_keeps_what_rounding_dropped(dtype):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    out = torch.empty(1000, dtype=dtype)
    res = torch.zeros(1000)
    _cast(out, x, res)
    assert torch.equal(res, x - out.float())  # exactly what was dropped
    assert (res.abs() <= _U[dtype] * x.abs()).all()
    # Next step: the residual is added before rounding; over K steps of the same value the sum of what
    # was sent stays within one rounding of K*x (without feedback the error grows like K).
    sent = out.float().clone()
    for _ in range(49):
        _cast(out, x, res)
        sent += out.float()
    assert ((sent - 50 * x).abs() <= 2 * _U[dtype] * x.abs() + 1e-30).all()
    plain = x.to(dtype).float() * 50
    assert (plain - 50 * x).abs().max() > 10 * (sent - 50 * x).abs().max()


def test_cast_without_residual_is_a_plain_copy():
    x = torch.randn(100)
    out = torch.empty(100, dtype=torch.float16)
    _cast(out, x, None)
    assert torch.equal(out, x.half())


@pytest.mark.parametrize("numel,chunk,multiple", [(10, 4, 2), (100, 7, 3), (5, 100, 4), (0, 8, 2),
                                                  (1 << 20, 1 << 18, 6)])
def test_chunk_bounds_cover_and_align(numel, chunk, multiple):
    bounds = chunk_bounds(numel, chunk, multiple)
    assert bounds[0][0] == 0 and bounds[-1][1] == numel
    for (lo, hi), (lo2, _) in zip(bounds, bounds[1:]):
        assert hi == lo2 and (hi - lo) % multiple == 0 and hi - lo <= max(chunk, multiple)


@pytest.mark.parametrize("numel", [40, 41, 47, 1000, 1001])
def test_chunk_bounds_ramp_starts_and_ends_small(numel):
    bounds = chunk_bounds(numel, 8, 2, ramp=True)
    sizes = [hi - lo for lo, hi in bounds]
    assert bounds[0][0] == 0 and bounds[-1][1] == numel and sum(sizes) == numel
    assert sizes[:2] == [2, 4] and sizes[-2] == 4 and 2 <= sizes[-1] < 4
    assert all(size % 2 == 0 for size in sizes[:-1]) and max(sizes) <= 8
    assert chunk_bounds(31, 8, 2, ramp=True) == chunk_bounds(31, 8, 2)  # under 4 chunks: no ramp


def test_run_stages_schedule_is_fixed_and_frees_slots():
    log: list[tuple[int, int]] = []

    class _Done:
        def __init__(self, s, k):
            self.s, self.k = s, k

        def wait(self):
            log.append(("wait", self.s, self.k))

    def stage(s):
        def run(k):
            log.append(("run", s, k))
            return _Done(s, k) if s < 2 else None
        return run

    run_stages([stage(0), stage(1), stage(2)], 4)
    runs = [(s, k) for kind, s, k in log if kind == "run"]
    # Step t runs stage s on chunk t - s, stage 0 first.
    assert runs == [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (2, 0), (0, 3), (1, 2), (2, 1), (1, 3), (2, 2),
                    (2, 3)]
    # Every stage > 0 waits for its chunk's previous stage first.
    for i, entry in enumerate(log):
        if entry[0] == "run" and entry[1] > 0:
            assert log[i - 1] == ("wait", entry[1] - 1, entry[2])
    # Chunk 0 is finished (last stage ran) before chunk 3 starts: its scratch slot is free.
    assert runs.index((2, 0)) < runs.index((0, 3))
    # With a lead, stage 0 runs that many chunks ahead; chunk k finishes before chunk k + 3 + lead starts.
    log.clear()
    run_stages([stage(0), stage(1), stage(2)], 6, lead=2)
    runs = [(s, k) for kind, s, k in log if kind == "run"]
    assert runs[:5] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert sorted(runs) == sorted((s, k) for s in range(3) for k in range(6))
    assert runs.index((2, 0)) < runs.index((0, 5))
    with pytest.raises(AssertionError, match="last stage"):
        run_stages([stage(0), lambda k: _Done(9, k)], 1)


def test_worker_runs_in_order_and_fails_fast_after_a_failure():
    w = Worker("test-worker")
    seen = []
    try:
        futs = [w.submit(lambda i=i: seen.append(i) or torch.tensor(i)) for i in range(5)]
        assert [f.wait().item() for f in futs] == list(range(5))
        assert seen == list(range(5))
        bad = w.submit(lambda: 1 / 0)
        with pytest.raises(Exception, match="division by zero"):
            bad.wait()
        later = w.submit(lambda: torch.tensor(1))
        with pytest.raises(Exception, match="earlier bucket on this stream failed"):
            later.wait()
        assert w._thread.daemon and w._thread.name == "test-worker"
    finally:
        w.stop()
    assert not w._thread.is_alive()


def test_worker_scratch_is_reused_and_grows():
    w = Worker("scratch")
    a = w.scratch("k", 10, torch.float16, torch.device("cpu"))
    b = w.scratch("k", 5, torch.float16, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr() and b.numel() == 5
    c = w.scratch("k", 20, torch.float16, torch.device("cpu"))
    assert c.numel() == 20
    assert w.scratch("k", 4, torch.float32, torch.device("cpu")).dtype == torch.float32


def test_import_starts_no_thread():
    code = ("import threading, shoal.core.algorithms, shoal.core.compression, shoal.torch; "
            "print(sorted(t.name for t in threading.enumerate()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['MainThread']"
