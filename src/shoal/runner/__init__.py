"""The ``shoal`` command line: ``shoal run`` (launcher) and ``shoal doctor`` (environment report)."""

__all__: list[str] = []
