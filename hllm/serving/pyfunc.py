"""The registered pyfunc model ``hllm-recommender``: :class:`hllm.serving.recommend.Recommender` behind MLflow.

It is built on ``Recommender`` so that ``mlflow.pyfunc.load_model("models:/hllm-recommender@champion")``
and ``hllm recommend`` answer the same for the same checkpoint by construction.

MLflow "models from code": the model is a three-line script (written at save time) that imports
:class:`HLLMRecommenderModel` from the bundled ``hllm`` package; nothing is pickled. The model
folder holds, as pyfunc artifacts::

    export/       the export (item + user embeddings, FAISS index, id maps, seen items, manifest)
    checkpoint/   model.safetensors (Item LLM + User LLM weights) and meta.json (resolved config);
                  only with a checkpoint: needed for user histories (``for_history``)
    built/        items/users/sequences parquet + stats.json: the id mapping and item text the
                  model is rebuilt over (``hllm.models.loading.load_model``)
    hf_item, hf_user   config + tokenizer of the towers that were loaded from a folder (no weights:
                  they come from model.safetensors), so serving needs no model hub or training tree
    code/hllm     this package's source (``code_paths``), so the model runs with the code it was
                  registered with

Input (a DataFrame, one request per row): ``user_id`` (a known user: their exported vector and
seen items) or ``history`` (a list of item ids: scored by the User LLM). Params: ``k`` (default 10),
``exclude_seen`` (default True). Output: ``item_ids`` (list of str) and ``scores`` (list of float),
best first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.pyfunc import PythonModel

log = logging.getLogger(__name__)

BUILT_FILES = ("items.parquet", "users.parquet", "sequences.parquet", "stats.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ot", ".gguf")

# What the model needs at serving time (distribution name, as pip spells it).
_REQUIREMENTS = (
    "mlflow",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "faiss-cpu",
    "numpy",
    "pandas",
    "pyarrow",
    "pyyaml",
    "tqdm",
)

_MODEL_CODE = """\
# MLflow "models from code" entry point for hllm-recommender (written by hllm.serving.pyfunc.save_pyfunc).
from mlflow.models import set_model

from hllm.serving import HLLMRecommenderModel

set_model(HLLMRecommenderModel())
"""


def pip_requirements() -> list[str]:
    """Pinned to this environment (explicit: inferring them costs ~10 s per log_model)."""
    out = []
    for dist in _REQUIREMENTS:
        try:
            v = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        out.append(f"{dist}=={v.split('+')[0]}")  # torch 2.13.0+cpu -> 2.13.0
    return out


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema(
            [ColSpec("string", "user_id", required=False), ColSpec(Array("string"), "history", required=False)]
        ),
        outputs=Schema([ColSpec(Array("string"), "item_ids"), ColSpec(Array("double"), "scores")]),
        params=ParamSchema([ParamSpec("k", "long", 10), ParamSpec("exclude_seen", "boolean", True)]),
    )


# --------------------------------------------------------------------------- the model


class HLLMRecommenderModel(PythonModel):
    def load_context(self, context) -> None:
        from hllm.serving.recommend import Recommender

        arts = context.artifacts
        self._tmp = None
        if "checkpoint" in arts:
            self._tmp = tempfile.TemporaryDirectory(prefix="hllm-serving-")
            ckpt = runtime_checkpoint(arts, Path(self._tmp.name))
            self.recommender = Recommender.from_export(arts["export"], checkpoint=ckpt)
        else:
            self.recommender = Recommender.from_export(arts["export"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = params or {}
        k = int(params.get("k", 10))
        exclude_seen = bool(params.get("exclude_seen", True))
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return pd.DataFrame(recommend_rows(self.recommender, df, k, exclude_seen))


def _has_history(h: Any) -> bool:
    if h is None:
        return False
    try:
        return len(h) > 0
    except TypeError:  # NaN from a missing cell
        return False


def recommend_rows(rec, df, k: int, exclude_seen: bool = True) -> dict[str, list]:
    """Top-``k`` per request row; ``history`` rows are scored in batches through the User LLM."""
    n = len(df)
    histories: list[Any] = df["history"].tolist() if "history" in df.columns else [None] * n
    users: list[Any] = df["user_id"].tolist() if "user_id" in df.columns else [None] * n
    item_ids: list[list[str]] = [[] for _ in range(n)]
    scores: list[list[float]] = [[] for _ in range(n)]
    hist_rows = [i for i in range(n) if _has_history(histories[i])]
    if hist_rows:
        rows, sc = rec.for_histories([[str(x) for x in histories[i]] for i in hist_rows], k, exclude_seen)
        for j, i in enumerate(hist_rows):
            keep = rows[j] >= 0
            item_ids[i] = [str(x) for x in rec.item_ids[rows[j][keep]]]
            scores[i] = [float(x) for x in sc[j][keep]]
    for i in range(n):
        if i in hist_rows:
            continue
        u = users[i]
        if u is None or (isinstance(u, float) and u != u):
            raise ValueError(f"request row {i}: give a user_id or a non-empty history")
        recs = rec.for_user(str(u), k, exclude_seen)
        item_ids[i] = [r.item_id for r in recs]
        scores[i] = [r.score for r in recs]
    return {"item_ids": item_ids, "scores": scores}


def runtime_checkpoint(arts: dict[str, str], work: Path, built_dir: str | Path | None = None) -> Path:
    """A loadable checkpoint over the bundled files: the weights (linked, not copied) and meta.json
    with the tower paths and ``paths.built_dir`` pointed at the bundle (or at ``built_dir``, e.g. to
    evaluate the model on newer data). The bundle itself is never written to (it may be a shared,
    read-only download); the token cache is rebuilt under ``work``."""
    src = Path(arts["checkpoint"])
    ckpt = work / "checkpoint"
    ckpt.mkdir(parents=True)
    _link(src / "model.safetensors", ckpt / "model.safetensors")
    meta = json.loads((src / "meta.json").read_text())
    model_cfg = meta["config"]["model"]
    for tower in ("item", "user"):
        if f"hf_{tower}" in arts:
            model_cfg[tower]["path"] = arts[f"hf_{tower}"]
    built = work / "built"
    built.mkdir()
    src_built = Path(built_dir) if built_dir is not None else Path(arts["built"])
    for name in BUILT_FILES:
        if (src_built / name).exists():
            _link(src_built / name, built / name)
    meta["config"]["paths"]["built_dir"] = str(built)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return ckpt


def _link(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------- saving


def _bundle_tower(path: str, dst: Path, tokenizer: bool) -> None:
    """Config (+ tokenizer) of an HF tower, without weights: ``save_pretrained`` handles folders,
    the ``pkg:`` default and cached hub ids alike."""
    from transformers import AutoConfig, AutoTokenizer

    from hllm.pretrained import resolve_path

    resolved = resolve_path(path)
    AutoConfig.from_pretrained(resolved).save_pretrained(dst)
    if tokenizer:
        AutoTokenizer.from_pretrained(resolved).save_pretrained(dst)
    leaked = [p.name for p in dst.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)]
    if leaked:
        raise RuntimeError(f"{dst}: weight files {leaked} in a config-only bundle")


def stage_artifacts(work: Path, export_dir: str | Path, checkpoint_dir: str | Path | None) -> dict[str, str]:
    """Gather the pyfunc artifacts under ``work``; returns name -> local path."""
    from hllm.serving.export import MANIFEST, verify_export

    export_dir = Path(export_dir)
    if not (export_dir / MANIFEST).is_file():
        raise FileNotFoundError(f"{export_dir}: not an export (no {MANIFEST}); run `hllm export` first")
    verify_export(export_dir)  # a truncated or corrupted export file is refused by name, never registered
    # MLflow names each artifact folder after its source's basename: stage every one under its own name
    arts = {"export": str(work / "export")}
    shutil.copytree(export_dir, work / "export")
    if checkpoint_dir is None:
        return arts
    from hllm.evaluation.item_cache import checkpoint_fingerprint
    from hllm.models.loading import read_meta

    ckpt = Path(checkpoint_dir)
    meta = read_meta(ckpt)
    manifest = json.loads((export_dir / MANIFEST).read_text())
    want = manifest.get("model", {}).get("fingerprint")
    if want and want != checkpoint_fingerprint(ckpt):
        raise ValueError(
            f"checkpoint {ckpt} is not the one export {export_dir} was made from "
            f"(fingerprint {checkpoint_fingerprint(ckpt)} != {want}); nothing registered"
        )
    out = work / "checkpoint"
    out.mkdir(parents=True)
    for name in ("model.safetensors", "meta.json"):
        shutil.copy2(ckpt / name, out / name)
    arts["checkpoint"] = str(out)

    cfg = meta["config"]
    built_src = Path(cfg["paths"]["built_dir"])
    if not (built_src / "items.parquet").is_file():
        raise FileNotFoundError(
            f"{built_src}: the built dataset the checkpoint was trained on is missing "
            "(needed to rebuild the model); nothing registered"
        )
    built = work / "built"
    built.mkdir()
    for name in BUILT_FILES:
        if (built_src / name).exists():
            shutil.copy2(built_src / name, built / name)
    arts["built"] = str(built)
    for tower, needs_tok in (("item", True), ("user", False)):
        path = cfg["model"][tower].get("path")
        if path:
            _bundle_tower(path, work / f"hf_{tower}", needs_tok)
            arts[f"hf_{tower}"] = str(work / f"hf_{tower}")
    return arts


def input_example(export_dir: str | Path, with_history: bool) -> pd.DataFrame:
    """A real request from the export: one known user, and (with a checkpoint) one item history."""
    users = pd.read_parquet(Path(export_dir) / "users.parquet", columns=["user_id"])["user_id"]
    items = pd.read_parquet(Path(export_dir) / "items.parquet", columns=["item_id"])["item_id"]
    rows: list[dict[str, Any]] = [{"user_id": str(users.iloc[0]), "history": None}]
    if with_history:
        rows.append({"user_id": None, "history": [str(x) for x in items.iloc[:3]]})
    return pd.DataFrame(rows)


def save_pyfunc(path: str | Path, export_dir: str | Path, checkpoint_dir: str | Path | None = None) -> Path:
    """Write the pyfunc model folder to ``path`` (must not exist or be empty)."""
    import mlflow.pyfunc

    import hllm

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="hllm-pyfunc-") as tmp:
        work = Path(tmp)
        arts = stage_artifacts(work / "artifacts", export_dir, checkpoint_dir)
        code = work / "hllm_recommender_model.py"
        code.write_text(_MODEL_CODE)
        pkg = Path(hllm.__file__).parent
        code_copy = work / "code" / "hllm"
        shutil.copytree(pkg, code_copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(code),
            artifacts=arts,
            code_paths=[str(code_copy)],
            signature=signature(),
            input_example=input_example(export_dir, "checkpoint" in arts),
            pip_requirements=pip_requirements(),
            metadata={"hllm_export_manifest": json.loads((Path(export_dir) / "manifest.json").read_text())},
        )
    return path


def model_artifacts(model_dir: str | Path) -> dict[str, str]:
    """name -> local path of the pyfunc artifacts of a downloaded model folder."""
    from mlflow.models import Model

    model_dir = Path(model_dir)
    conf = Model.load(str(model_dir / "MLmodel")).flavors["python_function"]
    return {k: str(model_dir / v["path"]) for k, v in (conf.get("artifacts") or {}).items()}
