"""The split's pure parts: the byte-balanced assignment, ``I/N`` parsing and the done-file checks."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraformat.errors import UsageError
from loraformat.merging.shares import (
    DoneFileError,
    DoneRecord,
    ShardRecord,
    assign,
    parse_done,
    parse_share,
)


def test_largest_first_to_the_least_loaded_worker():
    # sizes 9 8 7 3 2 1 over 2 workers: 9->w0, 8->w1, 7->w1 (8<9), 3->w0, 2->w0 (12<15)... by bytes
    assert assign([9, 8, 7, 3, 2, 1], 2) == [[0, 3, 4, 5], [1, 2]]
    assert assign([5, 5, 5], 3) == [[0], [1], [2]]
    assert assign([5, 5], 4) == [[0], [1], [], []]  # more workers than shards: some write nothing


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10**12), max_size=60), st.integers(1, 20))
def test_every_shard_once_and_balanced(sizes, workers):
    shares = assign(sizes, workers)
    assert shares == assign(list(sizes), workers)  # a pure function: every worker computes the same
    assert sorted(k for s in shares for k in s) == list(range(len(sizes)))
    assert all(s == sorted(s) for s in shares)
    loads = [sum(sizes[k] for k in s) for s in shares]
    if sizes:  # greedy largest-first: the spread never exceeds the largest shard
        assert max(loads) - min(loads) <= max(sizes)


@pytest.mark.parametrize("text,expected", [("0/1", (0, 1)), ("3/8", (3, 8)), (" 7 / 8 ", (7, 8))])
def test_parse_share(text, expected):
    assert parse_share(text) == expected


@pytest.mark.parametrize("text", ["8/8", "1/0", "-1/4", "a/4", "1", "1/4/5", "", "0/999999", "1.0/4"])
def test_parse_share_refuses(text):
    with pytest.raises(UsageError, match="--shard"):
        parse_share(text)


PLAN = "ab" * 32
EXPECTED = [("model-00001-of-00003.safetensors", 100), ("model-00003-of-00003.safetensors", 40)]


def _done(**changes):
    doc = json.loads(
        DoneRecord(PLAN, 1, 2, tuple(ShardRecord(n, s, "0" * 64) for n, s in EXPECTED)).to_bytes()
    )
    doc.update(changes)
    return json.dumps(doc).encode()


def test_done_file_round_trip():
    record = parse_done(_done(), plan=PLAN, worker=1, workers=2, expected=EXPECTED)
    assert [s.name for s in record.shards] == [n for n, _ in EXPECTED] and record.worker == 1


@pytest.mark.parametrize(
    "data,match",
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "exactly the keys"),
        (_done(extra=1), "exactly the keys"),
        (_done(format="other/1"), "format"),
        (_done(plan="cd" * 32), "other inputs"),
        (_done(worker=0), "names worker 0/2"),
        (_done(worker=True), "names worker"),
        (_done(workers=3), "names worker"),
        (_done(shards=[]), "exactly the 2 shard"),
        (_done(shards="x"), "exactly the 2 shard"),
        (_done(shards=[{}, {}]), "shard must be"),
        (
            _done(shards=[{"name": "../../etc/passwd", "size": 100, "sha256": "0" * 64}] * 2),
            "where the plan assigns",
        ),
        (_done(shards=[{"name": EXPECTED[0][0], "size": 99, "sha256": "0" * 64}] * 2), "size 99"),
        (_done(shards=[{"name": EXPECTED[0][0], "size": True, "sha256": "0" * 64}] * 2), "size"),
        (_done(shards=[{"name": EXPECTED[0][0], "size": 100, "sha256": "XYZ"}] * 2), "sha256"),
        (b" " * (5 << 20), "more than a done-file"),
    ],
)
def test_done_file_refusals(data, match):
    with pytest.raises(DoneFileError, match=match):
        parse_done(data, plan=PLAN, worker=1, workers=2, expected=EXPECTED)
