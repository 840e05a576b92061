"""The documentation the code cites exists, and the README's usage example runs as written."""
import os
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = [p for d in ("zeromoe_cupy", "tests", "examples", "benchmarks")
           for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".cu", ".cuh", ".md", ".sh")]
SOURCES.append(ROOT / "README.md")


def test_cited_documents_exist():
    cited = set()
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        # a file of that name is not part of the repository
        assert "SPEC" ".md" not in text, f"{path.relative_to(ROOT)} cites SPEC" ".md"
        cited |= set(re.findall(r"docs/[\w.-]+\.md", text))
    assert "docs/spec.md" in cited
    for doc in cited:
        assert (ROOT / doc).is_file(), doc


def test_spec_has_one_section_per_topic():
    spec = (ROOT / "docs" / "spec.md").read_text(encoding="utf-8")
    sections = re.findall(r"^## (.+)$", spec, re.M)
    for topic in ("Forward pass", "Routing rules", "Zero expert types", "Numerics and accuracy"):
        assert topic in sections
    assert len(sections) == len(set(sections))


def test_readme_usage_runs(monkeypatch):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    usage = readme[readme.index("From a config, with random weights:"):]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    monkeypatch.chdir(os.path.dirname(__file__))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    from zeromoe_cupy.reference import relative_error
    y = scope["y"]
    y = y.get() if hasattr(y, "get") else y
    assert relative_error(y, scope["y_ref"]) <= 1e-5
