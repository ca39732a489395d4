"""The Bayes-optimal meta-episode return of CityGrid: the best exploitation return any meta-RL agent can expect.

A meta-RL agent on CityGrid knows the prior (every one of the 576 problems equally likely) and learns about its
problem only from the bus rides of its exploration episode. :func:`bayes_optimal_return` computes, by exhaustive
dynamic programming over the env's own geometry, the best exploitation return such an agent can expect over the
problems and goal corners: the best exploration policy, then the best exploitation policy on what it learned
(exploitation may learn more by riding, and a wrong ride costs steps). This is the ceiling a meta-RL result on
the env should be read against, as ``posterior_sampling_success`` is for the point robot.

It is not always the optimum with known buses (0.8 on 9x9, 0.7 on 5x5). With the official actions an
exploration episode ends when the explorer steps on a hidden goal corner (see :mod:`metalab.envs.citygrid`). On
the 5x5 the useful buses go to the corners themselves, so each useful ride ends the exploration with probability
1/4, 1/3, ... (one more corner visited), and 10 steps leave room for at most three rides: the optimum on
``metalab/CityGrid5x5Official-v0`` is 41/80 = 0.5125, not 0.7 (:func:`five_by_five_official_by_hand` spells the
argument out). On the 9x9 the useful buses go next to the corners, three useful rides fit in 10 of the 20 steps
without touching a corner, and the optimum stays 0.8 with either action set (too large a state space for this
exhaustive search in Python: tests play that exploration on the env instead).

The search state of an exploration is ``(cell, what is known, corners visited, step)``; what is known is one partial
permutation per bus line (useful, distracting), and a ride from a bus cell whose route is unknown branches over the
routes consistent with it, weighted by how many problems agree. Idle actions (``noop``, ``pickup``, ``drop``) are
left out: they change nothing but the step count, and neither episode is worse off with a step more.
``end_episode`` is searched in exploration (official actions), not in exploitation, where it pays exactly what
waiting to the end would.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from fractions import Fraction

from metalab.envs.citygrid import LAYOUTS, MOVES, PERMUTATIONS, ActionSet, Cell, CityLayout

Known = tuple[tuple[int, ...], tuple[int, ...]]
"""What an agent knows: per bus line (useful, distracting), the destination index of each stop or -1."""
UNKNOWN: Known = ((-1,) * 4, (-1,) * 4)


def _lines(layout: CityLayout, distractors: bool) -> list[tuple[tuple[Cell, ...], tuple[Cell, ...]]]:
    lines = [(layout.stops, layout.destinations)]
    return [*lines, (layout.distractor_stops, layout.distractor_destinations)] if distractors else lines


@functools.cache
def _consistent(partial: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [p for p in PERMUTATIONS if all(k in (-1, p[i]) for i, k in enumerate(partial))]


def _learn(known: Known, line: int, stop: int, dest: int) -> Known:
    """``known`` plus stop ``stop`` of ``line`` going to ``dest``; a line with one consistent permutation left is
    filled in (knowing 3 buses is knowing 4)."""
    partial = list(known[line])
    partial[stop] = dest
    new = _filled(tuple(partial))
    return (new, known[1]) if line == 0 else (known[0], new)


@functools.cache
def _filled(partial: tuple[int, ...]) -> tuple[int, ...]:
    candidates = _consistent(partial)
    return candidates[0] if len(candidates) == 1 else partial


class _Search:
    def __init__(self, layout: CityLayout, actions: ActionSet, distractors: bool):
        self.layout, self.actions = layout, actions
        self.lines = _lines(layout, distractors)
        self.corners = frozenset(layout.goals)
        self.steps = layout.max_steps
        self.penalty = Fraction(layout.step_penalty).limit_denominator(1000)  # 0.3 -> 3/10, exactly
        # memo tables, one per search (the recursions below call these cached versions)
        self.exploit = functools.cache(self._exploit)
        self.value = functools.cache(self._value)
        self.explore = functools.cache(self._explore)

    def outcomes(self, cell: Cell, known: Known) -> Iterator[list[tuple[Fraction, Cell, Known]]]:
        """For each action but the idle ones (the four moves, then a ride where there is a bus): its outcomes
        ``(probability, next cell, what is then known)``."""
        last = self.layout.size - 1
        x, y = cell
        for dx, dy in MOVES.values():
            yield [(Fraction(1), (min(max(x + dx, 0), last), min(max(y + dy, 0), last)), known)]
        for line, (stops, dests) in enumerate(self.lines):
            partial = known[line]
            if cell in stops:
                i = stops.index(cell)
                outcomes = [(p[i], i, dests[p[i]]) for p in _consistent(partial)]
            elif cell in dests:
                j = dests.index(cell)
                outcomes = [(j, p.index(j), stops[p.index(j)]) for p in _consistent(partial)]
            else:
                continue
            counts: dict[tuple[int, int, Cell], int] = {}
            for outcome in outcomes:
                counts[outcome] = counts.get(outcome, 0) + 1
            yield [
                (Fraction(n, len(outcomes)), to, _learn(known, line, i, d))
                for (d, i, to), n in counts.items()
            ]

    def _exploit(self, cell: Cell, known: Known, goal: Cell, t: int) -> Fraction:
        """The best expected return of the rest of an exploitation episode."""
        if t == self.steps:
            return Fraction(0)
        best = None
        for outcomes in self.outcomes(cell, known):
            value = sum(
                p * (1 if to == goal else -self.penalty + self.exploit(to, k, goal, t + 1))
                for p, to, k in outcomes
            )
            best = value if best is None else max(best, value)
        return best

    def _value(self, known: Known) -> Fraction:
        """The best expected exploitation return knowing ``known`` (goal corner uniform)."""
        goals = self.layout.goals
        return sum(self.exploit(self.layout.start, known, g, 0) for g in goals) / len(goals)

    def _explore(self, cell: Cell, known: Known, visited: frozenset[Cell], t: int) -> Fraction:
        """The best expected meta-episode return from this point of an exploration episode, the hidden goal
        (official actions) not among the corners ``visited`` so far."""
        stop = self.value(known)
        if t == self.steps:
            return stop
        best = stop if self.actions == "official" else None  # end_episode
        for outcomes in self.outcomes(cell, known):
            value = Fraction(0)
            for p, to, k in outcomes:
                if self.actions == "official" and to in self.corners and to not in visited:
                    ends = Fraction(1, len(self.corners) - len(visited))  # the hidden goal is here
                    value += p * (
                        ends * self.value(k) + (1 - ends) * self.explore(to, k, visited | {to}, t + 1)
                    )
                else:
                    value += p * self.explore(to, k, visited, t + 1)
            best = value if best is None else max(best, value)
        return best


@functools.cache
def _search(size: int, actions: ActionSet, distractors: bool) -> _Search:
    """One search per setting, its tables kept: exploitation values are shared by every caller."""
    return _Search(LAYOUTS[size], actions, distractors)


def bayes_optimal_return(
    size: int = 5, actions: ActionSet = "official", distractors: bool = True
) -> Fraction:
    """The best expected exploitation return of a meta-episode (one exploration episode, then one scored
    exploitation episode) on CityGrid of ``size`` with ``actions`` and ``distractors``, over the 576 equally
    likely problems and the uniform goal corners: exact, as a fraction. Only the 5x5 is searched; the 9x9 (0.8
    with either action set) is too large for this search.

    With distracting buses the value is pinned between two searches rather than searched with both bus lines
    unknown (hours in Python): never riding a distracting bus is a policy of the env, so the search without them is
    a lower bound; an agent told the distracting routes in advance can do only better, so the mean over the 24
    distracting permutations of the search with that line known is an upper bound. On the 5x5 the two agree (a
    distracting ride teaches nothing about the useful buses and shortens no route), and the common value is
    returned; a ``RuntimeError`` names both bounds if they ever differ."""
    if size != 5:
        raise ValueError(
            f"the exhaustive search covers the 5x5 only (the 9x9's optimum is 0.8), got size={size!r}"
        )
    layout = LAYOUTS[size]
    lower = _search(size, actions, distractors=False).explore(layout.start, UNKNOWN, frozenset(), 0)
    if not distractors:
        return lower
    told = _search(size, actions, distractors=True)
    upper = sum(told.explore(layout.start, (UNKNOWN[0], d), frozenset(), 0) for d in PERMUTATIONS) / 24
    if upper != lower:
        raise RuntimeError(f"CityGrid {size}x{size} ({actions}): optimum between {lower} and {upper}")
    return lower


def known_useful_value(size: int, known: int) -> Fraction:
    """The best expected exploitation return knowing where ``known`` of the 4 useful buses go (any ``known`` of
    them: the stops are symmetric), never riding a distracting bus (which on the 5x5 gains nothing: see
    :func:`bayes_optimal_return`)."""
    partial = tuple(range(known)) + (-1,) * (4 - known)
    return _search(size, "official", distractors=False).value((_filled(partial), UNKNOWN[1]))


def five_by_five_official_by_hand() -> Fraction:
    """The official 5x5's optimum by hand: ride a useful bus (step 2), ride back and walk to the next stop, ride
    again (step 6), and again (step 10). Each landing corner is the hidden goal with probability 1/4, then 1/3,
    which ends the exploration; so the agent knows 1 useful bus with probability 1/4, 2 with 1/4 and all with 1/2,
    and no exploration can do better (every useful ride lands on a new corner). Exploitation then earns
    :func:`known_useful_value` of what it knows."""
    v = [known_useful_value(5, k) for k in range(4)]
    return Fraction(1, 4) * v[1] + Fraction(1, 4) * v[2] + Fraction(1, 2) * v[3]
