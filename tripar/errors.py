"""tripar's exception types.

Every error a user can cause is one of these, with a message that states the
rule that was broken, the numbers involved and how to fix it. The CLI prints
the message alone (the traceback only with ``--debug``).
"""

from __future__ import annotations


class TriparError(Exception):
    """Base of every error tripar raises on purpose."""


class ConfigError(TriparError, ValueError):
    """A user-given setting is malformed or contradicts another one."""


class ModelSpecError(ConfigError):
    """A MODEL argument could not be understood or built."""


class CaptureError(TriparError):
    """Neither tracer could turn the model into a graph."""

    details: str = ""
    """What the tracers printed while failing (torch.export's partial graph): shown by
    ``tripar --debug``, kept out of the message."""


class PlanError(TriparError):
    """A plan or schedule is inconsistent, corrupt or does not match its use."""


class InfeasibleError(TriparError):
    """No configuration fits the model on the given devices."""
