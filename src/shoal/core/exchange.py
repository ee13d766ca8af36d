"""Exchanging small structured values between ranks as JSON in tensors, never as pickle.

Shoal's internal exchanges (host names at ``init``, the ready order a bucket plan follows, the details of a
mismatch or a NaN report) used ``all_gather_object`` / ``broadcast_object_list``, which unpickle what the
peers send: any process that can reach a group's sockets could run code in every rank. What travels here is
UTF-8 JSON in a ``uint8`` tensor, decoded with ``json.loads``: a peer can at worst send wrong data, which
the caller checks like any other input.

Design constraints:

1. Two collectives per exchange, whatever the world size: the byte lengths (one int64 per rank), then the
   payloads padded to the longest. No pickle anywhere, also not for the lengths.
2. Only JSON's types: dicts with string keys, lists, strings, numbers, booleans, None. Tuples come back as
   lists; callers convert what they need. A value JSON cannot encode is a ``TypeError`` on the sending
   rank before anything moves (raised inside the exchange would leave the peers waiting).
3. The same group semantics as torch's object collectives: every member calls, in the same order.

What lives elsewhere: the user API's object collectives (``broadcast_object`` / ``allgather_object`` in
:mod:`shoal.core.collectives`), which keep Horovod's pickle semantics for users who trust every rank.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["encode", "decode", "allgather_json", "broadcast_json", "broadcast_tree"]


def encode(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON (``TypeError`` for what JSON cannot hold; NaN and Inf refused)."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:  # NaN/Inf floats: not JSON
        raise TypeError(f"shoal: cannot send {value!r} to other ranks as JSON: {exc}") from None


def decode(data: bytes) -> Any:
    """The value of :func:`encode`'s bytes (``ValueError`` naming the problem when they are not JSON)."""
    try:
        return json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"shoal: a peer sent data that is not JSON ({exc})") from None


def _device(group: Optional[dist.ProcessGroup], device: Optional[torch.device]) -> torch.device:
    if device is not None:
        return device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def allgather_json(value: Any, group: Optional[dist.ProcessGroup] = None,
                   device: Optional[torch.device] = None) -> list[Any]:
    """Every member's ``value``, in the group's rank order (constraint 1).

    Args:
        value: JSON-encodable (constraint 2).
        group: the process group (default: the world).
        device: where the tensors live (default: the group's device: CUDA under NCCL, else CPU).

    Raises:
        TypeError: ``value`` is not JSON-encodable (raised before any collective).
        ValueError: a peer's bytes are not JSON.

    Example:
        >>> hosts = allgather_json(socket.gethostname())
    """
    data = encode(value)
    dev = _device(group, device)
    n = dist.get_world_size(group)
    sizes = torch.zeros(n, dtype=torch.int64, device=dev)
    dist.all_gather_into_tensor(sizes, torch.tensor([len(data)], dtype=torch.int64, device=dev), group=group)
    lengths = sizes.tolist()
    width = max(lengths) if lengths else 0
    mine = torch.zeros(max(width, 1), dtype=torch.uint8)
    if data:
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    out = torch.empty(n * max(width, 1), dtype=torch.uint8, device=dev)
    dist.all_gather_into_tensor(out, mine.to(dev), group=group)
    rows = out.view(n, max(width, 1)).cpu()
    return [decode(rows[i, :lengths[i]].numpy().tobytes()) for i in range(n)]


def broadcast_json(value: Any, src: int, group: Optional[dist.ProcessGroup] = None,
                   device: Optional[torch.device] = None) -> Any:
    """``src``'s ``value`` on every member (``src`` a global rank, as in ``dist.broadcast``).

    Args:
        value: JSON-encodable on ``src``; ignored elsewhere.
        src: the global rank that sends.
        group: the process group (default: the world).
        device: as :func:`allgather_json`.

    Example:
        >>> order = broadcast_json(order if rank == 0 else None, src=0)
    """
    dev = _device(group, device)
    data = encode(value) if dist.get_rank() == src else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    dist.broadcast(size, src=src, group=group)
    length = int(size.item())
    buf = torch.zeros(max(length, 1), dtype=torch.uint8)
    if data:
        buf[:length] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(dev)
    dist.broadcast(buf, src=src, group=group)
    return decode(buf[:length].cpu().numpy().tobytes())


# ---------------------------------------------------------------------------------------------------------
# Trees of containers and tensors: a JSON skeleton plus the tensors' bytes
# ---------------------------------------------------------------------------------------------------------

_DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)}


def _pack(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value`` as JSON-able data; tensors replaced by references into ``tensors`` (constraint 2 made
    wider: tuples, dicts with non-string keys, non-finite floats and tensors are tagged)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else {"__float__": repr(value)}
    if isinstance(value, torch.Tensor):
        name = str(value.dtype).replace("torch.", "")
        if name not in _DTYPES or value.layout != torch.strided:
            raise TypeError(f"shoal: cannot send a {value.layout} tensor of {value.dtype} to other ranks")
        tensors.append(value.detach())
        return {"__tensor__": len(tensors) - 1, "dtype": name, "shape": list(value.shape)}
    if isinstance(value, list):
        return [_pack(v, tensors) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [_pack(v, tensors) for v in value]}
    if isinstance(value, dict):
        return {"__dict__": [[_pack(k, tensors), _pack(v, tensors)] for k, v in value.items()]}
    raise TypeError(f"shoal: cannot send a {type(value).__name__} to other ranks (plain containers, numbers, "
                    "strings and tensors only)")


def _unpack(data: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(data, list):
        return [_unpack(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if set(data) == {"__float__"} and data["__float__"] in ("nan", "inf", "-inf"):
        return float(data["__float__"])
    if set(data) == {"__tuple__"} and isinstance(data["__tuple__"], list):
        return tuple(_unpack(v, tensors) for v in data["__tuple__"])
    if set(data) == {"__dict__"} and isinstance(data["__dict__"], list):
        out = {}
        for pair in data["__dict__"]:
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError("shoal: a peer sent a malformed dict entry")
            key = _unpack(pair[0], tensors)
            if isinstance(key, (list, dict, torch.Tensor)):
                raise ValueError("shoal: a peer sent an unhashable dict key")
            out[key] = _unpack(pair[1], tensors)
        return out
    if set(data) == {"__tensor__", "dtype", "shape"} and isinstance(data["__tensor__"], int) \
            and 0 <= data["__tensor__"] < len(tensors):
        return tensors[data["__tensor__"]]
    raise ValueError(f"shoal: a peer sent data of an unknown form: {sorted(data)[:4]}")


def broadcast_tree(value: Any, src: int, group: Optional[dist.ProcessGroup] = None,
                   device: Optional[torch.device] = None) -> Any:
    """``src``'s ``value`` on every member: nested dicts (any hashable plain keys), lists, tuples, numbers,
    strings, None and tensors of any dtype, e.g. an optimizer's ``state_dict()``. No pickle: the structure
    travels as JSON (:func:`broadcast_json`), the tensors' bytes in one ``uint8`` broadcast, which needs no
    arithmetic and so no dtype support from the backend.

    Args:
        value: the tree, on ``src`` (ignored elsewhere).
        src: the global rank that sends.
        group: the process group (default: the world).
        device: where received tensors are created (default: the group's device).

    Raises:
        TypeError: ``value`` holds something else (raised on ``src`` before any collective).
        ValueError: the received structure is malformed.

    Example:
        >>> state = broadcast_tree(opt.state_dict() if rank == 0 else None, src=0)
    """
    dev = _device(group, device)
    tensors: list[torch.Tensor] = []
    skeleton = None
    payload = torch.empty(0, dtype=torch.uint8, device=dev)
    if dist.get_rank() == src:
        skeleton = _pack(value, tensors)
        chunks = [t.contiguous().reshape(-1).view(torch.uint8).to(dev) for t in tensors]
        payload = torch.cat(chunks) if chunks else payload
        skeleton = {"tree": skeleton, "tensors": [[str(t.dtype).replace("torch.", ""), list(t.shape)]
                                                  for t in tensors], "nbytes": int(payload.numel())}
    skeleton = broadcast_json(skeleton, src, group, dev)
    if not isinstance(skeleton, dict) or set(skeleton) != {"tree", "tensors", "nbytes"}:
        raise ValueError("shoal: a peer sent a malformed tree")
    nbytes = skeleton["nbytes"]
    if dist.get_rank() != src:
        payload = torch.empty(int(nbytes), dtype=torch.uint8, device=dev)
    if nbytes:
        dist.broadcast(payload, src=src, group=group)
    if dist.get_rank() == src:
        return value
    received, offset = [], 0
    for entry in skeleton["tensors"]:
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in _DTYPES
                and isinstance(entry[1], list) and all(type(d) is int and d >= 0 for d in entry[1])):
            raise ValueError("shoal: a peer sent a malformed tensor description")
        dtype = _DTYPES[entry[0]]
        numel = 1
        for d in entry[1]:
            numel *= d
        size = numel * torch.empty((), dtype=dtype).element_size()
        if offset + size > nbytes:
            raise ValueError("shoal: a peer sent fewer tensor bytes than it described")
        received.append(payload[offset:offset + size].view(dtype).reshape(entry[1]).clone())
        offset += size
    if offset != nbytes:
        raise ValueError("shoal: a peer sent more tensor bytes than it described")
    return _unpack(skeleton["tree"], received)
