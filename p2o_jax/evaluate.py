"""`python -m p2o_jax.evaluate --config C --checkpoint PATH [--sets name=path.jsonl,...] [--output results.json]
[--workdir DIR] [--config.a.b=v ...]`: plain-prompt accuracy of a policy on benchmark files, with the paper's protocol.

--checkpoint is one of
  * a Hugging Face directory (config.json beside the weights): loaded as is, tokenizer included;
  * an orbax run directory, its `checkpoints/` directory, or one step directory in it: the architecture and tokenizer
    come from config.model.checkpoint (an HF directory, or "builtin"), the params from the newest step (or the given
    one). Only the params are read (an orbax partial restore); the optimizer state is never touched.

Sets: --sets (shorthand for --config.eval.sets) lists name=path pairs of .jsonl/.parquet files; without it the
config's eval.sets are used plus, when config.data.source is "builtin", the run's held-out easy/hard splits. Rows are
read with config.data.question_field / answer_field (dotted paths); when the question field is "problem" or "question"
and the file's first row has only the other one, that other one is used (logged), so MATH-style and GSM8K-style files
both load without flags. File sets are served through the seqio registry (p2o_jax/data/seqio_tasks.py); without seqio
they are read with records.read_queries directly, which yields the same queries. Broken rows are counted and skipped;
a set without any usable row is an error.

Protocol (evaluation.EvalProtocol, config.eval.*): sets below eval.small_set_size problems score the mean over
eval.small_set_samples samples at eval.temperature ("mean@16 T=0.6"), larger sets one greedy sample ("greedy"). Prompts
are config.data.prompt_format without any template; responses are scored by the sandboxed verifier pool.

Output: a markdown table on stdout (one row per set, then the unweighted average over sets, as the paper reports it),
the same table in <workdir>/eval_report.md, each accuracy in <workdir>'s metrics.jsonl and TensorBoard, and a JSON file
(default <workdir>/eval_results.json) with, per set, the accuracy (a fraction in [0, 1]), number of problems, samples
per problem and protocol, plus the checkpoint and a config summary.
Only process 0 prints and writes. Bad input (missing checkpoint, unreadable set, malformed --sets) is a one-line error.
"""

from __future__ import annotations

import pathlib
import sys

from absl import flags

from p2o_jax.cli import define_common_flags, load_config, one_line, run_command, setup_logging, start_jax

# The library (p2o_jax/evaluation.py) is imported inside main(): the verifier's worker processes re-import this module
# as __mp_main__, and JAX, orbax, seqio and the model code need not load there.
# pylint: disable=import-outside-toplevel


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (besides --config / --workdir), registered when the command runs, never on import."""
  define_common_flags()
  return {"checkpoint": flags.DEFINE_string("checkpoint", None, "HF directory, or orbax run / checkpoints / step "
                                            "directory."),
          "sets": flags.DEFINE_string("sets", None, "name=path.jsonl,name2=path2.parquet (replaces config.eval.sets)."),
          "output": flags.DEFINE_string("output", None, "Results JSON (default <workdir>/eval_results.json).")}


def main(argv, flag_values: dict[str, flags.FlagHolder]) -> None:
  del argv
  setup_logging()
  import jax

  from p2o_jax import evaluation
  from p2o_jax.config import ConfigError
  from p2o_jax.models.hf_checkpoint import CheckpointError

  c = load_config()
  checkpoint, sets, output = (flag_values[k].value for k in ("checkpoint", "sets", "output"))
  if not checkpoint:
    sys.exit("error: --checkpoint is required (an HF directory or an orbax run directory)")
  if sets is not None:
    c.eval.sets = sets
  try:
    start_jax(c)
    results = evaluation.run_evaluation(c, checkpoint, include_builtin=sets is None)
  except (ConfigError, evaluation.EvalInputError, CheckpointError) as e:
    sys.exit(f"error: {one_line(e)}")
  if jax.process_index() == 0:
    path = evaluation.write_results(results, output or pathlib.Path(c.workdir) / evaluation.RESULTS_FILENAME)
    report = evaluation.write_report(results, c.workdir)
    print(evaluation.render_table(results))
    print(f"results: {path}\nreport: {report} (and TensorBoard under {c.workdir})")


def run() -> None:
  run_command(define_flags, main)


if __name__ == "__main__":
  run()
