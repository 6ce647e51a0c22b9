"""`vggembed weights fetch` against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from vggembed.net import registry
from vggembed.cli import main
from vggembed.net.download import fetch
from vggembed.errors import DownloadError


class Server:
    """Serves `files` with HTTP Range support; `cut[name] = n` drops the connection after n bytes once."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data):
                    self.send_response(416)
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(data) - start))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                body = data[start:]
                if name in server.cut:
                    body = body[: server.cut.pop(name)]
                self.wfile.write(body)
                self.wfile.flush()
                if len(body) < len(data) - start:
                    self.connection.close()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def published(monkeypatch, tiny):
    """Point the vgg19 entry at a synthetic file whose MD5 is the published one."""
    data = tiny["vgg19", "matconvnet"].read_bytes()
    entry = registry.Published("vgg19", "imagenet-vgg-verydeep-19.mat", "http://unused.invalid/x.mat", "vgg19",
                               md5s=(hashlib.md5(data).hexdigest(),), size=len(data))
    monkeypatch.setitem(registry.PUBLISHED, "vgg19", entry)
    return entry, data


def test_fetch_whole_file_then_use_it(tmp_path, server, published, monkeypatch, photos):
    entry, data = published
    server.files[entry.filename] = data
    monkeypatch.setenv("VGGEMBED_HOME", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["weights", "fetch", "vgg19", "--mirror", server.url])
    assert result.exit_code == 0, result.output
    target = tmp_path / "cache" / entry.filename
    assert result.stdout.strip() == str(target)
    assert target.read_bytes() == data
    assert not list((tmp_path / "cache").glob("*.download"))
    # commands now find it in the cache without --weights
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VGGEMBED_WEIGHTS", raising=False)
    classify = CliRunner().invoke(main, ["classify", str(photos[0]), "--model", "vgg19"])
    assert classify.exit_code == 0 and classify.stdout.startswith("1. label ")


def test_cut_transfer_resumes_with_range(tmp_path, server, published):
    entry, data = published
    server.files[entry.filename] = data
    server.cut[entry.filename] = len(data) // 3
    with pytest.raises(DownloadError, match="cut short .* run the same command again to resume"):
        fetch("vgg19", dest=tmp_path, mirror=server.url, progress=False)
    part = tmp_path / (entry.filename + ".download")
    assert part.stat().st_size == len(data) // 3
    assert not (tmp_path / entry.filename).exists()
    fetch("vgg19", dest=tmp_path, mirror=server.url, progress=False)
    assert (tmp_path / entry.filename).read_bytes() == data
    assert server.requests[-1] == (entry.filename, f"bytes={len(data) // 3}-")


def test_checksum_mismatch_is_refused_and_removed(tmp_path, server, monkeypatch):
    entry = registry.Published("vgg19", "imagenet-vgg-verydeep-19.mat", "http://unused.invalid/x.mat", "vgg19",
                               md5s=("106118b7cf60435e6d8e04f6a6dc3657",))
    monkeypatch.setitem(registry.PUBLISHED, "vgg19", entry)
    server.files[entry.filename] = b"not the real weights" * 100
    result = CliRunner().invoke(main, ["weights", "fetch", "vgg19", "--mirror", server.url, "--dest", str(tmp_path)])
    assert result.exit_code == 1
    assert "does not match the published 106118b7cf60435e6d8e04f6a6dc3657" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_companion_label_file_comes_with_frossard_weights(tmp_path, server, tiny16):
    server.files["vgg16_weights.npz"] = tiny16.read_bytes()
    server.files["imagenet_classes.py"] = ("class_names = '''" + "\n".join(f"n{i}" for i in range(10)) +
                                           "'''.split('\\n')\n").encode()
    path = fetch("vgg16", dest=tmp_path, mirror=server.url, progress=False)
    import vggembed

    m = vggembed.load(path)
    assert m.spec.labels == [f"n{i}" for i in range(10)]


def test_http_error_and_unknown_name(tmp_path, server):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch("vgg16-mat", dest=tmp_path, mirror=server.url, progress=False)
    result = CliRunner().invoke(main, ["weights", "fetch", "vgg99"])
    assert result.exit_code == 1 and "unknown weights 'vgg99'; known: vgg16, vgg19" in result.stderr


def test_published_md5_is_recognised(tmp_path, monkeypatch, tiny16):
    from vggembed.net.weights import load_weights

    _, spec = load_weights(tiny16)
    assert spec.known is None
    monkeypatch.setitem(registry.PUBLISHED, "vgg16", registry.Published(
        "vgg16", "vgg16_weights.npz", "http://unused.invalid", "vgg16", md5s=(spec.md5,)))
    assert spec.known == "vgg16"


def test_a_destination_that_cannot_be_written_is_one_line_and_two_fetches_do_not_mix(tmp_path, server):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(main, ["weights", "fetch", "vgg19", "--mirror", server.url,
                                       "--dest", str(blocker / "sub")])
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {blocker / 'sub' / 'imagenet-vgg-verydeep-19.mat'}: cannot write "
                                     f"here: {blocker} is a file, not a folder")
    # A fetch of the same file already under way holds it: the second says so instead of writing beside it.
    from vggembed.store.destination import Destination

    with Destination(tmp_path / "imagenet-vgg-verydeep-19.mat"):
        busy = CliRunner().invoke(main, ["weights", "fetch", "vgg19", "--mirror", server.url, "--dest", str(tmp_path)])
    assert busy.exit_code == 1 and "another vggembed run" in busy.output
    assert not (tmp_path / "imagenet-vgg-verydeep-19.mat").exists()
