"""The lock files: every pin of pyproject.toml in them, one lock per image, and installed."""

import importlib.metadata
import pathlib
import re
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: Which dependency groups each lock resolves.
LOCKS = {
    "services": ("base",),
    "job": ("base", "job"),
    "dev": ("base", "job", "dev"),
}


def _name(requirement: str) -> str:
    return re.split(r"[=<>~!\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)", requirement.strip())
        assert match, f"{requirement!r} is not pinned with =="
        pins[_name(match.group(1))] = match.group(3)
    return pins


def _group(name: str) -> dict[str, str]:
    if name == "base":
        return _pins(PROJECT["dependencies"])
    return _pins(PROJECT["optional-dependencies"][name])


def _lock(name: str) -> dict[str, str]:
    lines = (ROOT / "requirements" / f"{name}.txt").read_text().splitlines()
    return {
        _name(line): line.split("==", 1)[1].strip()
        for line in lines
        if line and not line.startswith((" ", "#"))
    }


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_each_lock_pins_every_direct_dependency_at_its_pyproject_version(lock):
    pinned = _lock(lock)
    for group in LOCKS[lock]:
        for name, version in _group(group).items():
            assert pinned.get(name) == version, f"requirements/{lock}.txt: {name}"


def test_the_services_lock_carries_none_of_the_job_packages():
    job_only = set(_group("job")) - set(_group("base"))
    assert job_only and not job_only & set(_lock("services"))


def test_each_image_installs_from_its_lock():
    for image, lock in (("services", "services"), ("job", "job")):
        dockerfile = (ROOT / "deploy" / "images" / f"{image}.Dockerfile").read_text()
        assert f"-r requirements/{lock}.txt" in dockerfile
        assert "-r /wheels/requirements.txt" in dockerfile


def test_the_development_environment_is_the_dev_lock():
    installed = {
        _name(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()
    }
    differing = {
        name: (version, installed.get(name))
        for name, version in _lock("dev").items()
        if installed.get(name) != version
    }
    assert differing == {}
