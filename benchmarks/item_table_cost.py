"""What the item prompt costs the encoder Item LLM: tokens per item and seconds to encode the catalogue.

Encodes the whole catalogue of a built dataset into the HLLM item table (``HLLM.refresh_table``: no gradient,
chunks of ``train.item_table_batch``) once per prompt, on the threads given, and prints tokens/item and seconds.
What the prompt gives (R@10) comes from ``benchmarks/quality.py`` runs with ``--set model.item.prompt=...``.

    python benchmarks/item_table_cost.py build/quality/<work> --set model.item.text_fields=[title,tag,release_year]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="a benchmarks/quality.py working folder (params.yaml + built/)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", nargs="+", default=None, help="prompts to compare (default: params' and none)")
    ap.add_argument("--set", "-s", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from hllm.config import load_config
    from hllm.data.dataset import load_built
    from hllm.data.text import ensure_tokens
    from hllm.models import build_model

    base = load_config(args.work / "params.yaml", args.sets)
    prompts = args.prompts if args.prompts is not None else [base.model.item.prompt, ""]
    rows = []
    for prompt in prompts:
        sets = [*args.sets, f"model.item.prompt={json.dumps(prompt)}", "model.item.tune=frozen",
                "model.item.pooling=mean", "model.item.adaptor=linear"]  # fmt: skip
        cfg = load_config(args.work / "params.yaml", sets)
        cfg.paths.built_dir = str(args.work / "built")
        built = load_built(cfg.paths.built_dir)
        tokens = ensure_tokens(cfg, built.dir)
        model = build_model(cfg, built, tokens)
        lengths = tokens.lengths()[1:]
        t0 = time.perf_counter()
        model.refresh_table(0, progress=True)
        rows.append((prompt, float(lengths.mean()), int(lengths.sum()), time.perf_counter() - t0))
    print(f"{built.n_items - 1} items, {args.threads} thread(s), max_text_len {base.model.item.max_text_len}\n")
    print("| prompt | tokens/item | tokens | encode catalogue (s) |\n|---|---:|---:|---:|")
    for prompt, mean, total, secs in rows:
        print(f"| {prompt!r} | {mean:.1f} | {total} | {secs:.1f} |")


if __name__ == "__main__":
    main()
