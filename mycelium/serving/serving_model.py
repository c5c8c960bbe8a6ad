"""The MLflow pyfunc model of a mycelium checkpoint, logged as "models from code" (no pickle).

``serving.log_checkpoint`` logs this file as the model's code; MLflow executes it when the model
is loaded (``mlflow.pyfunc.load_model`` or ``mlflow models serve``), with the logged copy of the
``mycelium`` package (``code/mycelium.zip``) first on ``sys.path``. ``load_context`` loads the
checkpoint artifact; ``predict`` takes a DataFrame with the task's input columns and returns
``label`` (by the checkpoint's decision threshold for binary tasks) plus one ``prob_<LABEL>``
column per class.

Environment variables read when the model loads:

* ``MYCELIUM_DEVICE``: ``cpu``, ``cuda``, ``cuda:1``, ... (default: ``cuda`` when available)
* ``MYCELIUM_BACKBONE``: load the backbone from this folder / hub id instead of the one the
  checkpoint names (for checkpoints trained on a local backbone folder that was not bundled)
* ``MYCELIUM_BATCH_SIZE``: inference batch size (default 64)
"""

import os
import sys

# The model's own copy of the package (one zip: see ``serving.package_zip``), ahead of any other.
_CODE_ZIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "code", "mycelium.zip")
if os.path.isfile(_CODE_ZIP) and _CODE_ZIP not in sys.path:
    sys.path.insert(0, _CODE_ZIP)

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402

from mycelium.serving.package import MAX_ROWS, output_frame, validate_input  # noqa: F401  (MAX_ROWS: documented limit)


class MyceliumClassifier(mlflow.pyfunc.PythonModel):
    """Labels and class probabilities for raw task inputs (see ``mycelium.serving.package``)."""

    def load_context(self, context):
        import torch

        from mycelium.serving.checkpoint import load_checkpoint

        device = os.environ.get("MYCELIUM_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = int(os.environ.get("MYCELIUM_BATCH_SIZE") or 64)
        self.model, self.tokenizer, self.manifest = load_checkpoint(
            context.artifacts["checkpoint"],
            device=device,
            backbone_override=os.environ.get("MYCELIUM_BACKBONE") or None,
        )

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from mycelium.serving.checkpoint import predict_proba

        rows = validate_input(model_input, self.manifest)
        probs = predict_proba(self.model, self.tokenizer, self.manifest, rows, batch_size=self.batch_size)
        return output_frame(probs, self.manifest["labels"], self.manifest.get("threshold"))


mlflow.models.set_model(MyceliumClassifier())
