"""How the default `vggembed dedup --threshold` was chosen: fc2 cosines of near-duplicates vs distinct photos.

Near-duplicates: each real photo (scikit-image's and matplotlib's bundled
ones) re-encoded as JPEG at several qualities, resized, and cropped by a
few percent. Distinct: every pair of different photos (and their variants).
Prints, per weight file, the lowest near-duplicate cosine and the highest
distinct cosine, so a threshold between them separates the two.

    python benchmarks/dedup_threshold.py                     # tiny and full-size random VGG16
    python benchmarks/dedup_threshold.py --weights vgg16_weights.npz   # the real weights

Random weights are not a trained network: their fc2 vectors say how stable
the pipeline is under re-encoding, not how a trained VGG ranks photos.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHOTOS = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
          "retina.jpg", "brick.png", "camera.png"]


def photos() -> list[Path]:
    import matplotlib
    import skimage

    data = Path(skimage.__file__).parent / "data"
    return [data / p for p in PHOTOS] + [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]


def variants(img: Image.Image) -> dict[str, Image.Image]:
    """Near-duplicates a collection really holds: re-encodes, resizes, small crops."""
    out = {}
    for q in (90, 70, 50, 30):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=q)
        out[f"jpeg{q}"] = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    w, h = img.size
    for f in (0.5, 0.25):
        out[f"resize{f}"] = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR)
    for c in (0.03, 0.06):
        dx, dy = round(w * c), round(h * c)
        out[f"crop{c}"] = img.crop((dx, dy, w - dx, h - dy))
    return out


def measure(weights: Path, images: dict[str, list[Image.Image]]) -> None:
    import vggembed
    from vggembed.use.similarity import normalize

    model = vggembed.load(weights)
    names = list(images)
    vecs = {n: normalize(model.embed(images[n], batch_size=16)) for n in names}
    near, kinds = [], {}
    for n in names:
        for v, kind in zip(vecs[n][1:], list(variants(images[n][0]))):
            s = float(v @ vecs[n][0])
            near.append(s)
            kinds.setdefault(kind, []).append(s)
    distinct = [float(a @ b) for i, x in enumerate(names) for y in names[i + 1:]
                for a in vecs[x] for b in vecs[y]]
    print(f"{weights.name}: {len(names)} photos, {len(near)} near-duplicate pairs, {len(distinct)} distinct pairs")
    print(f"  near-duplicates: lowest {min(near):.4f}, 5th percentile {np.percentile(near, 5):.4f}, "
          f"median {np.median(near):.4f}")
    for kind, s in kinds.items():
        print(f"    {kind:10s} lowest {min(s):.4f}")
    print(f"  distinct photos: highest {max(distinct):.4f}, 95th percentile {np.percentile(distinct, 95):.4f}, "
          f"median {np.median(distinct):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, action="append", help="weight files (default: tiny and full random)")
    args = ap.parse_args()
    from vggembed.net import synthetic
    from vggembed.images.decode import load_rgb

    images = {}
    for p in photos():
        img = load_rgb(p)
        images[p.name] = [img] + list(variants(img).values())
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights or [
            synthetic.write_npz(synthetic.make_params("vgg16", (4, 8, 8, 16, 16), 32, 10, seed=1),
                                Path(tmp) / "tiny-vgg16.npz"),
            synthetic.write_npz(synthetic.make_params("vgg16", seed=0), Path(tmp) / "random-vgg16.npz"),
        ]
        for w in weights:
            measure(w, images)


if __name__ == "__main__":
    main()
