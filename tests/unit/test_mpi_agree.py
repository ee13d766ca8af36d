"""The mpirun path without MASTER_ADDR: ``runtime._agree_with_mpi`` lets rank 0 pick host and port and
broadcasts them through mpi4py; without mpi4py it says what to do.

mpi4py is replaced by a stub in ``sys.modules`` (no MPI library is needed): its COMM_WORLD records the
``bcast`` calls and plays rank 0 or rank 1. A one-process end-to-end run of ``init()`` under the same
stub checks that the agreed address really is a rendezvous gloo can use.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import types

import pytest

from shoal.core import runtime
from shoal.core.env import WorldInfo, detect_world

#: What detect_world returns under `mpirun -np 2` without -x MASTER_ADDR (Open MPI's variables).
MPI_RANK0 = detect_world({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2",
                          "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
MPI_RANK1 = WorldInfo(1, 2, 1, 2, None, None, None, "mpi")


class _StubComm:
    """COMM_WORLD of one rank: bcast returns the root's object (recorded from rank 0's call)."""

    def __init__(self, rank: int, root_value=None):
        self.rank, self.root_value, self.calls = rank, root_value, []

    def Get_rank(self) -> int:  # noqa: N802 (mpi4py's spelling)
        return self.rank

    def bcast(self, obj, root=0):
        self.calls.append((obj, root))
        return obj if self.rank == root else self.root_value


@pytest.fixture
def stub_mpi4py(monkeypatch):
    """Install a stub `mpi4py` package whose MPI.COMM_WORLD the test sets."""
    mpi = types.SimpleNamespace(COMM_WORLD=None)
    package = types.ModuleType("mpi4py")
    package.MPI = mpi
    monkeypatch.setitem(sys.modules, "mpi4py", package)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi)
    return mpi


def test_world_under_mpirun_without_master_addr_needs_agreement():
    assert MPI_RANK0 == WorldInfo(0, 2, 0, 2, None, None, None, "mpi")  # init() then calls _agree_with_mpi


def test_rank0_picks_host_and_a_free_port_and_broadcasts_them(stub_mpi4py):
    stub_mpi4py.COMM_WORLD = comm0 = _StubComm(0)
    agreed = runtime._agree_with_mpi(MPI_RANK0)
    [(sent, root)] = comm0.calls
    assert root == 0 and sent == (socket.gethostname(), agreed.master_port)
    assert 0 < agreed.master_port < 65536
    assert (agreed.master_addr, agreed.init_method) == (
        socket.gethostname(), f"tcp://{socket.gethostname()}:{agreed.master_port}")
    # Rank, size, local layout and source are the launcher's, untouched.
    assert (agreed.rank, agreed.size, agreed.local_rank, agreed.local_size, agreed.source) == (0, 2, 0, 2, "mpi")

    # Rank 1 takes part in the same bcast with nothing to send, and gets rank 0's choice.
    stub_mpi4py.COMM_WORLD = comm1 = _StubComm(1, root_value=sent)
    other = runtime._agree_with_mpi(MPI_RANK1)
    assert comm1.calls == [(None, 0)]
    assert (other.master_addr, other.master_port, other.init_method) == (
        agreed.master_addr, agreed.master_port, agreed.init_method)
    assert (other.rank, other.local_rank) == (1, 1)


def test_without_mpi4py_the_error_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # `import mpi4py` now raises ImportError
    with pytest.raises(RuntimeError) as info:
        runtime._agree_with_mpi(MPI_RANK1)
    msg = str(info.value)
    assert "mpirun" in msg and "mpi4py is not installed" in msg and "HINT" in msg
    assert "pip install mpi4py" in msg and "-x MASTER_ADDR=" in msg
    assert info.value.__cause__ is None  # the ImportError is not chained into the user's traceback


_END_TO_END = textwrap.dedent("""
    import json, sys, types, torch

    class Comm:                      # mpirun -np 1 with mpi4py: this process is rank 0
        def Get_rank(self): return 0
        def bcast(self, obj, root=0): return obj

    package = types.ModuleType("mpi4py"); package.MPI = types.SimpleNamespace(COMM_WORLD=Comm())
    sys.modules["mpi4py"] = package
    import shoal.torch as hvd
    hvd.init()
    from shoal.core import runtime
    w = runtime._state("test").world
    print("RESULT " + json.dumps({"source": w.source, "init": w.init_method, "size": hvd.size(),
                                  "sum": hvd.allreduce(torch.ones(2), op=hvd.Sum).tolist()}))
    hvd.shutdown()
""")


def test_init_under_mpirun_rendezvous_through_the_agreed_address(tmp_path):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "1", "SHOAL_BACKEND": "gloo", "SHOAL_TIMEOUT_S": "60"}
    proc = subprocess.run([sys.executable, "-c", _END_TO_END], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    assert out["source"] == "mpi" and out["init"].startswith(f"tcp://{socket.gethostname()}:")
    assert out["size"] == 1 and out["sum"] == [1.0, 1.0]
