"""Our PPO: pure math (math.py), KL control (kl.py), models (actor_critic.py), rollouts, the trainer."""
