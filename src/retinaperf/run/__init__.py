"""Running the benchmark: the trainer and its components, checkpoints, signals, repeated
rounds. The top layer: imports every other."""
