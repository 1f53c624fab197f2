"""The documentation's links: every relative link and image in README.md and docs/ points to a file
(and heading) that exists, and no page cites an issue number; the commit and machine line that heads
every page the study tools write. Reads files and runs git; no training."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lab.docs_index import FENCE, LINK, prose, require_indexed, unindexed_pages
from lab.provenance import machine, provenance
from plumbing import git_commit
from sac_model import SACError

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md")),
         *sorted((REPO / "docs" / "studies").glob("*.md"))]
ISSUE_REFERENCE = re.compile(r"(?<![&\w])#\d+\b")


def anchors(page: Path) -> set[str]:
    """The heading anchors GitHub gives a Markdown page: lower case, punctuation dropped, spaces to hyphens."""
    slugs: set[str] = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            title = re.sub(r"[`*_]", "", heading.group(1)).lower()
            slugs.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return slugs


def broken_links(page: Path) -> list[str]:
    """Each relative link or image of `page` whose file, or whose heading in a Markdown file, does not exist."""
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: and the like: not this repository's files
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file {file.relative_to(REPO) if file.is_relative_to(REPO) else file})")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target} (no heading #{fragment} in {file.name})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_and_image_resolves(page: Path) -> None:
    assert broken_links(page) == [], page


def test_a_broken_link_or_heading_is_caught(tmp_path: Path) -> None:
    (tmp_path / "there.png").write_bytes(b"")
    (tmp_path / "other.md").write_text("# A page\n\n## The flags you will change most\n")
    page = tmp_path / "page.md"
    page.write_text("![ok](there.png) ![gone](curves.png) [ok](other.md#the-flags-you-will-change-most)\n"
                    "[bad](other.md#no-such-heading) [web](https://example.com/x.png)\n"
                    "```bash\n[not a link](nowhere.md)\n```\n`[code](nowhere.md)`\n")
    assert broken_links(page) == [f"curves.png (no file {tmp_path / 'curves.png'})",
                                  "other.md#no-such-heading (no heading #no-such-heading in other.md)"]


def test_the_docs_index_links_every_page() -> None:
    assert unindexed_pages(REPO / "docs" / "README.md") == []


def test_a_page_missing_from_the_index_is_caught(tmp_path: Path) -> None:
    (tmp_path / "studies").mkdir()
    for page in ("question.md", "studies/listed.md", "studies/forgotten.md", "forgotten_too.md"):
        (tmp_path / page).write_text("# A page\n")
    index = tmp_path / "README.md"
    index.write_text("[question](question.md#a-page) [listed](studies/listed.md)\n"
                     "```\n[not a link](forgotten_too.md)\n```\n")
    assert unindexed_pages(index) == ["forgotten_too.md", "studies/forgotten.md"]


def test_a_study_refuses_to_commit_a_page_its_docs_index_does_not_list(tmp_path: Path) -> None:
    """A study run with --commit would land a page the docs test fails on: it says so before its first run."""
    docs = tmp_path / "docs"
    (docs / "studies").mkdir(parents=True)
    (docs / "README.md").write_text("| [listed.md](studies/listed.md) | a study |\n")
    require_indexed(docs / "studies" / "listed.md")  # listed before its page exists: fine
    require_indexed(tmp_path / "elsewhere" / "new.md")  # no docs index above it: not checked
    with pytest.raises(SACError, match="does not link studies/new.md"):
        require_indexed(docs / "studies" / "new.md")
    # --report-only: were the check gone, the study would write its page at once instead of training for minutes.
    confirm = subprocess.run([sys.executable, "-m", "lab.confirm", "--name", "new", "--seeds", "0", "--commit",
                              "--report-only", "--docs-dir", str(docs / "studies")], cwd=tmp_path,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert confirm.returncode == 2 and confirm.stderr.count("\n") == 1 and "does not link studies/new.md" in \
        confirm.stderr, confirm.stderr
    assert not (tmp_path / "studies").exists() and not (docs / "studies" / "new.md").exists()  # nothing ran


def test_a_committed_study_commits_its_page_before_its_first_run_so_the_index_never_links_nothing(
        tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "studies").mkdir(parents=True)
    (docs / "README.md").write_text("| [new.md](studies/new.md) | a study |\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "the index row first")
    # A seed whose run fails at once: the page must already be committed when it does.
    confirm = subprocess.run([sys.executable, "-m", "lab.confirm", "--name", "new", "--seeds", "0", "--commit",
                              "--train-args", "--env NoSuchEnv-v0", "--docs-dir", str(docs / "studies")],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(REPO), "GIT_AUTHOR_NAME": "t",
                                  "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
                                  "GIT_COMMITTER_EMAIL": "t@example.com"})
    assert confirm.returncode == 2 and "defaults__seed0 exited with code" in confirm.stderr, confirm.stderr
    committed = subprocess.run(["git", "show", "--name-only", "--format=%s", "HEAD"], cwd=tmp_path,
                               capture_output=True, text=True, check=True).stdout.split("\n")
    assert committed[0] == "new: started, no seed finished yet"
    assert sorted(filter(None, committed[1:])) == ["docs/studies/new.json", "docs/studies/new.md"]
    assert "(0 of 1 seeds finished)" in (docs / "studies" / "new.md").read_text()
    assert broken_links(docs / "README.md") == [] and broken_links(docs / "studies" / "new.md") == []


def test_no_page_cites_an_issue_number() -> None:
    # A reader of the repository has the git log, not the tracker the numbers pointed to.
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        assert ISSUE_REFERENCE.findall(page.read_text()) == [], page
    assert ISSUE_REFERENCE.findall("fixed in issue #10, see #3") == ["#10", "#3"]
    assert ISSUE_REFERENCE.findall("[What to expect](#what-to-expect) &#39;") == []


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo, check=True,
                   capture_output=True)


def test_a_page_header_names_the_commit_and_whether_the_code_differs_from_it(tmp_path: Path) -> None:
    assert git_commit(tmp_path) is None and provenance(tmp_path).startswith("Ran at an unknown commit")
    git(tmp_path, "init", "-q")
    (tmp_path / "docs").mkdir()
    (tmp_path / "train.py").write_text("steps = 1\n")
    (tmp_path / "docs" / "page.md").write_text("# A page\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "first")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                         text=True).stdout.strip()
    assert git_commit(tmp_path) == sha
    (tmp_path / "docs" / "page.md").write_text("# A page, rewritten by the study that is running\n")
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert provenance(tmp_path) == f"Ran at commit `{sha}` on {machine()}."
    (tmp_path / "train.py").write_text("steps = 2\n")
    assert provenance(tmp_path) == f"Ran at commit `{sha}` (with uncommitted changes) on {machine()}."
    assert f"{os.cpu_count()} logical cores" in machine()
