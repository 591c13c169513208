"""Fixtures of the MLflow tests (tracking and registry): real SQLite stores, one per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.mlflow_stores import new_store


@pytest.fixture(scope="session")
def empty_store_db(tmp_path_factory) -> Path:
    """An initialised MLflow SQLite database. Creating the schema takes seconds; copying it does
    not, so each test gets its own real store for the price of a file copy."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(tmp_path, empty_store_db):
    return new_store(tmp_path / "store", empty_store_db)
