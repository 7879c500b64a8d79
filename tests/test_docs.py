"""The documents stay honest about where their numbers come from: every result JSON under benchmarks/results/ is
listed in RESULTS.md, every dated history file under docs/experiments/ is linked from it, and no document carries
tracker or session numbers."""

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "RESULTS.md"
DOCUMENTS = [ROOT / "README.md", RESULTS, ROOT / "data" / "DATASHEET.md", ROOT / "eval" / "README.md"]
DOCUMENTS += sorted((ROOT / "docs").rglob("*.md"))


def test_every_result_json_is_listed_in_results_md():
    text = RESULTS.read_text()
    missing = [p.name for p in sorted((ROOT / "benchmarks" / "results").glob("*.json")) if p.name not in text]
    assert not missing, f"RESULTS.md does not list these result files: {missing}"


def test_every_experiment_note_is_linked_from_results_md():
    text = RESULTS.read_text()
    missing = [p.name for p in sorted((ROOT / "docs" / "experiments").glob("*.md")) if p.name not in text]
    assert not missing, f"RESULTS.md does not link these experiment notes: {missing}"


def test_documents_carry_no_tracker_or_session_numbers():
    pattern = re.compile(r"(?i)\b(issues?|sessions?)\s+#?\d|(?<![\w&/])#\d+\b")
    found = [
        f"{path.relative_to(ROOT)}: {match.group(0)!r}"
        for path in DOCUMENTS
        for match in pattern.finditer(path.read_text())
    ]
    assert not found, found
