"""The Bayes-optimal CityGrid return: the exhaustive search against hand analysis, and the exploration that
attains it played on the env itself."""

from __future__ import annotations

import itertools
from fractions import Fraction

import gymnasium as gym
import pytest

from metalab.envs import CITYGRID5X5_OFFICIAL_ID, CITYGRID_OFFICIAL_ID
from metalab.envs.citygrid import DOWN, LAYOUTS, LEFT, N_PROBLEMS, PERMUTATIONS, RIDE, RIGHT, UP
from metalab.envs.citygrid_optimum import (
    UNKNOWN,
    _Search,
    bayes_optimal_return,
    five_by_five_official_by_hand,
    known_useful_value,
)


def test_exploitation_value_of_knowing_k_useful_buses() -> None:
    # by hand (5x5, step penalty 0.3, 10 steps): a known bus to the goal: step, ride into the corner, 0.7;
    # otherwise walk (0.1), since a guessed ride that goes wrong costs 1.2 more than it saves: with 2 unknown
    # stops a guess is worth 0.5 * 0.7 + 0.5 * -0.5 = 0.1, no better than walking
    values = [known_useful_value(5, k) for k in range(5)]
    assert values == [Fraction(1, 10), Fraction(1, 4), Fraction(2, 5), Fraction(7, 10), Fraction(7, 10)]


def test_official_5x5_optimum_is_41_80_by_search_and_by_hand() -> None:
    assert five_by_five_official_by_hand() == Fraction(41, 80)
    assert bayes_optimal_return(5, "official", distractors=False) == Fraction(41, 80)


def test_six_action_5x5_reaches_the_known_bus_optimum() -> None:
    # no hidden goal: three rides in 10 steps always fit, and three known buses are four
    assert bayes_optimal_return(5, "six", distractors=False) == Fraction(7, 10)


def test_knowing_the_distracting_buses_does_not_raise_the_official_5x5_optimum() -> None:
    # the upper bound of bayes_optimal_return for one distracting permutation (all 24: the slow test below)
    search = _Search(LAYOUTS[5], "official", distractors=True)
    assert search.explore(LAYOUTS[5].start, (UNKNOWN[0], PERMUTATIONS[5]), frozenset(), 0) == Fraction(41, 80)


@pytest.mark.slow
def test_official_5x5_optimum_with_the_distracting_buses() -> None:
    assert bayes_optimal_return(5, "official", distractors=True) == Fraction(41, 80)


def test_only_the_5x5_is_searched() -> None:
    with pytest.raises(ValueError, match="5x5 only"):
        bayes_optimal_return(9)


# Ride the useful bus next to the start, ride back, walk to the next useful stop (through a distracting stop,
# without riding it), ride, and so on: three useful rides by step 10.
ROUTES = {
    5: [DOWN, RIDE, RIDE, RIGHT, UP, RIDE, RIDE, UP, LEFT, RIDE],
    9: [UP, RIDE, RIDE, RIGHT, DOWN, RIDE, RIDE, DOWN, LEFT, RIDE],
}


def _useful_buses_learned(env_id: str, size: int, problem: int, hidden_goal: int) -> int:
    """Distinct useful stops ridden from when the route above is played in one exploration episode."""
    env = gym.make(env_id).unwrapped
    env.reset(seed=0, options={"problem": problem, "explore": True, "goal": hidden_goal})
    stops, learned = LAYOUTS[size].stops, set()
    for action in ROUTES[size]:
        here = env.position
        _, _, terminated, truncated, _ = env.step(action)
        if action == RIDE and here in stops and env.position != here:
            learned.add(here)
        if terminated or truncated:
            break
    return len(learned)


def test_the_route_attains_the_official_5x5_optimum_on_the_env() -> None:
    # every useful permutation (the distracting one does not matter: never ridden) and every hidden goal
    values = [known_useful_value(5, k) for k in range(5)]
    played = [
        values[_useful_buses_learned(CITYGRID5X5_OFFICIAL_ID, 5, problem, goal)]
        for problem, goal in itertools.product(range(len(PERMUTATIONS)), range(4))
    ]
    assert sum(played) / len(played) == Fraction(41, 80)


def test_the_route_learns_three_useful_buses_on_the_official_9x9_whatever_the_hidden_goal() -> None:
    # its landing cells are next to the corners, never on one: the 9x9's optimum stays the known-bus 0.8
    learned = {
        _useful_buses_learned(CITYGRID_OFFICIAL_ID, 9, problem, goal)
        for problem, goal in itertools.product(range(0, N_PROBLEMS, 7), range(4))
    }
    assert learned == {3}
