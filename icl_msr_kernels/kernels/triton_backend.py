"""Backend "triton" (issue 4)."""

from ..backends import BackendUnavailable


def load():
    raise BackendUnavailable("the Triton kernels are not implemented yet (issue 4)")
