"""hvd.elastic.TorchState's commit and restore in one process: restore brings back exactly the model, the
optimizer's state and the plain fields of the last commit, and a later commit copies into the earlier
commit's tensors instead of allocating new ones."""

from __future__ import annotations

import torch

from shoal.torch.elastic import ElasticSampler, TorchState


def _train(model, opt, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()


def test_restore_returns_to_the_last_commit_bitwise():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    state = TorchState(model, opt, epoch=0, note=["a"])
    _train(model, opt, 2)  # Adam's state appears after the first commit: the next one must take it
    state.epoch, state.note = 1, ["b"]
    state.save()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    _train(model, opt, 3)
    state.epoch, state.note = 2, ["c"]
    state.note.append("d")
    state.restore()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, moments[k]) for k, v in opt.state_dict()["state"][0].items())
    assert (state.epoch, state.note) == (1, ["b"])
    # Restoring twice gives the same commit (restore must not hand out the saved tensors themselves).
    _train(model, opt, 1)
    state.restore()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_a_commit_reuses_the_previous_commits_tensors():
    model = torch.nn.Linear(4, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, 1)
    state = TorchState(model, opt)
    before = state._snapshots["model"]["weight"].data_ptr()
    _train(model, opt, 1)
    state.save()
    assert state._snapshots["model"]["weight"].data_ptr() == before
    assert torch.equal(state._snapshots["model"]["weight"], model.weight.detach())
    assert state._snapshots["model"]["weight"].data_ptr() != model.weight.data_ptr()


def test_a_reset_deals_what_is_left_of_the_epoch_without_a_sync():
    """A change of membership with only leavers skips sync(): on_reset itself must deal the rest of the
    epoch over the new world (here a world of one), or the old dealing would start over from its first
    batch and its samples be trained twice."""
    sampler = ElasticSampler(list(range(400)), shuffle=True, seed=3)
    sampler.reset(4, 1)  # the dealing of a world of 4, as rank 1
    state = TorchState(sampler=sampler, epoch=0)
    done = set()
    for batch in range(3):  # every rank of the 4 finished 3 batches of 10
        done.update(sampler.get_indices(batch, 10))
        sampler.record_batch(batch, 10)
    state.on_reset()
    left = list(sampler)
    assert len(left) == 400 - 4 * 3 * 10 and not done & set(left)


def test_restoring_twice_brings_the_optimizer_back_to_the_commit_both_times():
    # torch's Optimizer.load_state_dict keeps the tensors it is given: restore hands it a copy, or the steps
    # after the first restore would write into the commit (before: the second restore kept their moments).
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    _train(model, opt, 1)
    state = TorchState(model, opt)
    moments = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    for _ in range(2):
        _train(model, opt, 2)
        state.restore()
        assert all(torch.equal(v, moments[k]) for k, v in opt.state_dict()["state"][0].items())
    state.save()  # and a commit after a restore still copies (nothing of the live state is the commit)
    _train(model, opt, 1)
    state.restore()
    assert all(torch.equal(v, moments[k]) for k, v in opt.state_dict()["state"][0].items())
