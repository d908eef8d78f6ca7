"""Reconcile one DiffusionGemma, as named steps:

validate -> render -> apply (create if missing, patch if different, adopt) -> compute status
-> write status (once, only when it changed).

Every step takes its inputs explicitly (the API as a :class:`~dgserve.operator.kube.Kube`, the
clock as ``now``), so the tests run them with a recording double. The kopf handlers in
:mod:`dgserve.operator.handlers` only translate errors into kopf's retry intents.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from . import names
from .errors import InvalidSpecError, KubeRayMissingError
from .kube import Kube
from .render import Owner, build_app_config, build_rayservice, parse_spec, validate_name
from .spec import DiffusionGemmaSpec
from .status import Observation, compute_status

log = logging.getLogger(__name__)
Clock = Callable[[], str]


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Action(StrEnum):
    CREATED = "created"
    PATCHED = "patched"
    UNCHANGED = "unchanged"


# --- step 1: validate ----------------------------------------------------------------------------


def validate(body: dict[str, Any]) -> tuple[Owner, DiffusionGemmaSpec]:
    """Owner and parsed spec, or :class:`InvalidSpecError` (the API server's CEL rules catch most
    of these first; this also covers specs the serving AppConfig cannot express)."""
    owner = Owner.from_body(body)
    validate_name(owner.name)
    spec = parse_spec(body.get("spec"))
    build_app_config(spec)  # refuses settings serving cannot carry
    return owner, spec


# --- step 3: apply -------------------------------------------------------------------------------


def is_subset(want: Any, have: Any) -> bool:
    """Whether ``have`` already holds everything in ``want`` (extra keys in ``have``, e.g. filled
    in by API-server defaulting, are fine; lists must match element by element)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and is_subset(v, have[k]) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(map(is_subset, want, have))
    return want == have


def merge_patch(have: Any, want: Any) -> Any:
    """RFC 7386 merge patch turning ``have`` into ``want``: keys ``want`` lacks become null, a list
    that is not exactly equal is replaced whole (an element that lost a key must lose it; keys the
    API server defaulted inside come back when it defaults the new list)."""
    if not isinstance(want, dict) or not isinstance(have, dict):
        return want
    patch: dict[str, Any] = {}
    for key, value in want.items():
        if key not in have:
            patch[key] = value
        elif isinstance(value, dict) and isinstance(have[key], dict):
            sub = merge_patch(have[key], value)
            if sub:
                patch[key] = sub
        elif value != have[key]:
            patch[key] = value
    for key in have:
        if key not in want:
            patch[key] = None
    return patch


def _owner_refs(desired: dict[str, Any], current: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The ownerReferences ``current`` needs (None if it already has ours); refuses to steal an
    object another controller owns."""
    wanted = desired["metadata"].get("ownerReferences") or []
    if not wanted:
        return None
    ours = wanted[0]
    refs = current.get("metadata", {}).get("ownerReferences") or []
    if any(r.get("uid") == ours["uid"] for r in refs):
        return None
    for r in refs:
        if r.get("controller"):
            raise InvalidSpecError(f"RayService {current['metadata'].get('name')} is controlled by "
                                   f"{r.get('kind')} {r.get('name')} (uid {r.get('uid')}); delete it or rename "
                                   "the DiffusionGemma")
    return [*refs, ours]


def needs_update(desired: dict[str, Any], current: dict[str, Any]) -> bool:
    meta, cur_meta = desired["metadata"], current.get("metadata") or {}
    return (
        (cur_meta.get("annotations") or {}).get(names.ANNOTATION_SPEC_HASH)
        != meta["annotations"][names.ANNOTATION_SPEC_HASH]
        or not is_subset(meta["labels"], cur_meta.get("labels") or {})
        or not is_subset(desired["spec"], current.get("spec") or {})
        or _owner_refs(desired, current) is not None
    )


def update_patch(desired: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """Merge patch for an existing RayService: our labels, hash and owner reference, and a spec
    equal to the desired one (so removed settings disappear too)."""
    meta: dict[str, Any] = {"labels": desired["metadata"]["labels"],
                            "annotations": desired["metadata"]["annotations"]}
    refs = _owner_refs(desired, current)
    if refs is not None:
        meta["ownerReferences"] = refs
    return {"metadata": meta, "spec": merge_patch(current.get("spec") or {}, desired["spec"])}


def apply_rayservice(kube: Kube, desired: dict[str, Any]) -> tuple[dict[str, Any], Action]:
    """Create if missing, patch if different (KubeRay then upgrades without downtime), else nothing."""
    ns, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
    current = kube.get_rayservice(ns, name)
    if current is None:
        return kube.create_rayservice(ns, desired), Action.CREATED
    if not needs_update(desired, current):
        return current, Action.UNCHANGED
    return kube.patch_rayservice(ns, name, update_patch(desired, current)), Action.PATCHED


# --- step 5: write status ------------------------------------------------------------------------


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any] | None:
    """Merge patch from ``old`` to ``new`` status, or None when nothing changed."""
    old = {k: v for k, v in (old or {}).items()}
    if old == new:
        return None
    patch = dict(new)
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


def write_status(kube: Kube, owner: Owner, old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    patch = status_patch(old, new)
    if patch is None:
        return False
    kube.patch_diffusiongemma_status(owner.namespace, owner.name, patch)
    return True


# --- the whole reconcile -------------------------------------------------------------------------


def reconcile(body: dict[str, Any], kube: Kube, *, now: Clock = utc_now) -> Action:
    """Bring the RayService in line with the DiffusionGemma ``body`` and write its status.

    Raises :class:`InvalidSpecError` (after writing an InvalidSpec status),
    :class:`KubeRayMissingError` (after writing a KubeRayMissing status) and, from the API,
    :class:`~dgserve.operator.errors.TransientApiError` / ``ApiRejectedError``.
    """
    owner = Owner.from_body(body)
    old = body.get("status") or {}
    generation = (body.get("metadata") or {}).get("generation")
    try:
        owner, spec = validate(body)
    except InvalidSpecError as e:
        write_status(kube, owner, old, compute_status(None, owner, old=old, obs=Observation(invalid_spec=str(e)),
                                                      now=now(), generation=generation))
        raise
    if not kube.rayservice_api_available():
        write_status(kube, owner, old, compute_status(spec, owner, old=old, obs=Observation(kuberay_installed=False),
                                                      now=now(), generation=generation))
        raise KubeRayMissingError(f"{names.RAYSERVICE_PLURAL}.{names.RAY_GROUP}/{names.RAY_VERSION} is not served: "
                                  "install KubeRay; retrying")
    desired = build_rayservice(spec, owner)
    try:
        current, action = apply_rayservice(kube, desired)
    except InvalidSpecError as e:  # e.g. a RayService of that name owned by someone else
        write_status(kube, owner, old, compute_status(None, owner, old=old, obs=Observation(invalid_spec=str(e)),
                                                      now=now(), generation=generation))
        raise
    write_status(kube, owner, old, compute_status(spec, owner, old=old, obs=Observation(rayservice=current),
                                                  now=now(), generation=generation))
    return action


def _owner_of(rayservice: dict[str, Any], kube: Kube) -> dict[str, Any] | None:
    """The DiffusionGemma that controls ``rayservice`` (None if gone or not ours)."""
    meta = rayservice.get("metadata") or {}
    name, ns = (meta.get("labels") or {}).get(names.LABEL_OWNER), meta.get("namespace")
    if not name or not ns:
        return None
    body = kube.get_diffusiongemma(ns, name)
    if body is None:  # deleted: garbage collection removes the RayService
        return None
    uid = (body.get("metadata") or {}).get("uid")
    if not any(r.get("uid") == uid and r.get("controller") for r in meta.get("ownerReferences") or []):
        return None
    return body


def recreate_if_owner_alive(rayservice: dict[str, Any], kube: Kube, *, now: Clock = utc_now) -> Action | None:
    """A RayService we own was deleted while its DiffusionGemma lives on: render it again."""
    body = _owner_of(rayservice, kube)
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return None
    return reconcile(body, kube, now=now)


def refresh_status(rayservice: dict[str, Any], kube: Kube, *, now: Clock = utc_now) -> bool:
    """Mirror a RayService's status change into its DiffusionGemma's status (the event path).

    Leaves ``observedGeneration`` alone and does nothing while the DiffusionGemma has a spec
    change the reconcile has not handled yet (it will write the status itself). Returns whether
    a status was written.
    """
    body = _owner_of(rayservice, kube)
    if body is None:
        return False
    old = body.get("status") or {}
    generation = (body.get("metadata") or {}).get("generation")
    if old.get("observedGeneration") != generation:
        return False
    try:
        owner, spec = validate(body)
    except InvalidSpecError:
        return False
    new = compute_status(spec, owner, old=old, obs=Observation(rayservice=rayservice), now=now(),
                         generation=old.get("observedGeneration"))
    return write_status(kube, owner, old, new)
