"""Test-server submissions: CIRR (recall / recall_subset) and CIRCO files and their local validators."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from cirfusion.data.registry import load_dataset
from cirfusion.data.schema import CIRDataset, Gallery, Query
from cirfusion.metrics import ScoresError
from cirfusion.submission import (
    CIRCOSubmissionBuilder,
    CIRRSubmissionBuilder,
    SubmissionError,
    validate_circo_submission,
    validate_cirr_submission,
    write_circo_submission,
    write_cirr_submission,
)


def cirr_like(n_q=23, n_g=70, seed=0, with_targets=False):
    rng = np.random.default_rng(seed)
    ids = [f"test1-{j}-0-img{j % 2}" for j in range(n_g)]
    queries = []
    for i in range(n_q):
        members = [ids[j] for j in rng.choice(n_g, size=6, replace=False)]
        ref = members[int(rng.integers(6))]
        targets = (next(m for m in members if m != ref),) if with_targets else ()
        queries.append(Query(str(1000 + 7 * i), ref, f"caption {i}", targets, subset=tuple(members)))
    ds = CIRDataset("cirr", "test1", queries, Gallery(ids, [f"{i}.png" for i in ids]))
    scores = rng.integers(0, 20, size=(n_q, n_g)).astype(np.float32)  # many ties
    return ds, scores


def expected_order(row, cols):
    """Best first, ties by lower gallery index (a stable full sort)."""
    cols = np.asarray(cols)
    return cols[np.lexsort((cols, -row[cols]))]


# ----------------------------------------------------------------------------------------------- CIRR
def test_cirr_files_content(tmp_path):
    ds, scores = cirr_like()
    p_rec, p_sub = write_cirr_submission(scores, ds, tmp_path, "mymodel", chunk=5)
    assert p_rec.name == "recall_submission_mymodel.json" and p_sub.name == "recall_subset_submission_mymodel.json"
    rec, sub = json.loads(p_rec.read_text()), json.loads(p_sub.read_text())
    assert rec["version"] == "rc2" and rec["metric"] == "recall"
    assert sub["version"] == "rc2" and sub["metric"] == "recall_subset"
    assert list(rec)[2:] == [q.qid for q in ds.queries] == list(sub)[2:]
    ids = ds.gallery.ids
    for i, q in enumerate(ds.queries):
        ref = ids.index(q.reference)
        want = [ids[j] for j in expected_order(scores[i], [j for j in range(len(ids)) if j != ref])[:50]]
        assert rec[q.qid] == want
        members = [ids.index(m) for m in q.subset if m != q.reference]
        assert sub[q.qid] == [ids[j] for j in expected_order(scores[i], members)[:3]]
        assert q.reference not in rec[q.qid] and q.reference not in sub[q.qid]
    # Both files pass the validator when read back from disk.
    validate_cirr_submission(p_rec, ds)
    validate_cirr_submission(p_sub, ds)
    assert sorted(p.name for p in tmp_path.iterdir()) == [p_rec.name, p_sub.name]  # no temp files left


def test_cirr_tiles_and_memmap_give_the_same_files(tmp_path):
    ds, scores = cirr_like(seed=1)
    a = write_cirr_submission(scores, ds, tmp_path / "a", "m")
    tiles = [(10, scores[10:23]), (0, scores[0:4]), (4, scores[4:10])]
    b = write_cirr_submission(iter(tiles), ds, tmp_path / "b", "m")
    np.save(tmp_path / "s.npy", scores)
    c = write_cirr_submission(np.load(tmp_path / "s.npy", mmap_mode="r"), ds, tmp_path / "c", "m", chunk=3)
    assert len(a) == len(b) == len(c) == 2
    for x, y, z in zip(a, b, c, strict=True):
        assert x.read_bytes() == y.read_bytes() == z.read_bytes()


def test_cirr_refuses_bad_scores_and_writes_nothing(tmp_path):
    ds, scores = cirr_like()
    bad = scores.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ScoresError, match="nan"):
        write_cirr_submission(bad, ds, tmp_path, "m")
    with pytest.raises(ScoresError, match=r"shape \(23, 69\).*\(23, 70\)"):
        write_cirr_submission(scores[:, :69], ds, tmp_path, "m")
    with pytest.raises(ScoresError, match="22 of 23 queries have no scores"):
        write_cirr_submission([(0, scores[:1])], ds, tmp_path, "m")
    with pytest.raises(ScoresError, match="already scored"):
        write_cirr_submission([(0, scores), (0, scores[:1])], ds, tmp_path, "m")
    no_subset = CIRDataset("cirr", "test1", [Query("1", ds.queries[0].reference, "t")], ds.gallery)
    with pytest.raises(SubmissionError, match="'1' has no subset"):
        CIRRSubmissionBuilder(no_subset)
    assert list(tmp_path.iterdir()) == []


def test_cirr_small_gallery_lists_every_candidate(tmp_path):
    ids = [f"i{j}" for j in range(8)]
    q = Query("5", "i2", "t", subset=("i2", "i3", "i4"))
    ds = CIRDataset("cirr", "test1", [q], Gallery(ids, ids))
    p_rec, p_sub = write_cirr_submission(np.arange(8.0)[None], ds, tmp_path, "m")
    assert json.loads(p_rec.read_text())["5"] == ["i7", "i6", "i5", "i4", "i3", "i1", "i0"]
    assert json.loads(p_sub.read_text())["5"] == ["i4", "i3"]


def _cirr_objs():
    ds, scores = cirr_like(n_q=6)
    b = CIRRSubmissionBuilder(ds)
    b.update(0, scores)
    rec, sub = b.result()
    return ds, rec, sub


def _first(obj):
    return next(k for k in obj if k not in ("version", "metric"))


def _mut_wrong_version(o, ds):
    o["version"] = "rc1"


def _mut_wrong_metric(o, ds):
    o["metric"] = "recall@50"


def _mut_missing_pair(o, ds):
    del o[_first(o)]


def _mut_extra_key(o, ds):
    o["99999"] = o[_first(o)]


def _mut_short_list(o, ds):
    o[_first(o)] = o[_first(o)][:-1]


def _mut_duplicate_id(o, ds):
    k = _first(o)
    o[k] = o[k][:-1] + [o[k][0]]


def _mut_reference_listed(o, ds):
    k = _first(o)
    ref = next(q.reference for q in ds.queries if q.qid == k)
    o[k] = [ref] + o[k][:-1]


def _mut_unknown_id(o, ds):
    k = _first(o)
    o[k] = ["no-such-image"] + o[k][:-1]


def _mut_not_a_list(o, ds):
    o[_first(o)] = "test1-1-0-img1"


def _mut_int_ids(o, ds):
    o[_first(o)] = list(range(len(o[_first(o)])))


CIRR_DEFECTS = {
    _mut_wrong_version: "'version' must be 'rc2'",
    _mut_wrong_metric: "'metric' must be",
    _mut_missing_pair: r"pair id '\d+' is missing",
    _mut_extra_key: "key '99999' is not a pair id",
    _mut_short_list: r"ids, expected",
    _mut_duplicate_id: "repeated ids",
    _mut_reference_listed: "lists its reference image",
    _mut_unknown_id: "ids not in",
    _mut_not_a_list: "must be a list of image id strings",
    _mut_int_ids: "must be a list of image id strings",
}


@pytest.mark.parametrize("which", ["recall", "recall_subset"])
@pytest.mark.parametrize("mutate", list(CIRR_DEFECTS), ids=lambda f: f.__name__[5:])
def test_cirr_validator_catches_each_defect(mutate, which):
    ds, rec, sub = _cirr_objs()
    good = rec if which == "recall" else sub
    validate_cirr_submission(good, ds)
    bad = copy.deepcopy(good)
    mutate(bad, ds)
    with pytest.raises(SubmissionError, match=CIRR_DEFECTS[mutate]):
        validate_cirr_submission(bad, ds)


def test_cirr_subset_validator_rejects_non_members():
    ds, rec, sub = _cirr_objs()
    k = _first(sub)
    q = next(q for q in ds.queries if q.qid == k)
    outsider = next(i for i in ds.gallery.ids if i not in q.subset)
    sub[k] = [outsider] + sub[k][:-1]
    with pytest.raises(SubmissionError, match="not in its subset"):
        validate_cirr_submission(sub, ds)


def test_validators_read_files_and_catch_duplicate_keys(tmp_path):
    ds, rec, _ = _cirr_objs()
    k = _first(rec)
    text = json.dumps(rec)
    dup = text[:-1] + f', "{k}": {json.dumps(rec[k])}}}'
    (tmp_path / "dup.json").write_text(dup)
    with pytest.raises(SubmissionError, match=f"(?s)dup.json.*key '{k}' appears more than once"):
        validate_cirr_submission(tmp_path / "dup.json", ds)
    (tmp_path / "broken.json").write_text(text[:-5])
    with pytest.raises(SubmissionError, match="(?s)broken.json.*invalid JSON"):
        validate_cirr_submission(tmp_path / "broken.json", ds)
    with pytest.raises(SubmissionError, match="top level must be a JSON object"):
        validate_cirr_submission([rec], ds)


def test_submission_error_lists_every_problem():
    ds, rec, _ = _cirr_objs()
    for k in [q.qid for q in ds.queries]:
        del rec[k]
    with pytest.raises(SubmissionError) as ei:
        validate_cirr_submission(rec, ds)
    assert len(ei.value.problems) == len(ds.queries)


# ----------------------------------------------------------------------------------------------- CIRCO
def circo_like(numeric=True, exclude_reference=False, n_q=9, n_g=80, seed=3):
    rng = np.random.default_rng(seed)
    ids = [str(100 + 13 * j) if numeric else f"coco_{j}" for j in range(n_g)]
    queries = []
    for i in range(n_q):
        ref = ids[int(rng.integers(n_g))]
        gts = tuple(x for x in rng.choice(ids, size=4, replace=False) if x != ref)
        queries.append(Query(str(i), ref, "t", gts))
    ds = CIRDataset("circo", "val", queries, Gallery(ids, [f"{i}.jpg" for i in ids]),
                    exclude_reference=exclude_reference)
    return ds, rng.integers(0, 10, size=(n_q, n_g)).astype(np.float64)


@pytest.mark.parametrize("exclude", [False, True])
def test_circo_file_content(tmp_path, exclude):
    ds, scores = circo_like(exclude_reference=exclude)
    path = write_circo_submission(scores, ds, tmp_path, "run1", chunk=4)
    assert path.name == "circo_submission_run1.json"
    obj = json.loads(path.read_text())
    assert list(obj) == [q.qid for q in ds.queries]
    ids = ds.gallery.ids
    for i, q in enumerate(ds.queries):
        cols = [j for j in range(len(ids)) if not (exclude and ids[j] == q.reference)]
        assert obj[q.qid] == [int(ids[j]) for j in expected_order(scores[i], cols)[:50]]
        assert len(set(obj[q.qid])) == 50
    validate_circo_submission(path, ds)


def test_circo_string_ids_and_forced_int_ids(tmp_path):
    ds, scores = circo_like(numeric=False)
    obj = json.loads(write_circo_submission(scores, ds, tmp_path, "s").read_text())
    assert all(isinstance(x, str) for v in obj.values() for x in v)
    ds2, scores2 = circo_like(numeric=True)
    b = CIRCOSubmissionBuilder(ds2)
    b.update(0, scores2)
    assert all(isinstance(x, str) for v in b.result(int_ids=False).values() for x in v)
    validate_circo_submission(b.result(int_ids=False), ds2)


def _circo_obj(exclude=True):
    ds, scores = circo_like(exclude_reference=exclude)
    b = CIRCOSubmissionBuilder(ds)
    b.update(0, scores)
    return ds, b.result()


CIRCO_DEFECTS = {
    "missing": (lambda o, ds: o.pop("0"), r"query id '0' is missing"),
    "extra": (lambda o, ds: o.__setitem__("800", o["1"]), "key '800' is not a query id"),
    "short": (lambda o, ds: o.__setitem__("0", o["0"][:49]), "49 ids, expected 50"),
    "long": (lambda o, ds: o.__setitem__("0", o["0"] + [o["1"][0]]), "51 ids, expected 50"),
    "duplicate": (lambda o, ds: o.__setitem__("0", o["0"][:49] + [o["0"][0]]), "repeated ids"),
    "unknown": (lambda o, ds: o.__setitem__("0", [7] + o["0"][1:]), r"ids not in the gallery: \['7'\]"),
    "reference": (lambda o, ds: o.__setitem__("0", [int(ds.queries[0].reference)] + o["0"][1:]),
                  "lists its reference image"),
    "not_list": (lambda o, ds: o.__setitem__("0", {"a": 1}), "must be a list of image ids"),
    "bools": (lambda o, ds: o.__setitem__("0", [True] * 50), "must be a list of image ids"),
}


@pytest.mark.parametrize("defect", list(CIRCO_DEFECTS))
def test_circo_validator_catches_each_defect(defect):
    ds, good = _circo_obj()
    validate_circo_submission(good, ds)
    bad = copy.deepcopy(good)
    mutate, msg = CIRCO_DEFECTS[defect]
    mutate(bad, ds)
    with pytest.raises(SubmissionError, match=msg):
        validate_circo_submission(bad, ds)


def test_circo_reference_allowed_when_not_excluded():
    ds, good = _circo_obj(exclude=False)
    ref = int(ds.queries[0].reference)
    good["0"] = [ref] + [x for x in good["0"] if x != ref][:49]
    validate_circo_submission(good, ds)
    with pytest.raises(SubmissionError, match="reference"):
        validate_circo_submission(good, ds, exclude_reference=True)


# ----------------------------------------------------------------------------------------------- real files
def test_cirr_test1_submission_on_the_real_annotations(shared_data, tmp_path):
    """The real CIRR test1 annotations (conftest.shared_data): every pair id, 50 ids each, valid files."""
    ds = load_dataset("cirr", shared_data / "cirr", "test1")
    assert (len(ds.queries), len(ds.gallery)) == (4148, 2315)
    scores = np.random.default_rng(0).standard_normal((4148, 2315)).astype(np.float32)
    p_rec, p_sub = write_cirr_submission(scores, ds, tmp_path, "random")
    rec = json.loads(p_rec.read_text())
    assert len(rec) == 4148 + 2 and all(len(v) == 50 for k, v in rec.items() if k not in ("version", "metric"))
    raw = json.loads((shared_data / "cirr" / "captions" / "cap.rc2.test1.json").read_text())
    assert set(rec) - {"version", "metric"} == {str(e["pairid"]) for e in raw}
    validate_cirr_submission(p_sub, ds)
