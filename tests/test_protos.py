"""The proto API: buf lint, the committed generated code, and the shape of the services."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from grpc_helpers import REPO_ROOT, buf_executable

from adrec.api.admin.v1 import admin_service_pb2, admin_service_pb2_grpc
from adrec.api.common.v1 import common_pb2
from adrec.api.events.v1 import event_service_pb2, event_service_pb2_grpc
from adrec.api.gateway.v1 import gateway_service_pb2, gateway_service_pb2_grpc
from adrec.api.ranking.v1 import ranking_service_pb2, ranking_service_pb2_grpc
from adrec.api.recall.v1 import recall_service_pb2, recall_service_pb2_grpc

GENERATE = REPO_ROOT / "protos" / "generate.py"
PROTOSET = REPO_ROOT / "protos" / "adrec.protoset.binpb"
API_MODULES = (
    common_pb2,
    recall_service_pb2,
    ranking_service_pb2,
    gateway_service_pb2,
    event_service_pb2,
    admin_service_pb2,
)

INT64 = FieldDescriptor.TYPE_INT64
INT32 = FieldDescriptor.TYPE_INT32
STRING = FieldDescriptor.TYPE_STRING
FLOAT = FieldDescriptor.TYPE_FLOAT
DOUBLE = FieldDescriptor.TYPE_DOUBLE
BOOL = FieldDescriptor.TYPE_BOOL
ENUM = FieldDescriptor.TYPE_ENUM
MESSAGE = FieldDescriptor.TYPE_MESSAGE


def run_generate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATE), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def run_buf(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [buf_executable(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --- generated code ---------------------------------------------------------------------------


def test_committed_generated_code_is_up_to_date():
    result = run_generate("--check")
    assert result.returncode == 0, f"stale generated code:\n{result.stderr}"


def test_check_reports_changed_missing_and_extra_files(tmp_path: Path):
    out = tmp_path / "api"
    assert run_generate("--out", str(out)).returncode == 0
    assert run_generate("--check", "--out", str(out)).returncode == 0

    changed = out / "recall" / "v1" / "recall_service_pb2.py"
    changed.write_text(changed.read_text() + "# edited by hand\n")
    (out / "ranking" / "v1" / "ranking_service_pb2.pyi").unlink()
    (out / "gateway" / "v1" / "removed_service_pb2_grpc.py").write_text("")
    (out / "common" / "v1" / "__init__.py").unlink()

    result = run_generate("--check", "--out", str(out))

    assert result.returncode == 1
    reported = set(result.stderr.splitlines())
    assert {
        "differs: recall/v1/recall_service_pb2.py",
        "missing: ranking/v1/ranking_service_pb2.pyi",
        "extra: gateway/v1/removed_service_pb2_grpc.py",
        "missing: common/v1/__init__.py",
    } <= reported


def test_generation_repairs_the_tree_and_keeps_package_markers(tmp_path: Path):
    out = tmp_path / "api"
    assert run_generate("--out", str(out)).returncode == 0
    marker = out / "recall" / "v1" / "__init__.py"
    marker.write_text('"""Hand-written package docstring."""\n')
    stale = out / "recall" / "v1" / "retired_service_pb2.py"
    stale.write_text("")

    assert run_generate("--out", str(out)).returncode == 0

    assert not stale.exists()
    assert marker.read_text() == '"""Hand-written package docstring."""\n'
    assert run_generate("--check", "--out", str(out)).returncode == 0


def test_check_reports_a_stale_or_missing_protoset(tmp_path: Path):
    protoset = tmp_path / "adrec.protoset.binpb"
    assert run_generate("--check", "--protoset", str(protoset)).stderr.splitlines()[0] == (
        "missing: adrec.protoset.binpb"
    )
    protoset.write_bytes(PROTOSET.read_bytes() + b"\x00")
    result = run_generate("--check", "--protoset", str(protoset))
    assert result.returncode == 1
    assert "differs: adrec.protoset.binpb" in result.stderr.splitlines()


def leading_comments(file: descriptor_pb2.FileDescriptorProto) -> dict[str, str]:
    """Full name of each service, method, message, field, enum and enum value -> its comment."""
    by_path = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}
    found = {}
    package = file.package
    for i, service in enumerate(file.service):
        found[f"{package}.{service.name}"] = by_path.get((6, i), "")
        for j, method in enumerate(service.method):
            found[f"{package}.{service.name}.{method.name}"] = by_path.get((6, i, 2, j), "")
    for i, message in enumerate(file.message_type):
        found[f"{package}.{message.name}"] = by_path.get((4, i), "")
        for j, field in enumerate(message.field):
            found[f"{package}.{message.name}.{field.name}"] = by_path.get((4, i, 2, j), "")
    for i, enum in enumerate(file.enum_type):
        found[f"{package}.{enum.name}"] = by_path.get((5, i), "")
        for j, value in enumerate(enum.value):
            found[f"{package}.{value.name}"] = by_path.get((5, i, 2, j), "")
    return found


def test_the_protoset_holds_every_proto_with_its_comments():
    """What `grpcurl -protoset ... describe` shows; reflection serves no comments."""
    files = descriptor_pb2.FileDescriptorSet.FromString(PROTOSET.read_bytes()).file
    assert sorted(file.name for file in files) == sorted(
        module.DESCRIPTOR.name for module in API_MODULES
    )
    comments: dict[str, str] = {}
    for file in files:
        comments.update(leading_comments(file))
    assert len(comments) > 60
    assert [name for name, comment in comments.items() if not comment.strip()] == []
    recommend = comments["adrec.gateway.v1.GatewayService.Recommend"]
    assert "google.rpc.BadRequest" in recommend
    assert "0 (unset) means 10" in comments["adrec.gateway.v1.RecommendRequest.count"]


def test_generated_modules_import_under_adrec_api_with_proto_file_names():
    for module in API_MODULES:
        assert module.__name__.startswith("adrec.api.")
        proto_package_path = module.__name__.replace("adrec.api.", "adrec.", 1).replace(".", "/")
        assert module.DESCRIPTOR.name == proto_package_path.removesuffix("_pb2") + ".proto"
        for message in module.DESCRIPTOR.message_types_by_name:
            assert getattr(module, message).__module__ == module.__name__
    assert [dependency.name for dependency in recall_service_pb2.DESCRIPTOR.dependencies] == [
        "adrec/common/v1/common.proto"
    ]


# --- buf ----------------------------------------------------------------------------------------


def test_buf_lint_standard_passes():
    result = run_buf("lint", "protos")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_protos_are_buf_formatted():
    result = run_buf("format", "--diff", "--exit-code", "protos")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_message_field_enum_value_and_rpc_is_documented():
    """The comments are the API docs that reflection and buf show, so none may be missing."""
    comments_only = '{"version":"v2","lint":{"use":["COMMENTS"]}}'
    # An inline --config describes a module at ".", so buf must run inside the module.
    result = run_buf("lint", "--config", comments_only, cwd=REPO_ROOT / "protos")
    assert result.returncode == 0, result.stdout + result.stderr


# --- API shape ----------------------------------------------------------------------------------


def fields(message) -> dict[str, tuple[int, bool]]:
    """Field name -> (type, repeated)."""
    return {field.name: (field.type, field.is_repeated) for field in message.DESCRIPTOR.fields}


@pytest.mark.parametrize(
    ("module", "grpc_module", "full_name", "method"),
    [
        (
            recall_service_pb2,
            recall_service_pb2_grpc,
            "adrec.recall.v1.RecallService",
            "GetCandidates",
        ),
        (
            ranking_service_pb2,
            ranking_service_pb2_grpc,
            "adrec.ranking.v1.RankingService",
            "RankCandidates",
        ),
        (
            gateway_service_pb2,
            gateway_service_pb2_grpc,
            "adrec.gateway.v1.GatewayService",
            "Recommend",
        ),
        (
            event_service_pb2,
            event_service_pb2_grpc,
            "adrec.events.v1.EventService",
            "ReportEvents",
        ),
    ],
)
def test_each_service_has_one_unary_method(module, grpc_module, full_name, method):
    (descriptor,) = module.DESCRIPTOR.services_by_name.values()
    assert descriptor.full_name == full_name
    service = descriptor.name
    assert list(descriptor.methods_by_name) == [method]
    rpc = descriptor.methods_by_name[method]
    assert rpc.input_type is getattr(module, f"{method}Request").DESCRIPTOR
    assert rpc.output_type is getattr(module, f"{method}Response").DESCRIPTOR
    assert not rpc.client_streaming
    assert not rpc.server_streaming
    assert callable(getattr(getattr(grpc_module, f"{service}Servicer"), method))
    assert callable(getattr(grpc_module, f"add_{service}Servicer_to_server"))
    assert hasattr(grpc_module, f"{service}Stub")


def test_common_types():
    assert fields(common_pb2.ScoredAd) == {
        "ad_id": (INT64, False),
        "ctr": (FLOAT, False),
        "pctr": (FLOAT, False),
        "bid": (FLOAT, False),
        "ecpm": (FLOAT, False),
    }
    # An unscored ad, or one without a bid, is told apart from a zero.
    for name in ("ctr", "pctr", "bid", "ecpm"):
        assert not common_pb2.ScoredAd(ad_id=1).HasField(name)
        assert common_pb2.ScoredAd(ad_id=1, **{name: 0.0}).HasField(name)
    assert common_pb2.RankBy.keys() == ["RANK_BY_UNSPECIFIED", "RANK_BY_PCTR", "RANK_BY_ECPM"]
    assert fields(common_pb2.FeatureContribution) == {
        "feature": (STRING, False),
        "column": (STRING, False),
        "margin": (DOUBLE, False),
    }
    assert common_pb2.CandidateSource.keys() == [
        "CANDIDATE_SOURCE_UNSPECIFIED",
        "CANDIDATE_SOURCE_PERSONAL",
        "CANDIDATE_SOURCE_POPULAR",
    ]


def test_recall_messages():
    assert fields(recall_service_pb2.GetCandidatesRequest) == {
        "user_id": (INT64, False),
        "pid": (STRING, False),
        "limit": (INT32, False),
        "request_id": (STRING, False),
    }
    assert fields(recall_service_pb2.GetCandidatesResponse) == {
        "ad_ids": (INT64, True),
        "source": (ENUM, False),
        "fallback_reason": (ENUM, False),
        "data_version": (STRING, False),
        "interest_count": (INT32, False),
    }
    response = recall_service_pb2.GetCandidatesResponse.DESCRIPTOR
    assert response.fields_by_name["source"].enum_type is common_pb2.CandidateSource.DESCRIPTOR


def test_ranking_messages():
    assert fields(ranking_service_pb2.RankCandidatesRequest) == {
        "user_id": (INT64, False),
        "pid": (STRING, False),
        "ad_ids": (INT64, True),
        "top_k": (INT32, False),
        "request_id": (STRING, False),
        "rank_by": (ENUM, False),
        "explain": (BOOL, False),
    }
    assert fields(ranking_service_pb2.RankCandidatesResponse) == {
        "ads": (MESSAGE, True),
        "model_version": (STRING, False),
        "data_version": (STRING, False),
        "unknown_ads_skipped": (INT32, False),
        "user_profile_found": (BOOL, False),
        "behaviour_counts_found": (BOOL, False),
        "explanations": (MESSAGE, True),
    }
    assert fields(ranking_service_pb2.AdExplanation) == {
        "ad_id": (INT64, False),
        "contributions": (MESSAGE, True),
    }
    ads = ranking_service_pb2.RankCandidatesResponse.DESCRIPTOR.fields_by_name["ads"]
    assert ads.message_type is common_pb2.ScoredAd.DESCRIPTOR


def test_gateway_messages():
    assert fields(gateway_service_pb2.RecommendRequest) == {
        "user_id": (INT64, False),
        "pid": (STRING, False),
        "count": (INT32, False),
        "mode": (ENUM, False),
        "request_id": (STRING, False),
        "exclude_ad_ids": (INT64, True),
        "frequency_caps": (MESSAGE, True),
        "diversity": (MESSAGE, False),
        "rank_by": (ENUM, False),
        "debug": (BOOL, False),
    }
    assert fields(gateway_service_pb2.FrequencyCap) == {
        "scope": (ENUM, False),
        "max_impressions": (INT32, False),
        "window_hours": (INT32, False),
    }
    assert fields(gateway_service_pb2.DiversityLimits) == {
        "max_per_category": (INT32, False),
        "max_per_brand": (INT32, False),
        "max_per_customer": (INT32, False),
    }
    assert fields(gateway_service_pb2.RecommendResponse) == {
        "ads": (MESSAGE, True),
        "serving_path": (ENUM, False),
        "degradation_reasons": (ENUM, True),
        "candidate_source": (ENUM, False),
        "mode": (ENUM, False),
        "data_version": (STRING, False),
        "model_version": (STRING, False),
        "request_id": (STRING, False),
        "filled_from": (MESSAGE, True),
        "filtered": (MESSAGE, True),
        "explanations": (MESSAGE, True),
        "rank_by": (ENUM, False),
    }
    assert fields(gateway_service_pb2.AdDebug) == {
        "ad_id": (INT64, False),
        "serving_path": (ENUM, False),
        "origin": (ENUM, False),
        "recall_position": (INT32, False),
        "als_category_rank": (INT32, False),
        "pctr": (FLOAT, False),
        "contributions": (MESSAGE, True),
    }
    assert fields(gateway_service_pb2.FillIn) == {
        "serving_path": (ENUM, False),
        "ads": (INT32, False),
    }
    assert fields(gateway_service_pb2.FilteredCount) == {
        "reason": (ENUM, False),
        "candidates": (INT32, False),
    }
    assert gateway_service_pb2.FilterReason.keys() == [
        "FILTER_REASON_UNSPECIFIED",
        "FILTER_REASON_PAUSED",
        "FILTER_REASON_CAPPED",
        "FILTER_REASON_EXCLUDED",
        "FILTER_REASON_DIVERSITY",
        "FILTER_REASON_UNKNOWN_AD",
    ]
    assert gateway_service_pb2.RecommendMode.keys() == [
        "RECOMMEND_MODE_UNSPECIFIED",
        "RECOMMEND_MODE_REALTIME",
        "RECOMMEND_MODE_OFFLINE",
    ]
    assert set(gateway_service_pb2.ServingPath.keys()) >= {
        "SERVING_PATH_REALTIME_RANKED",
        "SERVING_PATH_OFFLINE_RANKED",
        "SERVING_PATH_RECALL_ORDER",
        "SERVING_PATH_POPULAR",
    }
    assert set(gateway_service_pb2.DegradationReason.keys()) >= {
        "DEGRADATION_REASON_RANKING_UNAVAILABLE",
        "DEGRADATION_REASON_RANKING_DEADLINE_EXCEEDED",
        "DEGRADATION_REASON_NO_RECALL_SET",
        "DEGRADATION_REASON_NO_OFFLINE_LIST",
        "DEGRADATION_REASON_RECALL_UNAVAILABLE",
        "DEGRADATION_REASON_FILTERED_SHORT",
    }


def test_admin_service_and_messages():
    (descriptor,) = admin_service_pb2.DESCRIPTOR.services_by_name.values()
    assert admin_service_pb2.DESCRIPTOR.package == "adrec.admin.v1"
    assert descriptor.full_name == "adrec.admin.v1.AdminService"
    methods = ["SetAdState", "GetAdState", "ListAdStates", "ListAdStateChanges"]
    assert list(descriptor.methods_by_name) == methods
    for method in methods:
        rpc = descriptor.methods_by_name[method]
        assert rpc.input_type is getattr(admin_service_pb2, f"{method}Request").DESCRIPTOR
        assert rpc.output_type is getattr(admin_service_pb2, f"{method}Response").DESCRIPTOR
        assert not rpc.client_streaming and not rpc.server_streaming
        assert callable(getattr(admin_service_pb2_grpc.AdminServiceServicer, method))
    pb = admin_service_pb2
    assert fields(pb.AdRef) == {"level": (ENUM, False), "id": (INT64, False)}
    assert fields(pb.SetAdStateRequest) == {
        "target": (MESSAGE, False),
        "status": (ENUM, False),
        "reason": (STRING, False),
        "start_time": (INT64, False),
        "end_time": (INT64, False),
    }
    assert fields(pb.AdStateChange) == {
        "change_id": (INT64, False),
        "state": (MESSAGE, False),
        "previous_status": (ENUM, False),
    }
    assert pb.AdLevel.keys() == [
        "AD_LEVEL_UNSPECIFIED",
        "AD_LEVEL_ADGROUP",
        "AD_LEVEL_CAMPAIGN",
        "AD_LEVEL_CUSTOMER",
    ]
    assert pb.AdStatus.keys() == ["AD_STATUS_UNSPECIFIED", "AD_STATUS_ACTIVE", "AD_STATUS_PAUSED"]


def test_event_messages():
    pb = event_service_pb2
    assert fields(pb.ReportEventsRequest) == {"events": (MESSAGE, True)}
    assert fields(pb.ReportEventsResponse) == {
        "accepted": (INT32, False),
        "log_position": (STRING, False),
    }
    assert fields(pb.Event) == {
        "event_id": (STRING, False),
        "user_id": (INT64, False),
        "time": (INT64, False),
        "impression": (MESSAGE, False),
        "click": (MESSAGE, False),
        "behavior": (MESSAGE, False),
    }
    # Exactly one payload per event.
    (payload,) = pb.Event.DESCRIPTOR.oneofs
    assert [field.name for field in payload.fields] == ["impression", "click", "behavior"]
    shown = {
        "ad_id": (INT64, False),
        "pid": (STRING, False),
        "request_id": (STRING, False),
        "serving_path": (ENUM, False),
        "model_version": (STRING, False),
    }
    assert fields(pb.Impression) == fields(pb.Click) == shown
    path = pb.Impression.DESCRIPTOR.fields_by_name["serving_path"]
    assert path.enum_type is gateway_service_pb2.ServingPath.DESCRIPTOR
    assert fields(pb.Behavior) == {
        "type": (ENUM, False),
        "cate_id": (INT64, False),
        "brand_id": (INT64, False),
    }
    behavior_type = pb.Behavior.DESCRIPTOR.fields_by_name["type"]
    assert behavior_type.enum_type is pb.BehaviorType.DESCRIPTOR
    assert pb.BehaviorType.keys() == [
        "BEHAVIOR_TYPE_UNSPECIFIED",
        "BEHAVIOR_TYPE_PAGE_VIEW",
        "BEHAVIOR_TYPE_CART",
        "BEHAVIOR_TYPE_FAVORITE",
        "BEHAVIOR_TYPE_BUY",
    ]


def upper_snake(name: str) -> str:
    return "".join(
        f"_{char}" if char.isupper() and index else char for index, char in enumerate(name)
    ).upper()


def all_enums() -> list[EnumDescriptor]:
    return [
        enum for module in API_MODULES for enum in module.DESCRIPTOR.enum_types_by_name.values()
    ]


@pytest.mark.parametrize("enum", all_enums(), ids=lambda enum: enum.full_name)
def test_enum_zero_value_is_unspecified(enum: EnumDescriptor):
    zero = enum.values_by_number[0]
    assert zero.name == f"{upper_snake(enum.name)}_UNSPECIFIED"
    assert enum.values[0] is zero
