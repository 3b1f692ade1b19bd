"""The embedded default dataset: a synthetic shop whose item text predicts behaviour.

It exists so that the whole system (validation, build, training, evaluation,
registry, flows) runs on a fresh machine with no download, and so that tests and
the nightly job have a dataset on which a text model has something to learn.
It is NOT a benchmark: numbers on it say that the pipeline works, not how HLLM
compares on real data.

Catalogue. Each item belongs to one category (hiking gear, coffee, board
games, ...) and one brand of that category, and has a style, a colour, a
product noun and a feature. Its text fields are built from exactly those
words::

    title        "Norvik Rugged Trail Backpack"
    tag          "hiking gear, rugged, forest green"
    description  "A forest green trail backpack with a hydration sleeve."

Users. Each user likes 2-3 categories and one style. A sequence is a Markov
walk: the next item usually stays in the current category (sometimes the same
brand, often the preferred style), otherwise jumps to another liked category
or, rarely, anywhere; liked categories drift slowly. Within a pool items are
drawn by a skewed popularity. So the category/brand/style words of recent
items predict the next item far better than global popularity does.

New items. ``synth.new_item_share`` of the catalogue launches late: such an item
is only bought in a user's last two interactions (the validation and test
targets) and is popular there (x ``LATE_BOOST``), so most of them never occur in
any training part. An ID model cannot score them; a text model reads their
words like any other item's: the cold-start slice of the evaluation.

Generation is vectorised over users (a loop over positions only) and fully
determined by ``synth.seed``: the same params give byte-identical parquet files,
which is what lets ``data.dvc`` be committed and reproduced by anyone.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from hllm.config import Config, SynthConfig
from hllm.data.raw import RawTables, write_raw

log = logging.getLogger(__name__)

# category -> (product nouns, feature phrases)
CATALOGUE: dict[str, tuple[list[str], list[str]]] = {
    "hiking gear": (
        [
            "trail backpack",
            "trekking poles",
            "hiking boots",
            "rain jacket",
            "headlamp",
            "water filter",
            "trail map case",
            "daypack",
        ],
        [
            "a hydration sleeve",
            "taped seams",
            "a lifetime warranty",
            "reflective trim",
            "an ultralight frame",
            "a packable hood",
        ],
    ),
    "coffee": (
        [
            "espresso beans",
            "pour-over kettle",
            "burr grinder",
            "french press",
            "cold brew jar",
            "milk frother",
            "coffee scale",
            "travel mug",
        ],
        [
            "single-origin flavour",
            "a gooseneck spout",
            "a built-in timer",
            "a double wall",
            "notes of dark chocolate",
            "a stainless filter",
        ],
    ),
    "board games": (
        [
            "strategy game",
            "party game",
            "card game",
            "dice game",
            "cooperative game",
            "puzzle game",
            "trivia game",
            "deck-building game",
        ],
        [
            "two to six players",
            "a sixty-minute playtime",
            "hand-painted miniatures",
            "a solo mode",
            "a glossy board",
            "three expansion packs",
        ],
    ),
    "science fiction books": (
        [
            "space opera novel",
            "cyberpunk novel",
            "time travel novel",
            "short story collection",
            "first contact novel",
            "robot saga",
            "dystopian novel",
            "colony ship epic",
        ],
        [
            "an award-winning author",
            "a twist ending",
            "a hardcover binding",
            "a sequel hook",
            "illustrated chapter maps",
            "a foreword by the editor",
        ],
    ),
    "yoga": (
        [
            "yoga mat",
            "yoga block",
            "meditation cushion",
            "stretch strap",
            "yoga wheel",
            "mat towel",
            "balance board",
            "yoga bolster",
        ],
        [
            "a non-slip surface",
            "natural cork",
            "extra thick padding",
            "a carry strap",
            "alignment lines",
            "washable cotton",
        ],
    ),
    "cycling": (
        [
            "bike helmet",
            "cycling gloves",
            "bike light",
            "saddle bag",
            "floor pump",
            "bike lock",
            "cycling jersey",
            "bottle cage",
        ],
        [
            "a USB rechargeable battery",
            "aero vents",
            "a carbon shell",
            "a quick-release mount",
            "padded palms",
            "a reflective logo",
        ],
    ),
    "gardening": (
        [
            "pruning shears",
            "garden hose",
            "seed starter kit",
            "watering can",
            "raised bed",
            "compost bin",
            "garden gloves",
            "trowel",
        ],
        [
            "rust-proof steel",
            "ergonomic handles",
            "a drip tray",
            "heirloom seeds",
            "a kink-free design",
            "weatherproof wood",
        ],
    ),
    "skincare": (
        ["face serum", "night cream", "sunscreen", "cleansing balm", "eye cream", "sheet mask", "toner", "lip balm"],
        ["hyaluronic acid", "a fragrance-free formula", "SPF 50", "vitamin C", "a refillable jar", "aloe vera"],
    ),
    "headphones": (
        [
            "wireless earbuds",
            "studio headphones",
            "noise cancelling headphones",
            "sport earphones",
            "gaming headset",
            "bone conduction headphones",
            "DJ headphones",
            "sleep earbuds",
        ],
        [
            "thirty hours of battery",
            "active noise cancelling",
            "a detachable mic",
            "a sweat-proof build",
            "low latency mode",
            "memory foam cushions",
        ],
    ),
    "photography": (
        [
            "camera tripod",
            "prime lens",
            "camera bag",
            "lens filter",
            "ring light",
            "memory card",
            "camera strap",
            "flash unit",
        ],
        [
            "a fast aperture",
            "weather sealing",
            "a quick-release plate",
            "a padded divider",
            "a high write speed",
            "a swivel head",
        ],
    ),
    "baking": (
        [
            "stand mixer",
            "bread proofing basket",
            "loaf pan",
            "piping set",
            "rolling pin",
            "cake stand",
            "baking steel",
            "sourdough starter kit",
        ],
        [
            "a non-stick coating",
            "a bamboo handle",
            "twelve nozzles",
            "a five-litre bowl",
            "a recipe booklet",
            "food-grade silicone",
        ],
    ),
    "fishing": (
        [
            "spinning reel",
            "fly rod",
            "tackle box",
            "fishing line",
            "lure set",
            "landing net",
            "wading boots",
            "rod holder",
        ],
        ["a smooth drag", "a graphite blank", "braided line", "a waterproof seal", "a telescopic handle", "felt soles"],
    ),
    "dog supplies": (
        [
            "dog bed",
            "chew toy",
            "dog leash",
            "dog harness",
            "treat pouch",
            "dog bowl",
            "grooming brush",
            "dog raincoat",
        ],
        [
            "a washable cover",
            "a padded handle",
            "an anti-slip base",
            "durable rubber",
            "a reflective stitch",
            "an orthopedic foam",
        ],
    ),
    "camping": (
        [
            "dome tent",
            "sleeping bag",
            "camp stove",
            "camping chair",
            "lantern",
            "cooler box",
            "hammock",
            "sleeping pad",
        ],
        [
            "a three-season rating",
            "a compression sack",
            "a built-in igniter",
            "a folding frame",
            "a rainfly",
            "a ground sheet",
        ],
    ),
    "running": (
        [
            "running shoes",
            "running shorts",
            "GPS watch",
            "running vest",
            "compression socks",
            "running cap",
            "arm band",
            "foam roller",
        ],
        [
            "a cushioned midsole",
            "a breathable mesh",
            "heart rate tracking",
            "zip pockets",
            "a carbon plate",
            "a quick-dry fabric",
        ],
    ),
    "tea": (
        [
            "green tea",
            "oolong tea",
            "herbal infusion",
            "matcha powder",
            "tea infuser",
            "teapot",
            "chai blend",
            "black tea",
        ],
        ["loose leaves", "a ceramic glaze", "a bamboo whisk", "organic leaves", "notes of jasmine", "a cast iron body"],
    ),
    "video games": (
        [
            "racing game",
            "role-playing game",
            "platformer",
            "shooter game",
            "puzzle adventure",
            "sports game",
            "survival game",
            "rhythm game",
        ],
        [
            "online co-op",
            "a split-screen mode",
            "an open world",
            "a season pass",
            "a photo mode",
            "ray-traced lighting",
        ],
    ),
    "watches": (
        [
            "dive watch",
            "chronograph",
            "field watch",
            "dress watch",
            "smartwatch",
            "pilot watch",
            "watch strap",
            "watch winder",
        ],
        [
            "a sapphire crystal",
            "an automatic movement",
            "two hundred metres water resistance",
            "a leather band",
            "a luminous dial",
            "a titanium case",
        ],
    ),
    "stationery": (
        [
            "fountain pen",
            "dotted notebook",
            "gel pens",
            "desk organizer",
            "sketchbook",
            "planner",
            "washi tape",
            "ink bottle",
        ],
        ["acid-free paper", "a fine nib", "a lay-flat binding", "a elastic closure", "archival ink", "a hard cover"],
    ),
    "power tools": (
        [
            "cordless drill",
            "circular saw",
            "impact driver",
            "orbital sander",
            "jigsaw",
            "angle grinder",
            "heat gun",
            "rotary tool",
        ],
        ["a brushless motor", "two batteries", "a LED work light", "a dust port", "variable speed", "a carry case"],
    ),
    "toys": (
        [
            "building blocks",
            "plush bear",
            "toy train",
            "puzzle cube",
            "remote control car",
            "doll house",
            "science kit",
            "kite",
        ],
        [
            "non-toxic paint",
            "a hundred pieces",
            "rechargeable batteries",
            "a storage box",
            "ages six and up",
            "a glow-in-the-dark finish",
        ],
    ),
    "vinyl records": (
        [
            "jazz record",
            "soul record",
            "blues record",
            "funk record",
            "ambient record",
            "folk record",
            "classical record",
            "hip hop record",
        ],
        [
            "a remastered pressing",
            "a gatefold sleeve",
            "a limited edition",
            "liner notes",
            "a 180 gram disc",
            "a live recording",
        ],
    ),
    "cookbooks": (
        [
            "vegetarian cookbook",
            "baking cookbook",
            "italian cookbook",
            "grilling cookbook",
            "japanese cookbook",
            "weeknight cookbook",
            "vegan cookbook",
            "soup cookbook",
        ],
        [
            "a hundred recipes",
            "step-by-step photos",
            "a chef's foreword",
            "seasonal menus",
            "a lay-flat spine",
            "a pantry guide",
        ],
    ),
    "home audio": (
        [
            "bookshelf speakers",
            "soundbar",
            "turntable",
            "subwoofer",
            "stereo amplifier",
            "smart speaker",
            "DAC",
            "speaker stands",
        ],
        [
            "bluetooth streaming",
            "a walnut finish",
            "a phono preamp",
            "room correction",
            "a remote control",
            "optical input",
        ],
    ),
}
STYLES = [
    "vintage",
    "minimalist",
    "rugged",
    "premium",
    "compact",
    "classic",
    "modern",
    "eco-friendly",
    "professional",
    "playful",
]
COLOURS = ["black", "white", "red", "navy", "forest green", "sand", "grey", "orange", "teal", "burgundy"]
_SYLLABLES_A = [
    "Nor",
    "Al",
    "Bel",
    "Cor",
    "Dra",
    "El",
    "Fen",
    "Gal",
    "Hal",
    "Ist",
    "Jun",
    "Kal",
    "Lum",
    "Mar",
    "Nov",
    "Or",
    "Pel",
    "Quen",
    "Ros",
    "Sol",
    "Tor",
    "Ul",
    "Val",
    "Wen",
    "Xan",
    "Yor",
    "Zel",
]
_SYLLABLES_B = [
    "vik",
    "tra",
    "den",
    "mont",
    "ora",
    "stad",
    "wick",
    "ley",
    "ton",
    "ria",
    "holm",
    "dor",
    "ix",
    "wyn",
    "ford",
    "ano",
]
BRANDS_PER_CATEGORY = 6
BASE_TIMESTAMP = 1_672_531_200  # 2023-01-01T00:00:00Z: fixed, so the bytes never depend on the clock
SPAN_DAYS = 240

# Behaviour of the walk (fixed: they define the dataset, params only size it).
P_STAY_CATEGORY = 0.7
P_EXPLORE = 0.1  # when leaving the category: any category instead of a liked one
P_SAME_BRAND = 0.3  # when staying: same brand as the previous item
P_PREFERRED_STYLE = 0.5  # otherwise: the user's style within the category
P_DRIFT = 0.04  # per step: one liked category is replaced
P_TIE = 0.1  # consecutive interactions logged in the same second (exercises the tie rule)
LATE_BOOST = 4.0  # popularity multiplier of the late-launched items where they may be bought


def _brand_names(rng: np.random.Generator, n: int) -> np.ndarray:
    combos = np.array([a + b for a in _SYLLABLES_A for b in _SYLLABLES_B])
    return combos[rng.permutation(len(combos))[:n]]


def _group_sampler(keys: np.ndarray, weights: np.ndarray, n_groups: int):
    """Vectorised weighted sampling within groups: returns sample(group_ids, u) -> item indices.

    Items are sorted by group; each item's cumulative weight within its group is
    normalised to (0, 1] and shifted by the group id, so one searchsorted over
    ``group + u`` lands inside the right group.
    """
    order = np.argsort(keys, kind="stable")
    k, w = keys[order], weights[order]
    sizes = np.bincount(k, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    csum = np.cumsum(w)
    group_total = np.add.reduceat(w, starts[sizes > 0]) if len(w) else np.zeros(0)
    totals = np.zeros(n_groups)
    totals[sizes > 0] = group_total
    before = np.concatenate([[0.0], csum])[starts]  # cumulative weight before each group
    within = (csum - before[k]) / totals[k]
    key_cum = k + np.minimum(within, 1.0)

    def sample(groups: np.ndarray, u: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(key_cum, groups + u, side="right")
        return order[np.minimum(pos, len(order) - 1)]

    return sample, sizes


def generate(p: SynthConfig) -> RawTables:
    if p.n_items < 1 or p.n_users < 1:
        raise ValueError("synth.n_items and synth.n_users must be >= 1")
    if not 1 <= p.min_seq_len <= p.max_seq_len:
        raise ValueError("synth: need 1 <= min_seq_len <= max_seq_len")
    if not 0.0 <= p.new_item_share < 1.0:
        raise ValueError(f"synth.new_item_share must be in [0, 1), got {p.new_item_share}")
    rng = np.random.default_rng(p.seed)
    cats = list(CATALOGUE)
    n_cat, n_sty, n_col = len(cats), len(STYLES), len(COLOURS)

    # ---- catalogue
    cat_w = rng.dirichlet(np.full(n_cat, 4.0))
    item_cat = rng.choice(n_cat, size=p.n_items, p=cat_w)
    brand_w = 1.0 / np.arange(1, BRANDS_PER_CATEGORY + 1)
    item_brand = item_cat * BRANDS_PER_CATEGORY + rng.choice(
        BRANDS_PER_CATEGORY, size=p.n_items, p=brand_w / brand_w.sum()
    )
    item_noun = rng.integers(0, 8, size=p.n_items)
    item_feat = rng.integers(0, 6, size=p.n_items)
    item_style = rng.integers(0, n_sty, size=p.n_items)
    item_colour = rng.integers(0, n_col, size=p.n_items)
    item_pop = rng.lognormal(0.0, 1.0, size=p.n_items)
    late = np.zeros(p.n_items, dtype=bool)  # launched late: only the last two interactions may buy them
    late[rng.choice(p.n_items, size=int(round(p.new_item_share * p.n_items)), replace=False)] = True
    item_pop = np.where(late, item_pop * LATE_BOOST, item_pop)
    brands = _brand_names(rng, n_cat * BRANDS_PER_CATEGORY)

    nouns = np.array([CATALOGUE[c][0][j] for c in cats for j in range(8)], dtype=object)
    feats = np.array([CATALOGUE[c][1][j] for c in cats for j in range(6)], dtype=object)
    noun = nouns[item_cat * 8 + item_noun]
    style = np.array(STYLES, dtype=object)[item_style]
    colour = np.array(COLOURS, dtype=object)[item_colour]
    brand = brands.astype(object)[item_brand]
    cat_name = np.array(cats, dtype=object)[item_cat]
    title = (
        brand
        + " "
        + np.array([s.capitalize() for s in STYLES], dtype=object)[item_style]
        + " "
        + np.array([w.title() for w in nouns], dtype=object)[item_cat * 8 + item_noun]
    )
    tag = cat_name + ", " + style + ", " + colour
    article = np.where(np.isin(colour.astype(str), ["orange"]), "An ", "A ")
    description = article + colour + " " + noun + " with " + feats[item_cat * 6 + item_feat] + "."
    width = len(str(p.n_items))
    item_ids = np.array([f"i{j:0{width}d}" for j in range(1, p.n_items + 1)], dtype=object)

    # ---- users
    n_pref = 3
    present = np.bincount(item_cat, minlength=n_cat) > 0
    cat_pick_w = np.where(present, cat_w, 0.0)
    cat_pick_w /= cat_pick_w.sum()
    gumbel = rng.gumbel(size=(p.n_users, n_cat)) + np.log(np.where(present, cat_w, 1e-300))
    prefs = np.argsort(-gumbel, axis=1)[:, :n_pref]  # liked categories, without replacement
    prefs = np.where(present[prefs], prefs, prefs[:, :1])  # tiny catalogues: never like an empty category
    pref_w = rng.dirichlet(np.ones(n_pref), size=p.n_users)
    user_style = rng.integers(0, n_sty, size=p.n_users)
    lengths = rng.integers(p.min_seq_len, p.max_seq_len + 1, size=p.n_users)
    T = int(lengths.max())

    by_cat, cat_sizes = _group_sampler(item_cat, item_pop, n_cat)
    by_cs, cs_sizes = _group_sampler(item_cat * n_sty + item_style, item_pop, n_cat * n_sty)
    by_brand, _ = _group_sampler(item_brand, item_pop, n_cat * BRANDS_PER_CATEGORY)

    def pick_pref(rows: np.ndarray) -> np.ndarray:
        u = rng.random(len(rows))
        slot = (u[:, None] > np.cumsum(pref_w[rows], axis=1)).sum(axis=1)
        return prefs[rows, np.minimum(slot, n_pref - 1)]

    seq = np.zeros((p.n_users, T), dtype=np.int64)
    repeat = np.zeros((p.n_users, T), dtype=bool)  # item already in the history after all re-draws
    users = np.arange(p.n_users)
    cur_cat = pick_pref(users)
    from tqdm.auto import tqdm

    for t in tqdm(range(T), desc="synth", unit="step", disable=None if p.n_users >= 100_000 else True):
        # interest drift: one liked category is replaced by a random one
        drift = rng.random(p.n_users) < P_DRIFT
        if drift.any():
            rows = np.nonzero(drift)[0]
            prefs[rows, rng.integers(0, n_pref, size=len(rows))] = rng.choice(n_cat, size=len(rows), p=cat_pick_w)
        if t > 0:
            stay = rng.random(p.n_users) < P_STAY_CATEGORY
            explore = rng.random(p.n_users) < P_EXPLORE
            new_cat = np.where(explore, rng.choice(n_cat, size=p.n_users, p=cat_pick_w), pick_pref(users))
            cur_cat = np.where(stay, cur_cat, new_cat)
        else:
            stay = np.zeros(p.n_users, dtype=bool)
        prev = seq[:, t - 1] if t > 0 else np.zeros(p.n_users, dtype=np.int64)
        mode = rng.random(p.n_users)
        same_brand = stay & (mode < P_SAME_BRAND) & (item_cat[prev] == cur_cat)
        cs_key = cur_cat * n_sty + user_style
        use_style = ~same_brand & (mode < P_SAME_BRAND + P_PREFERRED_STYLE) & (cs_sizes[cs_key] > 0)

        def draw_pooled(rows: np.ndarray, u: np.ndarray) -> np.ndarray:
            """Each row's pool: its previous item's brand, its style within the category, or the category."""
            out = by_cat(cur_cat[rows], u)
            m = use_style[rows]
            out[m] = by_cs(cs_key[rows][m], u[m])
            m = same_brand[rows]
            out[m] = by_brand(item_brand[prev[rows][m]], u[m])
            return out

        chosen = draw_pooled(users, rng.random(p.n_users))
        early = t < lengths - 2  # a training position: no late-launched item yet

        def bad(rows: np.ndarray, draw: np.ndarray) -> np.ndarray:
            """Rows whose draw repeats their history or buys a late item before its launch."""
            again = (seq[rows, :t] == draw[:, None]).any(axis=1) if t else np.zeros(len(rows), dtype=bool)
            return again | (late[draw] & early[rows])

        # re-draw those rows (a few tries; a rare leftover late item simply becomes a seen one)
        rows = np.nonzero(bad(users, chosen))[0]
        for attempt in range(1, 8):
            if len(rows) == 0:
                break
            u = rng.random(len(rows))
            if attempt < 3:
                draw = draw_pooled(rows, u)
            else:  # small brand/style pools may be exhausted: widen to the whole category
                draw = by_cat(cur_cat[rows], u)
            chosen[rows] = draw
            rows = rows[bad(rows, draw)]
        rows = rows[(seq[rows, :t] == chosen[rows, None]).any(axis=1)] if t else rows[:0]
        repeat[rows, t] = True
        seq[:, t] = chosen

    # ---- timestamps: per-user start + gaps; some gaps are 0 (same-second logging)
    start = BASE_TIMESTAMP + rng.integers(0, SPAN_DAYS * 86_400 // 2, size=p.n_users)
    gaps = np.maximum(1, rng.exponential(1.5 * 86_400, size=(p.n_users, T))).astype(np.int64)
    gaps[rng.random((p.n_users, T)) < P_TIE] = 0
    gaps[:, 0] = 0
    gaps[repeat] = np.maximum(gaps[repeat], 1)  # a repeated item never shares a second: no duplicate rows
    ts = start[:, None] + np.cumsum(gaps, axis=1)

    valid = np.arange(T)[None, :] < lengths[:, None]
    u_idx = np.broadcast_to(users[:, None], (p.n_users, T))[valid]
    i_idx = seq[valid]
    t_all = ts[valid]
    # A shop's log: rows in time order; a stable sort keeps each user's same-second rows in the order they happened.
    order = np.argsort(t_all, kind="stable")
    uwidth = len(str(p.n_users))
    user_ids = np.array([f"u{j:0{uwidth}d}" for j in range(1, p.n_users + 1)], dtype=object)

    def ids(codes: np.ndarray, names: np.ndarray) -> pa.Array:  # strings materialised in Arrow, not Python
        return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(names, type=pa.string())).cast(
            pa.string()
        )

    interactions = pa.table(
        {
            "user_id": ids(u_idx[order], user_ids),
            "item_id": ids(i_idx[order], item_ids),
            "timestamp": pa.array(t_all[order], type=pa.int64()),
        }
    )
    items = pa.table(
        {
            "item_id": pa.array(item_ids, type=pa.string()),
            "title": pa.array(title, type=pa.string()),
            "tag": pa.array(tag, type=pa.string()),
            "description": pa.array(description, type=pa.string()),
        }
    )
    manifest = {
        "format": "synth",
        "params": asdict(p),
        "interactions": interactions.num_rows,
        "items": items.num_rows,
        "note": "synthetic shop generated by `hllm data synth`; see hllm/data/synth.py",
    }
    return RawTables(interactions, items, manifest)


def synthesize(cfg: Config, raw_dir: str | Path | None = None) -> Path:
    """Generate the default dataset into ``raw_dir`` (default ``paths.raw_dir``)."""
    tables = generate(cfg.synth)
    out = write_raw(tables, raw_dir or cfg.paths.raw_dir)
    log.info(
        "synthesised %d interactions, %d users, %d items -> %s",
        tables.interactions.num_rows,
        cfg.synth.n_users,
        tables.items.num_rows,
        out,
    )
    return out
