"""The digit-level tokenizer of the Sudoku models, saved as ``tokenizer.json``.

Ids follow the Gemma convention for the special tokens (pad 0, eos 1, bos 2) so that the
checkpoint's config matches the official one. A puzzle prompt is ``<bos>`` followed by 81
cells ('.' for a blank); a solution is 81 digit tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

PAD, EOS, BOS, UNK, SEP, BLANK = 0, 1, 2, 3, 4, 5
DIGIT0 = 5  # token id of digit d is DIGIT0 + d for d in 1..9; DIGIT0 itself is the blank '.'
VOCAB = ["<pad>", "<eos>", "<bos>", "<unk>", "<sep>", ".", "1", "2", "3", "4", "5", "6", "7", "8", "9", "\n"]
VOCAB_SIZE = len(VOCAB)  # 16: uniform noise over the vocabulary hits a digit 9 times in 16


def digit_token(d: int) -> int:
    if not 1 <= d <= 9:
        raise ValueError(f"digit must be 1..9, got {d}")
    return DIGIT0 + d


def token_digit(t: int) -> int:
    """Digit of a token id, 0 for anything that is not a digit 1..9."""
    return t - DIGIT0 if DIGIT0 < t <= DIGIT0 + 9 else 0


def prompt_ids(puzzle: Sequence[int]) -> list[int]:
    """``<bos>`` + one token per cell (blank '.' for 0)."""
    return [BOS] + [DIGIT0 + v for v in puzzle]


def grid_ids(grid: Sequence[int]) -> list[int]:
    return [DIGIT0 + v for v in grid]


def ids_grid(ids: Sequence[int]) -> tuple[int, ...]:
    return tuple(token_digit(int(t)) for t in ids)


# A chat turn carries a puzzle: the template turns the last user message into the prompt
# (<bos> + 81 cells, '0' read as a blank, whitespace dropped), so chat clients work too.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' and loop.last %}"
    "{{ m['content'] | replace('0', '.') | replace(' ', '') | replace('\\n', '') | replace('\\t', '') }}"
    "{% endif %}{% endfor %}"
)


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` over the 16-symbol vocabulary, one token per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", sep_token="<sep>")
    fast.add_bos_token = False
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(path: str | Path) -> None:
    build_tokenizer().save_pretrained(str(path))
