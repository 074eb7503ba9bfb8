"""The trained model as an MLflow model: images in, zero-shot probabilities
or embeddings out, loadable anywhere make-dist is installed.

    model = mlflow.pyfunc.load_model("models:/derm-make/1")
    model.predict(pd.DataFrame({"image": [png_bytes, ...]}), params={"classes": ["psoriasis", "eczema"]})

Input: a column `image` of encoded image files (bytes: PNG, JPEG, ...).
Params: `classes` (names: each becomes the mean of the paper's 8 skin
templates) or `prompts` (texts used as they are); neither, or `output =
embeddings`, gives the normalised image embeddings. Output: one row per
image, one column per class or prompt (softmax of 100 x cosine, the paper's
zero-shot scale), or columns 0..D-1 of the embedding.

The weights travel as the open_clip export (`open_clip_config.json` +
weights), so the model also loads with open_clip alone. The model's code
travels as MLflow's "model from code" (make_dist/serving_entry.py, run at
load), not as a pickle; an input example (one small image and two classes)
shows a caller the request and is checked by MLflow against the model at
logging.
"""

from __future__ import annotations

import io
import os
import tempfile

import mlflow.pyfunc
import pandas as pd
import torch
import torch.nn.functional as F

from .evaluate.paper import CLASSIFY_SCALE, class_embeddings

WEIGHTS_ARTIFACT = "open_clip"  # the export folder, inside the MLflow model
ENTRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serving_entry.py")  # MLflow runs it at load


class ZeroShotModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import open_clip

        name = f"local-dir:{context.artifacts[WEIGHTS_ARTIFACT]}"
        self.clip, _, self.preprocess = open_clip.create_model_and_transforms(name)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.clip.eval()

    @torch.no_grad()
    def _texts(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(self.tokenizer(texts)).float(), dim=-1)

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from PIL import Image

        params = params or {}
        images = torch.stack([self.preprocess(Image.open(io.BytesIO(bytes(data))).convert("RGB"))
                              for data in model_input["image"]])
        embeddings = F.normalize(self.clip.encode_image(images).float(), dim=-1)
        # list params default to [""] (MLflow's schema wants a default of the type)
        classes = [c for c in params.get("classes") or [] if c]
        prompts = [p for p in params.get("prompts") or [] if p]
        if params.get("output") == "embeddings" or not (classes or prompts):
            return pd.DataFrame(embeddings.numpy())
        names = classes or prompts
        texts = class_embeddings(self._texts, classes) if classes else self._texts(prompts)
        return pd.DataFrame((CLASSIFY_SCALE * embeddings @ texts.T).softmax(1).numpy(), columns=names)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, "image")]),
        params=ParamSchema([ParamSpec("classes", DataType.string, [""], shape=(-1,)),
                            ParamSpec("prompts", DataType.string, [""], shape=(-1,)),
                            ParamSpec("output", DataType.string, "probabilities")]))


def log_model(run, export_dir: str, register: str | None = None, metrics: dict[str, float] | None = None,
              step: int = 0) -> str:
    """Log the export at `export_dir` (a local folder or any URL) on an MLflow
    run as a pyfunc Logged Model, link the run's final metrics to it (logged
    again at their own step, so the curves gain no new point), and register
    it under `register` if named; returns the model's URI."""
    import fsspec

    mlflow.set_tracking_uri(run.uri)  # the driver's own store: the fluent API below reads it
    # and the run's experiment: Model.log(run_id=...) alone files the model under the Default experiment,
    # where the run's page, the runs table and the experiment's Models tab never show it
    mlflow.set_experiment(experiment_id=run.client.get_run(run.id).info.experiment_id)
    with tempfile.TemporaryDirectory() as tmp:
        fs, path = fsspec.core.url_to_fs(export_dir)
        local = os.path.join(tmp, "export")
        fs.get(path.rstrip("/") + "/", local, recursive=True)
        info = mlflow.models.Model.log(
            artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run.id,
            python_model=ENTRY, artifacts={WEIGHTS_ARTIFACT: local}, signature=signature(),
            input_example=input_example(), registered_model_name=register, step=step,
            pip_requirements=_requirements())
    # MLflow links the run's metrics at `step` to the model; one absent there (a last
    # evaluation at another step) is linked here.
    linked = {m.key for m in mlflow.get_logged_model(info.model_id).metrics or []}
    missing = {k: v for k, v in (metrics or {}).items() if v == v and k not in linked}
    if missing:
        mlflow.log_metrics(missing, step=step, run_id=run.id, model_id=info.model_id)
    return info.model_uri


def input_example() -> tuple[pd.DataFrame, dict]:
    """A request as a caller sends it: one encoded image (a plain 32-px PNG) and two classes."""
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 150, 130)).save(png, format="PNG")
    return pd.DataFrame({"image": [png.getvalue()]}), {"classes": ["psoriasis", "eczema"]}


def _requirements() -> list[str]:
    """What loading the model needs, pinned to this environment. Named here:
    MLflow would otherwise infer them by loading the model in a subprocess
    (minutes on a CPU). A package that is not installed as a distribution
    (make-dist from a Ray job's working directory, MLflow as mlflow-skinny)
    is left out rather than guessed."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for name in ("make-dist", "torch", "open_clip_torch", "mlflow"):
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pass
    return pinned
