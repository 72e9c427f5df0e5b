"""The "Equation map" and "Layout" tables of docs/architecture.md against the source tree.

Every `file.py:name` of the equation map must be defined in that file, and every module of `hf_scratch/` and
`training/` must appear in the layout table: in a row of its own, or, for a folder row (a path ending in `/`), named
in that row's description by its path within the folder. The files are read with `ast`, never imported. The README
links the page, so the map stays findable from the front page.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"
TEXT = PAGE.read_text(encoding="utf-8")
LOCATION = re.compile(r"`(?P<path>[\w./-]+\.py):(?P<name>[\w.]+)`")
DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def section(title: str) -> str:
    """The text of the page's `## title` section, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", TEXT, flags=re.MULTILINE | re.DOTALL)
    assert match, f"{PAGE.relative_to(ROOT)} has no '## {title}' section"
    return match.group(1)


def table_rows(text: str) -> list[list[str]]:
    """The cells of each body row of the Markdown tables in `text`, header rows left out; `\\|` inside a cell is a
    literal bar."""
    rows, in_body = [], False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_body = False
        elif set(line) <= set("|-: "):
            in_body = True  # the separator under a header
        elif in_body:
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def defines(source: str, qualified_name: str) -> bool:
    """Whether `source` defines `qualified_name`: a top-level function or class, `Class.method`, or a function
    defined inside another (`function.inner`)."""
    body = ast.parse(source).body
    for part in qualified_name.split("."):
        node = next((node for node in body if isinstance(node, DEFINITIONS) and node.name == part), None)
        if node is None:
            return False
        body = node.body
    return True


def equation_locations() -> list[tuple[str, str]]:
    rows = [row for row in table_rows(section("Equation map")) if len(row) == 3]
    locations = []
    for equation, _, implementation in rows:
        found = [(match["path"], match["name"]) for match in LOCATION.finditer(implementation)]
        assert found, f"the equation map's row {equation!r} names no `file.py:name`"
        locations += found
    return locations


def test_equation_map_names_exist():
    locations = equation_locations()
    assert len(locations) >= 20
    missing = []
    for path, name in locations:
        file = ROOT / path
        if not file.is_file() or not defines(file.read_text(encoding="utf-8"), name):
            missing.append(f"{path}:{name}")
    assert not missing, f"the equation map names what its file does not define: {missing}"


def test_defines_rejects_a_wrong_name():
    source = """
class Scheduler:
    def step(self):
        def inner():
            pass


def helper():
    pass
"""
    assert defines(source, "Scheduler") and defines(source, "Scheduler.step") and defines(source, "helper")
    assert defines(source, "Scheduler.step.inner")
    for wrong in ("Schedulr", "Scheduler.stepp", "helper.step", "step", "inner"):
        assert not defines(source, wrong), wrong


def layout() -> dict[str, str]:
    """Path → description of every row of the layout table."""
    return {row[0].strip("`"): row[1] for row in table_rows(section("Layout")) if len(row) == 2}


def test_layout_paths_exist():
    missing = [path for path in layout() if not (ROOT / path).exists()]
    assert not missing, f"the layout table lists paths that do not exist: {missing}"


def test_layout_names_every_module():
    rows = layout()
    modules = [
        path.relative_to(ROOT).as_posix()
        for folder in ("hf_scratch", "training")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.name != "__init__.py"
    ]
    modules = [module for module in modules if not module.startswith("hf_scratch/pretrained/")]

    def listed(module: str) -> bool:
        if module in rows:
            return True
        return any(
            path.endswith("/") and module.startswith(path) and f"`{module.removeprefix(path)}`" in description
            for path, description in rows.items()
        )

    assert len(modules) > 30
    unlisted = [module for module in modules if not listed(module)]
    assert not unlisted, f"the layout table does not name these modules: {unlisted}"


def test_the_front_page_links_this_page_and_every_local_link_resolves():
    """The README sends readers here, and no link of the README or of docs/*.md points at a missing file."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"({PAGE.relative_to(ROOT).as_posix()})" in readme
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)  # links outside code
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            path = link.partition("#")[0]
            if path and not re.match(r"\w+://", link) and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {link}")
    assert not broken, f"links to missing files: {broken}"
