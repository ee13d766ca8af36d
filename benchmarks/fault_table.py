"""The fault table, through the real ``shoal run``: every way a job can go wrong, one row each.

Each case starts ``shoal run -np 2`` (gloo on loopback, ``SHOAL_TIMEOUT_S`` small) on this very file
in its rank role (``--rank-case NAME``): a small MLP trains a few steps and one rank injects the fault,
printing ``FAULT at <time>`` just before; the launcher-signal cases instead send SIGINT, SIGTERM or
SIGKILL to ``shoal run`` once the ranks train. Per row:

* time to failure: from the fault (or the signal) to the launcher's exit (for SIGKILL: until the last
  process of the job is gone); within ``timeout + 5`` s;
* launcher exit code;
* culprit named: the launcher's first report line blames the rank that caused it (``shoal: rank 1
  failed: ...`` / ``shoal: rank 1 is the root cause: ...``); for a mismatch that no rank caused alone,
  that line carries the error listing what each rank submitted; for the cases that end well by policy
  (NaN skip/warn), the relayed rank warning names the rank; for launcher signals, the launcher's (or,
  after SIGKILL, the sentinel's) line names the signal;
* abort: a rank ended in SIGABRT (exit code 134) or the launcher exited 134;
* left: processes of the job still alive 5 s after the launcher exited (each run carries a marker
  variable that every descendant inherits; whatever is left is killed).

A row is ``ok`` when all four hold. Rows that depend on what the ranks' errors say about their peers
(the ``culprit_ranks`` fields, the exit status after a stall) follow the engine; the launcher's part is
to report what the fields say.

Run (about 2 minutes on 2 cores)::

    .venv/bin/python benchmarks/fault_table.py
    .venv/bin/python benchmarks/fault_table.py --timeout-s 5 --cases dead_rank stall_busy --json out.json

``tests/launcher/test_fault_table.py`` runs every case in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

__all__ = ["CASES", "Case", "Row", "run_case", "main"]

#: Marks every process of one run (inherited by every descendant), to find what is left behind.
_MARK = "FAULT_TABLE_RUN_MARK"
#: How long the job's processes may take to go after the launcher exited (the 5 s target).
_SETTLE_S = 5.0
#: Slack on top of the bound for the ranks' start-up (torch import, init), before the fault.
_START_S = 60.0


@dataclass(frozen=True)
class Case:
    """One row of the table."""

    name: str
    what: str  # the fault, in words
    expect: str  # "fail" (non-zero, not 134), "ok" (exit 0), or "SIGINT"/"SIGTERM"/"SIGKILL" (sent)
    culprit: Optional[int] = None  # the rank to blame; None: see `named`
    named: Optional[Callable[[str, str], bool]] = None  # (first report line, stderr) -> named?
    env: dict = field(default_factory=dict)


def _mismatch_listing(first: str, err: str) -> bool:
    """A mismatch no single rank caused: the report leads with it, listing what each rank submitted."""
    block = _report_block(err)
    return "MismatchError" in first and "rank 0" in block and "rank 1" in block


def _report_block(err: str) -> str:
    """The launcher's report: its first line and the detail lines under it."""
    lines = [ln for ln in err.splitlines() if ln.startswith("shoal:")]
    start = next((i for i, ln in enumerate(lines) if not ln.startswith("shoal:   ")), 0)
    block = [lines[start]] if lines else []
    block += [ln for ln in lines[start + 1:] if ln.startswith("shoal:     ")]
    return "\n".join(block)


def _warned_about_rank1(_first: str, err: str) -> bool:
    return any("non-finite gradients" in ln and "on rank 1" in ln for ln in err.splitlines())


def _interrupted(sig: str) -> Callable[[str, str], bool]:
    return lambda _first, err: f"shoal: interrupted ({sig})" in err


def _sentinel(_first: str, err: str) -> bool:
    return "died without stopping its ranks; the sentinel stopped" in err


CASES: list[Case] = [
    Case("skip_backward", "rank 1 skips loss.backward() in step 2, calls step()", "fail", culprit=1),
    Case("skip_allreduce", "rank 1 skips allreduce 'x' and calls allreduce 'y'", "fail",
         named=_mismatch_listing),
    Case("shape_mismatch", "allreduce of [2, 3] on rank 0, [3, 3] on rank 1", "fail", named=_mismatch_listing),
    Case("param_mismatch", "rank 1 builds the model with another width", "fail", named=_mismatch_listing),
    Case("dead_rank", "rank 1 SIGKILLs itself in step 2", "fail", culprit=1),
    Case("raising_rank", "rank 1 raises ValueError in step 2", "fail", culprit=1),
    Case("nan_raise", "rank 1's loss is NaN in step 2, nan_check=raise", "fail", culprit=1,
         env={"SHOAL_NAN_CHECK": "raise"}),
    Case("nan_skip", "the same, nan_check=skip", "ok", named=_warned_about_rank1,
         env={"SHOAL_NAN_CHECK": "skip"}),
    Case("nan_warn", "the same, nan_check=warn", "ok", named=_warned_about_rank1,
         env={"SHOAL_NAN_CHECK": "warn"}),
    Case("uneven_join", "rank 1 has 2 batches, rank 0 has 4, join() after the loop", "ok"),
    Case("uneven_no_join", "the same without join(): rank 1 ends and exits 0", "fail", culprit=1),
    Case("hung_rank0", "rank 0 hangs (sleeps) in step 2", "fail", culprit=0),
    Case("stall_busy", "rank 1 is busy (sleeps) in step 2", "fail", culprit=1),
    Case("skip_then_exit", "rank 1 skips the last allreduce and exits 0", "fail", culprit=1),
    Case("launcher_sigint", "SIGINT (Ctrl-C) to shoal run while training", "SIGINT", named=_interrupted("SIGINT")),
    Case("launcher_sigterm", "SIGTERM to shoal run while training", "SIGTERM", named=_interrupted("SIGTERM")),
    Case("launcher_sigkill", "SIGKILL to shoal run while training", "SIGKILL", named=_sentinel),
]


@dataclass
class Row:
    """What one case gave."""

    case: str
    what: str
    time_to_failure_s: Optional[float]
    exit_code: Optional[int]
    culprit_named: bool
    abort: bool
    left: int
    within_bound: bool
    ok: bool
    first_line: str = ""
    exit_ok: bool = True            # the exit code is the one the case expects


# ---------------------------------------------------------------------------------- rank side


def _rank_main(case: str) -> None:
    """One rank of ``case``: train a small MLP and inject the fault (rank 1 unless said otherwise)."""
    import torch  # noqa: PLC0415

    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    hvd.init()
    rank = hvd.rank()

    def fault() -> None:
        print(f"FAULT at {time.time():.3f}", flush=True)

    width = 12 if (case == "param_mismatch" and rank == 1) else 16
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 4))
    if case == "param_mismatch":
        fault()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters())
    if case == "shape_mismatch":
        fault()
        hvd.allreduce(torch.ones(2, 3) if rank == 0 else torch.ones(3, 3), name="metrics.loss")
    if case == "skip_allreduce":
        if rank == 1:
            fault()
        else:
            hvd.allreduce(torch.ones(3), name="x")
        hvd.allreduce(torch.ones(3), name="y")

    forever = case.startswith("launcher_")
    steps = 4 if case != "uneven_join" and case != "uneven_no_join" else (4 if rank == 0 else 2)
    step = 0
    while forever or step < steps:
        if forever and step == 1:
            print("ready", flush=True)
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * step + rank))
        opt.zero_grad()
        loss = model(x).square().mean()
        if step == 2 and rank == 1:
            if case in ("dead_rank", "raising_rank", "stall_busy"):
                fault()
            if case == "dead_rank":
                os.kill(os.getpid(), signal.SIGKILL)
            if case == "raising_rank":
                raise ValueError("rank 1 broke on purpose")
            if case == "stall_busy":
                time.sleep(600)  # busy outside Shoal: only the others' timeout can name it
            if case.startswith("nan_"):
                fault()
                loss = loss * float("nan")
        if step == 2 and rank == 0 and case == "hung_rank0":
            fault()
            time.sleep(600)
        if not (case == "skip_backward" and rank == 1 and step == 2):
            loss.backward()
        elif case == "skip_backward":
            fault()
        opt.step()
        step += 1
        if forever:
            time.sleep(0.05)
    if case in ("uneven_join", "uneven_no_join") and rank == 1:
        fault()  # rank 1 ran out of batches first
    if case == "uneven_join":
        hvd.join()
    if case == "skip_then_exit":
        if rank == 1:
            fault()
            sys.exit(0)  # skipped the allreduce, ended normally
        hvd.allreduce(torch.ones(3), name="final.metric")


# ------------------------------------------------------------------------------- launcher side


def _marked(marker: str) -> list[int]:
    needle = f"{_MARK}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _first_report_line(err: str) -> str:
    for line in err.splitlines():
        if line.startswith("shoal:") and not line.startswith("shoal:   "):
            return line
    return ""


def run_case(case: Case, timeout_s: float = 3.0, verbose: bool = False) -> Row:
    """Run one case through ``shoal run`` and measure its row."""
    marker = uuid.uuid4().hex
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "SHOAL_TIMEOUT_S": str(timeout_s), _MARK: marker, **case.env,
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    argv = [sys.executable, "-m", "shoal.runner.cli", "run", "-np", "2", "python", os.path.abspath(__file__),
            "--rank-case", case.name]
    sig = getattr(signal, case.expect) if case.expect.startswith("SIG") else None
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    out: list[str] = []
    err: list[str] = []
    marks: dict[str, float] = {}

    def _read(stream, sink: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            sink.append(line)
            m = re.search(r"FAULT at (\d+\.\d+)", line)
            if m:
                marks.setdefault("fault", float(m.group(1)))
            if sig is not None and "ready" in line and "fault" not in marks:
                marks["fault"] = time.time()
                os.kill(proc.pid, sig)

    readers = [threading.Thread(target=_read, args=(proc.stdout, out), daemon=True),
               threading.Thread(target=_read, args=(proc.stderr, err), daemon=True)]
    for t in readers:
        t.start()
    bound = timeout_s + 5.0
    try:
        code: Optional[int] = proc.wait(timeout=_START_S + bound)
    except subprocess.TimeoutExpired:
        code = None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    ended = time.time()
    deadline = time.monotonic() + _SETTLE_S
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = time.time()
    left = _marked(marker)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for t in readers:
        t.join(timeout=5)
    stdout, stderr = "".join(out), "".join(err)
    first = _first_report_line(stderr)
    fault_at = marks.get("fault")
    # After SIGKILL the launcher is gone at once: what counts is when its last process went.
    end = gone if case.expect == "SIGKILL" and not left else ended
    ttf = (end - fault_at) if fault_at is not None else None
    abort = code == 134 or "SIGABRT" in first or any("SIGABRT" in ln for ln in stderr.splitlines()
                                                      if ln.startswith("shoal:"))
    if case.expect == "fail":
        code_ok = code not in (None, 0, 134)
    elif case.expect == "ok":
        code_ok = code == 0
    else:
        code_ok = code in (128 + int(sig), -int(sig))
    if case.culprit is not None:
        named = bool(re.match(rf"shoal: rank {case.culprit} (failed|is the root cause)", first))
    elif case.named is not None:
        named = case.named(first, stderr)
    else:
        named = code == 0  # nothing to blame: the job ended well
    within = ttf is not None and ttf <= bound
    row = Row(case.name, case.what, None if ttf is None else round(ttf, 2), code, named, abort, len(left),
              within, code_ok and named and not abort and not left and within, first, exit_ok=code_ok)
    if verbose or not row.ok:
        print(f"--- {case.name}: exit {code}\n{stdout[-3000:]}\n{stderr[-6000:]}", file=sys.stderr)
    return row


def format_table(rows: list[Row], timeout_s: float) -> str:
    head = (f"{'case':<17} {'time to failure':>15} {'exit':>5} {'culprit named':>13} {'abort':>5} "
            f"{'left':>4}  ok")
    lines = [head, "-" * len(head)]
    for r in rows:
        ttf = "-" if r.time_to_failure_s is None else f"{r.time_to_failure_s:.1f} s"
        lines.append(f"{r.case:<17} {ttf:>15} {str(r.exit_code):>5} {'yes' if r.culprit_named else 'NO':>13} "
                     f"{'YES' if r.abort else 'no':>5} {r.left:>4}  {'ok' if r.ok else 'FAIL'}")
    bad = [r.case for r in rows if not r.ok]
    lines.append(f"{len(rows) - len(bad)} of {len(rows)} rows ok (bound: timeout {timeout_s:g} s + 5 s)"
                 + (f"; failing: {', '.join(bad)}" if bad else ""))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout-s", type=float, default=3.0, help="SHOAL_TIMEOUT_S of every run")
    parser.add_argument("--cases", nargs="*", choices=[c.name for c in CASES], help="default: all")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--verbose", action="store_true", help="print every run's output")
    parser.add_argument("--rank-case", help=argparse.SUPPRESS)  # the rank role, under shoal run
    args = parser.parse_args(argv)
    if args.rank_case:
        _rank_main(args.rank_case)
        return 0
    import torch  # noqa: PLC0415 (for the header only)

    print(f"fault table: shoal run -np 2, gloo on loopback, SHOAL_TIMEOUT_S={args.timeout_s:g}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"python {platform.python_version()}", flush=True)
    cases = [c for c in CASES if not args.cases or c.name in args.cases]
    t0 = time.monotonic()
    rows = []
    for case in cases:
        rows.append(run_case(case, args.timeout_s, args.verbose))
        print(f"  {case.name}: {'ok' if rows[-1].ok else 'FAIL'}", file=sys.stderr, flush=True)
    print(format_table(rows, args.timeout_s))
    print(f"total {time.monotonic() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"timeout_s": args.timeout_s, "torch": torch.__version__, "cpus": os.cpu_count(),
                       "rows": [asdict(r) for r in rows]}, fh, indent=1)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
