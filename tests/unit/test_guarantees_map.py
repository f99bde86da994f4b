"""``docs/guarantees.md`` maps every README guarantee to tests that exist, and says which fail.

A guarantee added to or renamed in the README's Guarantees list without a
section in the map fails here; so does a section for a guarantee the README
no longer makes, a section with no test, a test the map names that does not
exist, and a test whose known-defect mark (``xfail``) the map does not state
or states wrongly.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAP = ROOT / "docs" / "guarantees.md"
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+))?`")


def readme_guarantees() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Guarantees\n", 1)[1].split("\n## ", 1)[0]
    return [m.group(1).rstrip(".") for m in re.finditer(r"^- \*\*(.+?)\*\*", section, re.M)]


def map_sections() -> dict[str, str]:
    text = MAP.read_text().split("\n# ", 1)[0]  # the part kept in step with the README
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def is_xfail(path: Path, name: str) -> bool:
    lines = path.read_text().splitlines()
    (index,) = [i for i, line in enumerate(lines) if re.match(rf"(async )?def {name}\(", line)]
    above = []
    for line in reversed(lines[:index]):
        if not line.strip() or line.startswith(("def ", "async def ", "class ")):
            break
        above.append(line)
    return any("pytest.mark.xfail" in line for line in above)


def test_the_map_has_one_section_per_readme_guarantee_in_order() -> None:
    guarantees = readme_guarantees()
    assert len(guarantees) >= 5, guarantees
    assert list(map_sections()) == guarantees


def test_every_section_names_tests_that_exist_and_states_their_known_defects() -> None:
    for title, body in map_sections().items():
        refs = list(TEST_REF.finditer(body))
        assert refs, f"{title}: no test named"
        for line in body.splitlines():
            for ref in TEST_REF.finditer(line):
                path, name = ROOT / ref.group(1), ref.group(2)
                assert path.is_file(), f"{title}: {ref.group(1)} does not exist"
                if name is None:
                    continue
                source = path.read_text()
                assert re.search(rf"^(async )?def {name}\(", source, re.M), (
                    f"{title}: {ref.group(0)} does not exist"
                )
                said = "*xfail*" in line
                assert said == is_xfail(path, name), (
                    f"{title}: {ref.group(0)} is{'' if is_xfail(path, name) else ' not'} "
                    "marked xfail, and the map says otherwise"
                )


def test_the_other_promises_name_tests_that_exist() -> None:
    rest = MAP.read_text().split("\n# ", 1)[1]
    for ref in TEST_REF.finditer(rest):
        path = ROOT / ref.group(1)
        assert path.is_file(), ref.group(0)
        if ref.group(2):
            assert re.search(rf"^(async )?def {ref.group(2)}\(", path.read_text(), re.M), ref
