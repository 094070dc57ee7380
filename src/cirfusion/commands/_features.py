"""Arguments and helpers the commands that read cached backbone features share (train, eval, fuse, index, search):
the feature-cache options, the cache itself, a split's features, and the metrics table they print."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..data.schema import CIRDataset
from ..features import FeatureCache
from ..views import SplitData, load_split_data


def default_cache_dir() -> Path:
    env = os.environ.get("CIRFUSION_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "cirfusion" / "features"


def add_feature_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="feature cache directory (default: $CIRFUSION_CACHE_DIR or ~/.cache/cirfusion/features)")
    p.add_argument("--feature-batch-size", type=int, default=64, help="images per backbone forward pass")
    p.add_argument("--workers", type=int, default=0, help="image decoding threads while the backbone encodes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for everything the command does (default: per workload, "
                        "1 for training and fusion fitting, every core for backbone features; see cirfusion.threads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def make_cache(args: argparse.Namespace, backbone: Any) -> FeatureCache:
    return FeatureCache(backbone, args.cache_dir or default_cache_dir(), batch_size=args.feature_batch_size,
                        num_workers=args.workers)


def split_data(cache: FeatureCache, dataset: CIRDataset, training: bool, progress: bool) -> SplitData:
    """Cached features of a split (see cirfusion.views.load_split_data)."""
    return load_split_data(cache, dataset, training=training, progress=progress)


def add_backbone_access_args(p: argparse.ArgumentParser) -> None:
    """--backbone-dir DIR (repeatable) and --allow-download: where a checkpoint's backbone may be read from."""
    p.add_argument("--backbone-dir", action="append", type=Path, default=[], metavar="DIR",
                   help="directory the checkpoint's backbone may be read from (repeatable; its sub-directories too); "
                        "a directory inside the checkpoint is always allowed")
    p.add_argument("--allow-download", action="store_true",
                   help="let the checkpoint's backbone be fetched from the Hugging Face hub (or its local cache)")
