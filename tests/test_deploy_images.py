"""The images: Dockerfiles, the build context, and the job image's Spark entry point."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import DEPLOY, IMAGE_UID, JOB_MAIN, REPO

IMAGES = DEPLOY / "images"


def dockerfile_stages(name: str) -> list[dict[str, Any]]:
    """Each stage of a Dockerfile: its FROM image, alias and instructions (continuations joined)."""
    text = (IMAGES / name).read_text()
    text = re.sub(r"\\\n", " ", text)
    stages: list[dict[str, Any]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            parts = rest.split()
            alias = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append({"image": parts[0], "alias": alias, "steps": []})
        else:
            stages[-1]["steps"].append((instruction.upper(), rest))
    return stages


def dockerignore_admits(path: str) -> bool:
    """Whether the build context keeps `path`: the last .dockerignore pattern matching it
    or one of its parent folders decides, `!` re-including."""
    kept = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            kept = negate
    return kept


@pytest.mark.parametrize("name", ["services.Dockerfile", "job.Dockerfile"])
def test_dockerfiles_pin_their_bases_and_run_as_non_root(name):
    stages = dockerfile_stages(name)
    aliases = {stage["alias"] for stage in stages}
    for stage in stages:
        image = stage["image"]
        assert image not in aliases
        assert re.search(r":\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?$", image), (
            f"{name}: {image} is not pinned to an exact version"
        )
    final = stages[-1]
    users = [rest for instruction, rest in final["steps"] if instruction == "USER"]
    assert users, f"{name}: the runtime stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid == gid == str(IMAGE_UID), "numeric, so Kubernetes can check runAsNonRoot"
    python_tag = re.search(r"python:(\d+\.\d+)\.", final["image"]).group(1)
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == f">={python_tag}"


@pytest.mark.parametrize("name", ["services.Dockerfile", "job.Dockerfile"])
def test_dockerfiles_copy_only_files_that_exist_and_reach_the_context(name):
    copied = 0
    for stage in dockerfile_stages(name):
        for instruction, rest in stage["steps"]:
            if instruction not in ("COPY", "ADD"):
                continue
            args = [arg for arg in rest.split() if not arg.startswith("--")]
            if "--from=" in rest:
                continue
            for source in args[:-1]:
                assert (REPO / source).exists(), f"{name}: COPY {source}: no such file"
                assert dockerignore_admits(source), f"{name}: .dockerignore drops {source}"
                copied += 1
    assert copied >= 4
    for dropped in (".venv", ".git", "node_modules", "tests/conftest.py", "deploy/base"):
        assert not dockerignore_admits(dropped), f"{dropped} would enter the build context"


def test_the_services_image_has_no_java_or_spark():
    stages = dockerfile_stages("services.Dockerfile")
    text = json.dumps(stages).lower()
    for word in ("pyspark", "java", "jdk", "jre", "temurin", "spark-submit", "[job]"):
        assert word not in text, f"services image mentions {word}"
    installs = [
        rest
        for instruction, rest in stages[-1]["steps"]
        if instruction == "RUN" and "install" in rest
    ]
    assert any(re.search(r"--find-links /wheels (-r \S+ )?adrec(\s|$)", rest) for rest in installs)


def test_the_job_image_has_java_17_spark_and_the_entry_point():
    stages = dockerfile_stages("job.Dockerfile")
    assert any(re.match(r"eclipse-temurin:17\.", stage["image"]) for stage in stages)
    steps = stages[-1]["steps"]
    text = " ".join(rest for _, rest in steps)
    assert "'adrec[job]'" in text
    env = " ".join(rest for instruction, rest in steps if instruction == "ENV")
    python_tag = re.search(r"python:(\d+\.\d+)\.", stages[-1]["image"]).group(1)
    assert f"SPARK_HOME=/opt/venv/lib/python{python_tag}/site-packages/pyspark" in env
    copies = [rest.split() for instruction, rest in steps if instruction == "COPY"]
    assert ["jobs/main.py", JOB_MAIN.removeprefix("local://")] in copies
    (entrypoint,) = [json.loads(rest) for instruction, rest in steps if instruction == "ENTRYPOINT"]
    assert any(
        copy[-1] == entrypoint[0] and copy[-2] == "deploy/images/spark-entrypoint.sh"
        for copy in copies
    )


def _fake_tools(tmp_path: Path) -> dict[str, str]:
    """tini, java and spark-submit stand-ins that print the command they were given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tini").write_text(
        '#!/bin/sh\nwhile [ "$1" != "--" ]; do shift; done\nshift\nexec "$@"\n'
    )
    for tool in ("java", "spark-submit"):
        (bin_dir / tool).write_text(f'#!/bin/sh\nprintf "%s\\n" {tool} "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    spark_home = tmp_path / "spark"
    (spark_home / "bin").mkdir(parents=True)
    os.symlink(bin_dir / "spark-submit", spark_home / "bin" / "spark-submit")
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "SPARK_HOME": str(spark_home),
        "JAVA_HOME": str(tmp_path),
    }


def test_the_job_entrypoint_starts_executors_drivers_and_commands(tmp_path):
    """deploy/images/spark-entrypoint.sh against Spark's executor pod contract."""
    env = _fake_tools(tmp_path)
    entrypoint = str(IMAGES / "spark-entrypoint.sh")

    def run_entrypoint(*args: str, **extra: str) -> list[str]:
        result = subprocess.run(
            ["bash", entrypoint, *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    executor = run_entrypoint(
        "executor",
        SPARK_EXECUTOR_MEMORY="3g",
        SPARK_DRIVER_URL="spark://driver:7078",
        SPARK_EXECUTOR_ID="4",
        SPARK_EXECUTOR_CORES="2",
        SPARK_APPLICATION_ID="spark-1",
        SPARK_EXECUTOR_POD_IP="10.0.0.9",
        SPARK_RESOURCE_PROFILE_ID="0",
        SPARK_EXECUTOR_POD_NAME="adrec-job-exec-4",
        SPARK_JAVA_OPT_0="-Dx=1",
        SPARK_JAVA_OPT_1="--add-opens=java.base/java.lang=ALL-UNNAMED",
    )
    assert executor[0] == "java"
    assert executor[1:5] == [
        "-Dx=1",
        "--add-opens=java.base/java.lang=ALL-UNNAMED",
        "-Xms3g",
        "-Xmx3g",
    ]
    classpath = executor[executor.index("-cp") + 1]
    assert f"{env['SPARK_HOME']}/jars/*" in classpath.split(":")
    main = executor.index("org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend")
    flags = dict(zip(executor[main + 1 :: 2], executor[main + 2 :: 2], strict=True))
    assert flags == {
        "--driver-url": "spark://driver:7078",
        "--executor-id": "4",
        "--cores": "2",
        "--app-id": "spark-1",
        "--hostname": "10.0.0.9",
        "--resourceProfileId": "0",
        "--podName": "adrec-job-exec-4",
    }

    driver = run_entrypoint(
        "driver",
        "--properties-file",
        "/opt/spark/conf/spark.properties",
        JOB_MAIN,
        SPARK_DRIVER_BIND_ADDRESS="10.0.0.5",
    )
    assert driver[0] == "spark-submit"
    assert driver[1:7] == [
        "--conf",
        "spark.driver.bindAddress=10.0.0.5",
        "--conf",
        "spark.executorEnv.SPARK_DRIVER_POD_IP=10.0.0.5",
        "--deploy-mode",
        "client",
    ]
    assert driver[-1] == JOB_MAIN

    assert run_entrypoint("spark-submit", "--version") == ["spark-submit", "--version"]


SCRIPTS = REPO / "scripts"


def test_the_build_script_stands_in_for_exactly_the_pinned_bases():
    """scripts/build-images makes local stand-ins by name for the bases it cannot pull: a
    base pinned in a Dockerfile but unknown to it would fail the build without a registry."""
    script = (SCRIPTS / "build-images").read_text()
    stand_ins = set(re.findall(r"^(?:PYTHON|JRE)_BASE=(\S+)$", script, re.MULTILINE))
    pinned = {
        stage["image"]
        for name in ("services.Dockerfile", "job.Dockerfile")
        for stage in dockerfile_stages(name)
    }
    assert stand_ins == pinned


@pytest.mark.parametrize("name", ["build-images", "smoke-images"])
def test_the_image_scripts_parse_and_explain_themselves(name):
    script = SCRIPTS / name
    assert os.access(script, os.X_OK)
    assert "set -euo pipefail" in script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    # --help is answered before any tool is looked for or anything is built.
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert f"scripts/{name}" in result.stdout
