"""Resume state: an epoch's state goes live only once committed (after its version exists)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch

from mycelium.metrics import evaluate_predictions
from mycelium.train.resume import ResumeState


def _epoch(n: int, version=None):
    report = evaluate_predictions(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), ["A", "B"], "B", 0.9)
    return SimpleNamespace(epoch=n, train_loss=1.0 / n, val_loss=2.0 / n, version=version, report=report,
                           threshold={"label": "B", "value": 0.3 + n / 100}, argmax={"minority_f1": 0.5})


def test_saved_state_is_live_only_after_commit(tmp_path, monkeypatch):
    monkeypatch.setenv("MYCELIUM_STATE", str(tmp_path))
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    attempt = SimpleNamespace(index=1, name="frozen")

    epochs = [_epoch(1)]
    pending = ResumeState.save("parent", attempt, 1, model, optimizer, scaler, epochs)
    assert ResumeState.load("parent", attempt) is None  # not registered yet: a resume would redo epoch 1
    epochs[0].version = "7"  # registered on the tracking thread meanwhile
    ResumeState.commit(pending, epochs)
    state = ResumeState.load("parent", attempt)
    assert state is not None and not pending.exists()
    assert [e.version for e in state.epoch_results()] == ["7"]
    # The epoch's decision threshold comes back with it (a resumed run's winner keeps its rule).
    assert [e.threshold for e in state.epoch_results()] == [{"label": "B", "value": 0.31}]

    # Epoch 2 saved but its commit never came (killed): the live state still says epoch 1.
    epochs.append(_epoch(2))
    ResumeState.save("parent", attempt, 2, model, optimizer, scaler, epochs)
    restored = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(restored.parameters(), fused=True)
    assert ResumeState.load("parent", attempt).restore(restored, opt2, scaler) == 1
    assert torch.equal(restored.weight, model.weight)
    assert json.loads((state.path / "state.json").read_text())["epoch"] == 1

    ResumeState.clear("parent")
    assert ResumeState.load("parent", attempt) is None
