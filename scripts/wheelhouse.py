"""Every wheel an offline machine needs to install seg-densenet: ``make wheelhouse`` (issue 16, point 5).

    python scripts/wheelhouse.py --out wheelhouse [--python 3.12] [--platform manylinux_2_28_x86_64 ...]
        [--extras export] [--no-torch] [--only NAME ...] [--dry-run]

Then, on the offline machine (same Python and platform), in the copied checkout (an editable install,
as ``make install``: the Hydra configs are read from ``conf/``):

    pip install --no-index --find-links wheelhouse -e '.[dev]'

- The packages are the dependency closure of ``seg-densenet[extras]`` as installed here (names and exact
  versions from this environment, so the offline machine gets the versions the test suite passed
  with); markers are evaluated for the target Python. The project itself is built as a wheel.
- Each is fetched from the package index as a binary wheel for the target Python and platforms; a
  package published only as a source archive (pure Python, e.g. antlr4-python3-runtime) is built into
  a wheel here instead.
- ``--no-torch`` leaves out torch, torchvision, triton and the CUDA libraries (several GB) for machines
  that have their own PyTorch; a version local to this machine (``2.14.1+cu130``) is fetched as its public
  release. ``--only`` keeps the listed packages (the lent GPU machine's missing few: ``make gpu-bundle``).
- ``--dry-run`` prints the plan (package, version, how it is fetched) without fetching anything.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PROJECT = "seg-densenet"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
TORCH_STACK = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")
"""PyTorch and the CUDA libraries its Linux wheels pull in: what ``--no-torch`` leaves out."""


def closure(extras: list[str], python: str) -> dict[str, str]:
    """``{name: version}`` of the installed distributions ``seg-densenet[extras]`` needs, transitively and
    with the extras each requirement asks for (``fsspec[http]``), environment markers evaluated for
    ``python`` (e.g. ``3.12``). The project itself is not listed."""
    env = default_environment() | {"python_version": python, "python_full_version": f"{python}.0"}
    found: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    todo = [(PROJECT, extra) for extra in ("", *extras)]
    while todo:
        name, extra = todo.pop()
        key = canonicalize_name(name)
        if (key, extra) in seen:
            continue
        seen.add((key, extra))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name}: needed but not installed here; run `make install` first") from None
        if key != canonicalize_name(PROJECT):
            found[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env | {"extra": extra}):
                continue
            if req.marker is None and extra:
                continue  # a base requirement: reached through the "" pass already
            todo += [(req.name, e) for e in ("", *req.extras)]
    return found


def build_requirements() -> list[str]:
    """The project's ``[build-system] requires`` (setuptools, wheel): an editable install from the checkout
    (``pip install -e``) builds the project, offline too."""
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]


def public_version(version: str) -> str:
    """``2.14.1+cu130`` -> ``2.14.1``: a local version label is not on the package index."""
    return version.split("+", 1)[0]


def fetch(name: str, version: str, out: Path, python: str, platforms: list[str]) -> str:
    """Put ``name==version`` into ``out``: a binary wheel for the target, else one built from source here;
    returns how it was fetched."""
    spec = f"{name}=={public_version(version)}"
    binary = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    binary += ["--python-version", python, "--implementation", "cp", "-d", str(out), spec]
    binary += [arg for p in platforms for arg in ("--platform", p)]
    if subprocess.run(binary, capture_output=True, text=True).returncode == 0:
        return "binary wheel"
    built = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), spec]
    proc = subprocess.run(built, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(
            f"{spec}: no wheel for Python {python} on {', '.join(platforms)}, and no build here: {last}"
        )
    return "built here from source"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "wheelhouse")
    parser.add_argument("--python", default="3.12", help="the target Python's major.minor (default 3.12)")
    parser.add_argument(
        "--platform", action="append", help=f"target platform tags (default {', '.join(PLATFORMS)})"
    )
    parser.add_argument(
        "--extras", nargs="*", default=["export"], help="the project's extras (default export)"
    )
    parser.add_argument(
        "--no-torch", action="store_true", help="leave out torch, torchvision and CUDA libraries"
    )
    parser.add_argument("--only", nargs="*", help="fetch only these packages (names as on the index)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, fetch nothing")
    args = parser.parse_args(argv)
    platforms = args.platform or list(PLATFORMS)
    packages = closure(args.extras, args.python)
    if args.no_torch:
        packages = {n: v for n, v in packages.items() if not TORCH_STACK.match(n)}
    if args.only is not None:
        keep = {canonicalize_name(n) for n in args.only}
        missing = keep - set(packages)
        if missing:
            raise SystemExit(f"--only: {', '.join(sorted(missing))} not among seg-densenet's dependencies")
        packages = {n: v for n, v in packages.items() if n in keep}
    print(f"{len(packages)} packages for Python {args.python} on {', '.join(platforms)} -> {args.out}")
    if args.dry_run:
        for name, version in sorted(packages.items()):
            print(f"{name}=={public_version(version)}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only is None:  # the project's own wheel, and what building it from the checkout needs
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(args.out), str(REPO)],
            check=True,
        )
        for spec in build_requirements():
            download = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
            ]
            subprocess.run([*download, "-d", str(args.out), spec], check=True)
            print(f"{spec}: build requirement, binary wheel", flush=True)
    for name, version in sorted(packages.items()):
        print(
            f"{name}=={public_version(version)}: {fetch(name, version, args.out, args.python, platforms)}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
