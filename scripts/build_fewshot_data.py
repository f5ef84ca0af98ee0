"""Write the bundled 16-shot task files under ``bbt_client/data/<id>/`` from the staged RLPrompt files.

    python scripts/build_fewshot_data.py SOURCE_DIR

``SOURCE_DIR`` holds ``<rl-prompt folder id>/{train,dev}-<seed>.tsv.gz`` and ``test.tsv.gz`` (``text<TAB>label``,
as described in ``bbt_client/data/README.md``). Reads local files only. Files are copied byte for byte, except
for the tasks whose source has no test set (``yelp2``, ``yelp5``, ``dbpedia``): their ``test.tsv.gz`` is the
union of the train and dev files of seeds 21 and 87, minus every text that also occurs in a train or dev file
of seeds 13, 42 or 100, duplicates kept once; those seeds are then not offered for the task. Deterministic
(gzip mtime 0); prints what it dropped.
"""

from __future__ import annotations

import gzip
import io
import shutil
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "bbt_client" / "data"
TASKS = ("mr", "cr", "sst5", "yahoo", "yelp2", "yelp5", "dbpedia")
NO_TEST = ("yelp2", "yelp5", "dbpedia")
KEPT_SEEDS, TEST_SEEDS = (13, 42, 100), (21, 87)


def read(path: Path) -> list[tuple[str, str]]:
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    assert lines[0] == "text\tlabel", (path, lines[0])
    return [tuple(line.split("\t")) for line in lines[1:] if line]


def write(path: Path, rows: list[tuple[str, str]]) -> None:
    text = "text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows)
    bio = io.BytesIO()
    with gzip.GzipFile(filename="", fileobj=bio, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(text.encode("utf-8"))
    path.write_bytes(bio.getvalue())


def main(source: Path) -> None:
    for task in TASKS:
        src, dst = source / task, OUT / task
        dst.mkdir(parents=True, exist_ok=True)
        seeds = KEPT_SEEDS if task in NO_TEST else KEPT_SEEDS + TEST_SEEDS
        for seed in seeds:
            for split in ("train", "dev"):
                shutil.copyfile(src / f"{split}-{seed}.tsv.gz", dst / f"{split}-{seed}.tsv.gz")
        if task not in NO_TEST:
            shutil.copyfile(src / "test.tsv.gz", dst / "test.tsv.gz")
            continue
        seen = {t for s in KEPT_SEEDS for split in ("train", "dev") for t, _ in read(src / f"{split}-{s}.tsv.gz")}
        pool = [r for s in TEST_SEEDS for split in ("train", "dev") for r in read(src / f"{split}-{s}.tsv.gz")]
        test, kept, overlap, repeated = [], set(), 0, 0
        for text, label in pool:
            if text in seen:
                overlap += 1
            elif text in kept:
                repeated += 1
            else:
                kept.add(text)
                test.append((text, label))
        write(dst / "test.tsv.gz", test)
        print(f"{task}: test {len(test)} rows from {len(pool)} (seeds 21, 87 train+dev); dropped {overlap} "
              f"also in seeds 13/42/100 train/dev and {repeated} repeats")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
