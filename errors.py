"""One exception type for everything a user can get wrong.

The CLI prints a ChmcError as one line and exits non-zero; anything else is a bug and keeps its
traceback. Messages name the file, tensor, field or expert, the offending value, and the next step.
"""


class ChmcError(Exception):
    """A user-facing error: bad input, an unsupported model, a missing optional dependency."""


class NotSupportedError(ChmcError):
    """The model or option is valid but chmc does not handle it (yet)."""


class MissingDependencyError(ChmcError):
    """An optional stack (onnxruntime, tensorrt, tritonserver...) is not installed."""
