"""Condition types and reasons of a DiffusionGemma (one place), and the merge that keeps
``lastTransitionTime`` unless a condition's status really changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal


class ConditionType(StrEnum):
    READY = "Ready"  # the gRPC API serves, every backend verified its context length
    CONTEXT_VERIFIED = "ContextVerified"  # every backend serves >= spec.contextLength
    FALLBACK_READY = "FallbackReady"  # the overflow target is healthy
    UPGRADE_IN_PROGRESS = "UpgradeInProgress"  # a spec change is being rolled out by KubeRay
    DEGRADED = "Degraded"  # something needs a human (or KubeRay) to act


class Reason(StrEnum):
    SERVING = "Serving"
    INVALID_SPEC = "InvalidSpec"
    KUBERAY_MISSING = "KubeRayMissing"
    RAYSERVICE_PENDING = "RayServicePending"
    DEPLOYING = "Deploying"
    DEPLOY_FAILED = "DeployFailed"
    UNHEALTHY = "Unhealthy"
    CONTEXT_TOO_SHORT = "ContextTooShort"
    CONTEXT_VERIFIED = "ContextVerified"
    VERIFICATION_PENDING = "VerificationPending"
    FALLBACK_DISABLED = "FallbackDisabled"
    FALLBACK_HEALTHY = "FallbackHealthy"
    FALLBACK_UNHEALTHY = "FallbackUnhealthy"
    FALLBACK_PENDING = "FallbackPending"
    APPLYING = "Applying"  # KubeRay has not observed the latest RayService spec yet
    NEW_CLUSTER = "NewCluster"  # KubeRay is bringing up a new Ray cluster to switch traffic to
    NO_UPGRADE = "NoUpgrade"
    AS_EXPECTED = "AsExpected"


Status = Literal["True", "False", "Unknown"]
ORDER = tuple(ConditionType)


@dataclass(frozen=True)
class Cond:
    type: ConditionType
    status: Status
    reason: Reason
    message: str = ""


def merge(old: list[dict[str, Any]] | None, new: list[Cond], *, now: str,
          generation: int | None) -> list[dict[str, Any]]:
    """The status.conditions list for ``new``: a condition keeps its ``lastTransitionTime``
    while its status stays the same; ordered by :data:`ORDER`."""
    previous = {c.get("type"): c for c in old or []}
    out = []
    for cond in sorted(new, key=lambda c: ORDER.index(c.type)):
        prev = previous.get(str(cond.type))
        since = prev["lastTransitionTime"] if prev and prev.get("status") == cond.status and \
            prev.get("lastTransitionTime") else now
        entry: dict[str, Any] = {"type": str(cond.type), "status": cond.status, "reason": str(cond.reason),
                                 "message": cond.message, "lastTransitionTime": since}
        if generation is not None:
            entry["observedGeneration"] = generation
        out.append(entry)
    return out


def find(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    for c in conditions or []:
        if c.get("type") == type_:
            return c
    return None
