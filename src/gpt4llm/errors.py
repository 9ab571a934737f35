"""The one kind of error a user can act on, at the bottom of the package: everything may raise it, it imports nothing.

Every message raised as a `GPT4LLMError` names what is wrong (the setting's key, the file, record or field) and what to
do about it. Commands end with `Error: <message>` and exit status 1 when one escapes (`gpt4llm.app.cli.
reports_user_errors`, the one place that decides); anything else is a bug and keeps its traceback. Where a subclass also
derives from a built-in error (ValueError, FileNotFoundError, OSError), code and tests that catch the built-in one
keep working.
"""

from __future__ import annotations


class GPT4LLMError(Exception):
    """An error the user can act on; its message says what is wrong and what to do."""


class ConfigError(GPT4LLMError, ValueError):
    """A setting that is misspelled, out of range, or does not go with another one."""


class RecordError(GPT4LLMError, ValueError):
    """A data file, record or field that cannot be used as it is (the message names file, record and field)."""


class MissingFileError(GPT4LLMError, FileNotFoundError):
    """A file or directory that a setting names is not there."""


class DownloadError(GPT4LLMError):
    """A file that is missing and could not be downloaded; the message says where to put it by hand."""


class WriteError(GPT4LLMError, OSError):
    """An output that could not be written (full disk, no permission): the message names the path."""


class CheckpointError(GPT4LLMError, ValueError):
    """A checkpoint that does not fit the model it is resumed into, or that is not there."""


class LaunchError(GPT4LLMError):
    """A launch that cannot work on this hardware or launcher (bf16 on a V100, torchrun without a run id)."""


class ExportError(GPT4LLMError):
    """An export that would not hold the trained weights; nothing is left at the export path."""


class NonFiniteError(GPT4LLMError):
    """A loss or gradient that went NaN or Inf; the run stopped before applying it."""


class ServerStartError(GPT4LLMError):
    """A server that could not start (port in use, no such model directory)."""


class TooFewSucceeded(GPT4LLMError):
    """Fewer requests to a model endpoint came back than the run needs; what did come back is written."""


class StageFailed(GPT4LLMError):
    """A stage of `reproduce` failed; the message names the stage, its log and the log's last lines."""
