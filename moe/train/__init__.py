"""Training: the trainer's phases, the jitted step, config checks, metrics, checkpoints and
upcycling."""
