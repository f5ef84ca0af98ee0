"""examples/custom_task.py: a user's TSV with its own template and label words, tuned on the tiny server."""

from __future__ import annotations

from bbt_client.run.results import load_result
from bbt_client.tasks.datasets import load_task_file


def test_bundled_task_file_is_valid(example):
    mod = example("custom_task")
    task, pool = load_task_file(mod.TRAIN, mod.TEMPLATE, mod.parse_label_words(mod.LABEL_WORDS))
    _, test = load_task_file(mod.TEST, mod.TEMPLATE, mod.parse_label_words(mod.LABEL_WORDS))
    assert task.label_words == ("food", "sports", "computer")
    assert pool.class_counts(3).tolist() == [12, 12, 12] and test.class_counts(3).tolist() == [6, 6, 6]


def test_tunes_the_custom_task(example, tiny_server, tmp_path, capsys):
    mod = example("custom_task")
    out = tmp_path / "questions"
    rc = mod.main(["--endpoint", tiny_server, "--budget-calls", "30", "--popsize", "4", "--shots", "2",
                   "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "classes ['cooking', 'sports', 'computers'] -> words ['food', 'sports', 'computer']" in text
    assert "first query: Question: " in text and "Topic: {mask} ." in text
    result = load_result(out)
    assert result.task == "questions" and result.test_examples == 18  # the whole test file
    assert result.config["task"]["template"] == mod.TEMPLATE
    assert 0 < result.api_calls_used <= 30


def test_bad_label_words_fail_before_any_server(example, capsys):
    mod = example("custom_task")
    # "endpoint" is unreachable on purpose: the error must come from the task file check, first.
    rc = mod.main(["--label-words", "cooking=food,sports=sports", "--endpoint", "http://127.0.0.1:9"])
    assert rc == 2
    assert "label 'computers' has no word in --label-words" in capsys.readouterr().err
