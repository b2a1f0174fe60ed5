"""The batch job in the overlays: the spark-submit CronJob, and the Spark Operator variant."""

from __future__ import annotations

import itertools
import tomllib
from pathlib import Path

import pytest
from deploy_helpers import JOB_MAIN, REPO, named, of_kind


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_the_cronjob_runs_spark_submit_in_kubernetes_mode(rendered, overlay):
    objects = rendered[overlay]
    cron = named(objects, "CronJob", "adrec-job")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["startingDeadlineSeconds"] > 0
    assert cron["successfulJobsHistoryLimit"] >= 1 and cron["failedJobsHistoryLimit"] >= 1
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (driver,) = pod["containers"]
    args = driver["args"]
    assert args[0] == "spark-submit"
    options = dict(zip(args[1::2], args[2::2], strict=False))
    assert options["--master"] == "k8s://https://kubernetes.default.svc"
    assert options["--deploy-mode"] == "client"
    main = args.index(JOB_MAIN)
    confs = dict(
        conf.split("=", 1) for flag, conf in itertools.pairwise(args[:main]) if flag == "--conf"
    )
    assert confs["spark.kubernetes.container.image"] == "$(SUBMIT_IMAGE)"
    image_env = next(var for var in driver["env"] if var["name"] == "SUBMIT_IMAGE")
    assert image_env["value"] == driver["image"], "executors must run the driver's image"
    assert confs["spark.kubernetes.namespace"] == "$(POD_NAMESPACE)"
    assert (
        confs["spark.kubernetes.authenticate.driver.serviceAccountName"]
        == pod["serviceAccountName"]
        == "adrec-job"
    )
    assert confs["spark.kubernetes.driver.pod.name"] == "$(POD_NAME)"
    assert confs["spark.driver.host"] == "$(POD_IP)"
    for key in ("spark.executor.instances", "spark.executor.memory", "spark.executor.cores"):
        assert key in confs
    template_path = Path(confs["spark.kubernetes.executor.podTemplateFile"])
    mounts = {m["mountPath"]: m["name"] for m in driver["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    template_volume = volumes[mounts[str(template_path.parent)]]
    template_cm = named(objects, "ConfigMap", template_volume["configMap"]["name"])
    assert template_path.name in template_cm["data"]
    app_args = args[main + 1 :]
    assert app_args == ["--data", "$(ADREC_JOB_DATA)", "--redis", "$(REDIS_URL)"]

    # RBAC: the driver's ServiceAccount may manage its executors (and nothing more:
    # test_deploy_network.py).
    binding = named(objects, "RoleBinding", "adrec-job-spark")
    assert {"kind": "ServiceAccount", "name": "adrec-job"} in [
        {k: s[k] for k in ("kind", "name")} for s in binding["subjects"]
    ]
    role = named(objects, "Role", binding["roleRef"]["name"])
    granted = {
        (res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]
    }
    for resource in ("pods", "configmaps"):
        for verb in ("create", "get", "list", "watch", "delete"):
            assert (resource, verb) in granted, (resource, verb)


def test_the_spark_operator_variant_replaces_the_cronjob(rendered):
    objects = rendered["prod-spark-operator"]
    assert not of_kind(objects, "CronJob")
    ssa = named(objects, "ScheduledSparkApplication", "adrec-job")
    spec = ssa["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["schedule"] == named(rendered["prod"], "CronJob", "adrec-job")["spec"]["schedule"]
    template = spec["template"]
    for field in ("type", "sparkVersion", "mainApplicationFile", "driver", "executor"):
        assert field in template, f"required by the SparkApplication CRD: {field}"
    assert template["type"] == "Python" and template["mode"] == "cluster"
    assert template["mainApplicationFile"] == JOB_MAIN
    job_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["job"]
    assert f"pyspark=={template['sparkVersion']}" in job_extra, "the image's Spark version"
    prod_job_image = named(rendered["prod"], "CronJob", "adrec-job")["spec"]["jobTemplate"]["spec"][
        "template"
    ]["spec"]["containers"][0]["image"]
    assert template["image"] == prod_job_image
    assert template["driver"]["serviceAccount"] == "adrec-job"
    assert template["executor"]["instances"] >= 1
