"""Every citation of the method points to a section of docs/METHOD.md that exists."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "src").rglob("*.py")),
           *sorted((REPO / "tests").rglob("*.py")), *sorted((REPO / "benchmarks").glob("*.py"))]


def _sections() -> set[str]:
    text = (REPO / "docs" / "METHOD.md").read_text(encoding="utf-8")
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.M))


def test_citations_name_existing_sections():
    sections = _sections()
    assert {"1", "2", "2.3", "3.3", "4", "8", "10"} <= sections
    cited = 0
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        # the lower-case name was a specification outside the repository
        assert path == Path(__file__).resolve() or not re.search(r"(?<![A-Za-z])method\.md", text), path
        for match in re.finditer(r"METHOD\.md(?:\]\([^)]*\))? §(\d+(?:\.\d+)?)(?:–§(\d+(?:\.\d+)?))?", text):
            for number in filter(None, match.groups()):
                assert number in sections, f"{path.relative_to(REPO)} cites METHOD.md §{number}, which does not exist"
                cited += 1
    assert cited >= 10
