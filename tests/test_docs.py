"""The README is the front door: short, opening with the two commands, carrying the reference
release's commands as written, and linking only to files (and headings) that exist."""
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README] + DOCS
UPSTREAM_README = REPO.parent / "shared" / "reference" / "upstream-README.md"
FRONT_PAGE_LIMIT = 12_000  # bytes, which is at least the number of characters

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def code_blocks(text):
    return FENCE.findall(text)


def prose(text):
    """The text outside fenced blocks, with inline code spans blanked (their brackets are not links)."""
    return re.sub(r"`[^`\n]*`", "`code`", FENCE.sub("", text))


def slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", prose(path.read_text()), re.M)}


def links(path):
    text = prose(path.read_text())
    found = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"<img [^>]*src=\"([^\"]+)\"", text)
    return [t for t in found if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # skip https:, mailto: ...


def test_front_page_is_short():
    size = len(README.read_bytes())
    assert size <= FRONT_PAGE_LIMIT, f"README.md is {size} bytes; move detail into docs/*.md"


def test_front_page_opens_with_the_quick_start_and_the_test_command():
    text = README.read_text()
    first_section = text.split("\n## ", 1)[0]
    blocks = code_blocks(first_section)
    assert len(blocks) >= 2, "the two commands come before the first section"
    quick, tests = (b.strip() for b in blocks[:2])
    assert quick.startswith("python3 -m venv .venv && ")
    assert quick.endswith(".venv/bin/python main_ear.py @configs/digits_quickstart.args")
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert tests == ci, "CI runs exactly the README's test command"


def _upstream_commands_from_tests():
    spec = importlib.util.spec_from_file_location("_upstream", REPO / "tests" / "test_upstream_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.UPSTREAM


@pytest.mark.parametrize("name", sorted(_upstream_commands_from_tests()))
def test_reference_commands_are_on_the_front_page(name):
    command = _upstream_commands_from_tests()[name]
    assert command in "\n".join(code_blocks(README.read_text())), f"the reference {name} command"


@pytest.mark.skipif(not UPSTREAM_README.exists(), reason="no ../shared/reference beside this clone")
def test_reference_commands_appear_as_written():
    ours = "\n".join(code_blocks(README.read_text()))
    for block in code_blocks(UPSTREAM_README.read_text()):
        if ".py" not in block:
            continue  # the citation
        for command in re.split(r"\n\s*\n", block.strip()):
            # A command continued with backslashes must appear whole; single-line ones may be
            # joined with && on our page.
            parts = [command] if "\\\n" in command else command.splitlines()
            for part in parts:
                assert part.strip() in ours, part


def test_every_doc_page_is_linked_from_the_front_page():
    linked = {(README.parent / t.split("#")[0]).resolve() for t in links(README)}
    assert {p.resolve() for p in DOCS} <= linked


def test_every_picture_in_docs_is_shown():
    shown = {(p.parent / t.split("#")[0]).resolve() for p in PAGES for t in links(p)}
    for picture in sorted((REPO / "docs").glob("*.png")):
        assert picture.resolve() in shown, picture.name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_existing_files_and_headings(page):
    targets = links(page)
    assert targets or page == README, "a page with no links back"
    for target in targets:
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page.resolve()
        assert path.exists(), f"{page.name}: {target} does not exist"
        assert REPO in path.parents, f"{page.name}: {target} leaves the repository"
        if anchor:
            assert path.suffix == ".md", target
            assert anchor in anchors(path), f"{page.name}: no heading #{anchor} in {path.name}"


def test_the_repository_cites_its_sources_not_files_beside_it():
    """The project stands alone: its text cites papers and public repositories, never the
    project's private notes beside the clone (a `SPEC` section, `../shared/`)."""
    texts = PAGES + sorted(REPO.glob("*.py")) + sorted(REPO.glob("[mub]*/*.py"))
    for path in texts:
        text = path.read_text()
        for word in ("SPEC", "../shared", "shared/reference"):
            assert word not in text, f"{path.relative_to(REPO)} names {word!r}"
