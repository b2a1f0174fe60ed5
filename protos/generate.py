"""Generate the Python protobuf and gRPC modules and the protoset for the protos here.

    python protos/generate.py                # rewrite adrec/api and the protoset from the protos
    python protos/generate.py --check        # exit 1 listing the differences if either is stale
    python protos/generate.py --out DIR ...  # the same against another tree

The protoset (`protos/adrec.protoset.binpb`, a FileDescriptorSet with source info) lets
clients that have no reflection, or that want the API's comments, read the schema:
`grpcurl -protoset protos/adrec.protoset.binpb ... describe` shows every comment, which
server reflection (built from the generated modules, without source info) cannot.

protoc names each module after its proto package (`adrec.recall.v1`), but the modules live
under `adrec.api` so they cannot collide with hand-written `adrec.*` packages; the generated
imports are rewritten to match. Descriptor file names keep the proto paths
(`adrec/recall/v1/recall_service.proto`), which reflection clients use to resolve imports.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "adrec" / "api"
DEFAULT_PROTOSET = PROTO_ROOT / "adrec.protoset.binpb"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
PROTO_PACKAGE_ROOT = "adrec"

# Both the imports between generated modules and the module name each one registers its
# message classes under (their `__module__`) name the proto package.
_PROTO_PACKAGE_MODULE_NAMES = re.compile(
    r"(^from |BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')adrec\.(?!api\.)", re.MULTILINE
)


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PROTO_PACKAGE_ROOT).rglob("*.proto"))


def render() -> tuple[dict[str, str], bytes]:
    """Return the generated modules, keyed by their POSIX path relative to the output root,
    and the protoset."""
    well_known_types = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory(prefix="adrec-protoc-") as scratch:
        protoset = Path(scratch) / DEFAULT_PROTOSET.name
        exit_code = protoc.main(
            [
                "grpc_tools.protoc",
                f"--proto_path={PROTO_ROOT}",
                f"--proto_path={well_known_types}",
                f"--python_out={scratch}",
                f"--pyi_out={scratch}",
                f"--grpc_python_out={scratch}",
                f"--descriptor_set_out={protoset}",
                # Source info carries the comments; imports make the set self-contained.
                "--include_source_info",
                "--include_imports",
                *(str(path) for path in proto_files()),
            ]
        )
        if exit_code != 0:
            raise SystemExit(f"protoc failed with exit code {exit_code}")
        package_root = Path(scratch) / PROTO_PACKAGE_ROOT
        modules = {
            path.relative_to(package_root).as_posix(): _PROTO_PACKAGE_MODULE_NAMES.sub(
                r"\1adrec.api.", path.read_text(encoding="utf-8")
            )
            for path in sorted(package_root.rglob("*"))
            if path.name.endswith(GENERATED_SUFFIXES)
        }
        return modules, protoset.read_bytes()


def package_markers(modules: dict[str, str]) -> set[str]:
    """`__init__.py` paths every generated module needs, up to and including the output root."""
    markers = set()
    for module in modules:
        parent = Path(module).parent
        markers.add((parent / "__init__.py").as_posix())
        markers.update((ancestor / "__init__.py").as_posix() for ancestor in parent.parents)
    return markers


def existing_modules(out: Path) -> set[str]:
    if not out.is_dir():
        return set()
    return {
        path.relative_to(out).as_posix()
        for path in out.rglob("*")
        if path.is_file() and path.name.endswith(GENERATED_SUFFIXES)
    }


def differences(out: Path, modules: dict[str, str]) -> list[str]:
    """Human-readable differences between the tree at `out` and freshly generated `modules`."""
    found = []
    for name, content in sorted(modules.items()):
        target = out / name
        if not target.is_file():
            found.append(f"missing: {name}")
        elif target.read_text(encoding="utf-8") != content:
            found.append(f"differs: {name}")
    found.extend(f"extra: {name}" for name in sorted(existing_modules(out) - modules.keys()))
    found.extend(
        f"missing: {marker}"
        for marker in sorted(package_markers(modules))
        if not (out / marker).is_file()
    )
    return found


def write(out: Path, modules: dict[str, str]) -> None:
    for name, content in modules.items():
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_file() or target.read_text(encoding="utf-8") != content:
            target.write_text(content, encoding="utf-8")
    for stale in existing_modules(out) - modules.keys():
        (out / stale).unlink()
    # Existing package markers are kept as they are: only their presence is generated.
    for marker in package_markers(modules):
        (out / marker).touch(exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="root of the generated package tree (default: adrec/api)",
    )
    parser.add_argument(
        "--protoset",
        type=Path,
        default=DEFAULT_PROTOSET,
        help="the FileDescriptorSet to write (default: protos/adrec.protoset.binpb)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 1 and list the files that differ, are missing or are extra",
    )
    args = parser.parse_args(argv)

    modules, protoset = render()
    if args.check:
        found = differences(args.out, modules)
        if not args.protoset.is_file():
            found.append(f"missing: {args.protoset.name}")
        elif args.protoset.read_bytes() != protoset:
            found.append(f"differs: {args.protoset.name}")
        for line in found:
            print(line, file=sys.stderr)
        if found:
            print(
                f"{args.out} or {args.protoset} is stale: run python protos/generate.py",
                file=sys.stderr,
            )
            return 1
        return 0
    write(args.out, modules)
    if not args.protoset.is_file() or args.protoset.read_bytes() != protoset:
        args.protoset.write_bytes(protoset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
