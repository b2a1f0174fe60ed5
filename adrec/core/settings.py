"""Typed settings read from environment variables and command-line flags.

A settings class is a frozen dataclass whose fields carry a :func:`setting`
declaration (env var name, help, parser, validator). :func:`load` reads the
environment, lets flags override it, validates every value and raises one
:class:`SettingsError` that names *every* bad setting, so a misconfigured pod
fails at start with a message an operator can act on.

Deploy manifests and docs read the env var names from these classes, so the
names live here only.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

_SETTING_KEY = "adrec_setting"


class SettingsError(ValueError):
    """One or more settings are invalid; the message lists each of them."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


@dataclasses.dataclass(frozen=True)
class SettingSpec:
    env: str
    help: str
    parse: Callable[[str], Any]
    check: Callable[[Any], str | None] | None = None
    secret: bool = False
    aliases: tuple[str, ...] = ()
    #: How a raw value appears in errors and logs, for values that can embed a secret.
    show: Callable[[str], str] | None = None

    def shown(self, raw: str) -> str:
        if self.secret:
            return "***"
        return repr(self.show(raw) if self.show is not None else raw)

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().removeprefix("adrec_").replace("_", "-")


def setting(
    env: str,
    default: Any,
    help: str,
    *,
    parse: Callable[[str], Any] = str,
    check: Callable[[Any], str | None] | None = None,
    secret: bool = False,
    aliases: tuple[str, ...] = (),
    show: Callable[[str], str] | None = None,
) -> Any:
    """Declare a dataclass field backed by env var ``env``, its flag and any flag aliases."""
    spec = SettingSpec(
        env=env, help=help, parse=parse, check=check, secret=secret, aliases=aliases, show=show
    )
    return dataclasses.field(default=default, metadata={_SETTING_KEY: spec})


def specs(cls: type) -> dict[str, SettingSpec]:
    """Field name -> declaration, for every setting of a settings class."""
    return {
        f.name: f.metadata[_SETTING_KEY]
        for f in dataclasses.fields(cls)
        if _SETTING_KEY in f.metadata
    }


def env_names(cls: type) -> list[str]:
    return [spec.env for spec in specs(cls).values()]


# ---------------------------------------------------------------- parsers


def parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected one of true/false, 1/0, yes/no, on/off")


def parse_int(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError("expected an integer") from None


def parse_float(raw: str) -> float:
    try:
        return float(raw.strip())
    except ValueError:
        raise ValueError("expected a number") from None


def in_range(low: float, high: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not low <= value <= high:
            return f"must be between {low} and {high}"
        return None

    return check


def port_number(allow_zero: bool = False) -> Callable[[Any], str | None]:
    low = 0 if allow_zero else 1
    return in_range(low, 65535)


def one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value not in choices:
            return f"must be one of {', '.join(choices)}"
        return None

    return check


# ---------------------------------------------------------------- loading


def add_flags(cls: type, parser: argparse.ArgumentParser) -> None:
    """Add one optional flag per setting; absent flags leave env/defaults alone.

    Each flag's help ends with the setting's default. The flag's own default stays None,
    so that an absent flag can be told from one repeating the default.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name, spec in specs(cls).items():
        # argparse formats help with %: a literal one ("40% of") must be doubled.
        text = f"{spec.help} (default: {_shown_default(spec, defaults[name])})"
        parser.add_argument(
            spec.flag,
            *spec.aliases,
            dest=f"setting_{name}",
            default=None,
            metavar=spec.env,
            help=text.replace("%", "%%"),
        )


def _shown_default(spec: SettingSpec, default: Any) -> str:
    if default in ("", ()):
        return "empty"
    if spec.secret:
        return "***"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    text = str(default)
    return spec.show(text) if spec.show is not None else text


def load(
    cls: type[T],
    env: Mapping[str, str] | None = None,
    flags: argparse.Namespace | None = None,
) -> T:
    """Build ``cls`` from defaults, then ``env``, then ``flags``; validate everything."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    problems: list[str] = []
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name, spec in specs(cls).items():
        flag_value = getattr(flags, f"setting_{name}", None) if flags is not None else None
        if flag_value is not None:
            raw, origin = flag_value, f"{spec.flag} (or {spec.env})"
        elif spec.env in env:
            raw, origin = env[spec.env], spec.env
        else:
            values[name] = defaults[name]
            continue
        shown = spec.shown(raw)
        try:
            value = spec.parse(raw)
        except ValueError as exc:
            problems.append(f"{origin}={shown}: {exc}")
            continue
        if spec.check is not None and (why := spec.check(value)) is not None:
            problems.append(f"{origin}={shown}: {why}")
            continue
        values[name] = value
    if problems:
        raise SettingsError(problems)
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if validate is not None and (cross_problems := validate()):
        raise SettingsError(cross_problems)
    return instance


def describe(instance: Any) -> dict[str, Any]:
    """Settings as a loggable dict, secrets masked."""
    out = {}
    for name, spec in specs(type(instance)).items():
        value = getattr(instance, name)
        if spec.secret and value:
            value = "***"
        elif spec.show is not None and isinstance(value, str):
            value = spec.show(value)
        out[spec.env] = value
    return out
