"""Rearrangements of subjects for permutation tests.

A rearrangement acts on the subjects' rows: a permutation (row ``i`` takes the data of
subject ``order[i]``), a sign flip (row ``i`` is multiplied by ``signs[i]``), or both.
With exchangeability blocks (repeated measures, families), permutations stay within
each block (``whole=False``) or move whole blocks of equal size, keeping the order
inside them (``whole=True``); sign flips are per subject (within) or per block (whole).

Every rearrangement has a rank in ``[0, total)``, rank 0 being the identity:
``rank = permutation_rank * n_sign_patterns + sign_rank``, the sign rank's bits being
the flipped units and a block's permutation rank its Lehmer code (blocks combined in
mixed radix). So the set is fixed by the ranks, whatever the batches:

- ``total <= n_perm``: all of them, an exact test (as FSL randomise and PALM do);
- else ``n_perm`` distinct ranks drawn from ``seed`` (the identity always first), while
  ranks fit in 63 bits;
- else (many subjects) rearrangements drawn independently from ``seed`` in fixed
  draws of :data:`DRAW` rows, where repeats have negligible probability.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from bigglm.exceptions import DesignError

__all__ = ["DRAW", "Rearrangements", "rearrangements"]

logger = logging.getLogger(__name__)

#: Rows per independent draw when rearrangements are too many to rank.
DRAW = 256

_RANKABLE = 2**62


@dataclass(frozen=True, eq=False)
class Rearrangements:
    """A fixed set of ``count`` rearrangements of ``n_subjects`` rows (identity first).

    Build one with :func:`rearrangements`; :meth:`rows` gives any range of them.
    """

    n_subjects: int
    flips: bool
    permutes: bool
    blocks: tuple[np.ndarray, ...]
    whole: bool
    total: int
    count: int
    exact: bool
    seed: int
    ranks: np.ndarray | None

    @property
    def n_sign_units(self) -> int:
        """Units flipped together: subjects, or whole blocks."""
        return len(self.blocks) if self.whole else self.n_subjects

    def rows(self, start: int, stop: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Rearrangements ``start`` to ``stop - 1``.

        Returns
        -------
        order : (B, n) int64 array or None
            Row ``i`` of rearrangement ``b`` takes subject ``order[b, i]`` (None: no
            permutation).
        signs : (B, n) float64 array or None
            Row ``i`` is multiplied by ``signs[b, i]`` (None: no sign flips).

        Examples
        --------
        >>> r = rearrangements(3, scheme="signflip", n_perm=100)
        >>> order, signs = r.rows(0, r.count)
        >>> order is None, signs.shape, r.exact
        (True, (8, 3), True)
        >>> signs[:2].tolist()
        [[1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]]
        """
        if not 0 <= start <= stop <= self.count:
            raise IndexError(f"rows {start}:{stop} of {self.count} rearrangements")
        if self.ranks is not None:
            return self._decode(self.ranks[start:stop])
        return self._drawn(start, stop)

    # --- ranked -------------------------------------------------------------------
    def _decode(self, ranks: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        n_patterns = 2**self.n_sign_units if self.flips else 1
        sign_ranks = ranks % n_patterns
        perm_ranks = ranks // n_patterns
        signs = self._signs_of(sign_ranks) if self.flips else None
        order = self._orders_of(perm_ranks) if self.permutes else None
        return order, signs

    def _signs_of(self, sign_ranks: np.ndarray) -> np.ndarray:
        bits = (sign_ranks[:, None] >> np.arange(self.n_sign_units, dtype=np.int64)) & 1
        return self._unit_signs(1.0 - 2.0 * bits)

    def _unit_signs(self, unit_signs: np.ndarray) -> np.ndarray:
        """Per-subject signs from per-unit signs."""
        if not self.whole:
            return unit_signs
        signs = np.empty((unit_signs.shape[0], self.n_subjects))
        for b, members in enumerate(self.blocks):
            signs[:, members] = unit_signs[:, b : b + 1]
        return signs

    def _orders_of(self, perm_ranks: np.ndarray) -> np.ndarray:
        order = np.empty((perm_ranks.size, self.n_subjects), dtype=np.int64)
        for row, rank in enumerate(perm_ranks.tolist()):
            order[row] = self._order_of(int(rank))
        return order

    def _order_of(self, rank: int) -> np.ndarray:
        order = np.arange(self.n_subjects)
        if self.whole:
            moved = _unrank(rank, len(self.blocks))
            return np.concatenate([self.blocks[b] for b in moved])
        for members in self.blocks:
            rank, own = divmod(rank, math.factorial(members.size))
            order[members] = members[_unrank(own, members.size)]
        return order

    # --- drawn --------------------------------------------------------------------
    def _drawn(self, start: int, stop: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        if stop == start:
            return _empty(0, self), _empty(1, self)
        first, last = start // DRAW, (stop - 1) // DRAW
        pieces = [self._draw(d) for d in range(first, last + 1)]
        lo = start - first * DRAW

        def cut(k: int) -> np.ndarray | None:
            if pieces[0][k] is None:
                return None
            return np.concatenate([p[k] for p in pieces])[lo : lo + stop - start]

        return cut(0), cut(1)

    def _draw(self, index: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        rng = np.random.default_rng([self.seed, index])
        order = signs = None
        if self.permutes:
            order = np.empty((DRAW, self.n_subjects), dtype=np.int64)
            if self.whole:
                moved = rng.permuted(np.tile(np.arange(len(self.blocks)), (DRAW, 1)), axis=1)
                for row in range(DRAW):
                    order[row] = np.concatenate([self.blocks[b] for b in moved[row]])
            else:
                for members in self.blocks:
                    order[:, members] = rng.permuted(np.tile(members, (DRAW, 1)), axis=1)
        if self.flips:
            count = DRAW * self.n_sign_units
            raw = np.frombuffer(rng.bytes(-(-count // 8)), dtype=np.uint8)
            units = np.unpackbits(raw, count=count).reshape(DRAW, self.n_sign_units)
            signs = self._unit_signs(1.0 - 2.0 * units)
        if index == 0:  # the identity comes first
            if order is not None:
                order[0] = np.arange(self.n_subjects)
            if signs is not None:
                signs[0] = 1.0
        return order, signs


def _empty(k: int, r: Rearrangements) -> np.ndarray | None:
    wanted = r.permutes if k == 0 else r.flips
    if not wanted:
        return None
    dtype = np.int64 if k == 0 else np.float64
    return np.empty((0, r.n_subjects), dtype=dtype)


def _unrank(rank: int, k: int) -> np.ndarray:
    """The permutation of ``range(k)`` whose Lehmer code is ``rank`` (0: identity)."""
    items = list(range(k))
    out = []
    for i in range(k):
        digit, rank = divmod(rank, math.factorial(k - 1 - i))
        out.append(items.pop(digit))
    return np.asarray(out, dtype=np.int64)


def rearrangements(
    n_subjects: int,
    *,
    scheme: Literal["signflip", "permute", "both"],
    n_perm: int = 10000,
    blocks: np.ndarray | None = None,
    whole: bool = False,
    seed: int | None = None,
) -> Rearrangements:
    """The rearrangements of a permutation test: all of them if few, else drawn.

    Parameters
    ----------
    n_subjects : int
    scheme : {"signflip", "permute", "both"}
    n_perm : int
        Rearrangements wanted, the identity included. When there are at most this many
        distinct ones, all are used (an exact test).
    blocks : array of n_subjects labels, optional
        Exchangeability blocks (default: one block of all subjects).
    whole : bool
        Move (and flip) whole blocks instead of subjects within blocks.
    seed : int, optional
        Seeds the draws (default: a fresh random seed, logged). The same seed gives the
        same rearrangements whatever the batching.

    Returns
    -------
    Rearrangements

    Raises
    ------
    DesignError
        For fewer than 2 rearrangements, an unknown scheme, blocks of the wrong length,
        or whole-block permutations of blocks of unequal sizes.

    Examples
    --------
    >>> r = rearrangements(12, scheme="signflip", n_perm=10000, seed=0)
    >>> r.count, r.total, r.exact
    (4096, 4096, True)
    >>> r = rearrangements(30, scheme="permute", n_perm=1000, seed=0)
    >>> r.count, r.exact
    (1000, False)
    """
    if scheme not in ("signflip", "permute", "both"):
        raise DesignError(f"scheme={scheme!r}; expected 'signflip', 'permute' or 'both'")
    if isinstance(n_perm, bool) or not isinstance(n_perm, int | np.integer) or n_perm < 2:
        raise DesignError(f"n_perm={n_perm!r}; give an integer of at least 2")
    members = _blocks(blocks, n_subjects)
    if whole and scheme != "signflip" and len({m.size for m in members}) > 1:
        sizes = sorted({m.size for m in members})
        raise DesignError(
            f"whole-block permutations need blocks of one size; found sizes {sizes}: use "
            "whole=False (within-block) or equal blocks"
        )
    flips, permutes = scheme in ("signflip", "both"), scheme in ("permute", "both")
    units = len(members) if whole else n_subjects
    total = (2**units if flips else 1) * (_n_orders(members, whole) if permutes else 1)
    if total < 2:
        raise DesignError(
            f"only {total} rearrangement of {n_subjects} subjects with these blocks: "
            "nothing to test against"
        )
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(2, np.uint32).view(np.uint64)[0]) >> 1
        logger.info("permutation seed %d (pass seed= to repeat)", seed)
    exact = total <= n_perm
    count = total if exact else int(n_perm)
    ranks = _ranks(total, count, exact, int(seed))
    return Rearrangements(
        n_subjects, flips, permutes, tuple(members), whole, total, count, exact, int(seed), ranks
    )


def _blocks(blocks: np.ndarray | None, n_subjects: int) -> list[np.ndarray]:
    if blocks is None:
        return [np.arange(n_subjects)]
    labels = np.asarray(blocks)
    if labels.shape != (n_subjects,):
        raise DesignError(
            f"blocks has {labels.size} labels for {n_subjects} subjects; give one per subject"
        )
    codes = np.unique(labels, return_inverse=True)[1].ravel()
    return [np.flatnonzero(codes == b) for b in range(int(np.max(codes)) + 1)]


def _n_orders(members: list[np.ndarray], whole: bool) -> int:
    if whole:
        return math.factorial(len(members))
    return math.prod(math.factorial(m.size) for m in members)


def _ranks(total: int, count: int, exact: bool, seed: int) -> np.ndarray | None:
    if exact:
        return np.arange(total, dtype=np.int64)
    if total >= _RANKABLE:
        return None
    rng = np.random.default_rng([seed, 2**32])
    drawn = rng.choice(total - 1, size=count - 1, replace=False) + 1
    return np.concatenate([[0], drawn]).astype(np.int64)
