"""The `adrec` command line as a user meets it, run as a process: every --help, the defaults
it shows, a wrong flag answered with its own subcommand's usage, and a bad --data refused
in one line before Spark starts."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from adrec.cli import build_parser

ADREC = (sys.executable, "-m", "adrec")


def adrec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ADREC, *args], capture_output=True, text=True, timeout=120, check=False)


def command_parsers() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command path (`()`, `("job",)`, `("job", "run")`, ...) and its parser."""
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}

    def walk(path: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
        found[path] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk((*path, name), sub)

    walk((), build_parser())
    return found


COMMANDS = command_parsers()


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "adrec")
def test_every_help_runs_and_shows_every_settings_default(path):
    result = adrec(*path, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(" ".join(("usage: adrec", *path)))
    settings = [action for action in COMMANDS[path]._actions if action.dest.startswith("setting_")]
    # Each setting's help ends with its default, after its own text (compared without
    # whitespace: argparse wraps lines, hyphenated words too).
    help_text = "".join(result.stdout.split())
    for action in settings:
        assert action.help is not None
        own = "".join(action.help.replace("%%", "%").split(" (default: ")[0].split())
        assert f"{own}(default:" in help_text, action.option_strings
    # Every other option with a default says what it is.
    for action in COMMANDS[path]._actions:
        if (
            action.option_strings
            and not action.dest.startswith("setting_")
            and action.default not in (None, False, [], argparse.SUPPRESS)
        ):
            assert "default" in (action.help or ""), action.option_strings


def test_the_job_help_shows_its_percent_signs_and_defaults():
    result = adrec("job", "run", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "auto: 40% of the machine's" in text
    assert "--job-local-memory ADREC_JOB_LOCAL_MEMORY JVM heap" in text
    assert "(default: auto)" in text
    assert "--redis-url REDIS_URL, --redis REDIS_URL" in text
    assert "(default: redis://127.0.0.1:6379/0)" in text


@pytest.mark.parametrize(
    ("args", "usage"),
    [
        (("job", "run", "--bogus", "1"), "adrec job run"),
        (("job", "--bogus", "run"), "adrec job"),
        (("serve", "gateway", "--recall-adress", "x"), "adrec serve gateway"),
        (("publish", "list", "--jsn"), "adrec publish list"),
        (("recommend", "7", "8"), "adrec recommend"),
    ],
)
def test_a_wrong_flag_is_refused_with_the_usage_of_its_own_subcommand(args, usage):
    result = adrec(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"usage: {usage} [-h]")
    unknown = [arg for arg in args if arg.startswith("--")] or ["8"]
    assert result.stderr.splitlines()[-1].startswith(
        f"{usage}: error: unrecognized arguments: {unknown[0]}"
    )


def test_a_bad_data_folder_is_refused_in_one_line_before_spark_starts(tmp_path: Path, redis_url):
    """Spark cannot start here at all (conftest points JAVA_HOME nowhere outside spark
    tests), so one line naming the folder proves the check came first."""
    redis = redis_url
    missing = tmp_path / "nowhere"
    result = adrec("job", "run", "--data", str(missing), "--redis", redis)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"adrec job: error: ADREC_JOB_DATA (--data) {missing}: no such folder"
    ]

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "raw_sample.csv").write_text("user,time_stamp,adgroup_id,pid,noclk,clk\n")
    result = adrec("job", "run", "--data", f"file://{partial}", "--redis", redis)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(
        f"adrec job: error: ADREC_JOB_DATA (--data) file://{partial}: missing "
        "ad_feature.csv, user_profile.csv, behavior_log.csv"
    )

    result = adrec(
        "job", "run", "--data", str(partial), "--job-input-format", "parquet", "--redis", redis
    )
    (line,) = result.stderr.splitlines()
    assert "missing raw_sample.parquet, " in line
    assert "adrec data convert writes them" in line
