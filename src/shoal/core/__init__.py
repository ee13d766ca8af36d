"""Shoal's engine: runtime and topology, collectives, gradient reduction.

Imports torch and torch.distributed only; never torch.nn/optim, keras, or any shoal frontend.
Frontends (``shoal.torch``, ``shoal.keras``) adapt this package; they never re-implement it.
"""

__all__: list[str] = []
