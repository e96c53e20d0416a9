"""qkv's own exception types. Each is a ValueError so callers that catch bad input keep working."""


class QkvError(ValueError):
    """Base class for qkv errors that describe bad input and how to fix it."""


class CheckpointError(QkvError):
    """A model file or directory is missing, malformed, or does not match the model it should hold."""


class TokenizerError(QkvError):
    """A vocabulary, merges, rank or tokenizer file is missing or malformed, or an id is out of range."""


class PullError(QkvError):
    """A known model package could not be fetched or unpacked."""


class UsageError(QkvError):
    """A command-line argument or library call asks for something that cannot be done as given."""


class GenerationOptionError(QkvError):
    """A decoding option is unknown, out of range, or not supported by the decoding path chosen."""


class ConfigError(QkvError):
    """A model configuration field is missing, out of range, or inconsistent with another."""
