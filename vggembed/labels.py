"""Read ImageNet class names from the files people keep beside their weights.

Formats: Frossard's `imagenet_classes.py` (parsed with `ast`, never run),
Caffe's `synset_words.txt` ("n01440764 tench, Tinca tinca"), Keras'
`imagenet_class_index.json` ({"0": ["n01440764", "tench"], ...}) and plain
text with one label per line.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from .errors import VGGEmbedError

# Looked for beside a weight file, in this order.
BESIDE_WEIGHTS = ("imagenet_classes.py", "synset_words.txt", "imagenet_class_index.json")

_SYNSET = re.compile(r"^n\d{8}\s+(.*)$")


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
        LabelFileError: the file is missing or holds no list of names.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LabelFileError(path, f"cannot read labels: {e}") from None
    if path.suffix == ".py":
        labels = _from_python(path, text)
    elif path.suffix == ".json":
        labels = _from_json(path, text)
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        labels = [m.group(1) if (m := _SYNSET.match(line)) else line for line in lines]
    if not labels:
        raise LabelFileError(path, "holds no labels")
    return labels


def _from_python(path: Path, text: str) -> list[str]:
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as e:
        raise LabelFileError(path, f"is not valid Python: {e.msg} (line {e.lineno})") from None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "class_names" for t in node.targets
        ):
            return _literal_labels(path, node.value)
    raise LabelFileError(path, "assigns no `class_names`")


def _literal_labels(path: Path, node: ast.expr) -> list[str]:
    # '''a\nb'''.split("\n") and '''...'''.splitlines(), as Frossard's file has it
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("split", "splitlines")
        and isinstance(node.func.value, ast.Constant)
        and isinstance(node.func.value.value, str)
    ):
        args = [ast.literal_eval(a) for a in node.args]
        text = node.func.value.value
        parts = text.splitlines() if node.func.attr == "splitlines" else text.split(*args)
        return [p.strip() for p in parts if p.strip()]
    try:
        value = ast.literal_eval(node)
    except ValueError:
        raise LabelFileError(path, "`class_names` is not a literal list, dict or string split") from None
    if isinstance(value, dict):
        return [str(value[k]) for k in sorted(value)]
    return [str(v) for v in value]


def _from_json(path: Path, text: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LabelFileError(path, f"is not valid JSON: {e}") from None
    if isinstance(data, dict):
        items = [data[k] for k in sorted(data, key=int)]
    else:
        items = data
    return [item[-1] if isinstance(item, list) else str(item) for item in items]
