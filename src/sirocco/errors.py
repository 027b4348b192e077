"""Errors a user can act on. The CLI prints them as one line, without a traceback, and exits with the error's
``exit_status``."""


class SiroccoError(Exception):
    """Base of every error that is the input's fault (a file, a config, a prompt), not a bug."""

    exit_status = 1


class ConfigError(SiroccoError, ValueError):
    """A configuration is missing a field or has a value sirocco cannot use. The message names the field."""


class CheckpointError(SiroccoError):
    """A checkpoint is missing, truncated, corrupt, or its tensors do not match the config."""


class ModelFileError(CheckpointError):
    """A model file that is not what its format says: truncated, corrupt or crafted (a GGUF file from anywhere).
    The message names the file and what is wrong; the CLI exits 2, as for a bad option value, since the same
    file will fail the same way again."""

    exit_status = 2


class TokenizerError(SiroccoError):
    """No usable tokenizer was found, or one could not be read."""
