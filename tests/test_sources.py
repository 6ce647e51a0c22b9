"""Where images come from: NUL lists, odd names, deep trees, special files, tar shards, HTTP and S3.

Every kind of input must give the same vectors as the same images given as
local files: same rows, same order, same bytes. Servers are real, on
127.0.0.1, started by the tests.
"""

from __future__ import annotations

import csv
import io
import os
import socket
import subprocess
import sys
import tarfile
import queue
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vggembed.images import decode as images

from vggembed.images import inputs

from vggembed.images import sources
from vggembed.errors import ImageError, display
from vggembed.cli import main

from .conftest import HANG
from .servers import FileServer, S3Server

VGGEMBED = [sys.executable, "-m", "vggembed"]


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def index(out) -> list[tuple[str, str, str]]:
    with open(f"{out}.index.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        return [(r["path"], r["row"], r["error"]) for r in csv.DictReader(f)]


def embed(out, *args, tiny16, input=None, batch_size=2):
    return run("embed", *args, "-o", out, "--weights", tiny16, "--batch-size", batch_size, "-q", input=input)


def reference(tmp_path, files: list[Path], tiny16, name="reference.npy") -> np.ndarray:
    """The same images as local files, in the same order, through the same command."""
    out = tmp_path / name
    result = embed(out, *files, tiny16=tiny16)
    assert result.exit_code == 0, result.stderr
    return np.load(out)


def write_local(folder: Path, files: list[tuple[str, bytes]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


def make_shard(path: Path, files: list[tuple[str, bytes]], mode="w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------- lists
def test_find_print0_pipeline_with_a_newline_in_a_name(tmp_path, members, tiny16):
    folder = tmp_path / "odd"
    names = ["a b.jpg", "new\nline.png", " lead.png"]
    files = write_local(folder, [(n, data) for n, (_, data) in zip(names, members)])
    out = tmp_path / "x.npy"
    cmd = (f"find {folder} -type f -print0 | LC_ALL=C sort -z | {sys.executable} -m vggembed embed -0 - -o {out} "
           f"--weights {tiny16} --batch-size 2 -q")
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = sorted(str(f) for f in files)
    assert [p for p, _, _ in index(out)] == expected
    assert np.array_equal(np.load(out), reference(tmp_path, [Path(p) for p in expected], tiny16))


def test_nul_lists_on_stdin_and_in_files_from_are_taken_exactly(tmp_path):
    stdin = io.BytesIO(b"a b.png\0new\nline.png\0\0 trailing .jpg \0")
    listing = tmp_path / "list0"
    listing.write_bytes(b"x\r.png\0y.png")  # a CR is part of a NUL-separated name
    got = [s.name for s in inputs.expand(["-"], str(listing), stdin=stdin, null=True)]
    assert got == ["a b.png", "new\nline.png", " trailing .jpg ", "x\r.png", "y.png"]


def test_a_nul_in_a_newline_list_asks_for_dash_0(tmp_path, tiny16):
    result = embed(tmp_path / "x.npy", "-", tiny16=tiny16, input=b"a.png\0b.png\0")
    assert result.exit_code == 1
    assert "pass -0" in result.stderr and "Traceback" not in result.stderr


def test_a_bom_is_not_part_of_the_first_path(tmp_path, members, tiny16):
    files = write_local(tmp_path / "imgs", members[:2])
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + b"".join(bytes(f) + b"\r\n" for f in files))  # Notepad's UTF-8
    assert [s.name for s in inputs.expand([], str(listing))] == [str(f) for f in files]
    out = tmp_path / "x.npy"
    assert embed(out, "--files-from", listing, tiny16=tiny16).exit_code == 0
    assert np.array_equal(np.load(out), reference(tmp_path, files, tiny16))
    # on a pipe, the BOM's first byte may arrive alone: the writer sends the rest only once a read has
    # returned that byte by itself (a handshake, so the split is certain rather than likely)
    r, w = os.pipe()
    reads: queue.Queue = queue.Queue()

    class Pipe(io.FileIO):
        def read1(self, n=-1):
            data = self.read(n)
            reads.put(data)
            return data

    def write():
        os.write(w, b"\xef")
        if reads.get(timeout=HANG) == b"\xef":
            os.write(w, b"\xbb\xbf" + bytes(files[0]) + b"\n")
        os.close(w)

    writer = threading.Thread(target=write)
    writer.start()
    with Pipe(r, "rb") as stdin:
        assert [s.name for s in inputs.expand(["-"], stdin=stdin)] == [str(files[0])]
    writer.join()
    assert reads.queue[0] == b"\xbb\xbf" + bytes(files[0]) + b"\n"  # what came after the lone first byte


def test_names_that_are_not_utf8_keep_their_bytes(tmp_path, members):
    folder = tmp_path / "latin1"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/caf\xe9.jpg"  # Latin-1 "café": not valid UTF-8
    with open(raw, "wb") as f:
        f.write(members[0][1])
    listing = tmp_path / "list"
    listing.write_bytes(raw + b"\n")
    from_folder = [s.name for s in inputs.expand([str(folder)])]
    from_stdin = [s.name for s in inputs.expand(["-"], stdin=io.BytesIO(raw + b"\0"), null=True)]
    from_list = [s.name for s in inputs.expand([], str(listing))]
    assert from_folder == from_stdin == from_list == [os.fsdecode(raw)]
    assert os.fsencode(from_folder[0]) == raw
    copy = tmp_path / "cafe.jpg"
    copy.write_bytes(members[0][1])
    assert np.array_equal(images.prepare(from_folder[0]), images.prepare(str(copy)))
    assert display(from_folder[0]).endswith("caf\\xe9.jpg")


# -------------------------------------------------------- folder walking
def make_deep(base: Path, depth: int, leaves: dict[int, bytes]) -> None:
    """`depth` nested folders named "d" below `base`, with `leaves[k]` as k.png at level k.
    Made through directory descriptors: the deepest paths are longer than PATH_MAX."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(1, depth + 1):
            os.mkdir("d", dir_fd=fd)
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
            if level in leaves:
                out = os.open(f"{level}.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
                os.write(out, leaves[level])
                os.close(out)
    finally:
        os.close(fd)


def remove_tree(base: Path) -> None:
    """shutil.rmtree recurses too (RecursionError at this depth): remove level by level."""
    cwd = os.getcwd()
    os.chdir(base)
    names: list[str] = []
    try:
        while True:
            sub = next((e.name for e in os.scandir(".") if e.is_dir(follow_symlinks=False)), None)
            if sub is not None:
                os.chdir(sub)
                names.append(sub)
                continue
            for e in os.scandir("."):
                os.unlink(e.name)
            if not names:
                break
            os.chdir("..")
            os.rmdir(names.pop())
    finally:
        os.chdir(cwd)


def test_a_very_deep_tree_lists_without_recursion_and_beyond_path_max_is_one_failed_row(tmp_path, members, tiny16):
    data = members[1][1]
    ok = tmp_path / "ok"
    ok.mkdir()
    make_deep(ok, 1500, {1: data, 1500: data})  # 3000 bytes of path: openable, far past the recursion limit
    try:
        listed = [s for s in inputs.expand([str(ok)])]
        assert [s.error for s in listed] == [None, None]
        assert listed[0].name == str(ok / "d" / "1.png") and listed[1].name.endswith("/d/1500.png")
        assert np.array_equal(images.prepare(listed[1].name), images.prepare(listed[0].name))
    finally:
        remove_tree(ok)

    deep = tmp_path / "deep"
    deep.mkdir()
    make_deep(deep, 3000, {2: data, 2900: data})  # 6000 bytes: past PATH_MAX (4096)
    try:
        out = tmp_path / "x.npy"
        result = embed(out, deep, tiny16=tiny16)
        assert result.exit_code == 3, result.stderr
        rows = index(out)
        assert rows[0] == (str(deep / "d" / "d" / "2.png"), "0", "")
        assert len(rows) == 2 and rows[1][1] == "" and "PATH_MAX" in rows[1][2]
        assert 4096 <= len(os.fsencode(rows[1][0])) < 4096 + 2  # the first folder past PATH_MAX
    finally:
        remove_tree(deep)


def test_a_link_loop_does_not_trap_the_walk(tmp_path, members):
    folder = tmp_path / "loop"
    write_local(folder, members[:1])
    (folder / "again").symlink_to(".")
    (folder / "self.jpg").symlink_to("self.jpg")
    listed = inputs.expand([str(folder)])
    assert [s.name for s in listed] == [str(folder / "000.jpg"), str(folder / "self.jpg")]
    with pytest.raises(images.ImageError, match="symbolic links"):
        images.prepare(str(folder / "self.jpg"))


def test_fifo_socket_and_device_are_failed_rows_never_a_hang(tmp_path, members, tiny16):
    folder = tmp_path / "special"
    write_local(folder, members[:1])
    os.mkfifo(folder / "pipe.png")
    sock = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(folder)  # a socket's path must fit in 108 bytes
    try:
        sock.bind("sock.png")
    finally:
        os.chdir(cwd)
    fifo = tmp_path / "direct.jpg"
    os.mkfifo(fifo)
    out = tmp_path / "x.npy"
    try:
        proc = subprocess.run(VGGEMBED + ["embed", str(folder), str(fifo), "/dev/zero", "-o", str(out),
                                          "--weights", str(tiny16), "-q"], capture_output=True, text=True,
                              timeout=300)
    finally:
        sock.close()
    assert proc.returncode == 3, proc.stderr
    assert index(out) == [
        (str(folder / "000.jpg"), "0", ""),
        (str(folder / "pipe.png"), "", "is a FIFO (named pipe), not an image file"),
        (str(folder / "sock.png"), "", "is a socket, not an image file"),
        (str(fifo), "", "is a FIFO (named pipe), not an image file"),
        ("/dev/zero", "", "is a character device, not an image file"),
    ]


# ------------------------------------------------------------ tar shards
def test_shard_members_embed_exactly_as_the_same_files(tmp_path, members, tiny16):
    good = members
    layout = [("./" + good[0][0], good[0][1]), ("notes.txt", b"not an image"), ("sub/" + good[1][0], good[1][1]),
              ("._" + good[2][0], b"macOS fork"), ("sub/.hidden/x.png", good[2][1]),
              ("broken.jpg", b"\xff\xd8\xff\xe0 this is not a JPEG"), (good[2][0], good[2][1]),
              (good[3][0], good[3][1])]
    plain = make_shard(tmp_path / "shard.tar", layout)
    gz = make_shard(tmp_path / "shard.tar.gz", layout, "w:gz")
    tgz = make_shard(tmp_path / "other.TGZ", layout[:3], "w:gz")
    out = tmp_path / "x.npy"
    result = embed(out, plain, gz, tgz, tiny16=tiny16)
    assert result.exit_code == 3, result.stderr
    names = ["./000.jpg", "sub/001.png", "broken.jpg", "002.png", "003.jpg"]
    expected = ([(f"{plain}/{n}", n) for n in names] + [(f"{gz}/{n}", n) for n in names]
                + [(f"{tgz}/{n}", n) for n in names[:2]])
    rows = index(out)
    assert [r[0] for r in rows] == [e[0] for e in expected]
    assert [r[0] for r in rows if r[2]] == [f"{plain}/broken.jpg", f"{gz}/broken.jpg"]
    local = write_local(tmp_path / "local", [(f"{i}{Path(n).suffix}", dict(layout)[n]) for i, n in
                                             enumerate(["./000.jpg", "sub/001.png", "002.png", "003.jpg"])])
    ref = reference(tmp_path, local * 2 + local[:2], tiny16)
    assert np.array_equal(np.load(out), ref)


def test_a_truncated_shard_keeps_the_rows_before_the_damage_and_says_so(tmp_path, members, tiny16):
    whole = make_shard(tmp_path / "whole.tar", members).read_bytes()
    sizes = [len(d) for _, d in members]
    inside = 512 + sizes[0] + (-sizes[0] % 512) + 512 + sizes[1] // 2  # in the second member's data
    at_end = sum(512 + size + (-size % 512) for size in sizes)  # all members, no end-of-archive blocks
    (tmp_path / "inside.tar").write_bytes(whole[:inside])
    (tmp_path / "at_end.tar").write_bytes(whole[:at_end])
    bad = bytearray(whole)
    second = 512 + sizes[0] + (-sizes[0] % 512)
    bad[second + 148: second + 156] = b"0000000\0"  # a wrong header checksum
    (tmp_path / "badhdr.tar").write_bytes(bytes(bad))
    after = write_local(tmp_path / "after", members[3:4])[0]
    out = tmp_path / "x.npy"
    result = embed(out, tmp_path / "inside.tar", tmp_path / "at_end.tar", tmp_path / "badhdr.tar", after,
                   tiny16=tiny16)
    assert result.exit_code == 3
    rows = index(out)
    names = [m for m, _ in members]
    assert [r[0] for r in rows] == (
        [f"{tmp_path}/inside.tar/{names[0]}", f"{tmp_path}/inside.tar/{names[1]}"]
        + [f"{tmp_path}/at_end.tar/{n}" for n in names] + [f"{tmp_path}/at_end.tar"]
        + [f"{tmp_path}/badhdr.tar/{names[0]}", f"{tmp_path}/badhdr.tar", str(after)])
    errors = {r[0]: r[2] for r in rows if r[2]}
    assert "ends inside this member" in errors[f"{tmp_path}/inside.tar/{names[1]}"]
    assert errors[f"{tmp_path}/at_end.tar"].startswith("truncated: the data ends after 4 images,")
    assert "bad tar header" in errors[f"{tmp_path}/badhdr.tar"]
    assert len(errors) == 3 and "Traceback" not in result.stderr
    local = write_local(tmp_path / "local", members)
    assert np.array_equal(np.load(out), reference(tmp_path, [local[0]] + local + [local[0], after], tiny16))


def test_a_member_larger_than_an_image_may_be_is_refused_unread(tmp_path, members, monkeypatch):
    import tracemalloc

    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", 4 << 20)
    big = [(members[0][0], members[0][1]), ("big.png", np.random.default_rng(0).bytes(64 << 20)),
           (members[1][0], members[1][1])]
    shard = make_shard(tmp_path / "big.tar", big)
    tracemalloc.start()
    try:
        got = list(sources.iter_shard(str(shard)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(s.name, s.data) for s in got if s.error is None] == [(f"{shard}/{n}", d) for n, d in big[::2]]
    assert [s.name for s in got] == [f"{shard}/{n}" for n, _ in big]
    assert "larger than an image may be (4 MiB)" in got[1].error
    assert peak < 16 << 20  # never the 64 MiB member

    # a header declaring 3 GiB in front of a few bytes: refused, then the shard is truncated
    huge = tarfile.TarInfo("huge.png")
    huge.size = 3 << 30
    cut = tmp_path / "cut.tar"
    cut.write_bytes(huge.tobuf() + b"\x89PNG" * 100)
    got = list(sources.iter_shard(str(cut)))
    assert [s.name for s in got] == [f"{cut}/huge.png", str(cut)]
    assert got[0].error.startswith(f"{3 << 30} bytes: larger") and got[1].error.startswith("truncated: the data")


def test_a_shard_is_streamed_never_extracted(tmp_path, members):
    shard = make_shard(tmp_path / "s.tar", members)
    before = set(tmp_path.rglob("*"))
    got = list(sources.iter_shard(str(shard)))
    assert [(s.name, s.data) for s in got] == [(f"{shard}/{m}", d) for m, d in members]
    assert set(tmp_path.rglob("*")) == before


# ------------------------------------------------------------------- HTTP
@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setenv("VGGEMBED_RETRY_DELAY", "0.01")
    monkeypatch.setenv("VGGEMBED_RETRIES", "3")


def test_urls_embed_exactly_as_local_files_and_bad_ones_are_failed_rows(tmp_path, members, tiny16, fast_retries):
    files = {f"/img/{n}": d for n, d in members}
    files["/shard.tar"] = make_shard(tmp_path / "s.tar", members[:2]).read_bytes()
    with FileServer(files, slow_seconds=0.5) as srv:
        args = [srv.url("/slow/img/" + members[0][0]),  # answered last, must stay first
                srv.url("/fail500/img/" + members[1][0]),
                srv.url("/missing.png"), srv.url("/denied/img/" + members[0][0]),
                srv.url("/cutonce/img/" + members[2][0]),
                srv.url("/cut/img/" + members[2][0]),
                srv.url("/busy/img/" + members[3][0]),
                srv.url("/shard.tar"), "-"]
        listed = srv.url("/img/" + members[3][0])
        out = tmp_path / "x.npy"
        result = embed(out, *args, tiny16=tiny16, input=listed.encode() + b"\n")
        assert result.exit_code == 3, result.stderr
        assert srv.requests["/fail500/img/" + members[1][0]] == 2
        assert srv.requests["/busy/img/" + members[3][0]] == 3
        assert srv.requests["/cut/img/" + members[2][0]] == 3  # VGGEMBED_RETRIES
    rows = index(out)
    assert [r[0] for r in rows] == args[:-2] + [f"{srv.url('/shard.tar')}/{n}" for n, _ in members[:2]] + [listed]
    errors = {r[0]: r[2] for r in rows if r[2]}
    assert errors == {
        srv.url("/missing.png"): "not found",
        srv.url("/denied/img/" + members[0][0]): "access denied (HTTP 403)",
        srv.url("/cut/img/" + members[2][0]): errors[srv.url("/cut/img/" + members[2][0])]}
    cut = len(members[2][1])
    assert errors[srv.url("/cut/img/" + members[2][0])] == (
        f"cut short: {cut // 2} of {cut} bytes, then the connection closed (gave up after 3 attempts)")
    local = write_local(tmp_path / "local", members)
    expected = [local[0], local[1], local[2], local[3], local[0], local[1], local[3]]
    assert np.array_equal(np.load(out), reference(tmp_path, expected, tiny16))


def test_an_http_folder_is_listed_and_sorted_as_the_same_local_folder(tmp_path, members):
    import functools
    import http.server

    folder = tmp_path / "web"
    write_local(folder, [("b/" + members[0][0], members[0][1]), ("a-" + members[1][0], members[1][1]),
                         (members[2][0], members[2][1]), (".hidden/x.png", members[3][1]), ("notes.txt", b"x")])
    class Quiet(http.server.SimpleHTTPRequestHandler):  # Python's own server, with its folder pages
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        remote = [s.name for s in inputs.expand([base])]
    finally:
        server.shutdown()
        server.server_close()
    local = [s.name for s in inputs.expand([str(folder)])]
    assert len(local) == 3 and remote == [n.replace(str(folder) + "/", base) for n in local]


def test_a_password_in_a_url_is_never_written_anywhere(tmp_path, members, tiny16):
    with FileServer({"/a.png": members[1][1]}) as srv:
        url = srv.url("/a.png").replace("http://", "http://ann:s3cr3t@")
        out = tmp_path / "x.npy"
        result = embed(out, url, tiny16=tiny16)
        assert srv.requests == {}  # nothing was sent with it either
    assert result.exit_code == 3
    assert index(out)[0][0] == srv.url("/a.png").replace("http://", "http://ann:***@")
    assert "password" in index(out)[0][2]
    written = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert b"s3cr3t" not in written and "s3cr3t" not in result.stderr + result.stdout


def test_without_the_remote_extra_a_url_names_the_install_command(tmp_path, tiny16):
    code = ("import sys; sys.modules['fsspec'] = None; from vggembed.cli import main; "
            f"main(['embed', 'https://example.invalid/a.jpg', '-o', {str(tmp_path / 'x.npy')!r}, "
            f"'--weights', {str(tiny16)!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert 'pip install "vggembed[remote]"' in proc.stderr and "Traceback" not in proc.stderr


def test_an_input_larger_than_an_image_may_be_is_a_failed_row_and_read_no_further(tmp_path, members, tiny16,
                                                                                 monkeypatch):
    cap = 1 << 20
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", cap)
    big = np.random.default_rng(0).bytes(32 << 20)
    local_big = tmp_path / "big.jpg"
    with open(local_big, "wb") as f:
        f.truncate(64 << 20)  # sparse: no disk spent
    files = {"/big.jpg": big, **{f"/{n}": d for n, d in members[:2]}}
    with FileServer(files) as srv:
        args = [srv.url("/" + members[0][0]),
                srv.url("/big.jpg"),  # refused at its Content-Length
                local_big,  # refused at its size, before it is mapped
                srv.url("/chunked/big.jpg"),  # no Content-Length: refused once past the limit
                srv.url("/chunked/" + members[1][0])]
        out = tmp_path / "x.npy"
        result = run("embed", *args, "-o", out, "--weights", tiny16, "--batch-size", 2)
        assert result.exit_code == 3, result.stderr
        sent = dict(srv.sent)
    too_big = {srv.url("/big.jpg"): f"{32 << 20} bytes: larger than an image may be (1 MiB)",
               str(local_big): f"{64 << 20} bytes: larger than an image may be (1 MiB)",
               srv.url("/chunked/big.jpg"): "more than 1 MiB: larger than an image may be"}
    assert index(out) == [(str(a), "", too_big[str(a)]) if str(a) in too_big else (str(a), row, "")
                          for a, row in zip(args, ["0", None, None, None, "1"])]
    for name, problem in too_big.items():
        assert f"{name}: {problem}\n" in result.stderr
    assert "Traceback" not in result.stderr
    # the client hangs up: what the server got to send is the limit and what the sockets buffer, not 32 MiB
    assert sent["/big.jpg"] < 16 << 20 and sent["/chunked/big.jpg"] < 16 << 20, sent
    local = write_local(tmp_path / "local", members[:2])
    assert np.array_equal(np.load(out), reference(tmp_path, local, tiny16))


def test_a_local_file_over_1_gib_is_refused_by_its_size_unread(tmp_path):
    path = tmp_path / "huge.jpg"
    with open(path, "wb") as f:
        f.truncate((1 << 30) + 1)  # sparse
    with pytest.raises(ImageError) as e:
        images.load_rgb(str(path))
    assert str(e.value) == f"{path}: {(1 << 30) + 1} bytes: larger than an image may be (1024 MiB)"


# --------------------------------------------------------------------- S3
@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


def test_an_s3_bucket_of_images_and_shards(tmp_path, s3, members, tiny16, fast_retries):
    client = s3.client()
    client.create_bucket(Bucket="photos")
    tree = [("imgs/" + members[2][0], members[2][1]), ("imgs/sub/" + members[0][0], members[0][1]),
            ("imgs/a-" + members[1][0], members[1][1]), ("imgs/.hidden/x.png", members[3][1]),
            ("imgs/notes.txt", b"text")]
    for key, data in tree:
        client.put_object(Bucket="photos", Key=key, Body=data)
    shard = make_shard(tmp_path / "000.tar", members[:2]).read_bytes()
    client.put_object(Bucket="photos", Key="shards/000.tar", Body=shard)
    out = tmp_path / "x.npy"
    result = embed(out, "s3://photos/imgs", "s3://photos/shards/000.tar", "s3://photos/imgs/gone.png",
                   "s3://no-such-bucket/imgs/", tiny16=tiny16)
    assert result.exit_code == 3, result.stderr
    local_root = tmp_path / "local"
    write_local(local_root, tree)
    local = [s.name for s in inputs.expand([str(local_root / "imgs")])]
    rows = index(out)
    assert [r[0] for r in rows] == (
        [n.replace(str(local_root), "s3://photos") for n in local]
        + [f"s3://photos/shards/000.tar/{m}" for m, _ in members[:2]]
        + ["s3://photos/imgs/gone.png", "s3://no-such-bucket/imgs/"])
    assert rows[-2][2] == "not found" and rows[-1][2].startswith("cannot list this folder")
    ref = reference(tmp_path, [Path(p) for p in local] + write_local(tmp_path / "m", members[:2]), tiny16)
    assert np.array_equal(np.load(out), ref)


def test_an_s3_object_larger_than_an_image_may_be_is_refused_by_its_size(tmp_path, s3, members, tiny16,
                                                                        monkeypatch):
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", 1 << 20)
    client = s3.client()
    client.create_bucket(Bucket="large")
    client.put_object(Bucket="large", Key="big.jpg", Body=bytes(4 << 20))
    for name, data in members[:2]:
        client.put_object(Bucket="large", Key=name, Body=data)
    out = tmp_path / "x.npy"
    result = embed(out, f"s3://large/{members[0][0]}", "s3://large/big.jpg", f"s3://large/{members[1][0]}",
                   tiny16=tiny16)
    assert result.exit_code == 3, result.stderr
    assert index(out) == [(f"s3://large/{members[0][0]}", "0", ""),
                          ("s3://large/big.jpg", "", f"{4 << 20} bytes: larger than an image may be (1 MiB)"),
                          (f"s3://large/{members[1][0]}", "1", "")]
    assert np.array_equal(np.load(out), reference(tmp_path, write_local(tmp_path / "l", members[:2]), tiny16))


# ------------------------------------------------------------------ resume
def test_resume_across_shards_urls_and_a_nul_list(tmp_path, members, tiny16, monkeypatch):
    shard = make_shard(tmp_path / "s.tgz", members, "w:gz")
    local = write_local(tmp_path / "local", members)
    listing = tmp_path / "list0"
    listing.write_bytes(b"\0".join(bytes(p) for p in local[::-1]))
    with FileServer({f"/{n}": d for n, d in members}) as srv:
        args = [shard, srv.url("/" + members[1][0]), "--files-from", listing, "-0", "--batch-size", "1",
                "--weights", tiny16, "--workers", "1", "-q"]
        full = tmp_path / "full.npy"
        assert run("embed", *args, "-o", full).exit_code == 0
        cut = tmp_path / "cut.npy"
        real = images.load_rgb
        calls = []

        def interrupted(source, **kw):  # Ctrl-C part way, after some rows are on disk
            calls.append(source)
            if len(calls) == 6:
                raise KeyboardInterrupt
            return real(source, **kw)

        monkeypatch.setattr(images, "load_rgb", interrupted)
        assert run("embed", *args, "-o", cut).exit_code == 130
        monkeypatch.setattr(images, "load_rgb", real)
        resumed = run("embed", *args[:-1], "-o", cut, "--resume")
        assert resumed.exit_code == 0, resumed.stderr
        assert "already done by the interrupted run" in resumed.stderr
    assert index(cut) == index(full)
    assert np.array_equal(np.load(cut), np.load(full))
    assert [r[0] for r in index(full)][4:6] == [srv.url("/" + members[1][0]), str(local[-1])]
