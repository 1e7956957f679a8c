"""python -m p2o_jax.main --config configs/demo_cpu.py [--config.a.b=value ...] [--workdir DIR]

Deliberately tiny: multiprocessing re-imports the main module in the verifier's worker processes, so everything
(flags included) lives in p2o_jax.cli, imported once per process under its own name.
"""

from p2o_jax.cli import run

if __name__ == "__main__":
  run()
