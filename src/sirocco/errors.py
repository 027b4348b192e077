"""Errors a user can act on. The CLI prints them as one line, without a traceback."""


class SiroccoError(Exception):
    """Base of every error that is the input's fault (a file, a config, a prompt), not a bug."""


class ConfigError(SiroccoError, ValueError):
    """A configuration is missing a field or has a value sirocco cannot use. The message names the field."""


class CheckpointError(SiroccoError):
    """A checkpoint is missing, truncated, corrupt, or its tensors do not match the config."""


class TokenizerError(SiroccoError):
    """No usable tokenizer was found, or one could not be read."""
