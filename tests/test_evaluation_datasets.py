"""Where evaluation data comes from: --data-dir > $SIMSTEER_DATA > the Hugging Face hub
through `datasets` (here a real offline `datasets` cache built in the test) > one error line."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import pytest

from simsteer.cli.main import main
from simsteer.errors import SimsError
from simsteer.evaluation import datasets as data
from simsteer.evaluation.hub import HUB_SOURCES, HubSource, _hellaswag_text


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty `datasets` cache in tmp_path, the hub offline, no $SIMSTEER_DATA."""
    import datasets
    import huggingface_hub.constants

    cache = tmp_path / "hf_datasets"
    cache.mkdir()
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    # datasets and huggingface_hub read these at import: set what they read at call time
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def write_cache_entry(cache: Path, source: HubSource, rows: list[dict]) -> None:
    """Write ``rows`` where ``datasets.load_dataset(source...)`` looks for a data set it
    fetched before: ``<cache>/<owner>___<name>/<config id>/<version>/<hash>/`` holding
    ``<name>-<split>.arrow`` and ``dataset_info.json``."""
    import datasets
    from datasets.arrow_writer import ArrowWriter
    from datasets.naming import camelcase_to_snakecase, filename_prefix_for_split

    table = datasets.Dataset.from_list(rows)
    options = {"data_dir": source.data_dir} if source.data_dir else {}
    config_id = datasets.BuilderConfig(source.name or "default").create_config_id(options)
    owner, name = source.path.split("/")
    folder = cache / f"{owner}___{camelcase_to_snakecase(name)}" / config_id / "0.0.0" / "0123456789abcdef"
    folder.mkdir(parents=True)
    arrow = folder / f"{filename_prefix_for_split(name, source.split)}.arrow"
    with ArrowWriter(features=table.features, path=str(arrow)) as writer:
        writer.write_table(table.data.table)
        writer.finalize()
    split = datasets.SplitInfo(source.split, num_examples=len(table), dataset_name=name)
    datasets.DatasetInfo(
        features=table.features,
        config_name=config_id,
        dataset_name=name,
        splits=datasets.SplitDict({source.split: split}),
    ).write_to_directory(str(folder))


# The slices in tests/data written back in each hub data set's own row format.


def _arc_rows(records):
    letters = "ABCDE"
    return [
        {
            "id": f"Mercury_{r['id']}",
            "question": r["question"],
            "choices": {"text": r["choices"], "label": list(letters[: len(r["choices"])])},
            "answerKey": letters[r["label"]],
        }
        for r in records
    ]


def _targets(t):
    return {"choices": list(t), "labels": list(t.values())}


HUB_ROWS = {
    "arc_easy": _arc_rows,
    "arc_challenge": _arc_rows,
    "truthfulqa_mc2": lambda records: [
        {
            "question": r["question"],
            "mc1_targets": _targets(r["mc1_targets"]),
            "mc2_targets": _targets(r["mc2_targets"]),
        }
        for r in records
    ],
    "mmlu": lambda records: [
        {
            "question": r["question"],
            "subject": r["subject"],
            "choices": r["options"],
            "answer": "ABCD".index(r["answer"]),
        }
        for r in records
    ],
    "hellaswag": lambda records: [
        {
            "ind": r["id"],
            "activity_label": r["activity_label"],
            "ctx": r["context"],
            "endings": r["endings"],
            "label": str(r["label"]),
        }
        for r in records
    ],
    "winogrande": lambda records: [
        {k: r[k] for k in ("sentence", "option1", "option2", "answer")} for r in records
    ],
    "sst2": lambda records: [
        {"sentence": r["sentence"] + " ", "label": r["label"], "idx": r["id"]} for r in records
    ],
}


@pytest.mark.parametrize("task", sorted(HUB_ROWS))
def test_hub_path_reads_a_local_datasets_cache(offline_cache, eval_data, task):
    """With no folder, a task is loaded by name through datasets.load_dataset, which
    (offline) reads the cache; the items equal those of the same records read locally."""
    source = HUB_SOURCES[task][0]
    local = data.load_mc_task(task, eval_data)
    with pytest.raises(SimsError, match=f"no data for {task}:"):
        data.load_mc_task(task)  # nothing cached yet
    records = data.load_records(task, eval_data)[0]
    write_cache_entry(offline_cache, source, HUB_ROWS[task](records))
    hub = data.load_mc_task(task)
    assert [(i.contexts, i.continuations, i.label, i.true_choices) for i in hub] == [
        (i.contexts, i.continuations, i.label, i.true_choices) for i in local
    ]
    if task == "mmlu":  # ids follow the local files' <subject>_test-<n>
        assert [i.id for i in hub] == [i.id for i in local]
    sub = data.load_mc_task(task, limit=5, seed=1)
    assert [i.contexts for i in sub] == [i.contexts for i in data.load_mc_task(task, eval_data, 5, 1)]


def test_pair_sets_through_the_cache(offline_cache, eval_data):
    hh_source, uf_source = HUB_SOURCES["hh_rlhf"][0], HUB_SOURCES["ultrafeedback"][0]
    hh_local, _ = data.load_pair_set("hh_rlhf", eval_data, limit=6)
    with gzip.open(eval_data / data.LOCAL_FILES["hh_rlhf"], "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    write_cache_entry(offline_cache, hh_source, rows)
    hh_hub, where = data.load_pair_set("hh_rlhf", limit=6)
    assert hh_hub == hh_local and where == "hf:Anthropic/hh-rlhf (harmless-base, test)"
    # UltraFeedback on the hub is conversational (trl-lib/ultrafeedback_binarized)
    uf_local, _ = data.load_pair_set("ultrafeedback", eval_data)
    rows = [
        {
            "chosen": [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.rejected}],
            "score_chosen": 8.0,
            "score_rejected": 3.0,
        }
        for p in uf_local
    ]
    write_cache_entry(offline_cache, uf_source, rows)
    uf_hub, _ = data.load_pair_set("ultrafeedback", limit=4)
    assert uf_hub == uf_local[:4]


def test_alpaca_reference_from_the_hub_file(offline_cache, eval_data, monkeypatch):
    """AlpacaEval's hub repository has a loading script (refused by datasets >= 4), so its
    JSON file is read with the json builder, which needs the network: checked here on the
    arguments given to load_dataset and the conversion of its rows."""
    import datasets

    local = data.load_alpaca_reference(eval_data, limit=3)
    with pytest.raises(
        SimsError, match=r"no data for alpaca_eval: put alpaca_eval/alpaca_eval_normalized\.jsonl"
    ):
        data.load_alpaca_reference()
    rows = [
        {"instruction": a.instruction, "output": a.output, "generator": a.generator, "dataset": a.dataset}
        for a in local
    ]
    calls = []

    def fake_load(path, name=None, split=None, **options):
        calls.append((path, name, split, options))
        return datasets.Dataset.from_list(rows + rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert data.load_alpaca_reference(limit=3) == local
    assert calls == [
        ("json", None, "train", {"data_files": HUB_SOURCES["alpaca_eval"][0].data_files}),
    ]
    assert local[0].generator == "gpt4_1106_preview"


def test_folder_before_env_before_hub(tmp_path, eval_data, monkeypatch):
    def no_hub(name, limit=None):
        raise AssertionError("the hub was asked although a folder is set")

    monkeypatch.setattr(data, "hub_records", no_hub)
    monkeypatch.setenv(data.DATA_ENV, str(eval_data))
    from_env = data.load_mc_task("winogrande")
    assert len(from_env) == 24
    # an explicit folder wins over the variable
    mine = tmp_path / "mine"
    (mine / "winogrande").mkdir(parents=True)
    (mine / "winogrande" / "winogrande_dev_normalized.jsonl").write_text(
        (eval_data / "winogrande/winogrande_dev_normalized.jsonl").read_text().splitlines()[0] + "\n"
    )
    assert len(data.load_mc_task("winogrande", mine)) == 1
    # a folder that lacks the file says which file, not the hub
    with pytest.raises(SimsError, match=r"data file not found: .*arc_easy_test_normalized.jsonl"):
        data.load_mc_task("arc_easy", mine)
    with pytest.raises(SimsError, match="evaluation data folder not found"):
        data.load_mc_task("arc_easy", tmp_path / "nowhere")


def test_no_folder_and_no_hub_is_one_line_with_exit_2(offline_cache, capsys):
    """`sims judge-check` with neither a folder nor a reachable hub or cache: exit 2 and
    one line naming the data set, the files to put where, and the variable."""
    assert main(["judge-check", "--oracle", "length:50"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "no data for hh_rlhf" in err and "hh_rlhf/harmless-base/test.jsonl.gz" in err
    assert "--data-dir" in err and "$SIMSTEER_DATA" in err and "hf:Anthropic/hh-rlhf" in err


def test_cli_reads_the_folder_and_keeps_the_old_option(eval_data, capsys, tmp_path):
    for option in ("--data-dir", "--data"):
        argv = ["judge-check", "--oracle", "length:50", option, str(eval_data), "--limit", "4"]
        assert main(argv) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["pairs"].endswith("hh_rlhf/harmless-base/test.jsonl.gz")
    copy = tmp_path / "copy"
    shutil.copytree(eval_data / "hh_rlhf", copy / "hh_rlhf")
    assert main(["judge-check", "--oracle", "length:50", "--data-dir", str(copy), "--limit", "2"]) == 0


def test_hellaswag_markers_are_removed():
    assert _hellaswag_text(" Tie a knot [title] Cross the ends. [step] Pull  tight. ") == (
        "Tie a knot. Cross the ends. Pull tight."
    )


def test_every_data_set_has_a_file_a_slice_and_a_hub_source(eval_data):
    assert set(HUB_SOURCES) == set(data.LOCAL_FILES) and set(data.MC_TASKS) <= set(HUB_SOURCES)
    assert set(data.PAIR_SETS) <= set(HUB_SOURCES)
    for name, relative in data.LOCAL_FILES.items():
        assert data.load_records(name, eval_data)[0], name  # a non-empty slice for each
        if "<" not in relative:
            assert (eval_data / relative).is_file()


def test_without_the_datasets_library_the_line_says_which_extra(monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(SimsError, match=r"no data for sst2: .*pip install 'simsteer\[data\]'"):
        data.load_mc_task("sst2")
