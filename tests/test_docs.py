"""The docs site builds with no broken link, the CLI reference page is the parsers' own text,
and every link and ``#anchor`` of README.md resolves (as GitHub renders it)."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simsteer.cli import reference
from simsteer.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("mkdocs", reason="mkdocs (the dev extra) builds the docs site")
    config = ["-f", str(root / "mkdocs.yml"), "-d", str(site)]
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", *config],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
    )


def _copy_site_sources(dest: Path) -> Path:
    """The repository's mkdocs.yml, docs/ and src/ (for the API pages) under ``dest``."""
    shutil.copy(ROOT / "mkdocs.yml", dest / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", dest / "docs")
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_mkdocs_build_strict_passes(tmp_path):
    done = _mkdocs_build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "load_gguf_cvec" in api and "get_learner" in api  # mkdocstrings rendered the docstrings
    assert (tmp_path / "site" / "images" / "frontier.png").is_file()


def test_mkdocs_build_strict_fails_on_broken_links_and_pages_left_out(tmp_path):
    """One build with four faults: each is named, and the build fails."""
    root = _copy_site_sources(tmp_path)
    faults = {
        "index.md": "\nSee [a page that is not there](missing-page.md).\n",
        "concepts.md": "\nSee [an anchor](learners.md#no-such-heading).\n",
        "getting-started.md": "\n![a picture](images/not-there.png)\n",
    }
    for page, edit in faults.items():
        with (root / "docs" / page).open("a", encoding="utf-8") as fh:
            fh.write(edit)
    (root / "docs" / "orphan.md").write_text("# Orphan\n", encoding="utf-8")  # not in the nav
    done = _mkdocs_build(root, tmp_path / "site")
    assert done.returncode != 0
    for says in ("missing-page.md", "no-such-heading", "not-there.png", "orphan.md"):
        assert says in done.stdout + done.stderr, says


# -- the CLI reference ---------------------------------------------------------------------------------------
def test_cli_reference_page_is_current():
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert page == reference.render(), "docs/cli.md is stale: run python -m simsteer.cli.reference"


def test_cli_reference_holds_every_command_and_option():
    page = reference.render()
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        assert f"## sims {name}\n" in page
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in page, (name, flag)
            if action.option_strings and action.dest not in ("help",):
                assert action.help, f"sims {name} {action.option_strings[0]} has no help text"


def test_cli_reference_check_mode_reports_a_stale_page(tmp_path, capsys):
    page = tmp_path / "cli.md"
    assert reference.main([str(page)]) == 0
    assert reference.main([str(page), "--check"]) == 0
    page.write_text(page.read_text(encoding="utf-8").replace("sims run", "sims walk", 1), encoding="utf-8")
    assert reference.main([str(page), "--check"]) == 1
    assert "stale" in capsys.readouterr().err


# -- README links --------------------------------------------------------------------------------------------
def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*|_(?=\W)|<[^>]+>", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading anchor of a markdown text (repeats get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", markdown).splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    """The relative links and anchors of a markdown file that do not resolve."""
    text = path.read_text(encoding="utf-8")
    problems = []
    for m in LINK.finditer(FENCE.sub("", text)):
        target = m.group(1) or m.group(2)
        if re.match(r"^[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{target}: {linked} does not exist")
            continue
        if anchor and (linked.suffix != ".md" or anchor not in anchors(linked.read_text(encoding="utf-8"))):
            problems.append(f"{target}: no heading #{anchor} in {linked.name}")
    return problems


def test_readme_links_and_anchors_resolve():
    assert broken_links(ROOT / "README.md") == []


def test_readme_link_check_finds_what_is_broken(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Crash safety\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# T\n\n## Serving (`sims serve`)\n\n[ok](docs/guide.md#crash-safety) [ok](#serving-sims-serve) "
        "[bad](docs/nope.md) [bad anchor](#crash-safety) [bad](docs/guide.md#fluency) "
        "[web](https://example.org/x)\n```\n[not a link](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    problems = broken_links(readme)
    assert len(problems) == 3, problems
    assert any("nope.md" in p for p in problems)
    assert any("#crash-safety" in p and "README.md" in p for p in problems)
    assert any("#fluency" in p for p in problems)


def test_readme_is_a_guide_of_at_most_15_kb():
    assert (ROOT / "README.md").stat().st_size <= 15 * 1024


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert f"```bash\n{ci}\n```" in readme
