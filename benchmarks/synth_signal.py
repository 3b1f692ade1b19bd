"""How much the synthetic dataset's item text predicts the next item, without any model.

    .venv/bin/python benchmarks/synth_signal.py            # the default dataset (params.yaml synth)

Leave-last-out on each user's chronological list; candidates exclude the user's
history. Compares Recall@10 / NDCG@10 of
  * global popularity (training counts), and
  * "text": the most popular items of the category named in the last history
    item's ``tag`` (text only, no ids learned),
so a text model has a visible margin to find. Prints one JSON line.
"""

from __future__ import annotations

import json
import math
import sys

import pandas as pd


def main(params: str = "params.yaml", k: int = 10) -> None:
    from hllm.config import load_config
    from hllm.data.synth import generate

    raw = generate(load_config(params).synth)
    inter = raw.interactions.to_pandas()
    items = raw.items.to_pandas().set_index("item_id")
    category = items["tag"].str.split(", ").str[0]
    seqs = inter.groupby("user_id", sort=False)["item_id"].apply(list)  # file order = time order
    pop = pd.Series([x for s in seqs for x in s[:-1]]).value_counts()
    by_cat = {c: [i for i in pop.index if category[i] == c] for c in category.unique()}
    res = {"pop": [0.0, 0.0], "text": [0.0, 0.0]}
    for s in seqs:
        hist, target = set(s[:-1]), s[-1]
        lists = {
            "pop": [i for i in pop.index[: k + len(hist)] if i not in hist][:k],
            "text": [i for i in by_cat[category[s[-2]]] if i not in hist][:k],
        }
        for name, top in lists.items():
            if target in top:
                res[name][0] += 1
                res[name][1] += 1 / math.log2(top.index(target) + 2)
    n = len(seqs)
    print(
        json.dumps(
            {
                "users": n,
                f"recall@{k}": {m: round(v[0] / n, 4) for m, v in res.items()},
                f"ndcg@{k}": {m: round(v[1] / n, 4) for m, v in res.items()},
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:2])
