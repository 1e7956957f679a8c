"""Beyond the paper: its setting (configs/qwen3_4b_deepscaler.py) with Qwen3-8B, for a v5p-16 slice or larger.

Check it fits before reserving the slice (libtpu compiles on any machine; nothing downloads):
python -m p2o_jax.dry_run --config configs/qwen3_8b_deepscaler.py --model_config tests/hf_configs/qwen3_8b.json \
    --topology v5p-16
"""

import pathlib

import ml_collections

from p2o_jax.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
  c = load_config_file(pathlib.Path(__file__).with_name("qwen3_4b_deepscaler.py"))
  c.workdir = "runs/qwen3_8b_deepscaler"
  c.model.checkpoint = "/mnt/models/Qwen3-8B"
  return c
