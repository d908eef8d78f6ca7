"""deploy/Dockerfile, the image every rendered pod runs. No container runtime exists on these
machines, so the image is not built here; these tests keep the Dockerfile consistent with what the
repository installs and with what the operator renders."""

from __future__ import annotations

import ast
import re

from dgserve.operator import names
from operator_testlib import REPO_ROOT

DOCKERFILE = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
MAKEFILE = (REPO_ROOT / "Makefile").read_text()


def _arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M)
    assert m, f"deploy/Dockerfile has no default for ARG {name}"
    return m.group(1)


def test_image_pins_the_same_torch_and_fallback_weights_as_the_makefile():
    assert f"TORCH_SPEC ?= {_arg('TORCH_SPEC')}" in MAKEFILE
    assert f"--no-deps {_arg('SMOLLM2_SPEC')}" in MAKEFILE


def test_image_copies_every_folder_the_package_is_built_from():
    tree = ast.parse((REPO_ROOT / "setup.py").read_text())
    (roots,) = [ast.literal_eval(n.value) for n in tree.body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "ROOTS"]
    copied = set(re.findall(r"^COPY (\S+) \S+$", DOCKERFILE, re.M))
    top_levels = {folder.split("/")[0] for folder in roots.values()}
    assert top_levels <= copied, f"not copied into the image: {sorted(top_levels - copied)}"


def test_image_runs_as_the_rendered_user_with_home_on_the_writable_tmp():
    assert re.search(rf"^USER {names.RUN_AS_USER}$", DOCKERFILE, re.M)
    assert f"HOME={names.TMP_DIR}" in DOCKERFILE and f"DGSERVE_STATE_DIR={names.TMP_DIR}/" in DOCKERFILE
