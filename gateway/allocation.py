"""Share a dispatch among devices as a linear programme solved by HiGHS (pure, no I/O).

The planner (:mod:`gateway.dispatch`) asks, once per dispatch and control period: given each
device's headroom in the request's direction (ratings, reserve or maximum state of charge
spread over the rest of the window, an EV's remaining need), how much does each give so that
the group delivers the request, no envelope at any nesting level is pushed past its limit, and
the cheapest, least-called devices go first without reshuffling every period?

Each device ``i`` gives ``y_i`` kW in the request's direction (a shed's discharge or
curtailment, a load-up's charge), offered in equal slices ``z_is`` of its headroom, each
slice dearer than the last (a piecewise-linear spread, so alike devices share the request);
moving away from last period's allocation ``p_i`` (by ``u_i`` up or ``d_i`` down) is paid
for (an L1 churn term)::

    minimise   sum_is (c_i + s * spread) z_is + churn * sum_i (u_i + d_i) + shortfall_cost * e
    subject to sum_s z_is - u_i + d_i = p_i      for every device   (y_i = sum_s z_is)
               sum_i y_i + e = |request|                        (the request, e: its shortfall)
               sum_{i in L} y_i <= room_L       for every limit L   (envelopes: hard)
               0 <= z_is <= cap_i / steps,  u_i, d_i >= 0,  0 <= e

``c_i`` is the device's cost (its class's priority, its participation hours: fairness, and a
small term for its stored energy); a request the devices cannot meet gives the closest delivery
and says by how much it is short. The limit rows are the part of an envelope the request can
push on (a load-up against an import limit, a shed against an export limit): ``room_L`` is what
the rest of the group leaves of the limit, never negative. Where the request *relieves* an
envelope already passed (a shed in a feeder importing past its limit), the group's devices are
asked first for at least what it is past (``relief``: soft, at ``RELIEF_COST`` per kW not
given), so one kW does both jobs; what is left past the limit is the planner's to relieve (it
runs after the allocation and wins over it).

Devices alike (same cost, same limits) are solved as one, so 10,000 devices are a few hundred
columns and HiGHS takes milliseconds; :class:`Allocator` keeps the last solution of each
dispatch and skips the solver when nothing it reads has changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import scipy.optimize
import scipy.sparse

__all__ = [
    "CHURN_COST",
    "MIN_RESPONSE",
    "RELIEF_COST",
    "SHORTFALL_COST",
    "SPREAD_COST",
    "SPREAD_STEPS",
    "Allocator",
    "Limit",
    "Problem",
    "Solution",
    "solve",
]

_Floats = npt.NDArray[np.float64]

SHORTFALL_COST = 1_000.0
"""Per kW of the request not delivered: far above any device's cost, so every kW the devices
and limits allow is delivered."""

RELIEF_COST = 100.0
"""Per kW a group past an envelope is not relieved by the request: above any device's cost
(devices inside go first) and below ``SHORTFALL_COST`` (never a kW of the request less)."""

SPREAD_STEPS = 4
SPREAD_COST = 0.04
"""Each device's headroom is offered in ``SPREAD_STEPS`` equal slices, each this much dearer per
kW than the one before: among devices of a class the request is spread (every battery at a
quarter of its headroom before any goes further; a piecewise-linear stand-in for a quadratic
cost), so no single device carries it, and one that drops out takes little with it. Less than
a class step or an hour of fairness, so those still order the devices."""

MIN_RESPONSE = 0.2
"""A device's track record is never counted below this (delivering less, it is still asked,
last, rather than written off on a few bad readings)."""

CHURN_COST = 0.02
"""Per kW moved from a device's previous allocation: a device is swapped for a cheaper one only
when it saves more than twice this per kW (no reshuffle on a rounding difference)."""

_EPS = 1e-6


@dataclass(frozen=True, slots=True)
class Limit:
    """One envelope row: the devices ``members`` (indices into the problem's devices) may give
    together at most ``room_kw``."""

    name: str
    members: npt.NDArray[np.intp]
    room_kw: float


@dataclass(slots=True)
class Problem:
    """A dispatch's allocation, every quantity in kW in the request's direction (>= 0)."""

    request_kw: float
    cap: _Floats
    cost: _Floats
    previous: _Floats | None = None
    limits: Sequence[Limit] = ()
    churn_cost: float = CHURN_COST
    shortfall_cost: float = SHORTFALL_COST
    response: _Floats | None = None
    """What each device delivers per kW commanded (its track record, 0-1; 1 when not given):
    the request counts what is delivered, so a device that gives half costs twice per kW."""
    relief: Sequence[Limit] = ()
    """Groups past an envelope the request relieves (a shed under an import limit, a load-up
    under an export limit): their members should give at least ``room_kw`` (what the group is
    past its limit), at ``RELIEF_COST`` per kW they do not: the request is met where it also
    holds an envelope, before anywhere else."""


@dataclass(frozen=True, slots=True)
class Solution:
    kw: _Floats
    """Each device's allocation in the request's direction (>= 0, at most its cap)."""
    shortfall_kw: float
    binding: frozenset[str] = frozenset()
    """The limits at their room: they, not the devices, stopped a larger allocation."""
    solved: bool = True
    """False when the solver was skipped (nothing to allocate) or the last solution reused."""


def solve(problem: Problem) -> Solution:
    """The optimal allocation (HiGHS dual simplex through :func:`scipy.optimize.linprog`).

    Devices alike for the problem (the same cost, in the same limits) are one column: HiGHS
    sees one pair of columns per kind of device, not per device (10,000 batteries over 20
    feeders and a few cost steps are a few hundred columns: milliseconds), and each kind's
    allocation is shared back among its devices in proportion to their headroom. Raises
    :class:`AllocationError` when HiGHS reports anything but an optimum (it cannot for these
    problems: allocating nothing is always feasible)."""
    cap = np.maximum(np.nan_to_num(np.asarray(problem.cap, dtype=np.float64), nan=0.0), 0.0)
    cap[~np.isfinite(cap)] = 0.0
    n = cap.size
    want = max(0.0, float(problem.request_kw))
    if n == 0 or want <= _EPS:
        return Solution(np.zeros(n), round(want, 6), solved=False)
    prev = np.zeros(n) if problem.previous is None else np.clip(problem.previous, 0.0, cap)
    limits, relief = problem.limits, problem.relief
    rows = len(limits) + len(relief)
    # Devices with the same cost in the same limits are one column.
    member = np.zeros((n, rows), dtype=np.bool_)
    for r, limit in enumerate((*limits, *relief)):
        member[np.asarray(limit.members, dtype=np.intp), r] = True
    cost = np.asarray(problem.cost, dtype=np.float64)
    response = (
        np.ones(n)
        if problem.response is None
        else np.clip(np.nan_to_num(problem.response, nan=1.0), MIN_RESPONSE, 1.0)
    )
    of = _kinds(cost, response, member)
    k = int(of.max()) + 1
    cost_k = np.zeros(k)
    cost_k[of] = cost
    response_k = np.ones(k)
    response_k[of] = response
    member_k = np.zeros((k, rows))
    member_k[of] = member
    cap_k = np.bincount(of, cap, k).astype(np.float64)
    prev_k = np.bincount(of, prev, k).astype(np.float64)
    churn = problem.churn_cost
    f, steps = len(relief), SPREAD_STEPS
    # columns: z (steps x k: each kind's allocation in equal slices of its headroom, each
    # dearer than the last), u (k), d (k), s (1), relief short (f); y = sum(z) = prev + u - d
    c = np.concatenate(
        (
            *(cost_k + step * SPREAD_COST for step in range(steps)),
            np.full(2 * k, churn),
            [problem.shortfall_cost],
            np.full(f, RELIEF_COST),
        )
    )
    needs = [max(0.0, r.room_kw) for r in relief]
    z = steps * k
    bounds = np.zeros((z + 2 * k + 1 + f, 2))
    bounds[:z, 1] = np.tile(cap_k / steps, steps)
    bounds[z : z + k, 1] = cap_k
    bounds[z + k : z + 2 * k, 1] = prev_k
    bounds[z + 2 * k, 1] = want
    bounds[z + 2 * k + 1 :, 1] = needs
    sparse = scipy.sparse
    eye = sparse.identity(k, format="csr")
    slices = sparse.hstack([eye] * steps)
    a_eq = sparse.vstack(
        (
            sparse.hstack((slices, -eye, eye, sparse.csr_array((k, 1 + f)))),
            sparse.hstack(
                (
                    np.tile(response_k, steps)[np.newaxis, :],
                    sparse.csr_array((1, 2 * k)),
                    [[1.0]],
                    np.zeros((1, f)),
                )
            ),
        ),
        format="csr",
    )
    b_eq = np.append(prev_k, want)
    rooms = [max(0.0, limit.room_kw) for limit in limits]
    a_ub: scipy.sparse.csr_array | None = None
    b_ub: _Floats | None = None
    if rows:
        w = member_k.T  # rows x kinds: the limits, then the groups to relieve
        w[len(limits) :] *= -1.0  # at least: -sum(y) - short <= -need
        short = np.zeros((rows, 1 + f))
        short[len(limits) :, 1:] = -np.eye(f)
        a_ub = sparse.csr_array(np.hstack((np.tile(w, steps), np.zeros((rows, 2 * k)), short)))
        b_ub = np.concatenate((rooms, -np.array(needs)))
    result = scipy.optimize.linprog(
        c, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=bounds, method="highs"
    )
    if result.status != 0:
        raise AllocationError(str(result.message), int(result.status))
    x = np.asarray(result.x, dtype=np.float64)
    y_k = np.clip(x[:z].reshape(steps, k).sum(axis=0), 0.0, cap_k)
    y = _shared(y_k, of, cap, cap_k)
    binding: frozenset[str] = frozenset()
    if limits:
        slack = np.asarray(result.ineqlin.residual, dtype=np.float64).tolist()[: len(limits)]
        binding = frozenset(
            limit.name
            for limit, room, left in zip(limits, rooms, slack, strict=True)
            if left <= _EPS * max(1.0, room) and room < want
        )
    shortfall = max(0.0, want - float(y @ response))
    return Solution(y, round(shortfall, 6) if shortfall > 1e-4 else 0.0, binding)


def _kinds(
    cost: _Floats, response: _Floats, member: npt.NDArray[np.bool_]
) -> npt.NDArray[np.intp]:
    """Each device's kind (0..k-1): devices with the same cost and response in the same limits
    are one kind. 1-D sorts of integer codes (``np.unique(axis=0)`` sorts rows as bytes: 20×
    slower)."""
    _, code = np.unique(cost, return_inverse=True)
    code = code.reshape(-1).astype(np.int64)
    _, by_response = np.unique(response, return_inverse=True)
    by_response = by_response.reshape(-1).astype(np.int64)
    _, code = np.unique(code * (int(by_response.max()) + 1) + by_response, return_inverse=True)
    code = code.reshape(-1).astype(np.int64)
    rows = member.shape[1]
    for first in range(0, rows, 40):  # 40 limits at a time in the bits of one int64
        block = member[:, first : first + 40].astype(np.int64)
        bits = block @ (np.int64(1) << np.arange(block.shape[1], dtype=np.int64))
        _, code = np.unique(code * (np.int64(1) << block.shape[1]) + bits, return_inverse=True)
        code = code.reshape(-1).astype(np.int64)
    return code.astype(np.intp)


def _shared(y_k: _Floats, of: npt.NDArray[np.intp], cap: _Floats, cap_k: _Floats) -> _Floats:
    """Each kind's allocation among its devices, in proportion to each one's headroom: devices
    alike give alike shares (a battery that joins a running dispatch takes its share at once;
    the churn term is between kinds, whose costs differ)."""
    share = np.divide(y_k, cap_k, out=np.zeros_like(y_k), where=cap_k > 0)
    return np.clip(share[of] * cap, 0.0, cap)


class AllocationError(Exception):
    """HiGHS did not find an optimum (``status``: linprog's status code)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(f"allocation not solved ({status}): {message}")
        self.status = status


@dataclass(slots=True)
class _Solved:
    problem: Problem
    solution: Solution


@dataclass(slots=True)
class Allocator:
    """Solves each dispatch's problem, reusing the last solution of the same dispatch when its
    inputs are the same (a fleet at rest, or a plan computed twice in one control period)."""

    last: dict[str, _Solved] = field(default_factory=dict)

    def solve(self, key: str, problem: Problem) -> Solution:
        old = self.last.get(key)
        if old is not None and _same(old.problem, problem):
            return Solution(old.solution.kw, old.solution.shortfall_kw, old.solution.binding, False)
        solution = solve(problem)
        self.last[key] = _Solved(problem, solution)
        return solution

    def keep(self, keys: set[str]) -> None:
        """Forget every dispatch but ``keys`` (a key's variants are ``<key>#<variant>``)."""
        for key in [k for k in self.last if k.partition("#")[0] not in keys]:
            del self.last[key]


def _same(a: Problem, b: Problem) -> bool:
    if (
        a.request_kw != b.request_kw
        or a.churn_cost != b.churn_cost
        or a.shortfall_cost != b.shortfall_cost
        or len(a.limits) != len(b.limits)
        or len(a.relief) != len(b.relief)
        or not np.array_equal(a.cap, b.cap)
        or not np.array_equal(a.cost, b.cost)
    ):
        return False
    if (a.previous is None) != (b.previous is None):
        return False
    if (a.response is None) != (b.response is None):
        return False
    if a.response is not None and b.response is not None and not np.array_equal(
        a.response, b.response
    ):
        return False
    if a.previous is not None and b.previous is not None and not np.array_equal(
        a.previous, b.previous
    ):
        return False
    for x, y in zip((*a.limits, *a.relief), (*b.limits, *b.relief), strict=True):
        if x.name != y.name or x.room_kw != y.room_kw or not np.array_equal(x.members, y.members):
            return False
    return True
