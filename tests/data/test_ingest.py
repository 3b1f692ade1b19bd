"""Importers: each format lands in the canonical layout with exact values; columns are found by name."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest

from hllm.data.errors import DataError
from hllm.data.ingest import import_dataset, read_source
from hllm.data.raw import read_raw
from tests.helpers.datakit import FORMATS


def frames(tables):
    return tables.interactions.to_pandas(), tables.items.to_pandas()


def rows(df, cols):
    return [tuple(None if pd.isna(v) else v for v in r) for r in df[cols].itertuples(index=False)]


def test_hllm_reference_csvs(cfg):
    res = import_dataset(cfg, "hllm", [FORMATS / "hllm"])
    assert (res.interactions, res.items) == (21, 9) and res.validation.passed
    raw = read_raw(cfg.paths.raw_dir)
    inter, items = frames(raw)
    assert raw.interactions.schema.names == ["user_id", "item_id", "timestamp"]
    assert str(raw.interactions.schema.field("timestamp").type) == "int64"
    # file order is preserved exactly (the build's tie rule depends on it)
    assert rows(inter, ["user_id", "item_id", "timestamp"])[:6] == [
        ("u1", "i1", 100),
        ("u1", "i2", 100),
        ("u2", "i3", 105),
        ("u2", "i1", 110),
        ("u1", "i3", 120),
        ("u1", "i4", 90),
    ]
    assert rows(items, ["item_id", "title", "tag", "description"])[:4] == [
        ("i1", "Trail Backpack", "hiking, outdoor", "A light 30 litre pack."),
        ("i2", "Camp Stove", "camping, cooking", "Folds small; boils a litre in 3 minutes."),
        ("i3", "Espresso Beans", "coffee", "Dark roast with notes of chocolate."),
        ("i4", "Pour-over Kettle", "coffee", None),
    ]
    assert raw.manifest["format"] == "hllm"
    assert [s["name"] for s in raw.manifest["sources"]] == ["interactions.csv", "items.csv"]


def test_hllm_columns_are_found_by_name_not_position(tmp_path):
    (tmp_path / "inter.csv").write_text("timestamp,user_id,item_id\n5,u1,i1\n6,u1,i2\n")
    (tmp_path / "info.csv").write_text("description,item_id,title\nd1,i1,t1\nd2,i2,t2\n")
    inter, items = frames(read_source("hllm", [tmp_path / "inter.csv", tmp_path / "info.csv"]))
    assert rows(inter, ["user_id", "item_id", "timestamp"]) == [("u1", "i1", 5), ("u1", "i2", 6)]
    assert rows(items, ["item_id", "title", "description"]) == [("i1", "t1", "d1"), ("i2", "t2", "d2")]


def test_amazon_snap_ratings_and_2014_metadata(cfg):
    import_dataset(cfg, "amazon", [FORMATS / "amazon"])
    inter, items = frames(read_raw(cfg.paths.raw_dir))
    assert rows(inter, ["user_id", "item_id", "timestamp"])[:3] == [
        ("A1", "B001", 1356998400),
        ("A1", "B002", 1357084800),
        ("A1", "B003", 1357084800),
    ]
    assert len(inter) == 9
    assert rows(items, ["item_id", "title", "tag", "description"]) == [
        ("B001", "The Hobbit", "Books, Fantasy, Classics", "A hobbit goes on an adventure."),
        ("B002", "Ender's Game", "Books, Science Fiction", None),
        ("B003", "Dune", "Books, Science Fiction", "Spice and sand."),
        ("B004", "Emma", "Books, Romance", "A novel by Jane Austen."),
        ("B005", "Nobody Rated This", "Books", None),
    ]


def test_amazon_ratings_with_header_and_gzipped_reviews(tmp_path):
    (tmp_path / "ratings.csv").write_text("item,user,rating,timestamp\nB1,A1,5,100\n")
    with gzip.open(tmp_path / "reviews.json.gz", "wt") as f:
        f.write(json.dumps({"reviewerID": "A2", "asin": "B1", "unixReviewTime": 200}) + "\n")
    (tmp_path / "meta.jsonl").write_text(json.dumps({"asin": "B1", "title": "T"}) + "\n")
    inter, items = frames(read_source("amazon", [tmp_path]))
    assert rows(inter, ["user_id", "item_id", "timestamp"]) == [("A1", "B1", 100), ("A2", "B1", 200)]
    assert rows(items, ["item_id", "title"]) == [("B1", "T")]


def test_movielens_100k_latin1_genres_and_release_date(cfg):
    import_dataset(cfg, "movielens", [FORMATS / "movielens-100k"])
    raw = read_raw(cfg.paths.raw_dir)
    inter, items = frames(raw)
    assert rows(inter, ["user_id", "item_id", "timestamp"])[3:5] == [("2", "1", 888551250), ("2", "3", 888551250)]
    assert rows(items, ["item_id", "title", "tag", "description"]) == [
        ("1", "Toy Story (1995)", "Animation, Children's, Comedy", "Released 01-Jan-1995."),
        ("2", "GoldenEye (1995)", "Action, Adventure, Thriller", "Released 01-Jan-1995."),
        ("3", "Café au lait (1994)", "Comedy", "Released 01-Jan-1994."),
        ("4", "unknown", "unknown", None),
    ]
    assert raw.manifest["version"] == "ml-100k"
    assert [s["name"] for s in raw.manifest["sources"]] == ["u.data", "u.item", "u.genre"]


def test_movielens_1m_double_colon_files(cfg):
    import_dataset(
        cfg, "movielens", [FORMATS / "movielens-1m" / "ratings.dat", FORMATS / "movielens-1m" / "movies.dat"]
    )
    inter, items = frames(read_raw(cfg.paths.raw_dir))
    assert rows(inter, ["user_id", "item_id", "timestamp"])[:2] == [("1", "1193", 978300760), ("1", "661", 978302109)]
    assert rows(items, ["item_id", "title", "tag"]) == [
        ("1193", "One Flew Over the Cuckoo's Nest (1975)", "Drama"),
        ("661", "James and the Giant Peach (1996)", "Animation, Children's, Musical"),
        ("914", "My Fair Lady (1964)", "Musical, Romance"),
        ("3408", "Erin Brockovich (2000)", "Drama"),
        ("2905", "Château, The (2001)", "Comedy"),
    ]
    assert items["description"].isna().all()


def test_recbole_atomic_files_map_fields_by_name(cfg):
    import_dataset(cfg, "recbole", [FORMATS / "recbole"])
    raw = read_raw(cfg.paths.raw_dir)
    inter, items = frames(raw)
    # float timestamps ("881250950.0") become integer seconds
    assert rows(inter, ["user_id", "item_id", "timestamp"])[:2] == [("1", "10", 881250949), ("1", "20", 881250950)]
    assert list(items.columns) == ["item_id", "title", "tag", "release_year"]
    assert rows(items, ["item_id", "title", "tag", "release_year"])[:2] == [
        ("10", "Toy Story", "Animation, Children's, Comedy", "1995"),
        ("20", "GoldenEye", "Action, Adventure, Thriller", "1995"),
    ]
    assert raw.manifest["field_mapping"] == {"title": "movie_title", "tag": "class"}


def test_unknown_format_and_wrong_file_sets_are_named(tmp_path):
    with pytest.raises(DataError, match="unknown format 'csv'"):
        read_source("csv", [FORMATS / "hllm"])
    with pytest.raises(DataError, match=r"u\.data \+ u\.item"):
        read_source("movielens", [FORMATS / "hllm"])
    with pytest.raises(DataError, match=r"\.inter and a \.item"):
        read_source("recbole", [FORMATS / "movielens-1m"])
    with pytest.raises(DataError, match="exactly one interactions CSV"):
        read_source("hllm", [FORMATS / "hllm" / "items.csv"])
    with pytest.raises(DataError, match="no such file"):
        read_source("hllm", [tmp_path / "nope.csv"])


def test_drop_duplicates_keeps_first_row(cfg, tmp_path):
    (tmp_path / "i.csv").write_text(
        "item_id,user_id,timestamp\n" + "".join(f"i{k},u1,{t}\n" for k, t in [(1, 1), (2, 2), (2, 2), (3, 3)])
    )
    (tmp_path / "t.csv").write_text("item_id,title\ni1,a\ni2,b\ni3,c\n")
    res = import_dataset(cfg, "hllm", [tmp_path / "i.csv", tmp_path / "t.csv"], drop_duplicates=True)
    raw = read_raw(cfg.paths.raw_dir)
    assert res.interactions == 3 and raw.manifest["dropped_duplicates"] == 1
    assert raw.interactions.column("item_id").to_pylist() == ["i1", "i2", "i3"]
