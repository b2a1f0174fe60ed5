"""Which pod gets which Secret, as rendered: the executors get the Redis CA but never the
password file, Spark's shared secret is a mounted file rather than an environment
variable, and every Secret prod expects is one the operator's guide creates."""

from __future__ import annotations

import itertools
import re
from pathlib import PurePosixPath
from typing import Any

import pytest
from deploy_helpers import JOB_MAIN, REPO, config_maps, executor_template, named, of_kind

OPERATIONS_DOC = REPO / "docs" / "operations.md"
SPARK_AUTH_SECRET = "adrec-spark-auth"
REDIS_SECRET = "adrec-redis"
CRONJOB_OVERLAYS = ("dev", "prod")


def cronjob_pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = named(objects, "CronJob", "adrec-job")["spec"]
    return spec["jobTemplate"]["spec"]["template"]["spec"]


def submit_confs(driver: dict[str, Any]) -> dict[str, str]:
    args = driver["args"]
    options = args[: args.index(JOB_MAIN)]
    return dict(
        conf.split("=", 1) for flag, conf in itertools.pairwise(options) if flag == "--conf"
    )


def secret_volumes(volumes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Volume name -> its `secret` source, for the Secret volumes among `volumes`."""
    return {volume["name"]: volume["secret"] for volume in volumes if "secret" in volume}


def mounted_secret_files(
    volumes: list[dict[str, Any]], mounts: list[dict[str, Any]]
) -> dict[str, tuple[str, str]]:
    """Path -> (Secret, key) of every file a container sees from a Secret volume; a volume
    without `items` (the whole Secret) shows as key "*"."""
    sources = secret_volumes(volumes)
    files = {}
    for mount in mounts:
        source = sources.get(mount["name"])
        if source is None:
            continue
        assert mount.get("readOnly") is True, mount
        items = source.get("items") or [{"key": "*", "path": "*"}]
        for item in items:
            files[f"{mount['mountPath']}/{item['path']}"] = (source["secretName"], item["key"])
    return files


def env_secret_refs(container: dict[str, Any]) -> list[tuple[str, str]]:
    refs = [
        (var["valueFrom"]["secretKeyRef"]["name"], var["valueFrom"]["secretKeyRef"]["key"])
        for var in container.get("env", [])
        if "secretKeyRef" in var.get("valueFrom", {})
    ]
    refs += [
        (source["secretRef"]["name"], "*")
        for source in container.get("envFrom", [])
        if "secretRef" in source
    ]
    return refs


@pytest.mark.parametrize("overlay", CRONJOB_OVERLAYS)
def test_the_cronjobs_spark_secret_is_a_file_in_the_driver_and_every_executor(rendered, overlay):
    objects = rendered[overlay]
    pod = cronjob_pod(objects)
    (driver,) = pod["containers"]
    confs = submit_confs(driver)
    assert confs["spark.authenticate"] == "true"
    assert confs["spark.network.crypto.enabled"] == "true"
    secret_file = confs["spark.authenticate.secret.file"]
    # Spark puts the secret in the executors' environment unless they read it from a file.
    assert not {
        key
        for key in confs
        if key == "spark.authenticate.secret"
        or key.startswith(("spark.kubernetes.executor.secretKeyRef.", "spark.executorEnv."))
    }
    expected = (SPARK_AUTH_SECRET, PurePosixPath(secret_file).name)
    driver_files = mounted_secret_files(pod["volumes"], driver["volumeMounts"])
    assert driver_files[secret_file] == expected
    template = executor_template(objects)
    assert template is not None
    (executor,) = template["spec"]["containers"]
    executor_files = mounted_secret_files(template["spec"]["volumes"], executor["volumeMounts"])
    assert executor_files[secret_file] == expected


@pytest.mark.parametrize("overlay", CRONJOB_OVERLAYS)
def test_the_cronjobs_executors_get_the_redis_ca_and_nothing_else_of_the_redis_secret(
    rendered, overlay
):
    """The executors write to Redis with the password from the task closure (over Spark's
    encrypted RPC): of the Redis Secret they mount only the CA."""
    objects = rendered[overlay]
    pod = cronjob_pod(objects)
    (driver,) = pod["containers"]
    confs = submit_confs(driver)
    assert not [key for key in confs if key.startswith("spark.kubernetes.executor.secrets.")]
    template = executor_template(objects)
    assert template is not None
    (executor,) = template["spec"]["containers"]
    assert "env" not in executor and "envFrom" not in executor
    files = mounted_secret_files(template["spec"]["volumes"], executor["volumeMounts"])
    assert sorted(files.values()) == [(REDIS_SECRET, "ca.crt"), (SPARK_AUTH_SECRET, "secret")]
    (ca_path,) = [path for path, ref in files.items() if ref == (REDIS_SECRET, "ca.crt")]
    # The key exists only with Redis TLS: optional in the executors, required in the driver,
    # which therefore stops first when it is missing.
    (ca_volume,) = [
        source
        for source in secret_volumes(template["spec"]["volumes"]).values()
        if source["secretName"] == REDIS_SECRET
    ]
    assert ca_volume["optional"] is True
    env = {
        name: value
        for ref in driver["envFrom"]
        for name, value in config_maps(objects)[ref["configMapRef"]["name"]].items()
    }
    driver_files = mounted_secret_files(pod["volumes"], driver["volumeMounts"])
    if overlay == "prod":
        assert env["REDIS_TLS_CA_FILE"] == ca_path
        assert driver_files[ca_path] == (REDIS_SECRET, "ca.crt")
        (driver_ca,) = [
            source
            for source in secret_volumes(pod["volumes"]).values()
            if source["secretName"] == REDIS_SECRET
        ]
        assert not driver_ca.get("optional", False)
    else:
        assert "REDIS_TLS_CA_FILE" not in env
        assert ca_path not in driver_files
    # The driver is the one job pod with the password.
    assert env_secret_refs(driver) == [(REDIS_SECRET, "password")]


def test_the_spark_operators_executors_get_the_ca_and_the_spark_secret_as_files_only(rendered):
    template = named(rendered["prod-spark-operator"], "ScheduledSparkApplication", "adrec-job")[
        "spec"
    ]["template"]
    conf = template["sparkConf"]
    assert conf["spark.authenticate"] == "true"
    secret_file = conf["spark.authenticate.secret.file"]
    assert "spark.authenticate.secret" not in conf
    volumes = template["volumes"]
    for source in secret_volumes(volumes).values():
        assert source.get("items"), f"{source['secretName']}: a whole Secret is mounted"
    driver, executor = template["driver"], template["executor"]
    expected_auth = (SPARK_AUTH_SECRET, PurePosixPath(secret_file).name)
    driver_files = mounted_secret_files(volumes, driver["volumeMounts"])
    executor_files = mounted_secret_files(volumes, executor["volumeMounts"])
    assert driver_files[secret_file] == expected_auth
    assert executor_files[secret_file] == expected_auth
    assert sorted(executor_files.values()) == [
        (REDIS_SECRET, "ca.crt"),
        (SPARK_AUTH_SECRET, "secret"),
    ]
    assert "secrets" not in executor and "env" not in executor and "envFrom" not in executor
    assert env_secret_refs(driver) == [(REDIS_SECRET, "password")]


def referenced_secret_keys(objects: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(Secret, key) of every env var and Secret volume item any pod of `objects` uses."""
    found: set[tuple[str, str]] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("secretKeyRef")
            if ref is not None:
                found.add((ref["name"], ref["key"]))
            source = node.get("secret")
            if isinstance(source, dict) and "secretName" in source:
                found.update((source["secretName"], item["key"]) for item in source["items"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for obj in objects:
        walk(obj.get("spec", {}))
    template = executor_template(objects)
    if template is not None:
        walk(template["spec"])
    return found


def documented_secret_keys() -> set[tuple[str, str]]:
    """(Secret, key) of every `kubectl create secret generic` in the operator's guide."""
    text = OPERATIONS_DOC.read_text().replace("\\\n", " ")
    found = set()
    for name, args in re.findall(r"create secret generic (\S+)((?: +--from-\S+)+)", text):
        found.update((name, key) for key in re.findall(r"--from-(?:literal|file)=([\w.-]+)=", args))
    return found


@pytest.mark.parametrize("overlay", ["prod", "prod-spark-operator"])
def test_every_secret_key_prod_uses_is_one_the_guide_creates(rendered, overlay):
    """The Secrets prod needs are created out of band: a key the guide does not create
    leaves pods waiting in CreateContainerConfigError or ContainerCreating."""
    objects = rendered[overlay]
    assert not of_kind(objects, "Secret")
    used = referenced_secret_keys(objects)
    assert used == {
        (REDIS_SECRET, "password"),
        (REDIS_SECRET, "ca.crt"),
        (SPARK_AUTH_SECRET, "secret"),
    }
    assert used <= documented_secret_keys()


def test_dev_generates_every_secret_key_it_uses_under_the_names_the_pod_template_gives(rendered):
    objects = rendered["dev"]
    generated = {
        (secret["metadata"]["name"], key)
        for secret in of_kind(objects, "Secret")
        for key in secret.get("data", {})
    }
    # The Redis CA is for Redis over TLS, which dev does not use; its executors' volume of it
    # is optional.
    assert referenced_secret_keys(objects) - generated == {(REDIS_SECRET, "ca.crt")}
