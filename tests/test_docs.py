"""The Redis schema document lists every key the code defines."""

import pathlib

from adrec.core import keys

SCHEMA_DOC = pathlib.Path(__file__).parents[1] / "docs" / "redis-schema.md"


def test_schema_doc_lists_every_key_family_and_global_key():
    text = SCHEMA_DOC.read_text()
    for family in keys.VERSIONED_FAMILIES:
        example = family.key("v1", None if family.member is None else 7
                             if family.member == "user_id" else "all")
        documented = example.decode().replace("v1", "V", 1).replace(":7", ":<user_id>")
        documented = documented.replace(":all", ":<scope>")
        assert f"`{documented}`" in text, f"{documented} missing from {SCHEMA_DOC.name}"
    globals_ = [keys.ACTIVE_VERSION, keys.VERSIONS, keys.VERSION_SEQUENCE, keys.PUBLISH_LOCK,
                keys.PENDING_VERSIONS]
    for key in globals_:
        assert f"`{key.decode()}`" in text
    module_globals = {v for k, v in vars(keys).items() if isinstance(v, bytes) and k.isupper()}
    assert module_globals == set(globals_), "a new global key needs a row in the schema doc"


def test_configuration_doc_lists_every_setting():
    from adrec.core.redis_conn import RedisSettings
    from adrec.core.settings import env_names
    from jobs.config import JobConfig
    from services.runtime.settings import SETTINGS

    text = (SCHEMA_DOC.parent / "configuration.md").read_text()
    classes = [RedisSettings, JobConfig, *SETTINGS.values()]
    missing = sorted({name for cls in classes for name in env_names(cls)
                      if f"`{name}`" not in text})
    assert missing == [], f"docs/configuration.md lacks {missing}"
