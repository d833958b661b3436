"""Regenerate the checked-in Python modules of the wire API (`make proto`).

    python -P -m pdserve.proto.gen                  # regenerate proto/pdserve_pb2{,_grpc}.py, .pyi
    python -P -m pdserve.proto.gen --check          # exit 1 if the checked-in files are stale
    python -P -m pdserve.proto.gen --install-tools  # only fetch the pinned compiler

Why a pinned, older compiler: the code protoc emits carries the protobuf version it came from,
and newer gencode refuses older runtimes (`google.protobuf.runtime_version` raises VersionError
when the runtime is older than the gencode, or of another major version). grpcio-tools bundles
its own protoc, so the grpcio-tools version decides the gencode version:

    grpcio-tools 1.65.x -> gencode 5.26.1, no runtime check at all: imports on protobuf 5.26.1 and
                           every later runtime tried (5.27, 5.29, 6.30, 6.33, 7.36), silently
    grpcio-tools 1.66.x -> gencode 5.27.2: refused by 5.27.0/5.27.1, warns on 6.30-6.32
    grpcio-tools 1.85.x -> gencode 7.x: refused by every 5.x and 6.x runtime

pdserve promises `protobuf>=5.27`, and the GPU machines run whatever protobuf they have, so
the files are generated with grpcio-tools 1.65.5. It cannot share a virtual environment with
the rest of pdserve (it pins protobuf<6), so it lives in its own folder, installed there with
`pip install --no-deps --target` (the compiler needs neither protobuf nor grpcio to run).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PINNED_GRPCIO_TOOLS = "1.65.5"
REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_FILE = "proto/pdserve.proto"
GENERATED = ("proto/pdserve_pb2.py", "proto/pdserve_pb2.pyi", "proto/pdserve_pb2_grpc.py")


def tools_dir() -> Path:
    """Folder holding the pinned grpcio-tools for this interpreter (it has a C extension)."""
    tag = sys.implementation.cache_tag  # e.g. cpython-311
    return REPO_ROOT / "build" / f"grpcio-tools-{PINNED_GRPCIO_TOOLS}-{tag}"


def install_command() -> list[str]:
    return [
        sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
        "--target", str(tools_dir()), f"grpcio-tools=={PINNED_GRPCIO_TOOLS}",
    ]


def _probe(pythonpath: str | None) -> bool:
    """True if `grpc_tools` imports with the pinned version under this PYTHONPATH."""
    code = (
        "import grpc_tools.protoc, grpc_tools.grpc_version as v; "
        f"raise SystemExit(v.VERSION != {PINNED_GRPCIO_TOOLS!r})"
    )
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    return result.returncode == 0


def find_tools() -> str | None:
    """PYTHONPATH under which the pinned grpcio-tools imports ("" when the current environment
    already has it), or None when it is not installed."""
    if _probe(None):
        return ""
    path = tools_dir()
    if path.is_dir() and _probe(str(path)):
        return str(path)
    return None


def install_tools() -> str:
    """Install the pinned grpcio-tools into tools_dir() (PyPI); return its PYTHONPATH."""
    subprocess.run(install_command(), check=True)
    found = find_tools()
    if found is None:
        raise RuntimeError(f"grpcio-tools=={PINNED_GRPCIO_TOOLS} still not importable from "
                           f"{tools_dir()} after installing it")
    return found


def generate(out_dir: Path, pythonpath: str) -> None:
    """Run the pinned protoc on proto/pdserve.proto, writing under out_dir/proto/.

    The .proto is compiled from a staging folder as ``pdserve/proto/pdserve.proto`` so that
    the grpc module imports ``from pdserve.proto import pdserve_pb2`` (the installed name).
    """
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    with tempfile.TemporaryDirectory() as tmp:
        src, gen = Path(tmp) / "src", Path(tmp) / "gen"
        (src / "pdserve" / "proto").mkdir(parents=True)
        gen.mkdir()
        shutil.copy(REPO_ROOT / PROTO_FILE, src / "pdserve" / PROTO_FILE)
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{src}",
            f"--python_out={gen}", f"--pyi_out={gen}", f"--grpc_python_out={gen}",
            f"pdserve/{PROTO_FILE}",
        ]
        subprocess.run(cmd, cwd=tmp, env=env, check=True)
        (out_dir / "proto").mkdir(parents=True, exist_ok=True)
        for rel in GENERATED:
            shutil.copy(gen / "pdserve" / rel, out_dir / rel)


def stale_files(pythonpath: str) -> list[str]:
    """Generated files that differ from what the pinned compiler makes now (empty: current)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), pythonpath)
        return [
            rel for rel in GENERATED
            if not (REPO_ROOT / rel).is_file()
            or not filecmp.cmp(Path(tmp) / rel, REPO_ROOT / rel, shallow=False)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -P -m pdserve.proto.gen", description="Regenerate the wire API modules."
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="only check the files are current")
    group.add_argument("--install-tools", action="store_true", help="only fetch the compiler")
    args = parser.parse_args(argv)

    pythonpath = find_tools()
    if pythonpath is None:
        if args.check:
            print(f"grpcio-tools=={PINNED_GRPCIO_TOOLS} is not installed; run "
                  "`python -P -m pdserve.proto.gen --install-tools`, or: "
                  + " ".join(install_command()), file=sys.stderr)
            return 2
        print(f"installing grpcio-tools=={PINNED_GRPCIO_TOOLS} into {tools_dir()}",
              file=sys.stderr)
        pythonpath = install_tools()
    if args.install_tools:
        return 0
    if args.check:
        stale = stale_files(pythonpath)
        for rel in stale:
            print(f"{rel} is not current: run `make proto`", file=sys.stderr)
        return 1 if stale else 0
    generate(REPO_ROOT, pythonpath)
    print("generated " + ", ".join(GENERATED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
