"""`adrec publish`: list versions, roll back, and update one user in the active version."""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Callable

import numpy as np
import redis
import redis.cluster

from adrec.cli import UsageError
from adrec.core import settings
from adrec.core.features import USER_PROFILE_FIELDS
from adrec.core.redis_conn import RedisSettings, connect, redis_problem

MAX_RECALL_IDS = 1000


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("publish", help="list, roll back or patch published versions")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="kept versions, newest first")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_using_redis(_list))

    back = actions.add_parser("rollback", help="make an older kept version active again")
    back.add_argument("version", help="version id, e.g. v17")
    back.set_defaults(handler=_using_redis(_rollback))

    update = actions.add_parser(
        "update-user",
        help="replace one user's recall list and/or profile fields in the active version",
        description="Real-time updates: the next request for the user sees the change.",
    )
    update.add_argument("user_id", type=int)
    update.add_argument("--recall", help="comma-separated ad ids, in recall order")
    update.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help=f"set a profile field (one of {', '.join(USER_PROFILE_FIELDS)}); "
        "VALUE is an integer or 'missing'; repeatable",
    )
    update.set_defaults(handler=_using_redis(_update_user))

    for sub in (listing, back, update):
        settings.add_flags(RedisSettings, sub)


def _settings(args: argparse.Namespace) -> RedisSettings:
    try:
        return settings.load(RedisSettings, flags=args)
    except settings.SettingsError as exc:
        raise UsageError(str(exc)) from None


def _client(args: argparse.Namespace) -> redis.Redis | redis.cluster.RedisCluster:
    return connect(_settings(args))


def _using_redis(
    action: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """`action`, with a Redis that cannot be used (refused, silent, not Redis at all)
    reported as one line naming its URL, exit code 1."""

    @functools.wraps(action)
    def run(args: argparse.Namespace) -> int:
        try:
            return action(args)
        except redis.RedisError as exc:
            # The client exists, so the settings it came from load.
            problem = redis_problem(exc, _settings(args))
            print(f"adrec publish: error: {problem}", file=sys.stderr)
            return 1

    return run


def _list(args: argparse.Namespace) -> int:
    from adrec.core.catalog import version_summaries

    summaries = version_summaries(_client(args))
    if args.json:
        rows = [{"active": active, **json.loads(meta.to_json())} for meta, active in summaries]
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    if not summaries:
        print("no published versions")
        return 0
    print(f"{'':2}{'version':<9}{'created (UTC)':<27}{'users':>9}{'memory MB':>11}  config")
    for meta, active in summaries:
        counts = meta.content.counts
        print(
            f"{'* ' if active else '  '}{meta.version:<9}{meta.created_at:<27}"
            f"{counts.recall_lists or counts.users:>9}{meta.memory_bytes / 1e6:>11.1f}"
            f"  {meta.content.config_digest[:12]}"
        )
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from adrec.core.catalog import PublishLockedError, rollback
    from adrec.core.store import VersionNotFoundError

    try:
        previous = rollback(_client(args), args.version)
    except (ValueError, VersionNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    except PublishLockedError as exc:
        print(f"adrec publish: error: {exc}; roll back after it finishes", file=sys.stderr)
        return 1
    print(f"active version: {args.version} (was {previous})")
    return 0


def _parse_recall(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--recall must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise UsageError("--recall needs at least one ad id")
    if len(ids) > MAX_RECALL_IDS:
        raise UsageError(f"--recall has {len(ids)} ids; at most {MAX_RECALL_IDS}")
    if min(ids) <= 0 or max(ids) > 2**31 - 1:
        raise UsageError("--recall ad ids must be positive 32-bit integers")
    if len(set(ids)) != len(ids):
        raise UsageError("--recall ad ids must be distinct")
    return ids


def _parse_profile(assignments: list[str]) -> dict[str, float]:
    profile: dict[str, float] = {}
    for assignment in assignments:
        field, sep, value = assignment.partition("=")
        if not sep or field not in USER_PROFILE_FIELDS:
            raise UsageError(
                f"--profile {assignment!r}: expected FIELD=VALUE with FIELD one of "
                f"{', '.join(USER_PROFILE_FIELDS)}"
            )
        if value == "missing":
            profile[field] = math.nan
        elif value.isdigit() and int(value) <= 127:
            profile[field] = float(value)
        else:
            raise UsageError(f"--profile {assignment!r}: VALUE must be 0..127 or 'missing'")
    return profile


def _update_user(args: argparse.Namespace) -> int:
    from adrec.core import store
    from adrec.core.codecs import UserFeatures

    if args.user_id <= 0:
        raise UsageError(f"user_id must be positive, got {args.user_id}")
    if args.recall is None and not args.profile:
        raise UsageError("nothing to update: give --recall and/or --profile")
    recall = _parse_recall(args.recall) if args.recall is not None else None
    profile_changes = _parse_profile(args.profile)
    client = _client(args)
    version = store.active_version(client)
    if version is None:
        raise UsageError("no active version to update; run `adrec job run` first")
    if recall is not None:
        # Checked before anything is written: ads the version does not have would be
        # recalled, then dropped by ranking, every time.
        table = store.read_ad_table(client, version)
        known = table["adgroup_id"] if table is not None else np.zeros(0, dtype=np.int64)
        unknown = sorted(set(recall) - set(known.tolist()))
        if unknown:
            shown = ", ".join(map(str, unknown[:10])) + (", ..." if len(unknown) > 10 else "")
            raise UsageError(
                f"--recall names {len(unknown)} ads that version {version} does not have: {shown}"
            )
    writer = store.VersionWriter(client, version)
    if profile_changes:
        current = store.read_user_features(client, version, args.user_id) or UserFeatures.missing()
        updated = UserFeatures({**current.profile, **profile_changes}, current.als_factors)
        writer.put_user_features([args.user_id], [updated])
    if recall is not None:
        writer.put_recall_lists([args.user_id], [np.asarray(recall)])
    print(f"updated user {args.user_id} in {version}")
    return 0
