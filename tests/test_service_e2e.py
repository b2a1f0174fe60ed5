"""The services on data published by the real batch job (synthetic `tiny` preset, local Spark).

The job runs once for the module, into its own redis-server; every test then serves that
version through the real recall, ranking and gateway services over loopback gRPC.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import redis
from grpc_helpers import loopback_channel
from service_data import PIDS, path, rank, reasons, recommend, run, running_stack

from adrec.api.gateway.v1 import gateway_service_pb2 as gateway_pb2
from adrec.cli import main
from adrec.core import keys, store
from adrec.core.features import feature_spec
from adrec.core.redis_server import private_redis
from jobs.config import JobConfig
from jobs.offline import OFFLINE_PID

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def published(published_tiny):
    """A private copy of the version the session's spark-submit run published.

    These tests change users; the copy keeps the job's own tests reading pristine data.
    """
    source = redis.Redis.from_url(published_tiny.redis.url)
    with private_redis() as server:
        client = redis.Redis.from_url(server.url)
        pipe = client.pipeline(transaction=False)
        for key in source.scan_iter(count=1000):
            pipe.restore(key, 0, source.dump(key))
        pipe.execute()
        source.close()
        version = published_tiny.version
        offline_users = sorted(
            int(key.decode().rsplit(":", 1)[1])
            for key in client.scan_iter(match=f"adrec:{version}:offline:*".encode())
        )
        yield {
            "url": server.url,
            "client": client,
            "version": version,
            "config": JobConfig(data=str(published_tiny.data_dir)),
            "offline_users": offline_users,
        }
        client.close()


def test_the_job_published_what_the_services_serve(published):
    assert published["version"] is not None
    assert len(published["offline_users"]) > 1000


def test_recommend_serves_the_jobs_version_in_both_modes(published):
    client, version = published["client"], published["version"]
    spec_id = feature_spec(published["config"].feature_set).spec_id

    async def scenario():
        async with (
            running_stack(published["url"]) as stack,
            loopback_channel(stack.services["gateway"].port) as channel,
        ):
            for user in published["offline_users"][:20]:
                for pid in PIDS:
                    realtime = await recommend(channel, user_id=user, pid=pid, count=10)
                    assert path(realtime) == "REALTIME_RANKED", reasons(realtime)
                    assert len(realtime.ads) == 10
                    ctrs = [ad.ctr for ad in realtime.ads]
                    assert ctrs == sorted(ctrs, reverse=True) and 0 < ctrs[-1] <= ctrs[0] < 1
                    assert realtime.data_version == version
                    assert realtime.model_version == f"{version}/{spec_id}"
                    recall = store.read_recall_list(client, version, user).tolist()
                    assert {ad.ad_id for ad in realtime.ads} <= set(recall)

                    offline = await recommend(
                        channel,
                        user_id=user,
                        pid=pid,
                        count=10,
                        mode=gateway_pb2.RECOMMEND_MODE_OFFLINE,
                    )
                    assert path(offline) == "OFFLINE_RANKED"
                    stored_ids, _ = store.read_offline_list(client, version, user)
                    assert [ad.ad_id for ad in offline.ads] == stored_ids[:10].tolist()
                    assert offline.model_version == realtime.model_version

            stranger = await recommend(channel, user_id=2_000_000, pid=PIDS[1], count=5)
            assert path(stranger) == "POPULAR" and reasons(stranger) == ["NO_RECALL_SET"]
            popular = store.read_popular(client, version, PIDS[1])
            assert [ad.ad_id for ad in stranger.ads] == popular[:5].tolist()

    run(scenario, timeout=60)


def test_realtime_ranking_equals_the_jobs_offline_scoring(published):
    client, version = published["client"], published["version"]

    async def scenario():
        async with (
            running_stack(published["url"], "ranking") as stack,
            loopback_channel(stack.services["ranking"].port) as channel,
        ):
            for user in published["offline_users"][::40]:
                stored_ids, stored_ctrs = store.read_offline_list(client, version, user)
                candidates = store.read_recall_list(client, version, user).tolist()
                ranked = await rank(
                    channel, user_id=user, pid=OFFLINE_PID, ad_ids=candidates, top_k=len(stored_ids)
                )
                assert [ad.ad_id for ad in ranked.ads] == stored_ids.tolist()
                realtime_ctrs = np.array([ad.ctr for ad in ranked.ads], dtype=np.float32)
                # The job stores float16 CTRs: equal once rounded the same way.
                np.testing.assert_array_equal(
                    realtime_ctrs.astype(np.float16), stored_ctrs.astype(np.float16)
                )

    run(scenario, timeout=60)


def test_cli_updates_of_one_user_change_the_next_answer(published, capsys):
    client, version, url = published["client"], published["version"], published["url"]
    user = published["offline_users"][7]

    async def scenario():
        async with (
            running_stack(url) as stack,
            loopback_channel(stack.services["gateway"].port) as channel,
        ):
            before = await recommend(channel, user_id=user, pid=PIDS[0], count=5)
            ads = store.read_ad_table(client, version)["adgroup_id"]
            new_recall = ads[:30].tolist()
            assert (
                main(
                    [
                        "publish",
                        "update-user",
                        str(user),
                        "--recall",
                        ",".join(map(str, new_recall)),
                        "--redis",
                        url,
                    ]
                )
                == 0
            )
            after_recall = await recommend(channel, user_id=user, pid=PIDS[0], count=5)
            assert path(after_recall) == "REALTIME_RANKED"
            assert {ad.ad_id for ad in after_recall.ads} <= set(new_recall)
            assert [ad.ad_id for ad in after_recall.ads] != [ad.ad_id for ad in before.ads]

            profile = store.read_user_features(client, version, user).profile
            changes = [
                f"age_level={(int(np.nan_to_num(profile['age_level'])) + 3) % 7}",
                f"shopping_level={1 if profile['shopping_level'] != 1 else 3}",
                "pvalue_level=missing"
                if not np.isnan(profile["pvalue_level"])
                else "pvalue_level=2",
            ]
            assert (
                main(
                    [
                        "publish",
                        "update-user",
                        str(user),
                        "--redis",
                        url,
                        *[arg for change in changes for arg in ("--profile", change)],
                    ]
                )
                == 0
            )
            after_profile = await recommend(channel, user_id=user, pid=PIDS[0], count=5)
            assert [ad.ctr for ad in after_profile.ads] != [ad.ctr for ad in after_recall.ads]
            assert {ad.ad_id for ad in after_profile.ads} <= set(new_recall)
        capsys.readouterr()

    run(scenario, timeout=60)


def test_bad_input_is_refused_on_the_jobs_data_too(published):
    async def scenario():
        async with (
            running_stack(published["url"]) as stack,
            loopback_channel(stack.services["gateway"].port) as channel,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await recommend(channel, user_id=published["offline_users"][0], pid="nope", count=5)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert published["client"].exists(keys.ACTIVE_VERSION)

    run(scenario)
