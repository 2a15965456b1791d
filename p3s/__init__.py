"""``python -m p3s``: a two-line shim for :mod:`p3s_core.cli` (the code lives in ``p3s_core``)."""
