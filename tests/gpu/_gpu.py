"""What every tests/gpu module shares: the device the checks run on, and the skip that guards them.

The GPU checks of issue 20 (docs/gpu.md): two ranks share the one GPU through gloo with CUDA tensors
(NCCL refuses two ranks on one device: "Duplicate GPU detected"), and a world of one runs on NCCL. On a
machine without CUDA every CUDA check is skipped with the reason below. ``GPU_CHECK_DEVICE=cpu`` runs the
same code on CPU tensors instead, with gloo where NCCL would be: how ``scripts/gpu_check.sh``'s dry run
proves these tests themselves work before a GPU machine is at hand. (Not a ``SHOAL_*`` name: shoal.init()
warns about ``SHOAL_*`` variables it does not know, and the ranks inherit this environment.)
"""

from __future__ import annotations

import os

import pytest
import torch

__all__ = ["DEVICE", "NCCL", "needs_cuda", "cuda_and_cpu", "counted", "DEADLINE_S"]

_OVERRIDE = os.environ.get("GPU_CHECK_DEVICE", "")
if _OVERRIDE not in ("", "cpu"):
    raise pytest.UsageError(f"GPU_CHECK_DEVICE={_OVERRIDE!r}: the only value is 'cpu' (or unset)")

#: Where the CUDA checks put their tensors.
DEVICE = "cpu" if _OVERRIDE else "cuda"
#: The backend of the world-of-one check.
NCCL = "gloo" if _OVERRIDE else "nccl"
#: A run_ranks deadline for one check: a cold start of torch and a CUDA context per rank take a few
#: seconds; a hung collective fails at half of it (the process-group timeout) and names itself.
DEADLINE_S = 60.0

needs_cuda = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="no CUDA device (torch.cuda.is_available() is False): tests/gpu runs on a GPU machine through "
           "scripts/gpu_check.sh; GPU_CHECK_DEVICE=cpu runs this code on CPU tensors")


def cuda_and_cpu() -> list:
    """``device`` parameters of a check whose CPU half is not in tests/dist: CUDA (skipped without one) and
    the CPU, which runs everywhere, CI included, so that the check's own code cannot rot unseen."""
    return ["cpu"] if _OVERRIDE else [pytest.param("cuda", marks=needs_cuda), "cpu"]


def counted(device: str) -> bool:
    """Whether a NaN report counts values (CPU) or only names their kind (CUDA: shoal.core.checks)."""
    return device == "cpu"
