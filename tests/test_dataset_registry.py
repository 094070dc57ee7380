"""The dataset registry (on cirfusion.registry.Registry): names, look-up, the loader accessor the CLI checks
--option KEY=VALUE against, and temporary registrations that leave no trace."""

from __future__ import annotations

import pytest

from cirfusion.data import dataset_loader, list_datasets, load_dataset, register_dataset
from cirfusion.data.catalog import load_catalog
from cirfusion.data.registry import DATASETS
from cirfusion.data.synthetic import load_synthetic
from cirfusion.options import OptionError, parse_options


def test_built_in_loaders_are_listed_and_returned() -> None:
    assert {"cirr", "fashioniq", "shoes", "circo", "finecir", "custom", "synthetic", "catalog"} <= set(list_datasets())
    assert dataset_loader("synthetic") is load_synthetic and dataset_loader("catalog") is load_catalog
    with pytest.raises(KeyError, match=r"unknown dataset 'nope'; known: .*synthetic"):
        dataset_loader("nope")


def test_options_are_checked_against_the_loader_signature() -> None:
    skip = ("root", "split")
    assert parse_options(["text=fine", "validate=false"], dataset_loader("synthetic"), skip=skip) == {
        "text": "fine", "validate": False}  # fmt: skip
    with pytest.raises(OptionError, match=r"unknown option 'txt'; valid options: text \(str\), validate \(bool\)"):
        parse_options(["txt=fine"], dataset_loader("synthetic"), skip=skip)
    assert parse_options(["kinds=edit"], dataset_loader("catalog"), skip=skip) == {"kinds": "edit"}


def test_register_and_unregister(tmp_path) -> None:
    calls = []

    def toy(root, split, flag: bool = False):
        calls.append((root, split, flag))
        return "dataset"

    register_dataset("toy-registry")(toy)
    try:
        assert "toy-registry" in list_datasets() and dataset_loader("toy-registry") is toy
        assert load_dataset("toy-registry", str(tmp_path), "val", flag=True) == "dataset"
        assert calls == [(tmp_path, "val", True)]  # root arrives as a Path
        register_dataset("toy-registry")(toy)  # the same object again (a module reload) is fine
        with pytest.raises(ValueError, match="registered twice"):
            register_dataset("toy-registry")(lambda root, split: None)
    finally:
        DATASETS.unregister("toy-registry")
    assert "toy-registry" not in list_datasets()
