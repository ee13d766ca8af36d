"""The registration check: ranks agree, once, on what an optimizer (or the DDP hook) reduces and how.

When a step owner (:mod:`shoal.core.step`) or the DDP hook is created, its ranks compare a 64-bit digest of
their ``(name, shape, dtype)`` lists and of the settings that decide which collectives a step runs (bucket
layout, streams, compression, hierarchy, the NaN policy, the negotiation mode, ...). A mismatch raises the
same :class:`~shoal.core.errors.MismatchError` on every rank, listing the differing tensors and settings and
which ranks hold what: ranks configured differently would otherwise hang in a collective only some of them
start, or pair different buckets.

Design constraints:

1. One 16-byte ``BAND`` allreduce of ``[digest, ~digest]`` on the process set's control group: the first
   word is what ALL ranks have, the second what NONE has; equal digests give ``-1`` when or-ed. The lists
   travel only on a mismatch, as JSON (:mod:`shoal.core.exchange`): nothing a peer sends is unpickled.
2. The digest is the same in every process: a keyed hash of the lists' text (Python's ``hash`` of a str is
   salted per process).

What lives elsewhere: the per-step agreement (:mod:`shoal.core.negotiation`), the groups
(:func:`shoal.core.runtime.control_group`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from . import exchange, runtime
from .config import ShoalConfig, env_name
from .errors import MismatchError, format_ranks, shown

__all__ = ["Entry", "hash64", "registration_digest", "check_registration"]

#: Names of the runtime config's knobs (settings with an environment variable, for hints).
_KNOBS = frozenset(f.name for f in dataclasses.fields(ShoalConfig))

#: ``(name, shape, dtype)`` of one registered tensor (dtype: a torch dtype or its name).
Entry = tuple[str, tuple[int, ...], Any]


def hash64(text: str) -> int:
    """A 64-bit hash that is the same in every process (Python's ``hash`` of a str is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def registration_digest(entries: Sequence[Entry], settings: Optional[dict[str, str]] = None) -> int:
    """64-bit digest of ``[(name, shape, dtype), ...]`` in order, and of ``settings`` when given (the same
    in every process)."""
    listed = repr([(str(n), tuple(int(d) for d in s), str(t)) for n, s, t in entries])
    if settings:
        listed += repr(sorted((str(k), str(v)) for k, v in settings.items()))
    return hash64(listed)


def check_registration(entries: Sequence[Entry], process_set: Optional[runtime.ProcessSet] = None,
                       what: str = "DistributedOptimizer", settings: Optional[dict[str, Any]] = None) -> int:
    """Check that every member of ``process_set`` registered the same ``(name, shape, dtype)`` list, with
    the same ``settings``.

    Call it on every member, at the same point (constraint 1).

    Args:
        entries: ``(name, shape, dtype)`` of every tensor, in order.
        process_set: the ranks that must agree (default: all).
        what: names the owner in messages.
        settings: knobs that decide which collectives run (e.g. ``{"negotiation": "auto", "nan_check":
            "raise"}``): ranks that differ would hang in a collective only some of them start.

    Returns:
        The digest.
    Raises:
        MismatchError: on every member, the same message: each differing setting and tensor with what each
            rank holds (or "missing"), or the first position where the order differs.

    Example:
        >>> check_registration([(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()],
        ...                    settings={"nan_check": "raise"})
    """
    ps = runtime.get_process_set(process_set)
    entries = [(str(n), tuple(int(d) for d in s), str(t).replace("torch.", "")) for n, s, t in entries]
    settings = {str(k): str(v) for k, v in (settings or {}).items()}
    digest = registration_digest(entries, settings)
    if ps.size() == 1:
        return digest
    group = runtime.control_group(ps)
    pair = torch.tensor([digest, ~digest], dtype=torch.int64)
    try:
        dist.all_reduce(pair, op=dist.ReduceOp.BAND, group=group)
        if (int(pair[0]) | int(pair[1])) == -1:
            return digest
        lists = exchange.allgather_json([[[n, list(s), t] for n, s, t in entries], settings], group=group,
                                        device=torch.device("cpu"))
    except RuntimeError as exc:
        raise runtime.explain_failure(exc, f"registration check of {what}", ps.ranks) from exc
    gathered = [([(str(n), tuple(s), str(t)) for n, s, t in lst], dict(conf)) for lst, conf in lists]
    raise MismatchError(_registration_message(ps.ranks, gathered, what))


def _abridged(value: str, limit: int = 100) -> str:
    """A setting's value for messages: a long one (e.g. ``groups``, every index) cut, with a digest of the
    whole so that two values that differ past the cut still read differently."""
    if len(value) <= limit:
        return value
    return f"{value[:limit - 40]}... ({len(value)} characters, digest {hash64(value) & 0xFFFFFFFF:08x})"


def _setting_sources(key: str, what: str) -> str:
    """Where a setting of the registration digest comes from, for the hint."""
    if key in _KNOBS:
        return f"{key} ({env_name(key)}, shoal.init({key}=...) or the {what}'s keyword where it has one)"
    return f"{key} (the {what}'s {key}= argument)"


def _registration_message(ranks: Sequence[int], gathered: list, what: str) -> str:
    lists = [entries for entries, _ in gathered]
    settings = [conf for _, conf in gathered]
    setting_lines = []
    differing = []
    for key in dict.fromkeys(k for conf in settings for k in conf):
        per_rank = [conf.get(key, "unset") for conf in settings]
        if len(set(per_rank)) > 1:
            differing.append(key)
            groups: dict[str, list[int]] = {}
            for r, value in zip(ranks, per_rank):
                groups.setdefault(_abridged(value), []).append(r)
            setting_lines.append(f"  {key}: " + "; ".join(f"{format_ranks(rs)}: {value}"
                                                         for value, rs in groups.items()))
    described: list[dict[str, str]] = [{n: f"{t} {list(s)}" for n, s, t in lst} for lst in lists]
    names = list(dict.fromkeys(n for lst in lists for n, _, _ in lst))
    lines = []
    for name in names:
        per_rank = [d.get(name, "missing") for d in described]
        if len(set(per_rank)) == 1:
            continue
        groups = {}
        for r, text in zip(ranks, per_rank):
            groups.setdefault(text, []).append(r)
        held = "; ".join(f"{format_ranks(rs)}: {text}" for text, rs in groups.items())
        lines.append(f"  '{name}': {held}")
    head = f"shoal: ranks registered different parameters for {what} (process set {list(ranks)})"
    body: list[str] = []
    if setting_lines:
        listed = f"its tensors: {shown([n for n, _, _ in lists[0]])}" if lists[0] else "no named tensors"
        body.append(f"shoal: ranks configured {what} differently (process set {list(ranks)}; {listed}); "
                    "ranks that differ here would hang in a collective only some of them start:")
        body += setting_lines
    tensors_differ = bool(lines) or any(lst != lists[0] for lst in lists)
    if lines:
        shown_lines = lines[:8] + ([f"  ... and {len(lines) - 8} more"] if len(lines) > 8 else [])
        body += [f"{head}: {len(lines)} tensor{'s' if len(lines) > 1 else ''} differ:"] + shown_lines
    elif tensors_differ:  # the same tensors in another order: the bucket plans would pair others
        i = next(i for i in range(max(len(lst) for lst in lists))
                 if len({lst[i][0] if i < len(lst) else None for lst in lists}) > 1)
        at = "; ".join(f"rank {r}: '{lst[i][0]}'" if i < len(lst) else f"rank {r}: none"
                       for r, lst in zip(ranks, lists))
        body.append(f"{head}: the same tensors in a different order; first difference at position {i}: {at}")
    hints = []
    if setting_lines:
        hints.append("set these the same on every rank, they decide which collectives a step runs: " +
                     "; ".join(_setting_sources(key, what) for key in differing) + ".")
    if tensors_differ:
        hints.append("build the same model on every rank and pass the same named_parameters in the same "
                     "order; a part that only some ranks train must exist (and be registered) on every "
                     "rank, it may simply go unused (its gradient then averages with zeros).")
    body.append("HINT: " + " ".join(hints))
    return "\n".join(body)
