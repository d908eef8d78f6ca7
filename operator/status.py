"""Compute a DiffusionGemma's ``.status`` from what was observed (pure: no API calls).

Inputs are the KubeRay RayService's status (its ``Ready``/``UpgradeInProgress`` conditions, the
Serve application and deployment statuses) and the app's own start-up context verification:
the dgserve app refuses to become healthy when a backend serves less context than promised, and
the refusal (``dgserve.serving.diffusion.check_served_context``) reaches the Serve deployment and
application messages that KubeRay copies, e.g. ``backend 'diffusion' (model '...') serves a
context of 8192 tokens, less than the promised 262144``. ``key=value`` tokens
(``backend=diffusion promised=262144 served=8192``) are understood too. A RUNNING app has
therefore verified the promised context.

The result is a new dict; the caller writes it only when it differs from the current status.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from . import names
from .conditions import Cond, ConditionType, Reason, merge
from .render import APP_NAME, Owner
from .spec import DiffusionGemmaSpec

HEALTHY_DEPLOYMENT = {"HEALTHY", "UPSCALING", "DOWNSCALING"}
_TOKEN = re.compile(r"\b(backend|promised|served)\s*[=:]\s*([\w.-]+)", re.IGNORECASE)
_PROSE = re.compile(r"backend '(?P<backend>[^']+)'.*?serves a context of (?P<served>\d+) tokens?, less than "
                    r"the promised (?P<promised>\d+)", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Observation:
    """What the operator saw in the cluster for one DiffusionGemma."""

    kuberay_installed: bool = True
    rayservice: dict[str, Any] | None = None
    invalid_spec: str | None = None  # message of the InvalidSpecError, when the spec was refused


@dataclass(frozen=True)
class ContextShortfall:
    backend: str
    promised: int
    served: int


def parse_context_shortfall(message: str | None) -> ContextShortfall | None:
    """The app's context-verification failure, if ``message`` reports one."""
    if not message:
        return None
    prose = _PROSE.search(message)
    if prose:
        return ContextShortfall(backend=prose["backend"], promised=int(prose["promised"]), served=int(prose["served"]))
    tokens = {k.lower(): v for k, v in _TOKEN.findall(message)}
    try:
        promised, served = int(tokens["promised"]), int(tokens["served"])
    except (KeyError, ValueError):
        return None
    if served >= promised:
        return None
    return ContextShortfall(backend=tokens.get("backend", "unknown"), promised=promised, served=served)


def _messages(app: dict[str, Any]) -> list[str]:
    out = [app.get("message") or ""]
    out += [(d or {}).get("message") or "" for d in (app.get("serveDeploymentStatuses") or {}).values()]
    return out


def _shortfalls(*apps: dict[str, Any]) -> list[ContextShortfall]:
    found = [parse_context_shortfall(m) for app in apps for m in _messages(app)]
    return [f for f in found if f is not None]


def _kuberay_condition(rs_status: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in rs_status.get("conditions") or []:
        if c.get("type") == type_:
            return c
    return {}


def _replicas_summary(spec: DiffusionGemmaSpec, ready: int) -> str:
    r = spec.replicas
    return f"{ready}/{r.min}" if r.min == r.max else f"{ready}/{r.min}-{r.max}"


def compute_status(spec: DiffusionGemmaSpec | None, owner: Owner, *, old: dict[str, Any] | None,
                   obs: Observation, now: str, generation: int | None) -> dict[str, Any]:
    """The new ``.status`` (``generation`` becomes ``observedGeneration``)."""
    old = old or {}
    status: dict[str, Any] = {}
    if generation is not None:
        status["observedGeneration"] = generation
    conds = _conditions(spec, owner, old, obs, status)
    status["conditions"] = merge(old.get("conditions"), conds, now=now, generation=generation)
    return {k: v for k, v in status.items() if v is not None}


def _conditions(spec: DiffusionGemmaSpec | None, owner: Owner, old: dict[str, Any], obs: Observation,
                status: dict[str, Any]) -> list[Cond]:
    T, R = ConditionType, Reason
    if obs.invalid_spec is not None or spec is None:
        msg = obs.invalid_spec or "spec could not be read"
        return [Cond(T.READY, "False", R.INVALID_SPEC, msg), Cond(T.CONTEXT_VERIFIED, "Unknown", R.INVALID_SPEC, msg),
                Cond(T.FALLBACK_READY, "Unknown", R.INVALID_SPEC, msg),
                Cond(T.UPGRADE_IN_PROGRESS, "False", R.INVALID_SPEC, msg), Cond(T.DEGRADED, "True", R.INVALID_SPEC, msg)]

    status.update(rayService=owner.name, promisedContextLength=spec.context_length,
                  endpoint=f"{owner.name}.{owner.namespace}.svc:{spec.grpc_port}",
                  readyReplicas=0, replicas=_replicas_summary(spec, 0))
    fallback_off = spec.fallback.type == "Disabled"
    fb_disabled = Cond(T.FALLBACK_READY, "False", R.FALLBACK_DISABLED, "spec.fallback.type is Disabled: no overflow")

    if not obs.kuberay_installed:
        msg = (f"KubeRay's RayService API ({names.RAYSERVICE_PLURAL}.{names.RAY_GROUP}/{names.RAY_VERSION}) is not "
               "installed in this cluster: install the KubeRay operator (v1.7 CRDs)")
        return [Cond(T.READY, "False", R.KUBERAY_MISSING, msg), Cond(T.CONTEXT_VERIFIED, "Unknown", R.KUBERAY_MISSING, msg),
                fb_disabled if fallback_off else Cond(T.FALLBACK_READY, "Unknown", R.KUBERAY_MISSING, msg),
                Cond(T.UPGRADE_IN_PROGRESS, "False", R.KUBERAY_MISSING, msg), Cond(T.DEGRADED, "True", R.KUBERAY_MISSING, msg)]

    rs = obs.rayservice
    if rs is None:
        msg = f"RayService {owner.name} not created yet"
        return [Cond(T.READY, "False", R.RAYSERVICE_PENDING, msg),
                Cond(T.CONTEXT_VERIFIED, "Unknown", R.VERIFICATION_PENDING, msg),
                fb_disabled if fallback_off else Cond(T.FALLBACK_READY, "Unknown", R.FALLBACK_PENDING, msg),
                Cond(T.UPGRADE_IN_PROGRESS, "False", R.NO_UPGRADE, ""), Cond(T.DEGRADED, "False", R.AS_EXPECTED, "")]

    rs_status = rs.get("status") or {}
    active = rs_status.get("activeServiceStatus") or {}
    pending = rs_status.get("pendingServiceStatus") or {}
    app = (active.get("applicationStatuses") or {}).get(APP_NAME) or {}
    pending_app = (pending.get("applicationStatuses") or {}).get(APP_NAME) or {}
    app_status = app.get("status")
    deployments = app.get("serveDeploymentStatuses") or {}
    status.update(serviceStatus=rs_status.get("serviceStatus") or None, applicationStatus=app_status)

    # Upgrade: KubeRay has not seen our latest patch, or is bringing up a second cluster.
    rs_gen = (rs.get("metadata") or {}).get("generation")
    observed = rs_status.get("observedGeneration")
    upgrade_cond = _kuberay_condition(rs_status, "UpgradeInProgress")
    if rs_gen is not None and (observed is None or observed < rs_gen):
        upgrade = Cond(T.UPGRADE_IN_PROGRESS, "True", R.APPLYING,
                       f"KubeRay has observed RayService generation {observed}, latest is {rs_gen}")
    elif upgrade_cond.get("status") == "True" or pending.get("rayClusterName"):
        upgrade = Cond(T.UPGRADE_IN_PROGRESS, "True", R.NEW_CLUSTER,
                       f"new Ray cluster {pending.get('rayClusterName') or '?'} starting; traffic switches when its "
                       "app is ready")
    else:
        upgrade = Cond(T.UPGRADE_IN_PROGRESS, "False", R.NO_UPGRADE, "")
    upgrading = upgrade.status == "True"

    # Context: a shortfall reported by any backend (active or pending cluster) wins.
    shortfalls = _shortfalls(app, pending_app)
    running = app_status == "RUNNING"
    if shortfalls:
        worst = min(shortfalls, key=lambda s: s.served)
        ctx = Cond(T.CONTEXT_VERIFIED, "False", R.CONTEXT_TOO_SHORT, "; ".join(
            f"backend {s.backend} serves {s.served} tokens, {s.promised} promised" for s in shortfalls))
        if running and upgrading:  # the previous app still serves what it verified
            status["servedContextLength"] = old.get("servedContextLength")
        else:
            status["servedContextLength"] = worst.served
    elif running and not upgrading:
        ctx = Cond(T.CONTEXT_VERIFIED, "True", R.CONTEXT_VERIFIED,
                   f"every backend serves at least {spec.context_length} tokens")
        status["servedContextLength"] = spec.context_length
    else:
        ctx = Cond(T.CONTEXT_VERIFIED, "Unknown", R.VERIFICATION_PENDING,
                   "waiting for the app to verify its context at start-up")
        if running and old.get("servedContextLength") is not None:  # the previous app still serves
            status["servedContextLength"] = old["servedContextLength"]

    # Ready
    kuberay_ready = _kuberay_condition(rs_status, "Ready")
    rs_ready = kuberay_ready.get("status") == "True" if kuberay_ready else rs_status.get("serviceStatus") == "Running"
    app_msg = app.get("message") or kuberay_ready.get("message") or ""
    if shortfalls and not running:
        ready = Cond(T.READY, "False", R.CONTEXT_TOO_SHORT, ctx.message)
    elif app_status == "DEPLOY_FAILED":
        ready = Cond(T.READY, "False", R.DEPLOY_FAILED, app_msg)
    elif app_status == "UNHEALTHY":
        ready = Cond(T.READY, "False", R.UNHEALTHY, app_msg)
    elif running and rs_ready and not shortfalls:
        ready = Cond(T.READY, "True", R.SERVING, f"gRPC API at {status['endpoint']}")
    elif running and rs_ready:  # old app serves, the new one reports a shortfall
        ready = Cond(T.READY, "True", R.SERVING, f"gRPC API at {status['endpoint']} (previous version; the "
                     f"upgrade is blocked: {ctx.message})")
    else:
        ready = Cond(T.READY, "False", R.DEPLOYING, app_msg or f"application {APP_NAME} is {app_status or 'not started'}")

    diffusion = deployments.get(names.DIFFUSION_DEPLOYMENT) or {}
    if running and diffusion.get("status") in HEALTHY_DEPLOYMENT:
        status["readyReplicas"] = spec.replicas.min
        status["replicas"] = _replicas_summary(spec, spec.replicas.min)

    # Fallback
    if fallback_off:
        fallback = fb_disabled
    else:
        fb = deployments.get(names.FALLBACK_DEPLOYMENT) or {}
        fb_short = [s for s in shortfalls if s.backend.lower().startswith("fallback")]
        if fb_short:
            fallback = Cond(T.FALLBACK_READY, "False", R.CONTEXT_TOO_SHORT, ctx.message)
        elif fb.get("status") in HEALTHY_DEPLOYMENT:
            fallback = Cond(T.FALLBACK_READY, "True", R.FALLBACK_HEALTHY, f"{spec.fallback.type} fallback healthy")
        elif fb.get("status") == "UNHEALTHY":
            fallback = Cond(T.FALLBACK_READY, "False", R.FALLBACK_UNHEALTHY, fb.get("message") or "")
        else:
            fallback = Cond(T.FALLBACK_READY, "False", R.FALLBACK_PENDING,
                            fb.get("message") or f"deployment {names.FALLBACK_DEPLOYMENT} is "
                            f"{fb.get('status') or 'not started'}")

    # Degraded: what needs attention, most important first.
    if ctx.status == "False":
        degraded = Cond(T.DEGRADED, "True", R.CONTEXT_TOO_SHORT, ctx.message)
    elif ready.reason in (R.DEPLOY_FAILED, R.UNHEALTHY):
        degraded = Cond(T.DEGRADED, "True", ready.reason, ready.message)
    elif fallback.reason == R.FALLBACK_UNHEALTHY:
        degraded = Cond(T.DEGRADED, "True", R.FALLBACK_UNHEALTHY, fallback.message)
    else:
        degraded = Cond(T.DEGRADED, "False", R.AS_EXPECTED, "")
    return [ready, ctx, fallback, upgrade, degraded]
