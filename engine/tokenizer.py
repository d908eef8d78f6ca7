"""The checkpoint's own tokenizer and chat template (tokenizer.json + tokenizer_config.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import InvalidRequestError, ModelLoadError


class Tokenizer:
    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """None when the directory has no tokenizer files (token-id requests still work)."""
        path = Path(path)
        if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            return None
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
        except Exception as e:  # transformers raises many types for a bad tokenizer
            raise ModelLoadError(f"{path}: cannot load tokenizer ({type(e).__name__}: {e})") from e

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; ``add_special_tokens=False`` leaves out BOS (for text that continues a prompt)."""
        return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation followed by the model's turn (generation prompt)."""
        if not self.has_chat_template:
            raise InvalidRequestError("this model's tokenizer has no chat template: send a plain prompt")
        out = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)
