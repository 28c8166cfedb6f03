"""Every error loraformat raises on purpose, in one hierarchy, each with its exit code.

The CLI maps an error to ``error: <file>: <reason>`` on one line and exits with ``exit_code``; library callers
catch :class:`LoraformatError` (or a narrower class). Exit codes are documented in README.md:

====  =======================================================================
code  meaning
====  =======================================================================
0     success (validate: no findings at the failing severity)
1     the input is invalid: a malformed file, findings, a hash or base mismatch
2     usage or I/O error: bad arguments, missing input, existing output, disk full
3     hub: repository, revision or file not found
4     hub: authentication or permission refused (401/403, gated, private)
5     hub: network failure or offline mode
70    internal error: an unexpected exception (a bug; --debug shows the traceback); nothing partial is left
130   interrupted (Ctrl-C / SIGTERM); nothing partial is left behind
====  =======================================================================
"""

from __future__ import annotations

import os

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_HUB_NOT_FOUND = 3
EXIT_HUB_AUTH = 4
EXIT_HUB_NETWORK = 5
EXIT_INTERNAL = 70  # EX_SOFTWARE of sysexits.h
EXIT_INTERRUPTED = 130


class LoraformatError(Exception):
    """Base class. ``path`` names the file the error is about, when there is one."""

    exit_code: int = EXIT_USAGE

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = os.fspath(path) if path is not None else None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


# --- usage and I/O (exit 2) -------------------------------------------------------------------------------


class UsageError(LoraformatError):
    """Arguments that cannot work together or are out of range."""


class InputNotFoundError(LoraformatError):
    """An input path does not exist or is not of a kind loraformat reads."""


class OutputExistsError(LoraformatError):
    """The output exists and --overwrite/--force was not given."""


class WriteError(LoraformatError):
    """Writing an output failed (disk full, file size limit, permissions); nothing was left behind."""


class IncompleteSplitError(LoraformatError):
    """``merge --assemble``: a worker's share is missing or its done-file does not match the plan."""


class DistributedError(LoraformatError):
    """A distributed task kept failing (its worker died every time) or the cluster could not be reached."""


# --- invalid input (exit 1) -------------------------------------------------------------------------------


class InvalidInputError(LoraformatError):
    """Base for everything that is wrong with the *content* of an input."""

    exit_code = EXIT_INVALID


class HeaderError(InvalidInputError):
    """A safetensors file whose header is malformed (length, JSON, dtypes, offsets, metadata)."""


class UnsupportedVersionError(InvalidInputError):
    """A loraformat file of a newer major spec version than this reader implements."""


class SchemaError(InvalidInputError):
    """The loraformat metadata document does not validate against the JSON schema."""


class AdapterError(InvalidInputError):
    """An adapter whose tensors and metadata disagree (missing B, rank mismatch, bad config)."""


class PickleRefusedError(InvalidInputError):
    """A pickle checkpoint was given without --allow-pickle."""


class BaseMismatchError(InvalidInputError):
    """The adapter does not fit the base model (missing target, shape, structure hash)."""


class HashMismatchError(BaseMismatchError):
    """A base tensor's content digest differs from the one the adapter recorded."""


class UnsupportedDtypeError(InvalidInputError):
    """A tensor dtype loraformat cannot merge into (e.g. fp8 with scales)."""


class UnsupportedQuantizationError(InvalidInputError):
    """A quantized base or quantization config loraformat cannot merge into (GPTQ, AWQ, int4, unknown), or whose
    tensors contradict it (missing, mis-shaped, NaN or zero scales)."""


class EngineRefusedError(InvalidInputError):
    """An adapter an inference engine cannot represent (convert --for): the reason names the modules."""


class ComposeError(InvalidInputError):
    """Adapters that cannot be composed as asked (shape conflict, different bases without --force)."""


class VerificationError(InvalidInputError):
    """A downloaded or copied file whose size or content hash is not the one recorded."""


# --- hub (exit 3, 4, 5) -----------------------------------------------------------------------------------


class HubError(LoraformatError):
    """Base for hub failures."""


class HubNotFoundError(HubError):
    """Repository, revision or file not found."""

    exit_code = EXIT_HUB_NOT_FOUND


class HubAuthError(HubError):
    """401/403: a bad or missing token, a gated or private repository."""

    exit_code = EXIT_HUB_AUTH


class HubNetworkError(HubError):
    """The hub could not be reached, or offline mode forbids it."""

    exit_code = EXIT_HUB_NETWORK
