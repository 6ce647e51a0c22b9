"""A hostile world around a run (issue 12): two runs on one output, output places that cannot be written,
closed standard streams, SIGTERM, retries, empty input, short runs, and file names that are not UTF-8."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vggembed.cli import main

from .conftest import HANG, interruptible, wait_for

VGGEMBED = [sys.executable, "-m", "vggembed"]
TEXT = {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}


def run(*args, input=None):
    return CliRunner().invoke(main, [os.fsdecode(a) if isinstance(a, (bytes, Path)) else str(a) for a in args],
                              input=input, catch_exceptions=False)


def cli(*args, timeout=HANG, **kw):
    """The real command in a subprocess; returns CompletedProcess with bytes."""
    return subprocess.run(VGGEMBED + [os.fsdecode(a) if isinstance(a, Path) else a for a in args],
                          capture_output=True, timeout=timeout, **kw)


def index_rows(out: Path) -> list[list[str]]:
    with open(str(out) + ".index.csv", **TEXT) as f:
        return list(csv.reader(f))[1:]


def one_line_error(stderr: bytes, *parts: str) -> None:
    text = stderr.decode("utf-8", "replace")
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, text
    for part in parts:
        assert part in lines[0], text


@pytest.fixture
def small_images(tmp_path):
    """40 small, distinct PNGs (fast to decode)."""
    folder = tmp_path / "small"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")


@pytest.fixture
def mounts():
    made: list[Path] = []
    yield made
    for where in reversed(made):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


# ------------------------------------------------------------ one run per output
def test_a_second_run_on_the_same_output_fails_at_once_naming_the_first(tmp_path, image_dir, tiny16, photos):
    out = tmp_path / "feats.npy"
    first = subprocess.Popen(VGGEMBED + ["embed", "-", "-o", str(out), "--weights", str(tiny16), "--batch-size", "1"],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first.stdin.write(f"{photos[0]}\n".encode())
        first.stdin.flush()
        lock = Path(str(out) + ".lock")
        wait_for(lambda: lock.exists() and lock.read_text().strip(), "the first run's lock")
        assert lock.read_text().strip() == str(first.pid)

        # The first run waits for more input until the test gives it: a second run that waited for the lock
        # would hang (and time out) instead of failing.
        second = cli("embed", image_dir, "-o", out, "--weights", tiny16)
        assert second.returncode == 1
        one_line_error(second.stderr, str(out), f"PID {first.pid}")

        first.stdin.write(f"{photos[1]}\n".encode())
        first.stdin.close()
        assert first.wait(timeout=HANG) == 0, first.stderr.read()
    finally:
        first.kill()
    # The first run's output holds its own images only.
    assert [r[0] for r in index_rows(out)] == [str(photos[0]), str(photos[1])]
    assert np.load(out).shape[0] == 2
    assert not lock.exists(), "a run that ends removes its lock file"


def test_a_killed_run_leaves_no_stale_lock(tmp_path, image_dir, tiny16, photos):
    out = tmp_path / "feats.npy"
    holder = subprocess.Popen(VGGEMBED + ["embed", "-", "-o", str(out), "--weights", str(tiny16)],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    holder.stdin.write(f"{photos[0]}\n".encode())
    holder.stdin.flush()
    wait_for(lambda: Path(str(out) + ".lock").exists() and Path(str(out) + ".lock").read_text().strip(),
             "the run's lock")
    holder.kill()
    holder.wait(timeout=HANG)
    assert Path(str(out) + ".lock").exists()  # the file stays, but no process holds its lock
    again = cli("embed", image_dir, "-o", out, "--weights", tiny16, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert len(index_rows(out)) == 4


HOLD = ("import sys; from vggembed.store.destination import Destination; d = Destination(sys.argv[1]).claim(); "
        "print('held', flush=True); sys.stdin.read()")


@pytest.mark.parametrize("command", ["classify", "maps", "merge", "ray"])
def test_every_writer_takes_the_same_lock(tmp_path, image_dir, tiny16, photos, command):
    out = tmp_path / {"maps": "out.png", "ray": "parts"}.get(command, "out.csv")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        args = {"classify": ["classify", image_dir, "-o", out, "--format", "csv", "--weights", tiny16],
                "maps": ["maps", photos[0], "-o", out, "--weights", tiny16, "--layers", "relu1_1"],
                "merge": ["merge", tmp_path, "-o", out],
                "ray": ["embed", image_dir, "-o", out, "--engine", "ray", "--weights", tiny16]}[command]
        if command == "merge":  # a finished Ray folder is not needed to reach the lock: it comes first
            manifest = {"version": 3, "id": "x", "parts": 0, "inputs": 0, "recipe": {}}
            (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        busy = cli(*args)
        assert busy.returncode == 1
        one_line_error(busy.stderr, str(out), f"PID {holder.pid}")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


# -------------------------------------------------------- places that cannot be written
def test_an_output_under_a_regular_file_is_one_line(tmp_path, image_dir, tiny16):
    (tmp_path / "file.txt").write_text("x")
    result = run("embed", image_dir, "-o", tmp_path / "file.txt" / "out.npy", "--weights", tiny16)
    assert result.exit_code == 1
    one_line_error(result.output.encode(), "out.npy", "file.txt is a file, not a folder")


def test_a_read_only_file_system_is_one_line(tmp_path, image_dir, tiny16, mounts):
    ro = tmp_path / "ro"
    mount_tmpfs(ro, "ro,size=64k")
    mounts.append(ro)
    result = cli("embed", image_dir, "-o", ro / "sub" / "feats.npy", "--weights", tiny16)
    assert result.returncode == 1
    one_line_error(result.stderr, "feats.npy", "read-only file system")


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs setpriv, as root")
def test_a_folder_without_write_permission_is_one_line(tmp_path, image_dir, tiny16):
    # root ignores permissions; without CAP_DAC_OVERRIDE it meets them like any owner
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    for command in (["embed", str(image_dir), "-o", str(locked / "feats.npy")],
                    ["classify", str(image_dir), "-o", str(locked / "preds.csv")]):
        result = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search"] + VGGEMBED + command
                                + ["--weights", str(tiny16)], capture_output=True, timeout=HANG)
        assert result.returncode == 1
        one_line_error(result.stderr, str(locked), "permission denied")
    assert not list(locked.iterdir())


def limit_file_size():
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))  # Python ignores SIGXFSZ: EFBIG


@pytest.mark.parametrize("limit", ["full tmpfs", "RLIMIT_FSIZE"])
def test_a_full_disk_keeps_the_run_resumable(tmp_path, small_images, tiny16, mounts, limit):
    args = ["embed", small_images, "--weights", tiny16, "--layer", "pool5", "--pool", "flatten",
            "--batch-size", "4", "--workers", "1"]
    full_run = tmp_path / "full.npy"
    assert run(*args, "-o", full_run).exit_code == 0  # 40 rows of 784 floats: 125 KB
    disk = tmp_path / "disk"
    if limit == "full tmpfs":
        mount_tmpfs(disk, "size=64k")
        mounts.append(disk)
    out = disk / "feats.npy"
    failed = cli(*args, "-o", out, preexec_fn=limit_file_size if limit == "RLIMIT_FSIZE" else None)
    assert failed.returncode == 1
    if limit == "full tmpfs":
        one_line_error(failed.stderr, str(out), "no space left", "free some space", "--resume")
    else:
        one_line_error(failed.stderr, str(out), "file size limit", "ulimit -f", "--resume")
    assert not out.exists() and Path(str(out) + ".pool5_flatten.partial").exists()
    assert not list(disk.glob("*.tmp")) and not Path(str(out) + ".lock").exists()

    if limit == "full tmpfs":
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)  # space freed
    resumed = run(*args, "-o", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "already done by the interrupted run" in resumed.output
    np.testing.assert_array_equal(np.load(out), np.load(full_run))
    assert index_rows(out) == index_rows(full_run)


def test_a_full_disk_under_classify_output_is_one_line(tmp_path, small_images, tiny16, mounts):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=8k")  # two pages: one for the lock file's PID, then full
    mounts.append(disk)
    (disk / "filler").write_bytes(b"x" * 4096)
    result = cli("classify", small_images, "-o", disk / "preds.csv", "--format", "csv", "--weights", tiny16)
    assert result.returncode == 1
    one_line_error(result.stderr, "preds.csv", "no space left")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


# ------------------------------------------------------------------ standard streams
def closing(*fds):
    return lambda: [os.close(fd) for fd in fds]


def test_stderr_closed_the_run_works_and_the_exit_code_tells(tmp_path, image_dir, tiny16):
    out = tmp_path / "feats.csv"
    (image_dir / "broken.jpg").write_bytes(b"not a jpeg")
    # -v: TensorFlow's start-up log goes to fd 2, which must not be the output file
    done = subprocess.run(VGGEMBED + ["-v", "embed", str(image_dir), "-o", str(out), "--weights", str(tiny16)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=closing(1, 2),
                          timeout=HANG)
    assert done.returncode == 3  # some images failed
    with open(out, **TEXT) as f:
        rows = list(csv.reader(f))
    assert len(rows) == 5 and rows[0][0] == "path"
    assert [r[1:] for r in index_rows(out) if r[0].endswith("broken.jpg")][0][0] == ""  # a failed row


@pytest.mark.parametrize("command", ["classify", "info"])
def test_stdout_closed_a_data_command_fails_with_the_reason(tmp_path, photos, tiny16, command):
    args = {"classify": ["classify", str(photos[0]), "--weights", str(tiny16)], "info": ["info", str(tiny16)]}
    done = subprocess.run(VGGEMBED + args[command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          preexec_fn=closing(1), timeout=HANG)
    assert done.returncode == 1
    one_line_error(done.stderr, "standard output is closed")


def test_stdin_closed_is_an_empty_input(tmp_path, tiny16):
    done = subprocess.run(VGGEMBED + ["embed", "-", "-o", str(tmp_path / "f.npy"), "--weights", str(tiny16)],
                          stdin=subprocess.DEVNULL, capture_output=True, preexec_fn=closing(0), timeout=HANG)
    assert done.returncode == 1
    one_line_error(done.stderr, "no images to process", "stdin")
    assert list(tmp_path.iterdir()) == []


def test_a_reader_that_goes_away_ends_the_run_quietly(tmp_path, small_images, tiny16):
    image = small_images / "000.png"
    proc = subprocess.Popen(VGGEMBED + ["classify", "-", "--batch-size", "1", "--workers", "1", "--weights",
                                        str(tiny16)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(f"{image}\n".encode() * 8)
    proc.stdin.flush()
    first = proc.stdout.readline()  # as `| head -1`
    proc.stdout.close()
    try:  # rows made after the reader left meet a closed pipe
        proc.stdin.write(f"{image}\n".encode() * 40)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    err = proc.stderr.read()
    proc.wait(timeout=HANG)
    assert first.startswith(b"path\trank")
    assert proc.returncode == 141, err
    assert b"Traceback" not in err and b"Exception ignored" not in err and b"BrokenPipe" not in err


# ------------------------------------------------------------------------- SIGTERM
def test_sigterm_keeps_the_staged_output_and_says_how_to_resume(tmp_path, small_images, tiny16):
    paths = [str(p) for p in sorted(small_images.iterdir())] * 2
    (tmp_path / "list.txt").write_text("\n".join(paths) + "\n")
    args = ["embed", "--weights", str(tiny16), "--batch-size", "2", "--workers", "1"]
    full = tmp_path / "full.npy"
    assert run(*args, "--files-from", tmp_path / "list.txt", "-o", full).exit_code == 0

    out = tmp_path / "feats.npy"
    proc = subprocess.Popen(VGGEMBED + args + ["-", "-o", str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=interruptible)
    proc.stdin.write("".join(p + "\n" for p in paths[:30]).encode())
    proc.stdin.flush()
    index = Path(str(out) + ".index.csv.partial")
    wait_for(lambda: index.exists() and index.read_text().count("\n") > 10, "10 rows staged")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG)
    assert proc.returncode == 143, err
    assert b"SIGTERM" in err and b"--resume" in err and b"Traceback" not in err
    assert not out.exists() and not Path(str(out) + ".lock").exists()

    (tmp_path / "rest.txt").write_text("\n".join(paths) + "\n")
    resumed = run(*args, "--files-from", tmp_path / "rest.txt", "-o", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    np.testing.assert_array_equal(np.load(out), np.load(full))


# ---------------------------------------------------------------------- retries, empty
def test_resume_of_a_complete_output_is_a_successful_no_op(tmp_path, image_dir, tiny16):
    out = tmp_path / "feats.npy"
    assert run("embed", image_dir, "-o", out, "--weights", tiny16).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = run("embed", image_dir, "-o", out, "--weights", tiny16, "--resume")
    assert again.exit_code == 0, again.output
    assert "already complete; nothing left to do" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_resume_of_a_complete_output_refuses_other_inputs_or_options(tmp_path, image_dir, tiny16):
    """A complete output is "done" only for the inputs and recipe it holds: a retry after the folder grew, or
    with another layer, must not pass off the old vectors as the new ones."""
    out = tmp_path / "feats.npy"
    assert run("embed", image_dir, "-o", out, "--weights", tiny16).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("feats.npy*")}
    names = sorted(p for p in image_dir.rglob("*") if p.is_file())
    (image_dir / "zzz.png").write_bytes(names[0].read_bytes())  # listed last
    added = run("embed", image_dir, "-o", out, "--weights", tiny16, "--resume")
    assert added.exit_code == 1 and "Traceback" not in added.output
    assert (f"--resume: {out} is complete with {len(names)} inputs, but input {len(names) + 1} is "
            f"'{image_dir / 'zzz.png'}', which it does not hold; pass --overwrite (without --resume) to embed "
            "again" in added.output)
    (image_dir / "zzz.png").unlink()
    fewer = run("embed", *names[1:], "-o", out, "--weights", tiny16, "--resume")
    assert fewer.exit_code == 1 and f"input 1 is '{names[1]}' but {out} (complete) had '{names[0]}'" in fewer.output
    other = run("embed", image_dir, "-o", out, "--weights", tiny16, "--resume", "--layer", "pool5:avg")
    assert other.exit_code == 1
    assert f"--resume: {out} (complete) was made with another recipe (outputs: pool5_avg" in other.output
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("feats.npy*")} == before  # nothing touched


@pytest.mark.parametrize("how", ["folder", "stdin", "list"])
def test_empty_input_is_an_error_and_writes_nothing(tmp_path, tiny16, how):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    (tmp_path / "list.txt").write_text("\n\n")
    args = {"folder": [empty], "stdin": ["-"], "list": ["--files-from", tmp_path / "list.txt"]}[how]
    for command in (["embed", "-o", tmp_path / "out" / "f.npy"], ["classify"]):
        result = run(*command, *args, "--weights", tiny16, input="")
        assert result.exit_code == 1, result.output
        one_line_error(result.output.encode(), "no images to process")
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------- short runs
def test_a_run_shorter_than_a_batch_computes_only_its_images(tmp_path, image_dir, tiny16, photos, monkeypatch):
    from vggembed.net.model import VGG

    shapes = []
    original = VGG.run_outputs

    def counting(self, batch, outputs, pad_to=None):
        shapes.append(max(len(batch), pad_to or 0))
        return original(self, batch, outputs, pad_to)

    monkeypatch.setattr(VGG, "run_outputs", counting)
    one = run("classify", photos[0], "--weights", tiny16, "--format", "csv")
    assert one.exit_code == 0 and shapes == [1]
    alone = run("classify", photos[0], "--weights", tiny16, "--format", "csv", "--batch-size", "1")
    assert alone.stdout == one.stdout  # the same rows as a batch of one

    shapes.clear()
    assert run("embed", "-", "-o", tmp_path / "a.npy", "--weights", tiny16,
               input=f"{photos[0]}\n{photos[1]}\n{photos[2]}\n").exit_code == 0
    assert shapes == [3]  # streamed inputs that end within the first batch: the same rule

    shapes.clear()  # a longer run pads every batch to the batch size, as before
    assert run("embed", image_dir, image_dir, image_dir, "-o", tmp_path / "b.npy", "--weights", tiny16,
               "--batch-size", "5").exit_code == 0
    assert shapes == [5, 5, 5]


# -------------------------------------------------------------- names that are not UTF-8
ODD = b"caf\xe9 \n, x.png"  # Latin-1 e-acute, a newline and a comma
PLAIN = b"na\xefve.png"


@pytest.fixture
def odd_dir(tmp_path, photos):
    folder = tmp_path / "odd"
    folder.mkdir()
    for name, photo in ((ODD, photos[0]), (PLAIN, photos[1]), (b"ok.png", photos[2])):
        shutil.copy(photo, os.path.join(os.fsencode(folder), name))
    return folder


def test_names_that_are_not_utf8_round_trip_through_every_output(tmp_path, odd_dir, tiny16, tiny_model, photos):
    import pyarrow.parquet as pq

    from vggembed.store.writer import table_paths

    truth = {os.path.join(os.fsencode(odd_dir), n): tiny_model.embed([p], "fc2")[0]
             for n, p in ((ODD, photos[0]), (PLAIN, photos[1]), (b"ok.png", photos[2]))}

    for suffix in (".npy", ".csv", ".parquet"):
        out = tmp_path / f"feats{suffix}"
        result = run("embed", odd_dir, "-o", out, "--weights", tiny16)
        assert result.exit_code == 0, result.output
        rows = index_rows(out)
        assert sorted(os.fsencode(r[0]) for r in rows) == sorted(truth)
        if suffix == ".npy":
            vectors = dict(zip([os.fsencode(r[0]) for r in rows], np.load(out)))
        elif suffix == ".csv":
            with open(out, **TEXT) as f:
                body = list(csv.reader(f))[1:]
            vectors = {os.fsencode(r[0]): np.array(r[1:], np.float32) for r in body}
        else:
            table = pq.read_table(out)
            names = [os.fsencode(p) for p in table_paths(table)]
            vectors = dict(zip(names, np.array(table["fc2"].to_pylist(), np.float32)))
            shown = dict(zip(names, table["path"].to_pylist()))
            raw = dict(zip(names, table["path_bytes"].to_pylist()))
            odd = os.path.join(os.fsencode(odd_dir), ODD)
            assert shown[odd].endswith("caf\\xe9 \n, x.png") and raw[odd] == odd
            assert raw[os.path.join(os.fsencode(odd_dir), b"ok.png")] is None
        assert set(vectors) == set(truth)
        for name, vec in vectors.items():
            np.testing.assert_allclose(vec, truth[name], rtol=1e-4, atol=1e-4)  # batch of 3 vs 1: last bits

    # --files-from of the index's path column (one per line: the name without a newline)
    plain = [r[0] for r in index_rows(tmp_path / "feats.npy") if os.fsencode(r[0]).endswith(PLAIN)]
    with open(tmp_path / "list.txt", "w", **TEXT) as f:
        f.write(plain[0] + "\n")
    again = tmp_path / "again.npy"
    assert run("embed", "--files-from", tmp_path / "list.txt", "-o", again, "--weights", tiny16).exit_code == 0
    assert os.fsencode(index_rows(again)[0][0]) == os.fsencode(plain[0])
    np.testing.assert_allclose(np.load(again)[0], truth[os.fsencode(plain[0])], rtol=1e-4, atol=1e-4)


def test_names_that_are_not_utf8_in_classify_outputs_and_messages(tmp_path, odd_dir, tiny16):
    odd = os.path.join(os.fsencode(odd_dir), ODD)
    with open(os.path.join(os.fsencode(odd_dir), b"bad\xff.png"), "wb") as f:
        f.write(b"not a png")

    csv_out = cli("classify", odd_dir, "--format", "csv", "--weights", tiny16)
    assert csv_out.returncode == 3
    assert b"bad\\xff.png" in csv_out.stderr  # the message shows the bytes as \xNN
    rows = list(csv.reader(csv_out.stdout.decode("utf-8", "surrogateescape").splitlines(keepends=True)))
    assert odd in {os.fsencode(r[0]) for r in rows[1:]}  # exact bytes, newline and comma quoted

    for fmt in ("jsonl", "json"):
        out = tmp_path / f"preds.{fmt}"
        assert run("classify", odd_dir, "--format", fmt, "-o", out, "--weights", tiny16).exit_code == 3
        text = out.read_text(encoding="utf-8")  # valid UTF-8 throughout
        docs = json.loads(text) if fmt == "json" else [json.loads(line) for line in text.splitlines()]
        by_bytes = {base64.b64decode(d["path_bytes"]) if "path_bytes" in d else d["path"].encode(): d
                    for d in docs}
        assert odd in by_bytes and by_bytes[odd]["path"].endswith("caf\\xe9 \n, x.png")
        assert by_bytes[os.path.join(os.fsencode(odd_dir), b"ok.png")].keys() == {"path", "predictions"}

    table = run("classify", odd_dir, "--weights", tiny16)
    lines = table.stdout_bytes.decode("utf-8").splitlines()
    assert len(lines) == 1 + 3 * 5  # one line per row: the newline in the name is shown as \n
    assert any("caf\\xe9 \\n, x.png\t1\t" in line for line in lines)


def test_an_output_that_is_a_pipe_is_written_in_place(tmp_path, photos, tiny16):
    """`-o /dev/stdout` or a FIFO: staging beside it and renaming over it would replace the pipe."""
    import stat
    import threading

    fifo = tmp_path / "preds.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = run("classify", photos[0], photos[1], "--format", "csv", "-o", fifo, "--weights", tiny16)
    reader.join(timeout=60)
    if reader.is_alive():  # never opened for writing: let the reader go
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert got and got[0].decode().splitlines()[0] == "path,rank,index,label,probability"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.fifo"]
