"""docs/method.md, the method description the code cites: present, complete, and consistent with its citations."""

import re
from pathlib import Path

import pytest

from declip_hf.hub import model_card

REPO_ROOT = Path(__file__).resolve().parents[1]
METHOD = REPO_ROOT / "docs" / "method.md"
# The numbered sections code and tests cite as `docs/method.md §N`; their numbers must never change.
SECTION_TITLES = {
    1: "The decoupled final layer",
    2: "Region and mask features",
    3: "Training views",
    4: "Losses",
    5: "Optimisation recipe",
    6: "Zero-shot segmentation protocol",
    7: "Published reference numbers",
    8: "EVA02-CLIP students",
    9: "Other VFM teachers",
    10: "Ablation baselines",
}
DIFFERENCES_TITLE = "Where we differ from the authors' code, and why"
# Where project files live (everything a user or contributor reads); build outputs and environments are not scanned.
PROJECT_FOLDERS = ("declip_hf", "training", "tests", "configs", "benchmarks", "model_cards", "docs")
PROJECT_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".toml", ".txt")


def project_files() -> list[Path]:
    files = [REPO_ROOT / "README.md", REPO_ROOT / "pyproject.toml"]
    for folder in PROJECT_FOLDERS:
        files += [path for path in (REPO_ROOT / folder).rglob("*") if path.suffix in PROJECT_SUFFIXES]
    return [path for path in files if path.is_file() and "__pycache__" not in path.parts]


def cited_sections(text: str) -> set[int]:
    """Every section number cited as `§N`, `§N-M` (all of N..M) or `docs/method.md (section N and M)`."""
    numbers = set()
    for first, last in re.findall(r"§\s*(\d+)(?:\s*[-–]\s*(\d+))?", text):
        numbers.update(range(int(first), int(last or first) + 1))
    for first, second in re.findall(r"docs/method\.md\W{0,3}sections?\s+(\d+)(?:\s*(?:,|and)\s*(\d+))?", text):
        numbers.update(int(number) for number in (first, second) if number)
    return numbers


@pytest.fixture(scope="module")
def method_text() -> str:
    assert METHOD.is_file(), "docs/method.md is missing: the README, --help texts and code comments cite it"
    return METHOD.read_text()


def test_method_has_every_cited_section_in_order(method_text):
    headings = re.findall(r"^## (\d+)\. (.+)$", method_text, flags=re.MULTILINE)
    assert [int(number) for number, _ in headings] == list(SECTION_TITLES)
    for (number, title), expected in zip(headings, SECTION_TITLES.values()):
        assert title.startswith(expected), f"§{number} is titled {title!r}, expected {expected!r}"
    assert f"## {DIFFERENCES_TITLE}" in method_text


def test_every_section_citation_points_at_an_existing_section():
    wrong = {}
    for path in project_files():
        numbers = cited_sections(path.read_text(encoding="utf-8"))
        if numbers - set(SECTION_TITLES):
            wrong[str(path.relative_to(REPO_ROOT))] = sorted(numbers - set(SECTION_TITLES))
    assert not wrong, f"citations of sections docs/method.md does not have: {wrong}"


def test_section_citation_parser_reads_ranges_and_words():
    text = "docs/method.md §3-5; §7 and §2; see docs/method.md (section 1 and 9)"
    assert cited_sections(text) == {1, 2, 3, 4, 5, 7, 9}


def test_no_project_file_cites_a_document_outside_the_repository():
    # Assembled here so this file does not match itself.
    forbidden = ("method" + " notes", "declip-" + "method.md", "../" + "shared")
    offenders = [
        f"{path.relative_to(REPO_ROOT)}: {phrase!r}"
        for path in project_files()
        for phrase in forbidden
        if phrase in path.read_text(encoding="utf-8").lower()
    ]
    assert not offenders, f"cite docs/method.md instead: {offenders}"


def test_readme_links_the_method_page():
    assert "(docs/method.md)" in (REPO_ROOT / "README.md").read_text()


def test_method_names_only_files_and_constants_that_exist(method_text):
    paths = set(re.findall(r"`((?:declip_hf|training|configs|model_cards|tests|benchmarks)/[\w/.-]+)`", method_text))
    assert paths, "the method page should point at the code that implements it"
    missing_paths = sorted(path for path in paths if not (REPO_ROOT / path).exists())
    assert not missing_paths, f"docs/method.md names files that do not exist: {missing_paths}"
    code = "\n".join(path.read_text() for path in project_files() if path.suffix == ".py")
    constants = set(re.findall(r"`([A-Z][A-Z0-9]*_[A-Z0-9_]+)`", method_text))  # e.g. `SKIP_REASONS`
    assert constants, "the method page should name the constants that hold its lists"
    missing_constants = sorted(name for name in constants if not re.search(rf"^\s*{name}\b\s*=", code, re.MULTILINE))
    assert not missing_constants, f"docs/method.md names constants the code does not define: {missing_constants}"


def section(method_text: str, number: int) -> str:
    start = method_text.index(f"## {number}. ")
    return method_text[start : method_text.index("\n## ", start + 1)]


def test_published_numbers_match_the_model_card(method_text):
    """§7 and the card quote the same paper: every number the card uses appears in §7."""
    published = section(method_text, 7)
    numbers = [
        *model_card.PAPER_SEGMENTATION_MIOU.values(),
        *model_card.PAPER_SEGMENTATION_AVERAGE_MIOU.values(),
        model_card.PAPER_REGION_OPENAI.box_thing_mAcc,
        model_card.PAPER_REGION_OPENAI.box_stuff_mAcc,
        model_card.PAPER_REGION_EVA02.box_thing_mAcc,
        model_card.PAPER_REGION_EVA02.box_stuff_mAcc,
    ]
    missing = [value for value in numbers if f"{value:.1f}" not in published]
    assert not missing, f"§7 of docs/method.md lacks the card's numbers {missing}"
    card_template = (REPO_ROOT / "model_cards" / "declip_vision_model_card.md").read_text()
    for value in re.findall(r"\b\d{2}\.\d\b", card_template):
        assert value in published, f"the card template quotes {value}, which §7 does not list"
