from olora.errors import ConfigError, DataError, OloraError

__all__ = ["ConfigError", "DataError", "OloraError"]
__version__ = "0.1.0"
