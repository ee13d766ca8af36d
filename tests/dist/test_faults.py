"""The fault table: each way ranks can diverge ends, within its deadline, in an error on every surviving rank
that names the rank and the tensor -- or, for the dynamic cases, in training equal to a single-process
reference.

Ranks catch their own error and return its text, so each test asserts on what every rank was told.

Tolerance of the reference comparisons (fp32): the distributed gradient is the average of the ranks' own
gradients (zeros where a rank did not produce one), the reference the gradient of the average of the
ranks' losses computed in one process: the same math in another summation order, a few ulps per element.
Over <= 10 SGD steps (lr 0.1, momentum 0.9) that stays far below ``_ATOL = 1e-5`` times the parameter scale
(measured: ~1e-7).
"""

from __future__ import annotations

import copy
import os
import signal
import time

import pytest
import torch

from shoal.testing import RanksFailed, run_ranks

_ATOL = 1e-5


def _setup():
    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)  # 2 ranks on 2 cores
    return hvd, hvd.rank(), hvd.size()


def _mlp(seed: int = 0, width: int = 16) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 4))


def _batch(step: int, rank: int, n: int = 4):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)


def _mse(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def _error(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "error": str(exc)}


# --------------------------------------------------------------------------------- rank 1 skips backward
def _rank_skip_backward(skip_step: int):
    hvd, rank, _ = _setup()
    model = _mlp()
    opt = hvd.DistributedOptimizer(_sgd(model.parameters()), named_parameters=model.named_parameters())
    step = 0
    try:
        for step in range(skip_step + 2):
            opt.zero_grad()
            if not (rank == 1 and step == skip_step):
                _mse(model, *_batch(step, rank)).backward()
            opt.step()
    except hvd.ShoalError as exc:
        return {**_error(exc), "step": step, "static": opt.engine.negotiation["static"]}
    return {"type": None, "step": step}


@pytest.mark.parametrize("skip_step", [2, 8], ids=["negotiating", "static"])
def test_rank_that_skips_backward_is_named_on_every_rank(skip_step):
    # Step 2: the per-step negotiation sees it. Step 8: the model went static after step 5 (no per-step
    # collective), rank 1's changed set rides in the last bucket's control slot and every rank negotiates.
    results = run_ranks(_rank_skip_backward, world_size=2, timeout_s=60, pg_timeout_s=20, args=(skip_step,))
    for r in results:
        assert r["type"] == "MismatchError", r
        assert r["step"] == skip_step
        assert "rank 1 produced no gradient" in r["error"] and "rank 0 produced 4 of 4" in r["error"]
        # Steps are numbered from 1 everywhere (the NaN report's convention): loop index k is step k + 1.
        assert f"in step {skip_step + 1} of DistributedOptimizer" in r["error"], r["error"]
        assert "'0.weight'" in r["error"] and "HINT" in r["error"]
    assert results[0]["error"] == results[1]["error"]


# --------------------------------------------------------------------------------- different parameter set
def _rank_subset():
    hvd, rank, _ = _setup()
    model = _mlp(width=16 if rank == 0 else 12)  # rank 1: another hidden width, and no last bias
    named = [(n, p) for n, p in model.named_parameters() if not (rank == 1 and n == "2.bias")]
    try:
        hvd.DistributedOptimizer(_sgd([p for _, p in named]), named_parameters=named)
    except hvd.MismatchError as exc:
        return _error(exc)
    return {"type": None}


def test_rank_with_a_different_parameter_subset_fails_at_registration():
    results = run_ranks(_rank_subset, world_size=2, timeout_s=60, pg_timeout_s=20)
    for r in results:
        assert r["type"] == "MismatchError", r
        text = r["error"]
        assert "'2.bias': rank 0: float32 [4]; rank 1: missing" in text, text
        assert "'0.weight': rank 0: float32 [16, 8]; rank 1: float32 [12, 8]" in text, text
        assert "HINT" in text
    assert results[0]["error"] == results[1]["error"]


# --------------------------------------------------------------------------------- user allreduce shapes
def _rank_user_shape():
    hvd, rank, _ = _setup()
    try:
        hvd.allreduce(torch.ones(2, 3) if rank == 0 else torch.ones(3, 3), name="metrics.loss")
    except hvd.MismatchError as exc:
        return _error(exc)
    return {"type": None}


def test_shape_mismatch_in_a_user_allreduce_names_both_sides():
    for r in run_ranks(_rank_user_shape, world_size=2, timeout_s=60, pg_timeout_s=20):
        assert r["type"] == "MismatchError"
        for needed in ("'metrics.loss'", "rank 0", "rank 1", "[2, 3]", "[3, 3]", "HINT"):
            assert needed in r["error"], (needed, r["error"])


# --------------------------------------------------------------------------------- SIGKILL mid-step
def _rank_killed(kill_step: int):
    hvd, rank, _ = _setup()
    model = _mlp()
    opt = hvd.DistributedOptimizer(_sgd(model.parameters()), named_parameters=model.named_parameters())
    if rank == 1:  # dies inside backward, after the first gradients went on the wire
        state = {"step": 0}
        model[0].weight.register_post_accumulate_grad_hook(
            lambda p: os.kill(os.getpid(), signal.SIGKILL) if state["step"] == kill_step else None)
    try:
        for step in range(kill_step + 2):
            if rank == 1:
                state["step"] = step
            opt.zero_grad()
            _mse(model, *_batch(step, rank)).backward()
            opt.step()
    except hvd.ShoalError as exc:
        return {**_error(exc), "step": step}
    return {"type": None}


def test_rank_killed_mid_step_is_named_dead_by_its_peer():
    start = time.monotonic()
    with pytest.raises(RanksFailed) as info:
        run_ranks(_rank_killed, world_size=2, timeout_s=60, pg_timeout_s=20, grace_s=15, args=(3,))
    assert time.monotonic() - start < 60
    dead, peer = info.value.by_rank(1), info.value.by_rank(0)
    assert dead.status == "died" and dead.exitcode == -signal.SIGKILL
    assert peer.status == "ok", peer.describe()
    r = peer.value
    assert r["type"] == "RankFailureError" and r["step"] == 3, r
    err = r["error"]
    assert "rank 1 (pid" in err and "died" in err, err
    # What it waited on, by name: the bucket and its first tensors, or the negotiation and its tensors.
    assert ("gradient allreduce of bucket 0 (2.bias, 2.weight" in err
            or ("negotiation bit-vector allreduce of DistributedOptimizer (step 4" in err and "'0.weight'" in err)), err


# --------------------------------------------------------------------------------- uneven batch counts
def _rank_uneven_without_join(variant: str):
    hvd, rank, _ = _setup()
    model = _mlp()
    opt = hvd.DistributedOptimizer(_sgd(model.parameters()), named_parameters=model.named_parameters())
    batches = 5 if rank == 0 else 3
    step = 0
    try:
        for step in range(batches):
            opt.zero_grad()
            _mse(model, *_batch(step, rank)).backward()
            opt.step()
    except hvd.ShoalError as exc:
        return {**_error(exc), "step": step}
    if variant == "shutdown":  # the usual end of a script: shut down and exit
        hvd.shutdown()
    else:                      # still alive, busy elsewhere (evaluation, saving) until the others give up
        time.sleep(8)
    return {"type": None}


@pytest.mark.parametrize("variant", ["shutdown", "lingering"])
def test_uneven_batch_counts_without_join_name_the_rank_that_left(variant):
    env = {"SHOAL_STALL_WARNING_S": "1", "SHOAL_STALL_TIMEOUT_S": "3"}
    start = time.monotonic()
    r0, r1 = run_ranks(_rank_uneven_without_join, world_size=2, timeout_s=60, pg_timeout_s=30, env=env,
                       args=(variant,))
    assert time.monotonic() - start < 60
    assert r1["type"] is None
    assert r0["step"] == 3, r0
    err = r0["error"]
    if variant == "shutdown":
        assert r0["type"] == "RankFailureError", r0
        assert "rank 1 (pid" in err and "died" in err and "join()" in err, err
        # What rank 1 did not send: the bucket and its first tensors, or the negotiation and its tensors.
        assert ("gradient allreduce of bucket 0 (2.bias, 2.weight" in err
                or ("negotiation bit-vector allreduce of DistributedOptimizer (step 4" in err
                    and "'0.weight'" in err)), err
    else:
        assert r0["type"] == "StallError", r0
        assert "in step 4 of DistributedOptimizer for bucket 0 ('2.bias', '2.weight'" in err, err  # 1-based
        assert "rank 1 has not reached synchronize() of this step" in err, err  # "(last arrived...)" if seen
        assert "rank 1 never reached a collective (busy or hung outside Shoal" in err, err
        assert "join()" in err


def _rank_uneven_with_join(batches: tuple[int, int]):
    hvd, rank, world = _setup()
    model = _mlp()
    ref = copy.deepcopy(model)
    opt = hvd.DistributedOptimizer(_sgd(model.parameters()), named_parameters=model.named_parameters())
    for step in range(batches[rank]):
        opt.zero_grad()
        _mse(model, *_batch(step, rank)).backward()
        opt.step()
    join = hvd.join

    last = join()
    hvd.broadcast_parameters(model.state_dict(), root_rank=last)
    # Reference: the ranks' losses averaged over the full world (a joined rank contributes zeros and
    # Average still divides by the world size, as in Horovod).
    ref_opt = _sgd(ref.parameters())
    for step in range(max(batches)):
        ref_opt.zero_grad()
        sum(_mse(ref, *_batch(step, r)) for r in range(world) if step < batches[r]).div(world).backward()
        ref_opt.step()
    return {"last": last, "diff": _max_diff(model, ref), "static": opt.engine.negotiation["static"],
            "negotiations": opt.engine.negotiation["negotiations"]}


@pytest.mark.parametrize("batches", [(10, 7), (3, 0)], ids=["joins-while-static", "joins-before-step-1"])
def test_uneven_batch_counts_with_join_complete_with_correct_results(batches):
    results = run_ranks(_rank_uneven_with_join, world_size=2, timeout_s=60, pg_timeout_s=20, args=(batches,))
    for r in results:
        assert r["last"] == 0  # rank 0 had more batches: it joined last
        assert r["diff"] <= _ATOL, r


def _rank_collective_while_joined(kind: str):
    hvd, rank, _ = _setup()
    model = _mlp()
    opt = hvd.DistributedOptimizer(_sgd(model.parameters()), named_parameters=model.named_parameters())
    join = hvd.join
    got = None
    try:
        for step in range(3 if rank == 0 else 2):
            if step == 2:  # rank 1 has joined: it answers this collective (shoal.core.join, constraint 2)
                t0 = time.monotonic()
                try:
                    if kind == "allreduce":
                        got = hvd.allreduce(torch.full((2,), 3.0), name="metrics.loss").tolist()
                    else:
                        hvd.allgather(torch.ones(1), name="metrics.all")
                except hvd.MismatchError as exc:
                    got = {**_error(exc), "culprits": list(exc.culprit_ranks), "s": time.monotonic() - t0}
            opt.zero_grad()
            _mse(model, *_batch(step, rank)).backward()
            opt.step()
        last = join()
    except hvd.ShoalError as exc:
        time.sleep(4)  # stay alive until the peer has failed too: a rank that exits is named dead
        return _error(exc)
    return {"type": None, "got": got, "last": last}


@pytest.mark.parametrize("kind", ["allreduce", "allgather"])
def test_user_collective_while_a_rank_is_joined_is_answered(kind):
    # Before, join() shadowed only the optimizer's steps and such a collective waited for the whole
    # timeout on both sides. Now the joined rank answers: zeros to an allreduce (Average divides by both
    # ranks, as in Horovod), an immediate error naming it for an allgather; training then goes on.
    start = time.monotonic()
    r0, r1 = run_ranks(_rank_collective_while_joined, world_size=2, timeout_s=60, pg_timeout_s=20,
                       env={"SHOAL_STALL_WARNING_S": "1"}, args=(kind,))
    assert time.monotonic() - start < 20
    assert r0["type"] is None and r1["type"] is None, (r0, r1)
    assert r0["last"] == r1["last"] == 0
    if kind == "allreduce":
        assert r0["got"] == [1.5, 1.5], r0
    else:
        got = r0["got"]
        assert got["type"] == "MismatchError" and got["culprits"] == [1] and got["s"] < 5, got
        assert "rank 1 called join()" in got["error"] and "allgather of 'metrics.all'" in got["error"], got


# --------------------------------------------------------------------------------- unused on one rank
class _TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Linear(8, 16)
        self.a = torch.nn.Linear(16, 4)
        self.b = torch.nn.Linear(16, 4)

    def forward(self, x, use_b: bool):
        h = torch.tanh(self.trunk(x))
        return self.a(h) + (self.b(h) if use_b else 0)


def _rank_unused_on_one_rank(steps: int):
    hvd, rank, world = _setup()
    model = _TwoHeads()
    ref = copy.deepcopy(model)
    opt = hvd.DistributedOptimizer(_sgd(model.parameters()), named_parameters=model.named_parameters())
    ref_opt = _sgd(ref.parameters())

    def loss(m, step, r):
        x, y = _batch(step, r)
        return torch.nn.functional.mse_loss(m(x, use_b=(r == 0)), y)  # head b: rank 0 only

    for step in range(steps):
        opt.zero_grad()
        loss(model, step, rank).backward()
        opt.step()
        ref_opt.zero_grad()
        sum(loss(ref, step, r) for r in range(world)).div(world).backward()  # b's grad from rank 1: zero
        ref_opt.step()
    return {"diff": _max_diff(model, ref), "static": opt.engine.negotiation["static"],
            "b_moved": not torch.equal(model.b.weight, _TwoHeads().b.weight)}


def test_parameters_unused_on_one_rank_train_like_the_reference_with_zero_grads():
    for r in run_ranks(_rank_unused_on_one_rank, world_size=2, timeout_s=60, args=(9,)):
        assert r["diff"] <= _ATOL, r
        assert r["static"] and r["b_moved"]


# --------------------------------------------------------------------------------- a gradient replaced
def _rank_replaced_grad():
    hvd, rank, _ = _setup()
    model = _mlp()
    opt = hvd.DistributedOptimizer(_sgd(model.parameters()), named_parameters=model.named_parameters())
    step = 0
    try:
        for step in range(4):
            opt.zero_grad()
            _mse(model, *_batch(step, rank)).backward()
            if rank == 1 and step == 2:  # after backward handed it over, before step(): not reducible
                model[0].weight.grad = model[0].weight.grad + 1000.0
            opt.step()
    except hvd.ShoalError as exc:
        return {**_error(exc), "step": step, "culprits": list(exc.culprit_ranks)}
    return {"type": None, "weight": model[0].weight.detach().clone()}


def test_a_gradient_replaced_between_backward_and_step_fails_every_rank_naming_it():
    # Before: rank 1's new gradient was copied into its bucket after the bucket had left, the ranks drifted
    # apart silently (a +1000 edit left them 50 apart).
    results = run_ranks(_rank_replaced_grad, world_size=2, timeout_s=60, pg_timeout_s=20)
    for r in results:
        assert r["type"] == "MismatchError" and r["step"] == 2, r
        assert "'0.weight' was replaced on rank 1" in r["error"], r["error"]
        assert "optimizer.synchronize()" in r["error"] and "skip_synchronize" in r["error"], r["error"]
    assert results[0]["error"] == results[1]["error"]


# --------------------------------------------------------------------------------- optimizer classes differ
def _rank_other_optimizer_class():
    hvd, rank, _ = _setup()
    model = _mlp()
    inner = torch.optim.Adam(model.parameters(), lr=0.01) if rank == 0 else _sgd(model.parameters())
    opt = hvd.DistributedOptimizer(inner, named_parameters=model.named_parameters())
    try:
        hvd.broadcast_optimizer_state(opt, root_rank=0)
    except hvd.MismatchError as exc:
        return _error(exc)
    return {"type": None}


def test_broadcast_optimizer_state_between_different_optimizer_classes_is_a_mismatch():
    # Before: accepted silently; rank 1 (SGD) loaded Adam's state and failed alone a step later
    # (KeyError: 'momentum').
    results = run_ranks(_rank_other_optimizer_class, world_size=2, timeout_s=60, pg_timeout_s=20)
    for r in results:
        assert r["type"] == "MismatchError", r
        assert "optimizer class: rank 0: torch.optim.adam.Adam; rank 1: torch.optim.sgd.SGD" in r["error"], r
    assert results[0]["error"] == results[1]["error"]


# --------------------------------------------------------------------------------- no pickle inside
def _rank_no_unpickling():
    """Every internal exchange of a run (init's host list, the ready order, the negotiation's details of a
    divergence, the NaN report, a registration mismatch, broadcast_optimizer_state) with pickle's loaders
    made to fail: none of them may unpickle what a peer sent."""
    import os as _os
    import pickle

    import torch.distributed.distributed_c10d as c10d

    def refuse(*_a, **_k):
        raise AssertionError("shoal unpickled data from another rank")

    class Refusing(pickle.Unpickler):
        def load(self):
            refuse()

    pickle.loads = refuse
    pickle.Unpickler = Refusing
    c10d._unpickler = Refusing
    import shoal.torch as hvd  # noqa: PLC0415

    hvd.init()  # the host/pid exchange
    torch.set_num_threads(1)
    rank = hvd.rank()
    model = _mlp()
    opt = hvd.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters(), nan_check="warn")
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    for step in range(3):  # step 1 agrees on the ready order; step 2 carries a NaN on rank 1
        opt.zero_grad()
        x, y = _batch(step, rank)
        if step == 1 and rank == 1:
            x = x * float("nan")
        _mse(model, x, y).backward()
        opt.step()
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    seen = []
    try:  # a registration mismatch: the lists travel
        hvd.DistributedOptimizer(_sgd(_mlp(width=8 if rank else 16).parameters()))
    except hvd.MismatchError as exc:
        seen.append("registration")
    try:  # a divergence: the details travel
        opt.zero_grad()
        if rank == 0:
            _mse(model, *_batch(9, rank)).backward()
        opt.step()
    except hvd.MismatchError:
        seen.append("divergence")
    return {"seen": seen, "nan_reported": opt.nan_report is not None, "pid": _os.getpid()}


def test_internal_exchanges_never_unpickle_peer_data():
    results = run_ranks(_rank_no_unpickling, world_size=2, timeout_s=60, pg_timeout_s=20, init=False)
    for r in results:
        assert r["seen"] == ["registration", "divergence"], r


def _rank_unpickling_control():
    """The control of the test above: the same refusal does fire when a peer's object is unpickled."""
    import pickle

    import torch.distributed.distributed_c10d as c10d

    class Refusing(pickle.Unpickler):
        def load(self):
            raise AssertionError("unpickled")

    def refuse(*_a, **_k):
        raise AssertionError("unpickled")

    c10d._unpickler = Refusing
    pickle.loads = refuse
    import shoal.torch as hvd  # noqa: PLC0415

    hvd.init()
    try:
        hvd.allgather_object({"x": 1})  # trusted=True: Horovod's pickle semantics
    except AssertionError:
        return "refused"
    except hvd.ShoalError as exc:
        return "refused" if "unpickled" in str(exc) else str(exc)
    return "not refused"


def test_the_unpickling_refusal_is_live():
    assert run_ranks(_rank_unpickling_control, world_size=2, timeout_s=60, pg_timeout_s=20,
                     init=False) == ["refused", "refused"]
