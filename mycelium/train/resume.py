"""Local resume state: what a killed run needs to continue from its last completed epoch.

After every epoch the trainable weights, the optimizer and grad-scaler state and the epoch
results so far are written (safetensors + JSON, no pickle) under
``$MYCELIUM_STATE/resume/<parent run id>/attempt-<n>/`` (``.mycelium`` by default). With
``-P resume=true`` the trainer reopens the same MLflow runs and restores this state; versions
already registered for an epoch are found by tag and not registered again.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mycelium.config import state_root
from mycelium.metrics import EpochReport


def _root() -> Path:
    return state_root() / "resume"


def _dir(parent_run_id: str, attempt_index: int) -> Path:
    return _root() / parent_run_id / f"attempt-{attempt_index}"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, per_param in state["state"].items():
        for k, v in per_param.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


@dataclass
class ResumeState:
    path: Path

    # -- writing -------------------------------------------------------------------------------

    @staticmethod
    def save(parent_run_id: str, attempt, epoch: int, model, optimizer, scaler, epochs: list) -> Path:
        """Write the state after ``epoch`` beside the live one; ``commit`` makes it the live state
        once the epoch's checkpoint is registered, so a resume never skips an unregistered epoch."""
        d = _dir(parent_run_id, attempt.index)
        tmp = d.with_name(f"{d.name}.epoch-{epoch}.pending")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, tmp / "trainable.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        rng = torch.get_rng_state()
        save_file({"torch_rng": rng}, tmp / "rng.safetensors")
        meta = {
            "epoch": epoch,
            "attempt": attempt.name,
            "optimizer": opt_meta,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "epochs": [
                {"epoch": e.epoch, "train_loss": e.train_loss, "val_loss": e.val_loss, "version": e.version, "report": e.report.to_dict(),
                 "threshold": e.threshold, "argmax": e.argmax}
                for e in epochs
            ],
        }
        (tmp / "state.json").write_text(json.dumps(meta))
        return tmp

    @staticmethod
    def commit(pending: Path, epochs: list) -> None:
        """Make a ``save``d state the live one, with the versions registered since it was written."""
        meta = json.loads((pending / "state.json").read_text())
        versions = {e.epoch: e.version for e in epochs}
        for e in meta["epochs"]:
            e["version"] = versions.get(e["epoch"], e["version"])
        (pending / "state.json").write_text(json.dumps(meta))
        live = pending.with_name(pending.name.split(".", 1)[0])
        shutil.rmtree(live, ignore_errors=True)
        os.replace(pending, live)

    @staticmethod
    def clear(parent_run_id: str) -> None:
        shutil.rmtree(_root() / parent_run_id, ignore_errors=True)

    # -- reading -------------------------------------------------------------------------------

    @staticmethod
    def load(parent_run_id: str, attempt) -> ResumeState | None:
        d = _dir(parent_run_id, attempt.index)
        return ResumeState(d) if (d / "state.json").exists() else None

    def _meta(self) -> dict:
        return json.loads((self.path / "state.json").read_text())

    def restore(self, model, optimizer, scaler) -> int:
        """Load weights and optimizer state into the live objects; returns the last completed epoch."""
        meta = self._meta()
        weights = load_file(self.path / "trainable.safetensors")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(_unflatten_optimizer(load_file(self.path / "optimizer.safetensors"), meta["optimizer"]))
        if meta["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(meta["scaler"])
        torch.set_rng_state(load_file(self.path / "rng.safetensors")["torch_rng"])
        return int(meta["epoch"])

    def epoch_results(self) -> list:
        from mycelium.train.loop import EpochResult

        return [
            EpochResult(e["epoch"], EpochReport.from_dict(e["report"]), e["train_loss"], e["val_loss"], e["version"], np.empty((0, 0)),
                        e.get("threshold"), e.get("argmax", {}))
            for e in self._meta()["epochs"]
        ]

    @staticmethod
    def finished_attempt(run, attempt, prep):
        """An attempt that completed before the kill: its results from the local state."""
        from mycelium.train.attempts import AttemptResult

        parent = run.data.tags["mlflow.parentRunId"]
        state = ResumeState.load(parent, attempt)
        if state is None:
            raise RuntimeError(
                f"attempt {attempt.name} of run {parent} finished, but its local resume state is gone; start a new run without -P resume=true"
            )
        return AttemptResult(attempt, run.info.run_id, state.epoch_results())
