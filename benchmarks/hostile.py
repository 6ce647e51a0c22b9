"""What the hostile-file defences cost and what they save.

1. Decode time per image, plain Pillow (`Image.open(p).convert("RGB")`)
   beside `vggembed.images.load_rgb` (structure walk, special-file check,
   the second decode that confirms a cut scan), on real photos scaled to
   phone-camera size as baseline JPEG, progressive JPEG and PNG, with and
   without --fast-decode's draft.
2. Peak RSS growth of loading hostile files, each in a fresh interpreter,
   beside what the file declares it would take.

    python benchmarks/hostile.py [--side 3000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def photos(side: int) -> list[Image.Image]:
    import matplotlib
    import skimage

    data = Path(skimage.__file__).parent / "data"
    paths = [data / "chelsea.png", data / "coffee.png", data / "astronaut.png",
             Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    out = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        scale = side / max(img.size)
        out.append(img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC))
    return out


def best_ms(fn, paths, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for p in paths:
            fn(p)
        best = min(best, (time.perf_counter() - start) / len(paths))
    return best * 1000


def bench_decode(tmp: Path, side: int, repeat: int) -> None:
    from vggembed.images.decode import load_rgb

    kinds = {"baseline JPEG": ("jpg", {"quality": 90}), "progressive JPEG": ("jpg", {"quality": 90, "progressive": True}),
             "PNG": ("png", {})}
    print(f"decode, ms per image ({side} px long side, best of {repeat})")
    print(f"{'kind':<18} {'draft':>6} {'Pillow':>8} {'load_rgb':>9} {'extra':>7}")
    for kind, (ext, kw) in kinds.items():
        paths = []
        for i, img in enumerate(photos(side)):
            paths.append(tmp / f"{kind.split()[0]}{i}.{ext}")
            img.save(paths[-1], **kw)
        for draft in (None, (224, 224)):
            def pillow(p):
                img = Image.open(p)
                if draft:
                    img.draft("RGB", draft)
                return img.convert("RGB")

            plain = best_ms(pillow, paths, repeat)
            ours = best_ms(lambda p: load_rgb(p, draft=draft), paths, repeat)
            print(f"{kind:<18} {'224' if draft else '-':>6} {plain:8.1f} {ours:9.1f} {ours / plain - 1:+7.0%}")


def growth(code: str) -> tuple[int, str]:
    """Peak RSS growth (MiB) of running `code` after vggembed's imports, and its last line."""
    script = textwrap.dedent(f"""
        import resource
        from vggembed.images.decode import load_rgb
        from vggembed.net.weights import load_weights
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            {code}
            outcome = "loaded"
        except Exception as e:
            outcome = type(e).__name__
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, outcome)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split()
    return int(out[0]), out[1]


def bench_memory(tmp: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.test_hardening_files import (  # the same hostile files the tests use
        _append_compressed_zeros_variable, _members, with_declared_size, write_npz)
    from vggembed.net import synthetic

    params = {"vgg16": synthetic.make_params("vgg16", (4, 8, 8, 16, 16), 32, 10, seed=1)}
    members = _members(params)
    cases = []

    jpeg = io.BytesIO()
    photos(64)[3].save(jpeg, "JPEG", quality=20)
    liar = tmp / "liar.jpg"
    liar.write_bytes(with_declared_size(jpeg.getvalue(), 9000, 9000))
    cases.append(("JPEG declaring 9000x9000", liar, 9000 * 9000 * 4, f"load_rgb({str(liar)!r})"))

    real = members["conv1_1_W"]
    huge = write_npz(tmp / "huge.npz", members, {"conv1_1_W": ((3, 3, 3, 1 << 34), lambda f: f.write(real.tobytes()),
                                                               False)})
    cases.append(("npz shape (3,3,3,2**34)", huge, 27 * 4 << 34, f"load_weights({str(huge)!r})"))

    fc_in, wide = members["fc6_W"].shape[0], 60000
    bomb_members = dict(members, fc6_b=np.zeros(wide, np.float32), fc7_W=np.zeros((wide, 32), np.float32))
    bomb = write_npz(tmp / "bomb.npz", bomb_members,  # the zeros exist only while they are written
                     {"fc6_W": ((fc_in, wide), lambda f: f.write(bytes(fc_in * wide * 4)), True)})
    cases.append(("npz deflate bomb", bomb, fc_in * wide * 4, f"load_weights({str(bomb)!r})"))

    mat = synthetic.write_mat(params["vgg16"], tmp / "extra.mat", labels=[str(i) for i in range(10)])
    _append_compressed_zeros_variable(mat, b"junk", 400 << 20)
    cases.append((".mat + 400 MB variable", mat, 400 << 20, f"load_weights({str(mat)!r})"))

    print("\nhostile files: peak RSS growth in a fresh interpreter")
    print(f"{'file':<26} {'bytes':>9} {'declares MiB':>13} {'grew MiB':>9}  outcome")
    for name, path, declared, code in cases:
        grown, outcome = growth(code)
        print(f"{name:<26} {path.stat().st_size:>9} {declared >> 20:>13} {grown:>9}  {outcome}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=3000, help="long side of the test photos, pixels")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_decode(Path(tmp), args.side, args.repeat)
        bench_memory(Path(tmp))


if __name__ == "__main__":
    main()
