"""The failure summary without starting anything: which rank is blamed, on whose word, and the lines.

The end-to-end runs (the real ``shoal run``) are in test_run.py and the fault table (test_fault_table.py).
"""

from __future__ import annotations

import io
import json
import signal
from types import SimpleNamespace

import pytest

from shoal.core.errors import RankFailureError, StallError
from shoal.runner import report
from shoal.runner.report import Failure

pytestmark = pytest.mark.timeout(60)


def _summary(failures, world_size=2, exited_ok=()):
    out = io.StringIO()
    code = report.print_summary(failures, world_size, None, exited_ok, out=out)
    return code, out.getvalue().splitlines()


def test_the_rank_the_ranks_named_is_blamed_even_when_it_failed_later():
    # Rank 0's error came first (it waited for rank 1 and said so); rank 1's own exception is the cause.
    waiter = Failure(rank=0, host="h", what="RankFailureError: rank 1 died", timestamp=1.0,
                     error_type="RankFailureError", culprit_ranks=[1])
    crash = Failure(rank=1, host="h", what="ValueError: broke", timestamp=2.0, error_type="ValueError")
    code, lines = _summary([waiter, crash])
    assert lines[0] == "shoal: rank 1 failed: ValueError: broke"
    assert lines[1] == "shoal:   then rank 0: RankFailureError: rank 1 died"
    assert code == 1 and "the root cause is rank 1" in lines[-1]


def test_a_busy_rank_named_by_a_stall_error_is_the_root_cause_not_the_waiter():
    waiter = Failure(rank=0, host="h", what="StallError: rank 0 has waited 3 s ... rank 1 never reached",
                     timestamp=1.0, error_type="StallError", culprit_ranks=[1])
    busy = Failure(rank=1, host="h", what="killed by SIGTERM (signal 15)", exitcode=-15, timestamp=2.0,
                   stopped=True)
    code, lines = _summary([waiter, busy])
    assert lines[0] == ("shoal: rank 1 is the root cause: named by rank 0 (StallError: rank 0 has waited 3 s "
                        "... rank 1 never reached)")
    assert lines[1] == "shoal:   rank 1 was still running when shoal stopped it"
    assert len(lines) == 3 and code == 1
    assert "the root cause is rank 1: its output above carries the prefix [rank1]" in lines[2]


def test_a_rank_that_exited_0_while_others_waited_is_named_as_such():
    waiter = Failure(rank=0, host="h", what="RankFailureError: peer left", timestamp=1.0,
                     error_type="RankFailureError", culprit_ranks=[1])
    code, lines = _summary([waiter], exited_ok=[1])
    assert lines[0] == "shoal: rank 1 is the root cause: named by rank 0 (RankFailureError: peer left)"
    assert lines[1] == "shoal:   rank 1 exited normally (code 0) while rank 0 still waited for it"
    assert code == 1  # the run failed, whatever the culprit's own status


def test_the_most_named_rank_wins_and_every_namer_is_listed():
    # The fault table's "collective that cannot pair": ranks 0 and 1 name rank 2, rank 2 names rank 1.
    fs = [Failure(rank=0, host="h", what="RankFailureError: a", timestamp=1.0, culprit_ranks=[2]),
          Failure(rank=2, host="h", what="RankFailureError: b", timestamp=1.5, culprit_ranks=[1]),
          Failure(rank=1, host="h", what="RankFailureError: c", timestamp=2.0, culprit_ranks=[2])]
    v = report.blame(fs)
    assert (v.culprit, v.own_failure, [f.rank for f in v.namers]) == (2, False, [0, 1])
    _, lines = _summary(fs, world_size=3)
    # Rank 2's own error only says whom it waited for: the others' word decides.
    assert lines[0] == "shoal: rank 2 is the root cause: named by ranks 0, 1 (RankFailureError: a)"
    assert lines[1:3] == ["shoal:   then rank 2: RankFailureError: b", "shoal:   then rank 1: RankFailureError: c"]


def test_a_stopped_rank_does_not_vote():
    fs = [Failure(rank=0, host="h", what="StallError: x", timestamp=1.0, culprit_ranks=[1]),
          Failure(rank=1, host="h", what="killed by SIGTERM (signal 15)", exitcode=-15, timestamp=2.0,
                  stopped=True, culprit_ranks=[0])]
    assert report.blame(fs).culprit == 1


def test_without_fields_the_fallback_order_holds():
    # A plain torch script: rank 0 saw gloo's "closed by peer" first; rank 1 raised on its own.
    fs = [Failure(rank=0, host="h", what="DistBackendError: Connection closed by peer [127.0.0.1]:1",
                  timestamp=1.0, collateral=True),
          Failure(rank=1, host="h", what="ValueError: x", timestamp=2.0)]
    assert report.blame(fs).culprit == 1
    # Identical errors on every rank (a symmetric mismatch): the first, then the lower rank.
    fs = [Failure(rank=1, host="h", what="MismatchError: m", timestamp=1.0),
          Failure(rank=0, host="h", what="MismatchError: m", timestamp=1.0)]
    assert report.blame(fs).culprit == 0


def test_an_agent_failure_without_a_rank():
    code, lines = _summary([Failure(rank=None, host="n2", what="remote command exited with code 255",
                                    exitcode=1)])
    assert lines[0] == "shoal: agent on host n2 failed: remote command exited with code 255"
    assert "the launch failed on host n2" in lines[-1] and code == 1


def _pf(exitcode, message, extra=None):
    msg = {"message": message, "extraInfo": {"timestamp": "5", **(extra or {})}} if message else "Signal"
    return SimpleNamespace(exitcode=exitcode, pid=42, timestamp=5, message=msg, local_rank=0)


def test_failure_from_torch_reads_the_fields_not_the_text():
    pf = _pf(1, "StallError: rank 1 is missing; also mentions rank 7 and closed by peer",
             {"shoal": {"type": "StallError", "shoal_error": True, "culprit_ranks": [1], "time": 12.25}})
    f = report.failure_from_torch(0, pf, None, "h")
    assert (f.culprit_ranks, f.error_type, f.timestamp, f.collateral) == ([1], "StallError", 12.25, False)
    # A rank that raised and then aborted at exit keeps its exception in the summary.
    f = report.failure_from_torch(0, _pf(-6, "StallError: x", {"shoal": {"culprit_ranks": [1]}}), None, "h")
    assert f.what == "StallError: x (then killed by SIGABRT (signal 6))" and f.culprit_ranks == [1]
    f = report.failure_from_torch(0, _pf(-9, None), None, "h")
    assert f.what == "killed by SIGKILL (signal 9)" and not f.stopped
    assert report.failure_from_torch(0, _pf(-int(signal.SIGTERM), None), None, "h").stopped
    # Not a Shoal error: gloo's words for a peer gone away (fallback) still mark a victim.
    for extra in ({}, {"shoal": {"type": "RuntimeError", "shoal_error": False, "culprit_ranks": []}}):
        f = report.failure_from_torch(0, _pf(1, "RuntimeError: Connection closed by peer [::1]:5", extra),
                                      None, "h")
        assert f.collateral and f.culprit_ranks == []


def test_the_shim_records_shoal_fields_in_torchs_error_file(tmp_path, monkeypatch):
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    for exc, culprits in [(StallError("waited", rank=0, missing_ranks=[1]), [1]),
                          (RankFailureError("gone", rank=0, dead_ranks=[2], missing_ranks=[1]), [2]),
                          (ValueError("plain"), [])]:
        try:
            raise exc
        except Exception as caught:  # noqa: BLE001
            report.record_exception(caught)
        data = json.loads(path.read_text())
        fields = data["message"]["extraInfo"]["shoal"]
        assert data["message"]["message"].startswith(type(exc).__name__)  # torch's record is intact
        assert (fields["type"], fields["culprit_ranks"]) == (type(exc).__name__, culprits)
        assert fields["shoal_error"] == (not isinstance(exc, ValueError))
        assert not list(tmp_path.glob("*.tmp"))


def test_a_multi_line_error_shows_its_listing_under_the_first_line():
    pf = _pf(1, "MismatchError: shoal: ranks disagree on allreduce of 'x' vs allreduce of 'y': name differs:\n"
                "  rank 0: allreduce of 'x': float32 [3]\n  rank 1: allreduce of 'y': float32 [3]\n" +
                "".join(f"  line {i}\n" for i in range(10)))
    f = report.failure_from_torch(0, pf, None, "h")
    _, lines = _summary([f])
    assert lines[0].endswith("name differs:")
    assert lines[1:3] == ["shoal:     rank 0: allreduce of 'x': float32 [3]",
                          "shoal:     rank 1: allreduce of 'y': float32 [3]"]
    assert lines[7] == "shoal:     ... 6 more line(s) in the rank's output"
