"""Torch threads per workload (cirfusion.threads): the table, the overrides and their order, and that training and
fusion fitting run on them and restore the caller's count."""

from __future__ import annotations

import pytest
import torch

from cirfusion import threads as T


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(T.ENV, raising=False)
    before = torch.get_num_threads()
    yield
    T.set_override(None)
    torch.set_num_threads(before)


def test_table_env_and_overrides_in_order(monkeypatch):
    assert T.threads_for("train") == 1 and T.threads_for("fuse") == 1
    assert T.threads_for("features") == T.usable_cores()
    monkeypatch.setenv(T.ENV, "3")
    assert T.threads_for("train") == 3 and T.threads_for("features") == 3
    T.set_override(2)
    assert T.threads_for("train") == 2 and torch.get_num_threads() == 2
    assert T.threads_for("train", 4) == 4  # a function's own argument wins
    T.set_override(None)
    assert T.threads_for("train") == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(T.ENV, bad)
        with pytest.raises(T.ThreadsError, match=T.ENV):
            T.threads_for("train")
    with pytest.raises(T.ThreadsError):
        T.threads_for("train", 0)
    monkeypatch.delenv(T.ENV)
    with pytest.raises(T.ThreadsError, match="unknown workload"):
        T.threads_for("bogus")  # type: ignore[arg-type]


def test_torch_threads_restores_the_callers_count():
    torch.set_num_threads(2)
    with T.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), T.torch_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_training_runs_on_one_thread_and_restores(tmp_path, monkeypatch):
    from cirfusion import train as train_mod
    from cirfusion.methods import create_method
    from test_train import make_toy, toy_dims

    seen = []
    orig = train_mod._train

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return orig(*a, **k)

    monkeypatch.setattr(train_mod, "_train", spy)
    tr, va = make_toy(tmp_path, files=False)
    torch.set_num_threads(2)
    cfg = train_mod.TrainConfig(epochs=1, batch_size=64)
    train_mod.train(create_method("clip4cir", toy_dims()), tr, va, tmp_path / "run", cfg)
    train_mod.train(create_method("clip4cir", toy_dims()), tr, va, tmp_path / "run2", cfg, threads=2)
    assert seen == [1, 2] and torch.get_num_threads() == 2
