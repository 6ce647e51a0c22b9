"""Shared fixtures: tiny VGG-shaped weight files in every layout, and real photos."""

from __future__ import annotations

import os
import signal
import shutil
from pathlib import Path

import numpy as np
import pytest

from vggembed.net import synthetic

TINY_WIDTHS = (4, 8, 8, 16, 16)
TINY_FC = 32
TINY_CLASSES = 10
LABELS = [f"label {i}" for i in range(TINY_CLASSES)]
# Seconds after which a subprocess or a wait is taken to hang. Never a speed target: a loaded 2-core CI box
# may be many times slower than a desk, and a bound that a slow but working run can reach makes a flaky test.
HANG = 600


def _photo_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """Real photos bundled in scikit-image's and matplotlib's wheels."""
    import matplotlib

    data = _photo_dir()
    grace = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return [data / "chelsea.png", data / "coffee.png", data / "astronaut.png", grace]


@pytest.fixture(scope="session")
def tiny_params():
    return {
        "vgg16": synthetic.make_params("vgg16", TINY_WIDTHS, TINY_FC, TINY_CLASSES, seed=1),
        "vgg19": synthetic.make_params("vgg19", TINY_WIDTHS, TINY_FC, TINY_CLASSES, seed=2),
    }


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tiny_params):
    """{(arch, layout): path} for tiny files in every layout."""
    root = tmp_path_factory.mktemp("tiny")
    files = {}
    for arch, params in tiny_params.items():
        folder = root / arch
        folder.mkdir()
        files[arch, "frossard"] = synthetic.write_npz(params, folder / f"{arch}.npz")
        for layout in ("matconvnet", "matconvnet-beta16"):
            files[arch, layout] = synthetic.write_mat(params, folder / f"{arch}-{layout}.mat", layout=layout,
                                                      labels=LABELS)
    return files


@pytest.fixture(scope="session")
def tiny16(tiny) -> Path:
    return tiny["vgg16", "frossard"]


@pytest.fixture(scope="session")
def tiny_model(tiny16):
    import vggembed

    return vggembed.load(tiny16)


@pytest.fixture
def image_dir(tmp_path, photos) -> Path:
    """A folder of real photos, one in a subfolder."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for p in photos[:3]:
        shutil.copy(p, folder / p.name)
    shutil.copy(photos[3], folder / "sub" / photos[3].name)
    return folder


def cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def env_without_tf_noise():
    env = dict(os.environ)
    env.pop("VGGEMBED_VERBOSE", None)
    return env


def interruptible():
    """preexec_fn for a child that Ctrl-C or SIGHUP must reach: a shell starts
    background jobs (a CI step, `pytest &`) with SIGINT ignored, `nohup pytest`
    ignores SIGHUP, and both stay ignored across exec (vggembed keeps an
    ignored SIGHUP ignored, as nohup means), so the child would never see them."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def write_ray_folder(folder, names, errors, vectors, recipe, part_size):
    """An --engine ray output folder as the engine writes it (its RunDir and write_part), without starting
    Ray: a row per name, with its vector (its row of `vectors`) where its error is None."""
    from vggembed.engines.ray import plan_parts
    from vggembed.store.runfolder import RunDir, Store, write_part
    from vggembed.images.sources import Source

    store = Store(str(folder))
    parts = plan_parts([Source(n) for n in names], part_size)
    run = RunDir(store, list(names), len(parts), recipe, part_size, resume=False, overwrite=False)
    for part in parts:
        rows = slice(part.first, part.first + len(part.sources))
        ok = np.array([e is None for e in errors[rows]], dtype=bool)
        write_part(store, run.manifest["id"], part, list(names[rows]), list(errors[rows]), vectors[rows][ok], recipe)
    return folder


@pytest.fixture
def members(tmp_path, photos) -> list[tuple[str, bytes]]:
    """Real photos as encoded files: a JPEG, PNGs, and the original JPEG."""
    import io

    from PIL import Image

    out = []
    for i, p in enumerate(photos):
        if i == 0:
            buf = io.BytesIO()
            Image.open(p).convert("RGB").save(buf, "JPEG", quality=90)
            out.append((f"{i:03d}.jpg", buf.getvalue()))
        else:
            out.append((f"{i:03d}{p.suffix}", p.read_bytes()))
    return out


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children, ...), from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return [p for p in found if _alive(p)]


def part_workers(pid: int) -> list[int]:
    """The Ray engine's model actors (`ray::PartWorker` processes) below `pid` (a raylet, or a driver that
    started its own runtime), and no other process on the machine."""
    found = []
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"ray::PartWorker" in f.read():
                    found.append(p)
        except OSError:
            pass
    return found


def wait_for(predicate, what: str) -> None:
    """Poll `predicate` until it holds (a readiness probe); the bound only guards against a hang, and
    running into it fails the test naming `what` rather than going on as if it had happened."""
    import time

    deadline = time.monotonic() + HANG
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not so after {HANG} s"
        time.sleep(0.02)


def wait_until_gone(pids) -> None:
    """Wait until every process in `pids` has ended."""
    wait_for(lambda: not any(map(_alive, pids)), f"processes {list(pids)} ending")


def wait_held(server, alive) -> None:
    """Wait until a reader asks `server` for a /hold/ path (see servers.FileServer), while `alive()`."""
    def reached():
        assert alive(), "the run ended before it reached the held input"
        return server.held.wait(0.2)

    wait_for(reached, "a reader reaching the held input")
