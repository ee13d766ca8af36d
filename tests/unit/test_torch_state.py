"""hvd.elastic.TorchState's commit and restore in one process: restore brings back exactly the model, the
optimizer's state and the plain fields of the last commit, and a later commit copies into the earlier
commit's tensors instead of allocating new ones."""

from __future__ import annotations

import torch

from shoal.torch.elastic import TorchState


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
    before = state._saved_model["weight"].data_ptr()
    _train(model, opt, 1)
    state.save()
    assert state._saved_model["weight"].data_ptr() == before
    assert torch.equal(state._saved_model["weight"], model.weight.detach())
    assert state._saved_model["weight"].data_ptr() != model.weight.data_ptr()
