"""Contact sheets: exact geometry, one tile per result, thumbnails and labels drawn, missing files as grey tiles."""

from __future__ import annotations

import numpy as np
from PIL import Image

from vggembed.use import sheets
from vggembed.use.explore import Assignment, Hit, Member
from vggembed.use.sheets import LABEL_HEIGHT, MISSING, Tile, contact_sheet, sheet_geometry, tile_box

TILE = 64


def box(img, r, c, tile=TILE):
    left, top, right, bottom = tile_box(r, c, tile)
    return np.asarray(img)[top:bottom, left:right]


def label(img, r, c, tile=TILE):
    left, top, right, bottom = tile_box(r, c, tile)
    return np.asarray(img)[bottom: bottom + LABEL_HEIGHT, left:right]


def test_geometry_one_tile_per_result_and_labels(photos):
    hits = [Hit(str(photos[0]), 1, str(photos[1]), 0.9731, 1), Hit(str(photos[0]), 2, str(photos[2]), 0.5, 2),
            Hit(str(photos[3]), 1, str(photos[0]), 0.25, 0)]
    rows = sheets.search_rows(hits)
    assert [[t.caption for t in r] for r in rows] == [["query", "#1  0.9731", "#2  0.5000"], ["query", "#1  0.2500"]]
    img = contact_sheet(rows, TILE)
    assert img.size == sheet_geometry(2, 3, TILE) == (6 + 3 * (TILE + 6), 6 + 2 * (TILE + LABEL_HEIGHT + 6))
    # every result is a picture (not blank, not grey), in its own box, with its label under it
    for r, c, photo in [(0, 0, photos[0]), (0, 1, photos[1]), (0, 2, photos[2]), (1, 0, photos[3]),
                        (1, 1, photos[0])]:
        tile = box(img, r, c)
        assert tile.std() > 10 and not (tile == MISSING).all(axis=2).any(), (r, c)
        assert (label(img, r, c) < 100).any(), "label text drawn"
    # the empty cell of the short row stays white, label and all
    assert (box(img, 1, 2) == 255).all() and (label(img, 1, 2) == 255).all()
    # the thumbnail keeps its aspect: chelsea (451x300) fills the width and is centred vertically
    tile = box(img, 0, 0)
    assert (tile[0] == 255).all() and (tile[TILE // 2] != 255).any()


def test_labels_differ_with_their_text(photos):
    a = contact_sheet([[Tile(str(photos[0]), "#1  0.9000")]], TILE)
    b = contact_sheet([[Tile(str(photos[0]), "#1  0.1000")]], TILE)
    assert np.array_equal(box(a, 0, 0), box(b, 0, 0))
    assert not np.array_equal(label(a, 0, 0), label(b, 0, 0))


def test_missing_and_unreadable_files_are_grey_tiles(tmp_path, photos):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    img = contact_sheet([[Tile(str(tmp_path / "gone.png"), "#1"), Tile(str(bad), "#2"),
                          Tile(str(photos[0]), "#3")]], TILE)
    for c in (0, 1):
        tile = box(img, 0, c)
        assert (tile == MISSING).all(axis=2).mean() > 0.8 and (tile == 255).any(), "grey, with the reason written"
    assert not (box(img, 0, 2) == MISSING).all(axis=2).any()


def test_dedup_and_cluster_rows(tmp_path, photos):
    groups = [[Member(1, str(photos[0]), 1.0, 0), Member(1, str(photos[1]), 0.97, 3)],
              [Member(2, str(photos[2]), 1.0, 5)] + [Member(2, str(photos[3]), 0.96, 6 + i) for i in range(9)]]
    rows = sheets.dedup_rows(groups, max_cols=8)
    assert [len(r) for r in rows] == [2, 8] and rows[0][1].caption == "g1  0.9700"
    out = tmp_path / "groups.png"
    assert sheets.save(rows, out, tile=TILE) == 2
    assert Image.open(out).size == sheet_geometry(2, 8, TILE)

    assignments = [Assignment(str(photos[i % 4]), i % 2, 0.5 - i / 100, i) for i in range(7)]
    rows = sheets.cluster_rows(assignments, per_cluster=3)
    # each cluster's row: nearest to the centre first
    assert [[t.caption for t in r] for r in rows] == [["c0  d=0.440", "c0  d=0.460", "c0  d=0.480"],
                                                      ["c1  d=0.450", "c1  d=0.470", "c1  d=0.490"]]
    assert sheets.save(rows * 100, out, tile=TILE, max_rows=5) == 5
    assert Image.open(out).size == sheet_geometry(5, 3, TILE)


def test_cmyk_and_16bit_thumbnails_are_decoded_as_for_embedding(tmp_path, photos):
    rgb = Image.open(photos[1]).convert("RGB")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    grey16 = (np.asarray(rgb.convert("L"), np.uint16) * 257)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    img = contact_sheet([[Tile(str(tmp_path / "cmyk.jpg"), "a"), Tile(str(tmp_path / "grey16.png"), "b")]], TILE)
    cmyk, grey = box(img, 0, 0).astype(int), box(img, 0, 1).astype(int)
    ref = np.asarray(contact_sheet([[Tile(str(photos[1]), "a")]], TILE))
    left, top, right, bottom = tile_box(0, 0, TILE)
    assert np.abs(cmyk - ref[top:bottom, left:right]).mean() < 12
    assert grey.std() > 20, "16-bit scaled into view, not clipped to white"
