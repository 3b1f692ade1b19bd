"""Deterministic user assignment for A/B tests of model versions.

The service, the simulator and the analysis must put every user in the same arm without sharing any
state, and a client in another language must be able to do the same. So assignment is a pure function of
the experiment and the user id, built on a standard hash over bytes. The exact spec (checked against the
committed vectors in ``tests/abtest/vectors/assignment.json`` by this module and by an independent
JavaScript implementation):

    digest(salt, unit_id) = SHA-256( UTF-8(salt) || 0x1F || UTF-8(unit_id) )        (32 bytes)
    bucket(salt, unit_id) = (first 8 bytes of digest, read as a big-endian unsigned 64-bit integer) mod 10000

    layer_bucket    = bucket(experiment.layer, unit_id)           # the layer salt is the layer name itself
    exposure_bucket = bucket(experiment.exposure_salt, unit_id)
    arm_bucket      = bucket(experiment.arm_salt, unit_id)

    in_experiment = layer_start <= layer_bucket < layer_end           # the whole layer [0, 10000) by default
                    and exposure_bucket < round(exposure * 10000)
    arm           = "challenger" if arm_bucket < round(split * 10000) else "champion"   (None when not in it)
    unit_hash     = lowercase hex of digest(experiment.exposure_salt, unit_id)

    default salts: exposure_salt = "exp:" + experiment_id + ":exposure", arm_salt = "exp:" + experiment_id + ":arm"

Why this shape:

- Bytes, not code points: ids are encoded as UTF-8 (hashing code points, as GrowthBook-Python does, gives
  other buckets than a byte-level hash in other languages for any non-ASCII id). Ids are *not* Unicode
  normalised: NFC "é" (U+00E9) and NFD "e" + U+0301 are different byte strings, hence different users. A
  caller whose ids can arrive in both forms must normalise them itself, identically everywhere.
- 0x1F (ASCII unit separator) between salt and id, and salts may not contain it, so the hashed bytes
  identify the (salt, id) pair (joining without a separator makes "ab"+"c" collide with "a"+"bc").
- Three independent hashes. The layer hash gives mutual exclusion: experiments on one layer own disjoint
  ranges of it. The exposure hash decides who is in the experiment, the arm hash which arm, so ramping the
  exposure up only adds users and never moves anyone's arm (with one threshold for both, raising 10 % to
  50 % switches 40 % of the analysed users). Lowering the exposure would remove analysed users, which biases
  the analysis, so it is refused: that needs a new experiment (new salts).
- Modulo bias of ``2**64 mod 10000``: buckets 0..1615 are more likely by a factor 1 + 5.4e-16; negligible.
- Shares are multiples of 1/10000, so the split over the 10,000 buckets is exact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

logger = logging.getLogger(__name__)

BUCKETS = 10_000
SEPARATOR = "\x1f"
HASH_SPEC = "sha256(utf8(salt) + 0x1f + utf8(unit_id)); bucket = uint64_be(digest[0:8]) % 10000"

Arm = Literal["champion", "challenger"]
CHAMPION: Arm = "champion"
CHALLENGER: Arm = "challenger"


def _utf8(text: object, what: str) -> bytes:
    """UTF-8 bytes of a non-empty str; a lone surrogate (not encodable) is refused rather than replaced."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    if not text:
        raise ValueError(f"{what} must not be empty")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not encodable as UTF-8 (lone surrogate?): {text!r}") from exc


def _salt_bytes(salt: object, what: str) -> bytes:
    """UTF-8 bytes of a salt, which may not contain the separator (else two (salt, id) pairs could collide)."""
    raw = _utf8(salt, what)
    if SEPARATOR.encode() in raw:
        raise ValueError(f"{what} must not contain the separator 0x1F: {salt!r}")
    return raw


def digest(salt: str, unit_id: str) -> bytes:
    """SHA-256 of ``UTF-8(salt) || 0x1F || UTF-8(unit_id)``: the one hash every assignment is built on."""
    return hashlib.sha256(_salt_bytes(salt, "salt") + SEPARATOR.encode() + _utf8(unit_id, "unit_id")).digest()


def bucket_of(raw_digest: bytes) -> int:
    """Bucket in [0, 10000) of a digest: its first 8 bytes as a big-endian unsigned integer, mod 10000."""
    return int.from_bytes(raw_digest[:8], "big") % BUCKETS


def bucket(salt: str, unit_id: str) -> int:
    """Bucket in [0, 10000) of ``unit_id`` under ``salt``."""
    return bucket_of(digest(salt, unit_id))


def share_to_buckets(share: float, what: str) -> int:
    """Number of buckets of a share in [0, 1]; refuses shares that are not a multiple of 1/10000, so that
    "exactly share * 10000 buckets" holds and every language rounds the same way."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], got {share!r}")
    count = round(share * BUCKETS)
    if abs(share * BUCKETS - count) > 1e-6:
        raise ValueError(f"{what} must be a multiple of 1/{BUCKETS} (0.0001), got {share!r}")
    return count


def default_salts(experiment_id: str) -> tuple[str, str]:
    """(exposure_salt, arm_salt) derived from the experiment id: two different salts, so that being in the
    experiment and the arm are independent."""
    _utf8(experiment_id, "experiment_id")
    return f"exp:{experiment_id}:exposure", f"exp:{experiment_id}:arm"


@dataclass(frozen=True)
class Experiment:
    """One champion/challenger test, bound to concrete registry versions (not aliases).

    ``exposure`` is the share of the experiment's layer range that is in the experiment (the range is the
    whole layer when ``layer_range`` is None, so the share of all traffic is ``exposure * width / 10000``);
    ``split`` is the share of in-experiment users who get the challenger. Empty salts are derived from the
    id (:func:`default_salts`). ``layer_range`` is ``(start, end)``, buckets ``start <= b < end`` of the layer
    hash. ``created_at`` is an ISO-8601 string, kept for the audit trail only (it does not affect assignment).
    """

    experiment_id: str
    layer: str
    champion_version: str
    challenger_version: str
    exposure: float
    split: float = 0.5
    exposure_salt: str = ""
    arm_salt: str = ""
    layer_range: tuple[int, int] | None = None
    created_at: str | None = None

    def __post_init__(self) -> None:
        exposure_salt, arm_salt = default_salts(self.experiment_id)
        if not self.exposure_salt:
            object.__setattr__(self, "exposure_salt", exposure_salt)
        if not self.arm_salt:
            object.__setattr__(self, "arm_salt", arm_salt)
        if self.layer_range is not None:
            object.__setattr__(self, "layer_range", tuple(self.layer_range))
        self._validate()

    def _validate(self) -> None:
        for name in ("champion_version", "challenger_version"):
            _utf8(getattr(self, name), name)
        for name in ("layer", "exposure_salt", "arm_salt"):
            _salt_bytes(getattr(self, name), name)
        if len({self.layer, self.exposure_salt, self.arm_salt}) != 3:
            raise ValueError("layer, exposure_salt and arm_salt must all differ (else the hashes are correlated)")
        share_to_buckets(self.exposure, "exposure")
        if not 0 < share_to_buckets(self.split, "split") < BUCKETS:
            raise ValueError(f"split must be strictly between 0 and 1, got {self.split!r}")
        _check_range(self.layer_range)
        if self.created_at is not None:
            datetime.fromisoformat(self.created_at)  # raises ValueError on a malformed timestamp

    @property
    def exposure_buckets(self) -> int:
        """Exposure buckets in the experiment: exposure_bucket < this."""
        return share_to_buckets(self.exposure, "exposure")

    @property
    def challenger_buckets(self) -> int:
        """Arm buckets that get the challenger: arm_bucket < this."""
        return share_to_buckets(self.split, "split")

    @property
    def layer_bounds(self) -> tuple[int, int]:
        """(start, end) of the layer range; the whole layer when none was set."""
        return self.layer_range if self.layer_range is not None else (0, BUCKETS)

    def ramp(self, new_exposure: float) -> Experiment:
        """The same experiment (same salts, hence the same users and arms) with a higher exposure share.

        Refuses a lower share: removing analysed users mid-test biases the analysis."""
        new_buckets, old_buckets = share_to_buckets(new_exposure, "exposure"), self.exposure_buckets
        if new_buckets < old_buckets:
            raise ValueError(
                f"experiment {self.experiment_id!r}: exposure {self.exposure} -> {new_exposure} is a decrease; "
                "lowering the share needs a new experiment (new id and salts)"
            )
        logger.info("experiment %s: exposure %s -> %s", self.experiment_id, self.exposure, new_exposure)
        return dataclasses.replace(self, exposure=new_exposure)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (salts always explicit, layer_range a list or None)."""
        out = dataclasses.asdict(self)
        out["layer_range"] = list(self.layer_range) if self.layer_range is not None else None
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Experiment:
        """Inverse of :meth:`to_dict`; unknown keys are refused so that a typo is not silently dropped."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown experiment fields: {sorted(unknown)}")
        kwargs = dict(data)
        for name in ("champion_version", "challenger_version"):
            if name in kwargs and isinstance(kwargs[name], int) and not isinstance(kwargs[name], bool):
                kwargs[name] = str(kwargs[name])  # MLflow versions are strings; accept 12 for "12"
        return cls(**kwargs)  # __post_init__ turns a JSON list layer_range back into a tuple


def _check_range(layer_range: tuple[int, int] | None) -> None:
    if layer_range is None:
        return
    if len(layer_range) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in layer_range):
        raise ValueError(f"layer_range must be two ints (start, end), got {layer_range!r}")
    start, end = layer_range
    if not 0 <= start < end <= BUCKETS:
        raise ValueError(f"layer_range must satisfy 0 <= start < end <= {BUCKETS}, got {layer_range!r}")


@dataclass(frozen=True)
class Assignment:
    """Where one user falls in one experiment. ``arm`` is None when the user is not in the experiment: such
    users get the default traffic, i.e. the champion (``model_version``)."""

    experiment_id: str
    unit_hash: str
    layer_bucket: int
    exposure_bucket: int
    arm_bucket: int
    in_experiment: bool
    arm: Arm | None
    model_version: str


def arm_for_buckets(experiment: Experiment, layer_bucket: int, exposure_bucket: int, arm_bucket: int) -> Arm | None:
    """The arm given the three buckets (None = not in the experiment). Split out of :func:`assign` so that
    tests can enumerate every bucket."""
    start, end = experiment.layer_bounds
    if not (start <= layer_bucket < end and exposure_bucket < experiment.exposure_buckets):
        return None
    return CHALLENGER if arm_bucket < experiment.challenger_buckets else CHAMPION


def assign(experiment: Experiment, unit_id: str) -> Assignment:
    """Assign ``unit_id`` (the user id; non-empty str, not normalised) in ``experiment``."""
    exposure_digest = digest(experiment.exposure_salt, unit_id)
    layer_bucket = bucket(experiment.layer, unit_id)
    exposure_bucket = bucket_of(exposure_digest)
    arm_bucket = bucket(experiment.arm_salt, unit_id)
    arm = arm_for_buckets(experiment, layer_bucket, exposure_bucket, arm_bucket)
    version = experiment.challenger_version if arm == CHALLENGER else experiment.champion_version
    return Assignment(
        experiment_id=experiment.experiment_id,
        unit_hash=exposure_digest.hex(),
        layer_bucket=layer_bucket,
        exposure_bucket=exposure_bucket,
        arm_bucket=arm_bucket,
        in_experiment=arm is not None,
        arm=arm,
        model_version=version,
    )


def _ranges_on(experiments: Iterable[Experiment], layer: str) -> list[tuple[int, int, str]]:
    """(start, end, experiment_id) of the experiments on ``layer``, sorted by start."""
    return sorted((*e.layer_bounds, e.experiment_id) for e in experiments if e.layer == layer)


def check_layer_exclusive(experiments: Iterable[Experiment]) -> None:
    """Raise ValueError if two experiments on the same layer share a layer bucket (they could share a user).

    Experiments on different layers are independent: a user can be in one of each."""
    experiments = list(experiments)
    ids = [e.experiment_id for e in experiments]
    if len(ids) != len(set(ids)):
        raise ValueError(f"duplicate experiment ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    for layer in sorted({e.layer for e in experiments}):
        ranges = _ranges_on(experiments, layer)
        for (_, end_a, id_a), (start_b, _, id_b) in itertools.pairwise(ranges):
            if start_b < end_a:
                raise ValueError(f"layer {layer!r}: experiments {id_a!r} and {id_b!r} overlap in layer buckets")


def allocate_layer_range(existing: Iterable[Experiment], layer: str, layer_share: float) -> tuple[int, int]:
    """The lowest free ``(start, end)`` range of ``layer_share * 10000`` layer buckets on ``layer``, disjoint
    from the ranges of ``existing`` experiments on that layer (first fit). Raises ValueError when the
    existing experiments already overlap or no free range is wide enough."""
    existing = list(existing)
    check_layer_exclusive(existing)
    width = share_to_buckets(layer_share, "layer_share")
    if width == 0:
        raise ValueError("layer_share must be > 0")
    cursor = 0
    for start, end, _ in [*_ranges_on(existing, layer), (BUCKETS, BUCKETS, "")]:
        if start - cursor >= width:
            logger.debug("layer %s: allocated [%d, %d)", layer, cursor, cursor + width)
            return cursor, cursor + width
        cursor = max(cursor, end)
    raise ValueError(f"layer {layer!r} has no free range of {width} buckets (layer_share {layer_share})")
