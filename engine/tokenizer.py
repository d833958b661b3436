"""Tokenizer (a thin wrapper over a transformers tokenizer) and the incremental detokenizer
the router uses to stream text as tokens arrive."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pdserve.engine.config import ModelConfig, ModelSpec
from pdserve.engine.model_files import default_gguf_path, resolve_gguf_path

log = logging.getLogger("pdserve.tokenizer")

# A lone "\ufffd" at the end of decoded text means an incomplete UTF-8 sequence (or a
# byte-fallback piece) that later tokens may complete.
_REPLACEMENT = "\ufffd"


class Tokenizer:
    """Text <-> token ids for one model.

    ``decode`` never cleans up tokenization spaces (the text is exactly what the tokens
    spell) and writes ids the tokenizer does not know (dummy models have larger
    vocabularies) as ``<tok_ID>`` instead of failing or dropping them.
    """

    def __init__(self, hf: PreTrainedTokenizerBase, eos_token_ids: tuple[int, ...],
                 chat_template: str | None = None) -> None:
        self._hf = hf
        self.eos_token_ids = eos_token_ids
        # None: use the template the tokenizer carries.
        self._chat_template = chat_template
        self._size = len(hf)
        # A fast tokenizer decodes straight through its Rust backend: the same text as
        # ``hf.decode`` without tokenization-space clean-up, at a fraction of the Python
        # around it (the router decodes every streamed token, twice).
        self._backend: RawTokenizer | None = getattr(hf, "backend_tokenizer", None)

    @property
    def vocab_size(self) -> int:
        """Number of ids this tokenizer knows (added tokens included)."""
        return self._size

    @property
    def bos_token_id(self) -> int | None:
        bos = self._hf.bos_token_id
        return bos if isinstance(bos, int) else None

    def encode(self, text: str) -> list[int]:
        """Raw text to ids, with the special tokens (e.g. BOS) the tokenizer itself adds by
        default for this model: SmolLM2 adds none, Llama 3 adds <|begin_of_text|>."""
        return list(self._hf(text)["input_ids"])

    def apply_chat_template(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """``(role, content)`` messages rendered with the model's chat template and a
        generation prompt for the assistant, as ids. The template writes any BOS itself."""
        if self._hf.chat_template is None and self._chat_template is None:
            raise ValueError("this model's tokenizer has no chat template")
        conversation = [{"role": role, "content": content} for role, content in messages]
        text = self._hf.apply_chat_template(
            conversation, chat_template=self._chat_template, add_generation_prompt=True,
            tokenize=False)
        assert isinstance(text, str)
        return list(self._hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if all(0 <= i < self._size for i in ids):
            return self._decode_known(ids, skip_special_tokens)
        # Split around unknown ids so each known run decodes as it would alone.
        parts: list[str] = []
        start = 0
        for pos, i in enumerate(ids):
            if not 0 <= i < self._size:
                parts += [self._decode_known(ids[start:pos], skip_special_tokens), f"<tok_{i}>"]
                start = pos + 1
        parts.append(self._decode_known(ids[start:], skip_special_tokens))
        return "".join(parts)

    def _decode_known(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        if not ids:
            return ""
        if self._backend is not None:
            return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        text = self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens,
                               clean_up_tokenization_spaces=False)
        assert isinstance(text, str)
        return text


def load_tokenizer(spec: ModelSpec, config: ModelConfig) -> Tokenizer:
    """The tokenizer for ``spec``: from the GGUF file, the HF folder, or, for dummy weights
    (which have none), the default SmolLM2 tokenizer as a stand-in."""
    chat_template = None
    if spec.source == "hf":
        assert spec.path is not None
        hf = _load_hf(str(Path(spec.path).resolve()), None)
    elif spec.source == "dummy" and (path := _default_gguf_if_available()) is None:
        # Offline (e.g. a GPU box with no package index): dummy weights produce noise
        # anyway, so a byte-level tokenizer serves them.
        log.warning("default tokenizer not available; dummy model uses a byte tokenizer")
        hf = byte_level_tokenizer()
    else:
        path = default_gguf_path() if spec.source == "dummy" else resolve_gguf_path(spec.path)
        hf = _load_hf(str(path.parent.resolve()), path.name)
        if hf.chat_template is None:
            # transformers did not take the GGUF's template along; read it ourselves.
            from pdserve.engine.weights import read_gguf_string

            chat_template = read_gguf_string(path, "tokenizer.chat_template")
    eos = config.eos_token_ids
    if spec.source != "dummy" and isinstance(hf.eos_token_id, int):
        # The tokenizer's eos (e.g. an instruct model's end-of-turn) also ends generation.
        eos = tuple(dict.fromkeys((*eos, hf.eos_token_id)))
    return Tokenizer(hf, eos, chat_template)


def _default_gguf_if_available() -> Path | None:
    try:
        return default_gguf_path()
    except (RuntimeError, OSError):
        return None


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte (ids 0-255) and ``<eos>`` = 256, built in memory:
    no files, no network. Ids a dummy model samples beyond 256 decode as placeholders."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<eos>"] = len(vocab)
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    hf.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return hf


@functools.lru_cache(maxsize=4)
def _load_hf(folder: str, gguf_file: str | None) -> PreTrainedTokenizerBase:
    # Cached: building the tokenizer from a GGUF takes seconds, and several parts of one
    # process (and the dummy stand-in) ask for the same one. Tokenizers are used read-only.
    if gguf_file is None:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"HF model folder not found: {folder}")
        return AutoTokenizer.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


class IncrementalDetokenizer:
    """Turns a sequence's output ids into text as they arrive (vLLM's prefix/read offsets).

    Each ``add`` decodes only a window, from ``prefix_offset`` to the end. The window's
    first ``read_offset - prefix_offset`` tokens were fully emitted before (their text is
    ``_prefix_text``), so text beyond it is new. Text is final, and the offsets move on, once
    the window ends in a whole character. Until then the window ends in U+FFFD (an
    unfinished UTF-8 character, which later tokens may complete); only that tail is held
    back and the text before it is emitted at once.

    Concatenated over calls (plus ``flush`` at the end), the pieces equal
    ``tokenizer.decode(output_ids)`` exactly. The text is that of the output alone:
    ``prompt_ids`` is not decoded as context, so the first token reads exactly as in a full
    decode of the output (e.g. no SentencePiece leading space).
    """

    # With more held tokens than this, look for an earlier token boundary that ends a
    # character and move the window there (keeps the window short when chunks keep ending
    # mid-character).
    SCAN_HELD_TOKENS = 32
    # Held this long with no such boundary at all, the ids are not text (e.g. a dummy model
    # repeating one byte token): emit as it stands, the only case that may differ from a
    # full decode.
    FORCE_HELD_TOKENS = 256

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = len(prompt_ids)
        self.output_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self._prefix_text = ""  # decode(output_ids[prefix_offset:read_offset])
        self._beyond = 0  # characters emitted past _prefix_text in the current window
        self._next_scan = 0
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def add(self, token_ids: Sequence[int]) -> str:
        """Append output ids; return only the text they finalize (possibly "")."""
        self.output_ids.extend(token_ids)
        end = len(self.output_ids)
        window = self._window(end)
        if self._whole(window):
            return self._record(self._advance(window, end))
        out = ""
        held = end - self.read_offset
        if held >= self.SCAN_HELD_TOKENS and end >= self._next_scan:
            cut = self._last_whole_boundary()
            if cut is not None:
                out = self._advance(self._window(cut), cut)
                window = self._window(end)
            elif held >= self.FORCE_HELD_TOKENS:
                return self._record(self._advance(window, end))
            else:
                self._next_scan = end + self.SCAN_HELD_TOKENS // 4
        # Emit everything before the unfinished tail: earlier text no longer changes.
        safe = window.rstrip(_REPLACEMENT)
        done = len(self._prefix_text) + self._beyond
        if len(safe) > done:
            out += safe[done:]
            self._beyond += len(safe) - done
        return self._record(out)

    def flush(self) -> str:
        """At the end of the sequence: the text still held back (an unfinished character,
        which the full decode writes as U+FFFD)."""
        end = len(self.output_ids)
        if self.read_offset == end:
            return ""
        return self._record(self._advance(self._window(end), end))

    def _window(self, end: int) -> str:
        return self.tokenizer.decode(self.output_ids[self.prefix_offset:end])

    def _whole(self, window: str) -> bool:
        return len(window) > len(self._prefix_text) and not window.endswith(_REPLACEMENT)

    def _advance(self, window: str, end: int) -> str:
        """``window`` (the text of [prefix_offset, end)) is final: return what of it is not
        yet emitted and start the next window at read_offset."""
        done = len(self._prefix_text) + self._beyond
        new = window[done:]
        # Characters already emitted past ``end`` (possible when ``end`` is an earlier cut).
        self._beyond = max(0, done - len(window))
        self.prefix_offset, self.read_offset = self.read_offset, end
        # Decode the new prefix as a window of its own rather than slice ``window``: a decoder
        # may treat a window's first token specially (SentencePiece drops its leading space),
        # and the prefix and the next window must start alike.
        self._prefix_text = self._window(end)
        return new

    def _last_whole_boundary(self) -> int | None:
        for cut in range(len(self.output_ids) - 1, self.read_offset, -1):
            if self._whole(self._window(cut)):
                return cut
        return None

    def _record(self, new: str) -> str:
        if new:
            self._pieces.append(new)
        return new
