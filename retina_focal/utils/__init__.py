"""Helpers shared by the layers above: registry look-ups, CPU facts, DDP, figures, test fixtures."""
