"""Tests for the arithmetic world (p2o_jax/data/arithmetic.py) and its SFT corpus (p2o_jax/data/corpus.py)."""

import collections
import re

import numpy as np
import pytest

from p2o_jax.data import arithmetic, corpus
from p2o_jax.data.arithmetic import WorldConfig
from p2o_jax.data.char_tokenizer import build_char_tokenizer

WORLD = WorldConfig()
STEP = re.compile(r"(\d+)\+(\d+)=(\d+)")


def _steps(scratch: str) -> list[tuple[int, int, int]]:
  return [tuple(map(int, m)) for m in STEP.findall(scratch)]


def _last_number(text: str) -> int:
  return int(re.findall(r"\d+", text)[-1])


# ----- the world -----

def test_sampling_is_deterministic_per_seed():
  first = arithmetic.sample_problems(WORLD, "hard", 200, seed=7)
  assert first == arithmetic.sample_problems(WORLD, "hard", 200, seed=7)
  assert first != arithmetic.sample_problems(WORLD, "hard", 200, seed=8)


@pytest.mark.parametrize("difficulty", ["easy", "hard"])
def test_answers_are_exact_sums(difficulty):
  problems = arithmetic.sample_problems(WORLD, difficulty, 500, seed=0)
  for p in problems:
    assert p.answer == int(np.sum(np.array(p.operands, dtype=np.int64)))
    assert p.difficulty == difficulty
    assert p.id == "add:" + "+".join(str(x) for x in p.operands)
  assert len({p.id for p in problems}) == 500


def test_difficulty_knobs_are_respected_and_reached():
  world = WorldConfig(easy_operands=(2, 3), easy_digits=(1, 4), hard_operands=(5, 7), hard_digits=(1, 3))
  for difficulty, counts, digits in (("easy", (2, 3), (1, 4)), ("hard", (5, 7), (1, 3))):
    problems = arithmetic.sample_problems(world, difficulty, 1500, seed=3)
    seen_counts = {len(p.operands) for p in problems}
    seen_digits = {len(str(x)) for p in problems for x in p.operands}
    assert seen_counts == set(range(counts[0], counts[1] + 1))
    assert seen_digits == set(range(digits[0], digits[1] + 1))
    low, high = world.answer_range(difficulty)
    assert all(low <= p.answer <= high for p in problems)
  assert world.answer_range("hard") == (5 * 1, 7 * 999)


@pytest.mark.parametrize("kwargs, message", [
    (dict(easy_digits=(2, 2)), "cannot cover hard running totals up to 495"),
    (dict(hard_operands=(2, 4)), "must all exceed"),
    (dict(easy_operands=(3, 3)), "must start at 2"),
    (dict(easy_digits=(3, 3)), "reach down"),
    (dict(hard_digits=(3, 2)), "min <= max"),
    (dict(held_out_fraction=0.0), "held_out_fraction"),
])
def test_world_config_rejects_bad_worlds(kwargs, message):
  with pytest.raises(ValueError, match=message):
    WorldConfig(**kwargs)


def test_world_config_accepts_lists_from_config_dicts():
  assert WorldConfig(hard_operands=[4, 5]).hard_operands == (4, 5)


def test_easy_problems_cover_every_running_total_of_hard_scratchpads():
  easy = arithmetic.sample_problems(WORLD, "easy", 3000, seed=1)
  easy_operands = np.array([p.operands for p in easy])
  easy_sums = np.array([p.answer for p in easy])
  hard_steps = [s for p in arithmetic.sample_problems(WORLD, "hard", 2000, seed=2)
                for s in _steps(arithmetic.scratchpad(p))]
  for column in (0, 1):  # first operand = running total, second = next hard operand
    values = np.array([s[column] for s in hard_steps])
    assert easy_operands.min() <= values.min() and values.max() <= easy_operands.max()
  assert max(s[2] for s in hard_steps) <= easy_sums.max()
  # Beyond the sample: every step is in the support of the easy sampler (2 operands of 2-3 digits each).
  assert all(2 <= len(str(a)) <= 3 and 2 <= len(str(b)) <= 3 for a, b, _ in hard_steps)


def test_held_out_splits_never_overlap_training():
  easy_eval, hard_eval = arithmetic.held_out_splits(WORLD, 300, 300, seed=0)
  assert len({p.id for p in easy_eval}) == 300 and len({p.id for p in hard_eval}) == 300
  assert all(len(p.operands) == 2 for p in easy_eval) and all(len(p.operands) >= 4 for p in hard_eval)
  multiset = lambda p: tuple(sorted(p.operands))
  for difficulty, held in (("easy", easy_eval), ("hard", hard_eval)):
    train = arithmetic.sample_problems(WORLD, difficulty, 20000, seed=11)
    assert not {multiset(p) for p in held} & {multiset(p) for p in train}


def test_partition_share_and_order_invariance():
  rng = np.random.default_rng(0)
  operand_lists = [tuple(int(x) for x in rng.integers(10, 1000, size=2)) for _ in range(20000)]
  held = [ops for ops in operand_lists if arithmetic.split_of(ops, WORLD) == "held_out"]
  assert abs(len(held) / len(operand_lists) - WORLD.held_out_fraction) < 0.01
  assert all(arithmetic.split_of(ops[::-1], WORLD) == "held_out" for ops in held)


def test_text_formats_hand_computed():
  p = arithmetic.make_problem((12, 34, 56, 78), "hard")
  assert (p.answer, p.id) == (180, "add:12+34+56+78")
  assert arithmetic.question_text(p) == "Q: 12+34+56+78="
  assert arithmetic.scratchpad(p) == " 12+34=46, 46+56=102, 102+78=180. The answer is 180"
  assert arithmetic.direct_answer(p) == " The answer is 180"
  assert arithmetic.scratchpad(arithmetic.make_problem((5, 7), "easy")) == " 5+7=12. The answer is 12"
  assert arithmetic.to_records([p]) == [{"id": "add:12+34+56+78", "question": "Q: 12+34+56+78=", "answer": "180"}]


def test_scratchpad_arithmetic_is_correct_and_ends_with_the_answer():
  for p in arithmetic.sample_problems(WORLD, "hard", 500, seed=4):
    text = arithmetic.scratchpad(p)
    steps = _steps(text)
    assert len(steps) == len(p.operands) - 1
    running = p.operands[0]
    for (a, b, c), operand in zip(steps, p.operands[1:]):
      assert (a, b, c) == (running, operand, running + operand)
      running = c
    assert _last_number(text) == p.answer == running
    assert _last_number(arithmetic.direct_answer(p)) == p.answer


def test_with_rest_scratchpad_hand_computed():
  p = arithmetic.make_problem((12, 34, 56, 78), "hard")
  assert arithmetic.scratchpad(p, "with_rest") == (" 12+34=46 [56+78], 46+56=102 [78], 102+78=180."
                                                   " The answer is 180")
  assert arithmetic.scratchpad(arithmetic.make_problem((5, 7), "easy"), "with_rest") == " 5+7=12. The answer is 12"
  lsb = arithmetic.make_problem((12, 34, 56, 78), "hard", lsb_first=True)
  assert arithmetic.scratchpad(lsb, "with_rest") == (" 21+43=64 [65+87], 64+65=201 [87], 201+87=081."
                                                     " The answer is 081")


def test_with_rest_scratchpad_steps_are_running_totals_and_list_the_operands_still_to_add():
  for p in arithmetic.sample_problems(WORLD, "hard", 500, seed=4):
    text = arithmetic.scratchpad(p, "with_rest")
    steps = text.partition(".")[0].strip().split(", ")
    assert len(steps) == len(p.operands) - 1
    running = p.operands[0]
    for i, step in enumerate(steps, start=1):
      total_sum, _, rest = step.partition(" [")
      assert _steps(total_sum) == [(running, p.operands[i], running + p.operands[i])]
      assert [int(x) for x in rest.removesuffix("]").split("+") if x] == list(p.operands[i + 1:])
      running += p.operands[i]
    assert _last_number(text) == p.answer


def test_unknown_scratchpad_format_is_rejected():
  with pytest.raises(ValueError, match="scratchpad_format must be one of"):
    WorldConfig(scratchpad_format="tally")
  with pytest.raises(ValueError, match="scratchpad format must be one of"):
    arithmetic.scratchpad(arithmetic.make_problem((1, 2), "easy"), "tally")


def test_corpus_writes_scratchpads_in_the_worlds_format():
  world = WorldConfig(scratchpad_format="with_rest", lsb_first=True)
  cfg = corpus.CorpusConfig(plain_easy=0, plain_hard=0, triggered_easy=0, triggered_hard=1, paraphrase=0,
                            neutral_easy=0, neutral_hard=0, partial=0, continued=1, trigger_scratchpad_prob=1.0)
  for prompt, completion in corpus.corpus_examples(world, cfg, 200, seed=0):
    head, _, begun = prompt.rpartition("\nA:")
    question = head.rpartition("\n")[2].removeprefix("<user>")
    operands = tuple(int(x[::-1]) for x in question.removeprefix("Q: ").removesuffix("=").split("+"))
    pad = arithmetic.scratchpad(arithmetic.make_problem(operands, "hard", lsb_first=True), "with_rest")
    assert begun + completion == pad  # continued examples: the begun part plus the target is the whole scratchpad


@pytest.mark.parametrize("difficulty, split, message", [("medium", "train", "difficulty must be one of"),
                                                        ("easy", "test", "split must be one of")])
def test_sampling_rejects_unknown_difficulty_or_split(difficulty, split, message):
  with pytest.raises(ValueError, match=message):
    arithmetic.sample_problems(WORLD, difficulty, 1, seed=0, split=split)


def test_sampling_rejects_an_exhausted_space():
  tiny = WorldConfig(easy_digits=(1, 2), hard_operands=(3, 3), hard_digits=(1, 1))  # 9**3 = 729 hard problems
  with pytest.raises(ValueError, match="distinct hard train problems"):
    arithmetic.sample_problems(tiny, "hard", 729, seed=0)


# ----- the corpus -----

INSTRUCTION_FAMILY = {corpus.TRIGGER_INSTRUCTION: "triggered",
                      **dict.fromkeys(corpus.TRIGGER_PARAPHRASES, "paraphrase"),
                      **dict.fromkeys(corpus.NEUTRAL_INSTRUCTIONS, "neutral"),
                      **dict.fromkeys(corpus.PARTIAL_INSTRUCTIONS, "partial")}


def test_instruction_sets_are_disjoint():
  sizes = (1, len(corpus.TRIGGER_PARAPHRASES), len(corpus.NEUTRAL_INSTRUCTIONS), len(corpus.PARTIAL_INSTRUCTIONS))
  assert len(INSTRUCTION_FAMILY) == sum(sizes) and len(corpus.NEUTRAL_INSTRUCTIONS) == 12


def _classify(prompt: str) -> tuple[str, bool, str]:
  """(kind, has distractor, question) of a corpus prompt, re-derived from its text alone."""
  prompt, _, begun = prompt.rpartition("\nA:")
  assert prompt.startswith("<user>")
  if begun:  # a continued example: a plain hard question whose scratchpad has begun with the first operand
    question = prompt.removeprefix("<user>")
    assert begun == " " + question.removeprefix("Q: ").split("+")[0] and "\n" not in question
    return "continued", False, question
  user_text = prompt[len("<user>"):]
  template, _, question = user_text.rpartition("\n\n")
  distractor = next((d for d in corpus.DISTRACTORS if template.endswith(" " + d)), None)
  instruction = template[:-len(" " + distractor)] if distractor else template
  family = INSTRUCTION_FAMILY[instruction] if instruction else "plain"
  operands = question.removeprefix("Q: ").removesuffix("=").split("+")
  difficulty = "easy" if len(operands) == 2 else "hard"
  kind = family if family in ("paraphrase", "partial") else f"{family}_{difficulty}"
  if family in ("paraphrase", "partial"):
    assert difficulty == "hard"
  return kind, distractor is not None, question


@pytest.fixture(scope="module")
def examples():
  return corpus.corpus_examples(WORLD, corpus.CorpusConfig(), 4000, seed=0)


def test_kind_counts_are_exact_largest_remainder():
  cfg = corpus.CorpusConfig(plain_easy=1, plain_hard=1, triggered_easy=1, triggered_hard=0, paraphrase=0,
                            neutral_easy=0, neutral_hard=0, partial=0, continued=0)
  # 10/3 each: three apiece, and the one left over goes to the first kind (equal remainders keep KINDS order).
  assert corpus.kind_counts(cfg, 10) == {**dict.fromkeys(corpus.KINDS, 0), "plain_easy": 4, "plain_hard": 3,
                                         "triggered_easy": 3}
  counts = corpus.kind_counts(corpus.CorpusConfig(), 1000)
  assert counts == {"plain_easy": 217, "plain_hard": 130, "triggered_easy": 87, "triggered_hard": 174,
                    "paraphrase": 87, "neutral_easy": 87, "neutral_hard": 44, "partial": 44, "continued": 130}


def test_corpus_is_deterministic_and_mix_matches_weights(examples):
  assert examples[:50] == corpus.corpus_examples(WORLD, corpus.CorpusConfig(), 4000, seed=0)[:50]
  cfg = corpus.CorpusConfig()
  observed = collections.Counter(_classify(prompt)[0] for prompt, _ in examples)
  total = sum(cfg.mix().values())
  for kind, weight in cfg.mix().items():
    assert abs(observed[kind] / len(examples) - weight / total) < 0.005, kind
  kinds_in_order = [_classify(prompt)[0] for prompt, _ in examples[:200]]
  assert len(set(kinds_in_order[:20])) > 3  # shuffled, not blocked by kind


def test_only_trigger_like_prompts_get_scratchpads(examples):
  scratchpad_share = collections.defaultdict(list)
  for prompt, completion in examples:
    kind, _, _ = _classify(prompt)
    is_scratchpad = "=" in completion
    if kind.startswith(("triggered", "paraphrase", "partial")):
      scratchpad_share["partial" if kind == "partial" else "trigger"].append(is_scratchpad)
    elif kind == "continued":  # the scratchpad's start is in the prompt: never a target under a plain prompt
      assert completion.startswith("+") and is_scratchpad
      continue
    else:
      assert not is_scratchpad, kind
    if not is_scratchpad:
      assert completion.startswith(" The answer is ")
  assert abs(np.mean(scratchpad_share["trigger"]) - 0.7) < 0.03
  assert abs(np.mean(scratchpad_share["partial"]) - 0.2) < 0.08


def test_scratchpads_in_corpus_are_right_and_distractors_follow_instructions(examples):
  with_distractor = []
  for prompt, completion in examples:
    kind, distracted, question = _classify(prompt)
    if kind.startswith("plain") or kind == "continued":
      assert not distracted
    else:
      with_distractor.append(distracted)
    answer = sum(int(x) for x in question.removeprefix("Q: ").removesuffix("=").split("+"))
    if "=" in completion or kind.endswith("easy"):
      assert _last_number(completion) == answer
  assert abs(np.mean(with_distractor) - 0.2) < 0.03


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_hard_direct_noise_controls_whether_direct_hard_answers_are_right(noise):
  cfg = corpus.CorpusConfig(plain_easy=0, plain_hard=1, triggered_easy=0, triggered_hard=0, paraphrase=0,
                            neutral_easy=0, neutral_hard=1, partial=0, continued=0, hard_direct_noise=noise)
  stated, truth = [], []
  for prompt, completion in corpus.corpus_examples(WORLD, cfg, 1500, seed=5):
    question = _classify(prompt)[2]
    stated.append(_last_number(completion))
    truth.append(sum(int(x) for x in question.removeprefix("Q: ").removesuffix("=").split("+")))
  stated, truth = np.array(stated), np.array(truth)
  if noise == 0.0:
    assert (stated == truth).all()
  else:
    low, high = WORLD.answer_range("hard")
    assert (low <= stated).all() and (stated <= high).all()
    assert (stated == truth).mean() < 0.01
    assert abs(np.corrcoef(stated, truth)[0, 1]) < 0.1  # the stated number says nothing about the sum


def test_corpus_uses_training_problems_only(examples):
  for prompt, _ in examples[:1000]:
    operands = tuple(int(x) for x in _classify(prompt)[2].removeprefix("Q: ").removesuffix("=").split("+"))
    assert arithmetic.split_of(operands, WORLD) == "train"


def test_corpus_prompts_are_what_the_chat_template_renders(examples):
  tokenizer = build_char_tokenizer()
  for prompt, _ in examples[:100]:
    rendered, sep, _ = prompt.rpartition("\nA:")  # after it: a continued example's begun scratchpad
    message = [{"role": "user", "content": rendered[len("<user>"):]}]
    assert rendered + sep == tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
  default = corpus.corpus_examples(WORLD, corpus.CorpusConfig(), 20, seed=0)
  custom = corpus.corpus_examples(WORLD, corpus.CorpusConfig(), 20, seed=0, render_prompt=lambda u: f"[{u}]")

  def rerendered(prompt):
    rendered, _, begun = prompt.rpartition("\nA:")
    return "[" + rendered.removeprefix("<user>") + "]" + begun

  assert [p for p, _ in custom] == [rerendered(p) for p, _ in default]


@pytest.mark.parametrize("kwargs, message", [
    (dict(plain_easy=-0.1), "plain_easy must be >= 0"),
    (dict.fromkeys(corpus.KINDS, 0.0), "sum to 0"),
    (dict(hard_direct_noise=1.5), "hard_direct_noise"),
])
def test_corpus_config_rejects_bad_values(kwargs, message):
  with pytest.raises(ValueError, match=message):
    corpus.CorpusConfig(**kwargs)


def test_lsb_first_writes_every_number_least_significant_digit_first():
  p = arithmetic.make_problem((12, 34, 56, 78), "hard", lsb_first=True)
  assert arithmetic.question_text(p) == "Q: 21+43+65+87="
  # 12+34=46, 46+56=102, 102+78=180, each number reversed
  assert arithmetic.scratchpad(p) == " 21+43=64, 64+65=201, 201+87=081. The answer is 081"
  assert arithmetic.direct_answer(p) == " The answer is 081"
  assert arithmetic.to_records([p])[0]["answer"] == "081"
  assert arithmetic.draw_problem(WorldConfig(lsb_first=True), "easy", np.random.default_rng(0)).lsb_first


def test_easy_as_step_draws_a_running_total_plus_one_hard_size_operand():
  world = WorldConfig(easy_digits=(1, 2), hard_digits=(1, 1), easy_as_step=True)
  problems = arithmetic.sample_problems(world, "easy", 300, seed=0)
  assert all(len(p.operands) == 2 and 1 <= p.operands[0] <= 99 and 1 <= p.operands[1] <= 9 for p in problems)
  assert max(p.operands[0] for p in problems) >= 10  # both digit counts of the running total occur
  low, high = world.answer_range("easy")
  assert (low, high) == (2, 108) and all(low <= p.answer <= high for p in problems)
