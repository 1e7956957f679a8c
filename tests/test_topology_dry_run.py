"""The dry run against real TPU topologies (libtpu compiles on this CPU machine; nothing executes): a tiny model's
whole run fits one v5e chip, the report's numbers are the compiler's, and every bad input is one line.

The dry run is a subprocess, as a user runs it (`--topology` must choose the platform before JAX starts)."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

from p2o_jax.memory_report import FunctionMemory, MemoryReport, Resident
from p2o_jax.tpu_topology import TopologyError, parse_topology

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.py"
PAPER = REPO / "configs" / "qwen3_4b_deepscaler.py"
TINY_QWEN3 = REPO / "tests" / "hf_configs" / "tiny_qwen3.json"
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'); it "
                                  "has wheels for Linux x86_64/aarch64 only")


def dry_run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
  return subprocess.run([sys.executable, "-m", "p2o_jax.dry_run", *args], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def table_rows(stdout: str) -> dict[str, list[str]]:
  """function name -> its cells (compiled for, resident, KV cache, temporaries, total, headroom)."""
  rows = {}
  for line in stdout.splitlines():
    match = re.match(r"^((?:train step|log-prob pass|sampler \w+: [\w -]+?))\s{2,}(.+)$", line)
    if match:
      rows[match.group(1)] = re.split(r"\s{2,}", match.group(2).strip())
  return rows


def gib(cell: str) -> float:
  return float(cell.removesuffix(" GiB"))


def test_the_tpu_extra_brings_what_a_tpu_vm_run_needs():
  extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  names = {re.split(r"[<>=\[]", requirement)[0] for requirement in extras["tpu"]}
  assert {"jax", "gcsfs"} <= names and any("jax[tpu]" in r for r in extras["tpu"])
  assert "p2o_jax[tpu]" in extras["test"]  # so the topology tests below run wherever the tests are installed


@needs_libtpu
def test_the_tpu_extra_imports():
  for module in ("libtpu", "gcsfs", "jinja2"):
    assert importlib.util.find_spec(module) is not None, module


@pytest.mark.parametrize("name, topology, chips, hbm_gb", [
    ("v5p-8", "v5p:2x2x1", 4, 95.0), ("v4-32", "v4:2x2x4", 16, 34.36), ("v5e-1", "v5e:1x1", 1, 16.0),
    ("v6e-1", "v6e:1x1", 1, 32.0), ("v5p-16", "v5p:2x2x2", 8, 95.0)])
def test_topology_names_map_to_libtpu_topologies(name, topology, chips, hbm_gb):
  t = parse_topology(name)
  assert (t.topology_name, t.chips, round(t.hbm_bytes / 1e9, 2)) == (topology, chips, hbm_gb)


@pytest.mark.parametrize("name, fragment", [("v5p-7", "not a v5p slice size"), ("v3-8", "expected <generation>"),
                                            ("tpu", "expected <generation>")])
def test_unknown_topologies_are_one_line(name, fragment):
  with pytest.raises(TopologyError, match=fragment) as error:
    parse_topology(name)
  assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def tiny_on_v5e():
  # P^2O off: GEPA scoring's programs are the sampler's again, at other shapes; the slow tier's cannot-fit test keeps
  # P^2O on. Six compiles keep this under a minute.
  proc = dry_run("--config", str(DEMO), "--topology", "v5e-1", "--config.p2o.enabled=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@needs_libtpu
@pytest.mark.slow  # its fixture compiles every function of a run for a v5e chip: about a minute
def test_a_tiny_models_whole_run_compiles_for_one_v5e_chip_and_fits(tiny_on_v5e):
  assert "Memory per chip on v5e-1 (1 chips), 14.90 GiB HBM each" in tiny_on_v5e
  rows = table_rows(tiny_on_v5e)
  expected = {"train step", "log-prob pass", "sampler prefill: rollouts", "sampler decode: rollouts",
              "sampler prefill: evaluation", "sampler decode: evaluation"}
  assert set(rows) == expected
  for name, cells in rows.items():
    total, headroom = gib(cells[4]), float(cells[5].rstrip("%"))
    assert 0 < total < 14.9 and headroom > 0, name
    assert total == pytest.approx(gib(cells[1]) + gib(cells[2]) + gib(cells[3]), abs=0.02), name


@needs_libtpu
@pytest.mark.slow  # the same fixture
def test_the_kv_cache_column_is_the_caches_size(tiny_on_v5e):
  # The shipped base: 4 layers, 2 kv heads of 32, f32; rollouts: 16 x 6 = 96 rows in 96 slots (no padding to a
  # power of two) with 160 prompt + 96 new tokens.
  rows = table_rows(tiny_on_v5e)
  want = 2 * 4 * 2 * 32 * 4 * (160 + 96) * 96 / 2**30
  assert rows["sampler decode: rollouts"][0] == "96 slots x 160 + 96 tokens"
  assert gib(rows["sampler decode: rollouts"][2]) == pytest.approx(want, abs=0.006)
  # The decode loop writes each row at its own position in place ("blend" on TPU): no second cache in temporaries.
  assert gib(rows["sampler decode: rollouts"][3]) < want / 2


@pytest.mark.slow
@needs_libtpu
def test_a_run_that_cannot_fit_names_the_function_and_the_bytes_short():
  # Evaluating a small set with 4,096 samples per problem: 99 x 4096 rows in as many slots, a 50 GiB KV cache.
  proc = dry_run("--config", str(DEMO), "--topology", "v5e-1", "--config.eval.small_set_samples=4096")
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  # The TPU compiler itself refuses the prefill's temporaries; the error names the call and quotes its figures.
  assert re.match(r"error: does not fit: sampler: evaluation \(405504 slots x 160 \+ 96 tokens\): .*required for HLO "
                  r"temporaries \([\d.]+[GT]\) exceeds available HBM \([\d.]+G\)", last), last
  # With a KV-cache budget of 1 GiB the same evaluation runs in 2,048 slots (512 KiB of cache each).
  proc = dry_run("--config", str(DEMO), "--topology", "v5e-1", "--config.eval.small_set_samples=4096",
                 "--config.rollout.kv_cache_gib=1")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "2048 slots x 160 + 96 tokens (for 405504 rows)" in table_rows(proc.stdout)["sampler decode: evaluation"][0]


@pytest.mark.parametrize("args, message", [
    (("--topology", "v9-8"), "error: --topology 'v9-8': expected <generation>-<size>"),
    (("--topology", "v5p-8", "--config.mesh.tensor=3", "--nolower"), "error: config.mesh: mesh"),
])
@pytest.mark.slow
def test_bad_topology_arguments_are_one_line(args, message):
  if "v5p-8" in args and not HAS_LIBTPU:
    pytest.skip("libtpu is not installed")
  proc = dry_run("--config", str(DEMO), *args, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]


def test_a_function_over_the_chips_hbm_is_named_with_the_bytes_short():
  gib = 2**30
  resident = Resident(params=4 * gib, opt_state=8 * gib, sampler_weights=2 * gib)
  fits = FunctionMemory("train step", "2 x 16 rows x 4096 tokens", kv_cache=0, temporaries=10 * gib)
  too_big = FunctionMemory("sampler decode: rollouts", "64 rows x 4096 + 12288 tokens", kv_cache=12 * gib,
                           temporaries=3 * gib)
  report = MemoryReport("v4-8 (4 chips)", resident, (fits, too_big), hbm_bytes=28 * gib)
  assert report.headroom(fits) == pytest.approx(1 - 24 / 28)
  assert report.shortfalls() == ["sampler decode: rollouts (64 rows x 4096 + 12288 tokens) needs 29.00 GiB per "
                                 "chip, 1.00 GiB more than the 28.00 GiB of HBM on v4-8 (4 chips)"]
  lines = report.table().splitlines()
  assert lines[0] == ("Memory per chip on v4-8 (4 chips), 28.00 GiB HBM each: resident 14.00 GiB = params 4.00 GiB "
                      "+ optimizer state 8.00 GiB + sampler weights 2.00 GiB")
  assert lines[2].split()[-2:] == ["GiB", "14%"] and lines[3].split()[-1] == "-4%"
