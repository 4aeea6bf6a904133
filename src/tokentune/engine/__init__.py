"""The engine layer: training config and loop, data, augmentation, evaluation, checkpoints and run directories."""
