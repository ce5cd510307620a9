"""tpu_setup/constraints.txt: a pin for every dependency of diffjax[tpu], inside pyproject.toml's ranges."""

import tomllib

from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def test_every_dependency_is_pinned_within_its_range():
    lines = (REPO / "tpu_setup" / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    pins = {canonicalize_name(name): version for name, version in pins.items()}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in map(Requirement, project["dependencies"] + project["optional-dependencies"]["tpu"]):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} has no pin"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}"
    assert {"jaxlib", "libtpu"} <= pins.keys()  # what jax[tpu] brings
