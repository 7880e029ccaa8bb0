"""The stage cache key: computed from the imports of the stage module, and the folder outputs go to."""
import importlib
import sys

from culbot.tasks._prefect import OutputHome, module_closure, sources_key


def test_a_stage_key_covers_exactly_the_project_modules_it_imports():
    merge = module_closure("culbot.tasks.merge_data")
    assert {"culbot.tasks.merge_data", "culbot.tasks._text", "culbot.tasks._store", "culbot.tasks.contracts",
            "culbot.pipeline_config.schema", "culbot.pipeline_config.loader"} <= set(merge)
    assert not {"culbot.tasks.crawl_cbnu", "culbot.tasks.generate_qa", "culbot.tasks._http", "culbot.flows.cli"} & set(merge)
    train = module_closure("culbot.tasks.train")
    # the entrypoint runs in a subprocess, but its code (and what it imports lazily) shapes the adapter
    assert {"culbot.tasks.train_entry", "culbot.tasks.collate", "culbot.tasks.model_io", "culbot.tasks.tiny_model",
            "culbot.tasks.plan", "culbot.tasks.run_folder"} <= set(train)
    assert "culbot.tasks.tokenize" not in train and "culbot.tasks.eval" not in train


def test_editing_an_imported_module_changes_the_key_and_an_unrelated_one_does_not(tmp_path, monkeypatch):
    pkg = tmp_path / "fakeproj"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "stage.py").write_text("from . import helper\n\ndef run():\n    from fakeproj.lazy import x\n    return x\n")
    (pkg / "helper.py").write_text("A = 1\n")
    (pkg / "lazy.py").write_text("x = 1\n")
    (pkg / "other.py").write_text("B = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        assert module_closure("fakeproj.stage", "fakeproj") == ["fakeproj.helper", "fakeproj.lazy", "fakeproj.stage"]
        key = sources_key("fakeproj.stage", "fakeproj")
        (pkg / "other.py").write_text("B = 2\n")
        assert sources_key("fakeproj.stage", "fakeproj") == key
        (pkg / "lazy.py").write_text("x = 2\n")
        assert sources_key("fakeproj.stage", "fakeproj") != key
    finally:
        for m in [m for m in sys.modules if m.startswith("fakeproj")]:
            del sys.modules[m]


def test_where_outputs_go_is_part_of_the_key(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    ka = OutputHome().compute_key(None, {}, {})
    monkeypatch.chdir(tmp_path / "b")
    assert OutputHome().compute_key(None, {}, {}) != ka


def test_every_retried_stage_retries_network_failures_only():
    from culbot.tasks._prefect import retry_on_network
    from culbot.tasks.crawl_cbnu import crawl_cbnu_task
    from culbot.tasks.crawl_univ100 import crawl_univ100_task
    from culbot.tasks.generate_qa import generate_qa_task
    from culbot.tasks.load_dataset import load_dataset_task
    from culbot.tasks.publish import publish_task
    from culbot.tasks.train import _retry_if_preempted, train_task

    for t in (crawl_univ100_task, crawl_cbnu_task, generate_qa_task, load_dataset_task, publish_task):
        assert t.retries >= 1 and t.retry_condition_fn is retry_on_network, t.name   # a bad page or a spent budget is not retried
    assert train_task.retry_condition_fn is _retry_if_preempted
