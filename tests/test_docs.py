"""The docs stay true to the code: the Redis schema, the settings and the architecture map."""

import pathlib
import re

from adrec.core import keys

ROOT = pathlib.Path(__file__).parents[1]
SCHEMA_DOC = ROOT / "docs" / "redis-schema.md"
ARCHITECTURE_DOC = ROOT / "docs" / "architecture.md"


def test_schema_doc_lists_every_key_family_and_global_key():
    text = SCHEMA_DOC.read_text()
    for family in keys.VERSIONED_FAMILIES:
        member = None if family.member is None else "all" if family.member == "scope" else 7
        documented = family.key("v1", member).decode().replace("v1", "V", 1)
        if member is not None:
            documented = documented.replace(f":{member}", f":<{family.member}>")
        assert f"`{documented}`" in text, f"{documented} missing from {SCHEMA_DOC.name}"
    for state in (keys.REALTIME_USER, keys.REALTIME_AD):
        documented = state.key(7).decode().replace(":7", f":<{state.member}>")
        assert f"`{documented}`" in text, f"{documented} missing from {SCHEMA_DOC.name}"
    globals_ = [
        keys.ACTIVE_VERSION,
        keys.VERSIONS,
        keys.VERSION_SEQUENCE,
        keys.PUBLISH_LOCK,
        keys.PENDING_VERSIONS,
        keys.EVENT_LOG,
        keys.AD_STATE,
        keys.AD_STATE_SEQ,
        keys.AD_STATE_HISTORY,
    ]
    for key in globals_:
        assert f"`{key.decode()}`" in text
    module_globals = {v for k, v in vars(keys).items() if isinstance(v, bytes) and k.isupper()}
    assert module_globals == set(globals_), "a new global key needs a row in the schema doc"


def test_configuration_doc_lists_every_setting():
    from adrec.core.redis_conn import RedisSettings
    from adrec.core.settings import env_names
    from jobs.config import JobConfig
    from jobs.stream.config import StreamConfig
    from services.runtime.settings import SETTINGS

    text = (SCHEMA_DOC.parent / "configuration.md").read_text()
    classes = [RedisSettings, JobConfig, StreamConfig, *SETTINGS.values()]
    missing = sorted(
        {name for cls in classes for name in env_names(cls) if f"`{name}`" not in text}
    )
    assert missing == [], f"docs/configuration.md lacks {missing}"


_FENCED_BLOCK = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_PATH_ENDINGS = (".py", ".md", ".proto", ".yaml", "/")


def repository_paths(markdown: str) -> list[str]:
    """Code spans that name a file or folder of the repository, relative to its root.

    A span qualifies when it holds a `/` and ends in one of _PATH_ENDINGS. Commands (a span
    with a space), URLs and templates such as `services/<name>/service.py` are not paths.
    """
    prose = _FENCED_BLOCK.sub("", markdown)
    return sorted(
        {
            span
            for span in _CODE_SPAN.findall(prose)
            if "/" in span
            and span.endswith(_PATH_ENDINGS)
            and not re.search(r"\s|://|[<>*{}]", span)
        }
    )


def test_repository_paths_finds_files_and_folders_but_not_commands_or_templates():
    text = (
        "`adrec/core/keys.py` and `services/` and `docs/job.md`, `protos/buf.yaml`,\n"
        "`protos/adrec/common/v1/common.proto`; not `spark-submit jobs/main.py`,\n"
        "`dns:///adrec-recall:50051/`, `deploy/base/<name>.yaml`, `adrec.core` or `a/b.txt`\n"
        "```sh\n`bench/in_a_fence.py`\n```\n"
    )
    assert repository_paths(text) == [
        "adrec/core/keys.py",
        "docs/job.md",
        "protos/adrec/common/v1/common.proto",
        "protos/buf.yaml",
        "services/",
    ]


def test_every_path_in_the_architecture_doc_exists():
    paths = repository_paths(ARCHITECTURE_DOC.read_text())
    assert len(paths) >= 20, "the architecture doc names the repository's files in backticks"
    missing = [
        path
        for path in paths
        if not (ROOT / path).exists() or (path.endswith("/") and not (ROOT / path).is_dir())
    ]
    assert missing == [], f"docs/architecture.md names paths that do not exist: {missing}"
