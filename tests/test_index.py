"""Index and search: the exact index equals brute force (ids and scores, ties included), approximate kinds reach
good recall, save/load round-trips, and bad input fails with a clear error."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cirfusion.index import (
    INDEX_KINDS,
    CIRIndexError,
    brute_force_search,
    build_index,
    load_index,
    set_threads,
)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def names(n: int) -> list[str]:
    return [f"img{i:05d}" for i in range(n)]


def clustered(rng: np.random.Generator, n: int, d: int, centers: np.ndarray, m: int | None = None, noise: float = 0.6):
    """Unit vectors around random cluster centres (what real embeddings look like, unlike uniform noise)."""
    shape = (n, d) if m is None else (n, m, d)
    c = centers[rng.integers(0, len(centers), size=n)]
    if m is not None:
        c = c[:, None, :]
    return unit(c + noise * rng.normal(size=shape) / np.sqrt(d))


@pytest.fixture(autouse=True)
def _two_threads():
    set_threads(2)


# ---------------------------------------------------------------------------------------------------------------
# brute force itself


def test_brute_force_matches_explicit_loops():
    rng = np.random.default_rng(1)
    g = unit(rng.normal(size=(30, 3, 8)))
    q = unit(rng.normal(size=(4, 2, 8)))
    ids = names(30)
    scores, got = brute_force_search(q, g, k=5, ids=ids, exclude=[[ids[0]], [], ["not-in-gallery"], ids[:10]])
    for b in range(4):
        full = [max(float(np.dot(q[b, i].astype(np.float64), g[n, j])) for i in range(2) for j in range(3)) for n in range(30)]
        banned = {0: {0}, 3: set(range(10))}.get(b, set())
        ranked = sorted((n for n in range(30) if n not in banned), key=lambda n: (-full[n], n))[:5]
        assert got[b] == [ids[n] for n in ranked]
        np.testing.assert_allclose(scores[b], [full[n] for n in ranked], rtol=0, atol=1e-6)
    # without ids the rows are named by number
    _, rows = brute_force_search(q[:, 0], g[:, 0], k=3)
    assert all(r.isdigit() for r in rows[0])


def test_brute_force_chunking_does_not_change_results(monkeypatch):
    import cirfusion.exact_search as exact_search

    rng = np.random.default_rng(14)
    g = unit(rng.normal(size=(300, 3, 16)))
    q = unit(rng.normal(size=(25, 2, 16)))
    exclude = [[str(i)] for i in range(25)]
    want = brute_force_search(q, g, 7, exclude=exclude)
    monkeypatch.setattr(exact_search, "_SCORE_BLOCK", 1000)  # 3 queries per block
    monkeypatch.setattr(exact_search, "_SCORE_CHUNK", 100)  # a few gallery items per step
    got = brute_force_search(q, g, 7, exclude=exclude)
    assert got[1] == want[1] and np.array_equal(got[0], want[0])


def test_tie_break_is_lower_row():
    g = unit(np.ones((10, 4)))  # every item identical: all scores tie
    q = g[:2]
    ids = names(10)
    for kind in INDEX_KINDS:
        index = build_index(g, ids, kind)
        scores, got = index.search(q, 4, exclude=[[ids[1]], []])
        assert np.all(scores == scores[0, 0])
        if kind == "hnsw":  # a graph walk over identical points sees only some of them; those come in row order
            assert all(row == sorted(row) and ids[1] not in row for row in got[:1])
        else:
            assert got == [[ids[0], ids[2], ids[3], ids[4]], ids[:4]], kind


# ---------------------------------------------------------------------------------------------------------------
# exact == brute force


def _with_near_ties(rng: np.random.Generator, g: np.ndarray) -> np.ndarray:
    """Copy some rows exactly (ties) and some with a one-ulp-scale perturbation (near ties)."""
    g = g.copy()
    n = len(g)
    src = rng.choice(n, size=n // 5, replace=False)
    dst = rng.choice(n, size=n // 5, replace=False)
    g[dst] = g[src]
    near = rng.choice(n, size=n // 10, replace=False)
    g[near] = unit(g[near[::-1]] + 1e-7 * rng.normal(size=g[near].shape))
    return g


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_exact_equals_brute_force_single_vector(metric):
    rng = np.random.default_rng(2)
    n, d, b = 3000, 32, 60
    g = _with_near_ties(rng, unit(rng.normal(size=(n, d))))
    ids = names(n)
    # queries: half are gallery rows (their own duplicates tie at the top), half random
    q = np.concatenate([g[rng.choice(n, b // 2)], unit(rng.normal(size=(b // 2, d)))])
    if metric == "cosine":  # cosine normalises whatever it gets
        g, q = g * 3.0, q * 0.5
    exclude = [[ids[int(i)] for i in rng.choice(n, rng.integers(0, 4))] + ["unknown-id"] for _ in range(b)]
    index = build_index(g, ids, "exact", metric)
    for k in (1, 10, 50):
        s, got = index.search(q, k, exclude=exclude)
        bs, want = brute_force_search(q, g, k, exclude=exclude, ids=ids, metric=metric)
        assert got == want
        assert np.array_equal(s, bs)
        assert s.dtype == np.float32 and s.shape == (b, k)
        assert all(not set(row) & set(ex) for row, ex in zip(got, exclude))


@pytest.mark.parametrize("query_vectors", [None, 3])
def test_exact_equals_brute_force_multi_vector(query_vectors):
    rng = np.random.default_rng(3)
    n, m, d, b = 1500, 4, 24, 40
    g = unit(rng.normal(size=(n, m, d)))
    g[::7, 1] = g[::7, 0]  # repeated tokens inside an item
    g[1::11] = g[2::11][: len(g[1::11])]  # whole items duplicated (ties between items)
    ids = names(n)
    if query_vectors is None:
        q = np.concatenate([g[rng.choice(n, b // 2), 2], unit(rng.normal(size=(b // 2, d)))])
    else:
        q = unit(rng.normal(size=(b, query_vectors, d)))
        q[: b // 2, 0] = g[rng.choice(n, b // 2), 3]
    exclude = [[ids[int(i)]] for i in rng.choice(n, b)]
    index = build_index(g, ids, "exact")
    assert index.multi_vector and index.vectors_per_item == m and len(index) == n
    s, got = index.search(q, 20, exclude=exclude)
    bs, want = brute_force_search(q, g, 20, exclude=exclude, ids=ids)
    assert got == want
    assert np.array_equal(s, bs)
    # max-max semantics: a gallery token equal to a query vector scores 1
    if query_vectors is None:
        assert np.allclose(s[: b // 2, 0], 1.0, atol=1e-6)


def test_all_tied_forces_exact_retries_to_full_scan():
    # Every score ties at the boundary, so the round-off bound can never certify a partial result: the exact
    # index must widen its candidate set until it has seen everything and then pick the lowest rows.
    g = unit(np.tile(np.arange(1, 9, dtype=np.float32), (500, 1)))
    ids = names(500)
    index = build_index(g, ids, "exact")
    s, got = index.search(g[:3], 7, exclude=[[ids[3]], [], []])
    assert got[0] == [ids[i] for i in (0, 1, 2, 4, 5, 6, 7)]
    assert got[1] == ids[:7]
    assert got == brute_force_search(g[:3], g, 7, exclude=[[ids[3]], [], []], ids=ids)[1]


def test_exact_ties_that_faiss_returns_in_arbitrary_order():
    # Permutations of one vector score exactly the same against a constant query (the float64 sums are exact), but
    # faiss returns an arbitrary subset of them: only the round-off bound + widening gives the lowest rows.
    rng = np.random.default_rng(15)
    d = 64
    a = rng.integers(1 << 19, 1 << 20, size=d).astype(np.float64)
    base = (a / np.linalg.norm(a)).astype(np.float32)
    g = np.stack([rng.permutation(base) for _ in range(500)])
    q = np.full((2, d), 1 / 8, np.float32)  # unit norm, exact products
    ids = names(500)
    index = build_index(g, ids, "exact")
    scores, got = index.search(q, 5, exclude=[[ids[2]], []])
    assert got == [[ids[i] for i in (0, 1, 3, 4, 5)], ids[:5]]
    assert np.all(scores == scores[0, 0])
    assert got == brute_force_search(q, g, 5, exclude=[[ids[2]], []], ids=ids)[1]


def test_single_query_vector_and_search_rows():
    rng = np.random.default_rng(4)
    g = unit(rng.normal(size=(200, 16)))
    index = build_index(g, names(200))
    s1, ids1 = index.search(g[5], 3)
    s2, rows = index.search_rows(g[5:6], 3)
    assert ids1 == [[index.ids[r] for r in rows[0]]]
    assert np.array_equal(s1, s2) and rows[0, 0] == 5


# ---------------------------------------------------------------------------------------------------------------
# approximate kinds


def _recall_at_10(index, q, g, ids) -> float:
    _, got = index.search(q, 10)
    _, want = brute_force_search(q, g, 10, ids=ids)
    return float(np.mean([len(set(a) & set(w)) / 10 for a, w in zip(got, want)]))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
@pytest.mark.parametrize("m", [None, 4])
def test_approximate_recall(kind, m):
    rng = np.random.default_rng(5)
    d = 64
    centers = unit(rng.normal(size=(40, d)))
    n = 5000 if m is None else 2000
    g = clustered(rng, n, d, centers, m, noise=1.0)
    q = clustered(rng, 100, d, centers, noise=1.0)
    ids = names(n)
    index = build_index(g, ids, kind)
    recall = _recall_at_10(index, q, g, ids)
    assert recall >= 0.9, (kind, m, index.params, recall)
    # the measurement can fail: a starved search misses neighbours
    index.set_search_params(**({"nprobe": 1} if kind == "ivf" else {"ef_search": 1}))
    if kind == "hnsw":
        index = build_index(g, ids, kind, M=4, ef_construction=8, ef_search=1)
    assert _recall_at_10(index, q, g, ids) < 0.9


def test_ivf_auto_nlist_and_shrink():
    rng = np.random.default_rng(6)
    g = unit(rng.normal(size=(100, 8)))
    index = build_index(g, names(100), "ivf")
    # 4*sqrt(100) = 40 lists would leave 2.5 vectors per list; capped to 100 // 39 = 2
    assert index.params["nlist"] == 2 and index.params["nprobe"] == 2
    # 4*sqrt(10000) = 400 would leave 25 per list: capped to 10000 // 39 = 256; at 30000, round(4*sqrt) = 693 fits
    assert build_index(unit(rng.normal(size=(10000, 4))), names(10000), "ivf").params["nlist"] == 256
    assert build_index(unit(rng.normal(size=(30000, 4))), names(30000), "ivf").params["nlist"] == 693
    with pytest.raises(CIRIndexError, match="nlist"):
        build_index(g, names(100), "ivf", nlist=101)


def test_ivf_that_runs_dry_falls_back_to_exact():
    # One probed list out of 10 cannot hold 150 items: those queries are answered by brute force, not short.
    rng = np.random.default_rng(7)
    g = unit(rng.normal(size=(800, 8)))
    ids = names(800)
    index = build_index(g, ids, "ivf", nlist=10, nprobe=1)
    q = unit(rng.normal(size=(5, 8)))
    s, got = index.search(q, 150)
    bs, want = brute_force_search(q, g, 150, ids=ids)
    assert got == want and np.array_equal(s, bs)


def test_set_search_params():
    rng = np.random.default_rng(8)
    g = unit(rng.normal(size=(2000, 16)))
    ivf = build_index(g, names(2000), "ivf", nprobe=2)
    ivf.set_search_params(nprobe=10_000)  # clipped to nlist
    assert ivf.params["nprobe"] == ivf.params["nlist"] == ivf.index.nprobe
    hnsw = build_index(g, names(2000), "hnsw", ef_search=16)
    hnsw.set_search_params(ef_search=200)
    assert hnsw.index.hnsw.efSearch == 200
    with pytest.raises(CIRIndexError, match="no search option 'nprobe'"):
        hnsw.set_search_params(nprobe=3)
    with pytest.raises(CIRIndexError, match="positive integer"):
        ivf.set_search_params(nprobe=0)


# ---------------------------------------------------------------------------------------------------------------
# determinism, save / load


@pytest.mark.parametrize("kind", INDEX_KINDS)
@pytest.mark.parametrize("m", [None, 3])
def test_save_load_round_trip_and_determinism(tmp_path, kind, m):
    rng = np.random.default_rng(9)
    d = 32
    centers = unit(rng.normal(size=(20, d)))
    g = clustered(rng, 1200, d, centers, m)
    q = clustered(rng, 30, d, centers)
    ids = names(1200)
    meta = {"checkpoint": "/runs/clip4cir/best", "checkpoint_sha256": "ab" * 32, "backbone": "embedded"}
    index = build_index(g, ids, kind, meta=meta)
    exclude = [[ids[i]] for i in range(30)]
    s, got = index.search(q, 10, exclude=exclude)

    out = index.save(tmp_path / "idx")
    assert sorted(p.name for p in out.iterdir()) == ["ids.json", "index.faiss", "meta.json"]
    assert not [p for p in tmp_path.iterdir() if p.name != "idx"]  # no temporary leftovers
    loaded = load_index(out)
    assert (loaded.kind, loaded.metric, loaded.dim, loaded.ids, loaded.meta) == (kind, "ip", d, ids, meta)
    assert (loaded.multi_vector, loaded.vectors_per_item, loaded.params) == (m is not None, m or 1, index.params)
    s2, got2 = loaded.search(q, 10, exclude=exclude)
    assert got2 == got and np.array_equal(s2, s)

    # building again from the same data gives the same bytes on disk (IVF k-means seed, one-thread HNSW insertion)
    set_threads(1)
    build_index(g, ids, kind, meta=meta).save(tmp_path / "again")
    assert (tmp_path / "again" / "index.faiss").read_bytes() == (out / "index.faiss").read_bytes()

    # saving over an existing index replaces it
    build_index(g[:100], ids[:100], kind, meta=meta).save(out)
    assert len(load_index(out)) == 100


def test_save_refuses_to_clobber_other_directories(tmp_path):
    index = build_index(unit(np.eye(4)), names(4))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(CIRIndexError, match="not an index directory"):
        index.save(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    index.save(tmp_path / "empty")
    assert len(load_index(tmp_path / "empty")) == 4


@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(10)
    build_index(unit(rng.normal(size=(50, 2, 8))), names(50), "exact").save(tmp_path / "idx")
    return tmp_path / "idx"


def _rewrite_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))
    return meta


def test_load_corrupt_ids_json(saved):
    (saved / "ids.json").write_text((saved / "ids.json").read_text().replace("img00007", "img00008"))
    with pytest.raises(CIRIndexError, match=r"ids\.json.*sha256 does not match"):
        load_index(saved)


def test_load_ids_json_that_is_not_json(saved):
    import hashlib

    bad = b"[\"img00000\", "
    (saved / "ids.json").write_bytes(bad)
    meta = json.loads((saved / "meta.json").read_text())
    meta["files"]["ids.json"]["sha256"] = hashlib.sha256(bad).hexdigest()
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CIRIndexError, match=r"ids\.json: not valid JSON"):
        load_index(saved)


def test_load_duplicate_ids_named(saved):
    import hashlib

    ids = json.loads((saved / "ids.json").read_text())
    ids[3] = ids[2]
    raw = json.dumps(ids).encode()
    (saved / "ids.json").write_bytes(raw)
    meta = json.loads((saved / "meta.json").read_text())
    meta["files"]["ids.json"]["sha256"] = hashlib.sha256(raw).hexdigest()
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CIRIndexError, match=r"ids\.json: duplicate id 'img00002' at positions 2 and 3"):
        load_index(saved)


def test_load_ntotal_mismatch(saved):
    # consistent checksums but ids.json says 49 items while index.faiss holds 50 x 2 vectors
    import hashlib

    raw = json.dumps(names(49)).encode()
    (saved / "ids.json").write_bytes(raw)
    meta = json.loads((saved / "meta.json").read_text())
    meta["files"]["ids.json"]["sha256"] = hashlib.sha256(raw).hexdigest()
    meta["num_items"] = 49
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CIRIndexError, match=r"index\.faiss: holds 100 vectors but ids\.json has 49 ids x 2"):
        load_index(saved)


def test_load_truncated_or_missing_index_file(saved):
    data = (saved / "index.faiss").read_bytes()
    (saved / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(CIRIndexError, match=r"index\.faiss.*sha256 does not match"):
        load_index(saved)
    os.remove(saved / "index.faiss")
    with pytest.raises(CIRIndexError, match=r"index\.faiss: missing"):
        load_index(saved)


def _replace_index_file(path, raw: bytes) -> None:
    import hashlib

    (path / "index.faiss").write_bytes(raw)
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["index.faiss"]["sha256"] = hashlib.sha256(raw).hexdigest()
    (path / "meta.json").write_text(json.dumps(meta))


def test_load_index_file_faiss_cannot_read_or_of_wrong_type(saved):
    import faiss

    _replace_index_file(saved, b"IxFI" + bytes(40))
    with pytest.raises(CIRIndexError, match=r"index\.faiss: faiss cannot read it"):
        load_index(saved)
    other = build_index(unit(np.eye(8)), names(8), "hnsw")
    _replace_index_file(saved, faiss.serialize_index(other.index).tobytes())
    with pytest.raises(CIRIndexError, match=r"index\.faiss: holds a IndexHNSWFlat .*kind 'exact' needs an IndexFlatIP"):
        load_index(saved)


def test_load_bad_meta(saved, tmp_path):
    with pytest.raises(CIRIndexError, match="not a directory"):
        load_index(tmp_path / "nowhere")
    _rewrite_meta(saved, params={"nprobe": 4})
    with pytest.raises(CIRIndexError, match=r"meta\.json: params .* do not fit kind 'exact'"):
        load_index(saved)
    _rewrite_meta(saved, format_version=99)
    with pytest.raises(CIRIndexError, match=r"meta\.json: format_version 99"):
        load_index(saved)
    (saved / "meta.json").write_text("{not json")
    with pytest.raises(CIRIndexError, match=r"meta\.json: not valid JSON"):
        load_index(saved)
    (saved / "meta.json").write_text(json.dumps({"format": "cirfusion.index", "format_version": 1}))
    with pytest.raises(CIRIndexError, match=r"meta\.json: missing or malformed field"):
        load_index(saved)


# ---------------------------------------------------------------------------------------------------------------
# input errors


def test_build_errors():
    g = unit(np.random.default_rng(11).normal(size=(20, 8)))
    ids = names(20)
    with pytest.raises(CIRIndexError, match="0 embeddings"):
        build_index(np.zeros((0, 8), np.float32), [])
    with pytest.raises(CIRIndexError, match="row 3 .*L2 norm 2"):
        build_index(np.where(np.arange(20)[:, None] == 3, 2 * g, g), ids)
    with pytest.raises(CIRIndexError, match="row 5 .*NaN"):
        bad = g.copy()
        bad[5, 2] = np.nan
        build_index(bad, ids)
    with pytest.raises(CIRIndexError, match="all zeros"):
        build_index(np.zeros((20, 8), np.float32), ids, metric="cosine")
    with pytest.raises(CIRIndexError, match="19 ids for 20 embeddings"):
        build_index(g, ids[:19])
    with pytest.raises(CIRIndexError, match="duplicate id 'img00000' at positions 0 and 1"):
        build_index(g, [ids[0]] + ids[:19])
    with pytest.raises(CIRIndexError, match="position 2 must be a non-empty string"):
        build_index(g, ids[:2] + [7] + ids[3:])
    with pytest.raises(CIRIndexError, match="shape"):
        build_index(g[0], ids)
    with pytest.raises(CIRIndexError, match="floating-point"):
        build_index(np.ones((20, 8), np.int64), ids)
    with pytest.raises(CIRIndexError, match="kind must be one of"):
        build_index(g, ids, "lsh")
    with pytest.raises(CIRIndexError, match="metric must be one of"):
        build_index(g, ids, metric="l2")
    with pytest.raises(CIRIndexError, match=r"unknown option\(s\) \['nprobe'\] for a hnsw index"):
        build_index(g, ids, "hnsw", nprobe=4)
    with pytest.raises(CIRIndexError, match="hnsw M must be a positive integer"):
        build_index(g, ids, "hnsw", M=0)
    with pytest.raises(CIRIndexError, match="JSON-serialisable"):
        build_index(g, ids, meta={"x": object()})


def test_search_errors():
    rng = np.random.default_rng(12)
    g = unit(rng.normal(size=(20, 8)))
    ids = names(20)
    index = build_index(g, ids)
    with pytest.raises(CIRIndexError, match="dimension 9 but the index has dimension 8"):
        index.search(unit(rng.normal(size=(2, 9))), 3)
    with pytest.raises(CIRIndexError, match="k=21 exceeds the 20 items"):
        index.search(g[:2], 21)
    with pytest.raises(CIRIndexError, match="query 1: k=20 but only 19"):
        index.search(g[:2], 20, exclude=[[], [ids[4]]])
    with pytest.raises(CIRIndexError, match="k must be a positive integer"):
        index.search(g[:2], 0)
    with pytest.raises(CIRIndexError, match="one list of ids per query"):
        index.search(g[:2], 3, exclude=[[ids[0]]])
    with pytest.raises(CIRIndexError, match="must be a list of ids"):
        index.search(g[:2], 3, exclude=[ids[0], ids[1]])
    with pytest.raises(CIRIndexError, match="queries: row 1 .*L2 norm"):
        index.search(g[:2] * np.array([[1.0], [1.5]], np.float32), 3)
    # fp16 round-off stays within tolerance
    index.search(g[:2].astype(np.float16), 3)
    with pytest.raises(CIRIndexError, match="k=21 exceeds"):
        brute_force_search(g[:2], g, 21)


def test_index_applies_its_threads_in_the_searching_thread():
    # OpenMP thread counts are per OS thread: a server worker must get the index's count, not faiss's default.
    import threading

    import faiss

    g = unit(np.random.default_rng(13).normal(size=(50, 8)))
    index = build_index(g, names(50), threads=1)
    seen = []

    def worker():
        faiss.omp_set_num_threads(2)
        index.search(g[:1], 3)
        seen.append(faiss.omp_get_max_threads())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [1]
    # a single query scans on one thread, then the index's own count is back in force
    index2 = build_index(g, names(50), threads=2)
    index2.search(g[:1], 3)
    assert faiss.omp_get_max_threads() == 2


def test_threads_from_argument_and_environment(monkeypatch):
    assert set_threads(1) == 1
    monkeypatch.setenv("CIRFUSION_THREADS", "2")
    assert set_threads() == 2
    assert build_index(unit(np.eye(3)), names(3)).threads == 2
    assert build_index(unit(np.eye(3)), names(3), threads=1).threads == 1
    monkeypatch.setenv("CIRFUSION_THREADS", "two")
    with pytest.raises(CIRIndexError, match="CIRFUSION_THREADS='two' is not an integer"):
        set_threads()
    with pytest.raises(CIRIndexError, match="threads must be a positive integer"):
        set_threads(0)


def test_load_recovers_an_interrupted_swap(tmp_path, monkeypatch):
    """A save interrupted between its two renames leaves no index at the path: load (and the next save) put the
    previous index back instead of losing it."""
    import cirfusion.io as cio

    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"i{i}" for i in range(30)]
    path = build_index(x, ids).save(tmp_path / "idx")
    real_replace = cio.os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("simulated crash between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(cio.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="simulated"):
        build_index(x[:10], ids[:10]).save(path)
    monkeypatch.setattr(cio.os, "replace", real_replace)
    assert not path.exists()
    assert load_index(path).ids == ids  # the previous index, whole
    calls.clear()
    monkeypatch.setattr(cio.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="simulated"):
        build_index(x[:10], ids[:10]).save(path)
    monkeypatch.setattr(cio.os, "replace", real_replace)
    assert build_index(x[:5], ids[:5]).save(path) == path and load_index(path).ids == ids[:5]
    assert not list(tmp_path.glob(".idx.old.*"))  # no previous version left aside
