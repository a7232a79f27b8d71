"""Exceptions raised by the reconstruction library."""


class ReconError(Exception):
    """A scan or its parameters cannot be reconstructed (the message says why)."""


class UnknownPipelineError(ReconError):
    """A pipeline name that is not registered."""
