"""``hvd.elastic.State`` hooks without a job: Horovod's ``State.reset()`` runs at every change of membership,
before the reset callbacks (subclasses rebuild there what depends on the world's size)."""

from __future__ import annotations

from shoal.core.elastic import ObjectState


def test_reset_hook_runs_before_the_reset_callbacks():
    calls: list[str] = []

    class Scaled(ObjectState):
        def reset(self) -> None:
            calls.append("reset")

    state = Scaled(epoch=0)
    state.register_reset_callbacks([lambda: calls.append("callback")])
    state.on_reset()
    assert calls == ["reset", "callback"]
