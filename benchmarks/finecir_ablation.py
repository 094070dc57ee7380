"""FineCIR ablation (issue 10) on the synthetic benchmark (fine and coarse texts for every query), and on the catalog
when its fine texts exist (``cirfusion data make-fine``).

Rows (each model trained on train, its epoch chosen on val by the loop's validation metric, Rmean; test read once
per row at the end):

- ``finecir_fine``              FineCIR trained on fine text, tested on fine;
- ``no_entities``               the same with ``entity_guidance=false`` (everything else equal);
- ``finecir_coarse_on_fine``    FineCIR trained on coarse text, tested on fine;
- ``finecir_coarse_on_coarse``  the same model tested on coarse;
- ``clip4cir_fine``, ``sprc_fine``   trained and tested on fine text.

Parsers (``--parser``): ``cirfusion`` (the built-in :mod:`cirfusion.parsing`), or ``synthetic-lexicon``: a
lexicon matcher over the synthetic generator's own vocabulary (shape, colour and size words with their synonyms,
the nine cell phrases): it reads only what a text says, so coarse texts get coarse graphs.

    python benchmarks/finecir_ablation.py --synthetic /path/to/synthetic --cache-dir CACHE --out bench-finecir
    cirfusion data make-fine catalog --root CATALOG --out CATALOG-FINE
    python benchmarks/finecir_ablation.py --benchmarks catalog --catalog CATALOG --catalog-fine CATALOG-FINE ...

Budget (2 cores, 30 min for the synthetic part): 3 epochs, 2 mined negatives per query (from the annotated subset),
training steps in bf16 autocast (``TrainConfig.precision``), the split data loaded once here and shared with the
forked workers (1 torch thread each), the longest runs first. ``--val-only`` trains and reports the val choices
without reading test (the design study in docs/finecir.md used it).

Ends with one JSON line: ``{"synthetic": {row: {"rsubset1", "rmean", "r10"}}, "catalog": ..., "parser": ...,
"selection_split": "val"}``.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import multiprocessing
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from _preload import preload, preloaded

ROWS = ("finecir_fine", "no_entities", "finecir_coarse_on_fine", "finecir_coarse_on_coarse", "clip4cir_fine", "sprc_fine")


def lexicon_parse(texts: list[str]) -> list[dict[str, Any]]:
    """Scene graphs of synthetic-benchmark texts from the generator's vocabulary (see the module docstring): per
    clause (split on ';', ',' and 'and'), each shape noun (or 'shape'/'one'/'object') is an entity whose attributes
    are the size and colour words before it, a cell phrase after it, and predicative words at the clause's end."""
    from cirfusion.data.synthetic.language import _CELL_PHRASES, _COLOUR_WORDS, _SHAPE_WORDS, _SIZE_WORDS

    colour = {w: c for c, ws in _COLOUR_WORDS.items() for w in ws}
    size = {w: s for s, ws in _SIZE_WORDS.items() for w in ws}
    size.update({"bigger": "large", "larger": "large", "smaller": "small", "tinier": "small"})
    shape = {w: s for s, ws in _SHAPE_WORDS.items() for w in ws}
    cells = sorted(((p.removeprefix("the "), f"{'top middle bottom'.split()[r]} {'left centre right'.split()[c]}")
                    for (r, c), ps in _CELL_PHRASES.items() for p in ps), key=lambda x: -len(x[0]))
    generic = {"shape", "one", "object"}
    out = []
    for text in texts:
        entities: list[dict[str, Any]] = []
        last: dict[str, Any] | None = None
        for clause in re.split(r";|,| and ", text.lower()):
            for k, (phrase, _) in enumerate(cells):  # numbered marks: no vocabulary word inside a mark
                clause = clause.replace(phrase, f" cell:{k} ")
            clause = clause.replace("plus sign", "plus_sign")
            pending: list[str] = []
            for w in clause.split():
                w = w.replace("plus_sign", "plus sign")
                if w in colour or w in size:
                    pending.append(colour.get(w) or size[w])
                elif w in shape or w in generic:
                    last = {"name": shape.get(w, "shape"), "attributes": pending, "implicit": False}
                    entities.append(last)
                    pending = []
                elif w.startswith("cell:") and last is not None:
                    last["attributes"].append(cells[int(w[5:])][1])
            if pending and last is not None:
                last["attributes"].extend(pending)
        out.append({"text": text, "entities": entities, "relations": [], "edits": []})
    return out


def row_metrics(m: dict[str, float]) -> dict[str, float]:
    """The row's figures the split has (the catalog's fine text has one target per query, its own text several)."""
    names = {"rsubset1": "Rsubset@1", "rmean": "Rmean", "r10": "R@10", "map10": "mAP@10"}
    return {k: round(m[v], 2) for k, v in names.items() if v in m}


# Split data loaded once by the main process before the workers fork (they share it copy-on-write): each run
# loading its own train and val splits cost ~27 s.
# Relative training time per step, for scheduling the longest runs first (measured: SPRC ~1.6x a FineCIR step,
# CLIP4CIR ~0.25x).
METHOD_COST = {"sprc": 1.6, "finecir": 1.0, "clip4cir": 0.25}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One training run (in a worker process, 1 torch thread): its best checkpoint and the loop's val choice."""
    import torch

    from cirfusion.backbones import create_backbone
    from cirfusion.data import load_dataset
    from cirfusion.features import FeatureCache
    from cirfusion.methods import create_method
    from cirfusion.parse_cache import register_parser
    from cirfusion.seeding import seed_everything
    from cirfusion.train import TrainConfig, train
    from cirfusion.views import load_split_data

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    register_parser("synthetic-lexicon", lexicon_parse, job["lexicon_version"])
    bb = create_backbone("embedded")
    cache = FeatureCache(bb, job["cache"])
    data = {}
    for s in ("train", "val"):
        data[s] = preloaded(job["dataset"], job["root"], s, job["options"])
        if data[s] is None:
            data[s] = load_split_data(cache, load_dataset(job["dataset"], job["root"], s, **job["options"]),
                                      training=(s == "train"))
    seed_everything(job["seed"])
    method = create_method(job["method"], bb, **job["hparams"])
    run_dir = Path(job["run_dir"])
    if run_dir.exists():
        shutil.rmtree(run_dir)
    r = train(method, data["train"], data["val"], run_dir, TrainConfig(**job["config"]))
    return {"name": job["name"], "bench": job["bench"], "best_dir": str(r.best_dir), "val_metric": r.val_metric,
            "best_metric": r.best_metric, "best_epoch": r.best_epoch, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", type=Path, default=None, help="an existing synthetic benchmark (default: generate one in OUT)")
    p.add_argument("--catalog", type=Path, default=None, help="a catalog benchmark (make-catalog); omitted: skipped")
    p.add_argument("--catalog-fine", type=Path, default=None, help="its fine texts (make-fine catalog --out DIR)")
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default: OUT/cache)")
    p.add_argument("--out", type=Path, default=Path("bench-finecir"))
    p.add_argument("--n-images", type=int, default=2500, help="images of a generated synthetic benchmark")
    p.add_argument("--eval-queries-per-image", type=float, default=3.0)
    p.add_argument("--train-scenes", type=int, default=1000,
                   help="distinct base scenes of a generated benchmark's train split, 12 images each (0: the natural "
                        "split); the DetailFusion ablation's diversity curve chose 1000 on val")
    p.add_argument("--epochs", type=int, default=3,
                   help="per run (4 epochs with 4 negatives scored higher on val, but the 5 runs took 50 min on "
                        "2 cores)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--hard-negatives", type=int, default=2,
                   help="mined negatives per query (0: in-batch only); each is a gallery pass per step, and 2 instead "
                        "of 4 is what fits the 30-minute budget")
    p.add_argument("--hard-negative-source", choices=("subset", "neighbours"), default="subset")
    p.add_argument("--parser", default="cirfusion", help="the parser FineCIR reads: cirfusion | synthetic-lexicon")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of the rows")
    p.add_argument("--benchmarks", default="synthetic,catalog",
                   help="comma-separated: synthetic, catalog (the catalog only with --catalog and --catalog-fine)")
    p.add_argument("--jobs", type=int, default=2, help="training runs side by side (1 torch thread each)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16",
                   help="training precision (TrainConfig.precision): bf16 autocast; validation is fp32 either way")
    p.add_argument("--finecir-hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="a FineCIR hyper-parameter for every FineCIR row (JSON value), e.g. edit_nodes=true")
    p.add_argument("--val-only", action="store_true",
                   help="train and report the val choices only; test is not read (for design experiments)")
    args = p.parse_args()

    import torch

    from cirfusion.backbones import create_backbone
    from cirfusion.checkpoint import load_checkpoint
    from cirfusion.data import load_dataset
    from cirfusion.data.synthetic import generate
    from cirfusion.evaluation import evaluate
    from cirfusion.features import FeatureCache
    from cirfusion.parse_cache import ParseCache, get_parser, register_parser
    from cirfusion.views import load_split_data

    # the data phase (features, parses) and the test scoring run in this process alone: the cores the jobs share
    torch.set_num_threads(max(1, args.jobs))
    t_start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    version = hashlib.sha256(inspect.getsource(lexicon_parse).encode()).hexdigest()
    register_parser("synthetic-lexicon", lexicon_parse, version)
    benches = {b.strip() for b in args.benchmarks.split(",") if b.strip()}
    if not benches <= {"synthetic", "catalog"}:
        p.error(f"--benchmarks: unknown {sorted(benches - {'synthetic', 'catalog'})}")
    root = args.synthetic
    if root is None:
        root = out / "data" / "synthetic"
        if "synthetic" in benches and not (root / "manifest.json").exists():
            generate(root, seed=args.seed, n_images=args.n_images, eval_queries_per_image=args.eval_queries_per_image,
                     train_scenes=args.train_scenes or None, train_scene_images=12 if args.train_scenes else None,
                     workers=2)
    bb = create_backbone("embedded")
    cache_dir = args.cache_dir or out / "cache"
    cache = FeatureCache(bb, cache_dir)
    rows = [r for r in args.rows.split(",") if r]

    def splits(bench: str, bench_root: Path, **kw: Any) -> dict[str, Any]:
        out = {s: load_split_data(cache, load_dataset(bench, bench_root, s, **kw), training=(s == "train"))
               for s in ("train", "val", "test")}
        return {s: preload(bench, bench_root, s, kw, d) for s, d in out.items()}

    fine_hp: dict[str, Any] = {"parser": args.parser}
    for item in args.finecir_hparam:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--finecir-hparam expects KEY=VALUE, got {item!r}")
        fine_hp[key.strip()] = json.loads(value)
    # (row, method, hparams, train text, [(result row, test text)])
    plan = [
        ("finecir_fine", "finecir", fine_hp, "fine", [("finecir_fine", "fine")]),
        ("no_entities", "finecir", {**fine_hp, "entity_guidance": False}, "fine", [("no_entities", "fine")]),
        ("finecir_coarse", "finecir", fine_hp, "coarse",
         [("finecir_coarse_on_fine", "fine"), ("finecir_coarse_on_coarse", "coarse")]),
        ("clip4cir_fine", "clip4cir", {}, "fine", [("clip4cir_fine", "fine")]),
        ("sprc_fine", "sprc", {}, "fine", [("sprc_fine", "fine")]),
    ]
    config = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed, "progress": False,
              "precision": args.precision,
              "hard_negatives": args.hard_negatives, "hard_negative_source": args.hard_negative_source}

    # Per benchmark, per text: (dataset loader, root, loader options).
    Roots = dict[str, tuple[str, Path, dict[str, Any]]]

    def jobs_of(bench: str, roots: Roots) -> list[dict[str, Any]]:
        return [{"name": name, "bench": bench, "method": m, "hparams": hp, "seed": args.seed, "config": config,
                 "dataset": roots[text][0], "root": str(roots[text][1]), "options": roots[text][2], "cache": str(cache_dir),
                 "run_dir": str(out / "runs" / bench / name), "lexicon_version": version}
                for name, m, hp, text, tests in plan if any(r in rows for r, _ in tests)]

    def test_rows(bench: str, runs: dict[str, dict[str, Any]], data: dict[str, dict[str, Any]]) -> dict[str, Any]:
        res: dict[str, Any] = {}
        for name, _, _, _, tests in plan:
            if name not in runs:
                continue
            r = runs[name]
            best = load_checkpoint(r["best_dir"])
            for row, test_text in tests:
                res[row] = {**row_metrics(evaluate(best, data[test_text]["test"], progress=False)),
                            "val_" + str(r["val_metric"]): round(float(r["best_metric"] or 0.0), 2),
                            "best_epoch": r["best_epoch"], "train_s": r["seconds"]}
            print(f"[finecir-ablation] {bench}/{name}: {r['seconds']:.0f} s, "
                  + "; ".join(f"{row} {res[row]}" for row, _ in tests), flush=True)
        return res

    results: dict[str, Any] = {"selection_split": "val", "epochs": args.epochs, "parser_used": args.parser,
                               "precision": args.precision, "finecir_hparams": fine_hp}
    syn: dict[str, Any] | None = None
    all_jobs: list[dict[str, Any]] = []
    if "synthetic" in benches:
        syn_roots: Roots = {t: ("synthetic", root, {"text": t}) for t in ("fine", "coarse")}
        syn = {t: splits(d, r, **o) for t, (d, r, o) in syn_roots.items()}  # features (and parses) once, here
        all_jobs += jobs_of("synthetic", syn_roots)
    cat: dict[str, Any] | None = None
    if "catalog" in benches and args.catalog is not None and args.catalog_fine is not None:
        # fine: the make-fine output (one target per query, target_hard = the first); coarse: the catalog's own
        made = args.catalog_fine / "fine.json"  # where make-fine wrote the gallery paths against
        image_dir = json.loads(made.read_text()).get("image_dir") if made.exists() else None
        cat_roots: Roots = {"fine": ("finecir", args.catalog_fine, {"image_dir": image_dir or str(args.catalog.resolve())}),
                            "coarse": ("catalog", args.catalog, {})}
        cat = {t: splits(d, r, **o) for t, (d, r, o) in cat_roots.items()}
        all_jobs += jobs_of("catalog", cat_roots)
    parses = ParseCache(get_parser(args.parser), cache_dir)  # one cache: its disk shards are read once
    for data in (syn or {}, cat or {}):
        for t in data:
            parses.graphs(list(data[t]["train"].texts.texts))
    all_jobs.sort(key=lambda j: -METHOD_COST.get(j["method"], 1.0) * (1.0 if j["bench"] == "synthetic" else 0.5))
    print(f"[finecir-ablation] {len(all_jobs)} training runs on {args.jobs} processes, longest first "
          f"({time.perf_counter() - t_start:.0f} s of data so far)", flush=True)
    torch.set_num_threads(1)  # before forking: one thread per job (2 shared cores)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("fork")) as pool:
        done = list(pool.map(run_job, all_jobs))
    torch.set_num_threads(max(1, args.jobs))
    if args.val_only:
        results["val_only"] = {f"{r['bench']}/{r['name']}": {"val_" + str(r["val_metric"]): round(float(r["best_metric"] or 0), 2),
                                                            "best_epoch": r["best_epoch"], "train_s": r["seconds"]}
                               for r in done}
        results["wall_s"] = round(time.perf_counter() - t_start, 1)
        print(json.dumps(results))
        return 0
    if syn is None:
        results["synthetic"] = {"skipped": f"--benchmarks {args.benchmarks}"}
    else:
        results["synthetic"] = test_rows("synthetic", {r["name"]: r for r in done if r["bench"] == "synthetic"}, syn)

        # The parser: cirfusion.parsing's own scores against the generator's graphs (fine + coarse texts of test)
        # and its speed; the parser FineCIR used here (if another one) is timed as well.
        from cirfusion.parsing.evaluation import score_synthetic, throughput

        test_q = syn["fine"]["test"].dataset.queries
        sc = score_synthetic(test_q)
        texts = [t for q in test_q for t in q.captions]
        results["parser"] = {"name": "cirfusion", "entity_f1": sc["all"]["entity_f1"],
                             "attribute_f1": sc["all"]["attribute_f1"], "edit_f1": sc["all"]["edit_f1"],
                             **throughput(texts), "fine": sc["fine"], "coarse": sc["coarse"]}
        if args.parser != "cirfusion":
            t0 = time.perf_counter()
            ParseCache(get_parser(args.parser)).graphs(list(dict.fromkeys(texts)))
            results["parser"]["used_by_finecir"] = {"name": args.parser,
                                                    "texts_per_s": round(len(texts) / (time.perf_counter() - t0), 1)}
    if cat is not None:
        results["catalog"] = test_rows("catalog", {r["name"]: r for r in done if r["bench"] == "catalog"}, cat)
    else:
        results["catalog"] = {"skipped": "not in --benchmarks, or no --catalog and --catalog-fine given"}
    s = results["synthetic"]
    checks: dict[str, bool] = {}
    if {"finecir_fine", "no_entities"} <= s.keys():
        checks["entity_guidance_plus3_rsubset1"] = s["finecir_fine"]["rsubset1"] >= s["no_entities"]["rsubset1"] + 3
    if {"finecir_fine", "finecir_coarse_on_fine"} <= s.keys():
        checks["fine_over_coarse_plus3_r10"] = s["finecir_fine"]["r10"] >= s["finecir_coarse_on_fine"]["r10"] + 3
    for base in ("clip4cir_fine", "sprc_fine"):
        if {"finecir_fine", base} <= s.keys():
            checks[f"beats_{base}"] = all(s["finecir_fine"][k] >= s[base][k] for k in ("rsubset1", "rmean"))
    results["targets_met"] = checks
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
