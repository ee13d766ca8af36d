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
4. The byte transport (:func:`allgather_bytes`, :func:`broadcast_bytes`) is separate from the JSON on top of
   it, so that a caller with its own encoding decodes each member's bytes itself and can name the member
   whose bytes it refuses.

What lives elsewhere: the user API's object collectives (``broadcast_object`` / ``allgather_object`` in
:mod:`shoal.core.collectives`), which move their bytes through this transport: pickle for users who trust
every rank (Horovod's semantics), or the pickle-free encoding of :mod:`shoal.core.plain`.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import torch
import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor to all_gather_single and the old name warns (FutureWarning on
# every rank at every registration); earlier versions have the old name only.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

__all__ = ["encode", "decode", "allgather_json", "broadcast_json", "allgather_bytes", "broadcast_bytes"]


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


def allgather_bytes(data: bytes, group: Optional[dist.ProcessGroup] = None,
                    device: Optional[torch.device] = None) -> list[bytes]:
    """Every member's ``data``, in the group's rank order: the transport under :func:`allgather_json`
    (constraint 1). The bytes are moved, never interpreted: decoding them is the caller's business.

    Args:
        data: this member's bytes (any length, also empty).
        group: the process group (default: the world).
        device: where the tensors live (default: the group's device: CUDA under NCCL, else CPU).

    Example:
        >>> payloads = allgather_bytes(json.dumps(x).encode())
    """
    dev = _device(group, device)
    n = dist.get_world_size(group)
    sizes = torch.zeros(n, dtype=torch.int64, device=dev)
    _all_gather_single(sizes, torch.tensor([len(data)], dtype=torch.int64, device=dev), group=group)
    lengths = sizes.tolist()
    width = max(max(lengths) if lengths else 0, 1)
    mine = torch.zeros(width, dtype=torch.uint8)
    if data:
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    out = torch.empty(n * width, dtype=torch.uint8, device=dev)
    _all_gather_single(out, mine.to(dev), group=group)
    rows = out.view(n, width).cpu()
    return [rows[i, :lengths[i]].numpy().tobytes() for i in range(n)]


def broadcast_bytes(data: bytes, src: int, group: Optional[dist.ProcessGroup] = None,
                    device: Optional[torch.device] = None) -> bytes:
    """``src``'s ``data`` on every member (the transport under :func:`broadcast_json`); ``src`` is a global
    rank, as in ``dist.broadcast``; ``data`` is ignored elsewhere.

    Example:
        >>> blob = broadcast_bytes(blob if rank == 0 else b"", src=0)
    """
    dev = _device(group, device)
    if dist.get_rank() != src:
        data = b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    dist.broadcast(size, src=src, group=group)
    length = int(size.item())
    buf = torch.zeros(max(length, 1), dtype=torch.uint8)
    if data:
        buf[:length] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(dev)
    dist.broadcast(buf, src=src, group=group)
    return buf[:length].cpu().numpy().tobytes()


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
    return [decode(data) for data in allgather_bytes(encode(value), group, device)]


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
    data = encode(value) if dist.get_rank() == src else b""
    return decode(broadcast_bytes(data, src, group, device))
