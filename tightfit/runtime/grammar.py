"""JSON output constrained by a grammar: a LogitsMask built with xgrammar (optional dependency,
`pip install tightfit[json]`).

xgrammar compiles a JSON schema into a pushdown automaton over the tokenizer's vocabulary and
fills, per step, a bitmask of the tokens that keep the output a valid prefix; tokens outside it
get logit -inf. Once the JSON is complete only the stop (EOS) ids are allowed.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch

from tightfit.errors import GenerationError


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise GenerationError("JSON output needs the xgrammar package: pip install 'tightfit[json]'") from None
    return xgrammar


class GrammarMask:
    """LogitsMask of one generation: follows one compiled grammar token by token."""

    def __init__(self, compiled: Any, vocab_size: int) -> None:
        xgr = _xgrammar()
        self._xgr = xgr
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # [1, ceil(V / 32)] int32

    def mask(self, logits: torch.Tensor) -> None:
        self._matcher.fill_next_token_bitmask(self._bitmask)
        self._xgr.apply_token_bitmask_inplace(logits, self._bitmask)

    def accept(self, token_id: int) -> None:
        if not self._matcher.accept_token(token_id):
            raise RuntimeError(f"token {token_id} was sampled outside the grammar's mask")


class JsonGrammars:
    """Compiles JSON grammars for one tokenizer (the vocabulary analysis is done once, here)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        xgr = _xgrammar()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info)
        self.vocab_size = vocab_size

    def any_json(self) -> GrammarMask:
        """Any JSON value (OpenAI's response_format {"type": "json_object"})."""
        return GrammarMask(self._compiler.compile_builtin_json_grammar(), self.vocab_size)

    def schema(self, schema: dict) -> GrammarMask:
        """JSON matching `schema` (a JSON Schema object); compact output, no free whitespace."""
        try:
            compiled = self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as e:
            raise GenerationError(f"the JSON schema cannot be used: {e}") from e
        return GrammarMask(compiled, self.vocab_size)
