"""Environments: importing this package registers metalab's gymnasium ids.

``metalab/BitFlip-v0`` (HER), ``metalab/CityGrid-v0`` and ``metalab/CityGrid5x5-v0`` (DREAM's distracting bus,
9x9 and 5x5, six actions), ``metalab/CityGrid5x5NoDistractors-v0`` (the 5x5 without distracting buses),
``metalab/CityGridOfficial-v0`` and ``metalab/CityGrid5x5Official-v0`` (the official nine actions with
``end_episode``, exploration ending at a hidden goal),
``metalab/PointRobotSparse-v0`` (PEARL's sparse point robot) and ``metalab/PointMassGoal-v0`` (a point mass
to one of a family of goals, for multi-task model-based RL), ``metalab/Navigation2D-v0`` (MAML's 2D navigation),
``metalab/Navigation2DDiscrete-v0`` (the same with 9 discrete moves, for RL²), ``metalab/HalfCheetahDir-v0`` and
``metalab/HalfCheetahVel-v0`` (MAML's half-cheetah forward/backward and goal velocity; the ``mujoco`` extra),
``metalab/HalfCheetahVelPEARL-v0`` (PEARL's half-cheetah goal velocity, the official code's tasks and split),
``metalab/CartPoleSwingUp-v0`` (PETS's continuous cart-pole swing-up, for model-based RL).
"""

from __future__ import annotations

import gymnasium as gym

from metalab.envs.bitflip import BitFlip
from metalab.envs.cartpole_swingup import CARTPOLE_SWINGUP_ID, CartPoleSwingUp
from metalab.envs.citygrid import (
    CITYGRID5X5_ID,
    CITYGRID5X5_OFFICIAL_ID,
    CITYGRID5X5_PLAIN_ID,
    CITYGRID_ID,
    CITYGRID_OFFICIAL_ID,
    CityGrid,
)
from metalab.envs.config import BITFLIP_ID, EnvConfig, make_env
from metalab.envs.half_cheetah import HALF_CHEETAH_DIR_ID, HALF_CHEETAH_VEL_ID, HALF_CHEETAH_VEL_PEARL_ID
from metalab.envs.navigation import (
    NAVIGATION_2D_DISCRETE_ID,
    NAVIGATION_2D_ID,
    Navigation2D,
    Navigation2DDiscrete,
)
from metalab.envs.point_mass import POINT_MASS_ID, PointMassGoal
from metalab.envs.point_robot import POINT_ROBOT_SPARSE_ID, PointRobotSparse

# No registry step limits: every env truncates itself (BitFlip after n steps, CityGrid after 20 or 10,
# the point robot after 20, the point mass after 50, the 2D navigation after 100, the half-cheetahs and the cart-pole
# swing-up after 200), and importing twice (or reloading) must not re-register.
_IDS = {
    BITFLIP_ID: ("metalab.envs.bitflip:BitFlip", {"n": 10}),
    CITYGRID_ID: ("metalab.envs.citygrid:CityGrid", {"size": 9}),
    CITYGRID5X5_ID: ("metalab.envs.citygrid:CityGrid", {"size": 5}),
    CITYGRID5X5_PLAIN_ID: ("metalab.envs.citygrid:CityGrid", {"size": 5, "distractors": False}),
    CITYGRID_OFFICIAL_ID: ("metalab.envs.citygrid:CityGrid", {"size": 9, "actions": "official"}),
    CITYGRID5X5_OFFICIAL_ID: ("metalab.envs.citygrid:CityGrid", {"size": 5, "actions": "official"}),
    POINT_ROBOT_SPARSE_ID: ("metalab.envs.point_robot:PointRobotSparse", {}),
    POINT_MASS_ID: ("metalab.envs.point_mass:PointMassGoal", {}),
    HALF_CHEETAH_DIR_ID: ("metalab.envs.half_cheetah:HalfCheetahTasks", {"family": "direction"}),
    HALF_CHEETAH_VEL_ID: ("metalab.envs.half_cheetah:HalfCheetahTasks", {"family": "velocity"}),
    HALF_CHEETAH_VEL_PEARL_ID: ("metalab.envs.half_cheetah:HalfCheetahTasks", {"family": "pearl_velocity"}),
    NAVIGATION_2D_ID: ("metalab.envs.navigation:Navigation2D", {}),
    NAVIGATION_2D_DISCRETE_ID: ("metalab.envs.navigation:Navigation2DDiscrete", {}),
    CARTPOLE_SWINGUP_ID: ("metalab.envs.cartpole_swingup:CartPoleSwingUp", {}),
}
for _id, (_entry_point, _kwargs) in _IDS.items():
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_entry_point, kwargs=_kwargs)

__all__ = [
    "BITFLIP_ID",
    "CARTPOLE_SWINGUP_ID",
    "CITYGRID5X5_ID",
    "CITYGRID5X5_OFFICIAL_ID",
    "CITYGRID5X5_PLAIN_ID",
    "CITYGRID_ID",
    "CITYGRID_OFFICIAL_ID",
    "HALF_CHEETAH_DIR_ID",
    "HALF_CHEETAH_VEL_ID",
    "HALF_CHEETAH_VEL_PEARL_ID",
    "NAVIGATION_2D_DISCRETE_ID",
    "NAVIGATION_2D_ID",
    "POINT_MASS_ID",
    "POINT_ROBOT_SPARSE_ID",
    "BitFlip",
    "CartPoleSwingUp",
    "CityGrid",
    "EnvConfig",
    "Navigation2D",
    "Navigation2DDiscrete",
    "PointMassGoal",
    "PointRobotSparse",
    "make_env",
]
