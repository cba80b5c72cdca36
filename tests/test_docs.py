"""The documentation stays true: the configuration reference is generated and fresh, the README
is a guide, every page and results file is reachable, and every link and named test exists.

No Spark: only ``etl.config`` (through ``etl.configdoc``) is imported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from etl import configdoc

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
README_MAX_LINES = 250

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
NAMED_TEST = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def pages() -> list[Path]:
    """README.md and every markdown page under docs/."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def links(page: Path) -> list[str]:
    """The targets of the inline links of ``page`` (code blocks and code spans left out)."""
    text = CODE.sub("", FENCE.sub("", page.read_text()))
    return LINK.findall(text)


def local_target(page: Path, target: str) -> Path | None:
    """The file a relative link points at, or None for a URL or an anchor in the same page."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
        return None
    return (page.parent / target.split("#", 1)[0]).resolve()


def test_configuration_reference_is_fresh():
    doc = configdoc.DOC_PATH
    assert doc.exists(), f"{doc} is missing: run `{configdoc.COMMAND}`"
    assert doc.read_text() == configdoc.render(), (
        f"{doc.relative_to(ROOT)} differs from etl/config.py: run `{configdoc.COMMAND}`")


def test_the_reference_names_every_key():
    text = configdoc.render()
    for section in configdoc.config.Config.__dataclass_fields__:
        assert f"## `{section}`" in text
    for key in ("score.fast_decode", "ingest.sources[].max_member_bytes", "select.rule",
                "targets.nprobe", "train.shuffle_buffer"):
        assert f"`{key}`" in text, key


def test_readme_is_a_guide_under_the_line_limit():
    n = len(README.read_text().splitlines())
    assert n < README_MAX_LINES, f"README.md has {n} lines; move detail to docs/"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = [t for t in links(page) if (f := local_target(page, t)) and not f.exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_every_page_and_results_file_is_linked():
    linked: set[Path] = set()
    for page in pages():
        for target in links(page):
            f = local_target(page, target)
            if f is not None and f != page.resolve():
                linked.add(f)
    wanted = [*sorted(DOCS.rglob("*.md")), *sorted(p for p in RESULTS.iterdir() if p.is_file())]
    orphans = [str(p.relative_to(ROOT)) for p in wanted if p.resolve() not in linked]
    assert not orphans, f"not linked from README.md or any docs/ page: {orphans}"


def test_every_named_test_exists():
    missing = []
    for page in pages():
        for path, name in NAMED_TEST.findall(page.read_text()):
            file = ROOT / path
            if not file.exists() or not re.search(rf"^\s*def {name}\(", file.read_text(), re.M):
                missing.append(f"{page.relative_to(ROOT)}: {path}::{name}")
    assert not missing, f"named tests that do not exist: {missing}"


@pytest.mark.parametrize("result", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_json_results_record_their_provenance(result):
    prov = json.loads(result.read_text()).get("provenance")
    assert isinstance(prov, dict), f"{result.name} has no provenance block"
    for key in ("commit", "date", "host", "command", "packages"):
        assert key in prov, f"{result.name}: provenance lacks {key!r} (null when unknown)"
    assert {"cores", "memory_gb"} <= set(prov["host"]), f"{result.name}: host lacks cores/memory"


@pytest.mark.parametrize("result", sorted(RESULTS.glob("*.md")), ids=lambda p: p.name)
def test_markdown_results_start_with_their_provenance(result):
    text = result.read_text()
    assert "## Provenance" in text.split("## Results")[0], f"{result.name} has no provenance"
    for field in ("commit", "date", "host", "command", "packages"):
        assert f"- {field}:" in text, f"{result.name}: provenance lacks {field}"
