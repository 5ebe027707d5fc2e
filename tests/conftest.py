"""Shared test setup: single-threaded torch keeps the suite fast and deterministic on small machines."""

import torch

torch.set_num_threads(1)
