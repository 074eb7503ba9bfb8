"""The trained model as an MLflow pyfunc model: saved and loaded with MLflow's
own code (the tiny model's export inside), and bad requests refused as HTTP
400 errors naming the parameter or the row. Logged to a run and registered
through a real MLflow server: test_object_storage.py."""

import io
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from make_dist.config import ModelConfig
from make_dist.model import build_model, export_open_clip
from make_dist.serving import ENTRY, WEIGHTS_ARTIFACT, _requirements, input_example, signature


def png(colour=(200, 150, 130)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The pyfunc model as MLflow saves and loads it (no tracking store)."""
    root = tmp_path_factory.mktemp("serving")
    torch.manual_seed(0)
    export = export_open_clip(build_model(ModelConfig(name="make-micro")), str(root / "export"))
    mlflow.pyfunc.save_model(str(root / "model"), python_model=ENTRY, artifacts={WEIGHTS_ARTIFACT: str(export)},
                             signature=signature(), input_example=input_example(), pip_requirements=_requirements())
    model = mlflow.pyfunc.load_model(str(root / "model"))
    model.saved_at = root / "model"
    return model


def images(n=2):
    return pd.DataFrame({"image": [png((40 * i, 90, 90)) for i in range(n)]})


def test_the_signature_tells_a_caller_the_request_and_the_answer(served):
    meta = served.metadata
    assert meta.get_input_schema().input_names() == ["image"]
    (scores,) = meta.get_output_schema().inputs
    assert (scores.name, scores.type, scores.shape) == ("scores", np.dtype(np.float32), (-1, -1))
    assert {p.name for p in meta.get_params_schema().params} == {"classes", "prompts", "output"}
    example = json.loads((served.saved_at / "serving_input_example.json").read_text())  # what the UI shows a caller
    assert example["params"] == {"classes": ["psoriasis", "eczema"]} and example["dataframe_split"]["columns"] == [
        "image"]


def test_classes_give_probabilities_and_no_params_the_embeddings(served):
    out = served.predict(images(), params={"classes": ["psoriasis", "eczema", "melanoma"]})
    assert list(out.columns) == ["psoriasis", "eczema", "melanoma"] and out.shape == (2, 3)
    assert out.sum(axis=1).round(5).tolist() == [1.0, 1.0]
    embedded = served.predict(images(), params={"output": "embeddings"})
    assert embedded.shape[0] == 2 and (embedded.pow(2).sum(axis=1).round(4) == 1.0).all()
    prompts = served.predict(images(), params={"prompts": ["a red plaque", "a dark mole"]})
    assert list(prompts.columns) == ["a red plaque", "a dark mole"]


@pytest.mark.parametrize("params,said", [
    ({}, "no params.classes or params.prompts: send class names"),
    ({"clases": ["psoriasis", "eczema"]}, "no params.classes or params.prompts"),  # misspelt: MLflow drops it
    ({"output": "embedding"}, "params.output = 'embedding': expected one of probabilities, embeddings"),
    ({"classes": ["psoriasis", "eczema"], "prompts": ["a red plaque", "a mole"]},
     "params.classes and params.prompts both given"),
    ({"classes": ["psoriasis", "eczema", "psoriasis"]}, "params.classes names 'psoriasis' more than once"),
    ({"classes": ["psoriasis"]}, "params.classes names one text ('psoriasis'): a softmax over one always gives 1.0"),
    ({"classes": ["psoriasis", "eczema"], "output": "embeddings"}, "params.output = embeddings takes no params.classes"),
])
def test_bad_params_are_refused_naming_the_parameter(served, params, said):
    with pytest.raises(MlflowException) as refused:
        served.predict(images(), params=params)
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"  # the scoring server's HTTP 400
    assert said in refused.value.message


def test_an_undecodable_image_is_refused_naming_its_row(served):
    frame = pd.DataFrame({"image": [png(), b"not an image at all"]})
    with pytest.raises(MlflowException) as refused:
        served.predict(frame, params={"classes": ["psoriasis", "eczema"]})
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    assert refused.value.message.startswith("image of row 1: not a readable image file (UnidentifiedImageError")


def test_a_class_list_is_encoded_once(served, monkeypatch):
    """The class texts (8 templates a class) cost 20-40x an embeddings request
    when encoded on every request: the model keeps them per list."""
    model = served.unwrap_python_model()
    calls = []
    encode = model.clip.encode_text
    monkeypatch.setattr(model.clip, "encode_text", lambda tokens: calls.append(len(tokens)) or encode(tokens))
    classes = {"classes": ["psoriasis", "eczema", "acne"]}
    first = served.predict(images(), params=classes)
    again = served.predict(images(), params=classes)
    assert calls == [3 * 8] and first.equals(again)
    served.predict(images(), params={"classes": ["acne", "psoriasis", "eczema"]})  # another list: encoded
    assert calls == [3 * 8, 3 * 8]


@pytest.mark.slow
def test_mlflow_models_serve_answers_bad_requests_with_400(served, tmp_path):
    """The documented command (the environment's bin on PATH: MLflow starts
    `uvicorn` by name), real HTTP requests: a good one, and bad ones refused
    with 400 and a body naming the parameter or the row."""
    import base64
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from conftest import free_port

    port = free_port()
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([f"{bin_dir}/mlflow", "models", "serve", "-m", str(served.saved_at), "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)

    def ask(params, image=png()):
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]},
                           "params": params}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
        status, answer = ask({"classes": ["psoriasis", "eczema"]})
        assert status == 200 and set(answer["predictions"][0]) == {"psoriasis", "eczema"}
        for params, said in (({"clases": ["psoriasis", "eczema"]}, "no params.classes or params.prompts"),
                             ({"classes": ["psoriasis", "psoriasis"]}, "params.classes names 'psoriasis' more"),
                             ({"output": "embedding"}, "params.output = 'embedding'")):
            status, answer = ask(params)
            assert status == 400 and said in answer["message"], (params, status, answer)
        status, answer = ask({"classes": ["psoriasis", "eczema"]}, image=b"\x89PNG broken")
        assert status == 400 and "Error: image of row 0: not a readable image file" in answer["message"]
        assert "Traceback" not in answer["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
