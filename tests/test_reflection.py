"""The reflection meta-prompt (GEPA's layout, the authors' feedback and truncation) and the reply rule every
reflector's reply goes through."""

import pytest

from p2o_jax.p2o.records import FeedbackRecord, ReflectionRequest
from p2o_jax.p2o.reflection import (
    CUT_MARKER,
    PROMPT_MARGIN_TOKENS,
    CharEstimate,
    ReflectionStats,
    TokenizerCounter,
    build_reflection_prompt,
    extract_fenced_template,
    templates_from_replies,
)
from p2o_jax.p2o.templates import feedback_text, is_format_error

RECORDS = (
    FeedbackRecord(
        question="Let's think step by step.\nQuestion: What is 4821+9377+1205?",
        output="The sum is \\boxed{15000}",
        feedback=feedback_text(False, "15403", "The sum is \\boxed{15000}"),
        score=0.0,
    ),
    FeedbackRecord(
        question="Let's think step by step.\nQuestion: What is 12+30?",
        output="The sum is \\boxed{42}",
        feedback=feedback_text(True, "42", "The sum is \\boxed{42}"),
        score=1.0,
    ),
)


class CharTokenizer:
  """One token per character: exact, easy-to-count token budgets for the truncation tests."""

  def encode(self, text, add_special_tokens=False):
    assert add_special_tokens is False
    return [ord(ch) for ch in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids)


TOKENS = TokenizerCounter(CharTokenizer())


def test_feedback_always_shows_the_reference_answer_and_the_reward():
  assert feedback_text(False, " 15403 ", "so \\boxed{15000}") == (
      "Your final answer is incorrect. The correct answer is '15403'.\n\nReward (answer_score) = 0.00")
  assert feedback_text(True, "42", "so \\boxed{42}") == (
      "Your final answer is correct. The correct answer is '42'.\n\nReward (answer_score) = 1.00")
  for output in ("I think it is 42", "\\boxed{41} or \\boxed{43}"):  # no box; several boxes
    assert is_format_error(output)
    text = feedback_text(False, "42", output)
    assert "check your output format" in text and "The correct answer is '42'." in text
    assert text.endswith("\n\nReward (answer_score) = 0.00") and "incorrect" not in text
  # The answer fallback of the extraction decides what "no answer" means: the demo grades the last number.
  assert not is_format_error("I think it is 42", "last_number")
  assert feedback_text(False, "43", "I think it is 42", fallback="last_number").startswith("Your final answer is incorr")
  # A correct answer is never a format error; without the output there is no format check.
  assert feedback_text(True, "42", "\\boxed{42} \\boxed{42}").startswith("Your final answer is correct.")
  assert feedback_text(False, "42").startswith("Your final answer is incorrect.")


def test_prompt_has_gepas_layout_with_whole_examples():
  prompt = build_reflection_prompt(ReflectionRequest(template="Be careful.", records=RECORDS))
  assert prompt.startswith("I provided an assistant with the following instructions to perform a task for me:\n"
                           "```\nBe careful.\n```\n\n")
  assert prompt.endswith("\n\nProvide the new instructions within ``` blocks.")
  examples = prompt[prompt.index("```\n# Example 1") + 4:prompt.index("\n```\n\nYour task")]
  assert examples == "\n\n".join(
      f"# Example {k}\n## Inputs\n{r.question}\n\n## Generated Outputs\n{r.output}\n\n## Feedback\n{r.feedback}\n"
      for k, r in enumerate(RECORDS, 1))
  assert prompt.count("```") == 5  # template block, examples block, and the closing request


def test_empty_template_is_an_empty_block():
  prompt = build_reflection_prompt(ReflectionRequest(template=" \n", records=RECORDS))
  assert prompt.startswith("I provided an assistant with the following instructions to perform a task for me:\n"
                           "```\n\n```\n\n")


def test_long_outputs_stay_whole_when_the_prompt_fits():
  long_output = "H" * 500 + "x" * 20_000 + "The answer is \\boxed{31337}"
  record = FeedbackRecord(question="q", output=long_output, feedback="wrong", score=0.0)
  for limit in (0, 100_000):
    prompt = build_reflection_prompt(ReflectionRequest("t", (record,), max_prompt_tokens=limit), tokens=TOKENS)
    assert long_output in prompt and CUT_MARKER not in prompt


def _meta_tokens(template: str) -> int:
  return TOKENS.count(build_reflection_prompt(ReflectionRequest(template, ()), tokens=TOKENS))


def test_over_budget_outputs_are_cut_as_the_authors_cut_them():
  limit = 3_000
  available = limit - _meta_tokens("t") - PROMPT_MARGIN_TOKENS  # a third each for three examples
  short = FeedbackRecord(question="q0", output="short and whole", feedback="ok", score=1.0)
  format_error = FeedbackRecord(question="q1", output="F" * 150 + "f" * 5_000 + "E" * 150, feedback="fmt",
                                score=0.0, format_error=True)
  normal = FeedbackRecord(question="q2", output="A" * 1_000 + "m" * 5_000 + "Z" * 1_000, feedback="no", score=0.0)
  prompt = build_reflection_prompt(ReflectionRequest("t", (short, format_error, normal), max_prompt_tokens=limit),
                                   tokens=TOKENS)
  assert TOKENS.count(prompt) <= limit
  assert "short and whole" in prompt  # within its share: untouched
  # The format error keeps 100 tokens at each end.
  assert "F" * 100 + CUT_MARKER.rstrip() in prompt and CUT_MARKER.lstrip() + "E" * 100 + "\n" in prompt
  assert "F" * 101 not in prompt and "E" * 101 not in prompt and "ff" not in prompt
  # The other keeps 40% of its share at each end.
  third = prompt.split("## Generated Outputs\n")[3].split("\n\n## Feedback")[0]
  head, tail = third.split(CUT_MARKER)
  assert head == tail.replace("Z", "A") and set(head) == {"A"} and set(tail) == {"Z"}
  assert 0.4 * available / 3 < len(head) < 0.4 * available  # 40% of what the two other examples left
  assert prompt.index("# Example 1") < prompt.index("# Example 2") < prompt.index("# Example 3")


def test_last_resort_drops_trailing_examples_but_keeps_one():
  many = tuple(FeedbackRecord(question=f"question {i} " + "q" * 300, output="o" * 300, feedback="fb", score=0.0)
               for i in range(6))
  limit = _meta_tokens("t") + 1_500
  prompt = build_reflection_prompt(ReflectionRequest("t", many, max_prompt_tokens=limit), tokens=TOKENS)
  assert TOKENS.count(prompt) <= limit
  kept = prompt.count("## Inputs")
  assert 1 <= kept < 6 and "# Example 1\n" in prompt and f"# Example {kept}\n" in prompt
  # A limit below the meta-prompt itself keeps exactly one example.
  prompt = build_reflection_prompt(ReflectionRequest("t", many, max_prompt_tokens=10), tokens=TOKENS)
  assert prompt.count("## Inputs") == 1 and "question 0" in prompt


def test_char_estimate_over_counts_tokens_and_cuts_by_characters():
  est = CharEstimate()
  assert est.count("") == 0 and est.count("abcd") == 2 and est.count("a" * 9) == 3
  assert est.head("abcdefgh", 2) == "abcdef" and est.tail("abcdefgh", 2) == "cdefgh" and est.tail("ab", 5) == "ab"
  assert est.tail("abc", 0) == "" and TOKENS.tail("abc", 5) == "abc" and TOKENS.head("abc", 2) == "ab"
  # The request's limit is used when no explicit one is given.
  record = FeedbackRecord(question="q", output="x" * 30_000, feedback="f", score=0.0)
  prompt = build_reflection_prompt(ReflectionRequest("t", (record,), max_prompt_tokens=4_096))
  assert est.count(prompt) <= 4_096 and CUT_MARKER in prompt


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Sure!\n```\nAdd the numbers one at a time.\n```\nHope it helps.", ("Add the numbers one at a time.", "ok")),
        # First to last fence: inner fences of a nested block stay in the template.
        (
            "```\nSolve it like this:\n```text\nstep 1\n```\nThen answer.\n```",
            ("Solve it like this:\n```text\nstep 1\n```\nThen answer.", "ok"),
        ),
        ("```markdown\nLine one.\nLine two.\n```", ("Line one.\nLine two.", "ok")),
        ("```Markdown\nLine one.\n```", ("Line one.", "ok")),
        # Only "markdown" is dropped, as in the authors' code; another tag stays in the template.
        ("```text\n  Be careful.  \n```", ("text\n  Be careful.", "ok")),
        ("```Think step by step.```", ("Think step by step.", "ok")),
        # Fewer than two fences: the whole reply, backticks and whitespace stripped.
        ("no fences here", ("no fences here", "ok")),
        ("```\nAn unclosed block", ("An unclosed block", "ok")),
        ("  Use the formula.``` \n", ("Use the formula.", "ok")),
        ("markdown\nKeep going.", ("Keep going.", "ok")),
        ("````", (None, "empty")),
        ("", (None, "empty")),
        ("```\n   \n```", (None, "empty")),
        ("``````", (None, "empty")),
        ("```markdown\n```", (None, "empty")),
    ],
)
def test_extract_template_hand_cases(reply, expected):
  assert extract_fenced_template(reply) == expected


def test_no_length_cap_by_default_and_an_optional_cap():
  long = "a" * 50_000
  assert extract_fenced_template(f"```\n{long}\n```") == (long, "ok")
  assert extract_fenced_template("```\n" + "a" * 11 + "\n```", max_chars=10) == (None, "too_long")
  assert extract_fenced_template("```\n" + "a" * 10 + "\n```", max_chars=10) == ("a" * 10, "ok")
  with pytest.raises(ValueError, match="max_chars"):
    extract_fenced_template("x", max_chars=-1)


def test_templates_from_replies_counts_each_outcome():
  stats = ReflectionStats(requests=6)
  replies = ["```\nA\n```", None, "plain reply", "``` ```", "```\n" + "b" * 30 + "\n```", "```md\nB\n```"]
  assert templates_from_replies(replies, stats, max_chars=20) == ["A", None, "plain reply", None, None, "md\nB"]
  assert stats == ReflectionStats(requests=6, accepted=3, rejected_empty=1, rejected_too_long=1)
