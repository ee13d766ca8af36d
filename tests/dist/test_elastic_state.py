"""``hvd.elastic.TorchState`` on 2 ranks, Horovod's contract: every field that holds a model, an optimizer or
an ElasticSampler (not only ``model`` and ``optimizer``: a GAN's two of each) is copied from rank 0 by
``sync()``, saved by ``commit()`` and brought back by ``restore()``; assigning another object to such a field
makes its current state the committed one (before: a second model was a plain field, and ``sync()`` failed
on it with "not plain data").

References: rank 0's tensors, compared bitwise after the broadcast (exact copies); the committed tensors,
compared bitwise after ``restore()``.
"""

from __future__ import annotations

import torch

from shoal.testing import run_ranks


def _rank_state_of_two_models() -> dict:
    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    me = hvd.rank()
    torch.manual_seed(10 + me)  # every rank starts from its own weights: sync must copy rank 0's
    gen, disc = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1, momentum=0.9)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.2, momentum=0.9)
    x = torch.randn(4, 3)
    for opt in (opt_g, opt_d):  # momentum buffers, different on every rank
        opt.zero_grad()
        disc(gen(x)).pow(2).sum().backward()
        opt.step()
    sampler = hvd.elastic.ElasticSampler(list(range(20)), seed=1)
    for b in range(me + 1):
        sampler.record_batch(b, 2)
    state = hvd.elastic.TorchState(gen, opt_g, discriminator=disc, opt_d=opt_d, sampler=sampler, epoch=me)
    state.sync()

    def root_equal(t: torch.Tensor) -> bool:
        return bool(torch.equal(hvd.broadcast(t.detach().clone(), root_rank=0), t))

    out = {
        "synced": {
            "gen": root_equal(gen.weight), "disc": root_equal(disc.weight),
            "opt_d momentum": root_equal(opt_d.state[disc.weight]["momentum_buffer"]),
            "opt_g momentum": root_equal(opt_g.state[gen.weight]["momentum_buffer"]),
        },
        "epoch": state.epoch,
        "sampler": sampler.state_dict(),
        "sampler_len": len(sampler),
    }
    state.commit()
    committed = disc.weight.detach().clone()
    with torch.no_grad():
        disc.weight.add_(1.0)
    state.epoch = 7
    state.restore()
    out["restored"] = bool(torch.equal(disc.weight, committed)) and state.epoch == 0
    # Another object in a handled field: its own state is the committed one (a restore must fit it).
    wide = torch.nn.Linear(2, 5)
    state.discriminator = wide
    before = wide.weight.detach().clone()
    with torch.no_grad():
        wide.weight.mul_(2.0)
    state.restore()
    out["reassigned"] = bool(torch.equal(wide.weight, before)) and state.discriminator is wide
    return out


def test_torch_state_handles_every_model_optimizer_and_sampler_field():
    for r in run_ranks(_rank_state_of_two_models, world_size=2, timeout_s=60):
        assert r["synced"] == {k: True for k in r["synced"]}, r
        assert r["epoch"] == 0, r
        # Rank 0 recorded one batch of 2 on each of 2 ranks: 4 processed, 16 left, 8 per rank.
        assert r["sampler"] == {"epoch": 0, "processed_num": 4} and r["sampler_len"] == 8, r
        assert r["restored"] and r["reassigned"], r
