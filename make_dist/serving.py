"""The trained model as an MLflow model: images in, zero-shot probabilities
or embeddings out, loadable anywhere make-dist is installed.

    model = mlflow.pyfunc.load_model("models:/derm-make/1")
    model.predict(pd.DataFrame({"image": [png_bytes, ...]}), params={"classes": ["psoriasis", "eczema"]})

Input: a column `image` of encoded image files (bytes: PNG, JPEG, ...).
Params: `classes` (two or more names: each becomes the mean of the paper's 8
skin templates) or `prompts` (two or more texts used as they are); or
`output = embeddings` alone for the normalised image embeddings. Output: one
row per image, one column per class or prompt (softmax of 100 x cosine, the
paper's zero-shot scale), or columns 0..D-1 of the embedding. A bad request
(no classes, both lists, a name twice, one class, an unknown output, an image
that does not decode) is refused with HTTP 400 naming the parameter or row;
a class list's text embeddings are computed once and kept.

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


OUTPUTS = ("probabilities", "embeddings")


def bad_request(message: str) -> Exception:
    """An error MLflow's scoring server answers with HTTP 400 and this message."""
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


class ZeroShotModel(mlflow.pyfunc.PythonModel):
    CACHED = 32  # class lists whose text embeddings are kept (a caller sends the same list again and again)

    def load_context(self, context):
        import open_clip

        name = f"local-dir:{context.artifacts[WEIGHTS_ARTIFACT]}"
        self.clip, _, self.preprocess = open_clip.create_model_and_transforms(name)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.clip.eval()
        self._texts_of: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def _texts(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(self.tokenizer(texts)).float(), dim=-1)

    def _columns(self, kind: str, names: list[str]) -> torch.Tensor:
        """The text side of a request, encoded once per list: the classes' template means, or the prompts."""
        key = (kind, *names)
        if key not in self._texts_of:
            if len(self._texts_of) >= self.CACHED:
                self._texts_of.pop(next(iter(self._texts_of)))
            self._texts_of[key] = class_embeddings(self._texts, names) if kind == "classes" else self._texts(names)
        return self._texts_of[key]

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        kind, names, output = request(params)
        images = torch.stack([self.preprocess(decode(data, row)) for row, data in enumerate(model_input["image"])])
        embeddings = F.normalize(self.clip.encode_image(images).float(), dim=-1)
        if output == "embeddings":
            return pd.DataFrame(embeddings.numpy())
        return pd.DataFrame((CLASSIFY_SCALE * embeddings @ self._columns(kind, names).T).softmax(1).numpy(),
                            columns=names)


def request(params: dict | None) -> tuple[str | None, list[str], str]:
    """(classes | prompts | None, their names, the output) of a request's
    params, each bad one refused naming the parameter. A parameter the
    signature does not name never reaches the model (MLflow drops it, with a
    warning in the server's log), so embeddings are only ever given when
    asked for: a misspelt `classes` is refused as a request with none."""
    params = params or {}
    output = params.get("output") or "probabilities"
    if output not in OUTPUTS:
        raise bad_request(f"params.output = {output!r}: expected one of {', '.join(OUTPUTS)}")
    classes = [c for c in params.get("classes") or [] if c]  # list params default to [""]: MLflow's schema wants one
    prompts = [p for p in params.get("prompts") or [] if p]
    if classes and prompts:
        raise bad_request("params.classes and params.prompts both given: send one (class names are put in the "
                          "paper's templates, prompts are used as written)")
    kind, names = ("classes", classes) if classes else ("prompts", prompts) if prompts else (None, [])
    if output == "embeddings":
        if names:
            raise bad_request(f"params.output = embeddings takes no params.{kind}: leave them out, or ask for "
                              f"probabilities")
        return None, [], output
    if not names:  # a misspelt `classes` lands here too (MLflow drops names its signature lacks)
        raise bad_request("no params.classes or params.prompts: send class names (or prompts) for zero-shot "
                          "probabilities, or params.output = embeddings for the image embeddings")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise bad_request(f"params.{kind} names {', '.join(map(repr, twice))} more than once: each column must be "
                          f"named once")
    if len(names) == 1:
        raise bad_request(f"params.{kind} names one text ({names[0]!r}): a softmax over one always gives 1.0; send "
                          f"two or more, or ask for output = embeddings")
    return kind, names, output


def decode(data, row: int):
    """The RGB image of one request row, or a 400 naming the row."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(bytes(data))).convert("RGB")
    except (UnidentifiedImageError, OSError, TypeError, ValueError) as e:
        raise bad_request(f"image of row {row}: not a readable image file ({type(e).__name__}: {e})") from None


def signature():
    """Images in; params as the module says; out, a float32 table of one row per
    image (its columns the classes or prompts asked for, or the embedding's D)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1), "scores")]),
        params=ParamSchema([ParamSpec("classes", DataType.string, [""], shape=(-1,)),
                            ParamSpec("prompts", DataType.string, [""], shape=(-1,)),
                            ParamSpec("output", DataType.string, "probabilities")]))


def log_model(run, export_dir: str, register: str | None = None, metrics: dict[str, float] | None = None,
              step: int = 0, name: str = "model") -> str:
    """Log the export at `export_dir` (a local folder or any URL) on an MLflow
    run as a pyfunc Logged Model named `name` (the objective it was trained
    with: make, clip, clip-knowledge), link the run's final metrics to it
    (logged again at their own step, so the curves gain no new point), and
    register it under `register` if named; returns the model's URI."""
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
            artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run.id,
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
