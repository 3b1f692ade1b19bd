"""hllm.abtest.assignment: exact splits, monotone ramps, layer exclusivity, determinism, UTF-8 ids, and the
committed cross-language vectors (checked here and by an independent JavaScript implementation)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from scipy import stats as sps

from hllm.abtest.assignment import (
    BUCKETS,
    Experiment,
    allocate_layer_range,
    arm_for_buckets,
    assign,
    bucket,
    check_layer_exclusive,
    default_salts,
    digest,
)

VECTORS = Path(__file__).parent / "vectors"
IDS = [f"user-{i}" for i in range(4000)]


def _exp(exposure: float = 0.5, split: float = 0.5, **kw: object) -> Experiment:
    base = {
        "experiment_id": "hllm-ab-0007",
        "layer": "home-ranking",
        "champion_version": "12",
        "challenger_version": "14",
        "exposure": exposure,
        "split": split,
    }
    return Experiment(**{**base, **kw})  # type: ignore[arg-type]


# --- the hash -----------------------------------------------------------------------------------------------


def test_digest_is_sha256_over_utf8_with_a_0x1f_separator() -> None:
    expected = hashlib.sha256(b"salt\x1fuser-1").digest()
    assert digest("salt", "user-1") == expected
    assert bucket("salt", "user-1") == int.from_bytes(expected[:8], "big") % 10_000


def test_separator_makes_the_pair_unambiguous() -> None:
    assert digest("ab", "c") != digest("a", "bc")
    with pytest.raises(ValueError, match="separator"):
        digest("a\x1fb", "c")


@pytest.mark.parametrize(
    "unit_id, utf8",
    [
        ("usér-42", b"us\xc3\xa9r-42"),
        ("中文", "中文".encode()),
        ("😀", b"\xf0\x9f\x98\x80"),
        ("\u00e9", b"\xc3\xa9"),  # NFC é
        ("e\u0301", b"e\xcc\x81"),  # NFD é
    ],
)
def test_non_ascii_ids_hash_their_utf8_bytes(unit_id: str, utf8: bytes) -> None:
    assert digest("s", unit_id) == hashlib.sha256(b"s\x1f" + utf8).digest()


def test_ids_are_not_unicode_normalised() -> None:
    nfc, nfd = unicodedata.normalize("NFC", "é-user"), unicodedata.normalize("NFD", "é-user")
    assert nfc != nfd
    assert digest("s", nfc) != digest("s", nfd)  # two different users, by design (documented)


@pytest.mark.parametrize("bad, exc", [("", ValueError), (None, TypeError), (42, TypeError), ("\ud800", ValueError)])
def test_bad_ids_are_refused(bad: object, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        assign(_exp(), bad)  # type: ignore[arg-type]


def test_buckets_are_uniform() -> None:
    # 20,000 fixed ids into 20 coarse bins: deterministic, so this cannot flake
    counts = [0] * 20
    for i in range(20_000):
        counts[bucket("uniformity", f"u{i}") * 20 // BUCKETS] += 1
    assert sps.chisquare(counts).pvalue > 1e-3


# --- exact splits by enumerating every bucket ---------------------------------------------------------------


@pytest.mark.parametrize("exposure", [0.0, 0.0001, 0.1, 0.25, 0.3333, 0.5, 0.9999, 1.0])
def test_exposure_is_exact_over_all_buckets(exposure: float) -> None:
    exp = _exp(exposure)
    inside = sum(arm_for_buckets(exp, 0, b, 0) is not None for b in range(BUCKETS))
    assert inside == round(exposure * BUCKETS) == exp.exposure_buckets


@pytest.mark.parametrize("split", [0.0001, 0.2, 0.5, 0.7071, 0.9999])
def test_split_is_exact_over_all_buckets(split: float) -> None:
    exp = _exp(1.0, split)
    arms = [arm_for_buckets(exp, 0, 0, b) for b in range(BUCKETS)]
    assert arms.count("challenger") == round(split * BUCKETS)
    assert arms.count("champion") == BUCKETS - round(split * BUCKETS)


def test_layer_range_is_exact_and_composes_with_exposure() -> None:
    exp = _exp(0.5, layer_range=(2000, 3500))
    eligible = [lb for lb in range(BUCKETS) if arm_for_buckets(exp, lb, 0, 0) is not None]
    assert eligible == list(range(2000, 3500))
    assert sum(arm_for_buckets(exp, 2000, b, 0) is not None for b in range(BUCKETS)) == 5000
    assert all(arm_for_buckets(exp, 1999, b, 0) is None for b in range(BUCKETS))


@pytest.mark.parametrize("share", [0.12345, 1.5, -0.1, float("nan")])
def test_shares_off_the_bucket_grid_are_refused(share: float) -> None:
    with pytest.raises(ValueError):
        _exp(share)


@pytest.mark.parametrize("split", [0.0, 1.0])
def test_an_empty_arm_is_refused(split: float) -> None:
    with pytest.raises(ValueError, match="split"):
        _exp(split=split)


def test_assign_matches_its_buckets_and_the_observed_shares() -> None:
    exp = _exp(0.4, 0.25)
    arms = [assign(exp, u) for u in IDS]
    for a in arms[:200]:
        assert a.arm == arm_for_buckets(exp, a.layer_bucket, a.exposure_bucket, a.arm_bucket)
        assert a.in_experiment == (a.arm is not None)
        assert a.exposure_bucket == int(a.unit_hash[:16], 16) % BUCKETS  # the logged hash carries the bucket
    inside = [a for a in arms if a.in_experiment]
    assert abs(len(inside) / len(IDS) - 0.4) < 0.03
    assert abs(sum(a.arm == "challenger" for a in inside) / len(inside) - 0.25) < 0.04


def test_model_version_follows_the_arm() -> None:
    exp = _exp(0.5)
    for a in (assign(exp, u) for u in IDS[:300]):
        assert a.model_version == ("14" if a.arm == "challenger" else "12")


# --- ramping ------------------------------------------------------------------------------------------------


def test_ramping_up_never_moves_an_exposed_user_nor_changes_an_arm() -> None:
    rng = random.Random(7)
    shares = sorted({rng.randrange(1, BUCKETS + 1) / BUCKETS for _ in range(12)} | {0.01, 0.1, 0.5, 1.0})
    exp = _exp(0.0)
    full = {u: assign(exp.ramp(1.0), u).arm for u in IDS}  # every user's arm once exposed
    previous: dict[str, str | None] = {u: None for u in IDS}
    for share in shares:
        exp = exp.ramp(share)
        for u in IDS:
            arm = assign(exp, u).arm
            if previous[u] is not None:
                assert arm == previous[u], (u, share)  # still in, same arm
            assert arm in (None, full[u])  # the arm depends on arm_salt only
            previous[u] = arm


def test_ramp_keeps_identity_and_refuses_to_lower() -> None:
    exp = _exp(0.2, layer_range=(0, 5000))
    ramped = exp.ramp(0.3)
    assert dataclasses.replace(ramped, exposure=0.2) == exp
    assert exp.ramp(0.2) == exp
    with pytest.raises(ValueError, match="lowering the share needs a new experiment"):
        ramped.ramp(0.1)


def test_single_threshold_would_move_users_two_salts_do_not() -> None:
    # the failure mode the two salts exist for: challenger iff one bucket < share moves users on a ramp
    low, high = _exp(0.1), _exp(0.1).ramp(0.5)
    exposed = [u for u in IDS if assign(low, u).in_experiment]
    assert all(assign(high, u).arm == assign(low, u).arm for u in exposed)
    one_threshold = [(bucket("x", u) < 500, bucket("x", u) < 2500) for u in IDS if bucket("x", u) < 1000]
    assert any(a != b for a, b in one_threshold)


# --- layers / mutual exclusion ------------------------------------------------------------------------------


def _on_layer(eid: str, layer_range: tuple[int, int], layer: str = "home-ranking") -> Experiment:
    return Experiment(eid, layer, "1", "2", exposure=1.0, layer_range=layer_range)


def test_allocation_is_first_fit_and_disjoint() -> None:
    placed: list[Experiment] = []
    for i, share in enumerate([0.3, 0.3, 0.4]):
        placed.append(_on_layer(f"e{i}", allocate_layer_range(placed, "home-ranking", share)))
    assert [e.layer_range for e in placed] == [(0, 3000), (3000, 6000), (6000, 10_000)]
    with pytest.raises(ValueError, match="no free range"):
        allocate_layer_range(placed, "home-ranking", 0.0001)
    assert allocate_layer_range(placed, "other-layer", 1.0) == (0, 10_000)  # layers are independent
    assert allocate_layer_range([placed[0], placed[2]], "home-ranking", 0.3) == (3000, 6000)  # a freed gap
    with pytest.raises(ValueError, match="no free range"):
        allocate_layer_range([placed[0], placed[2]], "home-ranking", 0.3001)


def test_experiments_on_one_layer_never_share_a_user() -> None:
    placed = [_on_layer("a", (0, 3000)), _on_layer("b", (3000, 6000)), _on_layer("c", (6000, 10_000))]
    check_layer_exclusive(placed)
    for u in IDS:
        assert sum(assign(e, u).in_experiment for e in placed) == 1  # full exposure: exactly one each


def test_overlap_whole_layer_and_duplicates_are_refused() -> None:
    with pytest.raises(ValueError, match="overlap"):
        check_layer_exclusive([_on_layer("a", (0, 5000)), _on_layer("b", (4999, 6000))])
    whole = _exp(0.1)  # no layer_range: owns the whole layer
    with pytest.raises(ValueError, match="no free range"):
        allocate_layer_range([whole], "home-ranking", 0.1)
    with pytest.raises(ValueError, match="overlap"):
        allocate_layer_range([_on_layer("a", (0, 5000)), _on_layer("b", (100, 200))], "home-ranking", 0.1)
    with pytest.raises(ValueError, match="duplicate"):
        check_layer_exclusive([_on_layer("a", (0, 10)), _on_layer("a", (10, 20), layer="other")])
    check_layer_exclusive([_on_layer("a", (0, 5000)), _on_layer("b", (0, 5000), layer="other")])


@pytest.mark.parametrize("layer_range", [(0, 0), (5, 3), (-1, 10), (0, 10_001), (0.5, 10)])
def test_bad_layer_ranges_are_refused(layer_range: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="layer_range"):
        _exp(layer_range=layer_range)


# --- the experiment object ----------------------------------------------------------------------------------


def test_default_salts_come_from_the_id_and_differ() -> None:
    exp = _exp()
    assert (exp.exposure_salt, exp.arm_salt) == default_salts("hllm-ab-0007")
    assert default_salts("hllm-ab-0007") == ("exp:hllm-ab-0007:exposure", "exp:hllm-ab-0007:arm")
    with pytest.raises(ValueError, match="differ"):
        _exp(exposure_salt="same", arm_salt="same")
    with pytest.raises(ValueError, match="differ"):
        _exp(arm_salt="home-ranking")


def test_json_round_trip_and_strict_from_dict() -> None:
    exp = _exp(0.25, 0.2, layer_range=(10, 20), created_at="2026-11-23T11:17:35+00:00")
    assert Experiment.from_dict(json.loads(json.dumps(exp.to_dict()))) == exp
    assert Experiment.from_dict({**exp.to_dict(), "champion_version": 12}).champion_version == "12"
    with pytest.raises(ValueError, match="unknown"):
        Experiment.from_dict({**exp.to_dict(), "exposre": 0.5})
    with pytest.raises(ValueError):
        _exp(created_at="yesterday")
    with pytest.raises(dataclasses.FrozenInstanceError):
        exp.exposure = 1.0  # type: ignore[misc]


def test_assignment_is_deterministic_across_processes() -> None:
    """No Python hash(): another interpreter with another hash seed gives the same assignment."""
    exp = _exp(0.5)
    code = (
        "import json, sys; from hllm.abtest.assignment import Experiment, assign; "
        "e = Experiment.from_dict(json.loads(sys.argv[1])); "
        "print(json.dumps([assign(e, u).arm for u in json.loads(sys.argv[2])]))"
    )
    ids = [*IDS[:50], "usér-42", "😀"]
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(exp.to_dict()), json.dumps(ids)],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONHASHSEED": "12345"},
    ).stdout
    assert json.loads(out) == [assign(exp, u).arm for u in ids]
    assert [assign(exp, u) for u in ids] == [assign(exp, u) for u in ids]


# --- committed cross-language vectors -----------------------------------------------------------------------


def _vectors() -> dict:
    return json.loads((VECTORS / "assignment.json").read_text(encoding="ascii"))


def test_committed_hash_vectors_match() -> None:
    data = _vectors()
    assert data["buckets"] == BUCKETS and data["separator_hex"] == "1f"
    for v in data["hashes"]:
        assert v["unit_id"].encode("utf-8").hex() == v["unit_id_utf8_hex"]
        raw = digest(v["salt"], v["unit_id"])
        assert (raw.hex(), int.from_bytes(raw[:8], "big") % BUCKETS) == (v["sha256"], v["bucket"]), v
    for d in data["default_salts"]:
        assert default_salts(d["experiment_id"]) == (d["exposure_salt"], d["arm_salt"])


def test_committed_assignment_vectors_match() -> None:
    data = _vectors()
    experiments = {e["experiment_id"]: Experiment.from_dict(e) for e in data["experiments"]}
    for v in data["assignments"]:
        got = dataclasses.asdict(assign(experiments[v["experiment_id"]], v["unit_id"]))
        assert got == {k: v[k] for k in got}, v


def test_committed_vectors_cover_the_hard_cases() -> None:
    data = _vectors()
    ids = {v["unit_id"] for v in data["hashes"]}
    assert {"\u00e9", "e\u0301", "😀", "中文用户", ""} - ids == {""}  # NFC and NFD both present, no empty id
    assert any(ord(c) > 0xFFFF for i in ids for c in i)  # beyond the BMP (surrogate pairs in JS)
    arms = {v["arm"] for v in data["assignments"]}
    assert arms == {"champion", "challenger", None}
    assert any(e["layer_range"] for e in data["experiments"])


def _node() -> str:
    node = shutil.which("node")
    # a declared test requirement (Debian's nodejs, on this project's machines): without it the check fails
    # loudly instead of passing unseen
    assert node is not None, "node is not on PATH: install it (apt-get install -y nodejs) to cross-check the vectors"
    return node


def test_vectors_match_an_independent_javascript_implementation() -> None:
    proc = subprocess.run(
        [_node(), str(VECTORS / "check_vectors.mjs"), str(VECTORS / "assignment.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok:")


def test_the_javascript_checker_fails_on_a_wrong_vector(tmp_path: Path) -> None:
    data = _vectors()
    data["assignments"][3]["arm_bucket"] = (data["assignments"][3]["arm_bucket"] + 1) % BUCKETS
    data["hashes"][-1]["sha256"] = "0" * 64
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data), encoding="utf-8")
    proc = subprocess.run(
        [_node(), str(VECTORS / "check_vectors.mjs"), str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and proc.stderr.count("MISMATCH") == 2, proc.stdout + proc.stderr
