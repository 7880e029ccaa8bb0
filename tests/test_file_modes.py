"""What culbot promotes is readable as the umask says, not private: mkstemp's 0600 files and mkdtemp's 0700 staging
folders were renamed into place as they were (issue 22: model.safetensors, manifest.json and the models/ folders
were 0600/0700 under umask 022, so a serving account could not read the merged model)."""
import os
import stat

import pytest

from culbot.pipeline_config.schema import RagConfig, load_data_profile
from culbot.pipeline_config.train_schema import MergeAdapterConfig, PublishConfig
from culbot.tasks import crawl_cbnu, crawl_univ100, generate_qa, load_dataset, merge_data
from culbot.tasks.format import run_format
from culbot.tasks.export_dataset import export_dataset
from culbot.tasks.index import build_index
from culbot.tasks.merge_adapter import run_merge_adapter
from culbot.tasks.publish import run_publish
from tests.conftest import SAMPLES, sample_profile_file


def _wrong_modes(root, mask: int) -> list[str]:
    want_file, want_dir = 0o666 & ~mask, 0o777 & ~mask
    out = []
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        if mode != (want_dir if p.is_dir() else want_file):
            out.append(f"{p.relative_to(root)} {oct(mode)}")
    return out


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_every_stage_output_has_the_modes_of_the_umask(mask, tmp_path, trained_run):
    out = tmp_path / "out"
    out.mkdir()
    old = os.umask(mask)
    try:
        os.chmod(out, 0o777 & ~mask)
        dp = load_data_profile(sample_profile_file(out))
        crawl_univ100.run_crawl(dp.univ100)
        crawl_cbnu.run_crawl(dp.cbnu)
        generate_qa.run_generate(dp.qa, dp.cbnu.out_dir)
        kullm = load_dataset.run_load_dataset(dp.dataset("kullm"))
        dataset = merge_data.run_merge({"univ100": dp.univ100.out_dir, "cbnu": dp.qa.out_dir, "kullm": kullm.path}, dp.merge_data)
        run_format(dataset.path, dp.format)
        build_index(SAMPLES / "cbnu_pages", RagConfig(), out / "indexes")
        export_dataset(dataset.path, "sharegpt", out / "exports")
        merged = run_merge_adapter(trained_run, MergeAdapterConfig(), out / "models", ["도서관 운영 시간은?"], trained_run / "eval")
        run_publish(trained_run, merged.path, PublishConfig(target="local", local_dir=out / "publish"))
    finally:
        os.umask(old)
    made = {p.name for p in out.iterdir()} | {p.name for p in (out / "artifacts").iterdir()}
    assert {"raw", "indexes", "exports", "models", "publish", "datasets", "formatted"} <= made
    assert list((out / "models").glob("*/model.safetensors")) and list((out / "publish").glob("*/merged/model.safetensors"))
    wrong = _wrong_modes(out, mask)
    assert wrong == [], "\n".join(wrong)
