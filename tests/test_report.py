"""``benchmarks/report.py --check``: the summary of docs/benchmarks.md must be recomputable from the result files."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "report.py"
DOC = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
START, END = "<!-- summary:start -->", "<!-- summary:end -->"


def check(page: Path = DOC, readme: Path = README) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", "--page", str(page), "--readme", str(readme)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def summary_rows(text: str) -> tuple[list[str], list[list[str]]]:
    block = text.split(START, 1)[1].split(END, 1)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    return cells[0], cells[2:]


def with_cell(text: str, row: int, column: str, new: str) -> str:
    """``text`` with one cell of the summary table replaced."""
    head, rows = summary_rows(text)
    old_line = "| " + " | ".join(rows[row]) + " |"
    assert old_line in text
    cells = list(rows[row])
    cells[head.index(column)] = new
    return text.replace(old_line, "| " + " | ".join(cells) + " |", 1)


def bump(value: str) -> str:
    """The first decimal number of ``value`` moved by one in its last digit."""
    m = re.search(r"\d+\.\d+", value)
    digits = len(m.group().split(".")[1])
    return value[:m.start()] + f"{float(m.group()) + 10 ** -digits:.{digits}f}" + value[m.end():]


def test_the_committed_page_passes():
    r = check()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "every number of the summary comes from the result files" in r.stdout


def test_the_summary_covers_the_five_label_kinds():
    _, rows = summary_rows(DOC.read_text())
    labels = " ".join(r[0] for r in rows)
    for kind in ("boxes", "points", "scribbles", "noisy masks", "tags"):
        assert kind in labels, kind


@pytest.mark.parametrize("column", ["Dice / full", "Dice: method / full", "baseline: Dice / full"])
def test_one_altered_number_fails(tmp_path, column):
    text = DOC.read_text()
    head, rows = summary_rows(text)
    i = next(i for i, r in enumerate(rows) if re.search(r"\d+\.\d+", r[head.index(column)]))
    altered = bump(rows[i][head.index(column)])
    page = tmp_path / "benchmarks.md"
    page.write_text(with_cell(text, i, column, altered))
    r = check(page, tmp_path / "no_readme.md")
    assert r.returncode == 1, r.stdout + r.stderr
    assert altered in r.stdout and column in r.stdout, r.stdout


def test_a_changed_budget_or_seed_list_fails(tmp_path):
    text = DOC.read_text()
    text = with_cell(text, 0, "budget", "15 epochs, 64 px, 4000 training images")
    text = with_cell(text, 1, "seeds", "0, 1, 2")
    page = tmp_path / "benchmarks.md"
    page.write_text(text)
    r = check(page, tmp_path / "no_readme.md")
    assert r.returncode == 1
    assert "4000 training images" in r.stdout and "'0, 1, 2'" in r.stdout, r.stdout


def test_a_row_naming_a_missing_result_file_fails(tmp_path):
    text = DOC.read_text()
    head, rows = summary_rows(text)
    cell = rows[0][head.index("rows compared")]
    page = tmp_path / "benchmarks.md"
    page.write_text(with_cell(text, 0, "rows compared", cell + ", `no_such_result`"))
    r = check(page, tmp_path / "no_readme.md")
    assert r.returncode == 1 and "no_such_result" in r.stdout, r.stdout


def test_a_readme_ratio_that_is_not_in_the_summary_fails(tmp_path):
    readme = README.read_text()
    section = re.search(r"^## How well it works\n(.*?)(?=^## )", readme, re.S | re.M)
    assert section, "README.md has no 'How well it works' section"
    line = next(ln for ln in section.group(1).splitlines() if re.match(r"\| .* \| \d\.\d\d", ln))
    cells = line.split("|")
    cells[3] = " 0.01 "  # the Dice / full column
    altered = tmp_path / "README.md"
    altered.write_text(readme.replace(line, "|".join(cells), 1))
    r = check(DOC, altered)
    assert r.returncode == 1 and "0.01" in r.stdout, r.stdout


def test_every_result_file_is_on_the_page():
    text = DOC.read_text()
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        assert f"`{path.stem}`" in text or f"results/{path.stem}.json" in text, path.name


def test_the_page_tells_no_development_history():
    text = DOC.read_text().lower()
    for pattern in (r"\bsession", r"\bround \d", r"\bissue", r"\bearlier\b", r"\bthis round", r"no gpu was lent",
                    r"throwaway", r"\breplaced the", r"written up"):
        assert not re.search(pattern, text), pattern


def test_the_summary_links_point_at_headings():
    text = DOC.read_text()
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", text, re.M)}
    for link in re.findall(r"\]\(#([^)]+)\)", text):
        assert link in anchors, link
