"""MkDocs hooks for the dmm_jax documentation (registered in mkdocs.yml under ``hooks``).

- ``docs/cli.md``: the marker ``<!-- cli-reference -->`` becomes the ``--help`` text of
  ``dmm-jax`` and of every subcommand, taken from ``dmm_jax.cli.build_parser()`` at build
  time, so the reference cannot drift from the parser.
- ``docs/changelog.md``: the marker ``<!-- changelog -->`` becomes the text of the top-level
  ``CHANGELOG.md`` (its links into ``docs/`` rewritten to be relative to the site).
- Every page: a Markdown link to a file of the repository outside ``docs/`` (such as
  ``../benchmarks/results/x.json``), which the site does not hold, becomes the file's path as
  code, so the pages read the same on GitHub and build without broken links.
"""

from __future__ import annotations

import os
import posixpath
import re
import sys
from pathlib import Path

from markdown import Extension

ROOT = Path(__file__).resolve().parent.parent
CLI_MARKER = "<!-- cli-reference -->"
CHANGELOG_MARKER = "<!-- changelog -->"
HELP_COLUMNS = 100  # a fixed width, so the generated text does not depend on the terminal

# [text](target) with a relative target: no scheme, not an anchor, not absolute.
_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<target>(?![a-z][a-z0-9+.-]*:|#|/)[^)\s]+)\)")


def _import_cli():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from dmm_jax import cli

    return cli


def cli_reference() -> str:
    """Markdown: a heading and a text block of ``format_help()`` per parser."""
    # argparse takes its width from $COLUMNS (through shutil); Python 3.14's colours are off
    # with PYTHON_COLORS=0. Both are restored afterwards.
    settings = {"COLUMNS": str(HELP_COLUMNS), "PYTHON_COLORS": "0", "NO_COLOR": "1"}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        parser = _import_cli().build_parser()
        subparsers = parser._subparsers._group_actions[0].choices  # name -> ArgumentParser
        sections = [("dmm-jax", parser.format_help())]
        sections += [(f"dmm-jax {name}", sub.format_help()) for name, sub in subparsers.items()]
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return "\n".join(f"## `{title}`\n\n```text\n{text.rstrip()}\n```\n" for title, text in sections)


def changelog() -> str:
    """CHANGELOG.md without its title (the page has one), links into docs/ made site-relative."""
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    text = re.sub(r"\[docs/([^\]]*)\]\(docs/", r"[\1](", "\n".join(lines))
    return re.sub(r"\]\(docs/", "](", text).strip() + "\n"


def _outside_links(markdown: str, page_path: str, docs_dir: Path) -> str:
    """Links to files of the repository outside docs_dir become the file's path as code."""
    page_dir = posixpath.dirname(page_path)

    def replace(match: re.Match) -> str:
        target = match.group("target").split("#", 1)[0]
        if not target:
            return match.group(0)
        resolved = (docs_dir / page_dir / target).resolve()
        if resolved.is_relative_to(docs_dir.resolve()):
            return match.group(0)  # a page or file of the site: MkDocs checks it
        path = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else target
        text = match.group("text")
        if text.strip("`") == path or text.startswith("`"):
            return f"`{path}`"
        return f"{text} (`{path}`)"

    # Leave fenced code blocks alone.
    parts = re.split(r"(^```.*?^```)", markdown, flags=re.MULTILINE | re.DOTALL)
    return "".join(part if part.startswith("```") else _LINK.sub(replace, part) for part in parts)


class _NoUnderscoreEmphasis(Extension):
    """Underscores never mean emphasis: the pages and the docstrings write subscripts in plain
    text (``x_{1:t}``, ``(x)_t``), which Markdown would otherwise italicise. Emphasis is
    written with asterisks."""

    def extendMarkdown(self, md) -> None:
        delimiters = getattr(md, "delimiters", None)
        if delimiters is not None and hasattr(delimiters, "remove"):  # Python-Markdown >= 3.11
            delimiters.remove("_")
        if "em_strong2" in md.inlinePatterns:  # earlier versions
            md.inlinePatterns.deregister("em_strong2")


def on_config(config):
    # An instance in the list: the pages' Markdown and mkdocstrings' (docstrings) both use it.
    config.markdown_extensions.append(_NoUnderscoreEmphasis())
    return config


def on_page_markdown(markdown: str, page, config, files) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if CHANGELOG_MARKER in markdown:
        markdown = markdown.replace(CHANGELOG_MARKER, changelog())
    return _outside_links(markdown, page.file.src_uri, Path(config["docs_dir"]))
