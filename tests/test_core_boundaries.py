"""The shared core stays importable in the services image: no grpc, no pyspark."""

import subprocess
import sys

CORE_MODULES = [
    "codecs", "features", "keys", "model", "redis_conn", "redis_server", "settings", "store",
]


def test_core_imports_neither_grpc_nor_pyspark():
    imports = "; ".join(f"import adrec.core.{m}" for m in CORE_MODULES)
    probe = (
        f"import sys; {imports}; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'pyspark')); "
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == ""


def test_every_core_module_is_checked():
    import pathlib

    import adrec.core

    present = {p.stem for p in pathlib.Path(adrec.core.__file__).parent.glob("*.py")} - {"__init__"}
    assert present == set(CORE_MODULES)
