"""Reinforcement learning and meta-RL, each one readable file: replay buffer, hindsight relabeling, DQN, REINFORCE,
SAC; model-based RL (dynamics ensembles, planners, the MPC loop); the meta-episode protocol and recurrent
Q-learning; RL², DREAM and PEARL."""
