"""Figures drawn in the helper process: PNG bytes from another process, errors raised to the caller
as the in-process drawing would raise them, and in-process drawing when the helper cannot run."""

from __future__ import annotations

import logging
import os

import pytest

from mycelium.tracking.figure_worker import FigureWorker, render

PNG = b"\x89PNG\r\n\x1a\n"
C6 = ["INTEGER", "FRACTION", "RADICAL"]


@pytest.fixture
def worker():
    w = FigureWorker()
    yield w
    w.close()


def test_helper_process_draws_each_kind(worker):
    worker.start()
    pid = worker.pid
    assert pid is not None and pid != os.getpid()
    confusion = worker.png("confusion_matrix", confusion=[[5, 1, 0], [2, 3, 0], [0, 0, 4]], labels=C6, title="epoch 1")
    counts = worker.png("class_distribution", counts={"train": {"INTEGER": 90, "SET": 3}, "val": {"INTEGER": 9, "SET": 1}})
    metrics = {f"{k}_{label}": 0.5 for k in ("f1", "pred_share", "true_share") for label in C6}
    attempts = worker.png("attempts", attempts={"1-clipped": {**metrics, "macro_f1": 0.5}}, labels=C6)
    for data in (confusion, counts, attempts):
        assert data[:8] == PNG and len(data) > 5000
    assert worker.pid == pid  # one helper serves every figure
    # The same picture as drawing it here.
    assert confusion == render("confusion_matrix", confusion=[[5, 1, 0], [2, 3, 0], [0, 0, 4]], labels=C6, title="epoch 1")
    worker.close()
    assert worker.pid is None


def test_bad_arguments_raise_like_in_process(worker):
    with pytest.raises(ValueError, match=r"confusion matrix of shape \(1, 2\) for 3 labels"):
        worker.png("confusion_matrix", confusion=[[1, 2]], labels=C6)
    with pytest.raises(ValueError, match="unknown figure kind 'pie'"):
        worker.png("pie")
    # The helper survives a bad request.
    assert worker.png("confusion_matrix", confusion=[[1, 0], [0, 1]], labels=C6[:2])[:8] == PNG


def test_draws_in_process_when_the_helper_cannot_start(worker, monkeypatch, caplog):
    monkeypatch.setattr("sys.executable", os.path.join(os.sep, "nonexistent", "python"))
    with caplog.at_level(logging.WARNING, logger="mycelium.tracking.figure_worker"):
        data = worker.png("confusion_matrix", confusion=[[1, 0], [0, 1]], labels=C6[:2])
    assert data[:8] == PNG
    assert worker.pid is None
    assert "drawing figures in the training process" in caplog.text
