"""Embedded benchmark A (synthetic scene-graph CIR): determinism, pixels vs scene graphs, subsets, splits,
held-out combinations, texts, edit pairs, loader round trip, atomic writing and the CLI."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirfusion.data import load_dataset
from cirfusion.data import synthetic as S
from cirfusion.data.schema import DataError, Query
from cirfusion.data.synthetic import language, rendering

N_IMAGES = 240


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "bench"
    S.generate(root, seed=7, n_images=N_IMAGES, workers=1)
    return root


def _objects(rec: dict) -> Counter:
    return Counter((o["cell"][0], o["cell"][1], o["shape"], o["colour"], o["size"]) for o in rec["render"]["objects"])


def _one_detail(a: Counter, b: Counter) -> str | None:
    """The single detail scene ``b`` differs from ``a`` in, or None if they differ in zero or several."""
    only_a, only_b = a - b, b - a
    n_a, n_b = sum(only_a.values()), sum(only_b.values())
    if (n_a, n_b) in ((1, 0), (0, 1)):
        return "presence"
    if (n_a, n_b) != (1, 1):
        return None
    (x,), (y,) = list(only_a), list(only_b)
    diff = [name for name, i in (("colour", 3), ("shape", 2), ("size", 4)) if x[i] != y[i]]
    moved = x[:2] != y[:2]
    if moved and not diff:
        return "position"
    if len(diff) == 1 and not moved:
        return diff[0]
    return None


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------------


def test_deterministic_byte_for_byte_whatever_the_workers(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    S.generate(a, seed=3, n_images=N_IMAGES, workers=1)
    S.generate(b, seed=3, n_images=N_IMAGES, workers=2)  # >= 200 images: rendered by subprocess workers
    S.generate(c, seed=4, n_images=N_IMAGES, workers=1)
    fa, fb, fc = _all_files(a), _all_files(b), _all_files(c)
    assert len(fa) == N_IMAGES + 1 + 4 * 3  # images, manifest, 4 files per split
    assert fa == fb
    assert fa.keys() == fc.keys() and fa != fc
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_manifest_and_counts(bench: Path) -> None:
    m = json.loads((bench / "manifest.json").read_text())
    assert m["format"] == "cirfusion-synthetic" and m["complete"] is True and m["seed"] == 7
    assert m["generator_version"] == S.GENERATOR_VERSION
    assert len(m["vocab"]["shapes"]) >= 5 and len(m["vocab"]["colours"]) >= 8 and len(m["vocab"]["sizes"]) >= 2
    assert sum(s["images"] for s in m["splits"].values()) == N_IMAGES
    assert len(m["held_out_combos"]) == 6
    for split, s in m["splits"].items():
        assert len(json.loads((bench / f"gallery.{split}.json").read_text())) == s["images"]
        assert len((bench / f"queries.{split}.jsonl").read_text().splitlines()) == s["queries"] > 0
        assert len((bench / f"edit_pairs.{split}.jsonl").read_text().splitlines()) == s["edit_pairs"] > 0
        assert len(list((bench / "images" / split).glob("*.png"))) == s["images"]


def test_pixels_match_scene_graphs(bench: Path) -> None:
    for split in S.SPLITS:
        graphs = S.load_scene_graphs(bench, split)
        for iid, rec in S.load_scene_records(bench, split).items():
            im = np.asarray(Image.open(bench / rec["path"]))
            spec = rec["render"]
            size = spec["size"]
            assert im.shape == (size, size, 3)
            cell = size / S.GRID
            occupied = set()
            assert 1 <= len(spec["objects"]) <= 5
            for o in spec["objects"]:
                r, c = o["cell"]
                occupied.add((r, c))
                cx, cy = o["center"]
                # The object is where its cell says, whole shape inside the cell (objects never touch) ...
                ext = S.shape_extent(o["shape"]) * o["radius"]
                x, y = cx + 0.5, cy + 0.5  # "center" is a pixel index; the shape is drawn around its middle
                assert c * cell <= x - ext and x + ext <= (c + 1) * cell, (iid, o)
                assert r * cell <= y - ext and y + ext <= (r + 1) * cell, (iid, o)
                # ... painted in its colour at its centre ...
                assert tuple(im[cy, cx]) == S.COLOURS[o["colour"]], (iid, o)
                # ... and its size is visible: pure-colour pixel count in its cell (small <= 261, large >= 380).
                box = im[int(r * cell) : int((r + 1) * cell), int(c * cell) : int((c + 1) * cell)]
                area = int((box == np.array(S.COLOURS[o["colour"]])).all(-1).sum())
                assert (area > 320) == (o["size"] == "large"), (iid, o, area)
            bg = np.array(spec["background"], dtype=int)
            for r in range(S.GRID):
                for c in range(S.GRID):
                    if (r, c) not in occupied:
                        px = im[int((r + 0.5) * cell), int((c + 0.5) * cell)].astype(int)
                        assert np.abs(px - bg).max() <= spec["gradient"][1] + 1, (iid, r, c, px, bg)
            # The stored scene graph is the graph of the rendered objects.
            objs = [S.Obj(o["shape"], o["colour"], o["size"], *o["cell"]) for o in spec["objects"]]
            assert graphs[iid] == S.scene_graph_of(objs)


def test_scene_graph_entities_and_relations() -> None:
    objs = [S.Obj("circle", "red", "small", 0, 0), S.Obj("star", "blue", "large", 2, 1)]
    sg = S.scene_graph_of(objs)
    assert [e.attributes for e in sg.entities] == [("red", "small", "circle", "top-left"), ("blue", "large", "star", "bottom-middle")]
    assert {(r.subject, r.predicate, r.object) for r in sg.relations} == {(0, "left_of", 1), (0, "above", 1)}


def test_subsets_are_reference_target_and_one_detail_distractors(bench: Path) -> None:
    for split in S.SPLITS:
        recs = S.load_scene_records(bench, split)
        ds = load_dataset("synthetic", bench, split)
        for q in ds.queries:
            assert q.subset is not None and len(q.subset) == 6 == len(set(q.subset))
            (t,) = q.targets
            assert q.reference in q.subset and t in q.subset and q.reference != t
            ref, tgt = _objects(recs[q.reference]), _objects(recs[t])
            assert ref != tgt
            distractors = [m for m in q.subset if m not in (q.reference, t)]
            assert sorted(q.meta["distractor_details"]) == sorted(distractors)
            for d in distractors:
                dd = _objects(recs[d])
                assert dd != tgt and dd != ref  # never a copy of the target or the reference, jitter aside
                assert _one_detail(tgt, dd) == q.meta["distractor_details"][d], (q.qid, d)


def test_modification_graph_turns_reference_into_target(bench: Path) -> None:
    def key(e) -> tuple:
        colour, size, shape, pos = e.attributes
        r, c = divmod(S.POSITIONS.index(pos), S.GRID)
        return (r, c, shape, colour, size)

    for split in S.SPLITS:
        recs = S.load_scene_records(bench, split)
        for q in load_dataset("synthetic", bench, split, text="fine").queries:
            sg = q.scene_graph
            assert sg is not None
            scene = _objects(recs[q.reference])
            edits = [r for r in sg.relations if r.predicate in S.EDIT_KINDS]
            assert [r.predicate for r in edits] == q.meta["edit_kinds"]
            assert len(edits) == q.meta["n_edits"] == len(q.finemt) and 1 <= len(edits) <= 3
            for r in sg.relations:
                if r.predicate in ("left_of", "above"):  # a landmark relation used by a referring expression
                    a, b = key(sg.entities[r.subject]), key(sg.entities[r.object])
                    assert scene[a] and scene[b]
                    assert (a[1] < b[1]) if r.predicate == "left_of" else (a[0] < b[0])
            # Every line refers to the reference: edits of one object share its "before" entity; apply them together.
            final: dict[int, list] = {}
            for r in edits:
                if r.predicate == "add":
                    scene[key(sg.entities[r.subject])] += 1
                    continue
                before = key(sg.entities[r.subject])
                assert scene[before] >= 1, (q.qid, before)
                cur = final.setdefault(r.subject, list(before))
                if r.predicate == "remove":
                    final[r.subject] = None
                    continue
                after = key(sg.entities[r.object])
                changed = [i for i in range(5) if before[i] != after[i]]
                expect = {"move": [0, 1], "change_shape": [2], "change_colour": [3], "change_size": [4]}[r.predicate]
                assert changed == expect or (r.predicate == "move" and changed in ([0], [1])), (q.qid, r)
                for i in changed:
                    cur[i] = after[i]
            for subj, obj in final.items():
                scene[key(sg.entities[subj])] -= 1
                if obj is not None:
                    scene[tuple(obj)] += 1
            assert +scene == _objects(recs[q.targets[0]]), q.qid


def test_texts_fine_and_coarse(bench: Path) -> None:
    coarse = load_dataset("synthetic", bench, "train", text="coarse")
    fine = load_dataset("synthetic", bench, "train", text="fine")
    assert [q.qid for q in coarse.queries] == [q.qid for q in fine.queries]
    for qc, qf in zip(coarse.queries, fine.queries, strict=True):
        assert qc.captions == qf.captions and len(qc.captions) == 2
        assert qc.text == qc.captions[0] and qf.text == qf.captions[1] == "; ".join(qf.finemt)
        assert qc.text and qc.text != qf.text
    # Varied wording: many distinct templates, not one sentence pattern.
    first_words = Counter(line.split()[0] for q in fine.queries for line in q.finemt)
    assert len(first_words) >= 8
    assert any(q.meta["coarse_omitted"] for q in coarse.queries)  # the coarse text is partly incomplete


_SIZE = {w: k for k, ws in language._SIZE_WORDS.items() for w in ws}
_COLOUR = {w: k for k, ws in language._COLOUR_WORDS.items() for w in ws}
_SHAPE = {w: k for k, ws in language._SHAPE_WORDS.items() for w in ws}
_CELL = {p: cell for cell, ps in language._CELL_PHRASES.items() for p in ps}


def _resolve(phrase: str, scene: dict) -> list[int]:
    """Which objects of ``scene`` a referring expression made by ``language._refer`` can denote (an independent reader)."""
    assert phrase.startswith("the ")
    body = phrase[4:]
    for word, holds in (
        (" to the left of ", lambda a, b: a.col < b.col),
        (" to the right of ", lambda a, b: a.col > b.col),
        (" above ", lambda a, b: a.row < b.row),
        (" below ", lambda a, b: a.row > b.row),
    ):
        if word in body:
            head, land = body.split(word, 1)
            (lk,) = _resolve(land, scene)
            return [k for k in _resolve("the " + head, scene) if holds(scene[k], scene[lk])]
    loc = None
    for w in ("on the left", "on the right", "at the top", "at the bottom"):
        if body.endswith(" " + w):
            body, loc = body[: -len(w) - 1], w
    for p in sorted(_CELL, key=len, reverse=True):
        for prep in ("in ", "at "):
            if body.endswith(" " + prep + p):
                body, loc = body[: -len(prep + p) - 1], _CELL[p]
                break
        if loc is not None:
            break
    words = body.split()
    want: dict[str, str] = {}
    if words[0] in _SIZE:
        want["size"] = _SIZE[words.pop(0)]
    if words[0] in _COLOUR:
        want["colour"] = _COLOUR[words.pop(0)]
    noun = " ".join(words)
    if noun not in ("one", "shape", "object"):
        want["shape"] = _SHAPE[noun]
    cands = [k for k, o in scene.items() if all(getattr(o, a) == v for a, v in want.items())]
    if isinstance(loc, tuple):
        return [k for k in cands if (scene[k].row, scene[k].col) == loc]
    if loc is not None:
        f = {"on the left": lambda o: o.col, "on the right": lambda o: -o.col, "at the top": lambda o: o.row,
             "at the bottom": lambda o: -o.row}[loc]  # fmt: skip
        best = min(f(scene[k]) for k in cands)
        return [k for k in cands if f(scene[k]) == best]
    return cands


def test_fine_referring_expressions_are_exact() -> None:
    rng = random.Random(0)
    n_loc = n_land = 0
    for _ in range(3000):
        cells = rng.sample(range(9), rng.randint(1, 5))
        # Few attribute values, so look-alike objects are common and locations/landmarks get exercised.
        scene = {i: S.Obj(rng.choice(S.SHAPES[:2]), rng.choice(["red", "blue"]), rng.choice(S.SIZES), *divmod(c, 3))
                 for i, c in enumerate(cells)}  # fmt: skip
        key = rng.choice(list(scene))
        phrase, rels = language._refer(scene, key, rng)
        assert _resolve(phrase, scene) == [key], (phrase, scene)
        n_land += bool(rels)
        n_loc += any(w in phrase for w in (" in ", " at ", " on the "))
        for s_, p, o in rels:
            a, b = scene[s_], scene[o]
            assert (a.col < b.col) if p == "left_of" else (a.row < b.row)
    assert n_loc > 100 and n_land > 100


def test_splits_disjoint_and_held_out_combinations(bench: Path) -> None:
    m = json.loads((bench / "manifest.json").read_text())
    held = {tuple(c) for c in m["held_out_combos"]}
    ids: dict[str, set] = {}
    scenes: dict[str, set] = {}
    for split in S.SPLITS:
        recs = S.load_scene_records(bench, split)
        ids[split] = set(recs)
        scenes[split] = {tuple(sorted(_objects(r).elements())) for r in recs.values()}
        assert len(scenes[split]) == len(recs)  # no scene rendered twice
        combos = {(o["colour"], o["shape"]) for r in recs.values() for o in r["render"]["objects"]}
        if split in ("train", "val"):
            assert not combos & held
        else:
            assert combos & held
        for q in load_dataset("synthetic", bench, split).queries:
            involved = {(o[3], o[2]) for i in (q.reference, q.targets[0]) for o in _objects(recs[i])} & held
            assert q.meta["held_out"] == bool(involved)
            assert sorted(map(tuple, q.meta["held_out_combos"])) == sorted(involved)
    for a in S.SPLITS:
        for b in S.SPLITS:
            if a < b:
                assert not ids[a] & ids[b] and not scenes[a] & scenes[b]
    stats = S.benchmark_stats(bench)
    assert stats["splits"]["train"]["held_out_share"] == 0.0
    assert 0.0 < stats["splits"]["test"]["held_out_share"] < 1.0


def test_edit_pairs(bench: Path) -> None:
    for split in S.SPLITS:
        recs = S.load_scene_records(bench, split)
        pairs = S.load_edit_pairs(bench, split)
        assert pairs and len({(p.source, p.edited) for p in pairs}) == len(pairs)
        for p in pairs:
            assert p.source_path.is_file() and p.edited_path.is_file() and p.source_path != p.edited_path
            a, b = _objects(recs[p.source]), _objects(recs[p.edited])
            detail = _one_detail(a, b)
            expect = {"add": "presence", "remove": "presence", "change_colour": "colour", "change_shape": "shape",
                      "change_size": "size", "move": "position"}[p.kind]  # fmt: skip
            assert detail == expect, p
            if p.kind in ("add", "remove"):
                assert (sum(b.values()) > sum(a.values())) == (p.kind == "add")
            assert p.instruction and ";" not in p.instruction


def test_loader_round_trip_and_errors(bench: Path, tmp_path: Path) -> None:
    ds = load_dataset("synthetic", bench, "test", text="fine")
    assert ds.name == "synthetic" and ds.split == "test" and ds.exclude_reference
    assert len(ds.gallery) == json.loads((bench / "manifest.json").read_text())["splits"]["test"]["images"]
    assert all(p.is_file() for p in ds.gallery.paths)
    for q in ds.queries:
        assert Query.from_dict(json.loads(json.dumps(q.to_dict()))) == q
    assert ds.meta["held_out_combos"] and ds.meta["text"] == "fine"
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("synthetic", bench, "dev")
    with pytest.raises(DataError, match="coarse"):
        load_dataset("synthetic", bench, "test", text="medium")
    with pytest.raises(DataError, match="unknown synthetic dataset option"):
        load_dataset("synthetic", bench, "test", category="dress")
    assert len(load_dataset("synthetic", bench, "test", category=None).queries) == len(ds.queries)
    with pytest.raises(DataError, match=r"manifest\.json is missing"):
        load_dataset("synthetic", tmp_path, "test")
    # A malformed line is reported with its file and line number.
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in bench.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    lines = (broken / "queries.val.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-5]
    (broken / "queries.val.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"queries\.val\.jsonl.*line 2.*invalid JSON"):
        load_dataset("synthetic", broken, "val")
    # A query pointing outside the gallery is named.
    lines[1] = json.dumps({**json.loads(lines[0]), "qid": "qx", "targets": ["nope"]})
    (broken / "queries.val.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="'nope' is not in the gallery"):
        load_dataset("synthetic", broken, "val")


def test_reference_similarity_alone_cannot_find_the_target(bench: Path) -> None:
    """Even a perfect image-only model (ranking by true scene distance to the reference, ties shared) finds the
    target first in few queries, in the gallery and in the subset: the text is necessary."""
    recs = S.load_scene_records(bench, "train")
    ds = load_dataset("synthetic", bench, "train")
    objs = {i: _objects(r) for i, r in recs.items()}

    def dist(a: str, b: str) -> int:
        return sum(((objs[a] - objs[b]) + (objs[b] - objs[a])).values())

    def p_first(ref: str, target: str, cands: list[str]) -> float:
        d = {c: dist(ref, c) for c in cands if c != ref}
        best = min(d.values())
        return (d[target] == best) / sum(v == best for v in d.values())

    r1 = np.mean([p_first(q.reference, q.targets[0], ds.gallery.ids) for q in ds.queries])
    s1 = np.mean([p_first(q.reference, q.targets[0], list(q.subset)) for q in ds.queries])
    assert r1 < 0.15 and s1 < 0.35, (r1, s1)


def test_atomic_output(bench: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    calls = {"n": 0}
    real = rendering._render_task

    def flaky(task):
        calls["n"] += 1
        if calls["n"] == 50:
            raise OSError("disk full")
        real(task)

    monkeypatch.setattr(rendering, "_render_task", flaky)
    with pytest.raises(OSError, match="disk full"):
        S.generate(out, seed=1, n_images=120, workers=1)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing that looks like a benchmark
    monkeypatch.setattr(rendering, "_render_task", real)
    S.generate(out, seed=1, n_images=120, workers=1)
    with pytest.raises(DataError, match="--overwrite"):
        S.generate(out, seed=2, n_images=120, workers=1)
    S.generate(out, seed=2, n_images=120, workers=1, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_images"):
        S.generate(tmp_path / "x", n_images=0)
    with pytest.raises(ValueError, match="at least 12 images"):
        S.generate(tmp_path / "x", n_images=50)
    with pytest.raises(ValueError, match="split_fractions"):
        S.generate(tmp_path / "x", split_fractions=(0.5, 0.5))
    with pytest.raises(ValueError, match="at least 12 images"):
        S.generate(tmp_path / "x", n_images=100, split_fractions=(0.9, 0.05, 0.05))


def test_benchmark_stats(bench: Path) -> None:
    st = S.benchmark_stats(bench)
    for split, s in st["splits"].items():
        assert sum(s["edits_per_query"].values()) == s["queries"]
        assert s["subset_sizes"] == {"6": s["queries"]}
        assert sum(s["edit_kinds"].values()) == sum(int(k) * v for k, v in s["edits_per_query"].items())
        assert sum(s["distractor_details"].values()) == 4 * s["queries"]
        assert s["images"] == len(load_dataset("synthetic", bench, split).gallery)
    assert set(st["splits"]["train"]["edits_per_query"]) == {"1", "2", "3"}
    assert all(v > 0 for v in st["splits"]["train"]["edit_kinds"].values())


def test_cli_make_synthetic_and_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cirfusion.cli import main

    out = tmp_path / "cli"
    rc = main(["data", "make-synthetic", "--out", str(out), "--seed", "5", "--n-images", "120", "--workers", "1", "--json"])
    assert rc == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["seed"] == 5 and sum(s["images"] for s in stats["splits"].values()) == 120
    rc = main(["data", "make-synthetic", "--out", str(out), "--n-images", "120", "--no-progress"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    rc = main(["data", "make-synthetic", "--out", str(out), "--n-images", "120", "--workers", "1", "--overwrite", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0 and "[test]" in printed and "images/s" in printed
    rc = main(["data", "stats", "synthetic", "--root", str(out), "--split", "test", "--json"])
    assert rc == 0
    st = json.loads(capsys.readouterr().out)
    assert st["queries"] == stats["splits"]["test"]["queries"] and st["gallery"] == stats["splits"]["test"]["images"]


def test_render_worker_failure_is_reported(tmp_path: Path) -> None:
    spec = {"size": 64, "background": [30, 30, 30], "gradient": [0, 0],
            "objects": [{"shape": "circle", "colour": "red", "center": [10, 10], "radius": 5.0, "rotation": 0}]}  # fmt: skip
    bad = {**spec, "objects": [{**spec["objects"][0], "shape": "hexagon"}]}
    tasks = [(str(tmp_path / f"{i}.png"), spec if i != 150 else bad) for i in range(200)]
    r = rendering._Renderer(tasks, workers=2, progress=False)
    r.start()
    with pytest.raises(RuntimeError, match=r"render worker 0 failed \(exit 1\): .*150\.png: ValueError: unknown shape 'hexagon'"):
        r.finish()
    assert (tmp_path / "0.png").is_file() and (tmp_path / "1.png").is_file()


# Hashes of seed 0, 120 images at 64 px, made by the generator before it was split into a package. They pin the
# split: queries, galleries, scenes and edit pairs must never change for a given seed (results on the test split
# are compared across versions). Pixels are hashed decoded, so a different zlib (PNG bytes) does not matter.
PINNED_FILES = {
    "edit_pairs.test.jsonl": "c207e1a86a0e0c310a3d80ca635c6c55565b7e9d377aecfb4c1b0f7ec9661f53",
    "edit_pairs.train.jsonl": "6a9fbaf13a23a9590c3d5e379b8d085628cb0529c4336b4db5fe512ebf5d21ca",
    "edit_pairs.val.jsonl": "5c53586a99968b564afa67a6abfe1eb8511407e2420ec7ba6e937d3be93b5ae0",
    "gallery.test.json": "c9ec58b2fbee57fe00389a07286dc59eacbc2e3800e2a91845ef51fc8ca08546",
    "gallery.train.json": "c778ffb36038807af778e6ff4b00c1c960d57803aa20a4608edc6b4d17631ce1",
    "gallery.val.json": "39269ef21db7ac42d2783dfaa3128335f27ea71c777fdcd1e4fd50ac0ae71701",
    "manifest.json": "80e731f21a2392eafee88dfb6e211a217f4dd4f7c05cd6d1c30003caf7b73b2c",
    "queries.test.jsonl": "8291ef0dc1fdb1e87d8cd7a07b1ac68ba48acac3497ba724941c34b237ed506c",
    "queries.train.jsonl": "8fc6c0797ffdde9e9dc5e480d7d342cf9c57951e3d5f2d5ff14dc033123d90a6",
    "queries.val.jsonl": "080de450830920b74d7fe9909001797c3a571d8f8e63bb35457201b94c90ce27",
    "scenes.test.jsonl": "e09b1be3ad2a82192e27187e3587ae67fe40d90eb50c90eddb19a2e6e284b1b0",
    "scenes.train.jsonl": "fac261920b12dccba5f3ef633ebce2fcf1dfc81a921da8216510bff1466cfe19",
    "scenes.val.jsonl": "8f3720c10ef18e4c0bfd96606d6333d5a29c2b7e050f17ef9f078e63e7ae3477",
}
PINNED_PIXELS = "c9afdfe127b6fda6dac288b2639821852abb0d884e29a5597b95600485c20e36"


def test_generation_is_pinned(tmp_path: Path) -> None:
    root = tmp_path / "pinned"
    S.generate(root, seed=0, n_images=120, image_size=64, workers=1)
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir() if p.is_file()}
    assert got == PINNED_FILES
    h = hashlib.sha256()
    pngs = sorted(root.glob("images/*/*.png"))
    assert len(pngs) == 120
    for p in pngs:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + np.asarray(Image.open(p).convert("RGB")).tobytes())
    assert h.hexdigest() == PINNED_PIXELS


def test_overwrite_replaces_only_a_make_synthetic_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cirfusion.cli import main

    # A folder of the user's: refused with a clear error, and left exactly as it was.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("four years of work")
    args = ["data", "make-synthetic", "--n-images", "120", "--workers", "1", "--no-progress", "--overwrite"]
    assert main([*args, "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert str(mine) in err and "does not look like a make-synthetic output" in err
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"] and (mine / "thesis.txt").read_text() == "four years of work"
    # A manifest that is not a make-synthetic one is no pass either.
    (mine / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="does not look like a make-synthetic output"):
        S.generate(mine, n_images=120, workers=1, overwrite=True)
    assert (mine / "thesis.txt").is_file()

    # A previous output is replaced.
    out = tmp_path / "bench"
    S.generate(out, seed=1, n_images=120, workers=1)
    assert main([*args, "--out", str(out), "--seed", "2"]) == 0
    assert json.loads((out / "manifest.json").read_text())["seed"] == 2
    # ... but not when the user put something of theirs into it.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"notes\.txt"):
        S.generate(out, seed=3, n_images=120, workers=1, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 2 and (out / "notes.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench", "mine"]  # no temporary directory left behind
