"""The documentation site builds with ``mkdocs build --strict`` (no warnings: no broken links or
anchors, no docstring griffe cannot read), and its generated pages hold what they promise.

Needs the ``docs`` extra (also part of ``test``); skips, saying so, without it. The site is
built once for the whole module, into a temporary directory.
"""

from __future__ import annotations

import html
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MISSING_EXTRA = 'needs the docs extra: pip install -e ".[docs]"'


def _page_text(site: pathlib.Path, page: str) -> str:
    """The text of a built page, tags stripped and entities decoded."""
    raw = (site / page).read_text(encoding="utf-8")
    return html.unescape(re.sub(r"<[^>]+>", "", raw))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason=f"{module} is not installed; {MISSING_EXTRA}")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(out),
        ],
        check=False,
        cwd=out,  # paths in mkdocs.yml resolve against the file, not the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"mkdocs build --strict failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return out


def test_site_builds_strict_with_every_page(site):
    for page in (
        "index.html",
        "getting-started/index.html",
        "models/index.html",
        "data/index.html",
        "USAGE/index.html",
        "cli/index.html",
        "api/index.html",
        "RESULTS/index.html",
        "PERFORMANCE/index.html",
        "DISTRIBUTED/index.html",
        "reliability/index.html",
        "changelog/index.html",
    ):
        assert (site / page).is_file(), page
    assert not (site / "hooks.py").exists()  # the build's own hook is not published


def test_cli_reference_holds_every_subcommands_help(site):
    from dmm_jax.cli import build_parser

    text = _page_text(site, "cli/index.html")
    assert "<!-- cli-reference -->" not in text
    assert "--model" in text and "--estimator" in text
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    assert set(subparsers) >= {"train", "evaluate", "sample", "forecast", "posterior", "impute"}
    for name, sub in subparsers.items():
        assert f"usage: dmm-jax {name}" in text, name
        for action in sub._actions:
            for flag in action.option_strings:
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (name, flag)


def test_changelog_and_api_pages_are_filled_in(site):
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    first_section = next(line[3:] for line in changelog.splitlines() if line.startswith("## "))
    assert first_section in _page_text(site, "changelog/index.html")
    api = (site / "api/index.html").read_text(encoding="utf-8")
    for name in (
        "dmm_jax.train.fit",
        "dmm_jax.config.DMMConfig",
        "dmm_jax.models.vrnn.model_guide",
    ):
        assert f'id="{name}"' in api, name
