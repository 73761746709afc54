"""Errors of `meshcore.policy`: an object the conversion cannot use, named down to the field."""

from __future__ import annotations

from meshcore import errors


class PolicyError(errors.MeshError, ValueError):
    """Root error of this package: `kind namespace/name: field: reason`."""

    def __init__(self, kind: str, namespace: str, name: str, field: str, reason: str) -> None:
        super().__init__(f"{kind} {namespace}/{name}: {field}: {reason}")
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.field = field
        self.reason = reason


class InvalidPolicyError(PolicyError):
    """A field has the wrong shape or a value that means nothing (a port that is not a number,
    an IP block that does not parse). Istio's admission webhook rejects these; we refuse them
    rather than guess, since a guessed DENY can silently stop denying."""


class UnsupportedActionError(PolicyError):
    """The policy's action is one ztunnel has no equivalent for (AUDIT, CUSTOM)."""

    def __init__(self, kind: str, namespace: str, name: str, action: str) -> None:
        super().__init__(kind, namespace, name, "spec.action", unsupported_action_message(action))
        self.action = action


def unsupported_action_message(action: str) -> str:
    """istiod's wording for the status it writes on such a policy."""
    return f"ztunnel does not support the {action} action"
