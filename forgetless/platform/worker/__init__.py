"""What runs inside a Ray Train worker: the train loop, the DeepSpeed engine, evaluation, checkpoints, weights."""
