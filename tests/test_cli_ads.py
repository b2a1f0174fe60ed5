"""`adrec ads` against a real admin service: pause, show, history, resume, and bad input
refused naming the flag."""

from __future__ import annotations

import asyncio

from service_data import ADREC, publish_version, run, running_stack

from adrec.cli.ads import parse_time
from adrec.core import keys


async def adrec_ads(port: int, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *ADREC,
        "ads",
        *args,
        "--admin",
        f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode, out.decode(), err.decode()


def test_pause_show_history_and_resume(redis_client, redis_url):
    data = publish_version(redis_client)
    ad = int(data.ads["adgroup_id"][0])
    campaign = int(data.ads["campaign_id"][0])

    async def scenario():
        async with running_stack(redis_url, "admin") as stack:
            port = stack.services["admin"].port
            code, out, _ = await adrec_ads(
                port, "pause", "--campaign", str(campaign), "--reason", "budget spent"
            )
            assert code == 0
            assert out.startswith(f"change 1: campaign {campaign} paused (paused now)")
            code, out, _ = await adrec_ads(port, "show", "--adgroup", str(ad))
            assert code == 0
            assert out.splitlines()[0].startswith(f"adgroup {ad}: PAUSED now (under campaign")
            assert "budget spent" in out
            code, out, _ = await adrec_ads(
                port,
                "resume",
                "--campaign",
                str(campaign),
                "--reason",
                "topped up",
                "--end",
                "2286-01-01T00:00:00",
            )
            assert code == 0 and "active from - until 2286-01-01T00:00:00Z" in out
            code, out, _ = await adrec_ads(port, "history", "--campaign", str(campaign))
            assert code == 0
            assert [line.split(":")[0] for line in out.splitlines()] == ["change 2", "change 1"]
            code, out, _ = await adrec_ads(port, "show")
            assert code == 0 and out.count("\n") == 1 and f"campaign {campaign} active" in out

    run(scenario)


def test_bad_input_names_the_flag_and_changes_nothing(redis_client, redis_url):
    data = publish_version(redis_client)
    ad = str(int(data.ads["adgroup_id"][0]))

    async def scenario():
        async with running_stack(redis_url, "admin") as stack:
            port = stack.services["admin"].port
            for args, named in (
                (
                    (
                        "--adgroup",
                        ad,
                        "--reason",
                        "x",
                        "--start",
                        "2030-01-02",
                        "--end",
                        "2030-01-01",
                    ),
                    "--end:",
                ),
                (("--adgroup", ad, "--reason", " "), "--reason:"),
                (("--adgroup", ad, "--reason", "x", "--start", "tomorrow"), "--start:"),
                (("--campaign", "99999999", "--reason", "x"), "--campaign: 99999999 is not"),
                (("--customer", "-4", "--reason", "x"), "--customer:"),
            ):
                code, _out, err = await adrec_ads(port, "pause", *args)
                assert code == 2, (args, err)
                assert named in err and "Traceback" not in err
            assert redis_client.exists(keys.AD_STATE) == 0
            code, _, err = await adrec_ads(port, "history", "--limit", "0")
            assert code == 2 and "--limit:" in err

    run(scenario)


def test_an_unreachable_admin_service_is_one_line():
    async def scenario():
        code, _, err = await adrec_ads(1, "show")
        assert code == 1
        assert err.startswith("adrec ads: error: cannot use the admin service at 127.0.0.1:1")
        assert len(err.strip().splitlines()) == 1

    run(scenario)


def test_times_are_unix_seconds_or_iso_8601():
    assert parse_time("--end", None) == 0
    assert parse_time("--end", "1717171717") == 1717171717
    assert parse_time("--end", "2024-05-31T16:08:37Z") == 1717171717
    assert parse_time("--end", "2024-05-31T18:08:37+02:00") == 1717171717
    assert parse_time("--end", "2024-05-31T16:08:37") == 1717171717
