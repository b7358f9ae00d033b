"""Shared fixtures: where the sample data lives, and trained models to test against.

The sample radiographs are referenced by path (never copied): RADGATE_DATA and
RADGATE_EXTERNAL (set by the Makefile), else the folders beside the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_path(variable: str, default: Path) -> Path:
    path = Path(os.environ.get(variable) or default).resolve()
    if not path.is_dir():
        pytest.fail(f"{variable}: sample data folder {path} not found (see README, `make data`)")
    return path


@pytest.fixture(scope="session")
def sample_data_dir() -> Path:
    return _data_path("RADGATE_DATA", REPO.parent / "shared" / "data" / "chest-abd-xr")


@pytest.fixture(scope="session")
def external_data_dir() -> Path:
    return _data_path("RADGATE_EXTERNAL", REPO.parent / "shared" / "data" / "external-xr")


def _train(arguments: list[str]) -> None:
    from gateway.cli import main

    assert main(["train", *arguments]) == 0


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, sample_data_dir: Path) -> Path:
    """A small, fast, poorly trained model: enough for plumbing, not for accuracy."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    _train(["--data", str(sample_data_dir), "--out", str(out), "--epochs", "1", "--size", "64"])
    return out


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory, sample_data_dir: Path) -> Path:
    """The real default recipe, trained once per test session (a few minutes on 2 cores)."""
    out = tmp_path_factory.mktemp("models") / "chest-abd"
    _train(["--data", str(sample_data_dir), "--out", str(out)])
    return out
