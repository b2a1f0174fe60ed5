"""`adrec job package`: the zip spark-submit ships to executors holds the job and the core."""

import subprocess
import sys
import zipfile

from adrec.cli import main


def test_the_package_holds_adrec_and_jobs_and_imports_from_the_zip(tmp_path, capsys):
    out = tmp_path / "adrec.zip"
    assert main(["job", "package", "--out", str(out)]) == 0
    assert "--py-files" in capsys.readouterr().err

    names = set(zipfile.ZipFile(out).namelist())
    for module in (
        "adrec/__init__.py",
        "adrec/core/keys.py",
        "adrec/core/dataset.py",
        "jobs/__init__.py",
        "jobs/main.py",
        "jobs/pipeline.py",
        "jobs/recall/__init__.py",
    ):
        assert module in names
    assert not any(name.startswith("services/") for name in names)

    # Executors import the job's modules from the zip itself, ahead of anything installed.
    probe = (
        f"import sys; sys.path.insert(0, {str(out)!r}); "
        "import jobs.recall, adrec.core.keys; "
        "print(jobs.recall.__file__); print(adrec.core.keys.__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert all(line.startswith(str(out)) for line in result.stdout.split())
