"""Reinforcement learning and meta-RL, each one readable file: replay buffer, hindsight relabeling, DQN, REINFORCE,
SAC; the meta-episode protocol and recurrent Q-learning; RL², DREAM and PEARL."""
