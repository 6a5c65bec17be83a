"""chmc: a deployment compiler for channel-merged experts (Channel Merging, arXiv 2412.15283)."""

from chmc.errors import ChmcError

__version__ = "0.1.0"
__all__ = ["ChmcError", "__version__"]
