"""Horovod compatibility of ``shoal.torch`` without a process group: the names a Horovod script uses
exist, the build queries answer what torch has, ``init``'s Horovod arguments are checked before any
rendezvous, and a plain ``python train.py`` (no launcher) is a world of one.

The multi-rank side (``init(comm=..., process_sets=...)`` on 2 ranks) is in tests/dist/test_collectives.py.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

import shoal.torch as hvd
from shoal.torch import _api
from shoal.core import env as _env
from shoal.core.errors import NotInitializedError

#: What a typical Horovod PyTorch script calls (horovod.torch's public surface, minus Horovod-only
#: machinery such as elastic state).
HOROVOD_NAMES = (
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size", "cross_rank",
    "cross_size", "is_homogeneous", "start_timeline", "stop_timeline",
    "nccl_built", "gloo_built", "mpi_built", "cuda_built", "rocm_built", "ddl_built", "ccl_built",
    "mpi_enabled", "gloo_enabled", "mpi_threads_supported",
    "ProcessSet", "global_process_set", "add_process_set", "remove_process_set",
    "Average", "Sum", "Adasum", "Min", "Max", "Product", "Compression",
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "grouped_allreduce",
    "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_", "allgather",
    "allgather_async", "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "alltoall",
    "alltoall_async", "reducescatter", "reducescatter_async", "barrier", "join", "poll", "synchronize",
    "broadcast_object", "allgather_object", "DistributedOptimizer", "broadcast_parameters",
    "broadcast_optimizer_state", "SyncBatchNorm", "grouped_allgather", "grouped_allgather_async",
    "grouped_reducescatter", "grouped_reducescatter_async", "sparse_allreduce_async",
    "HorovodInternalError", "HostsUpdatedInterrupt", "Compressor", "NoneCompressor", "FP16Compressor",
)


def test_every_horovod_name_is_exported():
    missing = [n for n in HOROVOD_NAMES if not hasattr(hvd, n)]
    assert not missing, f"shoal.torch lacks Horovod names: {missing}"
    assert not [n for n in HOROVOD_NAMES if n not in hvd.__all__]


def test_build_queries_answer_from_torch():
    assert hvd.gloo_built() is dist.is_gloo_available()
    assert hvd.mpi_built() is dist.is_mpi_available()
    assert (hvd.nccl_built() > 0) is dist.is_nccl_available()
    assert hvd.cuda_built() is (torch.version.cuda is not None)
    assert hvd.rocm_built() is (getattr(torch.version, "hip", None) is not None)
    assert hvd.ddl_built() is False and hvd.ccl_built() is False


@pytest.mark.parametrize("version, code", [((2, 18, 5), 21805), ((2, 21, 5, "+cuda12.4"), 22105),
                                           ((2, 8, 4), 2804), ((2, 9, 6), 20906)])
def test_nccl_built_is_horovods_version_code(monkeypatch, version, code):
    # nccl.h: NCCL_VERSION(X,Y,Z) = X*1000+Y*100+Z up to 2.8, X*10000+Y*100+Z from 2.9 on.
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: version)
    assert hvd.nccl_built() == code


def test_nccl_built_without_nccl_or_version(monkeypatch):
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    assert hvd.nccl_built() == 0
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)

    def broken():
        raise RuntimeError("no NCCL library")

    monkeypatch.setattr(torch.cuda.nccl, "version", broken)
    assert hvd.nccl_built() == 1  # built with NCCL, version unknown: still truthy, as Horovod's code


def test_runtime_queries_before_init():
    assert hvd.mpi_enabled() is False and hvd.gloo_enabled() is False
    with pytest.raises(NotInitializedError, match=r"mpi_threads_supported\(\) was called before"):
        hvd.mpi_threads_supported()


# ------------------------------------------------------------------------------------------- init(comm=)

@pytest.fixture
def world_of_four(monkeypatch):
    """Pretend the launcher started 4 ranks and this is rank 1 (no process group is created)."""
    monkeypatch.setattr(_env, "detect_world", lambda environ=None, quiet=False: _env.WorldInfo(
        1, 4, 1, 4, "env://", "127.0.0.1", 29500, "torchrun"))


class _Comm:
    """The two methods of an mpi4py communicator that init(comm=) looks at."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def Get_rank(self) -> int:  # noqa: N802 (mpi4py's spelling)
        return self._rank

    def Get_size(self) -> int:  # noqa: N802
        return self._size


@pytest.mark.parametrize("comm", [None, [], [0, 1, 2, 3], range(4), _Comm(1, 4)])
def test_comm_covering_the_world_is_accepted(world_of_four, comm):
    _api._check_comm(comm)  # the check init() runs first; a real init would rendezvous with 3 peers


@pytest.mark.parametrize("comm, needle", [
    ([0, 1], "init(comm=[0, 1]) asks for a communicator over some ranks"),
    ([3, 2, 1, 0], "or in another order"),
    (_Comm(0, 2), "MPI communicator of size 2"),
    (_Comm(0, 4), "this process is its rank 0"),
])
def test_comm_narrower_than_the_world_is_refused_before_any_rendezvous(world_of_four, comm, needle):
    with pytest.raises(ValueError) as info:
        hvd.init(comm=comm)
    msg = str(info.value)
    assert needle in msg and "HINT" in msg and "process_sets" in msg
    assert not hvd.is_initialized() and not dist.is_initialized()


def test_comm_of_the_wrong_type_is_a_type_error(world_of_four):
    with pytest.raises(TypeError, match="backend='gloo'"):
        hvd.init("gloo")  # the core init's first argument is the backend; Horovod's is comm
    with pytest.raises(TypeError, match="list of ranks or an mpi4py communicator"):
        hvd.init(comm=3.5)
    with pytest.raises(ValueError, match="'dynamic'"):
        hvd.init(process_sets="all")
    assert not dist.is_initialized()


# ------------------------------------------------------------------------------------------- timeline

def test_start_timeline_has_horovods_signature(tmp_path):
    params = inspect.signature(hvd.start_timeline).parameters
    assert list(params)[:2] == ["file_path", "mark_cycles"] and params["mark_cycles"].default is False
    tl = hvd.start_timeline(str(tmp_path / "trace.json"), mark_cycles=True)
    try:
        assert tl.path == str(tmp_path / "trace.rank0.json")
    finally:
        path = hvd.stop_timeline()
    assert json.loads(open(path).read())["traceEvents"] is not None
    hvd.start_timeline(file_path=str(tmp_path / "kw.json"))  # Horovod's keyword works too
    assert hvd.stop_timeline().endswith("kw.rank0.json")


# ------------------------------------------------------------------------------------------- plain python

_PLAIN_SCRIPT = textwrap.dedent("""
    import json, torch, shoal, shoal.torch as hvd
    shoal.init()
    out = {"size": shoal.size(), "rank": shoal.rank(), "local": [hvd.local_rank(), hvd.local_size()],
           "cross": [hvd.cross_rank(), hvd.cross_size()], "homogeneous": hvd.is_homogeneous(),
           "gloo": hvd.gloo_enabled(), "mpi": hvd.mpi_enabled(),
           "sum": hvd.allreduce(torch.tensor([2.0, 3.0]), op=hvd.Sum).tolist()}
    hvd.init(comm=[0], process_sets="dynamic")   # a second init is a no-op; comm [0] is the world
    try:
        hvd.init(process_sets=[[0]])
    except ValueError as exc:
        out["duplicate"] = str(exc)
    hvd.shutdown()
    out["after"] = hvd.is_initialized()
    print("RESULT " + json.dumps(out))
""")


def test_plain_python_is_a_world_of_one(tmp_path):
    # A user's `python train.py`: no launcher variable at all (env -i, then only what Python needs).
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", _PLAIN_SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert (out["size"], out["rank"], out["local"], out["cross"]) == (1, 0, [0, 1], [0, 1])
    on_gpu = torch.cuda.is_available() and dist.is_nccl_available()   # then init picks nccl
    assert out["homogeneous"] and out["gloo"] is not on_gpu and not out["mpi"]
    assert out["sum"] == [2.0, 3.0] and out["after"] is False
    # The global set already holds rank 0: Horovod refuses the duplicate too.
    assert "entry 0 [0]" in out["duplicate"] and "HINT" in out["duplicate"]


def test_sync_batch_norm_without_init_is_batch_norm():
    """Before init (a world of one) SyncBatchNorm is BatchNorm: bitwise the same output and statistics."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    ref = torch.nn.BatchNorm2d(3)
    sbn = hvd.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(ref))[0]
    ref = torch.nn.BatchNorm2d(3)
    assert isinstance(sbn, hvd.SyncBatchNorm)
    assert torch.equal(sbn(x), ref(x))
    assert torch.equal(sbn.running_var, ref.running_var) and int(sbn.num_batches_tracked) == 1
    sbn.eval(), ref.eval()
    assert torch.equal(sbn(x), ref(x))


def test_horovod_exception_names_catch_shoals_failures():
    """Horovod users catch HorovodInternalError around collectives (elastic loops): Shoal's failures of a
    peer are its subclasses; a mismatch of arguments is not (a bug to fix, not a failure to recover)."""
    assert issubclass(hvd.RankFailureError, hvd.HorovodInternalError)
    assert issubclass(hvd.StallError, hvd.HorovodInternalError)
    assert not issubclass(hvd.MismatchError, hvd.HorovodInternalError)
    assert issubclass(hvd.HorovodInternalError, RuntimeError)
    exc = hvd.HostsUpdatedInterrupt(skip_sync=True)
    assert exc.skip_sync is True and isinstance(exc, RuntimeError) and "HINT" in str(exc)


def test_compressors_have_horovods_interface():
    """Horovod's test_compression_fp16, and the engine names behind the same objects."""
    for dtype in (torch.float32, torch.float64):
        t = torch.ones(5, 5, dtype=dtype)
        wire, ctx = hvd.Compression.fp16.compress(t)
        assert wire.dtype == torch.float16
        back = hvd.Compression.fp16.decompress(wire, ctx)
        assert back.dtype == dtype and torch.equal(back, t)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        t = torch.ones(3, dtype=dtype)
        wire, ctx = hvd.Compression.fp16.compress(t)
        assert wire.dtype == dtype and hvd.Compression.fp16.decompress(wire, ctx).dtype == dtype
    t = torch.ones(2)
    assert hvd.Compression.none.compress(t) == (t, None) and hvd.Compression.none.decompress(t, None) is t
    assert issubclass(hvd.Compression.fp16, hvd.Compressor) and hvd.Compression.fp16 is hvd.FP16Compressor
    assert hvd.Compression.mixed_fp16.name == "mixed_fp16"  # the engine's other names are still there
    from shoal.torch.compression import engine_compression

    assert engine_compression(hvd.Compression.fp16) == "fp16" and engine_compression(hvd.Compression.none) == "none"


def test_a_compressor_of_ones_own_is_refused_by_the_gradient_engine_with_a_hint():
    class Mine(hvd.Compressor):
        @staticmethod
        def compress(tensor):
            return tensor, None

        @staticmethod
        def decompress(tensor, ctx):
            return tensor

    from shoal.torch.compression import engine_compression

    with pytest.raises(ValueError, match="per-tensor compressor") as info:
        engine_compression(Mine)
    assert "hvd.allreduce(..., compression=...)" in str(info.value)
