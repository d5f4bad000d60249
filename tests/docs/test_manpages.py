"""The man pages are generated from the code (``policyd.manpages``) and cover it all:
every ``policyctl`` command and option, every ``policyd`` option, every configuration
key with a description; ``man -l`` renders each page without a warning."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess

import pytest

from policyd import manpages
from policyd.config import SCHEMA

from ..requirements import require

pytest.importorskip("docutils", reason="docutils renders the pages (the test extra)")


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("man")
    manpages.write(outdir)
    return outdir


def rendered(path) -> str:
    require(shutil.which("man") is not None, "man (man-db) is not installed")
    result = subprocess.run(["man", "--warnings", "-l", str(path)], capture_output=True,
                            text=True, env={**os.environ, "MANWIDTH": "200",
                                            "MANPAGER": "cat", "PAGER": "cat",
                                            "LC_ALL": "C.UTF-8"}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", f"man -l {path.name}: {result.stderr}"
    # man hyphenates and justifies: compare words, unbroken.
    return " ".join(result.stdout.replace("\u2010\n", "").replace("-\n", "-").split())


@pytest.mark.parametrize("name", sorted(manpages.PAGES))
def test_man_renders(pages, name):
    """``man -l`` renders the page without a troff warning, with its name and section."""
    text = rendered(pages / name)
    title, section = name.rsplit(".", 1)
    assert f"{title}({section})" in text


def test_every_config_key_is_described():
    """Each key of ``policyd.config.SCHEMA`` has a description in ``KEY_HELP`` (a new key
    without one fails here), and ``KEY_HELP`` describes no key that does not exist."""
    assert manpages.missing_key_help() == []
    stale = [f"[{s}] {k}" for s, keys in manpages.KEY_HELP.items() for k in keys
             if k not in SCHEMA.get(s, {})]
    assert stale == []


def test_conf_page_lists_every_key(pages):
    """policyd.conf(5) has every section and every key with its default."""
    text = rendered(pages / "policyd.conf.5")
    for section, key, _type, default, _allowed, _help in manpages.schema_entries():
        assert f"[{section}]" in text
        shown = default if default != "" else "(empty)"
        assert f"{key} = {' '.join(shown.split())}" in text, f"[{section}] {key}"


def test_policyctl_page_lists_every_command_and_option(pages):
    """policyctl(8) has an entry for every subcommand the parser has, with each of its
    options; every subcommand has a help text."""
    text = rendered(pages / "policyctl.8")
    parser = manpages.ctl_parser()
    seen = 0
    for path, child, help_, _aliases in manpages.commands(parser):
        seen += 1
        assert help_.strip(), f"policyctl {' '.join(path)} has no help text"
        assert f"policyctl {' '.join(path)}" in text
        for action in manpages.options(child):
            for option in action.option_strings:
                assert option in text, f"policyctl {' '.join(path)} {option}"
    assert seen >= 10
    for code, _meaning in manpages.exit_codes(parser.epilog):
        assert code in text
    assert "EXIT STATUS" in text


def test_policyd_page_lists_every_option(pages):
    """policyd(8) has every option of the daemon's parser, its signals and files."""
    text = rendered(pages / "policyd.8")
    for action in manpages.daemon_parser()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        for option in action.option_strings:
            assert option in text
    for word in ("SIGHUP", "SIGTERM", "/etc/policyd/policyd.conf", "EXIT STATUS"):
        assert word in text


def test_default_conf_parses_to_the_defaults(tmp_path):
    """The commented policyd.conf the package ships is a valid file naming every key."""
    from policyd import config

    text = manpages.default_conf()
    path = tmp_path / "policyd.conf"
    path.write_text(text)
    config.load(path)
    for section, key, *_ in manpages.schema_entries():
        assert f"#{key} =" in text.split(f"[{section}]", 1)[1]
