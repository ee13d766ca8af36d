"""What the elastic launcher tests share: the start of their torch job scripts and the reading of what the
jobs print.

A job script is ``SETUP`` followed by its own training loop: ``SETUP`` initialises Shoal, names the worker
(``wid``, the launcher's id) and builds the same tiny problem everywhere (96 samples of 8 features, a
linear model to 3 outputs, plain SGD through ``hvd.DistributedOptimizer``), so that workers' weights can be
compared bitwise at the end. Each event the job prints is one ``EVENT {json}`` line.
"""

from __future__ import annotations

import json
import re
import textwrap

__all__ = ["SETUP", "events", "done", "assert_same_weights"]

SETUP = textwrap.dedent('''
    import json, os, signal, socket, sys, time
    import torch
    import shoal.torch as hvd
    from shoal.core import elastic as _el, runtime as _rt

    hvd.init()
    torch.set_num_threads(1)
    wid = int(os.environ["SHOAL_ELASTIC_ID"])
    data = torch.randn(96, 8, generator=torch.Generator().manual_seed(0))
    target = data @ torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                   named_parameters=model.named_parameters())
''')


def events(out: str) -> list[dict]:
    """Every ``EVENT {json}`` line of ``out``, in order."""
    return [json.loads(m.group(1)) for m in re.finditer(r"EVENT (\{.*\})", out)]


def done(evs: list[dict]) -> list[dict]:
    """The workers' ``done`` events."""
    return [e for e in evs if e["what"] == "done"]


def assert_same_weights(finished: list[dict]) -> None:
    """Every finished worker ended with bitwise the same weights."""
    assert len({json.dumps(e["weights"]) for e in finished}) == 1, [e["weights"][:3] for e in finished]
