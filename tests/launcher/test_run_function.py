"""``shoal.run(func, np=...)``: Horovod's ``horovod.run`` on this machine (Horovod's pytorch_mnist.py starts
itself this way with ``--num-proc``). A real script in a fresh interpreter, as a user runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")


def _run_script(tmp_path, body: str, timeout_s: float = 90.0) -> subprocess.CompletedProcess:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([_SRC, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its sentinel stops the ranks (shoal.runner.sentinel)
        out, err = proc.communicate()
        pytest.fail(f"shoal.run did not finish in {timeout_s} s\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_run_returns_each_ranks_result_and_names_a_failed_rank(tmp_path):
    # One script for both (each shoal.run spawns 2 interpreters that import torch: seconds each).
    res = _run_script(tmp_path, """
        import json, os
        import shoal

        def train(scale, offset=0, fail=False):
            import torch
            import shoal.torch as hvd
            hvd.init()
            if fail and hvd.rank() == 1:
                raise ZeroDivisionError("rank one divides by zero")
            total = hvd.allreduce(torch.tensor([float(hvd.rank())]), op=hvd.Sum).item()
            return {"rank": hvd.rank(), "size": hvd.size(), "value": scale * total + offset,
                    "start_timeout_s": os.environ.get("SHOAL_START_TIMEOUT_S")}

        if __name__ == "__main__":
            before = dict(os.environ)
            results = shoal.run(train, args=(10,), kwargs={"offset": 1}, np=2, use_gloo=True, start_timeout=77)
            print("RESULT", json.dumps({"results": results, "env_unchanged": dict(os.environ) == before}))
            try:
                shoal.run(train, args=(1,), np=2, hosts="otherhost:2")
            except ValueError as exc:
                print("HOSTS", "shoal run -np 2 -H otherhost:2" in str(exc))
            try:
                shoal.run(train, args=(1,), kwargs={"fail": True}, np=2)
            except RuntimeError as exc:
                print("FAILED", str(exc).splitlines()[0])
        """)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    got = json.loads(line[len("RESULT "):])
    # start_timeout is the start_timeout_s knob: the ranks wait as long in init()
    assert got["results"] == [{"rank": r, "size": 2, "value": 11.0, "start_timeout_s": "77.0"} for r in (0, 1)]
    assert got["env_unchanged"]
    assert "HOSTS True" in res.stdout, res.stdout
    failed = next(ln for ln in res.stdout.splitlines() if ln.startswith("FAILED "))
    assert "rank 1 failed" in failed and "ZeroDivisionError" in failed, failed
