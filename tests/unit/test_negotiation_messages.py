"""The negotiation's error texts, from gathered details (pure functions, no process group): every branch
names the ranks and tensors, and ends with a HINT."""

from __future__ import annotations

from shoal.core.negotiation import _EMPTY, _divergence_message
from shoal.core.registration import _registration_message


def _detail(rank, step=3, digest=7, flags=0, names=("w", "b", "v"), count=4, registered=("w", "b", "v")):
    return {"rank": rank, "step": step, "digest": digest, "flags": flags, "count": count, "names": list(names),
            "missing": [], "registered": list(registered), "num_tensors": 4, "errors": []}


def test_different_steps_name_each_rank_and_what_it_produced():
    text = _divergence_message([_detail(0, step=3), _detail(1, step=4, count=0, names=())],
                               "DistributedOptimizer", 4)
    assert "ranks are at different steps of DistributedOptimizer" in text
    assert "rank 0: step 3, 4 of 4 gradients produced ('w', 'b', 'v')" in text
    assert "rank 1: step 4, no gradient produced" in text
    assert "HINT" in text


def test_different_optimizers_name_each_side_and_its_tensors():
    text = _divergence_message([_detail(0, digest=1, registered=("a.w", "a.b")),
                                _detail(1, digest=2, registered=("b.w", "b.b"))], "DistributedOptimizer", 4)
    assert "rank 0: a DistributedOptimizer of 4 tensors ('a.w', 'a.b') at step 3" in text
    assert "rank 1: a DistributedOptimizer of 4 tensors ('b.w', 'b.b') at step 3" in text
    assert "HINT" in text


def test_empty_rank_is_named_with_the_tensors_the_others_produced():
    text = _divergence_message([_detail(0), _detail(1, flags=_EMPTY, count=0, names=())], "Opt", 4)
    assert "rank 1 produced no gradient in step 3 of Opt, while rank 0 produced 4 of 4 (e.g. 'w', 'b', 'v')" in text


def test_registration_message_lists_settings_and_tensors():
    entries = [("w", (2, 3), "float32"), ("b", (3,), "float32")]
    text = _registration_message([0, 1], [(entries, {"nan_check": "raise", "negotiation": "auto"}),
                                          (entries[:1], {"nan_check": "off", "negotiation": "auto"})], "Opt")
    assert "nan_check: rank 0: raise; rank 1: off" in text
    assert "negotiation:" not in text  # equal on every rank: not listed
    assert "'b': rank 0: float32 [3]; rank 1: missing" in text
    assert "SHOAL_NAN_CHECK" in text and "build the same model on every rank" in text


def test_registration_message_settings_only():
    entries = [("w", (2, 3), "float32")]
    text = _registration_message([0, 1, 2], [(entries, {"nan_check": "skip"})] * 2 + [(entries, {"nan_check": "warn"})],
                                 "DDP comm hook")
    assert "nan_check: ranks 0-1: skip; rank 2: warn" in text
    assert "differ:" not in text and "build the same model" not in text
