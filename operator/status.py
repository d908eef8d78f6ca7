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


@dataclass(frozen=True)
class ServeView:
    """The parts of a RayService's status the conditions are computed from."""

    rs_status: dict[str, Any]
    app: dict[str, Any]  # our application on the active cluster
    pending: dict[str, Any]  # pendingServiceStatus (a new cluster during a NewCluster upgrade)
    shortfalls: list[ContextShortfall]
    generation: int | None
    observed: int | None

    @classmethod
    def of(cls, rs: dict[str, Any]) -> ServeView:
        st = rs.get("status") or {}
        pending = st.get("pendingServiceStatus") or {}
        app = ((st.get("activeServiceStatus") or {}).get("applicationStatuses") or {}).get(APP_NAME) or {}
        pending_app = (pending.get("applicationStatuses") or {}).get(APP_NAME) or {}
        return cls(rs_status=st, app=app, pending=pending, shortfalls=_shortfalls(app, pending_app),
                   generation=(rs.get("metadata") or {}).get("generation"), observed=st.get("observedGeneration"))

    @property
    def app_status(self) -> str | None:
        return self.app.get("status")

    @property
    def running(self) -> bool:
        return self.app_status == "RUNNING"

    def deployment(self, name: str) -> dict[str, Any]:
        return (self.app.get("serveDeploymentStatuses") or {}).get(name) or {}


T, R = ConditionType, Reason


def compute_status(spec: DiffusionGemmaSpec | None, owner: Owner, *, old: dict[str, Any] | None,
                   obs: Observation, now: str, generation: int | None) -> dict[str, Any]:
    """The new ``.status`` (``generation`` becomes ``observedGeneration``)."""
    old = old or {}
    status: dict[str, Any] = {}
    if generation is not None:
        status["observedGeneration"] = generation
    if obs.invalid_spec is not None or spec is None:
        conds = _all_same(obs.invalid_spec or "spec could not be read", R.INVALID_SPEC, fallback=None)
    else:
        status.update(rayService=owner.name, promisedContextLength=spec.context_length,
                      endpoint=f"{owner.name}.{owner.namespace}.svc:{spec.grpc_port}",
                      readyReplicas=0, replicas=_replicas_summary(spec, 0))
        conds = _conditions(spec, old, obs, status)
    status["conditions"] = merge(old.get("conditions"), conds, now=now, generation=generation)
    return {k: v for k, v in status.items() if v is not None}


def _fallback_disabled() -> Cond:
    return Cond(T.FALLBACK_READY, "False", R.FALLBACK_DISABLED, "spec.fallback.type is Disabled: no overflow")


def _all_same(msg: str, reason: Reason, *, fallback: Cond | None) -> list[Cond]:
    """Nothing runs (bad spec, KubeRay missing): every condition says why."""
    return [Cond(T.READY, "False", reason, msg), Cond(T.CONTEXT_VERIFIED, "Unknown", reason, msg),
            fallback or Cond(T.FALLBACK_READY, "Unknown", reason, msg),
            Cond(T.UPGRADE_IN_PROGRESS, "False", reason, msg), Cond(T.DEGRADED, "True", reason, msg)]


def _conditions(spec: DiffusionGemmaSpec, old: dict[str, Any], obs: Observation, status: dict[str, Any]) -> list[Cond]:
    fallback_off = _fallback_disabled() if spec.fallback.type == "Disabled" else None
    if not obs.kuberay_installed:
        msg = (f"KubeRay's RayService API ({names.RAYSERVICE_PLURAL}.{names.RAY_GROUP}/{names.RAY_VERSION}) is "
               "not installed in this cluster: install the KubeRay operator (v1.7 CRDs)")
        return _all_same(msg, R.KUBERAY_MISSING, fallback=fallback_off)
    if obs.rayservice is None:
        msg = f"RayService {status['rayService']} not created yet"
        return [Cond(T.READY, "False", R.RAYSERVICE_PENDING, msg),
                Cond(T.CONTEXT_VERIFIED, "Unknown", R.VERIFICATION_PENDING, msg),
                fallback_off or Cond(T.FALLBACK_READY, "Unknown", R.FALLBACK_PENDING, msg),
                Cond(T.UPGRADE_IN_PROGRESS, "False", R.NO_UPGRADE, ""), Cond(T.DEGRADED, "False", R.AS_EXPECTED, "")]

    view = ServeView.of(obs.rayservice)
    status.update(serviceStatus=view.rs_status.get("serviceStatus") or None, applicationStatus=view.app_status)
    upgrade = _upgrade(view)
    ctx, served = _context(spec, view, upgrading=upgrade.status == "True", old_served=old.get("servedContextLength"))
    status["servedContextLength"] = served
    ready = _ready(view, ctx, status["endpoint"])
    if view.running and view.deployment(names.DIFFUSION_DEPLOYMENT).get("status") in HEALTHY_DEPLOYMENT:
        status.update(readyReplicas=spec.replicas.min, replicas=_replicas_summary(spec, spec.replicas.min))
    fallback = fallback_off or _fallback(spec, view, ctx)
    return [ready, ctx, fallback, upgrade, _degraded(ready, ctx, fallback)]


def _upgrade(view: ServeView) -> Cond:
    """KubeRay has not seen our latest patch yet, or is bringing up a second cluster."""
    if view.generation is not None and (view.observed is None or view.observed < view.generation):
        return Cond(T.UPGRADE_IN_PROGRESS, "True", R.APPLYING,
                    f"KubeRay has observed RayService generation {view.observed}, latest is {view.generation}")
    new_cluster = view.pending.get("rayClusterName")
    if _kuberay_condition(view.rs_status, "UpgradeInProgress").get("status") == "True" or new_cluster:
        return Cond(T.UPGRADE_IN_PROGRESS, "True", R.NEW_CLUSTER,
                    f"new Ray cluster {new_cluster or '?'} starting; traffic switches when its app is ready")
    return Cond(T.UPGRADE_IN_PROGRESS, "False", R.NO_UPGRADE, "")


def _context(spec: DiffusionGemmaSpec, view: ServeView, *, upgrading: bool,
             old_served: int | None) -> tuple[Cond, int | None]:
    """ContextVerified, and the context the serving app verified (None while unknown).

    A shortfall reported by any backend (active or pending cluster) wins; a RUNNING app with no
    upgrade under way has verified the promised context; during an upgrade the previous app
    keeps serving what it verified before.
    """
    previous = old_served if view.running else None
    if view.shortfalls:
        msg = "; ".join(f"backend {s.backend} serves {s.served} tokens, {s.promised} promised"
                        for s in view.shortfalls)
        served = previous if upgrading and view.running else min(s.served for s in view.shortfalls)
        return Cond(T.CONTEXT_VERIFIED, "False", R.CONTEXT_TOO_SHORT, msg), served
    if view.running and not upgrading:
        return Cond(T.CONTEXT_VERIFIED, "True", R.CONTEXT_VERIFIED,
                    f"every backend serves at least {spec.context_length} tokens"), spec.context_length
    return Cond(T.CONTEXT_VERIFIED, "Unknown", R.VERIFICATION_PENDING,
                "waiting for the app to verify its context at start-up"), previous


def _ready(view: ServeView, ctx: Cond, endpoint: str) -> Cond:
    kuberay_ready = _kuberay_condition(view.rs_status, "Ready")
    rs_ready = (kuberay_ready.get("status") == "True" if kuberay_ready
                else view.rs_status.get("serviceStatus") == "Running")
    app_msg = view.app.get("message") or kuberay_ready.get("message") or ""
    if view.shortfalls and not view.running:
        return Cond(T.READY, "False", R.CONTEXT_TOO_SHORT, ctx.message)
    if view.app_status == "DEPLOY_FAILED":
        return Cond(T.READY, "False", R.DEPLOY_FAILED, app_msg)
    if view.app_status == "UNHEALTHY":
        return Cond(T.READY, "False", R.UNHEALTHY, app_msg)
    if view.running and rs_ready:
        blocked = f" (previous version; the upgrade is blocked: {ctx.message})" if view.shortfalls else ""
        return Cond(T.READY, "True", R.SERVING, f"gRPC API at {endpoint}{blocked}")
    return Cond(T.READY, "False", R.DEPLOYING,
                app_msg or f"application {APP_NAME} is {view.app_status or 'not started'}")


def _fallback(spec: DiffusionGemmaSpec, view: ServeView, ctx: Cond) -> Cond:
    fb = view.deployment(names.FALLBACK_DEPLOYMENT)
    if any(s.backend.lower().startswith("fallback") for s in view.shortfalls):
        return Cond(T.FALLBACK_READY, "False", R.CONTEXT_TOO_SHORT, ctx.message)
    if fb.get("status") in HEALTHY_DEPLOYMENT:
        return Cond(T.FALLBACK_READY, "True", R.FALLBACK_HEALTHY, f"{spec.fallback.type} fallback healthy")
    if fb.get("status") == "UNHEALTHY":
        return Cond(T.FALLBACK_READY, "False", R.FALLBACK_UNHEALTHY, fb.get("message") or "")
    return Cond(T.FALLBACK_READY, "False", R.FALLBACK_PENDING, fb.get("message")
                or f"deployment {names.FALLBACK_DEPLOYMENT} is {fb.get('status') or 'not started'}")


def _degraded(ready: Cond, ctx: Cond, fallback: Cond) -> Cond:
    """What needs attention, most important first."""
    if ctx.status == "False":
        return Cond(T.DEGRADED, "True", R.CONTEXT_TOO_SHORT, ctx.message)
    if ready.reason in (R.DEPLOY_FAILED, R.UNHEALTHY):
        return Cond(T.DEGRADED, "True", ready.reason, ready.message)
    if fallback.reason == R.FALLBACK_UNHEALTHY:
        return Cond(T.DEGRADED, "True", R.FALLBACK_UNHEALTHY, fallback.message)
    return Cond(T.DEGRADED, "False", R.AS_EXPECTED, "")
