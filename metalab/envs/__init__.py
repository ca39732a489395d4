"""Environments: importing this package registers metalab's gymnasium ids (``metalab/BitFlip-v0``)."""

from __future__ import annotations

import gymnasium as gym

from metalab.envs.bitflip import BitFlip
from metalab.envs.config import BITFLIP_ID, EnvConfig, make_env

if BITFLIP_ID not in gym.registry:  # importing twice (or reloading) must not re-register
    # No registry step limit: BitFlip truncates itself after n steps, whatever n is.
    gym.register(id=BITFLIP_ID, entry_point="metalab.envs.bitflip:BitFlip", kwargs={"n": 10})

__all__ = ["BITFLIP_ID", "BitFlip", "EnvConfig", "make_env"]
