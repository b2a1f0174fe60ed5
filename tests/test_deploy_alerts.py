"""The alert rules under promtool: the unit tests in deploy/monitoring/tests/, and the
reload-failure alert on the series a real ranking service exports.

promtool reads plain rule files, not a PrometheusRule: the rule groups are taken out of
the manifest into a temporary folder at test time, next to copies of the unit tests, so the
manifest stays the one source of the rules. promtool comes from Debian's `prometheus`
package (`scripts/check-system --for-tests` installs it); without it these tests fail.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from deploy_helpers import DEPLOY, rule_groups
from prometheus_client.parser import text_string_to_metric_families
from service_data import (
    metric,
    mismatched_model_json,
    publish_version,
    random_model,
    run,
    running_stack,
    wait_until,
)

RULE_TESTS = DEPLOY / "monitoring" / "tests"
#: Where the unit tests' `rule_files` find the extracted rule groups, out of the way of a
#: `promtool test rules *.yaml` beside them.
RULES_FILE = "rules/adrec.yaml"
PROMTOOL_HINT = (
    "promtool is needed to test the alert rules: install Prometheus "
    "(Debian/Ubuntu: apt-get install prometheus; macOS: brew install prometheus), "
    "or run scripts/check-system --for-tests as root"
)


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("promtool")
    if executable is None:
        pytest.fail(PROMTOOL_HINT, pytrace=False)
    return subprocess.run(
        [executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def alert_rules() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in rule_groups() for rule in group["rules"]}


def unit_test_files() -> list[Path]:
    files = sorted(RULE_TESTS.glob("*.yaml"))
    assert files, f"no promtool unit tests in {RULE_TESTS}"
    return files


def write_rules(directory: Path) -> None:
    """The PrometheusRule's rule groups, as a plain rule file, at RULES_FILE in `directory`."""
    rules = directory / RULES_FILE
    rules.parent.mkdir(parents=True, exist_ok=True)
    rules.write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """A folder holding the extracted rules and a copy of each unit test."""
    write_rules(tmp_path)
    for test_file in unit_test_files():
        shutil.copy(test_file, tmp_path / test_file.name)
    return tmp_path


def test_the_rules_taken_out_of_the_prometheusrule_pass_promtool_check(rules_dir):
    result = promtool("check", "rules", RULES_FILE, cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_the_promtool_unit_tests_of_the_alerts_pass(rules_dir):
    names = [path.name for path in unit_test_files()]
    result = promtool("test", "rules", *names, cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(names), result.stdout


def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_stays_silent():
    firing: set[str] = set()
    silent: set[str] = set()
    for test_file in unit_test_files():
        document = yaml.safe_load(test_file.read_text())
        assert document["rule_files"] == [RULES_FILE], test_file.name
        for group in document["tests"]:
            for case in group.get("alert_rule_test", []):
                # promtool expects nothing of an alert the rules lack: a misspelt name
                # would pass as silent.
                assert case["alertname"] in alert_rules(), (test_file.name, case["alertname"])
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    assert sorted(set(alert_rules()) - firing) == [], "alerts no unit test sees firing"
    assert sorted(set(alert_rules()) - silent) == [], "alerts no unit test sees silent"


# ------------------------------------------------------------------ a real ranking service

#: Target labels Prometheus would add to the ranking pod's series.
TARGET = {"namespace": "adrec", "job": "adrec-ranking", "pod": "adrec-ranking-0"}
RELOAD_FAILURES = "adrec_model_reload_failures_total"


def reload_failure_samples(port: int) -> dict[tuple[tuple[str, str], ...], float]:
    """Label set -> value of each adrec_model_reload_failures_total sample on /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == RELOAD_FAILURES
    }


def render_labels(template: str, labels: dict[str, str]) -> str:
    """An annotation template whose only placeholders are `{{ $labels.<name> }}`."""
    rendered = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m.group(1)], template)
    assert "{{" not in rendered, f"a placeholder this test cannot render: {template}"
    return rendered


def test_a_pods_first_refused_version_fires_the_reload_alert(redis_client, redis_url, tmp_path):
    """Scraped before and after the refusal, the ranking service's series go from 0 to 1,
    an increase promtool's evaluation of AdrecModelReloadFailed sees. A counter born at
    its first refusal would go from absent to 1, which increase() does not count."""
    publish_version(redis_client, seed=1)
    scrapes: list[dict[tuple[tuple[str, str], ...], float]] = []

    async def scenario():
        async with running_stack(redis_url, "ranking") as stack:
            scrapes.append(await asyncio.to_thread(reload_failure_samples, stack.metrics_port))
            await asyncio.to_thread(
                publish_version,
                redis_client,
                seed=2,
                model_json=mismatched_model_json(random_model(np.random.default_rng(2))),
            )
            await wait_until(
                lambda: (
                    metric(
                        stack,
                        RELOAD_FAILURES,
                        adrec_service="ranking",
                        reason="model_spec_mismatch",
                    )
                    == 1
                )
            )
            scrapes.append(await asyncio.to_thread(reload_failure_samples, stack.metrics_port))

    run(scenario)
    before, after = scrapes
    assert 1.0 in after.values()

    # Ten scrapes a minute apart before the refusal, ten after it; `_` is a missing sample.
    def values(scrape: dict[tuple[tuple[str, str], ...], float], labels: Any) -> list[str]:
        return [f"{scrape[labels]:g}" if labels in scrape else "_"] * 10

    input_series = []
    for labels in sorted(before.keys() | after.keys()):
        matchers = ", ".join(f'{k}="{v}"' for k, v in sorted({**dict(labels), **TARGET}.items()))
        input_series.append(
            {
                "series": f"{RELOAD_FAILURES}{{{matchers}}}",
                "values": " ".join(values(before, labels) + values(after, labels)),
            }
        )
    rule = alert_rules()["AdrecModelReloadFailed"]
    alert_labels = {
        "namespace": TARGET["namespace"],
        "job": TARGET["job"],
        "reason": "model_spec_mismatch",
    }
    unit_test = {
        "rule_files": [RULES_FILE],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": input_series,
                "alert_rule_test": [
                    {"eval_time": "9m", "alertname": rule["alert"], "exp_alerts": []},
                    {
                        "eval_time": "12m",
                        "alertname": rule["alert"],
                        "exp_alerts": [
                            {
                                "exp_labels": {**alert_labels, **rule["labels"]},
                                "exp_annotations": {
                                    name: render_labels(text, alert_labels)
                                    for name, text in rule["annotations"].items()
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    write_rules(tmp_path)
    (tmp_path / "first-refusal.yaml").write_text(yaml.safe_dump(unit_test, sort_keys=False))
    result = promtool("test", "rules", "first-refusal.yaml", cwd=tmp_path)
    assert result.returncode == 0, f"series scraped: {input_series}\n{result.stdout}{result.stderr}"
