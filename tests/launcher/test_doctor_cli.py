"""``shoal doctor`` run for real, as a user runs it: a subprocess with a deadline.

Timing: the acceptance bar is "under 5 s on this machine". Most of that is ``import torch``, whose
wall time swings with the load of a shared 2-core machine (2.4 s idle, 10+ s while other jobs run).
So the wall time is checked when the machine is not overloaded, and the doctor's own work (its
run time minus torch's import, which the JSON report gives) is checked always.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Optional

import pytest

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                  "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def _run_doctor(*args: str, env_extra: dict[str, str] | None = None,
                timeout_s: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``shoal doctor ARGS``; return (result, wall seconds)."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith("SHOAL_")}
    env.update(env_extra or {})
    env["COLUMNS"] = "100"
    start = time.perf_counter()
    # A new session, killed as a group on timeout: subprocess.run(timeout=) alone leaves children.
    proc = subprocess.Popen([sys.executable, "-m", "shoal.runner.cli", "doctor", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"shoal doctor {' '.join(args)} did not finish in {timeout_s} s:\n{out}\n{err}")
    wall_s = time.perf_counter() - start
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), wall_s


def _check_time(wall_s: float, report: Optional[dict[str, Any]] = None) -> None:
    load = os.getloadavg()[0]
    own = "" if report is None else \
        f", own work {report['elapsed_s'] - report['torch_import_s']:.2f} s"
    print(f"shoal doctor: {wall_s:.2f} s wall{own}, load {load:.1f}")
    if report is not None:
        assert report["elapsed_s"] - report["torch_import_s"] < 2.0, report
    if load <= (os.cpu_count() or 1):
        assert wall_s < 5.0, f"shoal doctor took {wall_s:.1f} s on a machine that is not overloaded"


@pytest.mark.timeout(180)
def test_doctor_json_parses_and_names_this_machines_backends():
    import torch.distributed as dist

    # A two-host world whose rendezvous is the 'any' address: the report must say so.
    result, wall_s = _run_doctor("--json", env_extra={
        "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "0.0.0.0", "MASTER_PORT": "29500"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["backends"]["gloo"] is True
    assert report["backends"]["nccl"] == dist.is_nccl_available()
    assert report["backends"]["mpi"] == dist.is_mpi_available()
    assert report["python"]["version"] and report["torch"]["version"]
    assert any(i["name"] == "lo" and i["loopback"] for i in report["network"]["interfaces"])
    assert report["plan"]["multi_host"] is True
    assert any("MASTER_ADDR=0.0.0.0" in w for w in report["warnings"])
    assert [h["target"] for h in report["install"]] == ["torch", "tensorflow", "jax", "shoal"]
    _check_time(wall_s, report)


@pytest.mark.timeout(180)
def test_doctor_table_fits_one_screen():
    result, wall_s = _run_doctor()
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for heading in ("shoal doctor", "backends", "gloo", "Network", "RDMA",
                    "What shoal will use at init", "Install"):
        assert heading in text, heading
    assert len(text.splitlines()) <= 60, text
    _check_time(wall_s)


def test_cuda_build_and_driver_mismatches_are_explained():
    from shoal.runner.doctor import _cuda_warnings

    def torch_info(cuda, available=True):
        return {"version": "2.9.0", "cuda": cuda, "hip": None, "cuda_available": available,
                "device_count": 8}

    gpus = {"driver": "550.54.14", "devices": [{"index": "0", "name": "H100"}]}
    cpu_build, _ = _cuda_warnings(torch_info(None, False), gpus, {"nccl": False}, "CMD")
    assert len(cpu_build) == 1 and "CPU-only build" in cpu_build[0] and "HINT: CMD" in cpu_build[0]
    newer_minor, _ = _cuda_warnings(torch_info("12.8"), gpus, {"nccl": True}, "CMD")
    assert len(newer_minor) == 1 and "minor-version compatibility" in newer_minor[0]
    assert ">= 570.26" in newer_minor[0]
    newer_major, _ = _cuda_warnings(torch_info("13.0"), gpus, {"nccl": True}, "CMD")
    assert "will not initialise" in newer_major[0] and ">= 580.65.06" in newer_major[0]
    assert _cuda_warnings(torch_info("12.4"), gpus, {"nccl": True}, "CMD") == ([], [])
    hidden, _ = _cuda_warnings(torch_info("12.4", False), gpus, {"nccl": True}, "CMD")
    assert "torch.cuda.is_available() is False" in hidden[0]
    no_driver = {"driver": None, "devices": []}
    assert _cuda_warnings(torch_info("12.4", False), no_driver, {"nccl": True}, "CMD")[0] == []


def test_render_of_a_gpu_rdma_host_fits_one_screen():
    """This machine has no GPU and no RDMA: render such a host's report to check the layout."""
    from rich.console import Console

    from shoal.runner.doctor import collect, render

    report = collect()
    report["gpu"].update(driver="570.86.10", max_cuda="12.8", source="nvidia-smi",
                         devices=[{"index": str(i), "name": "NVIDIA H100 80GB HBM3",
                                   "memory_mib": "81559"} for i in range(8)])
    report["network"]["rdma"] = [
        {"port": f"mlx5_{i}:1", "state": "ACTIVE", "link_layer": "Ethernet",
         "rate": "400 Gb/sec (4X NDR)",
         "gids": [{"index": 3, "gid": "::ffff:10.0.0.1", "type": "RoCE v2", "netdev": f"ens{i}",
                   "ipv4": f"10.0.{i}.1"}]} for i in range(8)]
    console = Console(record=True, width=100, file=open(os.devnull, "w"))
    render(report, console)
    text = console.export_text()
    assert "mlx5_7:1" in text and "#3 10.0.7.1" in text and "570.86.10 (CUDA <= 12.8)" in text
    assert len(text.splitlines()) <= 70, text
