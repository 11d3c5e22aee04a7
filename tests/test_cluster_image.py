"""The Dockerfile builds raymed the way the README does, checked without Docker.

The Dockerfile is parsed (ARG/FROM/WORKDIR/COPY/RUN), its build context is assembled the way
`docker build` would (.dockerignore applied, COPY sources to their destinations), and its pip
install command runs in a fresh virtual environment on top of the installed dependencies.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import site
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Dockerfile:
    base_image: str
    workdir: str
    copies: list[tuple[list[str], str]] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in joined.splitlines()
            if line.strip()]


def parse_dockerfile(path: Path) -> Dockerfile:
    args, image, workdir, copies, runs = {}, None, "/", [], []
    for name, rest in instructions(path.read_text()):
        if name == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
        elif name == "FROM":
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], rest.split()[0])
        elif name == "WORKDIR":
            workdir = os.path.join(workdir, rest)
        elif name == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            copies.append((words[:-1], words[-1]))
        elif name == "RUN":
            runs.append(rest)
    return Dockerfile(image, workdir, copies, runs)


def ignore_patterns(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over '/'-separated paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            result = not negate
    return result


def build_context(dockerfile: Dockerfile, root: Path, image_root: Path) -> Path:
    """Copy what the Dockerfile's COPY instructions take from the build context into `image_root`."""
    patterns = ignore_patterns(root / ".dockerignore")
    workdir = image_root / dockerfile.workdir.lstrip("/")
    workdir.mkdir(parents=True)
    for sources, dest in dockerfile.copies:
        target = workdir / dest if not dest.startswith("/") else image_root / dest.lstrip("/")
        for source in sources:
            src = root / source
            assert src.exists(), f"COPY {source}: not in the repository"
            files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
            kept = [f for f in files if not ignored(f.relative_to(root).as_posix(), patterns)]
            assert kept, f"COPY {source}: everything is excluded by .dockerignore"
            for f in kept:
                out = target / f.name if src.is_file() else target / f.relative_to(src)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)
    return workdir


def pip_install_spec(command: str) -> tuple[list[str], list[str]]:
    """(requirements, editable paths without extras) of the first `pip install` in a shell line."""
    for part in re.split(r"&&|;|\|\|", command):
        words = shlex.split(part)
        if "pip" in words and "install" in words:
            args = words[words.index("install") + 1:]
            requirements, editables, i = [], [], 0
            while i < len(args):
                if args[i] in ("-e", "--editable"):
                    editables.append(re.sub(r"\[.*\]$", "", args[i + 1]))
                    i += 2
                elif args[i].startswith("-"):
                    i += 1
                else:
                    requirements.append(args[i])
                    i += 1
            return sorted(requirements), sorted(editables)
    raise AssertionError(f"no pip install in {command!r}")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def ray_requirement():
    return next(Requirement(d) for d in project()["dependencies"] if Requirement(d).name == "ray").specifier


def image_ray_version() -> str:
    """The Ray version of the image's base (`rayproject/ray:VERSION-pyXY`)."""
    return parse_dockerfile(ROOT / "Dockerfile").base_image.split(":")[1].split("-")[0]


def install_run(dockerfile: Dockerfile) -> str:
    (run,) = [r for r in dockerfile.runs if "pip install" in r]
    return run


def test_base_image_is_a_ray_version_raymed_accepts():
    dockerfile = parse_dockerfile(ROOT / "Dockerfile")
    repository, tag = dockerfile.base_image.split(":")
    assert repository == "rayproject/ray"
    version, python = tag.split("-")[:2]
    assert ray_requirement().contains(version), (version, str(ray_requirement()))
    assert re.fullmatch(r"py3\d+", python)
    assert SpecifierSet(project()["requires-python"]).contains(f"3.{python[3:]}")


def test_image_installs_with_the_readmes_command():
    """Same torch pin and package install as CI's (= the README's) command, minus the test extra."""
    dockerfile = parse_dockerfile(ROOT / "Dockerfile")
    ci_line = next(line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pip install" in line)
    assert pip_install_spec(install_run(dockerfile)) == pip_install_spec(ci_line)
    assert pip_install_spec(install_run(dockerfile)) == (["torch==2.13.0"], ["."])
    readme = ROOT / "README.md"
    if readme.exists():
        specs = [pip_install_spec(line) for line in readme.read_text().splitlines() if "pip install" in line]
        assert pip_install_spec(install_run(dockerfile)) in specs, "README.md has no install command like the image's"


def test_dockerignore_keeps_the_package_and_drops_the_rest():
    patterns = ignore_patterns(ROOT / ".dockerignore")
    assert not ignored("raymed/cli.py", patterns) and not ignored("pyproject.toml", patterns)
    assert not ignored("tune_spaces/ae.yaml", patterns) and not ignored("serve/raymed.yaml", patterns)
    for path in ("runs/ae/result.json", ".git/HEAD", "tests/conftest.py", "raymed/__pycache__/cli.cpython-311.pyc",
                 "raymed.egg-info/PKG-INFO", "demo-cohort/demo-001/demo-001_t1.nii.gz"):
        assert ignored(path, patterns), path


def test_image_build_context_installs_raymed(tmp_path):
    """Run the Dockerfile's pip command on its own build context, offline, in a fresh venv."""
    dockerfile = parse_dockerfile(ROOT / "Dockerfile")
    workdir = build_context(dockerfile, ROOT, tmp_path / "image")
    assert not list(workdir.rglob("__pycache__")) and not (workdir / "tests").exists()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # The venv sees this environment's packages (its dependencies and build backend) through a .pth
    # file: --system-site-packages would expose the base interpreter's, not an enclosing venv's.
    inner = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    Path(inner, "outer-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    # Offline: dependencies come from the environment the venv sits on, the build backend too.
    command = install_run(dockerfile) + " --no-index --no-build-isolation"
    done = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import raymed; print(raymed.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).resolve() == (workdir / "raymed" / "__init__.py").resolve(), where.stderr
    version = subprocess.run([str(venv / "bin" / "raymed"), "--version"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert version.stdout.strip() == f"raymed {project()['version']}", version.stderr
