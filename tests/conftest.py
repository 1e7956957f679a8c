"""Shared fixtures: tiny random HF checkpoints (tests/hf_models.py), each built and saved once per test session."""

import pytest


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory):
  """variant name -> (checkpoint directory, the PyTorch reference model it was saved from); built on first use."""
  import hf_models  # pylint: disable=import-outside-toplevel  (torch: only for the tests that compare against it)

  built = {}

  def get(variant: str):
    if variant not in built:
      built[variant] = hf_models.save_tiny_model(variant, tmp_path_factory.mktemp("hf") / variant)
    return built[variant]

  return get



REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo_cpu.py"
