"""Settings from env and flags: precedence, parsing, and errors that name the setting."""

import argparse
import dataclasses

import pytest

from adrec.core.settings import (
    SettingsError,
    add_flags,
    describe,
    env_names,
    load,
    parse_bool,
    parse_int,
    port_number,
    setting,
)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    port: int = setting(
        "ADREC_DEMO_PORT", 50051, "gRPC port", parse=parse_int, check=port_number(allow_zero=True)
    )
    verbose: bool = setting("ADREC_DEMO_VERBOSE", False, "Verbose logs", parse=parse_bool)
    token: str = setting("ADREC_DEMO_TOKEN", "", "API token", secret=True)

    def validate(self):
        return (
            ["ADREC_DEMO_TOKEN is required when verbose"] if self.verbose and not self.token else []
        )


def flags(*argv):
    parser = argparse.ArgumentParser()
    add_flags(DemoSettings, parser)
    return parser.parse_args(list(argv))


def test_defaults_env_and_flags_in_order_of_precedence():
    assert load(DemoSettings, env={}).port == 50051
    assert load(DemoSettings, env={"ADREC_DEMO_PORT": "7000"}).port == 7000
    chosen = load(DemoSettings, env={"ADREC_DEMO_PORT": "7000"}, flags=flags("--demo-port", "0"))
    assert chosen.port == 0


def test_every_bad_setting_is_named_in_one_error():
    with pytest.raises(SettingsError) as info:
        load(DemoSettings, env={"ADREC_DEMO_PORT": "http", "ADREC_DEMO_VERBOSE": "maybe"})
    message = str(info.value)
    assert "ADREC_DEMO_PORT='http': expected an integer" in message
    assert "ADREC_DEMO_VERBOSE='maybe'" in message
    assert len(info.value.problems) == 2


def test_range_checks_and_cross_field_validation():
    with pytest.raises(SettingsError, match="must be between 0 and 65535"):
        load(DemoSettings, env={"ADREC_DEMO_PORT": "70000"})
    with pytest.raises(SettingsError, match="required when verbose"):
        load(DemoSettings, env={"ADREC_DEMO_VERBOSE": "yes"})


def test_secrets_are_masked():
    loaded = load(DemoSettings, env={"ADREC_DEMO_TOKEN": "hunter2", "ADREC_DEMO_VERBOSE": "1"})
    assert describe(loaded)["ADREC_DEMO_TOKEN"] == "***"
    assert env_names(DemoSettings) == ["ADREC_DEMO_PORT", "ADREC_DEMO_VERBOSE", "ADREC_DEMO_TOKEN"]


def test_aliases_set_the_same_setting():
    from adrec.core.redis_conn import RedisSettings

    parser = argparse.ArgumentParser()
    add_flags(RedisSettings, parser)
    chosen = load(RedisSettings, env={}, flags=parser.parse_args(["--redis", "redis://h:1/0"]))
    assert chosen.url == "redis://h:1/0"


@dataclasses.dataclass(frozen=True)
class HelpSettings:
    share: float = setting("ADREC_HELP_SHARE", 0.4, "Heap share: 40% of memory", parse=float)
    token: str = setting("ADREC_HELP_TOKEN", "s3cret", "API token", secret=True)
    name: str = setting("ADREC_HELP_NAME", "", "A name")
    on: bool = setting("ADREC_HELP_ON", False, "Switch", parse=parse_bool)


def test_flag_help_shows_each_default_and_keeps_percent_signs():
    parser = argparse.ArgumentParser(prog="demo")
    add_flags(HelpSettings, parser)
    text = " ".join(parser.format_help().split())
    assert "Heap share: 40% of memory (default: 0.4)" in text
    assert "API token (default: ***)" in text
    assert "s3cret" not in text
    assert "A name (default: empty)" in text
    assert "Switch (default: false)" in text
    # The flags' own defaults stay unset, so an absent flag leaves env and defaults alone.
    assert (
        load(HelpSettings, env={"ADREC_HELP_SHARE": "0.5"}, flags=parser.parse_args([])).share
        == 0.5
    )
