"""What MLflow runs to load a logged make-dist model ("model from code"):
the model class is make_dist.serving's, so loading needs make-dist installed
(the model's requirements name it)."""

import mlflow.models

from make_dist.serving import ZeroShotModel

mlflow.models.set_model(ZeroShotModel())
