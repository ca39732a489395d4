"""Named errors. The CLI prints their message on one line and exits non-zero; a traceback means a bug."""


class MetalabError(Exception):
    """Base class of every error metalab raises on bad input or a bad environment."""


class ConfigError(MetalabError):
    """A config key is unknown, has the wrong type or an impossible value. ``key`` names it (dotted path)."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"config key '{key}': {message}" if key else message)

    def within(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix.`` put in front of the key (used while descending nested configs)."""
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


class DataError(MetalabError):
    """A data set is missing, corrupt, or fails its checksum."""


class ChecksumError(DataError):
    """A file's md5 differs from the expected one."""


class UnsafeArchiveError(DataError):
    """An archive member would be written outside the target folder (absolute path or '..')."""


class CheckpointError(MetalabError):
    """A checkpoint or run directory is missing or unreadable."""


class NonFiniteLossError(MetalabError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""
