"""A second fault while the job recovers from the first: the recovery itself must be recoverable.

A worker is SIGKILLed mid-step; while the survivors are between that failure and the first step of the new
world (in the reset callbacks, which run after the new generation's groups exist and before its first
collective), a second worker is SIGKILLed. The remaining worker must fail its next collective, agree on a
third generation and go on, and the job must end with every sample trained once and equal weights on the
workers that finish, through the real ``shoal run --min-np``.
"""

from __future__ import annotations

import textwrap

import pytest

from elastic_job import SETUP  # tests/launcher is on sys.path (rootdir-relative imports)
from elastic_job import events as _events

pytestmark = pytest.mark.timeout(240)

_JOB = SETUP + textwrap.dedent('''
    sampler = hvd.elastic.ElasticSampler(list(range(96)), shuffle=True, seed=3)
    state = hvd.elastic.TorchState(model, opt, sampler=sampler, epoch=0, steps=0)

    def say(**kw):
        print("EVENT " + json.dumps({"wid": wid, "rank": hvd.rank(), "size": hvd.size(),
                                     "gen": _rt.generation(), "t": time.time(), **kw}), flush=True)

    def on_reset():
        say(what="reset")
        if wid == 2 and _rt.generation() == 1:  # the first recovery, before its first collective
            say(what="fault2")
            os.kill(os.getpid(), signal.SIGKILL)
    state.register_reset_callbacks([on_reset])

    @hvd.elastic.run
    def train(state):
        while state.epoch < 2:
            if state.sampler.epoch != state.epoch:
                state.sampler.set_epoch(state.epoch)
            order, b = list(iter(state.sampler)), 0
            while b * 4 < len(order):
                idx = order[b * 4:b * 4 + 4]
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(data[idx]), target[idx]).backward()
                if wid == 1 and state.steps == 5:
                    say(what="fault1")
                    os.kill(os.getpid(), signal.SIGKILL)
                opt.step()
                state.sampler.record_batch(b, 4)
                say(what="step", steps=state.steps, epoch=state.epoch, samples=idx)
                b += 1
                state.steps += 1
                if state.steps % 2 == 0:
                    state.commit()
            state.epoch += 1
        w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        say(what="done", steps=state.steps, weights=w.tolist())

    train(state)
''')


def test_a_second_worker_killed_during_the_recovery_is_recovered_from_too(run_cli, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(_JOB)
    # No replacements: the job shrinks 3 -> 2 -> 1 and must still finish (--min-np 1).
    r = run_cli(["run", "-np", "3", "--min-np", "1", "--max-np", "3", "--max-restarts", "0", "python",
                 str(script)], timeout_s=200, env={"SHOAL_TIMEOUT_S": "20", "SHOAL_ELASTIC_TIMEOUT_S": "3"})
    assert r.returncode == 0, r.describe()
    ev = _events(r.stdout)
    assert any(e["what"] == "fault1" for e in ev) and any(e["what"] == "fault2" for e in ev), r.describe()
    assert "recovered from 2 failure(s)" in r.stderr, r.stderr
    assert "worker 1 (killed by SIGKILL" in r.stderr and "worker 2 (killed by SIGKILL" in r.stderr, r.stderr
    done = [e for e in ev if e["what"] == "done"]
    assert [e["wid"] for e in done] == [0] and done[0]["size"] == 1, done
    fault2 = next(e for e in ev if e["what"] == "fault2")
    after = [e for e in ev if e["what"] == "step" and e["t"] > fault2["t"]]
    assert after and after[0]["gen"] >= 2, r.describe()  # a third world formed after the second fault
    # Both times every survivor had finished the same step, so the state was kept: the survivor's step
    # numbers go on without a repeat, and every sample of the second epoch reaches the model.
    steps0 = [e["steps"] for e in ev if e["what"] == "step" and e["wid"] == 0]
    assert steps0 == list(range(len(steps0))), steps0
    assert [e["gen"] for e in ev if e["what"] == "reset" and e["wid"] == 0] == [1, 2], r.describe()
    second = [i for e in ev if e["what"] == "step" and e["epoch"] == 1 for i in e["samples"]]
    assert set(second) == set(range(96)), sorted(set(range(96)) - set(second))
