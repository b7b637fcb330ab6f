"""Error types raised by snella-diffusion; every message names the file, key or flag at fault."""


class SnellaError(Exception):
    """Base class of every error this package raises on purpose."""


class SnellaConfigError(SnellaError, ValueError):
    """A configuration field (or the command-line flag that set it) holds an invalid value."""


class SnellaFormatError(SnellaError):
    """A file is not a valid SNELLA adapter for the model it is loaded into."""


class UnfuseError(SnellaError):
    """The base weights cannot be restored: they were fused with ``keep_original=False``."""
