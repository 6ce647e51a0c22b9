"""Remote reads against servers that misbehave as servers on the web do, on 127.0.0.1.

Each bad URL must become its own failed row saying why, within the deadline
for one read (plus what a loaded machine adds: bounds here are hang guards,
never timings), and leave every other row as a run without it would write.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from vggembed.errors import ImageError
from vggembed.images import sources

from .conftest import interruptible
from .servers import FileServer, S3Server, self_signed
from .test_sources import embed, index, reference, write_local

HANG_GUARD = 90  # seconds: far above the 3 s deadline these tests set, far below a read left unbounded


@pytest.fixture
def deadline(monkeypatch):
    """A 3 s deadline per read, quick retries, and a per-read timeout far longer than the deadline."""
    monkeypatch.setenv("VGGEMBED_DEADLINE", "3")
    monkeypatch.setenv("VGGEMBED_TIMEOUT", "60")
    monkeypatch.setenv("VGGEMBED_RETRIES", "3")
    monkeypatch.setenv("VGGEMBED_RETRY_DELAY", "0.01")


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_each_misbehaving_server_is_its_rows_failure_in_words_and_holds_nothing(tmp_path, members, tiny16,
                                                                                deadline, monkeypatch):
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", 1 << 20)  # the endless body is refused soon
    files = {f"/{n}": d for n, d in members}
    jpeg, png = members[0], members[1]
    refused = f"http://127.0.0.1:{closed_port()}/{png[0]}"
    with FileServer(files) as other, FileServer(files, away=other.base, retry_after="3600") as srv:
        size = len(png[1])
        bad = {  # URL: what its row must say (a prefix, then parts it must hold)
            srv.url(f"/trickle/{png[0]}"): ("too slow: ", f" of {size} bytes in ", "3 s deadline for one read"),
            srv.url(f"/silent/{png[0]}"): ("timed out: the answer's headers came, then no data for ",
                                           "3 s deadline"),
            srv.url(f"/endless/{png[0]}"): ("more than 1 MiB: larger than an image may be",),
            srv.url(f"/loop/{png[0]}"): (f"too many redirects (10); the last one to {srv.url('/loop/' + png[0])}",),
            srv.url(f"/longer/{png[0]}"): (f"cut short: {size} of {size + 1000} bytes, then the connection closed "
                                           "(gave up after 3 attempts)",),
            srv.url(f"/reset/{png[0]}"): ("connection reset by the server after ",  # what the RST left
                                          f" of {size} bytes (gave up after 3 attempts)"),
            srv.url(f"/throttle/{png[0]}"): ("HTTP 429 Too Many Requests: the server asks to retry in 3600 s, past "
                                             "the 3 s deadline for one read ($VGGEMBED_DEADLINE)",),
            srv.url(f"/status/410/{png[0]}"): ("HTTP 410 Gone",),
            srv.url(f"/status/503/{png[0]}"): ("HTTP 503 Service Unavailable (gave up after 3 attempts)",),
            # half a JPEG, and the rest where the next answer should be: the decoder or the HTTP parser says so
            srv.url(f"/shorter/{jpeg[0]}"): ("",),
            refused: (f"connection refused by 127.0.0.1:{refused.split(':')[2].split('/')[0]} "
                      "(gave up after 3 attempts)",),
            srv.url(f"/{png[0]}").replace("http:", "https:"): (f"TLS error with 127.0.0.1:{srv.base.split(':')[2]}: "
                                                               "wrong version number",),
            f"http://-x/{png[0]}": ("name not resolved: -x",),  # refused by the resolver before any query
        }
        good = [srv.url(f"/{n}") for n, _ in members] + [srv.url(f"/away/{jpeg[0]}")]  # another host: followed
        args = []
        for i, url in enumerate(bad):
            args += [good[i % len(good)], url]
        args += good
        out = tmp_path / "x.npy"
        start = time.monotonic()
        result = embed(out, *args, tiny16=tiny16)
        took = time.monotonic() - start
        sent = dict(srv.sent)
        throttled = srv.requests[f"/throttle/{png[0]}"]
    assert result.exit_code == 3, result.stderr
    assert took < HANG_GUARD
    rows = index(out)
    assert [r[0] for r in rows] == args
    errors = {path: error for path, _, error in rows if error}
    assert set(errors) == set(bad)
    for url, (prefix, *parts) in bad.items():
        assert errors[url].startswith(prefix) and all(p in errors[url] for p in parts), (url, errors[url])
        assert f"vggembed: {url}: {errors[url]}\n" in result.stderr
    assert 0 < len(errors[srv.url(f"/shorter/{jpeg[0]}")]) < 200 and "\\x" not in errors[srv.url(f"/shorter/{jpeg[0]}")]
    assert "Traceback" not in result.stderr and "message=" not in result.stderr and "<" not in "".join(errors.values())
    assert throttled == 1  # not retried: the wait asked for is past the deadline
    assert sent[f"/endless/{png[0]}"] < 16 << 20, sent  # memory and transfer bounded
    local = write_local(tmp_path / "local", members)
    local_of = {**{srv.url(f"/{n}"): p for (n, _), p in zip(members, local)}, srv.url(f"/away/{jpeg[0]}"): local[0]}
    expected = [local_of[a] for a in args if a not in bad]
    assert np.array_equal(np.load(out), reference(tmp_path, expected, tiny16))


def test_an_untrusted_certificate_is_a_tls_error_naming_the_host(tmp_path, members, deadline):
    with FileServer({"/a.png": members[1][1]}, tls=self_signed(tmp_path)) as srv:
        with pytest.raises(ImageError) as e:
            sources.read_bytes(srv.url("/a.png"))
        assert srv.requests == {}  # nothing was sent over it
    assert e.value.problem == "TLS error: the certificate of 127.0.0.1 is not trusted (self-signed certificate)"


def test_retry_after_is_honoured_within_the_deadline(tmp_path, members, deadline):
    with FileServer({"/a.png": members[1][1]}, retry_after="1") as srv:
        assert sources.read_bytes(srv.url("/throttleonce/a.png")) == members[1][1]
        first, second = srv.times["/throttleonce/a.png"]
    assert second - first >= 0.9  # waited as asked, not the 0.01 s backoff


def test_a_body_under_the_minimum_rate_fails_before_the_deadline(members, monkeypatch):
    monkeypatch.setenv("VGGEMBED_DEADLINE", "600")
    monkeypatch.setenv("VGGEMBED_MIN_RATE", "1000")
    monkeypatch.setattr(sources, "RATE_WINDOW", 0.5)
    with FileServer({"/a.png": members[1][1]}, trickle_seconds=0.05) as srv:
        start = time.monotonic()
        with pytest.raises(ImageError) as e:
            sources.read_bytes(srv.url("/trickle/a.png"))
        assert time.monotonic() - start < HANG_GUARD
    assert e.value.problem.startswith("too slow: ")
    assert e.value.problem.endswith("under the minimum of 1000 bytes/s ($VGGEMBED_MIN_RATE)")


def test_settings_that_are_not_numbers_are_one_clear_error(tmp_path, tiny16, monkeypatch):
    monkeypatch.setenv("VGGEMBED_DEADLINE", "soon")
    with FileServer({}) as srv:
        result = embed(tmp_path / "x.npy", srv.url("/a.png"), tiny16=tiny16)
    assert result.exit_code == 1
    assert "$VGGEMBED_DEADLINE='soon': expected a number of at least 0.001" in result.stderr
    assert "Traceback" not in result.stderr


def test_shards_over_http_resume_a_cut_and_give_up_on_a_stall(tmp_path, members, tiny16, deadline, monkeypatch):
    from .test_sources import make_shard

    monkeypatch.setattr(sources, "RATE_WINDOW", 1.0)
    shard = make_shard(tmp_path / "s.tar", members[:2]).read_bytes()
    with FileServer({"/s.tar": shard}) as srv:
        args = [srv.url("/cutonce/s.tar"),  # cut once: read on from where it stopped, with a ranged request
                srv.url("/trickle/s.tar"),  # each read gets a byte in time, but far under the minimum rate
                srv.url("/silent/s.tar")]  # a read that gets nothing: the deadline
        out = tmp_path / "x.npy"
        start = time.monotonic()
        result = embed(out, *args, tiny16=tiny16)
        assert time.monotonic() - start < HANG_GUARD
        ranged = srv.requests["/cutonce/s.tar"]
    assert result.exit_code == 3, result.stderr
    names = [m for m, _ in members[:2]]
    rows = index(out)
    assert [r[0] for r in rows] == [f"{args[0]}/{n}" for n in names] + args[1:]
    assert rows[2][2].startswith("reading the shard failed after 0 images: too slow: ")
    assert "under the minimum of 1024 bytes/s" in rows[2][2]
    assert rows[3][2].startswith("reading the shard failed after 0 images: timed out: the answer's headers came")
    assert ranged == 2
    assert np.array_equal(np.load(out), reference(tmp_path, write_local(tmp_path / "l", members[:2]), tiny16))


def under_nohup():
    interruptible()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


@pytest.mark.parametrize("signum,code,preexec",
                         [(signal.SIGTERM, 143, interruptible), (signal.SIGHUP, 129, interruptible),
                          (signal.SIGINT, 130, interruptible), (signal.SIGHUP, 143, under_nohup)],
                         ids=["SIGTERM", "SIGHUP", "Ctrl-C", "SIGHUP-under-nohup"])
def test_a_signal_stops_a_run_stuck_on_a_trickle_at_once_and_it_resumes(tmp_path, members, tiny16, signum, code,
                                                                         preexec):
    """SIGTERM, SIGHUP and Ctrl-C stop a run waiting on a trickling read at once, and --resume reads it again.
    Under nohup, SIGHUP is left ignored: the run is still reading a second later, and SIGTERM stops it."""
    local = write_local(tmp_path / "local", members)
    with FileServer({"/a.png": members[1][1]}, trickle_seconds=0.5) as srv:
        trickle = srv.url("/trickle/a.png")
        args = [str(p) for p in local * 2] + [trickle, str(local[0])]
        out = tmp_path / "x.npy"
        cmd = [sys.executable, "-m", "vggembed", "embed", *args, "-o", str(out), "--weights", str(tiny16),
               "--batch-size", "1", "--workers", "1", "-q"]
        # only the signal can end it: no deadline, no minimum rate
        env = dict(os.environ, VGGEMBED_DEADLINE="3000", VGGEMBED_TIMEOUT="3000", VGGEMBED_MIN_RATE="0")
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
        try:
            limit = time.monotonic() + 300
            while srv.sent["/trickle/a.png"] < 2:  # the read is under way, a byte at a time
                assert proc.poll() is None and time.monotonic() < limit, "the run never reached the trickle"
                time.sleep(0.1)
            proc.send_signal(signum)
            if preexec is under_nohup:
                sent = srv.sent["/trickle/a.png"]
                while srv.sent["/trickle/a.png"] < sent + 2 and proc.poll() is None and time.monotonic() < limit:
                    time.sleep(0.1)
                assert proc.poll() is None, "SIGHUP stopped a run started under nohup"
                proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()  # the signal that stops it has been sent
            _, stderr = proc.communicate(timeout=HANG_GUARD)
            stopped = time.monotonic() - signalled
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == code, stderr
        assert stopped < 30  # a hang guard: the run does not wait for the read
        said = {130: "interrupted", 129: "stopped by SIGHUP", 143: "stopped by SIGTERM"}[code]
        assert f"vggembed: {said}" in stderr and "--resume" in stderr and "Traceback" not in stderr
        if signum != signal.SIGTERM:
            return
        # the interrupted read is not done: --resume reads it again (now under a short deadline)
        env["VGGEMBED_DEADLINE"] = "2"
        del env["VGGEMBED_MIN_RATE"]
        resumed = subprocess.run(cmd[:-1] + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 3, resumed.stderr
    assert "already done by the interrupted run" in resumed.stderr
    rows = index(out)
    assert [r[0] for r in rows] == args
    assert [r[0] for r in rows if r[2]] == [trickle] and rows[-2][2].startswith("too slow: ")
    ref = tmp_path / "ref.npy"  # the same images as local files, in the same batches
    assert embed(ref, *[p for p in args if p != trickle], "--workers", 1, tiny16=tiny16, batch_size=1).exit_code == 0
    assert np.array_equal(np.load(out), np.load(ref))


def test_local_files_need_no_remote_extra(tmp_path, members, tiny16):
    photo = write_local(tmp_path / "l", members[:1])[0]
    code = ("import sys; sys.modules['fsspec'] = sys.modules['aiohttp'] = None; from vggembed.cli import main; "
            f"main(['embed', {str(photo)!r}, '-o', {str(tmp_path / 'x.npy')!r}, '--weights', {str(tiny16)!r}, '-q'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "x.npy").shape[0] == 1


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


def test_an_s3_image_is_one_get_request(tmp_path, s3, members, tiny16):
    client = s3.client()
    client.create_bucket(Bucket="counted")
    for name, data in members:
        client.put_object(Bucket="counted", Key=name, Body=data)
    listing = tmp_path / "urls.txt"  # a list, as millions of URLs come (an argument is first asked if it is a folder)
    listing.write_text("".join(f"s3://counted/{n}\n" for n in [m for m, _ in members] + ["gone.png"]))
    out = tmp_path / "x.npy"
    with s3.recording(tmp_path) as requests:
        result = embed(out, "--files-from", listing, tiny16=tiny16)
    assert result.exit_code == 3, result.stderr
    assert sorted(requests) == sorted(("GET", f"/counted/{n}") for n in [m for m, _ in members] + ["gone.png"])
    assert index(out)[-1] == ("s3://counted/gone.png", "", "not found")
    assert np.array_equal(np.load(out), reference(tmp_path, write_local(tmp_path / "l", members), tiny16))
