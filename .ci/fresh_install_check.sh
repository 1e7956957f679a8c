#!/usr/bin/env bash
# What a new user gets: a clean virtualenv with `pip install -e .` and nothing else (no test extra to pull missing
# dependencies in by accident), then the README's first command, shortened by .ci/demo_smoke.args but through every
# phase (shipped base load, rollouts, GEPA, templated rollouts with context distillation, evaluation, report). Its
# offline proposer draws from a pool holding the demo's trigger whole, so GEPA's 40 calls find a template whatever the
# rollouts drew (with the default pool that search is the demo's point and takes far longer). One argument per line.
# Then each extra is installed on top and checked for what it promises. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
venv="$scratch/venv"
python -m venv "$venv"
py="$venv/bin/python"

step() { echo "== fresh install: $* ($(date +%T))"; }

step "pip install -e . (no extras)"
"$venv/bin/pip" install -q -e .

step "the README's first command, shortened"
mapfile -t smoke_args < .ci/demo_smoke.args
"$py" -m p2o_jax.main --config configs/demo_cpu.py --workdir "$scratch/demo" "${smoke_args[@]}" \
  > "$scratch/demo.out" 2> "$scratch/demo.err" || { tail -40 "$scratch/demo.err"; exit 1; }
tail -2 "$scratch/demo.out"
"$py" - "$scratch/demo" <<'EOF'
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
assert (run / "report.md").is_file(), "no report.md"
assert any(m.get("p2o/gepa_candidates", 0) >= 1 for m in metrics), "GEPA did not run"
assert any(m.get("p2o/assigned_groups", 0) > 0 for m in metrics), "no templated rollouts after GEPA"
assert (run / "export" / "final" / "model.safetensors").is_file(), "no exported policy"
print("demo phases: GEPA ran, templated groups trained, report and export written")
EOF

step "extra [seqio]: the evaluation-task registry"
"$venv/bin/pip" install -q -e ".[seqio]"
"$py" - <<'EOF'
import json, pathlib, tempfile
from p2o_jax.data import seqio_tasks
path = pathlib.Path(tempfile.mkdtemp()) / "set.jsonl"
path.write_text("".join(json.dumps({"problem": f"{i}+1", "answer": str(i + 1)}) + "\n" for i in range(3)))
name = seqio_tasks.register_eval_task("ci_check", path, question_field="problem", answer_field="answer")
queries = seqio_tasks.eval_queries(name)
assert [q.answer for q in queries] == ["1", "2", "3"], queries
assert seqio_tasks.score_task(name, ["1", "0", "3"])["verified_accuracy"] == 2 / 3
print("seqio: served and scored 3 rows through a registered task")
EOF

step "extra [tpu]: libtpu compiles for a TPU topology without a TPU; gcsfs for gs:// checkpoints"
"$venv/bin/pip" install -q -e ".[tpu]"
JAX_PLATFORMS=cpu "$py" - <<'EOF'
import gcsfs, jinja2  # what a TPU VM run needs besides libtpu: gs:// checkpoint directories, chat templates
import jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P
topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:1x1", chip_config_name="default",
                                    chips_per_host_bounds=(1, 1, 1), num_slices=1)
mesh = jax.sharding.Mesh(topo.devices, ("data",))
x = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
compiled = jax.jit(lambda a: a @ a).lower(x).compile()
assert compiled.memory_analysis().output_size_in_bytes == 256 * 256 * 2
print("tpu:", topo.devices[0].device_kind, "compiled a matmul; output bytes", 256 * 256 * 2)
EOF
step "done"
