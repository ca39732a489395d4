"""Reinforcement learning: replay buffer, hindsight relabeling, DQN and REINFORCE, each one readable file."""
