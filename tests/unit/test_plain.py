"""The restricted (pickle-free) encoding of the object collectives, shoal.core.plain: exact round trips of
every allowed type, refusals that say where and what to do, and untrusted bytes that are refused without
running anything (no pickle is ever called: the decoder is checked with pickle's entry points trapped)."""

from __future__ import annotations

import collections
import enum
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

from shoal.core import plain


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad
                and a.device.type == "cpu" and torch.equal(a.detach(), b.detach()))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


VALUES = [
    None, True, False, 0, -7, 2 ** 64 + 1, -(2 ** 100), 0.0, -0.0, 1.5, 1e300, 5e-324, math.inf, -math.inf,
    1 + 2j, complex(-1.5, math.inf), "", "é\u0000\n\"'", b"", bytes(range(256)), [], (), {}, set(), frozenset(),
    [1, [2, [3, (4, 5)]]], (1,), {"a": 1, 2: "b", (3, 4): [5], None: None, 1.5: 2, b"k": frozenset({1})},
    {1, "x", (2, 3)}, {"nested": {"deeper": {"deepest": [{"x": ()}]}}},
    torch.arange(12, dtype=torch.float32).reshape(3, 4), torch.tensor(3.5, dtype=torch.float64),
    torch.ones(2, 3, dtype=torch.bfloat16), torch.tensor([1.5, -2], dtype=torch.float16),
    torch.tensor([1 + 2j], dtype=torch.complex64), torch.tensor([[1 - 1j]], dtype=torch.complex128),
    torch.tensor([0, 255], dtype=torch.uint8), torch.tensor([-128, 127], dtype=torch.int8),
    torch.tensor([-3], dtype=torch.int16), torch.tensor([2 ** 31 - 1], dtype=torch.int32),
    torch.tensor([-(2 ** 63)], dtype=torch.int64), torch.tensor([True, False]), torch.empty(0, 5),
    torch.empty(2, 0, 3, dtype=torch.int64), torch.ones(3, dtype=torch.float64).requires_grad_(),
    torch.arange(6.0).reshape(2, 3).t(),   # non-contiguous: arrives contiguous, same values
    {"w": [torch.ones(2), torch.zeros(1, dtype=torch.int32)], "step": 3},
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_every_allowed_value_round_trips_exactly(value):
    assert _same(plain.decode(plain.encode(value)), value)


def test_nan_round_trips():
    out = plain.decode(plain.encode([math.nan, {"x": math.nan}]))
    assert math.isnan(out[0]) and math.isnan(out[1]["x"])


def test_equal_sets_encode_to_equal_bytes():
    assert plain.encode({3, 1, 2}) == plain.encode({2, 3, 1})


class Color(enum.IntEnum):
    RED = 1


@pytest.mark.parametrize("value, needed", [
    (object(), ["the object is an object,", "send its fields as a dict"]),
    ({"lr": np.float32(0.1)}, ["the object['lr'] is a numpy.float32", ".item()"]),
    ([np.ones(2)], ["the object[0] is a numpy.ndarray", "torch.as_tensor"]),
    (Color.RED, ["Color", "int(...)"]),
    (collections.OrderedDict(a=1), ["OrderedDict", "dict(...)"]),
    (torch.nn.Parameter(torch.ones(1)), ["Parameter", "t.detach()"]),
    (torch.ones(2).to_sparse(), ["sparse", "to_dense"]),
    (bytearray(b"x"), ["bytearray", "bytes(...)"]),
    (lambda: 0, ["function"]),
])
def test_what_it_does_not_carry_is_refused_with_where_and_a_hint(value, needed):
    with pytest.raises(TypeError) as info:
        plain.encode(value)
    msg = str(info.value)
    assert msg.startswith("shoal: ") and "HINT" in msg, msg
    for text in needed:
        assert text in msg, (text, msg)


def test_cycles_and_depth_are_refused():
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="contains itself"):
        plain.encode(loop)
    deep: list = []
    for _ in range(plain.MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(ValueError, match="deeper than"):
        plain.encode(deep)
    shallow: list = []
    for _ in range(plain.MAX_DEPTH - 1):
        shallow = [shallow]
    assert plain.decode(plain.encode(shallow)) == shallow
    shared = [1]
    assert plain.decode(plain.encode([shared, shared])) == [[1], [1]]   # shared, not a cycle


# ------------------------------------------------------------------------------------------------------
# Untrusted bytes
# ------------------------------------------------------------------------------------------------------

class _WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _wire(head, blob: bytes = b"") -> bytes:
    text = head if isinstance(head, bytes) else json.dumps(head).encode()
    return b"SHOALPD1" + len(text).to_bytes(8, "little") + text + blob


MALFORMED = {
    "empty": b"",
    "pickle": pickle.dumps({"a": 1}),
    "marker only": b"SHOALPD1",
    "length past the end": b"SHOALPD1" + (10 ** 9).to_bytes(8, "little") + b"{}",
    "not JSON": _wire(b"\x80\x04not json"),
    "not a dict": _wire([1, 2]),
    "extra keys": _wire({"v": 1, "t": [], "x": 0}),
    "unknown tag": _wire({"v": ["object", "os.system"], "t": []}),
    "JSON object as a node": _wire({"v": {"a": 1}, "t": []}),
    "three-element node": _wire({"v": ["list", [], 0], "t": []}),
    "unhashable key": _wire({"v": ["dict", [[["list", []], 1]]], "t": []}),
    "unhashable set element": _wire({"v": ["set", [["list", []]]], "t": []}),
    "dict item not a pair": _wire({"v": ["dict", [[1]]], "t": []}),
    "bad base64": _wire({"v": ["bytes", "not base64!"], "t": []}),
    "bad float": _wire({"v": ["float", "nope"], "t": []}),
    "nested complex": _wire({"v": ["complex", [["complex", [1.0, 2.0]], 0.0]], "t": []}),
    "tensor index out of range": _wire({"v": ["tensor", 0], "t": []}),
    "unknown dtype": _wire({"v": ["tensor", 0], "t": [["object", [1], "cpu", False]]}, b"\x00" * 8),
    "unhashable dtype": _wire({"v": None, "t": [[["float32"], [1], "cpu", False]]}, b"\x00" * 4),
    "negative dim": _wire({"v": None, "t": [["float32", [-1], "cpu", False]]}),
    "huge shape, no bytes": _wire({"v": None, "t": [["float32", [2 ** 40, 2 ** 20], "cpu", False]]}),
    "bytes missing": _wire({"v": None, "t": [["float64", [2], "cpu", False]]}, b"\x00" * 8),
    "bytes left over": _wire({"v": None, "t": [["uint8", [1], "cpu", False]]}, b"\x00\x00"),
    "grad on integers": _wire({"v": None, "t": [["int32", [1], "cpu", True]]}, b"\x00" * 4),
    "bad device": _wire({"v": None, "t": [["uint8", [1], "meta", False]]}, b"\x00"),
    "deep JSON": _wire(b"[" * 100_000 + b"]" * 100_000),
    "deep containers": _wire({"v": json.loads('["list", [' * 150 + "]]" * 150), "t": []}),
    "huge int": _wire(b'{"v": ' + b"9" * 5000 + b', "t": []}'),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_bytes_are_refused_with_a_value_error(name, monkeypatch):
    def trap(*args, **kwargs):
        raise AssertionError("pickle was called")

    for entry in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, entry, trap)
    with pytest.raises(ValueError):
        plain.decode(MALFORMED[name])


def test_a_malicious_pickle_is_refused_and_never_run(tmp_path):
    path = tmp_path / "pwned"
    payload = pickle.dumps(_WritesAFile(path))
    with pytest.raises(ValueError, match="restricted encoding's marker"):
        plain.decode(payload)
    # Behind the marker, too: the structure is JSON, never unpickled.
    with pytest.raises(ValueError, match="not valid JSON"):
        plain.decode(_wire(payload))
    assert not path.exists()
    pickle.loads(payload)   # control: the payload is live
    assert path.exists()
