"""The driver -> CUDA -> wheel-line table stays sane, and every driver gets a working command."""

from __future__ import annotations

import re

import pytest

from shoal.runner.install_hints import (CUDA_LINES, MINOR_COMPAT_MIN_DRIVER, TORCH_INDEX_URL,
                                      max_cuda_for_driver, parse_version, recommend, torch_command,
                                      torch_hint)


def _v(text):
    return parse_version(text)


def _sweep() -> list[str]:
    """Drivers around every threshold of the table, plus far below and far above."""
    drivers = ["390.1", "450.80.01", "999.99"]
    for text in [line.min_driver for line in CUDA_LINES] + list(MINOR_COMPAT_MIN_DRIVER.values()):
        major, minor = _v(text)[:2]
        drivers += [text, f"{major}.{minor + 1}", f"{major - 1}.99"]
    return sorted(set(drivers), key=_v)


def test_table_is_ascending_in_cuda_and_driver():
    for a, b in zip(CUDA_LINES, CUDA_LINES[1:]):
        assert a.cuda < b.cuda, (a, b)
        assert _v(a.min_driver) < _v(b.min_driver), (a, b)


def test_every_wheel_line_is_well_formed_and_has_a_command():
    tags = [line for line in CUDA_LINES if line.torch_tag]
    assert tags, "the table lists no torch wheel line"
    for line in tags:
        assert line.torch_tag == f"cu{line.cuda[0]}{line.cuda[1]}", line
        assert line.torch_first is not None and line.torch_first >= (2, 0), line
        assert line.torch_last is None or line.torch_first <= line.torch_last, line
        cmd = torch_command(line.torch_tag)
        assert cmd.startswith("pip install torch") and cmd.endswith(TORCH_INDEX_URL + line.torch_tag)
    assert any(line.is_current for line in tags), "no wheel line is still published"


def test_minor_version_floors_are_below_every_line_of_their_major():
    assert sorted(MINOR_COMPAT_MIN_DRIVER) == list(MINOR_COMPAT_MIN_DRIVER)
    floors = [_v(MINOR_COMPAT_MIN_DRIVER[m]) for m in sorted(MINOR_COMPAT_MIN_DRIVER)]
    assert floors == sorted(floors)
    for line in CUDA_LINES:
        assert line.cuda[0] in MINOR_COMPAT_MIN_DRIVER, line
        assert _v(MINOR_COMPAT_MIN_DRIVER[line.cuda[0]]) <= _v(line.min_driver), line


def test_max_cuda_is_monotonic_in_the_driver():
    seen = [max_cuda_for_driver(d) or (0, 0) for d in _sweep()]
    assert seen == sorted(seen)
    assert max_cuda_for_driver(None) is None and max_cuda_for_driver("junk") is None
    assert max_cuda_for_driver("535.104.05") == (12, 2)
    assert max_cuda_for_driver("580.65.06") == (13, 0)
    assert max_cuda_for_driver("590.44.01") == (13, 1) and max_cuda_for_driver("595.58.03") == (13, 2)


def test_table_knows_the_pinned_torch():
    """The wheel lines of the torch the project pins (constraints.txt) are all current in the table."""
    import pathlib

    pins = (pathlib.Path(__file__).resolve().parents[2] / "constraints.txt").read_text()
    pinned = parse_version(re.search(r"^torch==(\S+)", pins, re.M).group(1))[:2]
    lines = {line.torch_tag: line for line in CUDA_LINES if line.torch_tag}
    for tag in ("cu126", "cu130", "cu132"):   # torch 2.12-2.14 (pytorch/pytorch RELEASE.md)
        line = lines[tag]
        assert line.torch_first <= pinned and (line.torch_last is None or line.torch_last >= pinned), line
    assert lines["cu128"].torch_last == (2, 11)


@pytest.mark.parametrize("driver", [None] + _sweep())
def test_every_driver_gets_a_runnable_torch_line_and_four_commands(driver):
    hints = recommend(driver, installed=["keras"])
    assert [h.target for h in hints] == ["torch", "tensorflow", "jax", "shoal"]
    for h in hints:
        assert h.command.startswith("pip install ") and h.note, h
    tag = re.search(r"/whl/(\w+)$", hints[0].command).group(1)
    if tag == "cpu":
        return
    line = next(line for line in CUDA_LINES if line.torch_tag == tag)
    d = _v(driver)
    # Either the driver fully supports the line, or it runs it under minor-version compatibility.
    assert _v(line.min_driver) <= d or _v(MINOR_COMPAT_MIN_DRIVER[line.cuda[0]]) <= d, (driver, tag)


def test_known_cases():
    assert torch_hint(None).command.endswith("/whl/cpu")
    h = torch_hint("550.54.14")
    assert h.command.endswith("/whl/cu126") and "cu124" in h.note and "minor-version" in h.note
    assert torch_hint("560.35.03").command.endswith("/whl/cu126")
    assert torch_hint("580.65.06").command.endswith("/whl/cu130")
    assert torch_hint("590.48.01").command.endswith("/whl/cu130")   # CUDA 13.1 has no torch wheel line
    assert torch_hint("595.45.04").command.endswith("/whl/cu132")   # torch >= 2.12
    # cu128 ended with torch 2.11: a 570 driver gets the still-published cu126 line (current torch).
    h = torch_hint("570.124.06")
    assert h.command.endswith("/whl/cu126") and "current" in h.note
    assert torch_hint("470.82.01").command.endswith("/whl/cu118")   # CUDA 11 minor compatibility
    old = torch_hint("440.33")
    assert old.command.endswith("/whl/cpu") and "upgrade" in old.note
    assert recommend("580.65.06")[2].command == 'pip install -U "jax[cuda13]"'
    assert recommend("535.104.05")[2].command == 'pip install -U "jax[cuda12]"'
    assert recommend("535.104.05")[1].command == 'pip install "tensorflow[and-cuda]"'
    assert recommend(None)[1].command == "pip install tensorflow"
    assert recommend(None, ["tensorflow", "keras"])[3].command == 'pip install "shoal[keras,tensorflow]"'


def test_parse_version():
    assert parse_version("550.54.14") == (550, 54, 14)
    assert parse_version(" 12.4 ") == (12, 4)
    assert parse_version("2.13.0+cpu") == (2, 13, 0)
    assert parse_version("") is None and parse_version(None) is None and parse_version("abc") is None
