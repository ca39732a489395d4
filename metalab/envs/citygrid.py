"""CityGrid: the distracting-bus navigation problem of DREAM (Liu, Raghunathan, Liang, Finn, "Decoupling
Exploration and Exploitation for Meta-Reinforcement Learning without Sacrifices", ICML 2021, arXiv 2008.02790).

The agent starts in the middle of a square grid and must reach a goal corner. Buses wait on the four cells next
to the start; riding one takes the agent to a cell near a corner in one step. Which bus goes to which corner is
the hidden problem: a meta-RL agent has to find out in an exploration episode, then use it in a scored
exploitation episode. Four distracting buses, whose destinations are also permuted, make undirected exploration
expensive.

A meta-episode is two resets of one environment on the same problem::

    obs, info = env.reset(options={"problem": p, "explore": True})  # exploration: reward 0, no goal observed
    ...                                                               # (step until the episode ends)
    obs, info = env.reset(options={"problem": p})                    # exploitation: goal drawn, scored

Two action sets (``CityGrid(actions=...)``), each registered for both sizes:

- ``"six"``: ``metalab/CityGrid-v0`` (9x9), ``metalab/CityGrid5x5-v0`` and
  ``metalab/CityGrid5x5NoDistractors-v0`` (5x5). Six actions, every exploration episode lasts its full horizon.
  The committed benchmark records were made with these ids; their behaviour does not change.
- ``"official"``: ``metalab/CityGridOfficial-v0`` (9x9) and ``metalab/CityGrid5x5Official-v0`` (5x5). The nine
  actions of the official code, ``end_episode`` among them, and its episode ends: an exploration episode also
  terminates on ``end_episode`` and when the agent steps on a hidden goal (details below).

Problem ids match ``env_id`` of ``DistractionGridEnv`` in the official code (github.com/ezliu/dream,
``envs/city.py``): the useful buses follow permutation ``p % 24`` and the distracting ones permutation
``p // 24`` (``itertools.permutations`` order), 576 problems in all. Every 11th (0, 11, ..., 572) is a training
problem (53), the other 523 are held out for meta-testing. As 11 and 24 are coprime, every useful-bus
permutation appears in training; a test problem is new as a (useful, distracting) pair.

Choices and their sources (official code = ezliu/dream ``envs/city.py``, ``envs/grid.py``,
``meta_exploration.py``):

- 9x9 geometry (official ``DistractionGridEnv``): start (4, 4); useful stops (4, 5), (5, 4), (3, 4), (4, 3) go to
  (0, 1), (0, 7), (8, 1), (8, 7), the cells next to the corners (0, 0), (0, 8), (8, 0), (8, 8) along the left
  and right edges; distracting stops on the diagonal neighbours (5, 5), (3, 3), (3, 5), (5, 3) go to the edge
  midpoints (0, 4), (4, 0), (8, 4), (4, 8). Every destination also has a bus back to its stop (official code
  places both). 20 steps per episode.
- 5x5 geometry: start (2, 2), useful stops (2, 1), (3, 2), (2, 3), (1, 2), 10 steps and a -0.3 step penalty
  follow the 5x5 grid of Stanford's CS224R meta-RL homework, which is built on the official code (seen in a
  student copy, ``hw4/meta_rl/envs/city.py``); there the buses go to the corners themselves (0, 0), (0, 4),
  (4, 4), (4, 0), which is what makes the optimal return 0.7. That grid has no distracting buses (24 problems)
  and ends an episode at any corner; we add distracting buses (stops (3, 3), (1, 1), (1, 3), (3, 1) to the edge
  midpoints (0, 2), (2, 0), (4, 2), (2, 4), the 9x9 pattern) so that both sizes share the 576 problems and the
  53/523 split, and end only at the goal, as in 9x9. In 5x5 the distracting buses are useless even when known.
- Reward (official ``InstructionWrapper._reward``; our issue #8): -0.1 per step (-0.3 in 5x5), +1 instead on the
  step that reaches the goal, which terminates the episode. Optimal with known buses: step to a stop, ride,
  step into the corner: -0.1 - 0.1 + 1 = 0.8 (5x5: step, ride into the corner: -0.3 + 1 = 0.7). Walking (no
  bus): 8 steps, 0.3 (5x5: 4 steps, 0.1). ``tests/test_env_citygrid.py`` computes all four by planning.
  In the 9x9 geometry, *known* distracting buses alone give 0.4 (stop 2 steps away, ride to an edge midpoint,
  4 steps to the corner: 7 steps); we keep the paper's geometry and note this rather than change it.
- The goal is not part of the problem: it is drawn anew (uniformly among the 4 corners, order (0, 0),
  (size-1, size-1), (0, size-1), (size-1, 0) as in the official ``InstructionWrapper._generate_instructions``)
  for every episode, and it is observed in exploitation episodes (official: "instructions"). Exploration
  episodes earn reward 0 here: only the exploitation episode is scored, and official DREAM never trains on the
  env's exploration reward either (``dqn.py`` relabels every exploration reward with the decoder's information
  gain minus a step cost, ``TrajectoryEmbedder.label_rewards`` in ``embed.py``). How an exploration episode
  ends is what the two action sets differ in:

  - ``"six"``: no goal and no termination; the episode ends by truncation after 20 (5x5: 10) steps.
  - ``"official"``, as the official ``main.py`` runs it: the exploration episode is wrapped in the same
    ``InstructionWrapper`` as exploitation (``first_episode_no_instruction``, which would give it a sentinel
    goal and no rewards, exists in ``meta_exploration.py`` but ``main.py`` never sets it), so it has a goal of
    its own, drawn like an exploitation goal (official: ``RandomState(max(0, step - 1))``, here the env's seeded
    RNG, or ``reset(options={"explore": True, "goal": g})``). The explorer does not observe it (the official
    explorer's embedder in ``configs/default.json`` embeds no instructions; here the goal one-hot stays zero),
    but the episode terminates when the agent steps on it (``InstructionWrapper._reward`` returns done), on
    ``end_episode`` (``GridEnv._step`` returns done), or by truncation after 20 steps (on 5x5, where the useful
    buses go to the corners, a ride onto the hidden goal ends it too). Reaching the hidden goal is not a
    success (``info["is_success"]`` stays False while exploring). ``info["goal_reward"]`` carries what the
    official wrapper pays for each step of either episode kind (-0.1, +1 on the goal, the ``end_episode`` charge
    below): official DREAM discards it in exploration; the official RL² (``main_varibad.py``,
    ``first_episode_no_optimization``) observes it and the exploration goal as inputs, which metalab's RL²
    does not.
- Actions (official ``Action`` in ``envs/grid.py``): ``left, up, right, down, noop, ride_bus, end_episode,
  pickup, drop`` = 0..8. ``"six"`` keeps the first six, same numbering; ``"official"`` has all nine. Moves
  leaving the grid are clamped (official). ``ride`` on a cell without a bus does nothing but still costs the
  step. ``pickup`` and ``drop`` act only on an inventory that the city never observes (``Bus`` holds nothing:
  ``GridObject.pickup`` returns None, ``GridObject.drop`` succeeds and empties the inventory), so in the city
  they are no-ops that cost a step. ``end_episode`` terminates the episode where the agent stands
  (``GridEnv._step``), and ``InstructionWrapper._reward`` (``envs/city.py``) charges the step's -0.1 plus 0.1
  for every step left (``steps_remaining``): -0.1 * (1 + 20 - t) at step t, exactly what waiting until the
  truncation would cost, so in exploitation it changes no return and no optimum. In exploration it is what
  makes the step cost real: DREAM's explorer pays its step cost only for the steps it takes (the relabelled
  reward is masked after the episode's end) and never sees the env's charge, so stopping saves the cost of the
  remaining steps, and a distracting ride must pay for itself. With six actions every exploration lasts the
  full horizon, the step cost is a constant shift of the explorer's return and cannot change its greedy
  policy. On 5x5 the charge uses the 5x5 step penalty, 0.3 per step (our extension).
- Observation (float32 vector of 7): ``x, y`` (official: coordinates, not a one-hot), ``on_bus`` (1 on any cell
  with a bus; official "status"), then the goal corner one-hot (4), all zero in exploration episodes (with
  ``"official"`` the exploration goal exists but is hidden). The official code observes the goal as
  coordinates; the one-hot of its corner carries the same information and leaves no coordinate for "no goal"
  to collide with (the official sentinel would be (0, 0), a corner). The problem id is not observed; it is
  privileged information in ``env.unwrapped.problem`` and ``info["problem"]`` (official: ``env_id`` in every
  state), for algorithms such as DREAM that use it during meta-training.
- Coordinates are ``(x, y)`` with ``up`` increasing ``y`` (official); renders draw ``y`` upwards.
- ``distractors=False`` (registered as ``metalab/CityGrid5x5NoDistractors-v0``) drops the distracting buses:
  the CS224R 5x5 problem, kept as a diagnostic of the meta-RL algorithms on the problem its 0.7 optimum comes
  from. Problem ids and the 53/523 split stay; a problem is then its useful permutation ``p % 24`` alone, so the
  training problems cover every test problem (as in CS224R, where training and test problems are the same 24).
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from metalab.envs.tasks import check_options

CITYGRID_ID = "metalab/CityGrid-v0"
CITYGRID5X5_ID = "metalab/CityGrid5x5-v0"
CITYGRID5X5_PLAIN_ID = "metalab/CityGrid5x5NoDistractors-v0"
CITYGRID_OFFICIAL_ID = "metalab/CityGridOfficial-v0"
CITYGRID5X5_OFFICIAL_ID = "metalab/CityGrid5x5Official-v0"

Cell = tuple[int, int]
"""A grid cell ``(x, y)``; ``x`` grows to the right, ``y`` upwards (``up`` adds 1 to ``y``)."""

Split = Literal["train", "val", "test", "heldout"]
SPLITS = ("train", "val", "test", "heldout")
N_VAL, VAL_EVERY = 100, 5
"""The val problems: every 5th held-out id, 100 of them."""

ACTIONS = ("left", "up", "right", "down", "noop", "ride")
"""Action names by index of the ``"six"`` action set (the official code's first six actions, same numbering)."""
OFFICIAL_ACTIONS = (*ACTIONS, "end_episode", "pickup", "drop")
"""Action names by index of the ``"official"`` action set (official ``Action`` in ``envs/grid.py``)."""
LEFT, UP, RIGHT, DOWN, NOOP, RIDE, END_EPISODE, PICKUP, DROP = range(9)
ActionSet = Literal["six", "official"]
ACTION_SETS: dict[str, tuple[str, ...]] = {"six": ACTIONS, "official": OFFICIAL_ACTIONS}
MOVES: dict[int, Cell] = {LEFT: (-1, 0), UP: (0, 1), RIGHT: (1, 0), DOWN: (0, -1)}
"""``(dx, dy)`` of the four move actions."""

PERMUTATIONS: tuple[tuple[int, ...], ...] = tuple(itertools.permutations(range(4)))
"""The 24 bus permutations: ``PERMUTATIONS[k][i]`` is the destination index of stop ``i``."""
N_PROBLEMS = len(PERMUTATIONS) ** 2  # useful x distracting permutations: 576
TRAIN_EVERY = 11
"""Problem ``p`` is a training problem iff ``p % 11 == 0`` (official ``DistractionGridEnv.env_ids``)."""
OBS_DIM = 7  # x, y, on_bus, goal one-hot (4)


@dataclass(frozen=True)
class CityLayout:
    """Geometry, horizon and step penalty of one CityGrid size."""

    size: int
    """Cells per side."""
    start: Cell
    """Where every episode starts."""
    max_steps: int
    """Steps per episode (truncation)."""
    step_penalty: float
    """Reward -step_penalty on every exploitation step that does not reach the goal."""
    goals: tuple[Cell, ...]
    """The 4 goal corners, by goal index."""
    stops: tuple[Cell, ...]
    """The 4 useful bus stops (next to the start)."""
    destinations: tuple[Cell, ...]
    """Where the useful buses go, permuted by the problem (near or at the corners)."""
    distractor_stops: tuple[Cell, ...]
    """The 4 distracting bus stops."""
    distractor_destinations: tuple[Cell, ...]
    """Where the distracting buses go, permuted by the problem."""

    @property
    def walking_return(self) -> float:
        """The exploitation return of walking straight to a goal (the corners are equidistant from the start):
        what an agent gets without knowing any bus. 0.3 on 9x9, 0.1 on 5x5."""
        x, y = self.start
        distance = max(abs(gx - x) + abs(gy - y) for gx, gy in self.goals)
        return 1.0 - self.step_penalty * (distance - 1)


LAYOUTS: dict[int, CityLayout] = {
    9: CityLayout(
        size=9,
        start=(4, 4),
        max_steps=20,
        step_penalty=0.1,
        goals=((0, 0), (8, 8), (0, 8), (8, 0)),
        stops=((4, 5), (5, 4), (3, 4), (4, 3)),
        destinations=((0, 1), (0, 7), (8, 1), (8, 7)),
        distractor_stops=((5, 5), (3, 3), (3, 5), (5, 3)),
        distractor_destinations=((0, 4), (4, 0), (8, 4), (4, 8)),
    ),
    5: CityLayout(
        size=5,
        start=(2, 2),
        max_steps=10,
        step_penalty=0.3,
        goals=((0, 0), (4, 4), (0, 4), (4, 0)),
        stops=((2, 1), (3, 2), (2, 3), (1, 2)),
        destinations=((0, 0), (0, 4), (4, 4), (4, 0)),
        distractor_stops=((3, 3), (1, 1), (1, 3), (3, 1)),
        distractor_destinations=((0, 2), (2, 0), (4, 2), (2, 4)),
    ),
}
"""The two sizes: 9x9 (DREAM's distracting bus) and the small 5x5 variant."""


def problems(split: Split) -> list[int]:
    """Problem ids of ``split``: ``"train"`` (every 11th: 53 ids), ``"heldout"`` (the other 523, DREAM's test
    set), split into ``"val"`` (every 5th held-out id, the first 100 of them: for learning curves and any
    decision) and ``"test"`` (the remaining 423, evaluated once)."""
    heldout = [p for p in range(N_PROBLEMS) if p % TRAIN_EVERY]
    val = heldout[: VAL_EVERY * N_VAL : VAL_EVERY]
    if split == "train":
        return list(range(0, N_PROBLEMS, TRAIN_EVERY))
    if split == "heldout":
        return heldout
    if split == "val":
        return val
    if split == "test":
        return [p for p in heldout if p not in set(val)]
    raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def decode_problem(problem: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(useful, distracting)`` permutations of ``problem``: entry ``i`` is the destination index of stop ``i``."""
    p = operator.index(problem)
    if not 0 <= p < N_PROBLEMS:
        raise ValueError(f"problem must be an int in [0, {N_PROBLEMS}), got {problem!r}")
    return PERMUTATIONS[p % len(PERMUTATIONS)], PERMUTATIONS[p // len(PERMUTATIONS)]


def bus_routes(layout: CityLayout, problem: int, distractors: bool = True) -> dict[Cell, Cell]:
    """Where ``ride`` takes the agent from each bus cell of ``problem``: 8 stops out, 8 destinations back (4 and
    4 without the distracting buses)."""
    useful, distracting = decode_problem(problem)
    routes: dict[Cell, Cell] = {}
    lines = [(layout.stops, layout.destinations, useful)]
    if distractors:
        lines.append((layout.distractor_stops, layout.distractor_destinations, distracting))
    for stops, dests, perm in lines:
        for stop, k in zip(stops, perm, strict=True):
            routes[stop] = dests[k]
            routes[dests[k]] = stop  # the bus back (official code places one on every destination)
    return routes


# Render colours: the useful buses as in the official code, distracting buses olive.
_BUS_COLORS = ((0, 0, 255), (255, 0, 255), (255, 255, 0), (0, 255, 255))
_DISTRACTOR_COLOR = (128, 128, 0)
_GOAL_COLOR, _AGENT_COLOR, _LINE_COLOR = (0, 170, 0), (220, 0, 0), (200, 200, 200)
_CELL_PX = 16


class CityGrid(gym.Env):
    """DREAM's distracting-bus grid (ICML 2021): reach the goal corner, faster by bus once the buses are known.

    ``reset(options=...)`` keys: ``problem`` (int in [0, 576); default: drawn from ``split``), ``split``
    (``"train"`` or ``"test"``, where a drawn problem comes from; default ``"train"``), ``explore`` (bool:
    an exploration episode, reward 0 and no observed goal; default False) and ``goal`` (corner index 0-3 of an
    exploitation episode, or with ``actions="official"`` the hidden goal of an exploration episode; default:
    drawn uniformly). ``distractors=False``: no distracting buses. ``actions``: ``"six"`` (the first six official
    actions; exploration ends by truncation only) or ``"official"`` (all nine, ``end_episode`` among them; an
    exploration episode also ends on ``end_episode`` and on its hidden goal); see the module docstring.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 4}
    _OPTIONS: ClassVar[frozenset[str]] = frozenset({"problem", "split", "explore", "goal"})

    def __init__(
        self,
        size: int = 9,
        render_mode: str | None = None,
        distractors: bool = True,
        actions: ActionSet = "six",
    ):
        if size not in LAYOUTS:
            raise ValueError(f"CityGrid size must be one of {sorted(LAYOUTS)}, got {size!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"CityGrid renders only as 'rgb_array', got render_mode={render_mode!r}")
        if actions not in ACTION_SETS:
            raise ValueError(f"CityGrid actions must be one of {', '.join(ACTION_SETS)}, got {actions!r}")
        self.layout = LAYOUTS[size]
        self.distractors = bool(distractors)
        self.actions: ActionSet = actions
        """The action set: ``"six"`` or ``"official"``."""
        self.action_names = ACTION_SETS[actions]
        """Action names by index."""
        self.render_mode = render_mode
        high = np.array([size - 1, size - 1, 1, 1, 1, 1, 1], dtype=np.float32)
        self.observation_space = spaces.Box(np.zeros(OBS_DIM, dtype=np.float32), high, dtype=np.float32)
        self.action_space = spaces.Discrete(len(self.action_names))
        self.problem = 0
        """The hidden problem of the current episode (privileged: not in the observation)."""
        self.explore = False
        """Whether the current episode is an exploration episode (reward 0, no observed goal)."""
        self.goal: int | None = None
        """Goal corner index of the current episode: the observed goal of an exploitation episode, the hidden one
        of an exploration episode with ``actions="official"``; None while exploring with ``"six"``."""
        self._routes = bus_routes(self.layout, 0)
        self._pos = self.layout.start
        self._steps = 0

    @staticmethod
    def problems(split: Split) -> list[int]:
        """Problem ids of ``split`` (``"train"``: 53, ``"val"``: 100, ``"test"``: 423, ``"heldout"``: 523 = val +
        test); see :func:`problems`."""
        return problems(split)

    def bus_routes(self, problem: int) -> dict[Cell, Cell]:
        """Where ``ride`` goes from each bus cell in ``problem`` (ground truth, for planners and tests)."""
        return bus_routes(self.layout, problem, self.distractors)

    @property
    def walking_return(self) -> float:
        """The exploitation return of walking to the goal; see :attr:`CityLayout.walking_return`."""
        return self.layout.walking_return

    @property
    def max_steps(self) -> int:
        """Steps per episode (20 on 9x9, 10 on 5x5)."""
        return self.layout.max_steps

    @property
    def position(self) -> Cell:
        """The agent's cell ``(x, y)``."""
        return self._pos

    def _obs(self) -> np.ndarray:
        obs = np.zeros(OBS_DIM, dtype=np.float32)  # (7,)
        obs[0], obs[1] = self._pos
        obs[2] = float(self._pos in self._routes)
        if self.goal is not None and not self.explore:  # an exploration goal (official actions) stays hidden
            obs[3 + self.goal] = 1.0
        return obs

    def _info(self, success: bool = False, goal_reward: float = 0.0) -> dict[str, Any]:
        info = {"problem": self.problem, "explore": self.explore, "is_success": success}
        if self.actions == "official":
            info["goal_reward"] = goal_reward
        return info

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        options = check_options(options, self._OPTIONS)
        if "problem" in options:
            problem = options["problem"]
            decode_problem(problem)  # validates
            self.problem = operator.index(problem)
        else:
            pool = problems(options.get("split", "train"))
            self.problem = pool[int(self.np_random.integers(len(pool)))]
        self.explore = bool(options.get("explore", False))
        self.goal = self._episode_goal(options.get("goal"))
        self._routes = bus_routes(self.layout, self.problem, self.distractors)
        self._pos = self.layout.start
        self._steps = 0
        return self._obs(), self._info()

    def _episode_goal(self, goal: Any) -> int | None:
        """The goal corner of a new episode: ``goal`` (the reset option, validated) or one drawn uniformly; an
        exploration episode has none with the six actions and a hidden one with the official actions."""
        if self.explore and self.actions == "six":
            if goal is not None:
                raise ValueError("an exploration episode has no goal: drop the 'goal' option or 'explore'")
            return None
        if goal is None:
            return int(self.np_random.integers(len(self.layout.goals)))
        index = operator.index(goal)
        if not 0 <= index < len(self.layout.goals):
            raise ValueError(f"goal must be a corner index in [0, 4), got {goal!r}")
        return index

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not self.action_space.contains(action):
            names = ", ".join(self.action_names)
            raise ValueError(f"action {action!r} is not one of 0..{len(self.action_names) - 1} = {names}")
        action = int(action)
        x, y = self._pos
        if action in MOVES:
            dx, dy = MOVES[action]
            last = self.layout.size - 1
            self._pos = (min(max(x + dx, 0), last), min(max(y + dy, 0), last))  # walls clamp (official)
        elif action == RIDE:
            self._pos = self._routes.get(self._pos, self._pos)  # no bus here: stay
        # NOOP, PICKUP, DROP: nothing observable changes (official: the city's buses hold no item)
        self._steps += 1
        reached = self.goal is not None and self._pos == self.layout.goals[self.goal]
        ended = action == END_EPISODE  # official GridEnv._step: done, where the agent stands
        penalty = self.layout.step_penalty
        if reached:
            goal_reward = 1.0
        elif ended:  # official InstructionWrapper._reward: this step's penalty and every remaining step's
            goal_reward = -penalty - (self.layout.max_steps - self._steps) * penalty
        else:
            goal_reward = -penalty
        success = reached and not self.explore
        reward = 0.0 if self.explore else goal_reward
        terminated = reached or ended
        truncated = not terminated and self._steps >= self.layout.max_steps
        return self._obs(), reward, terminated, truncated, self._info(success, goal_reward)

    def render(self) -> np.ndarray | None:
        """``(size*16, size*16, 3)`` uint8: goal green, bus stops filled, destinations framed, agent red."""
        if self.render_mode != "rgb_array":
            return None
        n, px = self.layout.size, _CELL_PX
        img = np.full((n * px, n * px, 3), 255, dtype=np.uint8)  # (H, W, 3)

        def fill(cell: Cell, inset: int, color: tuple[int, int, int], frame: bool = False) -> None:
            row = n - 1 - cell[1]  # y grows upwards on screen
            r0, c0 = row * px + inset, cell[0] * px + inset
            r1, c1 = (row + 1) * px - inset, (cell[0] + 1) * px - inset
            if not frame:
                img[r0:r1, c0:c1] = color
                return
            for rows, cols in (  # a hollow square (the bus back from a destination) keeps what is under it
                (slice(r0, r0 + 2), slice(c0, c1)),
                (slice(r1 - 2, r1), slice(c0, c1)),
                (slice(r0, r1), slice(c0, c0 + 2)),
                (slice(r0, r1), slice(c1 - 2, c1)),
            ):
                img[rows, cols] = color

        img[::px, :] = _LINE_COLOR
        img[:, ::px] = _LINE_COLOR
        if self.goal is not None:
            fill(self.layout.goals[self.goal], 1, _GOAL_COLOR)
        useful, distracting = decode_problem(self.problem)
        for i, k in enumerate(useful):
            fill(self.layout.stops[i], 3, _BUS_COLORS[i])
            fill(self.layout.destinations[k], 3, _BUS_COLORS[i], frame=True)
        for i, k in enumerate(distracting if self.distractors else ()):
            fill(self.layout.distractor_stops[i], 3, _DISTRACTOR_COLOR)
            fill(self.layout.distractor_destinations[k], 3, _DISTRACTOR_COLOR, frame=True)
        fill(self._pos, 5, _AGENT_COLOR)
        return img
