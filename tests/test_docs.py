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


def _hf_config_tables():
    """docs/spec.md "Hugging Face configs": {model_type or "*": {key: (sets, absent)}}."""
    spec = (ROOT / "docs" / "spec.md").read_text(encoding="utf-8")
    section = spec[spec.index("## Hugging Face configs"):]
    section = section[:section.index("\n## ", 1)]
    tables, current = {}, "*"
    for line in section.splitlines():
        m = re.search(r'\(`model_type` "([^"]+)"', line)
        if m:
            current = m.group(1)
        if line.startswith("| `"):
            key_col, sets, absent = [c.strip() for c in line.strip("|").split(" | ")]
            for key in re.findall(r"`([^`]+)`", key_col):
                tables.setdefault(current, {})[key] = (sets, absent)
    return tables


def test_hf_config_tables_list_the_keys_the_code_reads():
    import json

    import zeromoe_cupy as zm
    from zeromoe_cupy.config import HF_MODEL_TYPES, _Keys
    from helpers import hf_keys_read

    tables = _hf_config_tables()
    assert set(tables) == {"*"} | set(HF_MODEL_TYPES)
    for model_type, parse in HF_MODEL_TYPES.items():
        # every branch: MoE++ reads moe_gate_norm_std only under logits normalization
        config = {"model_type": model_type, "moe_use_logits_norm": True}
        documented = tables[model_type]
        assert set(documented) | set(tables["*"]) == hf_keys_read(config), model_type
        defaults = zm.MoEConfig.from_hf_config({"model_type": model_type})
        for field, key in parse(_Keys(config, "config"))["keys"].items():
            sets, absent = documented[key]
            assert sets.startswith(f"`{field}`"), (model_type, key, sets)
            if sets == f"`{field}`":  # the value as it is: the default is the field's
                assert json.loads(absent) == getattr(defaults, field), (model_type, key)
