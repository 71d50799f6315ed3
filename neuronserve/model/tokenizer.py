"""Tokenizer, chat template and an incremental detokenizer for streaming."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# How many already-emitted tokens are decoded again with each new one, so that a token's text is
# taken in context (leading spaces, multi-token characters) without decoding the whole output.
_CONTEXT_TOKENS = 5


class Tokenizer:
    """A Hugging Face tokenizer loaded from a model directory (a converted GGUF's cache included)."""

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)))

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""
        if not self.hf.chat_template:
            raise ValueError("messages: this model's tokenizer has no chat template; send a plain prompt")
        text = self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation equals decoding them all.

    A token that ends inside a multi-byte UTF-8 character decodes to U+FFFD; its text is held back
    until the character completes. Each new token is decoded together with a few earlier ones, so
    leading spaces come out as the whole-sequence decode would give them.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.token_ids: list[int] = context  # context + output
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = len(context)  # tokens before this are already emitted as text
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.token_ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.token_ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full_text = decode(self.token_ids[self.prefix_offset :], self.skip_special_tokens)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""  # nothing new yet, or a character still incomplete
        delta = full_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self.text += delta
        return delta
