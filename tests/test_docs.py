"""The documentation's commands and examples work.

Every `vggembed ...` command in README.md and docs/*.md names a real command and real options; a representative
set of them runs as written (on tiny weights placed where a user's would be, in ./weights/) and makes its output;
every ```python block compiles, and runs in order with the others of its page, in the same kind of folder. A block
that cannot run here (it needs a CPU feature, a cluster, a bucket) says so on the line before it:
`<!-- not run: why -->`; it is still compiled.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vggembed.cli import main
from vggembed.net import synthetic

from .conftest import LABELS

ROOT = Path(__file__).resolve().parents[1]
PAGES = {p.relative_to(ROOT).as_posix(): p.read_text() for p in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))]}
README = PAGES["README.md"]

SHELL_BLOCK = re.compile(r"```(?:sh|bash|shell|console)\n(.*?)```", re.S)
PYTHON_BLOCK = re.compile(r"(<!-- not run: [^\n]*-->\n)?```python\n(.*?)```", re.S)


def shell_lines(text):
    """The command lines of a page's shell blocks: continuations joined, prompts and comments dropped."""
    for block in SHELL_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            line = line[2:] if line.startswith("$ ") else line
            if line and not line.startswith("#"):
                yield line


def invocations(text):
    """Every `vggembed ...` invocation in a page's shell blocks, as argument lists."""
    for line in shell_lines(text):
        for part in re.split(r"&&|\|", line):
            words = shlex.split(part, comments=True)
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=value vggembed ...
                words.pop(0)
            if words and words[0] == "vggembed":
                yield words[1:]


def options(cmd):
    return {opt: p for p in cmd.params for opt in p.opts + p.secondary_opts}


def resolve(args):
    """The command that `vggembed ARGS` runs, and the words left for it; a group's own options (`-v`) may come
    before its command."""
    cmd, rest = main, list(args)
    while isinstance(cmd, click.Group) and rest:
        if rest[0] in cmd.commands:
            cmd = cmd.commands[rest.pop(0)]
        elif rest[0] in options(cmd):
            param = options(cmd)[rest.pop(0)]
            if not getattr(param, "is_flag", False):
                rest.pop(0)
        else:
            break
    return cmd, rest


INVOCATIONS = [(page, args) for page, text in PAGES.items() for args in invocations(text)]


def test_readme_and_docs_show_commands():
    assert len(list(invocations(README))) >= 10
    assert {page for page, _ in INVOCATIONS} >= {"README.md", "docs/inputs.md", "docs/search.md", "docs/ray.md"}


@pytest.mark.parametrize("page,args", INVOCATIONS, ids=[f"{p}: {' '.join(a)[:60]}" for p, a in INVOCATIONS])
def test_documented_command_and_options_exist(page, args):
    cmd, rest = resolve(args)
    assert not isinstance(cmd, click.Group), f"{page}: vggembed {' '.join(args)}: no such command"
    known = set(options(cmd)) | {"--help", "-h"}
    for word in rest:
        if word.startswith("-") and word != "-":
            assert word.split("=")[0] in known, f"{page}: vggembed {' '.join(args)}: unknown option {word}"


def test_every_command_has_help_text():
    def walk(group, prefix):
        for name, cmd in group.commands.items():
            assert cmd.help, f"{prefix}{name} has no help"
            if isinstance(cmd, click.Group):
                walk(cmd, f"{prefix}{name} ")

    walk(main, "")


def test_readme_table_options_exist():
    """The option table in the README names options the commands have."""
    options = {p for cmd in (main.commands["embed"], main.commands["classify"]) for par in cmd.params
               for p in par.opts}
    table = README.split("The important ones:")[1].split("stdout carries")[0]
    found = re.findall(r"`(--[a-z0-9-]+)", table)
    assert len(found) > 10
    for opt in found:
        assert opt in options, opt


def anchors(text):
    """GitHub's anchors for a page's headings."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def prose(text):
    """A page without its code: fenced blocks and inline code (code such as `x[0](y)` is no link)."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))


def test_docs_links_point_at_files_and_headings():
    for page, text in PAGES.items():
        for target, anchor in re.findall(r"\]\(([^)#:\s]*)(?:#([^)\s]*))?\)", prose(text)):
            path = ((ROOT / page).parent / target).resolve() if target else ROOT / page
            assert path.exists(), f"{page}: link to missing {target}"
            if anchor and path.suffix == ".md":
                assert anchor in anchors(path.read_text()), f"{page}: no heading #{anchor} in {target or page}"


# ------------------------------------------------------------------ documented commands, run as written
@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_params, photos):
    """A folder holding what the docs' examples name: tiny weights under their published names in ./weights/
    (with a label file beside the .npz), a.jpg, b.png, cat.jpg, laska.png, images/ (24 distinct photos, enough
    for `cluster -k 20`), photos/ (JPEGs, one in a subfolder), queries/, list.txt and examples/images/."""
    root = tmp_path_factory.mktemp("world")
    weights = root / "weights"
    weights.mkdir()
    synthetic.write_npz(tiny_params["vgg16"], weights / "vgg16_weights.npz")
    (weights / "synset_words.txt").write_text("\n".join(LABELS) + "\n")
    synthetic.write_mat(tiny_params["vgg19"], weights / "imagenet-vgg-verydeep-19.mat", labels=LABELS)
    chelsea, coffee, astronaut, grace = photos
    Image.open(astronaut).convert("RGB").save(root / "a.jpg")
    shutil.copy(coffee, root / "b.png")
    shutil.copy(coffee, root / "dog.png")
    Image.open(chelsea).convert("RGB").save(root / "cat.jpg")
    shutil.copy(grace, root / "laska.png")  # a JPEG under a .png name: types come from content
    for i, photo in enumerate(photos):
        synthetic.photo_crops(photo, root / "images", 6, size=(160, 120), suffix=f"-{i}.png")
        synthetic.photo_crops(photo, root / "photos" / ("sub" if i == 3 else ""), 2, size=(200, 150),
                              suffix=f"-{i}.jpg")
    (root / "queries").mkdir()
    for p in (root / "a.jpg", root / "cat.jpg"):
        shutil.copy(p, root / "queries" / p.name)
    (root / "list.txt").write_text("a.jpg\nb.png\ncat.jpg\n")
    # docs/train.md: pets/CLASS/ folders, new/ to classify, and labels.csv naming images/'s rows by photo
    for name, photo in (("cat", chelsea), ("dog", coffee)):
        synthetic.photo_crops(photo, root / "pets" / name, 6, size=(96, 72), suffix=".jpg")
    synthetic.photo_crops(astronaut, root / "new", 2, size=(96, 72), suffix=".jpg")
    (root / "labels.csv").write_text("path,label\n" + "".join(
        f"images/img{n:06d}-{i}.png,photo {i}\n" for i in range(4) for n in range(6)))
    shutil.copytree(ROOT / "examples" / "images", root / "examples" / "images")
    return root


@pytest.fixture
def here(world, tmp_path, monkeypatch):
    """A fresh copy of the world as the working folder, with the environment a new user has."""
    folder = tmp_path / "here"
    shutil.copytree(world, folder)
    monkeypatch.chdir(folder)
    for name in ("VGGEMBED_WEIGHTS", "VGGEMBED_MIRROR", "VGGEMBED_VERBOSE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VGGEMBED_HOME", str(tmp_path / "cache"))
    return folder


def run_line(line):
    """Run one documented line in the working folder: `vggembed ...`, or `producer | vggembed ...` whose
    producer (find, ...) runs in a shell and feeds vggembed's stdin."""
    producer, _, command = line.rpartition("|")
    stdin = subprocess.run(producer, shell=True, check=True, capture_output=True).stdout if producer else None
    words = shlex.split(command)
    assert words[0] == "vggembed", line
    return CliRunner().invoke(main, words[1:], input=stdin, catch_exceptions=False)


TOP5 = r"^1\. label \d \([01]\.\d{4}\)\n(\d\. label \d \([01]\.\d{4}\)\n){4}$"  # the tutorial's "1. weasel (0.6934)"
# (page, the line as documented, files it must make, what its stdout must match)
QUICK_START = [
    ("README.md", "vggembed embed examples/images -o feats.npy", ["feats.npy", "feats.npy.index.csv"], None),
    ("README.md", "vggembed classify examples/images/chelsea.png", [], TOP5),
]
TOUR = [
    ("README.md", "vggembed embed images/ -o feats.npy",
     ["feats.npy", "feats.npy.index.csv", "feats.npy.errors.csv", "feats.npy.meta.json"], None),
    ("README.md", "vggembed search feats.npy cat.jpg -k 5", [], r"^query,rank,path,score\n(cat\.jpg,\d,images/.*\n){5}$"),
    ("docs/search.md", "vggembed search feats.npy --rows 0,12 --min-score 0.9", [], r"^query,rank,path,score\n"),
    ("README.md", "vggembed dedup feats.npy -o groups.csv --sheet groups.png", ["groups.csv", "groups.png"], None),
    ("docs/search.md", "vggembed cluster feats.npy -k 20 -o clusters.csv --sheet clusters.png --seed 0",
     ["clusters.csv", "clusters.png"], None),
    ("README.md", "vggembed embed a.jpg b.png -o feats.csv --layer pool5 --pool avg", ["feats.csv"], None),
    ("README.md", "find photos -name '*.jpg' | vggembed embed - -o feats.parquet", ["feats.parquet"], None),
    ("docs/search.md", "vggembed search feats.parquet queries/ -o hits.csv --sheet hits.png",
     ["hits.csv", "hits.png"], None),
    ("README.md", "vggembed classify laska.png", [], TOP5),
    ("README.md", "vggembed classify photos/ --format csv -o preds.csv", ["preds.csv"], None),
    ("README.md", "vggembed maps cat.jpg -o maps.png --model vgg19", ["maps.png"], None),
    ("README.md", "vggembed maps cat.jpg --layer conv3_1 --channels 64 -o grid.png", ["grid.png"], None),
    ("README.md", "vggembed plot laska.png -o fc2.png", ["fc2.png"], None),
    ("README.md", "vggembed info weights/vgg16_weights.npz", [], r"vgg16"),
    ("README.md", "vggembed weights list", [], r"^vgg16 "),
    ("docs/train.md", "vggembed train pets/ -o head.npz", ["head.npz", "head.oof.npz", "head.confusion.png"],
     r"5-fold out-of-fold figures of head.npz"),
    ("docs/train.md", "vggembed audit head.features.npy --folders -o pets-audit/",
     ["pets-audit/label_issues.csv", "pets-audit/report/index.html"], None),
    ("docs/train.md", "vggembed info head.npz", [], r"logistic, 32 -> 2 classes"),
    ("docs/train.md", "vggembed classify new/ --head head.npz", [], r"^path\trank\tindex\tlabel\tprobability\n"
     r"new/img000000\.jpg\t1\t\d\t(cat|dog)\t"),
    ("docs/report.md", "vggembed audit pets/ --folders -o audit/",
     ["audit/features.npy", "audit/label_issues.csv", "audit/classes.csv", "audit/report/index.html"], None),
    ("docs/train.md", "vggembed embed pets/ -o pets.npy", ["pets.npy"], None),
    ("docs/train.md", "vggembed train pets.npy -o head.npz --overwrite", ["head.npz"], None),
    ("docs/train.md", "vggembed train pets.npy -o balanced.npz --class-weight balanced", ["balanced.npz"],
     r"\(C = [0-9.e-]+, 2 classes, balanced, fc2\)"),
    ("docs/reliability.md", "vggembed embed images/ -o feats.npy --overwrite", ["feats.npy"], None),
    ("docs/train.md", "vggembed train feats.npy --labels labels.csv -o other.npz --C 0.05", ["other.npz"],
     r"photo 3"),
    # --resume with nothing begun starts the run; once it is complete, the same command is a no-op
    ("docs/reliability.md", "vggembed embed --files-from list.txt -o listed.npy --resume", ["listed.npy"], None),
    ("docs/reliability.md", "vggembed embed --files-from list.txt -o listed.npy --resume", ["listed.npy"], None),
]


@pytest.mark.parametrize("steps", [QUICK_START, TOUR], ids=["README quick start", "tour of the docs"])
def test_documented_commands_run_as_written(here, steps):
    for page, line, files, stdout in steps:
        shown = {part.strip() for shown in shell_lines(PAGES[page]) for part in [shown, *shown.split("&&")]}
        assert line in shown, f"{page} no longer shows `{line}`: update this list"
        result = run_line(line)
        assert result.exit_code == 0, f"{line}: exit {result.exit_code}\n{result.output}"
        for name in files:
            assert (here / name).is_file() and (here / name).stat().st_size > 0, f"{line}: no {name}"
        if stdout:
            assert re.search(stdout, result.stdout), f"{line}: stdout {result.stdout!r}"
    if steps is TOUR:
        assert np.load(here / "feats.npy").shape == (24, 32)  # the --overwrite run's rows
        assert np.load(here / "listed.npy").shape[0] == 3  # list.txt's images, embedded once
        assert len((here / "clusters.csv").read_text().splitlines()) == 25
        assert len((here / "preds.csv").read_text().splitlines()) == 1 + 8 * 5


# ------------------------------------------------------------------ Python examples
def python_blocks():
    """(page, line number, source, why it is not run or None) for every ```python block."""
    for page, text in PAGES.items():
        for m in PYTHON_BLOCK.finditer(text):
            why = m.group(1) and m.group(1)[len("<!-- not run: "):-len("-->\n")].strip()
            yield page, text[:m.start(2)].count("\n") + 1, m.group(2), why


BLOCKS = list(python_blocks())
RUN_PAGES = sorted({page for page, _, _, why in BLOCKS if not why})


def test_docs_show_python_and_every_block_compiles():
    assert {"README.md", "docs/python-api.md", "docs/search.md"} <= set(RUN_PAGES)
    for page, line, source, _ in BLOCKS:
        compile(source, f"{page}:{line}", "exec")


# What a page's Python blocks read, made first by the commands that page documents.
BEFORE_PYTHON = {
    "docs/deploy.md": [
        "vggembed export models/vgg16 --format saved-model --weights weights/vgg16_weights.npz --layer fc2 --top 5",
        "vggembed export vgg16.tflite --format tflite --weights weights/vgg16_weights.npz --layer pool5:avg",
    ],
}


@pytest.mark.parametrize("page", RUN_PAGES)
def test_python_examples_run(here, page):
    """A page's blocks run in order in one namespace, as a reader would paste them, in a folder with the files
    they name and `feats.npy` made by the documented `vggembed embed images/ -o feats.npy` (and what the page's
    own commands make, BEFORE_PYTHON)."""
    assert run_line("vggembed embed images/ -o feats.npy").exit_code == 0
    for line in BEFORE_PYTHON.get(page, []):
        assert line in shell_lines(PAGES[page]), f"{page} no longer shows `{line}`: update BEFORE_PYTHON"
        result = run_line(line)
        assert result.exit_code == 0, f"{line}: exit {result.exit_code}\n{result.output}"
    namespace = {"__name__": "__docs__"}
    for block_page, line, source, why in BLOCKS:
        if block_page == page and not why:
            exec(compile(source, f"{page}:{line}", "exec"), namespace)
    if "feats" in namespace:
        assert namespace["feats"].shape == (2, 32)
    if "groups" in namespace:
        assert isinstance(namespace["groups"], list)
