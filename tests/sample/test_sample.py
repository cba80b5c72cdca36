"""The sample generator: seeded, labelled as specified, and streamed (memory does not grow with
the pool)."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections import Counter

from etl.sample import MIX, SampleBuilder


def fingerprint(pairs) -> list[tuple]:
    return [(p.key, p.url, p.text, hashlib.sha256(p.image or b"").hexdigest(), p.meta["label_kind"])
            for p in pairs]


def test_same_seed_same_pool_and_the_mix_is_exact():
    a = SampleBuilder(200, 6, seed=3).build().pool
    assert fingerprint(a) == fingerprint(SampleBuilder(200, 6, seed=3).pairs())
    assert fingerprint(a) != fingerprint(SampleBuilder(200, 6, seed=4).pairs())
    kinds = Counter(p.meta["label_kind"] for p in a)
    assert {k: kinds[k] for k in MIX} == {k: int(v * 200) for k, v in MIX.items()}
    assert kinds["clean"] == 200 - sum(int(v * 200) for v in MIX.values())
    assert [p.key for p in a] == [f"{i:09d}" for i in range(200)]


def test_duplicates_point_at_an_earlier_clean_pair():
    pool = SampleBuilder(300, 6, seed=1).build().pool
    seen: dict[str, str] = {}
    dups = 0
    for p in pool:
        if p.meta["label_kind"] in ("exact_dup", "near_dup"):
            assert seen.get(p.meta["label_of"]) == "clean", p
            dups += 1
        seen[p.url] = p.meta["label_kind"]
    exact = {p.url: p.image for p in pool}
    assert all(exact[p.meta["label_of"]] == p.image for p in pool
               if p.meta["label_kind"] == "exact_dup")
    assert dups == int(MIX["exact_dup"] * 300) + int(MIX["near_dup"] * 300)


def held_bytes(n: int) -> int:
    """Python memory the builder still holds after yielding its last pair."""
    tracemalloc.start()
    try:
        builder = SampleBuilder(n, 4, seed=0, recent=8)
        base = tracemalloc.get_traced_memory()[0]
        pairs = builder.pairs()
        for _ in pairs:
            pass
        return tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()


def test_generating_holds_a_bounded_window_not_the_pool():
    small, big = held_bytes(60), held_bytes(240)
    # the old builder kept every pair's bytes: 4x the pool was ~4x the memory
    assert big < 1.5 * small + 100_000, (small, big)
