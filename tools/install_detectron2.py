#!/usr/bin/env python
"""Install detectron2 into the running Python environment, the way rankdetr needs it.

Order of preference:
  1. an importable detectron2 (nothing to do);
  2. ``DETECTRON2_SOURCE`` (a local checkout, an sdist, or any pip requirement), installed as is;
  3. upstream detectron2 from its git repository, when that repository is reachable;
  4. the v0.6 release as the package index holds it (``pb1-detectron2==0.6``, the official v0.6
     Python sources without the C++ ops). Its archive is verified by sha256, then repaired before
     it is built: a stub ``detectron2._C`` (rankdetr needs none of detectron2's C++ ops), the
     NumPy-2 / Pillow-10 fixes that upstream made after v0.6, and the GLOO backend in ``launch``
     when there is no GPU (also an upstream fix).

torch must already be installed (detectron2's build imports it). Run with the environment's own
Python: ``.venv/bin/python tools/install_detectron2.py``.
"""

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

UPSTREAM_GIT = "https://github.com/facebookresearch/detectron2.git"
PB1_REQUIREMENT = "pb1-detectron2==0.6"
PB1_ARCHIVE = "pb1-detectron2-0.6.tar.gz"
PB1_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
# Local version label: `pip list` shows that this is the repaired v0.6, not upstream's.
REPAIRED_VERSION = "0.6+rankdetr"

# detectron2 v0.6's own runtime requirements, without its pin of an old black (only used to
# pretty-print configs) and with fvcore / iopath kept in the ranges v0.6 was written for.
RUNTIME_REQUIREMENTS = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
    "black",
]

STUB_C = '''"""Stand-in for detectron2's compiled ops, written by rankdetr's installer.

This detectron2 was installed from the v0.6 Python sources without its C++/CUDA ops (deformable
convolution, rotated boxes, the fast COCO evaluator). rankdetr uses none of them. Using one raises
an error that says so; install upstream detectron2 from source if you need them.
"""


def get_compiler_version():
    return "none (detectron2 installed without its C++ ops by rankdetr)"


def get_cuda_version():
    return "none"


def has_cuda():
    return False


def __getattr__(name):
    raise AttributeError(
        f"detectron2._C.{name} is unavailable: this detectron2 was installed by rankdetr without "
        "its C++ ops. Use COCOEvaluator(..., use_fast_impl=False), or install upstream detectron2 "
        "from source for its compiled ops."
    )
'''

SETUP_PY = f"""from setuptools import find_packages, setup

setup(
    name="detectron2",
    version="{REPAIRED_VERSION}",
    author="FAIR",
    url="https://github.com/facebookresearch/detectron2",
    description="detectron2 v0.6 Python sources, repaired by rankdetr's installer (no C++ ops)",
    license="Apache-2.0",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={{"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}},
    python_requires=">=3.7",
)
"""


def log(message: str) -> None:
    print(f"[install_detectron2] {message}", flush=True)


def pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", *args])


def detectron2_importable() -> bool:
    probe = "import detectron2, detectron2.config, detectron2.engine"
    return subprocess.call([sys.executable, "-c", probe], stderr=subprocess.DEVNULL) == 0


def upstream_reachable(timeout_s: float) -> bool:
    try:
        subprocess.run(
            ["git", "ls-remote", "--heads", UPSTREAM_GIT],
            check=True,
            timeout=timeout_s,
            capture_output=True,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_pb1_archive(cache_dir: Path) -> Path:
    """Fetch the v0.6 sdist into cache_dir (once) and verify its sha256."""
    archive = cache_dir / PB1_ARCHIVE
    if not archive.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        # --no-build-isolation: pip reads the sdist's metadata by running its setup.py, which
        # imports torch; the environment's own torch serves.
        pip(
            "download",
            *("--no-deps", "--no-binary", ":all:", "--no-build-isolation"),
            *("-d", str(cache_dir), PB1_REQUIREMENT),
        )
    actual = sha256_of(archive)
    if actual != PB1_SHA256:
        archive.unlink()
        raise SystemExit(
            f"{archive}: sha256 {actual} does not match the verified v0.6 archive ({PB1_SHA256}). "
            "Refusing to install it; the damaged download was deleted, run again to retry."
        )
    log(f"verified {archive.name} (sha256 {PB1_SHA256[:16]}...)")
    return archive


def replace_exactly(path: Path, old: str, new: str, count: int = 1) -> None:
    """Replace `old` by `new` in path, failing if it does not occur exactly `count` times."""
    text = path.read_text()
    found = text.count(old)
    if found != count:
        raise SystemExit(
            f"repairing {path}: expected {count} occurrence(s) of {old!r}, found {found}"
        )
    path.write_text(text.replace(old, new))


# NumPy 2 removed the aliases np.int / np.bool / np.float / np.str / np.object (deprecated in
# 1.20); upstream detectron2 replaced them by the builtins. `\b` keeps np.int64, np.float32, ...
NUMPY_ALIAS = re.compile(r"\bnp\.(int|bool|float|str|object)\b(?![\w.])")


def repair_numpy_aliases(package: Path) -> int:
    total = 0
    for path in package.rglob("*.py"):
        text = path.read_text()
        fixed, n = NUMPY_ALIAS.subn(r"\1", text)
        if n:
            path.write_text(fixed)
            total += n
    return total


def repair_launch_for_cpu(launch_py: Path) -> None:
    """Let `launch` start several processes without a GPU (GLOO), as upstream does since 2022."""
    replace_exactly(
        launch_py,
        "    assert torch.cuda.is_available(), "
        '"cuda is not available. Please check your installation."\n',
        "    has_gpu = torch.cuda.is_available()\n",
    )
    replace_exactly(launch_py, 'backend="NCCL",', 'backend="NCCL" if has_gpu else "GLOO",')
    replace_exactly(
        launch_py,
        "    assert num_gpus_per_machine <= torch.cuda.device_count()\n"
        "    torch.cuda.set_device(local_rank)\n",
        "    if has_gpu:\n"
        "        assert num_gpus_per_machine <= torch.cuda.device_count()\n"
        "        torch.cuda.set_device(local_rank)\n",
    )


def repair_v06_sources(source: Path) -> None:
    package = source / "detectron2"
    # Pillow 10 removed Image.LINEAR (an alias of BILINEAR); it is evaluated at import time.
    replace_exactly(package / "data/transforms/transform.py", "Image.LINEAR", "Image.BILINEAR")
    n_aliases = repair_numpy_aliases(package)
    if n_aliases == 0:
        raise SystemExit("repairing detectron2: found no NumPy aliases, the archive is unexpected")
    repair_launch_for_cpu(package / "engine/launch.py")
    (package / "_C.py").write_text(STUB_C)
    (source / "setup.py").write_text(SETUP_PY)
    for stale in ("setup.cfg", "pyproject.toml"):
        (source / stale).unlink(missing_ok=True)
    log(f"repaired v0.6: Pillow 10, {n_aliases} NumPy-2 aliases, GLOO launch, stub _C")


def install_pb1(cache_dir: Path) -> None:
    archive = download_pb1_archive(cache_dir)
    with tempfile.TemporaryDirectory(prefix="detectron2-v0.6-") as tmp:
        with tarfile.open(archive) as tar:
            try:
                tar.extractall(tmp, filter="data")
            except TypeError:  # Python < 3.10.12 has no extraction filters
                tar.extractall(tmp)
        source = Path(tmp) / "pb1-detectron2-0.6"
        repair_v06_sources(source)
        pip("install", "--no-build-isolation", "--no-deps", str(source))
    pip("install", *RUNTIME_REQUIREMENTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(sys.prefix) / "cache",
        help="where the downloaded archive is kept (default: <venv>/cache)",
    )
    parser.add_argument(
        "--source",
        choices=["auto", "upstream", "v0.6"],
        default=os.environ.get("RANKDETR_DETECTRON2", "auto"),
        help="auto (default, or $RANKDETR_DETECTRON2): upstream when reachable, else repaired v0.6",
    )
    parser.add_argument("--reach-timeout", type=float, default=15.0)
    args = parser.parse_args()

    if detectron2_importable():
        log("detectron2 is already importable: nothing to do")
        return
    if os.environ.get("DETECTRON2_SOURCE"):
        log(f"installing DETECTRON2_SOURCE={os.environ['DETECTRON2_SOURCE']}")
        pip("install", "--no-build-isolation", os.environ["DETECTRON2_SOURCE"])
    elif args.source == "upstream" or (
        args.source == "auto" and upstream_reachable(args.reach_timeout)
    ):
        log(f"installing upstream detectron2 from {UPSTREAM_GIT} (compiles its C++ ops)")
        pip("install", "--no-build-isolation", f"git+{UPSTREAM_GIT}")
    else:
        log("upstream detectron2 is not reachable: installing the repaired v0.6 release")
        install_pb1(args.cache_dir)
    if not detectron2_importable():
        raise SystemExit("detectron2 was installed but does not import; see the messages above")
    log("detectron2 is installed")


if __name__ == "__main__":
    main()
