"""Maps the repository's top-level folders onto one import namespace, ``dgserve``.

``engine/`` -> ``dgserve.engine``, ``serving/`` -> ``dgserve.serving``, ``operator/`` ->
``dgserve.operator``: nothing installs a top-level ``operator`` (it would shadow the
standard library) or a generic ``engine``/``serving`` module. Metadata lives in
pyproject.toml; this file only computes the package list, which pyproject cannot express
for remapped folders.
"""

from setuptools import find_packages, setup

ROOTS = {
    "dgserve": "dgserve",
    "dgserve.engine": "engine",
    "dgserve.serving": "serving",
    "dgserve.operator": "operator",
    "dgserve.loadtest": "loadtest",
    "dgserve.v1": "proto/dgserve/v1",  # generated gRPC stubs (python -m dgserve.serving.protos)
}

packages: list[str] = []
package_dir: dict[str, str] = {}
for name, folder in ROOTS.items():
    packages.append(name)
    package_dir[name] = folder
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"": ["*.json", "*.yaml", "*.proto", "*.jinja", "*.safetensors", "*.txt"]},
    include_package_data=True,
)
