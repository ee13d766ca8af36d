"""Compression below 16 bits without a process group: the 8-bit block codec (round trips, independent
blocks, the wire layout, error feedback's running sum, non-finite blocks), the compression names and their
parameters (config, launcher flag), and which tensors PowerSGD compresses.

Tolerance of the 8-bit codec (written out). A block's scale is s = max|x| / 127 over its 256 values and a
value travels as round(x / s), so |decoded - x| <= s / 2 (round to nearest), the largest value of the block
is exact, and with error feedback the sum of everything decoded so far differs from the sum of everything
given by the last residual alone: at most half of the last step's quantum s. Float32 arithmetic adds a
relative 2**-23 or so to each bound (the division and the product are each rounded once).
"""

from __future__ import annotations

import argparse
import pathlib

import pytest
import torch

from shoal.core.algorithms.powersgd import plan_matrices
from shoal.core.compression import (INT8_BLOCK, Compression, decode_int8, encode_int8, get_compressor,
                                    int8_wire_nbytes, resolve_compression)
from shoal.core.config import ShoalConfig

_F32 = 2.0 ** -22  # two float32 roundings, relative


def _encode(x: torch.Tensor, residual=None) -> torch.Tensor:
    wire = torch.empty(int8_wire_nbytes(x.numel()), dtype=torch.uint8)
    encode_int8(wire, x, residual)
    return wire


def _decode(wire: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.empty(n)
    decode_int8(out, wire)
    return out


def _quanta(x: torch.Tensor) -> torch.Tensor:
    """Per element, the quantum s of its block."""
    return (x.view(-1, INT8_BLOCK).abs().amax(1, keepdim=True) / 127).expand(-1, INT8_BLOCK).reshape(-1)


def test_int8_round_trip_within_half_a_quantum():
    g = torch.Generator().manual_seed(0)
    # Blocks of very different magnitudes, one of zeros, one with a single non-zero value.
    x = torch.randn(16 * INT8_BLOCK, generator=g) * torch.logspace(-6, 6, 16).repeat_interleave(INT8_BLOCK)
    x[:INT8_BLOCK] = 0.0
    x[INT8_BLOCK:2 * INT8_BLOCK] = 0.0
    x[INT8_BLOCK + 7] = -3.5
    back = _decode(_encode(x), x.numel())
    q = _quanta(x)
    assert ((back - x).abs() <= q / 2 * (1 + _F32) + 1e-45).all()
    assert torch.equal(back[:INT8_BLOCK], torch.zeros(INT8_BLOCK))  # zeros stay zeros (no 0/0)
    assert back[INT8_BLOCK + 7] == -3.5  # the largest value of a block is exact
    # One block's scale never touches another's: the 1e-6 block keeps its relative precision.
    small = slice(2 * INT8_BLOCK, 3 * INT8_BLOCK)
    assert (back[small] - x[small]).abs().max() <= x[small].abs().max() / 254 * (1 + _F32)


def test_int8_wire_is_whole_blocks_that_concatenate():
    # Constraint 2 of the codec: the wire of two halves, concatenated, is the wire of the whole, so a
    # piece of a chunk is a byte range of the chunk's wire.
    x = torch.randn(8 * INT8_BLOCK, generator=torch.Generator().manual_seed(1))
    whole = _encode(x)
    halves = torch.cat([_encode(x[:3 * INT8_BLOCK]), _encode(x[3 * INT8_BLOCK:])])
    assert torch.equal(whole, halves)
    assert whole.numel() == 8 * (INT8_BLOCK + 4)  # 1.6% of scale on top of one byte per value
    # Decoding into a shorter tensor (a padded last chunk) drops the padding.
    part = torch.empty(3 * INT8_BLOCK + 5)
    decode_int8(part, whole)
    assert torch.equal(part, _decode(whole, x.numel())[:3 * INT8_BLOCK + 5])
    acc = torch.ones(3 * INT8_BLOCK + 5)
    decode_int8(acc, whole, add=True)
    assert torch.equal(acc, part + 1)
    with pytest.raises(ValueError, match="multiple of the block"):
        _encode(torch.ones(INT8_BLOCK + 1))


def test_int8_error_feedback_keeps_the_running_sum_within_one_quantum():
    # The same gradient every step, the worst case for rounding without feedback: the error then grows
    # by the same amount each step. With feedback, sum(decoded) = sum(given) - residual, and the residual
    # is at most half of the last quantum.
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4 * INT8_BLOCK, generator=g) + 0.3
    steps = 50
    residual = torch.zeros_like(x)
    sent = torch.zeros(x.numel(), dtype=torch.float64)
    plain = torch.zeros(x.numel(), dtype=torch.float64)
    for _ in range(steps):
        sent += _decode(_encode(x, residual), x.numel()).double()
        plain += _decode(_encode(x), x.numel()).double()
    truth = steps * x.double()
    quantum = _quanta(x + residual).double().max()  # the last step's quantum (x plus what it carried)
    err = (sent - truth).abs().max()
    assert err <= quantum / 2 * (1 + 1e-5) + steps * x.abs().max() * 2.0 ** -24, (err, quantum)
    assert (plain - truth).abs().max() > 10 * err  # without feedback it drifts


def test_int8_non_finite_block_is_nan_and_its_residual_restarts():
    x = torch.randn(3 * INT8_BLOCK, generator=torch.Generator().manual_seed(3))
    x[INT8_BLOCK + 1] = float("nan")
    x[2 * INT8_BLOCK + 2] = float("inf")
    residual = torch.zeros_like(x)
    back = _decode(_encode(x, residual), x.numel())
    assert torch.isfinite(back[:INT8_BLOCK]).all()
    assert torch.isnan(back[INT8_BLOCK:]).all()  # the NaN check's world is unchanged: non-finite stays so
    assert torch.equal(residual[INT8_BLOCK:], torch.zeros(2 * INT8_BLOCK))  # no NaN carried to next step
    assert torch.isfinite(residual).all()


def test_int8_compressor_round_trip_and_powersgd_is_not_per_tensor():
    x = torch.randn(7, 33)
    wire = Compression.int8.compress(x)
    assert wire.dtype == torch.uint8 and wire.numel() == int8_wire_nbytes(7 * 33)
    back = Compression.int8.decompress(wire, torch.empty_like(x))
    assert ((back - x).abs() <= x.abs().max() / 254 * (1 + _F32)).all()
    with pytest.raises(TypeError, match="PowerSGD"):
        Compression.powersgd.compress(x)


def test_names_carry_parameters_in_one_spelling():
    assert Compression.powersgd.name == "powersgd"
    assert Compression.powersgd(rank=2).name == "powersgd:rank=2"
    assert Compression.powersgd(rank=4, start_step=100).name == "powersgd"  # defaults are left out
    comp = Compression.mixed_powersgd(start_step=0, rank=1)
    assert comp.name == "mixed_powersgd:rank=1,start_step=0" and comp.cross_node_only
    assert (comp.param("rank"), comp.param("start_step")) == (1, 0)
    assert resolve_compression("powersgd:start_step=5,rank=2") == "powersgd:rank=2,start_step=5"
    assert resolve_compression(Compression.int8) == "int8"
    assert get_compressor("mixed_int8").wire_dtype == torch.int8
    for bad, match in [("powersgd:rank=0", "rank=0 must be an integer >= 1"),
                       ("powersgd:rnk=2", "no parameter rnk"), ("int8:rank=2", "int8 has no parameter"),
                       ("powersgd:rank", "cannot parse 'rank'"), ("powersgd:rank=2,rank=3", "cannot parse"),
                       ("int4", "unknown compression")]:
        with pytest.raises(ValueError, match=match):
            resolve_compression(bad)
    with pytest.raises(TypeError, match="parameters: rank, start_step"):
        Compression.powersgd(ranks=2)
    with pytest.raises(ValueError, match="integer"):
        Compression.powersgd(rank=2.5)


def test_config_and_launcher_accept_parameters_and_name_the_knob():
    from shoal.core.env import read_config  # noqa: PLC0415
    from shoal.runner import launch  # noqa: PLC0415

    assert read_config({"SHOAL_COMPRESSION": "powersgd:rank=2"}).compression == "powersgd:rank=2"
    assert ShoalConfig(compression="mixed_int8").validate().compression == "mixed_int8"
    with pytest.raises(ValueError, match="cannot parse 'rank=x'.*SHOAL_COMPRESSION"):
        read_config({"SHOAL_COMPRESSION": "powersgd:rank=x"})
    with pytest.raises(ValueError, match="is not one of"):
        ShoalConfig(compression="hierarchical:rank=2").validate()
    with pytest.raises(ValueError, match="is not one of"):  # only compression takes parameters
        ShoalConfig(hierarchical="on:rank=2").validate()
    parser = argparse.ArgumentParser()
    launch.add_arguments(parser)
    args = parser.parse_args(["-np", "2", "--compression", "powersgd:rank=2,start_step=10", "python", "t.py"])
    assert launch.knob_environment(args) == {"SHOAL_COMPRESSION": "powersgd:rank=2,start_step=10"}
    bad = parser.parse_args(["-np", "2", "--compression", "powersgd:rank=-1", "python", "t.py"])
    with pytest.raises(ValueError, match="rank=-1 must be an integer >= 1"):
        launch.knob_environment(bad)


def test_powersgd_compresses_matrices_that_gain_and_keeps_the_rest_in_runs():
    layout = [(0, (64, 96)), (6144, (33,)), (6192, (40, 3, 3, 3)), (7280, (5, 4)), (7312, (8, 8))]
    mats, runs = plan_matrices(7400, layout, rank=2)
    # (rows + cols) * r * 2 < rows * cols: 64x96 and the conv as 40x27 gain; 5x4 and 8x8 do not.
    assert [(m.offset, m.rows, m.cols) for m in mats] == [(0, 64, 96), (6192, 40, 27)]
    assert [(m.p, m.q, m.e) for m in mats] == [(0, 0, 0), (128, 192, 6144)]
    # Everything else, padding and the tail after the last tensor included, travels as it is.
    assert runs == [(6144, 6192), (7272, 7400)]
    assert plan_matrices(100, None, rank=1) == ([], [(0, 100)])
    # A higher rank gains on fewer: at 16 the conv's factors (67 x 16 x 2 = 2144) exceed its 1080 values.
    assert [(m.rows, m.cols) for m in plan_matrices(7400, layout, rank=16)[0]] == [(64, 96)]


def test_doctor_says_when_compression_pays_on_this_link():
    from shoal.runner.doctor import _CROSSOVER_EVIDENCE, _CROSSOVER_MBPS, _compression_advice  # noqa: PLC0415

    slow, fast = 1000, 2 * max(_CROSSOVER_MBPS.values())
    assert "powersgd" in _compression_advice("none", slow, False).split(";")[0]  # worth trying here
    assert "int8" in _compression_advice("none", slow, False).split(";")[0]  # 2.1x DDP there (quiet)
    assert "no compression was measured faster" in _compression_advice("none", fast, False)
    assert "pays on this link" in _compression_advice("powersgd:rank=2", slow, False)
    assert "pays on this link" in _compression_advice("mixed_fp16", 4000, False)
    assert "no gain measured" in _compression_advice("mixed_int8", fast, True)
    assert "mixed_*" in _compression_advice("int8", slow, True)  # hierarchy on: says what mixed does
    assert "link speed unknown" in _compression_advice("fp16", None, False)
    # Every crossover is a measured one, and the section the advice cites exists (the first version
    # shipped placeholders of 0 Mbit/s: "fp16 below ~0 Gbit/s", and a link to a missing section).
    assert " 0 Gbit/s" not in _compression_advice("none", slow, False)
    assert _CROSSOVER_MBPS["fp16"] > slow and _CROSSOVER_MBPS["powersgd"] >= slow
    assert {f for f in _CROSSOVER_MBPS if f != "bf16"} == set(_CROSSOVER_EVIDENCE)
    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "compression.md").read_text()
    assert "\n## When compression pays\n" in doc
