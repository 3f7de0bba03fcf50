"""One expert's life on its island: model, training loop, checkpoints, shard reading."""
