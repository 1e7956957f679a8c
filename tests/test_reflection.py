"""The reflection meta-prompt and the fence rule every reflector's reply goes through."""

import pytest

from p2o_jax.p2o.records import FeedbackRecord, ReflectionRequest
from p2o_jax.p2o.reflection import (
    ReflectionStats,
    build_reflection_prompt,
    extract_fenced_template,
    keep_tail,
    templates_from_replies,
)

RECORDS = (
    FeedbackRecord(
        question="What is 4821+9377+1205?",
        output="The answer is 15000",
        feedback="Your final answer is incorrect. The correct answer is '15403'.",
        score=0.0,
    ),
    FeedbackRecord(
        question="What is 12+30?",
        output="The answer is 42",
        feedback="Your final answer is correct.",
        score=1.0,
    ),
)


def test_prompt_shows_instruction_examples_feedback_and_asks_for_a_fence():
  prompt = build_reflection_prompt(ReflectionRequest(template="Be careful.", records=RECORDS))
  assert "```\nBe careful.\n```" in prompt
  for record in RECORDS:
    assert record.question in prompt
    assert record.output in prompt
    assert record.feedback in prompt
  # Examples keep their order and their verdicts.
  assert prompt.index("4821+9377+1205") < prompt.index("12+30")
  assert "Example 1 (not solved)" in prompt and "Example 2 (solved)" in prompt
  assert "NO instruction" not in prompt
  assert prompt.rstrip().endswith("put nothing else inside the fences.")
  assert "fenced block" in prompt


@pytest.mark.parametrize("template", ["", "   \n "])
def test_prompt_says_when_the_instruction_is_empty(template):
  prompt = build_reflection_prompt(ReflectionRequest(template=template, records=RECORDS))
  assert "there is NO instruction" in prompt
  # The only fence left is the one in the closing request, so a model is not shown an empty block to copy.
  assert prompt.count("```") == 1


def test_long_outputs_keep_their_tail():
  head = "H" * 500
  tail = "running total 99. The answer is 31337"
  record = FeedbackRecord(question="q", output=head + "x" * 5000 + tail, feedback="wrong", score=0.0)
  prompt = build_reflection_prompt(ReflectionRequest(template="t", records=(record,)), max_example_chars=100)
  assert tail in prompt
  assert head not in prompt
  assert "the first 5437 characters are left out" in prompt  # 500 + 5000 + 37 - 100


def test_keep_tail_hand_cases():
  assert keep_tail("abcdef", 6) == "abcdef"
  assert keep_tail("abcdef", 2) == "[... the first 4 characters are left out ...]\nef"
  with pytest.raises(ValueError, match="max_chars"):
    keep_tail("abc", 0)


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Sure!\n```\nAdd the numbers one at a time.\n```\nHope it helps.", ("Add the numbers one at a time.", "ok")),
        # First to last fence: inner fences of a nested block stay in the template.
        (
            "```\nSolve it like this:\n```text\nstep 1\n```\nThen answer.\n```",
            ("Solve it like this:\n```text\nstep 1\n```\nThen answer.", "ok"),
        ),
        ("```text\n  Be careful.  \n```", ("Be careful.", "ok")),
        ("```markdown\nLine one.\nLine two.\n```", ("Line one.\nLine two.", "ok")),
        # A capitalised first line is the instruction, not a language tag.
        ("```Think\nstep by step.\n```", ("Think\nstep by step.", "ok")),
        ("```Think step by step.```", ("Think step by step.", "ok")),
        ("no fences here", (None, "no_fence")),
        ("```\nAn unclosed block", (None, "no_fence")),
        ("````", (None, "no_fence")),  # the two ``` overlap: not two fences
        ("```\n   \n```", (None, "empty")),
        ("``````", (None, "empty")),
        ("```python\n```", (None, "empty")),
    ],
)
def test_extract_fenced_template_hand_cases(reply, expected):
  assert extract_fenced_template(reply) == expected


def test_extract_rejects_too_long_but_accepts_the_limit():
  assert extract_fenced_template("```\n" + "a" * 11 + "\n```", max_chars=10) == (None, "too_long")
  assert extract_fenced_template("```\n" + "a" * 10 + "\n```", max_chars=10) == ("a" * 10, "ok")


def test_templates_from_replies_counts_each_outcome():
  stats = ReflectionStats(requests=6)
  replies = ["```\nA\n```", None, "nothing", "``` ```", "```\n" + "b" * 30 + "\n```", "```md\nB\n```"]
  assert templates_from_replies(replies, stats, max_chars=20) == ["A", None, None, None, None, "B"]
  assert stats == ReflectionStats(
      requests=6, accepted=2, rejected_no_fence=1, rejected_empty=1, rejected_too_long=1
  )
