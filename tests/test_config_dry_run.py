"""The dry run (p2o_jax/dry_run.py) on the real configs and the real Qwen config.json files, on 8 fake CPU devices.

XLA_FLAGS must be set before jax starts, so this file doubles as a script: the module-scoped fixture runs
`python tests/test_config_dry_run.py` once, which dry-runs every case in one process and prints the results as JSON
(a failing case records its error instead of stopping the others). Expected layouts and byte counts are derived here
by hand from the logical-axis rules, not read back from the code under test.
"""

import copy
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
HF_CONFIGS = pathlib.Path(__file__).resolve().parent / "hf_configs"
COLAB = REPO / "configs" / "colab_qwen2_5_0_5b.py"
PAPER = REPO / "configs" / "qwen3_4b_deepscaler.py"
QWEN2_5 = HF_CONFIGS / "qwen2_5_0_5b_instruct.json"
QWEN3 = HF_CONFIGS / "qwen3_4b.json"
F32 = 4  # both configs keep float32 params
TINY_QWEN3 = {"model_type": "qwen3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "max_position_embeddings": 40960, "tie_word_embeddings": True}
LAYOUT_NAMES = ("embed", "layers.0.attn.q_proj", "layers.0.attn.k_proj", "layers.0.attn.q_bias",
                "layers.0.attn.o_proj", "layers.0.attn.q_norm.scale", "layers.0.mlp.gate_proj",
                "layers.0.mlp.down_proj")


def expected_param_count(hf: dict) -> int:
  """Qwen2 / Qwen3 parameter count from config.json alone: HF's own tensor list, counted by hand."""
  e, f, v, n = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"], hf["num_hidden_layers"]
  d = hf.get("head_dim") or e // hf["num_attention_heads"]
  q, kv = hf["num_attention_heads"] * d, hf["num_key_value_heads"] * d
  attention = e * q + 2 * e * kv + q * e
  if hf["model_type"] == "qwen2":
    attention += q + 2 * kv  # q/k/v biases
  else:
    attention += 2 * d  # q_norm, k_norm
  layer = attention + 3 * e * f + 2 * e  # + input and post-attention RMSNorm
  embeddings = v * e * (1 if hf["tie_word_embeddings"] else 2)
  return embeddings + n * layer + e  # + final norm


def test_expected_param_count_matches_the_published_sizes():
  assert expected_param_count(json.loads(QWEN2_5.read_text())) == 494_032_768  # HF: 0.49B incl. tied embedding
  assert expected_param_count(json.loads(QWEN3.read_text())) == 4_022_468_096  # HF: 4.02B


# --- the 8-device subprocess ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
  proc = subprocess.run([sys.executable, __file__], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  if proc.returncode:
    pytest.fail(f"8-device subprocess failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _ok(runs, name) -> dict:
  result = runs[name]
  assert "error" not in result, result.get("error")
  return result


def test_colab_config_on_eight_devices_is_pure_data_parallel(runs):
  r = _ok(runs, "colab")
  assert r["lowered"] and r["mesh_shape"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert r["param_count"] == 494_032_768
  # fsdp = tensor = 1: the rules shard no parameter, every device holds the whole model.
  assert r["layouts"]["embed"] == {"shape": [151936, 896], "spec": [None, None], "shard_shape": [151936, 896]}
  assert r["param_bytes"] == r["param_bytes_per_device"] == 494_032_768 * F32
  # 32 queries x 8 samples = 256 rows; 2 mini-batches of 128 = 16 micro-batches of 8; 256 + 512 tokens per row.
  assert r["minibatch_shapes"]["tokens"] == [16, 8, 768]
  assert r["minibatch_shapes"]["old_logp"] == [16, 8, 512]
  assert r["minibatch_shapes"]["advantages"] == [16, 8]
  assert "ref_logp" not in r["minibatch_shapes"]  # kl_coef = 0
  assert r["logprob_batch_shapes"]["tokens"] == [32, 8, 768]
  assert r["batch_spec"] == [None, "data", None]
  assert r["replicated"] == []


def test_colab_model_on_fsdp2_tensor4_shards_the_big_params_and_names_what_cannot_split(runs):
  r = _ok(runs, "colab_fsdp2_tensor4")
  assert r["mesh_shape"] == {"data": 1, "fsdp": 2, "tensor": 4}
  layouts = r["layouts"]
  assert layouts["embed"]["spec"] == ["tensor", "fsdp"] and layouts["embed"]["shard_shape"] == [151936 // 4, 448]
  assert layouts["layers.0.mlp.gate_proj"]["shard_shape"] == [448, 4864 // 4]
  assert layouts["layers.0.mlp.down_proj"]["shard_shape"] == [4864 // 4, 448]
  # 14 heads and 2 kv heads do not split over tensor=4: only the embed dimension is split.
  assert layouts["layers.0.attn.q_proj"] == {"shape": [896, 14, 64], "spec": ["fsdp", None, None],
                                             "shard_shape": [448, 14, 64]}
  assert layouts["layers.0.attn.k_proj"]["shard_shape"] == [448, 2, 64]
  assert layouts["layers.0.attn.q_bias"]["shard_shape"] == [14, 64]
  assert r["replicated"] == ["heads (14) does not split over tensor=4: replicated over tensor",
                             "kv_heads (2) does not split over tensor=4: replicated over tensor"]
  e, f, layers = 896, 4864, 24
  per_layer = (e * 14 * 64 + 2 * e * 2 * 64 + 14 * 64 * e) // 2 + (14 + 2 * 2) * 64 + 3 * e * f // 8 + 2 * e // 2
  assert r["param_bytes_per_device"] == F32 * (151936 * e // 8 + layers * per_layer + e // 2)
  assert r["batch_spec"] == [None, "fsdp", None]


def test_paper_config_with_qwen3_4b_shards_everything_with_an_embed_axis_over_fsdp8(runs):
  r = _ok(runs, "paper")
  assert r["lowered"] and r["mesh_shape"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert r["param_count"] == expected_param_count(json.loads(QWEN3.read_text())) == 4_022_468_096
  layouts = r["layouts"]
  assert layouts["embed"]["shard_shape"] == [151936, 2560 // 8]
  assert layouts["layers.0.attn.q_proj"]["shard_shape"] == [320, 32, 128]
  assert layouts["layers.0.attn.o_proj"]["shard_shape"] == [32, 128, 320]
  assert layouts["layers.0.mlp.gate_proj"]["shard_shape"] == [320, 9728]
  assert layouts["layers.0.mlp.down_proj"]["shard_shape"] == [9728, 320]
  assert layouts["layers.0.attn.q_norm.scale"]["shard_shape"] == [128]  # head_dim has no mesh axis
  qk_norms = 36 * 2 * 128
  assert r["param_bytes_per_device"] == F32 * ((4_022_468_096 - qk_norms) // 8 + qk_norms)
  # 128 queries x 6 samples = 768 rows; 2 mini-batches of 384 = 24 micro-batches of 16; 4096 + 12288 tokens.
  assert r["minibatch_shapes"]["tokens"] == [24, 16, 16384]
  assert r["minibatch_shapes"]["token_weights"] == [24, 16, 12288]
  assert r["logprob_batch_shapes"]["response_mask"] == [48, 16, 12288]
  assert r["batch_spec"] == [None, "fsdp", None]
  assert r["replicated"] == []


def test_paper_config_optimizer_moments_are_sharded_like_the_params(runs):
  r = _ok(runs, "paper")
  # AdamW: mu and nu, each shaped and sharded like the params, plus a few scalar counters.
  assert 2 * r["param_bytes_per_device"] <= r["opt_state_bytes_per_device"] <= 2 * r["param_bytes_per_device"] + 1024


def test_remat_config_traces(runs):
  _ok(runs, "tiny_qwen3_remat")


@pytest.mark.parametrize("name, fragments", [
    ("micro_batch_not_split_by_data_axis", ["ConfigError", "config.grpo.micro_batch_size", "4 is not divisible",
                                            "8 devices"]),
    ("mesh_does_not_fit", ["ConfigError", "config.mesh", "does not fit 8 devices"]),
    ("response_beyond_max_positions", ["ConfigError", "config.rollout.max_new_tokens", "44096",
                                       "max_position_embeddings=40960"]),
    ("sliding_window_model", ["ModelConfigError", "use_sliding_window"]),
])
def test_broken_variants_fail_with_one_line_naming_the_problem(runs, name, fragments):
  error = runs[name]["error"]
  assert "\n" not in error
  for fragment in fragments:
    assert fragment in error


@pytest.mark.slow
def test_command_line_reports_a_bad_mesh_in_one_line():
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
  proc = subprocess.run([sys.executable, "-m", "p2o_jax.dry_run", "--config", str(COLAB), "--model_config",
                         str(QWEN2_5), "--fake_devices", "8", "--config.mesh.tensor=3"], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: config.mesh: mesh {'data': -1, 'fsdp': 1, 'tensor': 3} does not fit 8 devices")


# --- the script side (runs with 8 fake devices) ----------------------------------------------------------------------


def _config(path: pathlib.Path, **overrides):
  from p2o_jax.config import load_config_file  # pylint: disable=import-outside-toplevel
  c = load_config_file(path)
  for key, value in overrides.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


def _cases() -> dict:
  qwen2_5, qwen3 = json.loads(QWEN2_5.read_text()), json.loads(QWEN3.read_text())
  return {  # name: (config, config.json, lower)
      "colab": (_config(COLAB), qwen2_5, True),
      # Layouts only: lowering the 0.5B model a second time would cost seconds and test nothing new.
      "colab_fsdp2_tensor4": (_config(COLAB, mesh__data=1, mesh__fsdp=2, mesh__tensor=4), qwen2_5, False),
      "paper": (_config(PAPER), qwen3, True),
      "tiny_qwen3_remat": (_config(PAPER), TINY_QWEN3, True),
      "micro_batch_not_split_by_data_axis": (_config(COLAB, grpo__micro_batch_size=4), qwen2_5, True),
      "mesh_does_not_fit": (_config(COLAB, mesh__tensor=3), qwen2_5, True),
      "response_beyond_max_positions": (_config(PAPER, rollout__max_new_tokens=40_000), qwen3, True),
      "sliding_window_model": (_config(COLAB), {**copy.deepcopy(qwen2_5), "use_sliding_window": True}, True),
  }


def _summary(report) -> dict:
  return dict(mesh_shape=report.mesh_shape, param_count=report.param_count, param_bytes=report.param_bytes,
              param_bytes_per_device=report.param_bytes_per_device,
              opt_state_bytes_per_device=report.opt_state_bytes_per_device,
              layouts={name: dict(shape=list(l.shape), spec=list(l.spec), shard_shape=list(l.shard_shape))
                       for name, l in report.params.items() if name in LAYOUT_NAMES},
              minibatch_shapes=report.minibatch_shapes, logprob_batch_shapes=report.logprob_batch_shapes,
              batch_spec=list(report.batch_spec), replicated=list(report.replicated), lowered=report.lowered)


def _run_all() -> dict:
  from p2o_jax.dry_run import dry_run  # pylint: disable=import-outside-toplevel
  results = {}
  for name, (c, hf, lower) in _cases().items():
    try:
      results[name] = _summary(dry_run(c, hf, lower=lower))
    except Exception as e:  # pylint: disable=broad-except  (each case's error is what its test judges)
      results[name] = {"error": f"{type(e).__name__}: {e}"}
  return results


if __name__ == "__main__":
  print(json.dumps(_run_all()))
