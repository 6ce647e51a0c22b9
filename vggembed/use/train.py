"""Your own classes: a head trained on embeddings, evaluated honestly.

`vggembed train` and `vggembed.train`:

1. **Labels.** From folders (the first level of subfolders under the inputs'
   common folder is the class: `photos/cat/a.jpg` is `cat`, as Keras's
   `image_dataset_from_directory` and torchvision's `ImageFolder` read them),
   or from a table (`read_label_table`: CSV `path,label` or Parquet) matched
   to the rows by path.
2. **Folds.** Stratified k-fold (each class dealt round-robin over the folds
   after a seeded shuffle); the rows are laid out fold by fold in one float32
   matrix (`logistic.Problem`), so no fold is ever copied.
3. **C.** Unless given, chosen on fold 1 as validation (the other folds
   train) by a log-spaced sweep from strong to weak regularisation, each fit
   warm-started from the last: the highest top-1 there (balanced accuracy
   with balanced class weights), ties broken by log-loss. The sweep stops
   early once both have worsened twice running.
4. **Evaluation.** Out-of-fold probabilities from the k folds at the chosen
   C (each fold's scaling from its own training rows); or, with `val`, the
   probabilities of a separate validation set that no choice saw.
5. **The head.** One final fit on every labelled row, standardised by all of
   them, at the chosen C.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import VGGEmbedError, display, reason
from ..images.safeio import NotAFileError, open_regular
from ..net.head import Head, class_names, class_text
from ..store.recipe import Recipe
from . import evaluate
from .logistic import Problem, Task

# The sweep's values of C times the number of training rows (scikit-learn's C sums the loss over rows, so
# C * n is the inverse of the per-row L2 strength), strong to weak.
SWEEP = tuple(10.0 ** e for e in range(0, 7))
DEFAULT_FOLDS = 5
BLOCK_ROWS = 4096
# L-BFGS stops when no gradient component of the mean objective exceeds this: scikit-learn's default tol for
# lbfgs, on the same mean objective; the sweep and the folds stop there. The head itself, the model users keep,
# is fitted to a tighter one (its objective within 1e-4 of the optimum, where 1e-4 leaves it 1e-3 away).
FIT_TOL = 1e-4
HEAD_TOL = 1e-5
# The sweep fits on at most this many of its training rows (a seeded sample: each fold's rows are in random
# order, so a prefix of every training fold), at the same L2 strength per row; validation uses all of fold 1.
SWEEP_ROWS = 10_000
# How rows weigh in the loss: alike (None), or "balanced": each class as much as any other, however few its
# rows (scikit-learn's class_weight="balanced"), for classes as uneven as ok and defect.
CLASS_WEIGHTS = (None, "balanced")


# ------------------------------------------------------------------- labels
class LabelTable(dict):
    """{path: label} as a label file gives them, and `splits`: {path: split} for the rows whose split column
    (`read_label_table(..., split_column)`) is filled."""

    def __init__(self, labels=(), splits=None):
        super().__init__(labels)
        self.splits: dict[str, str] = dict(splits or {})


def read_label_table(path, split_column: str | None = None) -> LabelTable:
    """{path: label} from a CSV or a Parquet table: the one label-file reader of `train` and `audit`.

    CSV: `path,label` rows, any quoting the csv module reads, UTF-8 (a byte order mark allowed). A first row
    naming `path` and `label` is a header; other columns may then follow in any order, and `split_column`
    names one of them. A name whose bytes are not UTF-8 is kept as those bytes (surrogate escapes, as file
    names are) when it names a file that exists; otherwise the file is taken to be in another encoding and
    refused. Parquet: `label` and `path` columns, or `path_bytes` (a name's exact bytes, as vggembed writes
    them), and `split_column`. A row with an empty label is an image without one (left out of the table); a
    path labelled twice differently is refused."""
    path = Path(path)
    where = display(str(path))
    try:
        with open_regular(path, "label file") as f:  # a FIFO or a device is refused, never waited on
            data = f.read()
    except NotAFileError as e:
        raise VGGEmbedError(f"{where}: {e.problem}") from None
    except OSError as e:
        raise VGGEmbedError(f"{where}: cannot read the labels ({reason(e)})") from None
    if path.suffix.lower() == ".parquet" or data[:4] == b"PAR1":  # a Parquet table by its name or its bytes
        rows = _parquet_labels(data, where, split_column)
    elif data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # what spreadsheets save as "Unicode text"
        raise VGGEmbedError(f"{where}: is UTF-16 text; save the label file as UTF-8")
    elif b"\0" in data[:65536]:  # no UTF-8 CSV holds a NUL byte: a zip, an .npz, an image, ...
        raise VGGEmbedError(f"{where}: not a label table (binary data; expected a CSV of path,label or a Parquet "
                            "table)")
    else:
        rows = _csv_labels(data, where, split_column)
    table = LabelTable()
    for number, name, label, split in rows:
        if label is None or not str(label).strip():
            continue
        name, label = str(name), str(label).strip()  # `cat ` and ` cat` are the class `cat`
        if name in table and table[name] != label:
            raise VGGEmbedError(f"{where}: {display(name)} is labelled both {table[name]!r} and {label!r}"
                                + (f" (line {number})" if number else ""))
        table[name] = label
        if split is not None and str(split).strip():
            table.splits[name] = str(split)
    if not table:
        raise VGGEmbedError(f"{where}: holds no labels (expected rows of path,label)")
    return table


def _csv_labels(data: bytes, where: str, split_column: str | None) -> list:
    """(line number, path, label, split) of each row of a CSV label file's bytes."""
    try:
        text, undecodable = data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        text, undecodable = data.decode("utf-8", "surrogateescape"), e.start
    text = text.removeprefix("\ufeff")
    try:
        table = [(n, r) for n, r in enumerate(csv.reader(io.StringIO(text, newline="")), 1)
                 if any(c.strip() for c in r)]  # blank lines skipped, counted
    except csv.Error as e:
        raise VGGEmbedError(f"{where}: not a readable CSV ({reason(e)})") from None
    if not table:
        raise VGGEmbedError(f"{where}: holds no labels (expected rows of path,label)")
    first = [c.strip().lower() for c in table[0][1]]
    header = "path" in first and "label" in first
    pi, li, si = (first.index("path"), first.index("label"), None) if header else (0, 1, None)
    if split_column:
        if not header:
            raise VGGEmbedError(f"{where}: --split {split_column} needs a header line naming the columns "
                                "(path,label,...)")
        if split_column.strip().lower() not in first:
            raise VGGEmbedError(f"{where}: has no column {split_column} (it has {', '.join(table[0][1])})")
        si = first.index(split_column.strip().lower())
    rows = []
    for number, r in table[1:] if header else table:
        if len(r) <= max(pi, li, si or 0):
            raise VGGEmbedError(f"{where}: line {number} has {len(r)} field{'s' * (len(r) != 1)}; expected "
                                "path,label")
        name, label = r[pi], r[li]
        split = r[si] if si is not None else None
        # bytes that are not UTF-8: a file's own name (as vggembed writes them), or a file in another encoding
        if undecodable is not None and (_escaped(label) or _escaped(split or "")
                                        or (_escaped(name) and not os.path.lexists(name))):
            raise VGGEmbedError(f"{where}: is not UTF-8 text (byte {undecodable}); save the label file as UTF-8")
        rows.append((number, name, label, split))
    return rows


def _escaped(text: str) -> bool:
    """Whether `text` holds bytes that were not UTF-8 (as surrogate escapes)."""
    return any("\udc80" <= c <= "\udcff" for c in text)


def _parquet_labels(data: bytes, where: str, split_column: str | None) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise VGGEmbedError(f'{where}: reading Parquet needs pyarrow (pip install "vggembed[parquet]")') from None
    try:
        t = pq.read_table(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds; one line names the file
        raise VGGEmbedError(f"{where}: not a readable Parquet file ({reason(e)})") from None
    columns = t.column_names
    missing = (["label"] if "label" not in columns else []) + \
        (["path (or path_bytes)"] if not {"path", "path_bytes"} & set(columns) else []) + \
        ([split_column] if split_column and split_column not in columns else [])
    if missing:
        raise VGGEmbedError(f"{where}: has no column {', '.join(missing)} (it has {', '.join(columns)})")
    labels = t.column("label").to_pylist()
    if "path_bytes" in columns:
        raw = t.column("path_bytes").to_pylist()
        text = t.column("path").to_pylist() if "path" in columns else [None] * len(raw)
        names = [os.fsdecode(b) if b is not None else p for b, p in zip(raw, text)]
    else:
        names = t.column("path").to_pylist()
    splits = t.column(split_column).to_pylist() if split_column else [None] * len(names)
    for name, label in zip(names, labels):
        if name is None and label is not None:
            raise VGGEmbedError(f"{where}: a row labelled {label!r} has no path")
    return [(None, name, label, split) for name, label, split in zip(names, labels, splits)]


def _identity(name: str) -> str:
    """Which file a path names, however it is spelled: its absolute normalised path (URLs as they are)."""
    key = _key(name)
    return key if "://" in key else os.path.abspath(key)


def _key(name: str) -> str:
    """A path as labels and rows are matched: normalised (`./a/../b.jpg` and `file://b.jpg` are `b.jpg`), URLs
    as they are."""
    name = name.removeprefix("file://")
    return name if "://" in name else os.path.normpath(name)


def match_table(paths: list[str], table: dict[str, str]) -> tuple[list[str | None], list[str]]:
    """Which name of a label table each row is (the same path once normalised, or the same file once both are
    made absolute; None when the table does not name it), and the table's names that are no row."""
    by_key: dict[str, str] = {}  # normalised as written
    by_file: dict[str, str] = {}  # the file it names (`_identity`)
    for name in table:
        for index, key in ((by_key, _key(name)), (by_file, _identity(name))):
            other = index.setdefault(key, name)
            if table[other] != table[name]:  # one file, two spellings, two labels
                raise VGGEmbedError(f"the labels name one file twice, differently: {display(other)} is "
                                    f"{table[other]!r}, {display(name)} is {table[name]!r}")
    matched = [by_key.get(_key(p), by_file.get(_identity(p))) for p in paths]
    files = {_identity(p) for p in paths}  # a name is used when it names a row's file, however it spells it
    return matched, [n for n in table if _identity(n) not in files]


def folder_labels(paths: list[str], root: str | None = None) -> tuple[list[str | None], str]:
    """The class of each row from its folder: the first path component under `root` (default: the rows'
    common folder; when that is one folder holding every row, its parent), None for a row not in a class
    folder under it; and the root."""
    parts = [_components(_absolute(p)) for p in paths]  # `photos/cat` and `/home/me/photos/dog` meet at photos
    if root is not None:
        common = _components(_absolute(root))
        depth = len(common)
    else:
        folders = [c[:-1] for c in parts]
        common = folders[0] if folders else []
        for f in folders[1:]:
            n = 0
            while n < min(len(common), len(f)) and common[n] == f[n]:
                n += 1
            common = common[:n]
        depth = len(common)
        # the common folder of a single class is that class's folder: its parent is the root
        if folders and all(len(f) == depth for f in folders) and depth:
            depth -= 1
    raw = [c[depth] if len(c) > depth + 1 and c[:depth] == common[:depth] else None for c in parts]
    shown = class_texts([name for name in raw if name is not None], "class folders")
    if common[:1] and common[0].endswith(":"):  # a URL
        found = common[0] + "//" + "/".join(common[1:depth])
    else:  # a local folder: shown from here when it lies here
        found = "/" + "/".join(common[:depth])
        here = os.path.relpath(found)
        found = found if here.startswith("..") else here
    return [None if name is None else shown[name] for name in raw], found


def class_texts(names, what: str) -> dict:
    """{name: the class it names, as text}: a class's name is text wherever it goes (JSON, Parquet, model files,
    gRPC strings), so bytes that are not UTF-8 become \\xNN (`net.head.class_text`); two names that would read
    alike are refused, `what` saying whose names they are."""
    shown = {name: class_text(name) for name in set(names)}
    if len(set(shown.values())) < len(shown):
        twins = sorted((name for name in shown if list(shown.values()).count(shown[name]) > 1), key=repr)
        raise VGGEmbedError(f"{what} {' and '.join(map(repr, twins))} would both be the class "
                            f"{shown[twins[0]]!r} (as text, with bytes that are not UTF-8 as \\xNN); rename one")
    return shown


def _absolute(name: str) -> str:
    return name if "://" in name else os.path.abspath(name)


def _components(name: str) -> list[str]:
    if "://" in name:
        scheme, rest = name.split("://", 1)
        return [scheme + ":"] + [c for c in rest.split("/") if c]
    return [c for c in Path(os.path.normpath(name)).as_posix().split("/") if c not in ("", ".")]


# --------------------------------------------------------------------- data
@dataclass
class Rows:
    """Rows of vectors to train on or evaluate: any embedding output (`store.vectors.Vectors`) or arrays in
    memory, each row with its path."""

    paths: list[str]
    recipe: Recipe | None
    source: str
    _read: object = field(repr=False)  # fn(start, stop) -> float32 block
    dim: int = 0

    @property
    def rows(self) -> int:
        return len(self.paths)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._read(start, stop)

    @classmethod
    def of(cls, vectors) -> "Rows":
        return cls(list(vectors.paths), vectors.recipe, str(vectors.source), vectors.read, vectors.dim)

    @classmethod
    def arrays(cls, matrix: np.ndarray, paths: list[str], recipe: Recipe | None, source: str = "arrays") -> "Rows":
        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or len(matrix) != len(paths):
            raise VGGEmbedError(f"{source}: {matrix.shape} vectors for {len(paths)} paths")
        return cls(list(paths), recipe, source, lambda a, b: np.asarray(matrix[a:b], np.float32), matrix.shape[1])


@dataclass
class Labelled:
    """Which rows of which sources are trained on, with their class, and what was left out."""

    sources: list
    picks: list  # per source: (row indices, class indices)
    classes: list[str]
    unlabelled: int = 0
    non_finite: list = field(default_factory=list)  # paths
    repeated: list = field(default_factory=list)  # paths of rows whose file an earlier row already is
    unused_labels: list = field(default_factory=list)  # label table names not among the rows
    root: str | None = None

    @property
    def count(self) -> int:
        return sum(len(r) for r, _ in self.picks)

    def given(self) -> np.ndarray:
        return np.concatenate([c for _, c in self.picks]) if self.picks else np.zeros(0, np.int64)

    def paths(self) -> list[str]:
        return [s.paths[i] for s, (r, _) in zip(self.sources, self.picks) for i in r.tolist()]


def gather(sources: list[Rows], labels: dict[str, str] | None, classes: list[str] | None = None,
           where: str = "inputs") -> Labelled:
    """Label every row (a table, or folders when `labels` is None), drop rows whose vectors are not finite,
    and number the classes (sorted by name, or as `classes` gives them: a validation set's labels must be
    among the training classes)."""
    per_source, unused, root = [], [], None
    all_paths = [p for s in sources for p in s.paths]
    if labels is None:
        names, root = folder_labels(all_paths)
    else:
        matched, unused = match_table(all_paths, labels)
        # a label that is no str, or holds bytes that are not UTF-8 (as a {path: label} dict may give it)
        shown = class_texts([labels[m] for m in matched if m is not None], "labels")
        names = [None if m is None else shown[labels[m]] for m in matched]
    offset = 0
    for s in sources:
        per_source.append(names[offset: offset + s.rows])
        offset += s.rows
    found = sorted({n for n in names if n is not None})
    if classes is None:
        classes = found
    else:
        unknown = [c for c in found if c not in set(classes)]
        if unknown:
            raise VGGEmbedError(f"{where}: labels {', '.join(map(repr, unknown[:5]))} are not among the trained "
                                f"classes ({', '.join(map(repr, classes[:10]))})")
    number = {c: i for i, c in enumerate(classes)}
    picks, non_finite, unlabelled, repeated, seen = [], [], 0, [], set()
    for s, row_names in zip(sources, per_source):
        keep = np.array([n is not None for n in row_names], bool)
        unlabelled += int((~keep).sum())
        for i in np.flatnonzero(keep).tolist():  # a file given twice is trained on once, in one fold
            identity = _identity(s.paths[i])
            if identity in seen:
                keep[i] = False
                repeated.append(s.paths[i])
            seen.add(identity)
        for start in range(0, s.rows, BLOCK_ROWS):
            block = s.read(start, min(start + BLOCK_ROWS, s.rows))
            bad = ~np.isfinite(block).all(axis=1)
            if bad.any():
                for i in np.flatnonzero(bad & keep[start:start + len(block)]).tolist():
                    non_finite.append(s.paths[start + i])
                keep[start:start + len(block)] &= ~bad
        rows = np.flatnonzero(keep)
        picks.append((rows, np.array([number[row_names[i]] for i in rows.tolist()], np.int64)))
    return Labelled(sources, picks, classes, unlabelled=unlabelled, non_finite=non_finite, repeated=repeated,
                    unused_labels=unused, root=root)


def fold_of(given: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Stratified folds: each class's rows shuffled (seeded) and dealt round-robin over the folds."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(given), np.int64)
    start = 0
    for c in np.unique(given):
        rows = np.flatnonzero(given == c)
        rows = rows[rng.permutation(len(rows))]
        fold[rows] = (start + np.arange(len(rows))) % folds  # classes start where the last one ended
        start = (start + len(rows)) % folds
    return fold


def _matrix(data: Labelled, order: np.ndarray) -> np.ndarray:
    """The picked rows as one float32 matrix, row `order[i]` of the picks at position i."""
    dim = data.sources[0].dim
    X = np.empty((data.count, dim), np.float32)
    position = np.empty(data.count, np.int64)
    position[order] = np.arange(data.count)
    offset = 0
    for s, (rows, _) in zip(data.sources, data.picks):
        for start in range(0, len(rows), BLOCK_ROWS):
            chunk = rows[start:start + BLOCK_ROWS]
            block = s.read(int(chunk[0]), int(chunk[-1]) + 1)
            X[position[offset + start: offset + start + len(chunk)]] = block[chunk - chunk[0]]
        offset += len(rows)
    return X


# -------------------------------------------------------------------- train
@dataclass
class Evaluation:
    """The probabilities a head's figures come from: out-of-fold (`fold` >= 0) or a validation set
    (`fold` = -1), in the rows' input order."""

    paths: list[str]
    given: np.ndarray
    proba: np.ndarray
    fold: np.ndarray
    classes: list[str]
    kind: str  # "5-fold out-of-fold" or "validation set"


def train(inputs, *, labels=None, val=None, folds: int = DEFAULT_FOLDS, C: float | None = None, seed: int = 0,
          class_weight: str | None = None, layer: str | None = None, log=None, **embed_options) -> Head:
    """Train a head on the user's own classes; return it, with its figures in `head.metrics` and the
    probabilities they come from in `head.evaluation`.

    Args:
        inputs: embedding outputs (`.npy` + index, `.npz`, `.parquet`, `.csv`, a Ray folder) or image files
            and folders (embedded in memory with `vggembed.extract` and `embed_options`: weights, precision,
            resize, ...), a path or a list of them.
        labels: a label table (CSV `path,label` or Parquet), or a {path: label} dict; None: folder names.
        val: a validation set, as `inputs` (labelled the same way); evaluated instead of k folds.
        folds: k of the stratified k-fold.
        C: the inverse L2 strength (scikit-learn's); None chooses it by the sweep.
        class_weight: None (every row alike) or "balanced" (every class alike, however few its rows).
        layer: which output of a file of several to train on (default: its first).
        log: fn(line) for progress lines (default: stderr).

    Example:
        >>> head = vggembed.train("feats.npy", labels="labels.csv")
        >>> head.metrics["top1"], head.predict(vectors)
    """
    log = log or (lambda line: print(f"vggembed: {line}", file=sys.stderr))
    table = read_label_table(labels) if isinstance(labels, (str, os.PathLike)) else labels
    with _opened(inputs, layer, embed_options) as sources, _opened(val or [], layer, embed_options) as val_sources:
        return fit_head(sources, table, val_sources, folds=folds, C=C, seed=seed, class_weight=class_weight,
                        log=log)


class _opened:
    """Inputs as `Rows`: embedding outputs opened (and closed after), images embedded in memory."""

    def __init__(self, inputs, layer, embed_options):
        self.inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        self.layer, self.options, self.open = layer, embed_options, []

    def __enter__(self) -> list[Rows]:
        from ..store.vectors import open_vectors

        rows, images = [], []
        try:
            for i in self.inputs:
                if is_embedding_output(i):
                    v = open_vectors(i, layer=self.layer)
                    self.open.append(v)
                    rows.append(Rows.of(v))
                else:
                    images.append(os.fsdecode(i))
            if images:
                from .extract import extract

                out = extract(images, self.layer or "fc2", **self.options)
                if not out.paths:
                    raise VGGEmbedError(f"{', '.join(images)}: no image could be embedded")
                recipe = _extract_recipe(self.layer or "fc2", self.options)
                rows.append(Rows.arrays(next(iter(out.arrays.values())), out.paths, recipe, ", ".join(images)))
        except BaseException:
            self.__exit__()
            raise
        return rows

    def __exit__(self, *exc):
        for v in self.open:
            v.close()


def _extract_recipe(layer, options) -> Recipe:
    """The recipe `extract` ran, bound to its weight file, so the head records what it was trained on."""
    from ..net.arch import parse_outputs
    from ..net.load import locate
    from ..net.weights import load_weights

    fields = {k: options[k] for k in ("precision", "resize", "dtype", "l2_normalize") if k in options}
    recipe = locate(Recipe(weights=None if options.get("weights") is None else str(options["weights"]),
                           model=options.get("model", "vgg16"), outputs=parse_outputs([layer]), **fields))
    _, spec = load_weights(recipe.weights, layers=())
    return recipe.bind(spec)


def is_embedding_output(name) -> bool:
    """An embedding output (read as vectors) rather than images: `.npy`, `.npz`, `.parquet`, `.csv`, or a
    folder holding a Ray run's `manifest.json`."""
    name = os.fsdecode(name)
    if name.lower().endswith((".npy", ".npz", ".parquet", ".csv")):
        return True
    if "://" in name:
        return False
    return os.path.isfile(os.path.join(name, "manifest.json"))


def fit_head(sources: list[Rows], labels: dict | None, val_sources: list[Rows] = (), *, folds: int = DEFAULT_FOLDS,
             C: float | None = None, seed: int = 0, class_weight: str | None = None, log=print) -> Head:
    """`train` on opened sources (see there)."""
    if not sources:
        raise VGGEmbedError("no inputs to train on")
    if class_weight not in CLASS_WEIGHTS:
        raise VGGEmbedError(f"class_weight must be one of {', '.join(map(repr, CLASS_WEIGHTS))}; "
                            f"received {class_weight!r}")
    balanced = class_weight == "balanced"
    if not isinstance(seed, int) or seed < 0:
        raise VGGEmbedError(f"seed must be a whole number 0 or more; received {seed!r}")
    if C is not None and not (C > 0 and math.isfinite(C)):
        raise VGGEmbedError(f"C must be a positive number; received {C}")
    recipe = _one_recipe(list(sources) + list(val_sources))
    dims = {s.dim for s in list(sources) + list(val_sources)}
    if len(dims) > 1:
        raise VGGEmbedError(f"the inputs hold vectors of different widths ({sorted(dims)})")
    where = ", ".join(s.source for s in sources)
    data = gather(sources, labels, where=where)
    _report_left_out(data, where, log, labels is None)
    counts = np.bincount(data.given(), minlength=len(data.classes))
    if len(data.classes) < 2:
        what = f"only one class ({data.classes[0]!r})" if data.classes else "no labelled image"
        hint = ("labels come from the first level of subfolders (photos/cat/a.jpg is cat); give the folder that "
                "holds the class folders, or --labels FILE") if labels is None else "check --labels"
        raise VGGEmbedError(f"{where}: {what}; a classifier needs at least two classes: {hint}")
    class_names(data.classes, where)  # as the head will check them (an empty label of a dict), before the fits
    if val_sources:  # read and checked before any fit
        vdata = gather(list(val_sources), labels, classes=data.classes,
                       where=", ".join(s.source for s in val_sources))
        _report_left_out(vdata, "--val", log, labels is None)
        if not vdata.count:
            raise VGGEmbedError("--val: no labelled image among the validation inputs")
        trained = {_identity(p) for p in data.paths()}
        both = [p for p in vdata.paths() if _identity(p) in trained]
        if both:
            raise VGGEmbedError(f"--val: {len(both)} of its images are also trained on (first: {display(both[0])});"
                                " a validation set must be images the head has not seen")
    smallest = int(counts.min())
    k = folds
    if smallest < 2 and not val_sources:
        lone = [data.classes[i] for i in np.flatnonzero(counts < 2)]
        raise VGGEmbedError(f"{where}: class {lone[0]!r} has {smallest} image" + (f" (and {len(lone) - 1} more "
                            "such classes)" if len(lone) > 1 else "") + "; every class needs at least 2 to be "
                            "evaluated out of fold: add images, drop the class, or give --val")
    if smallest < k:
        k = max(2, smallest)
        small = data.classes[int(np.argmin(counts))]
        log(f"note: class {small!r} has {smallest} images, fewer than {folds} folds: using {k} folds")
    given = data.given()
    fold = fold_of(given, k, seed)
    # rows fold by fold, in a seeded random order within each (so a prefix of a fold is a sample of it)
    order = np.lexsort((np.random.default_rng(seed + 1).permutation(len(fold)), fold))
    X = _matrix(data, order)
    y = given[order]
    bounds = np.searchsorted(fold[order], np.arange(k + 1))
    log(f"training on {data.count} images of {len(data.classes)} classes ({X.shape[1]}-d {recipe.outputs[0].name}"
        f" vectors){'' if C is not None else f'; choosing C on fold 1 of {k}'}")
    problem = Problem(X, y, len(data.classes))
    total = problem.sums([slice(0, problem.N)])
    block = [problem.sums([slice(int(bounds[f]), int(bounds[f + 1]))]) for f in range(k)]

    def fold_scale(f):
        s, q, n = (total[0] - block[f][0], total[1] - block[f][1], total[2] - block[f][2])
        return problem.scale_from(s, q, n)

    def train_rows(f):
        return [slice(0, int(bounds[f])), slice(int(bounds[f + 1]), problem.N)]

    sweep, chosen_fit = [], None
    if C is None:
        C, sweep, chosen_fit = _sweep(problem, bounds, fold_scale(0), balanced, log)

    evaluation_kind = f"{k}-fold out-of-fold" if not val_sources else "validation set"
    # The head and the folds fit together, sharing passes over the rows (`Problem.fit_together`). The folds
    # start from zero, as scikit-learn's cross_val_predict: a fold's fit stops within a tolerance of its optimum,
    # so one started from a model that saw its held-out rows (the head) could stop close to that model and score
    # those rows as if it had never seen them. With weak L2 on rows it separates, the head itself met the
    # tolerance: every fold ran 0 iterations and scored 1.0 where 0.68 was honest.
    tasks = [Task([slice(0, problem.N)], C, problem.scale_from(*total), init=chosen_fit, tol=HEAD_TOL,
                  balanced=balanced)]
    if not val_sources:
        tasks += [Task(train_rows(f), C, fold_scale(f), tol=FIT_TOL, balanced=balanced) for f in range(k)]
    # As many at once as hold their L-BFGS state in a third of the matrix's size (at least 256 MiB): the run's
    # memory grows with its rows, not with its folds (3 at a time at 100,000 x 4,096 and 100 classes).
    together = max(1, max(X.nbytes // 3, 256 << 20) // problem.state_bytes())
    if len(tasks) > 1 and together > 1:
        log(f"fitting the head and the {k} folds, {min(together, len(tasks))} at a time")
    final, *fits = problem.fit_together(tasks, together=together)
    log(f"final fit on all {problem.N} rows: {final.iterations} iterations")
    if not final.converged:
        log(f"note: the final fit stopped after {final.iterations} iterations before converging")
    fold_fits = []
    if not val_sources:
        proba = np.empty((problem.N, problem.K), np.float32)
        for f, fit in enumerate(fits):
            proba[bounds[f]:bounds[f + 1]] = problem.proba(fit, slice(int(bounds[f]), int(bounds[f + 1])))
            log(f"fold {f + 1}/{k}: {fit.iterations} iterations")
            fold_fits.append({"rows": problem.N - int(bounds[f + 1] - bounds[f]), "iterations": fit.iterations,
                              "evaluations": fit.evaluations})
    head = Head(classes=list(data.classes), coef=final.coef, intercept=final.intercept,
                mean=problem.mean.astype(np.float32), scale=final.scale, C=float(C), recipe=recipe)
    if val_sources:
        vproba = np.concatenate([head.predict_proba(s.read(0, s.rows)[rows])
                                 for s, (rows, _) in zip(vdata.sources, vdata.picks) if len(rows)])
        evaluation = Evaluation(vdata.paths(), vdata.given(), vproba, np.full(vdata.count, -1), data.classes,
                                evaluation_kind)
    else:
        unordered = np.empty_like(proba)
        unordered[order] = proba
        evaluation = Evaluation(data.paths(), given, unordered, fold, data.classes, evaluation_kind)
    head.metrics = {
        "evaluation": evaluation_kind,
        **evaluate.metrics(evaluation.proba, evaluation.given, data.classes),
        "C": float(C),
        "C_chosen_by": "sweep on fold 1" if sweep else "given",
        "class_weight": "balanced" if balanced else None,
        "sweep": sweep,
        "folds": k,
        "seed": seed,
        "trained": int(data.count),
        "class_counts": {c: int(n) for c, n in zip(data.classes, counts)},
        "unlabelled": int(data.unlabelled),
        "non_finite": len(data.non_finite),
        "final_iterations": final.iterations,
        # the work of each fit, in passes over its rows (an evaluation of the objective and its gradient)
        "final_evaluations": final.evaluations,
        "fold_fits": fold_fits,
        "fits_at_once": min(together, len(tasks)),  # the head and the folds, sharing passes over the rows
    }
    head.evaluation = evaluation
    return head


def _sweep(problem: Problem, bounds: np.ndarray, scale: np.ndarray, balanced: bool, log) -> tuple:
    """Choose C on fold 1 (`bounds[0]:bounds[1]`) with the other folds training (at most `SWEEP_ROWS` of
    their rows, each fold alike): (C for all their rows, the sweep's figures, the fit at the chosen C)."""
    k = len(bounds) - 1
    held = slice(int(bounds[0]), int(bounds[1]))
    n_train = problem.N - (held.stop - held.start)
    share = min(1.0, SWEEP_ROWS / max(n_train, 1))
    rows = [slice(int(bounds[f]), int(bounds[f]) + max(1, round(share * (bounds[f + 1] - bounds[f]))))
            for f in range(1, k)]
    n = sum(r.stop - r.start for r in rows)
    if n < n_train:
        log(f"sweeping C on a sample of {n} of the {n_train} training rows")
    given = problem.y[held]
    score = "balanced_accuracy" if balanced else "top1"  # what the head is trained to do well
    results, fits = [], {}
    best, worse, previous = None, 0, None
    for cn in SWEEP:
        fit = problem.fit(rows, cn / n, scale, init=previous, tol=FIT_TOL, balanced=balanced)
        previous = fit
        proba = problem.proba(fit, held)
        m = evaluate.metrics(proba, given, [str(i) for i in range(problem.K)])
        C = cn / n_train  # the same L2 strength per row on all the training rows
        results.append({"C": C, "top1": m["top1"], "balanced_accuracy": m["balanced_accuracy"],
                        "log_loss": m["log_loss"], "iterations": fit.iterations, "evaluations": fit.evaluations,
                        "rows": n})
        fits[C] = fit
        log(f"C {C:.3g}: top-1 {m['top1']:.4f}" + (f", balanced accuracy {m['balanced_accuracy']:.4f}" if balanced
                                                     else "")
            + f", log-loss {m['log_loss']:.4f} on fold 1 ({fit.iterations} iterations)")
        key = (-m[score], m["log_loss"])
        if best is None or key < best[0]:
            best, worse = (key, C), 0
        else:
            worse += 1
            if worse >= 2:
                break
    C = best[1]
    log(f"chose C = {C:.3g}")
    return C, results, fits[C]


def _one_recipe(sources: list[Rows]) -> Recipe:
    """The inputs' common recipe (one output): vectors of two recipes are not trained on together."""
    first = None
    for s in sources:
        if s.recipe is None:
            raise VGGEmbedError(f"{s.source}: records no recipe (written before vggembed recorded one); a head "
                                "must know the weights and layer its features came from: embed the images again")
        r = s.recipe.replace(dtype="float32", top=0)
        if first is None:
            first = (s, r)
        else:
            r.check_same(first[1], f"{s.source}", f"it cannot be trained on with {first[0].source}")
    return first[1]


def _report_left_out(data: Labelled, where: str, log, by_folder: bool) -> None:
    if data.unlabelled:
        why = (f"directly in {data.root}, not in a class folder" if by_folder
               else "not in the label table, or labelled there with an empty label")
        log(f"note: {data.unlabelled} images of {where} have no label ({why}); they are not trained on")
    if data.unused_labels:
        first = ", ".join(display(n) for n in data.unused_labels[:3])
        log(f"note: {len(data.unused_labels)} labels name paths that are not among {where} (first: {first})")
    if data.repeated:
        first = ", ".join(display(n) for n in data.repeated[:3])
        log(f"note: {len(data.repeated)} images of {where} are inputs more than once (first: {first}); each is "
            "trained on and evaluated once")
    if data.non_finite:
        first = ", ".join(display(n) for n in data.non_finite[:3])
        log(f"note: {len(data.non_finite)} vectors hold NaN or infinite values (first: {first}); they are not "
            "trained on")
