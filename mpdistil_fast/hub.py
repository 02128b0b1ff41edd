"""What the Hugging Face hub could not serve: a task's data or a model named by a hub id (offline, unknown id, ...).

The CLI turns :class:`HubUnavailableError` into one line and exit status 2; its message says what to use offline.
"""
from __future__ import annotations


class HubUnavailableError(RuntimeError):
    """A task's data or a model could not be loaded from the Hugging Face hub (offline, unknown id, ...)."""
