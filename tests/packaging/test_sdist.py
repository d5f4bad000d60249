"""The sdist holds everything needed to build, test and package policyd (MANIFEST.in):
every file of the checkout that git tracks or would track, nothing it ignores."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What the sdist must have even without git to list the checkout.
ESSENTIAL = ("LICENSE", "README.md", "Makefile", "setup.cfg", "pyproject.toml", "MANIFEST.in",
             ".ci/run", "tests/conftest.py", "debian/control", "debian/rules",
             "debian/copyright", "contrib/systemd/policyd.service", "docs/mailman-differences.md",
             "twisted/plugins/policyd_plugin.py", "policyd/manpages.py",
             "tests/packaging/trixie.sh")


def checkout_files() -> set[str] | None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    result = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return {line for line in result.stdout.splitlines() if (ROOT / line).is_file()}


def test_sdist_has_the_whole_checkout(tmp_path):
    """Build the sdist and compare its files with the checkout's."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
         "print(b.build_sdist(sys.argv[1]))", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    name = result.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as tar:
        top = name[:-len(".tar.gz")]
        members = {m.name[len(top) + 1:] for m in tar.getmembers() if m.isfile()}
    missing = [f for f in ESSENTIAL if f not in members]
    assert missing == [], f"not in the sdist: {missing}"
    files = checkout_files()
    if files is None:
        pytest.skip("no git checkout to compare the whole file list with")
    missing = sorted(f for f in files if f not in members)
    assert missing == [], f"in the checkout but not in the sdist: {missing}"
