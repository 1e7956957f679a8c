"""A whole GRPO step of our Trainer against TRL's GRPOTrainer, both on the CPU: see benchmarks.grpo_step.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.grpo_step_bench [--sizes demo,50m] [--repeats 3]

Deliberately tiny, like p2o_jax.main: the verifier pool's worker processes re-import the main module, so the bench
itself (JAX, transformers, TRL) lives in benchmarks.grpo_step, imported once in the parent.
"""

if __name__ == "__main__":
  from benchmarks.grpo_step import main  # pylint: disable=import-outside-toplevel

  main()
