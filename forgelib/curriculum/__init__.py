"""The model-independent core of the adaptive curriculum phase.

Everything here takes the model's answers and accuracies as plain inputs (callables, strings, booleans), so it is
tested without a model; the phase module supplies the model calls and the training loop.

* ``assess``: ``assess_levels`` finds, per family, the highest level whose accuracy is still in a target band
  (where the curriculum starts); ``assess_by_level`` measures level by level, all families at once.
* ``measure``: question counts that follow from a stated rule, held-out level decisions (``decide_levels``) and
  paired answers sized by an internal pilot (``paired_answers``).
* ``pool``: ``QuestionPool`` holds the questions of the current level; questions retire after 3 consecutive
  unhelped correct answers, a failure spawns variants (new numbers, same family and level) and raises the
  question's hint (a prefix of its worked solution); ``advance`` moves to the next level. Its whole state,
  random generator included, saves to JSON and resumes exactly.
* ``dream``: ``dream`` samples the model hot and keeps the verified answers; ``DreamBuffer`` holds them for
  replay (a reservoir sample by default).
* ``frontier``: ``FrontierClient`` asks an OpenAI-compatible endpoint for new questions and keeps only checked
  ones (family format, correct answer, train split); off unless an endpoint and an API key are given.
* ``verify``: ``solve`` re-solves a prompt of a built-in family from its text (answer and worked steps).
"""
from .assess import assess_by_level, assess_levels
from .dream import DreamBuffer, DreamItem, dream
from .frontier import FrontierClient, FrontierError, build_messages, enabled, parse_proposals
from .measure import (LevelDecision, decide_levels, decision_questions, estimate_questions, paired_answers,
                      spread_questions)
from .pool import BatchItem, Question, QuestionPool, hint_cap, hint_text, prompt_with_hint
from .verify import Solution, solve

__all__ = ["BatchItem", "DreamBuffer", "DreamItem", "FrontierClient", "FrontierError", "LevelDecision", "Question",
           "QuestionPool", "Solution", "assess_by_level", "assess_levels", "build_messages", "decide_levels",
           "decision_questions", "dream", "enabled", "estimate_questions", "hint_cap", "hint_text",
           "paired_answers", "parse_proposals", "prompt_with_hint", "solve", "spread_questions"]
