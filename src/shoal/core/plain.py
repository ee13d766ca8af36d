"""A pickle-free encoding of plain data and torch tensors: the restricted mode of the object collectives.

``broadcast_object`` / ``allgather_object`` pickle by default (Horovod's semantics): unpickling runs whatever
the sender's bytes say, so that mode trusts every rank. With ``trusted=False`` they use this encoding
instead, and a peer can at worst send wrong data. What lives elsewhere: the collectives and their byte
transport (:mod:`shoal.core.collectives`, :mod:`shoal.core.exchange`).

Design constraints:

1. Decoding never imports, calls or constructs anything named by the data: ``json.loads`` for the structure,
   then a fixed table of tags, each building one of the allowed types itself. No pickle, no ``find_class``
   (a restricted unpickler still runs every ``REDUCE`` it lets through).
2. Only plain values: ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``, ``list``,
   ``tuple``, ``dict``, ``set``, ``frozenset`` and strided ``torch.Tensor`` of the dtypes in
   ``_DTYPES``. Exact types, not subclasses (an ``IntEnum``, a ``defaultdict``, a numpy scalar, an
   ``nn.Parameter`` are refused with a HINT): what arrives is exactly what was sent, never a lookalike.
3. Round trip exact: ``decode(encode(x)) == x`` with the same types (tuples stay tuples, dict keys of any
   allowed hashable type, NaN and infinities, 64-bit and larger ints); tensors keep dtype, shape, values
   and ``requires_grad``, and land on CPU, or on this rank's GPU when they were on a GPU. Shared references
   are not kept: each occurrence travels as its own copy.
4. Tensors travel as raw bytes after the JSON, not as JSON numbers: one copy, and exact for every dtype.
5. Bounded: containers nest at most ``MAX_DEPTH`` deep (a cycle is refused at once), so neither side can
   be driven into a ``RecursionError``; every length and shape a peer sends is checked against the bytes
   that actually arrived before anything is allocated.

Wire format: ``b"SHOALPD1"``, the JSON length (8 bytes, little endian), the JSON
``{"v": node, "t": [[dtype, shape, device type, requires_grad], ...]}``, then each tensor's bytes in
order. A node is a JSON ``null``/``true``/``false``/integer/float/string for those types, or a
two-element array ``[tag, payload]`` (``list``, ``tuple``, ``set``, ``frozenset``, ``dict`` of
``[key, value]`` pairs, ``bytes`` as base64, ``float`` for NaN and the infinities, ``complex`` as two
floats, ``tensor`` as an index into ``"t"``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any, Optional

import torch

__all__ = ["encode", "decode", "MAX_DEPTH"]

#: How deep containers may nest (constraint 5); configuration trees and metric dicts stay far below it.
MAX_DEPTH = 100

_MAGIC = b"SHOALPD1"
_HEADER = len(_MAGIC) + 8

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)}

_ALLOWED = ("None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset and torch.Tensor "
            f"({', '.join(_DTYPES)})")
_SEQUENCES = {list: "list", tuple: "tuple", set: "set", frozenset: "frozenset"}
_BUILD = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}
_SPECIAL_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _hint(value: Any) -> str:
    """What to do with a value of a type this encoding refuses."""
    if isinstance(value, torch.Tensor):
        return "pass a plain strided tensor: t.detach() (a Parameter or tensor subclass), t.to_dense() (sparse)."
    if type(value).__module__ == "numpy":
        return "convert it with .tolist() or .item(), or torch.as_tensor(...)."
    if isinstance(value, (bytearray, memoryview)):
        return "convert it with bytes(...)."
    for base in (bool, int, float, complex, str, bytes, dict, list, tuple, set, frozenset):
        if isinstance(value, base):
            return f"convert it with {base.__name__}(...)."
    return "send its fields as a dict, or pass trusted=True if every rank is trusted (pickle)."


def _where(what: str, path: tuple) -> str:
    """``what`` and the path to the value inside it (the middle of a long path left out)."""
    shown = [f"[{p!r:.40}]" for p in path]
    if len(shown) > 6:
        shown = shown[:3] + ["..."] + shown[-2:]
    return what + "".join(shown)


class _Encoder:
    def __init__(self, what: str) -> None:
        self.what = what
        self.tensors: list[list[Any]] = []
        self.blobs: list[bytes] = []
        self.open: set[int] = set()  # ids of the containers being encoded: a cycle is one seen again

    def node(self, value: Any, path: tuple) -> Any:
        kind = type(value)
        if value is None or kind in (bool, int, str):
            return value
        if kind is float:
            return _float_node(value)
        if kind is complex:
            return ["complex", [_float_node(value.real), _float_node(value.imag)]]
        if kind is bytes:
            return ["bytes", base64.b64encode(value).decode("ascii")]
        if kind is torch.Tensor:
            return ["tensor", self.tensor(value, path)]
        if kind in _SEQUENCES or kind is dict:
            if len(path) >= MAX_DEPTH:
                raise ValueError(f"shoal: {_where(self.what, path)} nests containers deeper than {MAX_DEPTH} "
                                 "levels. HINT: flatten the structure.")
            if id(value) in self.open:
                raise ValueError(f"shoal: {_where(self.what, path)} contains itself (a cycle), which the "
                                 "restricted encoding cannot carry. HINT: send an acyclic copy.")
            self.open.add(id(value))
            try:
                if kind is dict:
                    return ["dict", [[self.node(k, path + (k,)), self.node(v, path + (k,))]
                                     for k, v in value.items()]]
                # Sets in a fixed order, so that equal sets encode to equal bytes on every rank.
                items = sorted(value, key=repr) if kind in (set, frozenset) else value
                return [_SEQUENCES[kind], [self.node(v, path + (i,)) for i, v in enumerate(items)]]
            finally:
                self.open.discard(id(value))
        shown = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        article = "an" if shown[0] in "aeiou" else "a"
        raise TypeError(f"shoal: {_where(self.what, path)} is {article} {shown}, which "
                        f"the restricted encoding does not carry (it carries exactly {_ALLOWED}). "
                        f"HINT: {_hint(value)}")

    def tensor(self, t: torch.Tensor, path: tuple) -> int:
        name = str(t.dtype).removeprefix("torch.")
        if t.layout != torch.strided or name not in _DTYPES or t.is_quantized or t.device.type not in ("cpu", "cuda"):
            raise TypeError(f"shoal: {_where(self.what, path)} is a {t.layout} {name} tensor on {t.device}; the "
                            f"restricted encoding carries strided CPU or CUDA tensors of {', '.join(_DTYPES)}. "
                            f"HINT: {_hint(t)}")
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        self.blobs.append(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        self.tensors.append([name, list(t.shape), t.device.type, bool(t.requires_grad)])
        return len(self.tensors) - 1


def _float_node(x: float) -> Any:
    if math.isfinite(x):
        return x
    return ["float", "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")]


def _float_value(node: Any) -> float:
    """A float node (no recursion: a complex's parts are nothing else)."""
    if type(node) is float:
        return node
    if type(node) is list and len(node) == 2 and node[0] == "float" and type(node[1]) is str \
            and node[1] in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[node[1]]
    raise ValueError(f"a float that is not one: {_short(node)}")


def encode(value: Any, what: str = "the object") -> bytes:
    """``value`` in the restricted encoding (see the module docstring).

    Args:
        value: plain data (constraint 2).
        what: how error messages name the value (``"broadcast_object of 'cfg': the object"``).

    Raises:
        TypeError: ``value`` holds a type the encoding does not carry (names where, with a HINT).
        ValueError: ``value`` nests deeper than ``MAX_DEPTH`` or contains itself.

    Example:
        >>> decode(encode({"epoch": 3, "w": torch.ones(2)}))
        {'epoch': 3, 'w': tensor([1., 1.])}
    """
    enc = _Encoder(what)
    root = enc.node(value, ())
    try:
        text = json.dumps({"v": root, "t": enc.tensors}, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:  # an int beyond Python's int/str conversion limit (4300 digits)
        raise ValueError(f"shoal: {what}: {exc}. HINT: send such a number as a string.") from None
    return b"".join([_MAGIC, len(text).to_bytes(8, "little"), text, *enc.blobs])


class _Decoder:
    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors

    def node(self, node: Any, depth: int) -> Any:
        if node is None or type(node) in (bool, int, float, str):
            return node
        if type(node) is not list or len(node) != 2 or type(node[0]) is not str:
            raise ValueError(f"unexpected JSON value {_short(node)}")
        tag, payload = node
        if tag == "float":
            return _float_value(node)
        if tag == "complex" and type(payload) is list and len(payload) == 2:
            return complex(_float_value(payload[0]), _float_value(payload[1]))
        if tag == "bytes" and type(payload) is str:
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("bytes that are not base64") from None
        if tag == "tensor" and type(payload) is int and 0 <= payload < len(self.tensors):
            return self.tensors[payload]
        if tag in _BUILD or tag == "dict":
            if type(payload) is not list:
                raise ValueError(f"{tag} without a list of items")
            if depth >= MAX_DEPTH:
                raise ValueError(f"containers nested deeper than {MAX_DEPTH} levels")
            try:
                if tag == "dict":
                    if any(type(p) is not list or len(p) != 2 for p in payload):
                        raise ValueError("dict items that are not [key, value] pairs")
                    return {self.node(k, depth + 1): self.node(v, depth + 1) for k, v in payload}
                return _BUILD[tag](self.node(v, depth + 1) for v in payload)
            except TypeError as exc:  # an unhashable key or set element (a list): not what a sender makes
                raise ValueError(f"{tag} with an unhashable key or element ({exc})") from None
        raise ValueError(f"unknown or malformed tag {_short(node)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _tensors(specs: Any, blob: memoryview, cuda: Optional[torch.device]) -> list[torch.Tensor]:
    if type(specs) is not list:
        raise ValueError("the tensor table is not a list")
    out, offset = [], 0
    for spec in specs:
        if (type(spec) is not list or len(spec) != 4 or type(spec[0]) is not str or spec[0] not in _DTYPES
                or type(spec[1]) is not list or len(spec[1]) > 64
                or any(type(d) is not int or not 0 <= d < 2 ** 62 for d in spec[1])
                or spec[2] not in ("cpu", "cuda") or type(spec[3]) is not bool):
            raise ValueError(f"malformed tensor description {_short(spec)}")
        dtype, shape = _DTYPES[spec[0]], spec[1]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if offset + nbytes > len(blob):  # checked before anything of that size is allocated
            raise ValueError(f"tensor {len(out)} ({spec[0]} {shape}) needs {nbytes} bytes, "
                             f"{len(blob) - offset} arrived")
        if nbytes:
            t = torch.frombuffer(bytearray(blob[offset:offset + nbytes]), dtype=torch.uint8).view(dtype).reshape(shape)
        else:
            try:
                t = torch.empty(shape, dtype=dtype)
            except (RuntimeError, OverflowError):
                raise ValueError(f"tensor {len(out)}: impossible shape {_short(shape)}") from None
        offset += nbytes
        if spec[2] == "cuda" and cuda is not None:
            t = t.to(cuda)
        if spec[3]:
            if not (t.is_floating_point() or t.is_complex()):
                raise ValueError(f"tensor {len(out)}: requires_grad on {spec[0]}")
            t.requires_grad_(True)
        out.append(t)
    if offset != len(blob):
        raise ValueError(f"{len(blob) - offset} bytes after the last tensor")
    return out


def decode(data: bytes, cuda: Optional[torch.device] = None) -> Any:
    """The value of :func:`encode`'s bytes; refuses anything else without running any of it.

    Args:
        data: bytes from a peer (untrusted).
        cuda: where tensors that were on a GPU land (None: on CPU).

    Raises:
        ValueError: ``data`` is not this encoding, or is malformed (the message says what is wrong).

    Example:
        >>> decode(encode([1, (2, 3)]))
        [1, (2, 3)]
    """
    view = memoryview(data)
    if len(view) < _HEADER or bytes(view[:len(_MAGIC)]) != _MAGIC:
        raise ValueError(f"it does not start with the restricted encoding's marker {_MAGIC!r} "
                         f"(first bytes: {bytes(view[:12])!r})")
    length = int.from_bytes(view[len(_MAGIC):_HEADER], "little")
    if length > len(view) - _HEADER:
        raise ValueError(f"its header announces {length} bytes of JSON, {len(view) - _HEADER} arrived")
    try:
        head = json.loads(bytes(view[_HEADER:_HEADER + length]).decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, huge ints
        raise ValueError(f"its structure is not valid JSON ({type(exc).__name__}: {exc})") from None
    if type(head) is not dict or set(head) != {"v", "t"}:
        raise ValueError(f"unexpected structure {_short(head)}")
    tensors = _tensors(head["t"], view[_HEADER + length:], cuda)
    return _Decoder(tensors).node(head["v"], 0)
