"""Test-session settings: one torch thread per pytest worker (CI runs two workers on two cores;
tiny-model tests are many times slower when threads oversubscribe the cores)."""

import torch

torch.set_num_threads(1)
