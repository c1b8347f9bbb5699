"""The project's one error hierarchy.

Every error a user can cause derives from :class:`EmbedforgeError`; the job runner maps
:class:`ConfigError` to exit code 2 before any cluster work starts.
"""

from __future__ import annotations


class EmbedforgeError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(EmbedforgeError):
    """A configuration value is missing, unknown or out of range. Exit code 2."""


class InputError(EmbedforgeError):
    """Input data is malformed: missing columns, empty datasets, unreadable rows."""


class StorageError(EmbedforgeError):
    """A storage URI cannot be read or written, or a manifest is missing/incomplete."""


class ModelNotFoundError(EmbedforgeError):
    """A model name is neither packaged, a local folder, nor reachable on the hub."""


class EngineError(EmbedforgeError):
    """An engine (vLLM, torch, Ray resources) failed to start or to answer in time."""


class ResourceError(EngineError):
    """The cluster cannot satisfy a resource request (e.g. GPUs on a CPU-only cluster)."""
