"""``broadcast_object`` / ``allgather_object`` in both modes, and no unpickling on internal paths, on real
gloo ranks.

* Round trips: ``trusted=True`` (pickle, Horovod's semantics: any picklable object) and ``trusted=False``
  (plain data without pickle: every allowed type, tensors of several dtypes included) carry every rank's
  object unchanged; each rank builds the expected objects itself.
* A malicious sender: in restricted mode one rank sends a pickle whose ``__reduce__`` would create a file.
  The sender is modified only in what it puts on the wire (its encoder returns the pickle); the receivers
  run Shoal unchanged. Every receiver refuses it, naming the sender, and the file is never created. The
  same bytes, unpickled in this test process afterwards, do create it: the payload is live.
* Internal paths: with every unpickling entry point of pickle and torch.distributed replaced by a trap,
  a mismatch's slow path, the autograd allgather (forward and backward), alltoall with splits, grouped
  calls and the restricted object collectives all run, and the trap never fires.
"""

from __future__ import annotations

import math
import os
import pickle

import torch

from shoal.testing import run_ranks


def _plain_object(rank: int) -> dict:
    """Rank ``rank``'s object of plain data, every allowed type (buildable on any rank)."""
    return {
        "rank": rank, "big": 2 ** 70 + rank, "neg": -rank, "pi": math.pi * rank, "nan": math.nan,
        "inf": (math.inf, -math.inf), "z": complex(rank, -1.5), "s": "é" * rank, "raw": bytes(range(rank + 3)),
        "none": None, "flags": [True, False], "nested": {"a": [1, (2, 3)], (rank, "k"): {1, 2}, 7: frozenset("ab")},
        "f32": torch.arange(6, dtype=torch.float32).reshape(2, 3) * rank,
        "bf16": torch.full((3,), 0.5 + rank, dtype=torch.bfloat16), "mask": torch.tensor([True, rank % 2 == 0]),
        "empty": torch.empty(0, 4, dtype=torch.int64), "scalar": torch.tensor(rank, dtype=torch.int8),
        "param": torch.ones(2, dtype=torch.float64).requires_grad_(),
    }


def _equal(a, b) -> bool:
    """Deep equality with types, NaN equal to NaN, tensors by dtype, shape, values and requires_grad."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad
                and torch.equal(a.detach(), b.detach()))
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


class Point:
    """A user class: fine for trusted=True (pickle), refused by trusted=False."""

    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return type(other) is Point and other.x == self.x


def _round_trips() -> dict:
    import shoal.torch as hvd  # noqa: PLC0415

    me, n = hvd.rank(), hvd.size()
    out = {}
    got = hvd.broadcast_object(_plain_object(me), root_rank=2, name="cfg", trusted=False)
    out["broadcast plain"] = _equal(got, _plain_object(2))
    got = hvd.allgather_object(_plain_object(me), name="stats", trusted=False)
    out["allgather plain"] = all(_equal(g, _plain_object(r)) for r, g in enumerate(got))
    out["plain top-level"] = hvd.allgather_object(me * 1.5, trusted=False) == [r * 1.5 for r in range(n)]
    got = hvd.broadcast_object({"p": Point(me), "t": _plain_object(me)["f32"]}, root_rank=1)
    out["broadcast pickle"] = got["p"] == Point(1) and torch.equal(got["t"], _plain_object(1)["f32"])
    out["allgather pickle"] = hvd.allgather_object(Point(me)) == [Point(r) for r in range(n)]
    # A user class in restricted mode: the sender refuses it with a HINT, the others name the sender.
    try:
        hvd.allgather_object(Point(me) if me == 0 else me, name="pt", trusted=False)
        out["class refused"] = "no error"
    except Exception as exc:  # noqa: BLE001
        out["class refused"] = f"{type(exc).__name__}: {exc}"
    # Members that disagree on the mode: a MismatchError on every rank, before any bytes move.
    try:
        hvd.broadcast_object(1, name="mode", trusted=me != 2)
        out["mode mismatch"] = "no error"
    except Exception as exc:  # noqa: BLE001
        out["mode mismatch"] = f"{type(exc).__name__}: {exc}"
    out["after"] = hvd.allgather_object(me, trusted=False)
    return out


def test_object_collectives_round_trip_in_both_modes():
    results = run_ranks(_round_trips, world_size=3, timeout_s=90)
    for r, res in enumerate(results):
        for key in ("broadcast plain", "allgather plain", "plain top-level", "broadcast pickle", "allgather pickle"):
            assert res[key] is True, (r, key)
        msg = res["class refused"]
        if r == 0:
            assert msg.startswith("TypeError") and "allgather_object of 'pt': the object is a" in msg, msg
            assert "Point" in msg and "trusted=True" in msg and "HINT" in msg, msg
        else:
            assert msg.startswith("MismatchError") and "rank 0 rejected allgather_object of 'pt'" in msg, msg
        msg = res["mode mismatch"]
        assert msg.startswith("MismatchError") and "trusted differs" in msg, msg
        assert "trusted=True (pickle)" in msg and "trusted=False (plain data)" in msg, msg
        assert res["after"] == [0, 1, 2]


# ------------------------------------------------------------------------------------------------------
# A malicious sender in restricted mode
# ------------------------------------------------------------------------------------------------------

class _WritesAFile:
    """Unpickling this runs ``os.system("touch <path>")``."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _malicious(path: str) -> dict:
    import shoal.core.plain  # noqa: PLC0415
    import shoal.torch as hvd  # noqa: PLC0415

    me = hvd.rank()
    honest_encode = shoal.core.plain.encode
    out = {}
    for key, sender in (("broadcast", 1), ("allgather", 2)):
        if me == sender:  # this rank's encoder puts a pickle on the wire instead of the plain encoding
            shoal.core.plain.encode = lambda value, what="": pickle.dumps(_WritesAFile(path))
        try:
            if key == "broadcast":
                hvd.broadcast_object({"lr": 0.1}, root_rank=sender, name="evil", trusted=False)
            else:
                hvd.allgather_object({"lr": 0.1}, name="evil", trusted=False)
            out[key] = {"error": "no error"}
        except Exception as exc:  # noqa: BLE001
            out[key] = {"error": f"{type(exc).__name__}: {exc}", "culprits": list(getattr(exc, "culprit_ranks", ()))}
        finally:
            shoal.core.plain.encode = honest_encode
        out[key]["file"] = os.path.exists(path)
    out["after"] = hvd.allgather_object({"ok": me}, trusted=False)
    return out


def test_a_malicious_pickle_in_restricted_mode_is_refused_and_never_run(tmp_path):
    path = str(tmp_path / "pwned")
    results = run_ranks(_malicious, world_size=3, timeout_s=60, args=(path,))
    for r, res in enumerate(results):
        # broadcast from rank 1: ranks 0 and 2 receive and refuse (the root keeps its own object).
        if r != 1:
            msg = res["broadcast"]["error"]
            assert msg.startswith("MismatchError") and "rank 1 sent bytes that are not Shoal's restricted" in msg
            assert "nothing of them was run or unpickled" in msg and "HINT" in msg, msg
            assert res["broadcast"]["culprits"] == [1]
        # allgather: every rank (rank 2 too, decoding its own bytes) refuses rank 2's.
        msg = res["allgather"]["error"]
        assert msg.startswith("MismatchError") and "rank 2 sent bytes that are not" in msg, msg
        assert res["allgather"]["culprits"] == [2]
        assert res["broadcast"]["file"] is False and res["allgather"]["file"] is False
        assert res["after"] == [{"ok": 0}, {"ok": 1}, {"ok": 2}]
    assert not os.path.exists(path)
    # Control: the payload is live. Unpickled here (what trusted=True would do), it creates the file.
    pickle.loads(pickle.dumps(_WritesAFile(path)))
    assert os.path.exists(path)


# ------------------------------------------------------------------------------------------------------
# Internal paths never unpickle
# ------------------------------------------------------------------------------------------------------

def _no_unpickling() -> dict:
    import pickle as pickle_module  # noqa: PLC0415

    import torch.distributed as dist  # noqa: PLC0415
    import torch.distributed.distributed_c10d as c10d  # noqa: PLC0415

    import shoal.torch as hvd  # noqa: PLC0415

    me, n = hvd.rank(), hvd.size()
    fired: list[str] = []

    def trap(name):
        def wrapped(*args, **kwargs):
            fired.append(name)
            raise AssertionError(f"{name} called on an internal path")
        return wrapped

    targets = [(pickle_module, "loads"), (pickle_module, "load"), (pickle_module, "Unpickler"),
               (c10d, "_unpickler"), (c10d, "_tensor_to_object"), (dist, "all_gather_object"),
               (dist, "broadcast_object_list"), (dist, "gather_object"), (dist, "scatter_object_list")]
    saved = [(mod, name, getattr(mod, name)) for mod, name in targets if hasattr(mod, name)]
    for mod, name, _ in saved:
        setattr(mod, name, trap(f"{mod.__name__}.{name}"))
    out = {}
    try:
        # A mismatch: the slow path exchanges every member's description.
        try:
            hvd.allreduce(torch.ones(2 + me), name="shape")
        except hvd.MismatchError as exc:
            out["mismatch"] = str(exc)
        # A rejected argument: the slow path again, with the rejecting rank's error text.
        try:
            hvd.alltoall(torch.ones(4, 2), splits=[1, 1, 1] if me == 0 else [2, 1, 1], name="tokens")
        except (ValueError, hvd.MismatchError) as exc:
            out["rejected"] = f"{type(exc).__name__}: {exc}"
        # The autograd allgather (its backward needs every member's rows) and alltoall with splits.
        x = torch.ones(me + 1, 2, dtype=torch.float64, requires_grad=True)
        gathered = hvd.allgather(x, name="ag")
        (gathered * torch.arange(float(gathered.shape[0])).unsqueeze(1)).sum().backward()
        start = sum(r + 1 for r in range(me))
        # Horovod's backward of allgather (an Average-allreduce): this rank's rows of the weights.
        out["allgather grad"] = x.grad[:, 0].tolist() == [float(i) for i in range(start, start + me + 1)]
        got, received = hvd.alltoall(torch.arange(3.0 * (me + 1)).reshape(-1, 1), splits=[me + 1] * n)
        out["alltoall"] = received.tolist() == [r + 1 for r in range(n)]
        out["grouped"] = len(hvd.grouped_allgather([torch.ones(me + 1)], name="g")[0]) == sum(range(1, n + 1))
        out["plain"] = hvd.allgather_object({"r": me, "t": torch.ones(me)}, trusted=False)[2]["r"] == 2
        out["plain broadcast"] = hvd.broadcast_object((me, "x"), root_rank=0, trusted=False) == (0, "x")
    finally:
        for mod, name, original in saved:
            setattr(mod, name, original)
    out["fired"] = fired
    return out


def test_internal_paths_never_unpickle():
    results = run_ranks(_no_unpickling, world_size=3, timeout_s=60)
    for r, res in enumerate(results):
        assert res["fired"] == [], (r, res["fired"])
        assert "shape differs" in res["mismatch"] and "rank 2: allreduce of 'shape': float32 [4]" in res["mismatch"]
        assert "splits [1, 1, 1]" in res["rejected"], res["rejected"]
        for key in ("allgather grad", "alltoall", "grouped", "plain", "plain broadcast"):
            assert res[key] is True, (r, key, res)
