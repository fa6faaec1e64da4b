"""The built wheel carries ``daemonset/`` (issue #16): ``weft install`` renders it, so an
installed ``weft`` — not a source checkout — must find it as package data.

The wheel is built from a copy of the working tree (pip's isolated build, the backend
pyproject.toml names), installed with ``--target`` into a temporary directory, and run
from outside the source tree by an interpreter started with ``-S``: no site-packages, so
no editable install can answer for ``weft``; only the dependencies' directory is added
after the installed copy.  Its ``weft install`` output must equal the checkout's.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from weft.cli import cli

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("weft.yaml", "Dockerfile")
ARGS = ["install", "--namespace", "mesh", "--image", "registry.example/weft", "--tag", "9"]
NOT_SOURCES = shutil.ignore_patterns(
    ".venv", ".git", "node_modules", "__pycache__", "*.egg-info", "build", "dist",
    ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", ".import_linter_cache",
    "bench-results", "results", "*.png",
)  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src") / "weft"
    shutil.copytree(ROOT, src, symlinks=True, ignore=NOT_SOURCES)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"[-4000:]
    (built,) = out.glob("weft-*.whl")
    return built


def test_the_wheel_carries_the_manifests_as_files(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        for name in SHIPPED:
            assert z.read(f"weft/daemonset/{name}") == (ROOT / "daemonset" / name).read_bytes()
        # Regular files (a wheel has no symlinks), and nothing else of the checkout's.
        assert {n for n in z.namelist() if n.startswith("weft/daemonset/")} == {
            f"weft/daemonset/{name}" for name in SHIPPED
        }


def test_weft_install_runs_from_an_installed_copy(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q",
         "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    shipped = target / "weft" / "daemonset" / "weft.yaml"
    assert shipped.is_file() and not shipped.is_symlink()
    # The dependencies' directory: where this interpreter finds them (a venv's
    # site-packages, whose .pth files — an editable weft's finder — -S leaves unread).
    deps = str(Path(click.__file__).resolve().parents[1])
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
        "import weft, weft.cli.install as i; "
        "assert weft.__file__.startswith(sys.argv[1]), weft.__file__; "
        "assert str(i.TEMPLATE).startswith(sys.argv[1]), i.TEMPLATE; "
        "from weft.cli import main; sys.argv = ['weft', *sys.argv[3:]]; main()"
    )
    run = subprocess.run(
        [sys.executable, "-S", "-c", code, str(target), deps, *ARGS],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    checkout = CliRunner().invoke(cli, ARGS)
    assert checkout.exit_code == 0, checkout.output
    # The same manifests on stdout, the same next-step hint on stderr.
    assert (run.stdout, run.stderr) == (checkout.stdout, checkout.stderr)
    assert "image: registry.example/weft:9" in run.stdout and "namespace: mesh" in run.stdout
