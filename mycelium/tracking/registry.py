"""The model registry: registered models, version tags and the ``champion`` alias decision."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mycelium.tasks import CHAMPION




def existing_version(model_name: str, run_id: str, epoch: int):
    """The version already registered for (run, epoch), so a resumed run never registers twice."""
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    for v in versions:
        if v.tags.get("epoch") == str(epoch):
            return v
    return None


def tag_version(model_name: str, version: str, tags: dict[str, object]) -> None:
    """Set tags on a model version. The registry API takes one tag per request; they go out in
    parallel instead of one after another."""
    from concurrent.futures import ThreadPoolExecutor

    client = MlflowClient()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda kv: client.set_model_version_tag(model_name, version, kv[0], str(kv[1])), tags.items()))


@dataclass
class Candidate:
    """The version a run would promote, with the numbers that decide."""

    version: str
    metric_name: str
    metric: float
    fingerprint: str


@dataclass
class Decision:
    promoted: bool
    reason: str
    previous_version: str | None
    previous_metric: float | None

    def as_tags(self) -> dict[str, str]:
        return {
            "champion_decision": "promoted" if self.promoted else "kept",
            "champion_reason": self.reason,
            "champion_previous_version": str(self.previous_version),
            "champion_previous_metric": "" if self.previous_metric is None else f"{self.previous_metric:.6f}",
        }


def current_champion(model_name: str):
    try:
        return MlflowClient().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def decide_promotion(model_name: str, candidate: Candidate | None, rescore_champion=None, min_metric: float = 0.0) -> Decision:
    """Move ``champion`` only to a better version on the same validation data, and never to one
    below ``min_metric`` (the quality gate; 0 = none).

    ``rescore_champion(version) -> float | None`` evaluates the current champion on this run's
    validation data when it was measured on other data (a different fingerprint); None means it
    could not be scored, and then the alias stays where it is.
    """
    if candidate is None:
        return Decision(False, "every epoch of every attempt collapsed: nothing to promote", None, None)
    champ = current_champion(model_name)
    if candidate.metric < min_metric:
        return Decision(False, f"{candidate.metric_name} {candidate.metric:.4f} is below min_metric {min_metric:g}: not promoted",
                        champ.version if champ else None, None)
    if champ is None:
        decision = Decision(True, "no champion yet", None, None)
    else:
        prev_metric: float | None
        if champ.tags.get("data_fingerprint") == candidate.fingerprint and candidate.metric_name in champ.tags:
            prev_metric = float(champ.tags[candidate.metric_name])
            where = "same data fingerprint"
        else:
            prev_metric = rescore_champion(champ) if rescore_champion else None
            where = "champion re-scored on this run's validation data"
        if prev_metric is None:
            return Decision(False, f"champion v{champ.version} could not be compared on this data; alias kept", champ.version, None)
        if candidate.metric > prev_metric:
            decision = Decision(
                True, f"{candidate.metric_name} {candidate.metric:.4f} > {prev_metric:.4f} of v{champ.version} ({where})",
                champ.version, prev_metric,
            )
        else:
            return Decision(
                False, f"{candidate.metric_name} {candidate.metric:.4f} <= {prev_metric:.4f} of v{champ.version} ({where})",
                champ.version, prev_metric,
            )
    MlflowClient().set_registered_model_alias(model_name, CHAMPION, candidate.version)
    return decision


def ensure_registered_model(name: str, description: str) -> None:
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=description)
        except MlflowException:
            pass  # created concurrently

