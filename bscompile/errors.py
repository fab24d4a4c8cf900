"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class BscompileError(Exception):
    """Base class: anything the user can fix (bad input, unsupported model, bad artifact)."""


class UnsupportedModelError(BscompileError):
    """The model uses an op, attribute or shape bscompile cannot compile."""


class ArtifactError(BscompileError):
    """A compiled artifact is missing, corrupted, truncated or for another target."""


class InputError(BscompileError):
    """Inputs given at run time do not match the compiled model."""
