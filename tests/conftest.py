"""Test-wide setup: 8 virtual CPU devices for the sharding tests."""

import os
import sys

import jax

# Must happen before the backend starts; every other test runs on device 0.
jax.config.update("jax_num_cpu_devices", 8)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(__file__))
