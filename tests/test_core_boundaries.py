"""The shared core stays importable in the services image: no grpc, no pyspark."""

import importlib.metadata
import pathlib
import re
import subprocess
import sys
import tomllib

from adrec.cli import JOB_PACKAGES

ROOT = pathlib.Path(__file__).resolve().parents[1]

CORE_MODULES = [
    "adstate",
    "catalog",
    "codecs",
    "dataset",
    "events",
    "features",
    "fm",
    "keys",
    "metadata",
    "model",
    "redis_conn",
    "redis_server",
    "realtime",
    "scoring",
    "settings",
    "store",
]


def test_core_imports_neither_grpc_nor_pyspark():
    imports = "; ".join(f"import adrec.core.{m}" for m in CORE_MODULES)
    probe = (
        f"import sys; {imports}; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'pyspark')); "
        "print(','.join(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_every_core_module_is_checked():
    import pathlib

    import adrec.core

    present = {p.stem for p in pathlib.Path(adrec.core.__file__).parent.glob("*.py")} - {"__init__"}
    assert present == set(CORE_MODULES)


def test_the_cli_knows_every_package_of_the_job_extra():
    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    extra = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["job"]
    pinned = {re.split(r"[=<>~!\[ ]", requirement)[0].lower() for requirement in extra}
    distributions = importlib.metadata.packages_distributions()
    named = {dist.lower() for package in JOB_PACKAGES for dist in distributions[package]}
    assert named == pinned


# Everything the services image runs: the services, their process wiring, and the
# operator's CLI commands there (serve, recommend, events, publish).
SERVING_MODULES = [
    "adrec.cli",
    "adrec.cli.publish",
    "adrec.cli.recommend",
    "adrec.cli.events",
    "adrec.cli.ads",
    "adrec.cli.serve",
    "adrec.core.catalog",
    "services.process",
    "services.recall.service",
    "services.ranking.service",
    "services.gateway.service",
    "services.events.service",
    "services.admin.service",
]


def test_the_services_and_their_cli_commands_import_none_of_the_job_packages():
    imports = "; ".join(f"import {module}" for module in SERVING_MODULES)
    probe = (
        f"import sys; {imports}; "
        "adrec.cli.build_parser(); "  # every group's flags, as `adrec --help` shows them
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {JOB_PACKAGES!r}); "
        "print(','.join(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_a_job_command_without_the_job_packages_says_what_to_install(tmp_path):
    # As in the services image: the job extra's packages cannot be imported.
    out = str(tmp_path / "d")
    probe = (
        "import sys; sys.modules['pyarrow'] = None; "
        "from adrec.cli import main; "
        f"sys.exit(main(['data', 'generate', '--preset', 'tiny', '--out', {out!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2, result.stderr
    assert "needs the batch job's packages (pyarrow is not installed)" in result.stderr
    assert "pip install 'adrec[job]'" in result.stderr
    assert not (tmp_path / "d").exists()


def _loaded_after(code: str) -> set[str]:
    probe = f"import sys; {code}; print(','.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    return set(result.stdout.strip().split(","))


def test_the_help_loads_neither_grpc_nor_the_job_packages():
    loaded = _loaded_after("import adrec.cli; adrec.cli.build_parser()")
    heavy = {m for m in loaded if m.split(".")[0] in ("grpc", *JOB_PACKAGES)}
    assert heavy == set()


def test_the_spark_driver_entry_loads_neither_the_cli_nor_grpc():
    loaded = _loaded_after("import jobs.main, jobs.pipeline")
    assert {m for m in loaded if m.split(".")[0] == "grpc" or m.startswith("adrec.cli")} == set()
    assert not {m for m in loaded if m.split(".")[0] == "services"}


def test_the_shared_runtime_imports_no_service():
    modules = [p.stem for p in (ROOT / "services" / "runtime").glob("*.py")]
    loaded = _loaded_after("; ".join(f"import services.runtime.{m}" for m in modules))
    served = {
        m
        for m in loaded
        if m.split(".")[:2]
        in (
            ["services", "recall"],
            ["services", "ranking"],
            ["services", "gateway"],
            ["services", "events"],
        )
    }
    assert served == set()
