"""kopf handlers (module level; importing this module registers them).

Each handler delegates to :mod:`dgserve.operator.reconcile` and only translates the typed errors
into kopf's retry intents: :class:`kopf.TemporaryError` where a retry can help,
:class:`kopf.PermanentError` for a spec that can never work. Nothing here sleeps.

kopf keeps its own bookkeeping (handler progress, last-handled spec) in annotations under
``dgserve.io/``, never in ``.status``: the CRD's structural schema would prune it there. The
handlers return nothing for the same reason (kopf stores return values in ``.status``).
Deletion needs no finalizer: the RayService carries an owner reference and is garbage-collected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import kopf

from . import names
from .errors import ApiRejectedError, InvalidSpecError, KubeRayMissingError, TransientApiError
from .kube import ApiKube, Kube
from .reconcile import recreate_if_owner_alive, reconcile, refresh_status

KUBERAY_RETRY_S = 60.0


def _kube(memo: Any) -> Kube:
    return memo["kube"]


def run_step(step: Callable[[], Any]) -> Any:
    """Run one reconcile step, turning the operator's errors into kopf retry intents."""
    try:
        return step()
    except (InvalidSpecError, ApiRejectedError) as e:
        raise kopf.PermanentError(str(e)) from e
    except KubeRayMissingError as e:
        raise kopf.TemporaryError(str(e), delay=KUBERAY_RETRY_S) from e
    except TransientApiError as e:
        raise kopf.TemporaryError(str(e), delay=e.delay) from e


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings that keep ``.status`` ours and post handler outcomes (INFO and up) as events."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=names.KOPF_PREFIX)
    settings.persistence.finalizer = names.FINALIZER
    settings.posting.level = logging.INFO
    settings.posting.loggers = True  # kopf >= 1.45 posts log messages as events only when asked to
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    configure(settings)
    if "kube" not in memo:  # tests may inject one
        ApiKube.load_config()
        memo["kube"] = ApiKube()


@kopf.on.resume(names.GROUP, names.VERSION, names.PLURAL)
@kopf.on.create(names.GROUP, names.VERSION, names.PLURAL)
def create_diffusiongemma(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    action = run_step(lambda: reconcile(_plain(body), _kube(memo)))
    logger.info("RayService %s", action)


@kopf.on.update(names.GROUP, names.VERSION, names.PLURAL, field="spec")
def update_diffusiongemma(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    action = run_step(lambda: reconcile(_plain(body), _kube(memo)))
    logger.info("spec changed: RayService %s (KubeRay rolls it out without downtime)", action)


@kopf.on.delete(names.GROUP, names.VERSION, names.PLURAL, optional=True)
def delete_diffusiongemma(name: str, namespace: str, logger: logging.Logger, **_: Any) -> None:
    logger.info("RayService %s/%s is garbage-collected through its owner reference", namespace, name)


@kopf.on.event(names.RAY_GROUP, names.RAY_VERSION, names.RAYSERVICE_PLURAL,
               labels={names.LABEL_MANAGED_BY: names.MANAGER})
def rayservice_event(event: dict[str, Any], body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                     **_: Any) -> None:
    """A RayService we own changed: mirror its status into the DiffusionGemma's; deleted while
    its DiffusionGemma lives on: render it again."""
    try:
        if event.get("type") == "DELETED":
            action = recreate_if_owner_alive(_plain(body), _kube(memo))
            if action is not None:
                logger.warning("RayService was deleted behind the operator's back: %s again", action)
            return
        refresh_status(_plain(body), _kube(memo))
    except (TransientApiError, KubeRayMissingError, InvalidSpecError, ApiRejectedError) as e:
        # event handlers are not retried by kopf; the next event (or a resume) tries again
        logger.warning("RayService event not handled: %s", e)


def _plain(body: kopf.Body) -> dict[str, Any]:
    return {key: body[key] for key in body}
