"""How good a head is, from predicted probabilities: the figures, the short table, the confusion matrix as CSV
and as a picture.

Every figure is computed from `(proba, given)` alone (out-of-fold probabilities, or those of a validation
set), so anyone can recompute them from the stored probabilities (`HEAD.oof.npz`).
"""

from __future__ import annotations

import csv
import io

import numpy as np

from ..errors import display


def shown(name: str) -> str:
    """A class name as the table and the picture show it: one line, bytes that are not UTF-8 as \\xNN."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in display(name))


def metrics(proba: np.ndarray, given: np.ndarray, classes: list[str]) -> dict:
    """Top-1, top-5 (5 classes or more), balanced accuracy, log-loss, per-class precision / recall / F1 /
    support, and the confusion matrix (rows: given class, columns: predicted), of probabilities `proba`
    (N, K) for rows whose true class index is `given`."""
    n, k = proba.shape
    given = np.asarray(given, np.int64)
    predicted = np.argmax(proba, axis=1)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (given, predicted), 1)
    support = confusion.sum(axis=1)
    predicted_count = confusion.sum(axis=0)
    hits = np.diag(confusion)
    per_class = []
    for c in range(k):
        precision = hits[c] / predicted_count[c] if predicted_count[c] else 0.0
        recall = hits[c] / support[c] if support[c] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"class": classes[c], "precision": float(precision), "recall": float(recall),
                          "f1": float(f1), "support": int(support[c])})
    present = support > 0
    p_given = proba[np.arange(n), given].astype(np.float64)
    out = {
        "rows": int(n),
        "top1": float(np.mean(predicted == given)) if n else 0.0,
        "balanced_accuracy": float(np.mean(hits[present] / support[present])) if present.any() else 0.0,
        "log_loss": float(-np.mean(np.log(np.clip(p_given, 1e-15, 1.0)))) if n else 0.0,
    }
    if k >= 5:
        # the given class among the 5 most probable (ties: the higher class index first, as VGG.top_k)
        top5 = np.argsort(proba, axis=1, kind="stable")[:, ::-1][:, :5]
        out["top5"] = float(np.mean((top5 == given[:, None]).any(axis=1))) if n else 0.0
    out["per_class"] = per_class
    out["confusion"] = confusion.tolist()
    return out


def table(m: dict, title: str) -> str:
    """The short report `vggembed train` prints: the headline figures, then one line per class (the worst
    F1 first, at most 20)."""
    lines = [title]
    head = f"  top-1 {m['top1']:.4f}"
    if "top5" in m:
        head += f"   top-5 {m['top5']:.4f}"
    head += f"   balanced accuracy {m['balanced_accuracy']:.4f}   log-loss {m['log_loss']:.4f}   ({m['rows']} images)"
    lines.append(head)
    rows = sorted(m["per_class"], key=lambda r: (r["f1"], r["class"]))
    first = rows[:20]
    width = min(30, max(len("class"), *(len(shown(r["class"])) for r in first)))
    lines.append(f"  {'class':<{width}}  precision  recall     f1  support")
    for r in first:
        name = shown(r["class"])
        name = name if len(name) <= width else name[: width - 1] + "~"
        lines.append(f"  {name:<{width}}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:5.4f}  {r['support']:7d}")
    if len(rows) > len(first):
        lines.append(f"  ... {len(rows) - len(first)} more classes (all in the metrics file)")
    return "\n".join(lines)


def confusion_csv(m: dict, classes: list[str]) -> str:
    """The confusion matrix as CSV: a header `given \\ predicted` then the class names; a row per given class."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["given \\ predicted", *classes])
    for name, row in zip(classes, m["confusion"]):
        w.writerow([name, *row])
    return out.getvalue()


def confusion_picture(m: dict, classes: list[str], title: str = ""):
    """The confusion matrix as a PIL image a person can read at 2 and at 100 classes: each row scaled by its
    class's count (dark: most of the class went there), counts written in the cells while they fit, class
    names on both axes."""
    from PIL import Image, ImageDraw, ImageFont

    k = len(classes)
    counts = np.asarray(m["confusion"], np.float64).reshape(k, k)
    cell = max(12, min(64, 1200 // max(k, 1)))
    font_size = max(9, min(16, cell // 3 + 4))
    font = _font(ImageFont, font_size)
    small = _font(ImageFont, max(9, min(14, int(cell * 0.45))))
    label_chars = 28
    names = [shown(c) for c in classes]
    names = [c if len(c) <= label_chars else c[: label_chars - 1] + "~" for c in names]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((probe.textlength(n, font=font) for n in names), default=0)
    margin = int(text_w) + 16
    top = margin + font_size * 3
    title = shown(title or "confusion matrix (rows: given class, columns: predicted)")
    size = (max(margin + k * cell + 20, int(probe.textlength(title, font=font)) + 16), top + k * cell + 20)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), title, fill="black", font=font)
    draw.text((margin, 6 + font_size + 4), "predicted ->", fill="dimgray", font=font)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    for i in range(k):
        y = top + i * cell
        draw.text((margin - 8 - probe.textlength(names[i], font=font), y + (cell - font_size) // 2), names[i],
                  fill="black", font=font)
        for j in range(k):
            x = margin + j * cell
            v = share[i, j]
            shade = int(round(255 * (1 - v)))
            colour = (shade, shade, 255) if i == j else (255, shade, shade)
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour, outline=(225, 225, 225))
            if counts[i, j] and cell >= 24:
                text = str(int(counts[i, j]))
                if probe.textlength(text, font=small) <= cell - 2:
                    draw.text((x + (cell - probe.textlength(text, font=small)) / 2, y + (cell - small.size) / 2),
                              text, fill="white" if v > 0.55 else "black", font=small)
    # column names, written vertically above the grid
    for j in range(k):
        label = Image.new("RGB", (int(probe.textlength(names[j], font=font)) + 4, font_size + 6), "white")
        ImageDraw.Draw(label).text((2, 1), names[j], fill="black", font=font)
        label = label.rotate(90, expand=True)
        x = margin + j * cell + (cell - label.width) // 2
        img.paste(label.crop((0, max(0, label.height - (top - 4)), label.width, label.height)),
                  (x, max(2, top - 4 - label.height)))
    return img


def _font(ImageFont, size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()
