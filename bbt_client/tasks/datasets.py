"""Tasks (template + verbalizer), their data, and the papers' few-shot protocol.

A :class:`Task` says how a text becomes a cloze query (``template`` with ``{text}`` and one ``{mask}``,
``{text_b}`` for pairs) and which word stands for each class (``label_words``, one per class, in class
order: logits come back (C, N, K) in that order). A :class:`Split` holds texts and int64 labels.

Built-ins (data bundled gzip-compressed under ``bbt_client/data``; see its README for provenance):

- ``sst2``: ``"{text} . It was {mask} ."`` with ``bad``/``great``, the template and words of the BBT
  reference code (both are single WordPiece tokens in the uncased MiniLM/BERT vocabulary).
- ``agnews``: ``"{mask} News: {text}"`` with ``World``/``Sports``/``Business``/``Tech`` (reference
  code); class order World, Sports, Business, Sci/Tech as in the HF ``ag_news`` dataset.
- Neither template ends with ``{mask}``, which a next-token endpoint needs, so each also has a
  ``causal_template`` that such an endpoint reads instead (:func:`for_next_token`): ``"{text} . It was {mask}"``
  (the final `` .`` dropped, as for the fixed-split tasks) and ``"{text} Topic: {mask}"`` (the label after
  the text).
- ``mr``, ``cr``, ``sst5``, ``yelp2``, ``yelp5``, ``dbpedia``, ``yahoo``: RLPrompt's 16-shot splits (LM-BFF
  protocol), fixed per seed (:data:`FIXED_SPLIT_SEEDS`). Templates and words were taken once, before any
  run, from the papers that used them (:data:`TEMPLATE_SOURCES`); every such template ends with ``{mask}`` so
  that one template serves masked and next-token backends alike.

Few-shot protocol for ``sst2``/``agnews`` (:func:`few_shot`, as BBT's ``construct_true_few_shot_data``): shuffle the training
rows with the seed, walk them, give the first k of each class to train and the next k to dev; test is
the full test file (GLUE's dev set for SST-2, whose test labels are hidden). The papers use seeds
13, 42, 100 (and 87, 21 in some tables). The fixed-split tasks instead read the seed's own train and dev
files (16 per class each); k < 16 keeps the first k of each class in a seeded shuffle of them.

Only the loaders here read files; everything else is pure.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from bbt_client.errors import ConfigError
from bbt_client.protocol import MASK_SLOT, TEXT_A_SLOT, TEXT_B_SLOT, TEXT_SLOT, ends_with_mask
from bbt_client.tasks.fitted_verbalizer import FittedVerbalizer
from bbt_client.tasks.verbalizer import class_logits, flat_words

DATA_DIR = Path(__file__).parent.parent / "data"

#: Seeds the papers report (mean ± std over these).
PAPER_SEEDS = (13, 42, 100)


# ---------------------------------------------------------------- data types


@dataclass(frozen=True)
class Task:
    """A classification task as a cloze: ``template`` filled with a text, the answer read at ``{mask}``."""

    name: str
    template: str
    #: One word per class, in class order. Must be distinct.
    label_words: tuple[str, ...]
    #: Human-readable class names, in class order (the label values found in data files).
    class_names: tuple[str, ...]
    description: str = ""
    #: Several words per class (a class's logit is the mean of its words'), e.g. found by
    #: :mod:`bbt_client.tasks.verbalizer`; None = ``label_words``, one word each.
    verbalizer: tuple[tuple[str, ...], ...] | None = None
    #: Class logits fitted over many words' scores (:mod:`bbt_client.tasks.fitted_verbalizer`); when set, its
    #: words are the ones scored and ``verbalizer``/``label_words`` are not read.
    fitted: FittedVerbalizer | None = None
    #: What a next-token (causal) endpoint reads instead of ``template`` when that does not end with ``{mask}``
    #: (such a model scores only the word after the whole input): :func:`for_next_token`. None: none needed.
    causal_template: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_words", tuple(self.label_words))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.verbalizer is not None:
            sets = tuple(tuple(ws) for ws in self.verbalizer)
            object.__setattr__(self, "verbalizer", sets)
            flat = [w for ws in sets for w in ws]
            if len(sets) != len(self.class_names) or not all(sets) or len(set(flat)) != len(flat):
                raise ConfigError(f"task {self.name!r}: the verbalizer needs one non-empty set of distinct words per "
                                  f"class ({len(self.class_names)}), got {[list(ws) for ws in sets]}")
        if self.fitted is not None and self.fitted.num_classes != len(self.class_names):
            raise ConfigError(f"task {self.name!r}: the fitted verbalizer reads {self.fitted.num_classes} classes, "
                              f"the task has {len(self.class_names)}")
        for template in filter(None, (self.template, self.causal_template)):
            problems = template_problems(template)
            if problems:
                raise ConfigError(f"task {self.name!r}: template {template!r} {problems}")
        if self.causal_template is not None and not ends_with_mask(self.causal_template):
            raise ConfigError(f"task {self.name!r}: causal_template {self.causal_template!r} must end with {MASK_SLOT}")
        if len(self.label_words) < 2:
            raise ConfigError(f"task {self.name!r}: needs at least 2 classes, got {len(self.label_words)} label words")
        if len(self.label_words) != len(self.class_names):
            raise ConfigError(
                f"task {self.name!r}: {len(self.label_words)} label words for {len(self.class_names)} classes"
            )
        if len(set(self.label_words)) != len(self.label_words):
            raise ConfigError(f"task {self.name!r}: label words must be distinct, got {list(self.label_words)}")
        if any(not w.strip() for w in self.label_words):
            raise ConfigError(f"task {self.name!r}: label words must be non-empty")
        if len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"task {self.name!r}: class names must be distinct, got {list(self.class_names)}")

    @property
    def num_classes(self) -> int:
        return len(self.label_words)

    @property
    def word_sets(self) -> tuple[tuple[str, ...], ...]:
        """The words scored for each class: the verbalizer, or one label word per class."""
        return self.verbalizer if self.verbalizer is not None else tuple((w,) for w in self.label_words)

    @property
    def scored_words(self) -> list[str]:
        """The words a scoring request asks about, in the order :meth:`class_logits` reads them."""
        return list(self.fitted.words) if self.fitted is not None else flat_words(self.word_sets)

    def class_logits(self, word_logits: np.ndarray, training: bool = False) -> np.ndarray:
        """(..., V) scores of :attr:`scored_words` -> (..., K) class logits. ``training``: (..., N, V) scores of
        the training texts, in order, which a fitted verbalizer reads through its cross-fit."""
        if self.fitted is not None:
            return self.fitted.training_class_logits(word_logits) if training else \
                self.fitted.class_logits(word_logits)
        return class_logits(word_logits, self.word_sets)

    @property
    def is_pair(self) -> bool:
        """True when the template takes a second text (``{text_b}``)."""
        return TEXT_B_SLOT in self.template


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    text_pair: str | None = None


@dataclass(frozen=True)
class Split:
    """N examples: ``texts`` (N,), ``labels`` (N,) int64 class indices, optional ``text_pairs`` (N,)."""

    texts: tuple[str, ...]
    labels: np.ndarray
    text_pairs: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(self.texts))
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        labels.setflags(write=False)
        object.__setattr__(self, "labels", labels)
        if self.text_pairs is not None:
            object.__setattr__(self, "text_pairs", tuple(self.text_pairs))
            if len(self.text_pairs) != len(self.texts):
                raise ValueError("text_pairs must be as long as texts")
        if labels.shape[0] != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {labels.shape[0]} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self) -> Iterator[Example]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, i: int) -> Example:
        pair = None if self.text_pairs is None else self.text_pairs[i]
        return Example(self.texts[i], int(self.labels[i]), pair)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "Split":
        idx = [int(i) for i in indices]
        return Split(
            texts=tuple(self.texts[i] for i in idx),
            labels=self.labels[idx] if idx else np.zeros(0, np.int64),
            text_pairs=None if self.text_pairs is None else tuple(self.text_pairs[i] for i in idx),
        )

    def class_counts(self, num_classes: int) -> np.ndarray:
        """(K,) int64 number of examples per class."""
        return np.bincount(self.labels, minlength=num_classes)


class FewShot(NamedTuple):
    """The papers' true few-shot setting: k per class train, k per class dev, full test."""

    train: Split
    dev: Split
    test: Split


def template_problems(template: str) -> str:
    """Why ``template`` is unusable ('' if it is fine), in words for an error message."""
    if TEXT_SLOT not in template and TEXT_A_SLOT not in template:
        return "has no {text} slot; add {text} where the input goes"
    if template.count(MASK_SLOT) != 1:
        return f"must contain exactly one {{mask}} slot (found {template.count(MASK_SLOT)})"
    return ""


def for_next_token(task: Task) -> Task:
    """The task as a causal endpoint reads it: its ``causal_template`` where its own template does not end with
    ``{mask}``; otherwise unchanged (a template no causal endpoint can read is refused by the backend)."""
    if task.causal_template is None or ends_with_mask(task.template):
        return task
    return dataclasses.replace(task, template=task.causal_template)


# ---------------------------------------------------------------- built-ins

_BUILTIN: dict[str, Task] = {
    "sst2": Task(
        name="sst2",
        template="{text} . It was {mask} .",
        label_words=("bad", "great"),
        class_names=("0", "1"),
        description="SST-2 binary sentiment (GLUE); test = GLUE dev set (872 sentences)",
        causal_template="{text} . It was {mask}",
    ),
    "agnews": Task(
        name="agnews",
        template="{mask} News: {text}",
        label_words=("World", "Sports", "Business", "Tech"),
        class_names=("World", "Sports", "Business", "Sci/Tech"),
        description="AG News 4-way topic classification (subset bundled: 10,000 train, 7,600 test)",
        causal_template="{text} Topic: {mask}",
    ),
}

_IT_WAS, _POLARITY = "{text} It was {mask}", ("negative", "positive")
_FIVE_WORDS = ("terrible", "bad", "okay", "good", "great")
#: The fixed-split tasks: name -> (template, label words, class names, description).
_FIXED_TASKS = {
    "mr": (_IT_WAS, ("terrible", "great"), _POLARITY,
           "MR movie-review sentence polarity, 16-shot (RLPrompt splits); test 2,000 sentences"),
    "cr": (_IT_WAS, ("terrible", "great"), _POLARITY,
           "CR customer-review sentence polarity, 16-shot (RLPrompt splits); test 2,000 sentences"),
    "sst5": (_IT_WAS, _FIVE_WORDS, ("very negative", "negative", "neutral", "positive", "very positive"),
             "SST-5 fine-grained sentiment, 16-shot (RLPrompt splits); test 2,000 of SST's 2,210"),
    "yelp2": ("{text} . It was {mask}", ("bad", "great"), _POLARITY,
              "Yelp review polarity, 16-shot (RLPrompt splits); test: 128 reviews from the training split"),
    "yelp5": (_IT_WAS, _FIVE_WORDS, ("1 star", "2 stars", "3 stars", "4 stars", "5 stars"),
              "Yelp reviews, 1-5 stars, 16-shot (RLPrompt splits); test: 318 reviews from the training split"),
    "dbpedia": ("{text} Category: {mask}",
                ("company", "education", "artist", "athlete", "office", "transportation", "building", "natural",
                 "village", "animal", "plant", "album", "film", "written"),
                ("Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder", "MeanOfTransportation",
                 "Building", "NaturalPlace", "Village", "Animal", "Plant", "Album", "Film", "WrittenWork"),
                "DBpedia ontology, 14 classes, 16-shot (RLPrompt splits); test: 868 abstracts from the training split"),
    "yahoo": ("{text} This topic is about {mask}",
              ("culture", "science", "health", "education", "computer", "sports", "business", "music", "family",
               "politics"),
              ("Society & Culture", "Science & Mathematics", "Health", "Education & Reference", "Computers & Internet",
               "Sports", "Business & Finance", "Entertainment & Music", "Family & Relationships",
               "Politics & Government"),
              "Yahoo! Answers topics (question titles), 16-shot (RLPrompt splits); test 2,000 of 60,000"),
}
_BUILTIN.update({name: Task(name, *spec) for name, spec in _FIXED_TASKS.items()})

#: Where each fixed-split task's template and words come from, and the one change made so that the
#: template ends with ``{mask}`` (next-token backends read the answer after the whole input).
TEMPLATE_SOURCES = {
    "mr": "LM-BFF (Gao et al. 2021) manual prompt '<S1> It was [MASK] .', terrible/great; final ' .' dropped",
    "cr": "LM-BFF manual prompt '<S1> It was [MASK] .', terrible/great; final ' .' dropped",
    "sst5": "LM-BFF manual prompt '<S1> It was [MASK] .', terrible/bad/okay/good/great; final ' .' dropped",
    "yelp2": "BBT (Sun et al. 2022) Yelp P. prompt '<S> . It was [MASK] .', bad/great; final ' .' dropped",
    "yelp5": "RLPrompt (Deng et al. 2022) words, shared with SST-5, and LM-BFF's SST-5 prompt; final ' .' dropped",
    "dbpedia": "BBT DBPedia prompt '[ Category: [MASK] ] <S>' and words (lower-cased for the uncased vocabulary); "
               "the cue moved after the text and the brackets dropped",
    "yahoo": "RLPrompt's words; KPT (Hu et al. 2022) manual template '<S> This topic is about [MASK] .' (the one of "
             "its four with the mask after the text); final ' .' dropped",
}

#: Tasks bundled as fixed per-seed train/dev files: the seeds offered. yelp2, yelp5 and dbpedia lack 21 and 87,
#: whose files became their test sets (see the data README).
FIXED_SPLIT_SEEDS: dict[str, tuple[int, ...]] = {
    **{t: (13, 21, 42, 87, 100) for t in ("mr", "cr", "sst5", "yahoo")},
    **{t: (13, 42, 100) for t in ("yelp2", "yelp5", "dbpedia")},
}
#: Examples per class in each fixed train and dev file.
FIXED_SPLIT_SHOTS = 16

#: Column layout of the bundled files: (has header, text column, label column, labels are class indices).
_BUILTIN_LAYOUT = {"sst2": (True, 0, 1, False), "agnews": (False, 0, 1, False),
                   **{t: (True, 0, 1, True) for t in FIXED_SPLIT_SEEDS}}


def task_names() -> list[str]:
    return sorted(_BUILTIN)


def get_task(name: str) -> Task:
    """A built-in task by name (``sst2``, ``agnews``, ``mr`` ...: :func:`task_names`)."""
    try:
        return _BUILTIN[name.lower()]
    except KeyError:
        raise ConfigError(
            f"unknown task {name!r}; built-in tasks: {', '.join(task_names())}. For your own data pass a "
            ".tsv or .jsonl file to --task, with --template and --label-words"
        ) from None


def load_split(name: str, split: str) -> Split:
    """A bundled split of a built-in task: ``train`` or ``test``, or for a fixed-split task ``test``,
    ``train-<seed>`` or ``dev-<seed>``. Reads the gzip file every call."""
    task = get_task(name)
    allowed = ["test"] + ([f"{s}-{seed}" for seed in FIXED_SPLIT_SEEDS[task.name] for s in ("train", "dev")]
                          if task.name in FIXED_SPLIT_SEEDS else ["train"])
    if split not in allowed:
        raise ConfigError(f"task {task.name!r} has splits {', '.join(allowed)}; got {split!r}")
    path = DATA_DIR / task.name / f"{split}.tsv.gz"
    if not path.is_file():
        raise ConfigError(f"bundled data file {path} is missing; reinstall bbt-client")
    has_header, text_col, label_col, by_index = _BUILTIN_LAYOUT[task.name]
    names = tuple(str(i) for i in range(task.num_classes)) if by_index else task.class_names
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        lines = fh.read().split("\n")
    if has_header:
        lines = lines[1:]
    texts, labels = [], []
    for lineno, line in enumerate(lines, start=2 if has_header else 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        label = cols[label_col].strip()
        texts.append(cols[text_col].strip())
        try:
            labels.append(names.index(label))
        except ValueError:
            raise ConfigError(f"{path}:{lineno}: unknown label {label!r}") from None
    return Split(texts=tuple(texts), labels=np.asarray(labels, dtype=np.int64))


# ---------------------------------------------------------------- few-shot


def few_shot(
    task: Task | str,
    k: int = 16,
    seed: int = 42,
    *,
    train: Split | None = None,
    test: Split | None = None,
) -> FewShot:
    """k per class for train and k per class for dev (disjoint, from the training pool), full test.

    Deterministic given ``seed`` (``np.random.default_rng``). ``train``/``test`` default to the bundled
    data of a built-in task; pass them (e.g. from :func:`load_task_file`) for a custom task. Without a
    ``test`` split for a custom task, the test split is every training-pool row not drawn for train/dev.
    """
    if isinstance(task, str):
        task = get_task(task)
    if k < 1:
        raise ConfigError(f"k (examples per class) must be >= 1, got {k}")
    if train is None and task.name in FIXED_SPLIT_SEEDS and _BUILTIN[task.name].class_names == task.class_names:
        return fixed_few_shot(task, k, seed, test=test)
    if train is None:
        if _BUILTIN.get(task.name) != task:
            raise ConfigError(f"task {task.name!r} has no bundled data; pass train= (and test=) splits")
        train = load_split(task.name, "train")
        if test is None:
            test = load_split(task.name, "test")
    if len(train) and (train.labels.min() < 0 or train.labels.max() >= task.num_classes):
        raise ConfigError(f"training labels must lie in [0, {task.num_classes})")
    counts = train.class_counts(task.num_classes)
    short = [task.class_names[c] for c in range(task.num_classes) if counts[c] < 2 * k]
    if short:
        raise ConfigError(
            f"task {task.name!r}: classes {short} have fewer than 2k = {2 * k} training examples "
            f"(counts {counts.tolist()}); lower k (--shots) or add data"
        )
    order = np.random.default_rng(seed).permutation(len(train))
    taken_train = np.zeros(task.num_classes, np.int64)
    taken_dev = np.zeros(task.num_classes, np.int64)
    train_idx: list[int] = []
    dev_idx: list[int] = []
    for i in order:
        c = train.labels[i]
        if taken_train[c] < k:
            train_idx.append(int(i))
            taken_train[c] += 1
        elif taken_dev[c] < k:
            dev_idx.append(int(i))
            taken_dev[c] += 1
        if len(train_idx) + len(dev_idx) == 2 * k * task.num_classes:
            break
    if test is None:
        used = set(train_idx) | set(dev_idx)
        test = train.subset([i for i in range(len(train)) if i not in used])
    return FewShot(train=train.subset(train_idx), dev=train.subset(dev_idx), test=test)


def fixed_few_shot(task: Task | str, k: int, seed: int, *, test: Split | None = None) -> FewShot:
    """A fixed-split task's own train and dev files for ``seed`` (k <= 16 per class: the first k of each
    class in a ``seed``-shuffle of each file), and its bundled test set unless ``test`` is given."""
    if isinstance(task, str):
        task = get_task(task)
    seeds = FIXED_SPLIT_SEEDS[task.name]
    if seed not in seeds:
        raise ConfigError(f"task {task.name!r} has fixed splits for seeds {', '.join(map(str, seeds))} only; "
                          f"got seed {seed}")
    if not 1 <= k <= FIXED_SPLIT_SHOTS:
        raise ConfigError(f"task {task.name!r} has {FIXED_SPLIT_SHOTS} examples per class per split; "
                          f"k must be 1..{FIXED_SPLIT_SHOTS}, got {k}")
    parts = [load_split(task.name, f"{s}-{seed}") for s in ("train", "dev")]
    if k < FIXED_SPLIT_SHOTS:
        parts = [_first_k_per_class(p, k, task.num_classes, seed) for p in parts]
    return FewShot(train=parts[0], dev=parts[1], test=test if test is not None else load_split(task.name, "test"))


def _first_k_per_class(split: Split, k: int, num_classes: int, seed: int) -> Split:
    order = np.random.default_rng(seed).permutation(len(split))
    taken = np.zeros(num_classes, np.int64)
    keep = []
    for i in order:
        if taken[split.labels[i]] < k:
            taken[split.labels[i]] += 1
            keep.append(int(i))
    return split.subset(sorted(keep))


# ---------------------------------------------------------------- custom task files


def load_task_file(
    path: str | Path,
    template: str,
    label_words: Mapping[str, str] | Sequence[str],
    *,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    name: str | None = None,
) -> tuple[Task, Split]:
    """Read a custom classification task from a TSV (with a header row) or JSONL file.

    ``label_words`` maps each label value found in the file to its verbalizer word, in class order
    (``{"negative": "bad", "positive": "great"}``); a plain list means the labels are ``0..K-1``.
    JSON labels may be strings or ints (compared as strings). The format is chosen by suffix:
    ``.jsonl``/``.json`` is JSON Lines, anything else is tab-separated (``.gz`` is decompressed).

    Raises :class:`ConfigError` with ``file:line`` for a bad row, an unknown label, a missing
    column, an empty file, or a template without ``{text}``/``{mask}``.
    """
    path = Path(path)
    if isinstance(label_words, Mapping):
        class_names = tuple(str(k) for k in label_words)
        words = tuple(str(v) for v in label_words.values())
    else:
        words = tuple(str(w) for w in label_words)
        class_names = tuple(str(i) for i in range(len(words)))
    problems = template_problems(template)
    if problems:
        raise ConfigError(f"template {template!r} {problems}")
    if (TEXT_B_SLOT in template) != (text_pair_column is not None):
        raise ConfigError("a template with {text_b} needs text_pair_column, and text_pair_column needs {text_b}")
    task = Task(name=name or path.stem.split(".")[0], template=template, label_words=words, class_names=class_names)
    if not path.is_file():
        raise ConfigError(f"task file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        content = fh.read()
    base_suffix = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
    columns = [text_column, label_column] + ([text_pair_column] if text_pair_column else [])
    rows = _read_jsonl(path, content, columns) if base_suffix in (".jsonl", ".json") else _read_tsv(path, content, columns)
    if not rows:
        raise ConfigError(f"{path}: no examples found (the file is empty or has only a header)")
    texts, pairs, labels = [], [], []
    index = {c: i for i, c in enumerate(class_names)}
    for lineno, row in rows:
        text, label = row[text_column], row[label_column]
        if not text.strip():
            raise ConfigError(f"{path}:{lineno}: empty text in column {text_column!r}")
        if label not in index:
            raise ConfigError(_unknown_label(path, lineno, label, class_names, label_words, rows, label_column))
        texts.append(text.strip())
        labels.append(index[label])
        if text_pair_column:
            pairs.append(row[text_pair_column].strip())
    split = Split(texts=tuple(texts), labels=np.asarray(labels, np.int64), text_pairs=tuple(pairs) if text_pair_column else None)
    return task, split


def _unknown_label(path: Path, lineno: int, label: str, class_names: tuple[str, ...],
                   label_words: Mapping[str, str] | Sequence[str], rows: list, label_column: str) -> str:
    """Why ``label`` is not a class, and the ``--label-words`` form that maps this file's labels."""
    found = list(dict.fromkeys(row[label_column] for _, row in rows))  # order of first appearance
    if isinstance(label_words, Mapping):
        return (f"{path}:{lineno}: label {label!r} has no word in --label-words, which names {list(class_names)}; "
                f"the file's labels are {found}")
    # words in class order only fit labels 0..K-1: guessing an order for named labels could swap classes silently
    form = ",".join(f"{x}=WORD" for x in found[:8]) + (",..." if len(found) > 8 else "")
    return (f"{path}:{lineno}: label {label!r}: words in class order fit labels {list(class_names)} only; "
            f"the file's labels are {found}: give a word per label, --label-words {form}")


def _read_tsv(path: Path, content: str, columns: list[str]) -> list[tuple[int, dict[str, str]]]:
    lines = content.split("\n")
    header_no = next((i for i, line in enumerate(lines) if line.strip()), None)
    if header_no is None:
        raise ConfigError(f"{path}: the file is empty; a TSV task file needs a header row and examples")
    header = [h.strip() for h in lines[header_no].rstrip("\r").split("\t")]
    missing = [c for c in columns if c not in header]
    if missing:
        raise ConfigError(f"{path}:{header_no + 1}: header {header} lacks column(s) {missing}; "
                          f"name the header's columns {' and '.join(columns)}")
    pos = {c: header.index(c) for c in columns}
    rows = []
    for i in range(header_no + 1, len(lines)):
        line = lines[i].rstrip("\r")
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != len(header):
            raise ConfigError(
                f"{path}:{i + 1}: expected {len(header)} tab-separated fields, got {len(cells)} "
                "(tabs inside a text must be removed)"
            )
        rows.append((i + 1, {c: cells[pos[c]].strip() for c in columns}))
    return rows


def _read_jsonl(path: Path, content: str, columns: list[str]) -> list[tuple[int, dict[str, str]]]:
    rows = []
    for i, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{path}:{i}: each line must be a JSON object")
        missing = [c for c in columns if c not in obj]
        if missing:
            raise ConfigError(f"{path}:{i}: missing key(s) {missing}; each line needs the keys {' and '.join(columns)}")
        row = {}
        for c in columns:
            v = obj[c]
            if isinstance(v, bool) or not isinstance(v, (str, int)):
                raise ConfigError(f"{path}:{i}: {c!r} must be a string (or an int label), got {type(v).__name__}")
            row[c] = str(v)
        rows.append((i, row))
    return rows


# ---------------------------------------------------------------- job entry point


@dataclass(frozen=True)
class TaskData:
    """What a tuning job needs: the task and its few-shot train/dev splits and test split."""

    task: Task
    train: Split
    dev: Split
    test: Split


#: Seed of the fixed shuffle used to cut ``test_limit`` examples: independent of the run seed, so
#: runs with different seeds are scored on the same test subset.
TEST_SUBSET_SEED = 0


def limit_split(split: Split, limit: int | None) -> Split:
    """At most ``limit`` examples, chosen by a fixed shuffle (so a subset mixes classes); None = all."""
    if limit is None or limit >= len(split):
        return split
    order = np.random.default_rng(TEST_SUBSET_SEED).permutation(len(split))[:limit]
    return split.subset(np.sort(order))


def load_task_data(task_config, seed: int) -> TaskData:
    """Resolve a :class:`bbt_client.config.TaskConfig` (duck-typed: ``name``, ``file``, ``test_file``,
    ``template``, ``label_words``, ``shots``, ``test_limit``) into few-shot data for ``seed``.

    Built-in task: bundled data (``template``/``label_words`` override the built-in ones if given).
    Task file: ``file`` is the training pool (TSV with ``text``/``label`` header columns, or JSONL);
    ``test_file`` the test set (default: the pool rows not drawn for train/dev).
    """
    shots = int(getattr(task_config, "shots", 16))
    limit = getattr(task_config, "test_limit", None)
    file = getattr(task_config, "file", None)
    template = getattr(task_config, "template", None)
    words = getattr(task_config, "label_words", None)
    if file is None:
        task = get_task(task_config.name)
        if template is not None or words:
            word_list = list(words.values()) if isinstance(words, Mapping) else list(words or task.label_words)
            task = Task(
                name=task.name,
                template=template or task.template,
                label_words=tuple(word_list),
                class_names=task.class_names,
                description=task.description,
            )
        if task.name in FIXED_SPLIT_SEEDS:
            fs = fixed_few_shot(task, shots, seed)
            return TaskData(task=task, train=fs.train, dev=fs.dev, test=limit_split(fs.test, limit))
        pool = load_split(task.name, "train")
        test = load_split(task.name, "test")
    else:
        if template is None or not words:
            raise ConfigError("a task file needs --template and --label-words")
        # A built-in name left at its default must not rename a custom task: use the file's name then, as the
        # user typed it (its stem alone reads like a split: "train").
        name = task_config.name if task_config.name not in ("custom", "", *_BUILTIN) else Path(file).name
        task, pool = load_task_file(file, template, words, name=name)
        test_file = getattr(task_config, "test_file", None)
        test = None
        if test_file is not None:
            _, test = load_task_file(test_file, template, words, name=task.name)
    fs = few_shot(task, shots, seed, train=pool, test=test)
    if not len(fs.test):  # nothing to score a prompt on: refuse before any call rather than fail after one
        raise ConfigError(f"task file {file}: all its examples went to train and dev ({shots} per class each, "
                          "--shots); add --test-file with test examples, or lower --shots")
    return TaskData(task=task, train=fs.train, dev=fs.dev, test=limit_split(fs.test, limit))
