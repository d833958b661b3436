"""pdserve imports only as ``pdserve.*`` and shadows no third-party package.

The repository's top-level folders (``kernels/``, ``engine/``, ``proto/``, ...) install as
subpackages of ``pdserve``. A bare ``kernels`` on ``sys.path`` once shadowed Hugging Face's
``kernels`` (which transformers imports while loading a model class) and broke a fresh clone.
These tests check, with the packages the project already installs, that nothing of the
repository answers to a bare name: in this process, in the ``pdserve`` console script run
from the repository root, and in Ray workers of a job that pdserve starts from there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pdserve

ROOT = Path(pdserve.__file__).resolve().parent
BARE = ("kernels", "engine", "router", "proto", "cluster", "prefill_worker", "decode_worker")
SITE = Path(sysconfig.get_paths()["purelib"]).resolve()

# Defined again in child processes (and in their Ray workers): where each bare name resolves.
ORIGINS = f"""
def origins():
    import importlib.util
    found = {{}}
    for name in {BARE!r}:
        spec = importlib.util.find_spec(name)
        found[name] = None if spec is None else (
            spec.origin or list(spec.submodule_search_locations)[0])
    return found
"""


def _from_repo(origin: str | None) -> bool:
    """The repository's own files (a virtual environment inside the checkout is not)."""
    if origin is None:
        return False
    path = Path(origin).resolve()
    return path.is_relative_to(ROOT) and not path.is_relative_to(Path(sys.prefix).resolve())


def test_pdserve_is_the_repository_root() -> None:
    assert (ROOT / "kernels" / "attention_decode.py").is_file()
    assert importlib.util.find_spec("pdserve.kernels.attention_decode") is not None


def test_repository_root_is_not_on_sys_path() -> None:
    entries = {Path(p or os.getcwd()).resolve() for p in sys.path}
    assert ROOT not in entries, f"{ROOT} is on sys.path: its folders shadow packages"


def test_no_bare_name_resolves_into_the_repository() -> None:
    for name in BARE:
        spec = importlib.util.find_spec(name)
        origin = None if spec is None else spec.origin
        assert not _from_repo(origin), f"`import {name}` finds the repository's {origin}"


def test_hf_kernels_and_transformers_beside_pdserve_kernels() -> None:
    import pdserve.kernels.ops  # noqa: F401  (the project's kernels, first)

    spec = importlib.util.find_spec("kernels")
    assert spec is not None, "Hugging Face's kernels (a dependency of transformers) is missing"
    assert spec.origin is not None and Path(spec.origin).resolve().is_relative_to(SITE)
    import kernels

    assert Path(kernels.__file__).resolve().is_relative_to(SITE)
    from transformers import LlamaForCausalLM

    assert LlamaForCausalLM.__name__ == "LlamaForCausalLM"


def _run_in_root(code: str) -> dict[str, str | None]:
    """Run ``code`` (which prints ``origins()`` as JSON last) in a child interpreter started in
    the repository root; ``-P``: as a console script, with no current directory on sys.path."""
    out = subprocess.run([sys.executable, "-P", "-c", ORIGINS + code], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    found: dict[str, str | None] = json.loads(out.stdout.strip().splitlines()[-1])
    return found


def test_console_script_from_the_repository_root() -> None:
    script = Path(sys.executable).parent / "pdserve"
    out = subprocess.run([str(script), "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    found = _run_in_root("""
import json
from transformers import LlamaForCausalLM  # imports Hugging Face's kernels
import pdserve.cluster.cli
print(json.dumps(origins()))
""")
    assert not any(_from_repo(o) for o in found.values()), found


def test_ray_workers_started_from_the_repository_root() -> None:
    """Ray puts the driver's directory first on every worker's sys.path unless the job has a
    working_dir; pdserve's job gets an empty one (``job_runtime_env``). A worker of a job
    started in the repository root imports transformers' model classes next to
    ``pdserve.kernels`` and finds no bare name of the repository."""
    found = _run_in_root("""
import json, ray
from pdserve.cluster.launch import job_runtime_env
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
         object_store_memory=80 * 1024 * 1024, runtime_env=job_runtime_env())

@ray.remote
def probe():
    from transformers import LlamaForCausalLM  # imports Hugging Face's kernels
    import pdserve.kernels.ops
    return origins()

found = ray.get(probe.remote())
ray.shutdown()
print(json.dumps(found))
""")
    assert not any(_from_repo(o) for o in found.values()), found
    assert found["kernels"] is not None and Path(found["kernels"]).resolve().is_relative_to(SITE)
