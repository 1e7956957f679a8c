"""Config validation and the CLI's handling of bad configs: one line naming the key, before anything heavy runs."""

import pathlib
import subprocess
import sys

import pytest

from p2o_jax.config import CHOICES, ConfigError, base_config, load_config_file, validate, validate_distributed
from p2o_jax.evaluation import parse_eval_sets

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name):
  return load_config_file(ROOT / "configs" / f"{name}.py")


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.py")))
def test_shipped_configs_validate(name):
  validate(load_config(name))


@pytest.mark.parametrize("key, value, message", [
    ("rollout.top_p", 1.5, "config.rollout.top_p"),
    ("rollout.num_samples", 0, "config.rollout.num_samples"),
    ("grpo.aggregation", "mean", "config.grpo.aggregation"),
    ("grpo.kl_estimator", "k4", "config.grpo.kl_estimator"),
    ("grpo.dual_clip", 0.5, "config.grpo.dual_clip"),
    ("grpo.num_minibatches", 7, "config.grpo.num_minibatches"),
    ("grpo.micro_batch_size", 5, "config.grpo.micro_batch_size"),
    ("model.compute_dtype", "float64", "config.model.compute_dtype"),
    ("optim.schedule", "linear", "config.optim.schedule"),
    ("data.prompt_format", "no placeholder", "config.data.prompt_format"),
    ("builtin.hard_digits", (3, 3), "config.builtin: WorldConfig.easy_digits"),
    ("builtin.sft_steps", -1, "config.builtin.sft_steps"),
])
def test_bad_values_name_their_key(key, value, message):
  c = base_config()
  c.data.train_path = "train.jsonl"
  section, field = key.split(".")
  c[section][field] = value
  with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
    validate(c)


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_string_option_is_checked_against_its_registry_in_one_line(key):
  c = base_config()
  c.data.train_path = "train.jsonl"
  c.p2o.enabled = True  # the p2o section is validated only then
  section, field = key.split(".")
  c[section][field] = "no-such-value"
  with pytest.raises(ConfigError) as raised:
    validate(c)
  message = str(raised.value)
  assert "\n" not in message and message.startswith(f"config.{key}: 'no-such-value' is not one of (")
  assert all(repr(name) in message for name in CHOICES[key])  # the allowed values are named


def test_the_registries_behind_the_options_are_the_implementations():
  from p2o_jax.p2o.distillation import DISTILLATIONS  # pylint: disable=import-outside-toplevel
  from p2o_jax.p2o.reflectors import REFLECTORS  # pylint: disable=import-outside-toplevel
  assert CHOICES["p2o.reflector"] is REFLECTORS and CHOICES["p2o.distillation"] is DISTILLATIONS
  assert set(CHOICES["p2o.ratio_mask"]) == {"hard", "soft", "off"}


@pytest.mark.slow
def test_importing_the_commands_registers_no_flags():
  """Flags are registered when a command runs: a notebook or a test may import any command module."""
  code = ("from absl import app, flags, logging; before = set(flags.FLAGS)\n"  # absl's own flags come first
          "import p2o_jax.main, p2o_jax.cli, p2o_jax.evaluate, p2o_jax.compare, p2o_jax.dry_run\n"
          "print(sorted(set(flags.FLAGS) - before))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]"


def test_one_line_unwraps_a_quoted_message_but_keeps_quotes_inside_it():
  from p2o_jax.cli import one_line  # pylint: disable=import-outside-toplevel
  assert one_line(KeyError("no such key\nat all")) == "no such key at all"
  assert one_line(ValueError("invalid literal for int() with base 10: 'abc'")) == \
      "invalid literal for int() with base 10: 'abc'"


def test_workdir_must_be_local_with_checkpoints_on_gcs_instead():
  c = base_config()
  c.data.train_path = "train.jsonl"
  c.workdir = "gs://bucket/run"
  with pytest.raises(ConfigError, match=r"config\.workdir: .*train\.checkpoint_dir=gs://"):
    validate(c)
  c.workdir, c.train.checkpoint_dir = "runs/x", "gs://bucket/run/checkpoints"
  validate(c)


def test_a_multi_host_run_refuses_checkpoints_on_each_hosts_own_disk():
  c = base_config()
  c.data.train_path = "train.jsonl"
  c.distributed.coordinator_address, c.distributed.num_processes = "10.0.0.2:1234", 2
  with pytest.raises(ConfigError) as error:
    validate(c)
  assert str(error.value) == ("config.train.checkpoint_dir: a multi-host run (2 processes) needs a directory every "
                              "host shares (gs://bucket/path or a shared mount); it is empty, so each host would write "
                              "its own <workdir>/checkpoints")
  c.train.checkpoint_dir = "gs://bucket/run/checkpoints"
  validate(c)


def test_a_process_count_that_jax_detects_is_checked_at_run_start(monkeypatch, tmp_path):
  from p2o_jax import experiment  # pylint: disable=import-outside-toplevel
  c = base_config()  # num_processes 0: JAX finds the hosts itself (a TPU slice), so the config alone cannot tell
  c.workdir, c.data.train_path = str(tmp_path / "run"), str(tmp_path / "train.jsonl")
  validate_distributed(c)
  validate_distributed(c, process_count=1)
  with pytest.raises(ConfigError, match=r"^config\.train\.checkpoint_dir: a multi-host run \(4 processes\)"):
    validate_distributed(c, process_count=4)
  monkeypatch.setattr(experiment.jax, "process_count", lambda: 2)
  with pytest.raises(ConfigError, match=r"^config\.train\.checkpoint_dir: a multi-host run \(2 processes\)"):
    experiment.run_training(c)  # before it reads data (there is none) or starts the verifier
  assert not (tmp_path / "run").exists()
  c.train.checkpoint_dir = str(tmp_path / "shared")
  validate_distributed(c, process_count=4)


def test_batch_must_split_over_the_data_axes():
  c = base_config()
  c.data.train_path = "train.jsonl"
  c.train.batch_size, c.rollout.num_samples, c.grpo.num_minibatches, c.grpo.micro_batch_size = 4, 6, 2, 6
  validate(c, num_devices=2)  # 6 rows per micro-batch over data=2
  with pytest.raises(ConfigError, match="config.grpo.micro_batch_size: 6 is not divisible by the 4 devices"):
    validate(c, num_devices=4)


def test_eval_set_spec():
  assert parse_eval_sets("aime=a.jsonl, math=b.jsonl") == {"aime": "a.jsonl", "math": "b.jsonl"}
  with pytest.raises(ConfigError, match="config.eval.sets"):
    parse_eval_sets("aime")


@pytest.mark.parametrize("override, message", [
    ("--config.rollout.topp=0.5", 'Did you mean "top_p"'),
    ("--config.rollout.top_k=abc", "top_k"),
    ("--config.rollout.top_p=3.0", "config.rollout.top_p: 3.0 must be in (0, 1]"),
])
def test_cli_reports_config_typos_in_one_line(override, message, tmp_path):
  result = subprocess.run([sys.executable, "-m", "p2o_jax.main", "--config", str(ROOT / "configs" / "demo_cpu.py"),
                           f"--workdir={tmp_path}", override], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and message in last
  assert "Traceback" not in result.stderr
