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
    return "\nSTAGE = Stage(" in path.read_text(encoding="utf-8")


def test_stages_import_helpers_only_and_helpers_import_no_stage():
    modules = {p.stem: p for p in TASKS.glob("*.py") if p.stem != "__init__"}
    stages = {name for name, p in modules.items() if _is_stage(p)}
    assert stages == {"crawl_univ100", "crawl_cbnu", "generate_qa", "load_dataset", "feedback_data", "merge_data", "index", "format", "tokenize",
                      "train", "eval", "merge_adapter", "publish"}
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


def _readme_layout() -> dict[str, tuple[str, str]]:
    """file -> (folder, what the README's Layout block says of it), for the files it lists under flows/ and tasks/."""
    import re

    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    out, folder = {}, ""
    for line in block.splitlines():
        if m := re.match(r"^(\w[\w_]*)/\s", line):
            folder = m.group(1)
        elif m := re.match(r"^  (\w+\.py)\s+(.*)$", line):
            out[f"{folder}/{m.group(1)}"] = (folder, m.group(2))
    return out


def test_the_readme_layout_lists_every_module_and_which_are_stages():
    """Issue 25: the layout a newcomer reads is the code's: every module of tasks/ and flows/ is listed once, each stage
    module (the ones with a Prefect task) as 'stage:', every other tasks/ module as a helper (or the training script), and
    each stage module is named as its stage (crawl-univ100 -> crawl_univ100.py, eval -> eval.py)."""
    import re

    listed = _readme_layout()
    modules = {p.relative_to(REPO).as_posix() for d in ("tasks", "flows") for p in (REPO / d).glob("*.py") if p.stem != "__init__"}
    assert set(listed) == modules, (sorted(modules - set(listed)), sorted(set(listed) - modules))
    stages = {f"tasks/{p.name}" for p in TASKS.glob("*.py") if _is_stage(p)}
    said_stage = {f for f, (folder, what) in listed.items() if what.startswith("stage:")}
    assert said_stage == stages
    helpers = {f for f, (folder, what) in listed.items() if folder == "tasks" and f not in stages}
    assert all(listed[f][1].startswith(("helper:", "the training script")) for f in helpers), helpers
    for path in stages:
        names = re.findall(r'\nSTAGE = Stage\(name="([\w-]+)"', (REPO / path).read_text(encoding="utf-8"))
        assert [n.replace("-", "_") for n in names] == [Path(path).stem], (path, names)


def test_each_stage_is_declared_once_and_everything_named_after_it_agrees():
    """Issue 25: a stage's declaration (its module's STAGE) is what its Prefect task, the chain's to_stage choices, the
    single-stage flows, the deployments and the CLI command go by. A module's cache_key is in its declaration (a key
    function that nothing calls would be a silent stale cache), and its config section exists in its profile."""
    import importlib
    import typing

    import yaml

    from culbot.flows.cli import COMMANDS
    from culbot.flows.culbot import STAGES, ToStage
    from culbot.pipeline_config.schema import DataProfile
    from culbot.pipeline_config.train_schema import TrainProfile
    from culbot.tasks.contracts import Stage

    commands = {c.name.replace(" ", "-"): c for c in COMMANDS}
    declared = {}
    for path in sorted(TASKS.glob("*.py")):
        if not _is_stage(path):
            continue
        module = importlib.import_module(f"culbot.tasks.{path.stem}")
        stage = module.STAGE
        assert isinstance(stage, Stage) and stage.module == module.__name__ and stage.name.replace("-", "_") == path.stem
        tasks = [v for v in vars(module).values() if getattr(v, "name", None) == stage.name and hasattr(v, "cache_policy")]
        assert len(tasks) == 1, (path, "one Prefect task, named as its stage")
        assert stage.key is getattr(module, "cache_key", None), (path, "the module's cache_key is its declaration's key")
        profile = DataProfile if stage.profile == "data" else TrainProfile
        assert stage.section in profile.model_fields, (path, stage.section)
        assert commands[stage.name].profile == stage.profile, stage.name   # `culbot index` reads the profile index does
        declared[stage.name] = stage
    assert len(declared) == 13
    assert set(STAGES) <= set(declared) and typing.get_args(ToStage) == STAGES
    deployments = {d["name"] for d in yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())["deployments"]}
    single = {d.removeprefix("train-") if d.startswith("train-") else d for d in deployments} & set(declared)
    assert single == {"eval", "merge-adapter", "publish"} and any(d.startswith("train-") for d in deployments)
