"""Exports read by their consumers: every column dataset_info.json maps is on every row (LLaMA-Factory 0.9.5 raised
KeyError 'system' / 'history' on an export without conversations), and LLaMA-Factory's and axolotl's own loaders read
every row as culbot's conversation (bench/check_exports.py; CI fetches their wheels first)."""
import json

import pytest

from bench import check_exports
from culbot.tasks.export_dataset import export_dataset


@pytest.fixture(scope="module")
def sample_versions(tmp_path_factory):
    return check_exports.sample_datasets(tmp_path_factory.mktemp("versions"))


def _rows(folder, split):
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt"])
def test_every_mapped_column_is_on_every_row(sample_versions, tmp_path, fmt):
    for label, version in sample_versions.items():
        out = tmp_path / label
        export_dataset(version, fmt, out, name="culbot")
        info = json.loads((out / "dataset_info.json").read_text())
        for split in ("train", "validation"):
            spec = info[f"culbot_{split}"]
            rows = _rows(out, split)
            assert rows, (label, split)
            for row in rows:
                assert set(spec["columns"].values()) <= set(row), (label, split, row)
                if fmt == "alpaca":
                    assert isinstance(row["system"], str) and all(len(pair) == 2 for pair in row["history"])
                else:
                    roles = [t["from"] for t in row["conversations"]]
                    body = roles[1:] if roles[0] == "system" else roles
                    assert body == ["human", "gpt"] * (len(body) // 2) and body, row
    if fmt == "alpaca":   # the mixed version has both kinds: a system prompt with history, and none
        rows = _rows(tmp_path / "mixed", "train") + _rows(tmp_path / "mixed", "validation")
        assert any(r["history"] and r["system"] for r in rows) and any(not r["history"] and not r["system"] for r in rows)


def _cached_sources():
    found = [check_exports.consumer_sources(req, download=False) for req in (check_exports.LLAMAFACTORY, *check_exports.AXOLOTL)]
    if None in found:
        pytest.skip("the consumers' wheels are not cached: python3 bench/check_exports.py --fetch-only (.ci/run does)")
    return found


def test_llama_factory_and_axolotl_read_every_row_as_culbot_wrote_it(sample_versions, tmp_path):
    from transformers import AutoTokenizer

    from culbot.tasks.tiny_model import build_tiny_model, sample_corpus
    from tests.conftest import SAMPLES

    lf_src, *ax_src = _cached_sources()
    loader = check_exports.import_llamafactory_loader(lf_src)
    axolotl = check_exports.import_axolotl(ax_src)
    build_tiny_model(tmp_path / "tiny-llama", sample_corpus(SAMPLES), family="llama")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tiny-llama")
    for label, version in sample_versions.items():
        for fmt in ("alpaca", "sharegpt"):
            out = tmp_path / label / fmt
            export_dataset(version, fmt, out, name="culbot")
            results = {"LLaMA-Factory": check_exports.compare(version, out, fmt, "culbot", loader, tmp_path / "hf-cache")}
            if fmt == "sharegpt":
                results["axolotl"] = check_exports.compare_axolotl(version, out, axolotl, tokenizer)
            for who, splits in results.items():
                for split, c in splits.items():
                    assert c["rows"] == c["read"] == c["kept"] and c["rows"] > 0 and c["differ"] == 0, (who, label, fmt, split, c)
