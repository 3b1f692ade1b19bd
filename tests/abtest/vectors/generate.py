"""Generate the cross-language assignment vectors, ``assignment.json``, ONCE.

The committed file is the contract: tests compare the Python implementation (and the JavaScript one,
``check_vectors.mjs``) against it, and never regenerate it. Re-running this script is only meant for adding
vectors, and a changed existing vector means the assignment of real users changed: that is a breaking
change, not a test fix. Hence it refuses to overwrite the file without ``--force``.

    .venv/bin/python tests/abtest/vectors/generate.py [--force]

The file is written with ``ensure_ascii=True``: non-ASCII ids are stored as ``\\uXXXX`` escapes, so no
editor or tool can re-encode or Unicode-normalise them (NFC and NFD forms must stay distinct), and each id
also carries its UTF-8 bytes in hex.
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from pathlib import Path

from hllm.abtest.assignment import BUCKETS, HASH_SPEC, SEPARATOR, Experiment, assign, bucket_of, default_salts, digest

OUT = Path(__file__).with_name("assignment.json")

SPECIAL_IDS = [
    "0",
    "42",
    "user-1",
    "user-1 ",  # trailing space: a different user
    "User-1",  # case matters
    "usér-42",
    unicodedata.normalize("NFC", "é"),  # U+00E9
    unicodedata.normalize("NFD", "é"),  # e + U+0301: a different byte string, a different user
    unicodedata.normalize("NFC", "Ä-user"),
    unicodedata.normalize("NFD", "Ä-user"),
    "中文用户",
    "مستخدم",  # right-to-left script
    "😀",  # outside the BMP: a surrogate pair in JS/JSON, 4 bytes in UTF-8
    "👩‍💻",  # ZWJ sequence
    "a\x1fb",  # the separator inside an id is allowed (only salts may not contain it)
    "nul\x00id",
    " ",
    "x" * 100,
]
SALTS = ["exp:hllm-ab-0007:exposure", "exp:hllm-ab-0007:arm", "home-ranking", "s", "sälz-中"]


def hash_vectors() -> list[dict[str, object]]:
    """digest and bucket for every salt x id pair."""
    out: list[dict[str, object]] = []
    for salt in SALTS:
        for unit_id in SPECIAL_IDS + [f"user-{i}" for i in range(5)]:
            raw = digest(salt, unit_id)
            out.append(
                {
                    "salt": salt,
                    "unit_id": unit_id,
                    "unit_id_utf8_hex": unit_id.encode("utf-8").hex(),
                    "input_hex": (salt + SEPARATOR + unit_id).encode("utf-8").hex(),
                    "sha256": raw.hex(),
                    "bucket": bucket_of(raw),
                }
            )
    return out


def experiments() -> list[Experiment]:
    """Experiments covering default and explicit salts, layer ranges, small/full/zero exposure, uneven split."""
    return [
        Experiment("hllm-ab-0007", "home-ranking", "12", "14", exposure=0.5, created_at="2026-11-23T11:17:35+00:00"),
        Experiment("hllm-ab-0008", "home-ranking", "12", "15", exposure=1.0, split=0.2, layer_range=(2500, 7500)),
        Experiment(
            "hllm-ab-0009",
            "search",
            "3",
            "4",
            exposure=0.1,
            exposure_salt="custom-exposure-salt",
            arm_salt="custom-arm-salt",
        ),
        Experiment("ab-中文-é", "layer-é", "1", "2", exposure=0.3333, split=0.5, layer_range=(0, 5000)),
        Experiment("hllm-ab-0010", "similar-items", "7", "8", exposure=0.0),
    ]


def assignment_vectors() -> list[dict[str, object]]:
    """The full assignment of every test id in every experiment (experiments listed once, by id)."""
    out: list[dict[str, object]] = []
    for exp in experiments():
        for unit_id in SPECIAL_IDS + [f"user-{i}" for i in range(40)]:
            a = assign(exp, unit_id)
            out.append(
                {
                    "experiment_id": exp.experiment_id,
                    "unit_id": unit_id,
                    "unit_id_utf8_hex": unit_id.encode("utf-8").hex(),
                    "unit_hash": a.unit_hash,
                    "layer_bucket": a.layer_bucket,
                    "exposure_bucket": a.exposure_bucket,
                    "arm_bucket": a.arm_bucket,
                    "in_experiment": a.in_experiment,
                    "arm": a.arm,
                    "model_version": a.model_version,
                }
            )
    return out


def build() -> dict[str, object]:
    return {
        "spec": HASH_SPEC,
        "buckets": BUCKETS,
        "separator_hex": SEPARATOR.encode("utf-8").hex(),
        "default_salts": [
            {"experiment_id": eid, "exposure_salt": s[0], "arm_salt": s[1]}
            for eid in ("hllm-ab-0007", "ab-中文-é")
            for s in [default_salts(eid)]
        ],
        "hashes": hash_vectors(),
        "experiments": [exp.to_dict() for exp in experiments()],
        "assignments": assignment_vectors(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="overwrite the committed vectors (breaking change)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        print(f"{args.out} exists; the committed vectors are the contract (use --force to overwrite)", file=sys.stderr)
        return 1
    args.out.write_text(json.dumps(build(), indent=1, ensure_ascii=True) + "\n", encoding="ascii")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
