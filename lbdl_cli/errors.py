"""The errors that the CLI turns into a one-line message and exit code 2.

Library code raises these for bad input: a message that names the bad value
and says how to fix it. Anything else that escapes is a bug or a runtime
failure (exit code 1).
"""


class LbdlError(Exception):
    """Bad input: the message names the problem and the fix."""


class ConfigError(LbdlError):
    """An invalid configuration value (model, training, sampling...)."""


class CheckpointError(LbdlError):
    """A model or adapter directory that is missing, incomplete or corrupt."""


class DataError(LbdlError):
    """A corpus, shard, tokenizer or task file that cannot be used."""


class OutputExistsError(CheckpointError, DataError):
    """An output directory that exists (without --force), or a file in its place."""


class RunFailed(Exception):
    """A run that started but could not finish (a diverged loss, an interrupt).

    Not bad input: the CLI prints the message as one line and exits 1 (130 for
    an interrupt), without the internal-error wording.
    """
