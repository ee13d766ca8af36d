"""Negative tests: collectives fail loudly, never hang, never return garbage.

Mismatches raise MismatchError on every rank with the same message; a rank that never arrives (or waits in
another collective) is named, with what it is doing, by every member that waits for it, at the
process-group timeout, and the harness report shows the stuck rank's stack; a rank killed mid-run is named
as the root cause; a call before init says how to fix it.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from shoal.testing import RanksFailed, run_ranks


def _message(error: str) -> str:
    """The exception text of a rank's report, without its traceback."""
    return error.split("\n\nTraceback")[0]


# --------------------------------------------------------------------------------------------------------
# Shape mismatch: both ranks raise, with the same message (asserted through RanksFailed.results)
# --------------------------------------------------------------------------------------------------------

def _shape_mismatch():
    from shoal.core import collectives as C
    from shoal.core import runtime as rt

    C.allreduce(torch.ones(2 + rt.rank(), 3), name="grad.w")


def test_shape_mismatch_raises_on_every_rank_with_the_same_message():
    with pytest.raises(RanksFailed) as info:
        run_ranks(_shape_mismatch, world_size=2, timeout_s=30, pg_timeout_s=10)
    messages = []
    for r in (0, 1):
        res = info.value.by_rank(r)
        assert res.status == "error", res.describe()
        assert res.error.startswith("MismatchError"), res.error
        msg = _message(res.error)
        for needed in ("'grad.w'", "shape", "rank 0", "rank 1", "[2, 3]", "[3, 3]", "float32", "op Average",
                       "HINT"):
            assert needed in msg, f"{needed!r} missing from rank {r}'s message:\n{msg}"
        messages.append(msg.split(": ", 1)[1])
    assert messages[0] == messages[1]


# --------------------------------------------------------------------------------------------------------
# dtype / name / op / kind / grouped / rejected-argument mismatches, in one launch: each is caught, and
# the next collective still works (every rank took the same exchanges, so the group stays aligned).
# --------------------------------------------------------------------------------------------------------

def _many_mismatches() -> dict:
    from shoal.core import collectives as C
    from shoal.core import runtime as rt
    from shoal.core.errors import MismatchError

    me = rt.rank()
    out: dict[str, str] = {}

    def expect(key, fn, exc_type=MismatchError):
        try:
            fn()
        except exc_type as exc:
            out[key] = f"{type(exc).__name__}: {exc}"
            return
        raise AssertionError(f"{key}: no {exc_type.__name__}")

    expect("dtype", lambda: C.allreduce(torch.ones(4, dtype=torch.float32 if me == 0 else torch.float16),
                                        name="loss"))
    expect("name", lambda: C.allreduce(torch.ones(4), name=f"bias.{me}"))
    expect("op", lambda: C.allreduce(torch.ones(4), name="acc", op=C.Sum if me == 0 else C.Max))
    expect("kind", lambda: C.allreduce(torch.ones(4), name="x") if me == 0 else C.allgather(torch.ones(4), name="x"))
    expect("root", lambda: C.broadcast(torch.ones(2), root_rank=me, name="weights"))
    expect("allgather_rest", lambda: C.allgather(torch.ones(2, 3 + me), name="emb"))
    expect("grouped", lambda: C.grouped_allreduce([torch.ones(2), torch.ones(3 if me == 0 else 4), torch.ones(1)],
                                                   name="layer"))
    # Rank 0 passes splits that do not add up: it raises its own ValueError, rank 1 learns at once.
    if me == 0:
        expect("rejected", lambda: C.alltoall(torch.ones(4, 2), splits=[1, 1], name="tokens"), ValueError)
    else:
        expect("rejected", lambda: C.alltoall(torch.ones(4, 2), splits=[2, 2], name="tokens"))
    # Generated names count per process set, so an unnamed call matches a peer's unnamed call...
    C.allreduce(torch.ones(1))
    # ...and a named call on one rank against an unnamed one on the other is a name mismatch.
    expect("named_vs_generated", lambda: C.allreduce(torch.ones(1), name="given" if me == 0 else None))
    # After all of these the ranks are still aligned.
    out["after"] = str(C.allreduce(torch.ones(2), op=C.Sum).tolist())
    return out


def test_mismatches_name_the_tensor_and_every_rank():
    results = run_ranks(_many_mismatches, world_size=2, timeout_s=60, pg_timeout_s=20)
    for r, res in enumerate(results):
        assert res["after"] == "[2.0, 2.0]"
        dtype = res["dtype"]
        assert "'loss'" in dtype and "dtype differs" in dtype and "float32" in dtype and "float16" in dtype
        assert "rank 0: allreduce of 'loss': float32 [4]" in dtype
        assert "rank 1: allreduce of 'loss': float16 [4]" in dtype
        assert "'bias.0'" in res["name"] and "'bias.1'" in res["name"] and "name differs" in res["name"]
        assert "op differs" in res["op"] and "op Sum" in res["op"] and "op Max" in res["op"]
        assert "allreduce of 'x'" in res["kind"] and "allgather of 'x'" in res["kind"]
        assert "collective differs" in res["kind"]
        assert "root rank differs" in res["root"] and "root 0" in res["root"] and "root 1" in res["root"]
        assert "[2, 3]" in res["allgather_rest"] and "[2, 4]" in res["allgather_rest"]
        assert "first difference at tensor 1" in res["grouped"] and "[3]" in res["grouped"]
        assert "'given'" in res["named_vs_generated"] and "'allreduce." in res["named_vs_generated"]
        for key in ("dtype", "name", "op", "kind", "root", "allgather_rest", "grouped"):
            assert res[key].startswith("MismatchError") and "HINT" in res[key], (key, res[key])
    # Same text on both ranks.
    for key in ("dtype", "name", "op", "kind", "root", "grouped"):
        assert results[0][key] == results[1][key], key
    # The rank with bad arguments raises its own error; its peer is told who rejected what.
    assert results[0]["rejected"].startswith("ValueError") and "splits [1, 1]" in results[0]["rejected"]
    peer = results[1]["rejected"]
    assert peer.startswith("MismatchError") and "rank 0 rejected alltoall of 'tokens'" in peer
    assert "splits [1, 1]" in peer and "HINT" in peer


# --------------------------------------------------------------------------------------------------------
# A rank that never calls the collective, or calls another one: when the backend's timeout fires, every
# waiting member names it, and what it is doing (records in the c10d store, written on the failure path
# only); the harness report shows the stuck rank's stack.
# --------------------------------------------------------------------------------------------------------

def _stuck_elsewhere():
    time.sleep(60)


def _skips_the_collective():
    from shoal.core import collectives as C
    from shoal.core import runtime as rt

    if rt.rank() == 2:
        _stuck_elsewhere()
    C.allreduce(torch.ones(3), name="x")


def test_rank_that_never_arrives_is_named_by_every_other_rank():
    # Timeout 3 s, then up to 2.3 s (10% of it + 2 s) for the members' records.
    start = time.monotonic()
    with pytest.raises(RanksFailed) as info:
        run_ranks(_skips_the_collective, world_size=3, timeout_s=40, pg_timeout_s=3, grace_s=5)
    elapsed = time.monotonic() - start
    assert elapsed < 30, f"took {elapsed:.1f} s"
    for r in (0, 1):
        res = info.value.by_rank(r)
        assert res.status == "error" and res.error.startswith("RankFailureError"), res.describe()
        msg = _message(res.error)
        assert "allreduce of 'x'" in msg and "timed out" in msg and "HINT" in msg, msg
        assert "rank 2 never reached a collective (busy or hung outside Shoal)" in msg, msg
        assert "rank 1 never" not in msg and "rank 0 never" not in msg, msg  # members that came are not
    assert info.value.by_rank(2).status == "killed"
    report = str(info.value)
    assert report.index("rank 0: raised") < report.index("rank 2: killed")
    assert "_stuck_elsewhere" in report  # faulthandler's dump of the stuck rank


def _calls_another_collective():
    from shoal.core import collectives as C
    from shoal.core import runtime as rt

    pair = rt.add_process_set([1, 2])
    try:
        if rt.rank() == 2:  # waits for rank 1 in 'y'; rank 1 waits for rank 2 in 'x'
            C.allreduce(torch.ones(3), name="y", process_set=pair)
        else:
            C.allreduce(torch.ones(3), name="x")
    except Exception as exc:  # noqa: BLE001 (every rank reports what it was told)
        time.sleep(4)  # stay alive until every peer has failed too: a rank that exits is named dead
        return f"{type(exc).__name__}: {exc}"
    return None


def test_rank_in_another_collective_is_named_with_both_names():
    start = time.monotonic()
    results = run_ranks(_calls_another_collective, world_size=3, timeout_s=40, pg_timeout_s=3, grace_s=4)
    assert time.monotonic() - start < 30
    for r in (0, 1):
        msg = results[r]
        assert msg is not None and msg.startswith("RankFailureError"), msg
        assert "allreduce of 'x' timed out on rank" in msg, msg
        assert "rank 2 is in allreduce of 'y' (call 0 on process set [1, 2])" in msg, msg
    msg = results[2]
    assert msg is not None and msg.startswith("RankFailureError"), msg
    assert "allreduce of 'y' timed out on rank 2" in msg, msg
    assert "rank 1 is in allreduce of 'x' (call 0 on process set [0, 1, 2])" in msg, msg


# --------------------------------------------------------------------------------------------------------
# A rank killed mid-run (SIGKILL): its peer raises RankFailureError naming it.
# --------------------------------------------------------------------------------------------------------

def _killed_mid_run():
    from shoal.core import collectives as C
    from shoal.core import runtime as rt

    C.allreduce(torch.ones(2), name="warmup")
    if rt.rank() == 1:
        os.kill(os.getpid(), 9)
    for step in range(100):
        C.allreduce(torch.ones(2), name=f"step.{step}")


def test_killed_rank_is_named_by_its_peer():
    with pytest.raises(RanksFailed) as info:
        run_ranks(_killed_mid_run, world_size=2, timeout_s=30, pg_timeout_s=10, grace_s=5)
    r1 = info.value.by_rank(1)
    assert r1.status == "died" and r1.exitcode == -9, r1.describe()
    r0 = info.value.by_rank(0)
    assert r0.status == "error" and r0.error.startswith("RankFailureError"), r0.describe()
    assert "rank 1" in r0.error and "died" in r0.error and "'step.0'" in r0.error
    report = str(info.value)
    assert report.index("rank 1: died") < report.index("rank 0: raised")  # root cause first


# --------------------------------------------------------------------------------------------------------
# Before init: every public collective raises NotInitializedError with a HINT.
# --------------------------------------------------------------------------------------------------------

def _before_init() -> dict:
    from shoal.core import collectives as C
    from shoal.core.errors import NotInitializedError

    t = torch.ones(2)
    calls = {
        "allreduce": lambda: C.allreduce(t), "allreduce_": lambda: C.allreduce_(t),
        "allreduce_async": lambda: C.allreduce_async(t), "allreduce_async_": lambda: C.allreduce_async_(t),
        "grouped_allreduce": lambda: C.grouped_allreduce([t]), "grouped_allreduce_": lambda: C.grouped_allreduce_([t]),
        "grouped_allreduce_async": lambda: C.grouped_allreduce_async([t]),
        "grouped_allreduce_async_": lambda: C.grouped_allreduce_async_([t]),
        "allgather": lambda: C.allgather(t), "allgather_async": lambda: C.allgather_async(t),
        "broadcast": lambda: C.broadcast(t, 0), "broadcast_": lambda: C.broadcast_(t, 0),
        "broadcast_async": lambda: C.broadcast_async(t, 0), "broadcast_async_": lambda: C.broadcast_async_(t, 0),
        "alltoall": lambda: C.alltoall(t), "alltoall_async": lambda: C.alltoall_async(t),
        "reducescatter": lambda: C.reducescatter(t), "reducescatter_async": lambda: C.reducescatter_async(t),
        "grouped_allgather": lambda: C.grouped_allgather([t]),
        "grouped_allgather_async": lambda: C.grouped_allgather_async([t]),
        "grouped_reducescatter": lambda: C.grouped_reducescatter([t]),
        "grouped_reducescatter_async": lambda: C.grouped_reducescatter_async([t]),
        "barrier": lambda: C.barrier(), "broadcast_object": lambda: C.broadcast_object(1),
        "allgather_object": lambda: C.allgather_object(1),
        "sparse_allreduce_async": lambda: C.sparse_allreduce_async(t.to_sparse()),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = "no error"
        except NotInitializedError as exc:
            out[name] = str(exc)
    return out


def test_every_collective_before_init_raises_with_hint():
    from shoal.core import collectives as C

    (out,) = run_ranks(_before_init, world_size=1, timeout_s=30, init=False)
    public = {n for n in C.__all__ if n[0].islower() and n not in ("poll", "synchronize")}
    assert set(out) == public, "every public collective is covered"
    for name, msg in out.items():
        base = name.rstrip("_").replace("_async", "")
        assert f"{base}() was called before shoal.init()" in msg and "HINT" in msg, (name, msg)
