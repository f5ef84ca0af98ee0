"""bbt_client.tasks.template: one reading of templates and one truncation rule for the server and the student."""

from bbt_client.tasks.template import split_template, truncate_longest_first


def test_split_reads_every_placeholder_and_keeps_literals():
    assert split_template("{text_a} vs {text_b}? {mask}!") == [
        ("text", ""), ("lit", " vs "), ("text_b", ""), ("lit", "? "), ("mask", ""), ("lit", "!")]
    assert split_template("{other} {mask}") == [("lit", "{other} "), ("mask", "")]


def test_truncation_cuts_the_longest_first_and_respects_repeats():
    assert truncate_longest_first([[1, 2, 3, 4], [5, 6]], 4) == [[1, 2], [5, 6]]
    assert truncate_longest_first([[1, 2, 3], [4, 5, 6]], 4) == [[1, 2], [4, 5]]  # first of equals first
    assert truncate_longest_first([[1, 2, 3, 4, 5]], 4, uses=[2]) == [[1, 2]]
    assert truncate_longest_first([[1], [2]], 5) == [[1], [2]]
