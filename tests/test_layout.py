"""The house rules of tasks/: a stage module imports helpers, never another stage; helpers never import stages or flows."""
import ast
from pathlib import Path

from tests.conftest import REPO

TASKS = REPO / "tasks"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                names |= {base} if base else {a.name for a in node.names}
            elif base.startswith("culbot.tasks."):
                names.add(base.split(".")[2])
            elif base == "culbot.tasks":
                names |= {a.name for a in node.names}
            elif base.startswith("culbot.flows"):
                names.add("flows")
    return names


def _is_stage(path: Path) -> bool:
    return "@task(" in path.read_text(encoding="utf-8")


def test_stages_import_helpers_only_and_helpers_import_no_stage():
    modules = {p.stem: p for p in TASKS.glob("*.py") if p.stem != "__init__"}
    stages = {name for name, p in modules.items() if _is_stage(p)}
    assert stages == {"crawl_univ100", "crawl_cbnu", "generate_qa", "load_datasets", "merge_data", "index", "format_prompts", "tokenize_data",
                      "train", "evaluate", "merge_adapter", "publish"}
    bad = {}
    for name, path in modules.items():
        allowed_stage = {"train_entry"} if name == "train" else set()   # the train stage's own script
        wrong = (_imports(path) & (stages - {name})) - allowed_stage
        if "flows" in _imports(path):
            wrong.add("flows")
        if wrong:
            bad[name] = sorted(wrong)
    assert bad == {}
    assert "prefect" not in (TASKS / "train_entry.py").read_text()   # the training entrypoint has no Prefect in it
