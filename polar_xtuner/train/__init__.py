"""What `xtuner train` runs: the reward model, its attention and loss, schedulers, the in-training evaluation hook, checkpoints and the launchers' command."""
