"""tpu_setup/constraints.txt: a pin for every dependency of the diffjax extras the workers install
(tpu_setup/worker/setup.sh: diffjax[tpu,gcs]), inside pyproject.toml's ranges."""

import importlib.metadata
import re
import tomllib

import pytest
from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def pins() -> dict[str, str]:
    lines = (REPO / "tpu_setup" / "constraints.txt").read_text().splitlines()
    pairs = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    return {canonicalize_name(name): version for name, version in pairs.items()}


def worker_requirements() -> list[Requirement]:
    """diffjax's dependencies and those of every extra that worker/setup.sh installs."""
    (extras,) = re.findall(r'-e "\.\[([a-z,]+)\]"', (REPO / "tpu_setup" / "worker" / "setup.sh").read_text())
    extras = extras.split(",")
    assert {"tpu", "gcs"} <= set(extras), extras  # gcs: gcsfs and google-cloud-storage, for gs:// workdirs
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    for extra in extras:
        assert extra in optional, f"worker/setup.sh installs diffjax[{extra}], which pyproject.toml does not define"
    return [Requirement(r) for r in project["dependencies"] + [r for extra in extras for r in optional[extra]]]


def test_every_dependency_is_pinned_within_its_range():
    pinned = pins()
    for requirement in worker_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} has no pin"
        assert requirement.specifier.contains(pinned[name]), f"{name}=={pinned[name]} is outside {requirement}"
    assert {"jaxlib", "libtpu"} <= pinned.keys()  # what jax[tpu] brings
    assert {"gcsfs", "google-cloud-storage", "google-auth", "aiohttp"} <= pinned.keys()  # what gcs brings


def test_every_package_the_workers_install_has_a_pin():
    """Names only, from the requirements of the distributions installed here (versions may differ here)."""
    pinned, seen, todo = pins(), set(), [(r, "") for r in worker_requirements()]
    while todo:
        requirement, parent_extra = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": parent_extra}):
            continue
        name = canonicalize_name(requirement.name)
        for extra in {"", *requirement.extras}:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            try:
                requires = importlib.metadata.requires(name) or []
            except importlib.metadata.PackageNotFoundError:
                pytest.skip(f"{name} is not installed here: pip install -e '.[tpu,gcs]' to check the whole closure")
            todo += [(Requirement(r), extra) for r in requires]
    missing = sorted({name for name, _ in seen} - pinned.keys())
    assert not missing, f"no pin for {missing}"
