"""cronfleet builds as a wheel and an sdist (`python -m build`) that hold every package, its
migrations and the dashboard's files; the wheel installs into a new virtualenv, as
deploy/Dockerfile installs it (pip and setuptools then removed), and runs there: `--version`
from the package metadata, `db upgrade` from the packaged migrations, the dashboard's page."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "scheduler", "worker", "monitor")


def _source_files() -> set[str]:
    """What the packages consist of: every file under them but caches."""
    return {
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def _run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"{command}: {result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheel_and_sdist_hold_everything_and_the_wheel_runs_in_a_new_virtualenv(tmp_path: Path) -> None:
    # A copy of the tree, so that the build's own files (build/, *.egg-info) stay out of the repo.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "build", "--outdir", dist, source, cwd=tmp_path)
    (wheel,) = dist.glob("cronfleet-*.whl")
    (sdist,) = dist.glob("cronfleet-*.tar.gz")

    expected = _source_files()
    assert "common/store/migrations/script.py.mako" in expected
    assert "monitor/http/static/index.html" in expected
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    with tarfile.open(sdist) as archive:
        in_sdist = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert sorted(expected - in_wheel) == []
    assert sorted(expected - in_sdist) == []

    # A virtualenv without pip or setuptools (as the image ends up), filled by this test's own
    # pip (``--python``): the new one's bundled pip would be installed, then removed, for
    # nothing. No bytecode compiled: what is checked is what the wheel holds and that it runs.
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    pip = (sys.executable, "-m", "pip", "--python", venv / "bin" / "python")
    _run(*pip, "install", "--quiet", "--no-compile", wheel, cwd=tmp_path)
    version = _run(
        sys.executable,
        "-c",
        "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])",
        cwd=ROOT,
    ).strip()
    cronfleet = venv / "bin" / "cronfleet"
    # Run from elsewhere than the repository, so that nothing is imported from the source tree.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert _run(cronfleet, "--version", cwd=elsewhere).strip() == f"cronfleet {version}"
    env = {"PATH": "/usr/bin:/bin", "CRONFLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.db'}"}
    assert "to revision" in _run(cronfleet, "db", "upgrade", cwd=elsewhere, env=env)
    page = _run(
        venv / "bin" / "python",
        "-c",
        "import importlib.resources as r, monitor.http, sys; "
        "print(r.files('monitor.http').joinpath('static/index.html').read_text()[:200]); "
        "print(monitor.http.__file__)",
        cwd=elsewhere,
    )
    assert "<html" in page.lower() and str(venv) in page
