"""The engine's features on CUDA tensors, two ranks (four for hierarchy) sharing the GPU through gloo.

Each test runs tests/dist's rank functions with ``device="cuda"`` and checks their results with the same
reference checks as there (single-process references, tolerances written out in each tests/dist module);
a few related cases share one launch, since a launch with a CUDA context per rank is the expensive part.
The CPU halves of these checks are the tests/dist tests themselves, so nothing here runs without a GPU
(except under ``GPU_CHECK_DEVICE=cpu``, see ``_gpu.py``).

Tolerances that differ from the CPU's: ``DistributedOptimizer`` against the single-process reference,
``_CUDA_ATOL = 1e-5`` times the parameter scale (tests/dist: 1e-6). cuBLAS picks its kernels by shape (a
split over the reduction dimension for some), so the 8-row batch of each rank and the 16-row batch of the
reference sum in more different orders than on the CPU; 4 steps at lr <= 0.1 of a few-ulp gradient
difference stay far below 1e-5. Not yet measured on a GPU: the first device run records the margins.
"""

from __future__ import annotations

import pytest
import torch

from _gpu import DEADLINE_S, DEVICE, counted, needs_cuda
from shoal.testing import run_ranks

pytestmark = needs_cuda

_CUDA_ATOL = 1e-5 if DEVICE == "cuda" else 1e-6


# ------------------------------------------------------------------------------ DistributedOptimizer
def _optimizer_cases(device: str) -> list:
    from test_optimizer import _ENGINES, _rank_train  # noqa: PLC0415

    return [_rank_train(kind, _ENGINES[engine][0], device)
            for kind, engine in (("sgd", "default"), ("adam", "tiny_buckets_3_streams"), ("sgd", "groups_3"))]


def test_distributed_optimizer_equals_single_process_training():
    from test_optimizer import _ENGINES, _check_training  # noqa: PLC0415

    per_rank = run_ranks(_optimizer_cases, world_size=2, timeout_s=DEADLINE_S, args=(DEVICE,))
    for case, engine in enumerate(("default", "tiny_buckets_3_streams", "groups_3")):
        results = [r[case] for r in per_rank]
        assert all(r["device"].startswith(DEVICE) for r in results), results[0]["device"]
        _check_training(results, _ENGINES[engine][1], atol=_CUDA_ATOL)


# ------------------------------------------------------------------------------ fp16 / bf16 compression
def _compression_cases(device: str) -> dict:
    from test_compressed_allreduce import _OPT_STEPS, FLAT_SIZES, _compare_with_fp32, _optimizer_run  # noqa: PLC0415

    return {"flat": {c: _compare_with_fp32(c, "off", FLAT_SIZES, device=device) for c in ("fp16", "bf16")},
            "optimizer": {c: _optimizer_run(c, _OPT_STEPS, device) for c in ("none", "fp16", "bf16", "mixed_fp16")}}


def test_fp16_and_bf16_compression_within_16bit_rounding_of_fp32():
    from test_compressed_allreduce import _OPT_ENV, _check_compressed_training, _check_flat_16bit  # noqa: PLC0415

    per_rank = run_ranks(_compression_cases, world_size=2, timeout_s=DEADLINE_S, args=(DEVICE,), env=_OPT_ENV)
    for c in ("fp16", "bf16"):
        _check_flat_16bit([r["flat"][c] for r in per_rank])
    ref = [r["optimizer"]["none"] for r in per_rank]
    for c in ("fp16", "bf16", "mixed_fp16"):
        _check_compressed_training(c, [r["optimizer"][c] for r in per_rank], ref)


# ------------------------------------------------------------------------------ hierarchical, 2 x 2
def _hierarchical_cases(device: str) -> dict:
    from test_hierarchical import _versus_flat  # noqa: PLC0415

    return {"none": _versus_flat("none", True, device=device),
            **{c: _versus_flat(c, False, device=device) for c in ("mixed_fp16", "fp16", "mixed_bf16")}}


def test_hierarchical_with_emulated_nodes_equals_flat():
    from test_hierarchical import _check_compressed_versus_flat  # noqa: PLC0415

    # Four ranks on the one GPU as two "nodes" of two (SHOAL_LOCAL_SIZE): intra-node, cross-node, gather.
    per_rank = run_ranks(_hierarchical_cases, world_size=4, timeout_s=DEADLINE_S, args=(DEVICE,),
                         env={"SHOAL_LOCAL_SIZE": "2"})
    for r in per_rank:
        # Integer-valued float32 data: exact in any summation order, so hierarchical equals flat bitwise.
        assert not r["none"]["fell_back"] and r["none"]["exact"], r["none"]["diffs"]
        assert r["none"]["layout"] == [[0, 1], [2, 3]]
    for c in ("mixed_fp16", "fp16", "mixed_bf16"):
        _check_compressed_versus_flat(c, 4, [r[c] for r in per_rank])


# ------------------------------------------------------------------------------ SyncBatchNorm
_SBN_SIZES = ([6, 6], [3, 9])


def _sync_batch_norm_cases(device: str) -> dict:
    from test_sync_batch_norm import _rank_stats, _rank_training  # noqa: PLC0415

    return {"stats": [_rank_stats(sizes, 0.1, device) for sizes in _SBN_SIZES], "training": _rank_training(device)}


def test_sync_batch_norm_equals_batch_norm_on_the_whole_batch():
    from test_sync_batch_norm import _ATOL, _check_stats  # noqa: PLC0415

    per_rank = run_ranks(_sync_batch_norm_cases, world_size=2, timeout_s=DEADLINE_S, args=(DEVICE,))
    for i, sizes in enumerate(_SBN_SIZES):
        _check_stats(sizes, [r["stats"][i] for r in per_rank])
    for r in per_rank:
        assert r["training"] < _ATOL, r["training"]


# ------------------------------------------------------------------------------ PartialFC
def _partial_fc_cases(device: str) -> dict:
    from test_partial_fc import _rank_all_steps, _rank_distributed_optimizer_step  # noqa: PLC0415

    return {**_rank_all_steps(device), "optimizer": _rank_distributed_optimizer_step(device)}


def test_partial_fc_equals_single_process_softmax():
    from test_partial_fc import (_check_fp16_and_predict, _check_full_softmax, _check_optimizer_step,  # noqa: PLC0415
                                 _check_sampled_softmax)

    per_rank = run_ranks(_partial_fc_cases, world_size=2, timeout_s=DEADLINE_S, args=(DEVICE,))
    _check_full_softmax(2, [r["full"] for r in per_rank])
    _check_sampled_softmax(2, [r["sampled"] for r in per_rank])
    _check_fp16_and_predict(2, [r["fp16"] for r in per_rank])  # float16 logits on CUDA (bfloat16 on CPU)
    _check_optimizer_step(2, [r["optimizer"] for r in per_rank])


# ------------------------------------------------------------------------------ the NaN check
def _nan_check_case(policy: str, device: str):
    from test_nan_check import _raise_rank, _skip_rank, _warn_rank  # noqa: PLC0415

    if policy == "raise":
        return _raise_rank("nan", "mid.weight", device)
    if policy == "skip":
        return _skip_rank("inf", device)
    return _warn_rank(device)


@pytest.mark.parametrize("policy", ["raise", "skip", "warn"])
def test_nan_check_names_the_gradient_and_applies_each_policy(policy):
    from test_nan_check import _check_raised, _check_skipped, _check_warned  # noqa: PLC0415

    results = run_ranks(_nan_check_case, world_size=2, timeout_s=DEADLINE_S, args=(policy, DEVICE),
                        env={"SHOAL_NAN_CHECK": "warn"} if policy == "warn" else None)
    if policy == "raise":
        _check_raised("nan", results, counted=counted(DEVICE))
    elif policy == "skip":
        _check_skipped("inf", results, counted=counted(DEVICE))
    else:
        _check_warned(results)


# ------------------------------------------------------------------ the NaN verdict kept on the device
@pytest.mark.parametrize("policy,optim,when", [
    ("skip", "sgd_fused", 3), ("skip", "adam_fused", 3), ("skip", "sgd", 3), ("skip", "sgd_fused", 1),
    ("raise", "sgd_fused", 3), ("raise", "adam_fused", 3), ("raise", "sgd", 3), ("warn", "sgd_fused", 3)])
def test_nan_verdict_on_the_device_equals_the_host_verdict(policy, optim, when):
    """On CUDA the check's verdict stays on the device (no host sync per step): a fused optimizer skips on
    ``found_inf``, a non-fused one reads the verdict in step(); bitwise the same weights, optimizer state,
    skipped_steps and report as the verdict read on the host, and ``raise`` raises at the next step's start
    naming the step. On CPU tensors (GPU_CHECK_DEVICE=cpu) ``FiniteCheck.defer=True`` takes the same path."""
    from test_nan_check import _check_deferred, _deferred_rank  # noqa: PLC0415

    _check_deferred(policy, optim, when, run_ranks(_deferred_rank, world_size=2, timeout_s=DEADLINE_S,
                                                   args=(policy, optim, DEVICE, when)))


def test_nan_skipped_steps_read_on_one_rank_is_no_collective():
    from test_nan_check import _one_rank_reads_rank  # noqa: PLC0415

    results = run_ranks(_one_rank_reads_rank, world_size=2, timeout_s=DEADLINE_S, args=(DEVICE,))
    assert results[0]["seen"] == [0, 1, 1, 1]
    assert all(r["skipped"] == 1 for r in results)
