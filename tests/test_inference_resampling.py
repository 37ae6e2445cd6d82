"""Rearrangements: exact enumeration, seeded draws, exchangeability blocks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from bigglm.exceptions import DesignError
from bigglm.inference.resampling import DRAW, rearrangements


def _as_tuples(order: np.ndarray | None, signs: np.ndarray | None) -> set[tuple[float, ...]]:
    parts = [p for p in (order, signs) if p is not None]
    return {tuple(row) for row in np.concatenate(parts, axis=1).tolist()}


def test_exact_sign_flips_are_every_pattern_once_identity_first() -> None:
    r = rearrangements(10, scheme="signflip", n_perm=5000, seed=3)
    assert r.exact and r.count == r.total == 1024
    order, signs = r.rows(0, r.count)
    assert order is None
    assert _as_tuples(None, signs) == set(itertools.product((1.0, -1.0), repeat=10))
    assert (signs[0] == 1.0).all()


def test_exact_permutations_are_every_order_once() -> None:
    r = rearrangements(6, scheme="permute", n_perm=720, seed=0)
    assert r.exact and r.count == 720
    order, signs = r.rows(0, r.count)
    assert signs is None
    assert _as_tuples(order, None) == set(itertools.permutations(range(6)))
    assert order[0].tolist() == list(range(6))


def test_both_multiplies_the_counts() -> None:
    r = rearrangements(4, scheme="both", n_perm=10_000)
    assert r.total == math.factorial(4) * 2**4 and r.exact
    assert len(_as_tuples(*r.rows(0, r.count))) == r.total


@pytest.mark.parametrize(("n", "scheme"), [(14, "signflip"), (9, "permute"), (7, "both")])
def test_sampled_ranks_are_distinct_seeded_and_batch_free(n: int, scheme: str) -> None:
    r = rearrangements(n, scheme=scheme, n_perm=1000, seed=11)  # type: ignore[arg-type]
    assert not r.exact and r.count == 1000
    whole = r.rows(0, 1000)
    assert len(_as_tuples(*whole)) == 1000  # no repeats, though 1000 of ~16,000-362,880
    again = rearrangements(n, scheme=scheme, n_perm=1000, seed=11)  # type: ignore[arg-type]
    pieces = [again.rows(lo, hi) for lo, hi in ((0, 37), (37, 500), (500, 1000))]
    for k in range(2):
        if whole[k] is not None:
            np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in pieces]))
    other = rearrangements(n, scheme=scheme, n_perm=1000, seed=12)  # type: ignore[arg-type]
    assert _as_tuples(*other.rows(0, 1000)) != _as_tuples(*whole)


def test_draws_for_many_subjects_are_batch_free_identity_first() -> None:
    r = rearrangements(100, scheme="both", n_perm=3 * DRAW + 5, seed=2)
    assert r.ranks is None  # 100! * 2^100 rearrangements: drawn, not ranked
    order, signs = r.rows(0, r.count)
    assert order[0].tolist() == list(range(100)) and (signs[0] == 1).all()
    assert (np.sort(order, axis=1) == np.arange(100)).all()
    assert set(np.unique(signs)) == {-1.0, 1.0}
    o2, s2 = r.rows(DRAW - 3, 2 * DRAW + 4)
    np.testing.assert_array_equal(o2, order[DRAW - 3 : 2 * DRAW + 4])
    np.testing.assert_array_equal(s2, signs[DRAW - 3 : 2 * DRAW + 4])
    assert len(_as_tuples(order, signs)) == r.count


def test_within_block_permutations_stay_in_their_blocks() -> None:
    labels = np.array(["a", "b", "a", "c", "b", "a", "c", "c"])
    r = rearrangements(8, scheme="permute", n_perm=10_000, blocks=labels)
    assert r.total == math.factorial(3) ** 2 * math.factorial(2) and r.exact
    order, _ = r.rows(0, r.count)
    assert (labels[order] == labels).all()  # every row takes a subject of its own block
    assert len(_as_tuples(order, None)) == r.total


def test_whole_block_permutations_move_blocks_keeping_their_order() -> None:
    labels = np.repeat([0, 1, 2, 3], 3)
    r = rearrangements(12, scheme="permute", n_perm=10_000, blocks=labels, whole=True)
    assert r.total == 24 and r.exact
    order, _ = r.rows(0, r.count)
    for row in order:
        pieces = row.reshape(4, 3)
        assert (np.diff(pieces, axis=1) == 1).all() and (pieces[:, 0] % 3 == 0).all()
    assert len(_as_tuples(order, None)) == 24


def test_whole_block_sign_flips_flip_blocks_together() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2])
    r = rearrangements(6, scheme="signflip", n_perm=100, blocks=labels, whole=True)
    assert r.total == 8
    _, signs = r.rows(0, r.count)
    for b in range(3):
        members = signs[:, labels == b]
        assert (members == members[:, :1]).all()
    assert len(_as_tuples(None, signs)) == 8


def test_bad_inputs_get_one_message() -> None:
    with pytest.raises(DesignError, match="one size"):
        rearrangements(5, scheme="permute", blocks=np.array([0, 0, 1, 1, 1]), whole=True)
    with pytest.raises(DesignError, match="labels for 4 subjects"):
        rearrangements(4, scheme="permute", blocks=np.array([0, 1]))
    with pytest.raises(DesignError, match="scheme"):
        rearrangements(4, scheme="shuffle")  # type: ignore[arg-type]
    with pytest.raises(DesignError, match="only 1 rearrangement"):
        rearrangements(3, scheme="permute", blocks=np.array([0, 1, 2]))
    with pytest.raises(DesignError, match="n_perm"):
        rearrangements(4, scheme="signflip", n_perm=1)
