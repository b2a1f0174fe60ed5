"""`adrec serve recall|ranking|gateway|events|all`: run the gRPC services.

Each target reads its settings from env vars and flags (`adrec serve <target> --help`),
validated before anything starts. `all` runs every service in one process and one event
loop for local use; the gateway then talks to the recall and ranking services of that
process. Bound addresses are printed on stdout, JSON logs go to stderr.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, TypeVar

from adrec.cli import UsageError
from adrec.core import settings as settings_mod
from adrec.core.redis_conn import RedisSettings

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Settings = TypeVar("_Settings", bound="DataclassInstance")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from services.runtime.settings import SETTINGS

    parser = subparsers.add_parser(
        "serve",
        help="run the recall, ranking, gateway and event intake gRPC services",
        description=__doc__.split("\n\n", 1)[1],
    )
    targets = parser.add_subparsers(dest="target", required=True, metavar="SERVICE")
    for target, settings_class in SETTINGS.items():
        sub = targets.add_parser(
            target,
            help="every service in one process (local use)"
            if target == "all"
            else "the event intake service"
            if target == "events"
            else f"the {target} service",
        )
        settings_mod.add_flags(settings_class, sub)
        settings_mod.add_flags(RedisSettings, sub)
        sub.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from services import process
    from services.runtime import loop
    from services.runtime.logs import configure_logging
    from services.runtime.settings import SETTINGS

    problems: list[str] = []
    service_settings = _load(SETTINGS[args.target], args, problems)
    redis_settings = _load(RedisSettings, args, problems)
    if service_settings is None or redis_settings is None:
        raise UsageError(str(settings_mod.SettingsError(problems)))
    configure_logging(
        service_settings.log_level, service="adrec" if args.target == "all" else args.target
    )
    return loop.run(process.run(args.target, service_settings, redis_settings))


def _load(
    settings_class: type[_Settings], args: argparse.Namespace, problems: list[str]
) -> _Settings | None:
    """The validated settings, or None with what is wrong with them added to ``problems``."""
    try:
        return settings_mod.load(settings_class, flags=args)
    except settings_mod.SettingsError as error:
        problems += error.problems
        return None
