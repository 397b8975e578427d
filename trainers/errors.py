"""Errors a user must act on, importable without torch (the CLI catches them to print one line)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it."""
