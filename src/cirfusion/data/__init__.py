"""Data layer: one triplet schema, loaders for the real formats, two embedded benchmarks."""

from .images import ImageLoadError, load_image
from .registry import dataset_loader, list_datasets, load_dataset, register_dataset
from .schema import CIRDataset, DataError, Entity, Gallery, Query, Relation, SceneGraph

__all__ = [
    "CIRDataset",
    "DataError",
    "Entity",
    "Gallery",
    "ImageLoadError",
    "Query",
    "Relation",
    "SceneGraph",
    "dataset_loader",
    "list_datasets",
    "load_dataset",
    "load_image",
    "register_dataset",
]
