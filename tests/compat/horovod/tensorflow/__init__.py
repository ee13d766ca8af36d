"""``horovod.tensorflow`` for Horovod's test files: everything ``shoal.tensorflow`` exports, plus the two private
helpers Horovod's tests import from it (``_executing_eagerly``, the ``util`` module). Nothing else is added or
patched, so a failure here is a failure of ``shoal.tensorflow``."""

from shoal.tensorflow import *  # noqa: F401,F403
from shoal.tensorflow import __all__ as _shoal_all

from . import util  # noqa: F401
from .util import _executing_eagerly  # noqa: F401

__all__ = list(_shoal_all)
