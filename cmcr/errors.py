"""One exception hierarchy for the whole tool.

Every message names the file / row / field involved, what was expected, what was found and
how to fix it. The CLI turns any :class:`CmcrError` into a one-paragraph message instead of a
traceback: exit code 1 (a runtime error), or 2 for a :class:`ConfigError` (a usage error: an
invalid option value or configuration), like click's own usage errors (docs/cli.md).
"""

from __future__ import annotations


class CmcrError(Exception):
    """Base class of every error cmcr raises on purpose."""


class StoreError(CmcrError):
    """An embedding store is missing, unreadable or inconsistent."""


class StoreFormatError(StoreError):
    """A store's files do not follow the store format (manifest, parts, columns, dims, dtypes)."""


class StoreValidationError(StoreError):
    """Rows of a store (or rows about to be appended) break a data rule: wrong length, NaN/Inf,
    un-normalised rows in a cosine store, duplicate keys."""


class StoreMismatchError(StoreError):
    """A store from another modality, encoder, preprocessing or dimension was passed where a
    specific one is expected (also raised when two stores meant to be paired do not match)."""


class StoreIndexError(StoreError):
    """A FAISS index is missing, stale (built for other store contents) or was asked an invalid query."""


class EncoderError(CmcrError):
    """An encoder cannot be built or loaded (unknown architecture, missing checkpoint or tokenizer files)."""


class InputDataError(CmcrError):
    """A corpus, sample or input file cannot be read or is invalid."""


class ConnectorError(CmcrError):
    """A connector file is invalid, or a connector side was applied to embeddings it does not accept."""


class TrainingError(CmcrError):
    """Training cannot continue (non-finite loss, bad configuration, missing stores)."""


class ConfigError(CmcrError):
    """A configuration value or file is invalid."""


class EncoderSpecError(EncoderError, ConfigError):
    """A malformed encoder spec (``FAMILY:ARCHITECTURE[@WEIGHTS]``) or a modality the encoder does not embed:
    a usage mistake (exit 2), still an :class:`EncoderError` for library callers."""


class CorruptFileError(InputDataError):
    """A file a user handed in (checkpoint, connector) is missing, empty, truncated or of another format."""


class UnsafeFileError(InputDataError):
    """A torch file holds pickled objects outside the safe allowlist (they could run code); cmcr
    never unpickles such a file (see :mod:`cmcr.safeload`)."""


class OutputLockedError(CmcrError):
    """Another process is writing the same output folder (the message names its pid and command)."""


class HubUnreachableError(EncoderError):
    """A file must come from the model hub, is not in the local cache, and the hub cannot be reached
    (connection refused, timeout, no route, or offline mode ``HF_HUB_OFFLINE=1``). The only case in
    which ``cmcr demo`` may fall back to random weights."""


class HubFileError(EncoderError):
    """The model hub was reached but does not have the file (missing repo, file or revision), served a
    broken one, or the locally cached copy is corrupt."""


class RemoteReadError(InputDataError, OSError):
    """A shard URL (``pipe:``, ``http(s)://``, ``s3://`` ...) could not be opened or read to its end
    (the message names the URL, the opener's exit status explained, and the fix). Also an
    :class:`OSError`, so the readers that record an unreadable shard as one failure record it too."""
