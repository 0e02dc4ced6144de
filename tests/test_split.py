import pytest

from dogkit.data.split import parse_ratios, split_counts, stratified_split
from dogkit.errors import DogkitError


@pytest.mark.parametrize(
    ("n", "expected"),
    [(8, [6, 1, 1]), (5, [3, 1, 1]), (10, [7, 2, 1]), (20, [14, 3, 3]), (100, [70, 15, 15]), (7, [5, 1, 1]),
     (171, [120, 26, 25])],
)
def test_largest_remainder_counts(n, expected):
    counts = split_counts(n, (0.7, 0.15, 0.15))
    assert counts == expected
    assert sum(counts) == n
    for c, share in zip(counts, (0.7, 0.15, 0.15)):
        assert abs(c - n * share) < 1


def test_every_class_within_one_of_its_share_for_many_sizes():
    for n in range(5, 300):
        counts = split_counts(n, (0.7, 0.15, 0.15))
        assert sum(counts) == n and all(abs(c - n * r) < 1 for c, r in zip(counts, (0.7, 0.15, 0.15)))


def test_stratified_split_is_seeded_disjoint_and_stable_per_class():
    items = {f"c{k}": [f"c{k}/{i}.jpg" for i in range(20)] for k in range(4)}
    a = stratified_split(items, seed=1)
    assert a == stratified_split(items, seed=1)
    assert a != stratified_split(items, seed=2)
    assert set(a) == {x for xs in items.values() for x in xs}
    for k in range(4):
        assert [sum(1 for i in items[f"c{k}"] if a[i] == s) for s in ("train", "val", "test")] == [14, 3, 3]
    # Adding a class leaves the others' assignment untouched.
    more = dict(items, extra=[f"extra/{i}.jpg" for i in range(9)])
    b = stratified_split(more, seed=1)
    assert {k: v for k, v in b.items() if not k.startswith("extra/")} == a


def test_too_small_class_is_a_clear_error():
    items = {"big": [f"big/{i}" for i in range(10)], "tiny": ["tiny/a", "tiny/b", "tiny/c", "tiny/d"]}
    with pytest.raises(DogkitError, match=r"tiny \(4 images → 3/1/0\)"):
        stratified_split(items)


def test_parse_ratios():
    assert parse_ratios("70/15/15") == pytest.approx((0.7, 0.15, 0.15))
    assert parse_ratios("0.8,0.1,0.1") == pytest.approx((0.8, 0.1, 0.1))
    with pytest.raises(DogkitError):
        parse_ratios("70/30")
