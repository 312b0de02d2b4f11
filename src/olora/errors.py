"""Error types. An OloraError carries a message meant for the user: what is wrong and how to fix it."""


class OloraError(Exception):
    """A user-facing error: bad parameters, bad data, missing assets, unreachable services."""


class ConfigError(OloraError, ValueError):
    """A parameter in params.yaml (or an override) is unknown, of the wrong type or out of range."""


class DataError(OloraError, ValueError):
    """The fine-tuning data is missing, malformed, or empty after filtering."""


class NonFiniteLossError(OloraError, RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""
