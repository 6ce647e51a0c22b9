"""Read ImageNet class names from the files people keep beside their weights.

Formats: Frossard's `imagenet_classes.py` (parsed with `ast`, never run),
Caffe's `synset_words.txt` ("n01440764 tench, Tinca tinca"), Keras'
`imagenet_class_index.json` ({"0": ["n01440764", "tench"], ...}) and plain
text with one label per line.

Anything else in such a file (a value that is not a list of strings, a call
other than a literal string split on a literal separator, keys that are not
the indices 0..N-1, a synset line without its name) is a one-line
`LabelFileError` naming the file and what was expected.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from ..errors import VGGEmbedError
from ..images.safeio import NotAFileError, open_regular

# Looked for beside a weight file, in this order.
BESIDE_WEIGHTS = ("imagenet_classes.py", "synset_words.txt", "imagenet_class_index.json")

_SYNSET = re.compile(r"^n\d{8}(?:\s+(.*))?$")
# ImageNet-21k's synset list is about 1 MB; anything far larger is not a label file.
MAX_BYTES = 64 << 20

_PYTHON_FORMS = ("a literal list of strings, a dict {0: 'name', ...} or a literal string split on a literal "
                 "separator (\"\"\"...\"\"\".split(\"\\n\"))")
_JSON_ITEM = 'a name or a [WordNet id, name] pair such as ["n01440764", "tench"]'


class LabelFileError(VGGEmbedError):
    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")


def find_labels(folder: Path) -> Path | None:
    for name in BESIDE_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    return None


def read_labels(path) -> list[str]:
    """Class names, index i at position i.

    Raises:
        LabelFileError: the file is missing, not a regular file, too large, or
            not laid out as its kind expects; the message says what was expected.
    """
    path = Path(path)
    try:
        with open_regular(path, "label file") as f:
            raw = f.read(MAX_BYTES + 1)
    except NotAFileError as e:
        raise LabelFileError(path, e.problem) from None
    except OSError as e:
        raise LabelFileError(path, f"cannot read labels: {e.strerror or e}") from None
    if len(raw) > MAX_BYTES:
        raise LabelFileError(path, f"is over {MAX_BYTES >> 20} MiB; a label file holds one short name per class")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LabelFileError(path, f"is not UTF-8 text (bad byte at offset {e.start}); expected one label per line") \
            from None
    if path.suffix == ".py":
        labels = _from_python(path, text)
    elif path.suffix == ".json":
        labels = _from_json(path, text)
    else:
        labels = _from_lines(path, text)
    if not labels:
        raise LabelFileError(path, "holds no labels")
    return labels


def _from_lines(path: Path, text: str) -> list[str]:
    """Plain lines, or Caffe's synset_words.txt when the first line is "nXXXXXXXX name"."""
    lines = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines or not (first := _SYNSET.match(lines[0][1])) or not first.group(1):
        return [line for _, line in lines]
    labels = []
    for i, line in lines:
        m = _SYNSET.match(line)
        if not m or not m.group(1):
            raise LabelFileError(path, f"line {i} is {_show(line)}; expected a WordNet id and a name, "
                                       "as in the first line (n01440764 tench, Tinca tinca)")
        labels.append(m.group(1).strip())
    return labels


def _from_python(path: Path, text: str) -> list[str]:
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as e:
        where = f" (line {e.lineno})" if e.lineno else ""
        raise LabelFileError(path, f"is not valid Python: {e.msg}{where}") from None
    except (ValueError, RecursionError, MemoryError) as e:  # NUL bytes; absurd nesting
        raise LabelFileError(path, f"is not valid Python: {e}") from None
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "class_names" for t in targets):
            return _literal_labels(path, node.value)
    raise LabelFileError(path, "assigns no `class_names`")


def _literal_labels(path: Path, node: ast.expr) -> list[str]:
    if isinstance(node, ast.Call):
        return _split_labels(path, node)
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise LabelFileError(path, f"`class_names` is not a literal; expected {_PYTHON_FORMS}") from None
    if isinstance(value, dict):
        return _indexed(path, value, "class", lambda v: v if isinstance(v, str) else None, "a string")
    if isinstance(value, (list, tuple)):
        return _strings(path, value, "class")
    raise LabelFileError(path, f"`class_names` is {_kind(value)}; expected {_PYTHON_FORMS}")


def _split_labels(path: Path, node: ast.Call) -> list[str]:
    """A literal string's .split(SEP) or .splitlines(), as Frossard's file has it; no other call."""
    func = node.func
    given = node.args + [k.value for k in node.keywords if k.arg == "sep"]
    args = [a.value for a in given if isinstance(a, ast.Constant)]
    ok = (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Constant)
        and isinstance(func.value.value, str)
        and all(k.arg == "sep" for k in node.keywords)
        and len(args) == len(node.args) + len(node.keywords)
        and (func.attr == "splitlines" and not args
             or func.attr == "split" and len(args) <= 1 and all(isinstance(a, str) and a for a in args))
    )
    if not ok:
        raise LabelFileError(path, f"`class_names` is not a literal but a call, which vggembed never runs; expected {_PYTHON_FORMS}")
    text = func.value.value
    parts = text.splitlines() if func.attr == "splitlines" else text.split(*args)
    return [p.strip() for p in parts if p.strip()]


def _from_json(path: Path, text: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LabelFileError(path, f"is not valid JSON: {e}") from None
    except RecursionError:
        raise LabelFileError(path, "is not valid JSON: nested too deeply") from None
    if isinstance(data, dict):
        return _indexed(path, data, "entry", _json_name, _JSON_ITEM)
    if isinstance(data, list):
        for i, item in enumerate(data):
            if _json_name(item) is None:
                raise LabelFileError(path, f"item {i} is {_show(item)}; expected {_JSON_ITEM}")
        return _strings(path, [_json_name(item) for item in data], "item")
    raise LabelFileError(path, f"holds {_kind(data)}; expected an object "
                               '{"0": ["n01440764", "tench"], ...} or a list of names')


def _json_name(item) -> str | None:
    """The class name of one Keras index entry, or None when it has none."""
    if isinstance(item, str):
        return item
    if isinstance(item, list) and item and all(isinstance(v, str) for v in item):
        return item[-1]
    return None


def _indexed(path: Path, mapping: dict, what: str, name, expected: str) -> list[str]:
    """Names from a mapping whose keys are the class indices 0..N-1 (ints or digit strings)."""
    by_index = {}
    for key, value in mapping.items():
        if isinstance(key, bool) or not (isinstance(key, int) or isinstance(key, str) and key.strip().isdigit()):
            raise LabelFileError(path, f"has key {_show(key)}; expected class indices 0, 1, 2, ...")
        by_index[int(key)] = value
    if sorted(by_index) != list(range(len(mapping))):
        missing = min(set(range(len(mapping))) - set(by_index), default=None)
        detail = f"index {missing} is missing" if missing is not None else "two keys name the same index"
        raise LabelFileError(path, f"has {len(mapping)} keys but {detail}; expected class indices 0..N-1")
    names = []
    for i in range(len(by_index)):
        n = name(by_index[i])
        if n is None:
            raise LabelFileError(path, f"{what} {i} is {_show(by_index[i])}; expected {expected}")
        names.append(n)
    return _strings(path, names, what)


def _strings(path: Path, values, what: str) -> list[str]:
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise LabelFileError(path, f"{what} {i} is {_show(v)}; expected a string")
        if not v.strip():
            raise LabelFileError(path, f"{what} {i} is an empty name")
    return [v.strip() for v in values]


def _kind(value) -> str:
    kinds = {str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null",
             set: "a set (which has no order)"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _show(value, most: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."
