"""Serving a trained model: the embedding export (:mod:`.export`), nearest-neighbour recommendations
(:mod:`.recommend`) and the MLflow pyfunc model (:mod:`.pyfunc`).

``from hllm.serving import HLLMRecommenderModel`` is the import line every registered version's
model code runs (``pyfunc._MODEL_CODE``): it stays valid, lazily, so importing ``hllm.serving.export``
does not import MLflow.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "HLLMRecommenderModel":
        from hllm.serving.pyfunc import HLLMRecommenderModel

        return HLLMRecommenderModel
    raise AttributeError(f"module 'hllm.serving' has no attribute {name!r}")
