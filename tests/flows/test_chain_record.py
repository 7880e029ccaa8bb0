"""The chain's record ("nothing to do") checks the key parts each stage declares in its own module, by calling the
same function the stage's Prefect cache policy calls: there is no second copy of the stages' keys to go stale."""
from __future__ import annotations

import json


def test_a_stage_declared_key_part_decides_both_the_task_cache_and_the_chain_record(tmp_path, monkeypatch):
    from culbot.flows import chain_record
    from culbot.pipeline_config.schema import CbnuConfig
    from culbot.pipeline_config.train_schema import load_train_profile
    from culbot.tasks import _prefect, crawl_cbnu

    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "생활관.txt").write_text("생활관 입사 신청은 2월에 합니다.", encoding="utf-8")
    cbnu = CbnuConfig(source="directory", pages_dir=pages)
    tp = load_train_profile("cpu-tiny", [f"artifacts_root={tmp_path / 'artifacts'}"])
    policy = crawl_cbnu.crawl_cbnu_task.cache_policy   # the task's own policy, as Prefect calls it
    chain_record.start()
    key = policy.compute_key(None, {"cbnu": cbnu}, {})
    fp = "f" * 64
    chain_record.save_keys(tp, fp)
    saved = json.loads(chain_record.keys_path(tp, fp).read_text(encoding="utf-8"))
    assert [k["fn"] for k in saved] == ["culbot.tasks.crawl_cbnu:cache_key"] and saved[0]["args"]["cbnu"]["pages_dir"] == str(pages)
    assert chain_record.changed_keys(tp, fp) == []

    # A change the profile does not show (a page's text): the task's key and the record both see it.
    (pages / "생활관.txt").write_text("생활관 입사 신청은 3월에 합니다.", encoding="utf-8")
    assert policy.compute_key(None, {"cbnu": cbnu}, {}) != key
    assert chain_record.changed_keys(tp, fp) == ["culbot.tasks.crawl_cbnu:cache_key"]
    (pages / "생활관.txt").write_text("생활관 입사 신청은 2월에 합니다.", encoding="utf-8")
    assert chain_record.changed_keys(tp, fp) == [] and policy.compute_key(None, {"cbnu": cbnu}, {}) == key

    # A stage that gains a cache input declares it in its module's cache_key, and nowhere else: the record, made with
    # the old declaration, no longer holds, so the chain runs (and records the new parts).
    notice = tmp_path / "notice.txt"
    notice.write_text("공지", encoding="utf-8")
    old = crawl_cbnu.cache_key

    def cache_key(cbnu: CbnuConfig) -> str:
        return old(cbnu) + "+" + _prefect._store.sha256_file(notice)
    monkeypatch.setattr(crawl_cbnu, "cache_key", cache_key)
    assert chain_record.changed_keys(tp, fp) == ["culbot.tasks.crawl_cbnu:cache_key"]


def test_every_stage_with_inputs_its_values_do_not_show_declares_them():
    """Live sources, local folders, the eval's questions and baseline: each stage's key parts are in its module."""
    from culbot.tasks import crawl_cbnu, crawl_univ100, generate_qa, load_dataset
    from culbot.tasks import eval as eval_stage, tokenize as tokenize_stage
    from culbot.tasks._prefect import StageKey

    for module, task in [(crawl_cbnu, "crawl_cbnu_task"), (crawl_univ100, "crawl_univ100_task"), (load_dataset, "load_dataset_task"),
                         (generate_qa, "generate_qa_task"), (eval_stage, "eval_task"), (tokenize_stage, "tokenize_task")]:
        policies = getattr(module, task).cache_policy.policies
        assert [p.fn for p in policies if isinstance(p, StageKey)] == [module.cache_key]
