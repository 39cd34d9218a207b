"""Prompt text and scored token ids, shared by forge training and every scoring backend.

The reward reads one logit per option at the answer position, so training and scoring must
build byte-identical prompts and agree on which token stands for which option. Two modes:

- ``content``: the model answers with the option's own word; z_i is the logit of option i's
  single content token (a small model trained from scratch here learns this; letters it does not).
- ``letter``: options are lettered A, B, ...; z_i is the logit of letter i (pretrained VLMs).

A scored token that is not exactly one token, or two options sharing one token, would make the
reward silently wrong, so both are errors that name the option.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

MODES = ("content", "letter")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ANSWER_CUE = "Answer:"


class PromptError(ValueError):
    """Options cannot be scored under this tokenizer/mode; the message names the option."""


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise PromptError(f"answer mode must be one of {MODES}, got {mode!r}")


def frame_label(i: int) -> str:
    """The text before the i-th shown frame (0-based) when a model reads frame labels: its
    1-based number, one token (`forge.train_tokenizer` makes it one), as InternVL's
    ``Frame1: <image>`` numbers video frames."""
    return f" {i + 1}"


def frames_text(n_frames: int, image_token: str, frame_labels: bool = False) -> str:
    """The frames' part of the prompt: one placeholder each, chronological, optionally each
    after its `frame_label`."""
    if not frame_labels:
        return image_token * n_frames
    return "".join(frame_label(i) + image_token for i in range(n_frames))


def build_prompt(
    question: str,
    options: Sequence[str],
    n_frames: int,
    mode: str,
    image_token: str,
    frame_labels: bool = False,
) -> str:
    """Frames first (one placeholder each, chronological, numbered with `frame_labels`), then
    question, options, answer cue.

    The answer is the next token after ``Answer:``: ``" " + option`` (content) or
    ``" " + letter`` (letter), see `answer_surfaces`.
    """
    _check_mode(mode)
    if mode == "content":
        opts = "Options: " + ", ".join(options) + "."
    else:
        if len(options) > len(LETTERS):
            raise PromptError(f"letter mode supports at most {len(LETTERS)} options")
        opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{frames_text(n_frames, image_token, frame_labels)}\n{question}\n{opts}\n{ANSWER_CUE}"


def answer_surfaces(options: Sequence[str], mode: str) -> list[str]:
    """The text of each option's answer token as it follows the answer cue."""
    _check_mode(mode)
    if mode == "content":
        return [" " + o.strip() for o in options]
    return [" " + LETTERS[i] for i in range(len(options))]


def scored_token_ids(tokenizer: _Tokenizer, options: Sequence[str], mode: str) -> list[int]:
    """One token id per option (its answer token); raise PromptError if that is ambiguous."""
    ids: list[int] = []
    owner: dict[int, int] = {}
    for i, surface in enumerate(answer_surfaces(options, mode)):
        toks = tokenizer.encode(surface, add_special_tokens=False)
        if len(toks) != 1:
            raise PromptError(
                f"option {i} ({options[i]!r}): {mode} mode scores {surface!r}, which is "
                f"{len(toks)} tokens {toks} under this tokenizer, not one; every scored "
                f"answer must be a single token"
            )
        if toks[0] in owner:
            j = owner[toks[0]]
            raise PromptError(
                f"options {j} ({options[j]!r}) and {i} ({options[i]!r}) share scored token "
                f"{toks[0]}; their scores could not be told apart"
            )
        owner[toks[0]] = i
        ids.append(toks[0])
    return ids
