"""JSON exchanges between ranks (shoal.core.exchange): what each rank sent arrives unchanged, nothing is
unpickled, and a value JSON cannot hold is refused on the sender before anything moves."""

from __future__ import annotations

import pytest

from shoal.core.exchange import decode, encode
from shoal.testing import run_ranks


def _exchange():
    import warnings  # noqa: PLC0415

    import torch.distributed as dist  # noqa: PLC0415

    from shoal.core.exchange import allgather_json, broadcast_json  # noqa: PLC0415

    me = dist.get_rank()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gathered = allgather_json({"rank": me, "name": "é" * me, "items": list(range(me + 1))})
        sent = broadcast_json(["order", 3, None] if me == 1 else "ignored", src=1)
        empty = allgather_json("" if me == 0 else "x" * 5000)
    return gathered, sent, [len(e) for e in empty], [str(w.message) for w in caught]


def test_allgather_and_broadcast_carry_json_unchanged():
    results = run_ranks(_exchange, world_size=3, timeout_s=60)
    for gathered, sent, lengths, warned in results:
        # Every registration runs through here: torch's renamed collectives must not warn on every rank.
        assert not warned, warned
        assert gathered == [{"rank": r, "name": "é" * r, "items": list(range(r + 1))} for r in range(3)]
        assert sent == ["order", 3, None]
        assert lengths == [0, 5000, 5000]


def test_values_json_cannot_hold_are_refused_and_bytes_are_never_unpickled():
    with pytest.raises(TypeError, match="JSON"):
        encode({"x": float("nan")})
    with pytest.raises(TypeError):
        encode(object())
    import pickle

    with pytest.raises(ValueError, match="not JSON"):
        decode(pickle.dumps({"a": 1}))
    assert decode(encode({"a": [1, 2.5, "b"]})) == {"a": [1, 2.5, "b"]}
