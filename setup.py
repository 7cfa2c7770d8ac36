"""Package discovery (the rest of the build is declared in pyproject.toml).

``tools/`` sits at the top of the repository but is installed as ``layerfs.tools``;
pyproject.toml can either discover packages or map that directory, not both, so the
mapping and the discovery live here.  Every package below ``layerfs/`` and ``tools/``
is found, never listed: a listed set once shipped wheels without ``layerfs.union``.
"""

from setuptools import find_namespace_packages, setup

packages = find_namespace_packages(include=["layerfs", "layerfs.*"])
packages += ["layerfs.tools"] + [f"layerfs.tools.{p}" for p in find_namespace_packages("tools")]
packages = [p for p in packages if "__pycache__" not in p]

setup(packages=packages, package_dir={"layerfs.tools": "tools"})
