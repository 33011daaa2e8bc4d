"""LLM judges for MT-Bench-style grading, behind one interface: an OpenAI-compatible endpoint or a local causal LM.

A judge turns judge requests (a system prompt and a user message) into the judge's raw text; `s2ft.evaluation.mtbench`
writes the requests and reads the ratings out of the text. Both judges decode deterministically (temperature 0 /
greedy), as MT-Bench's GPT-4 judge does.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from s2ft.checks import is_positive_int
from s2ft.data.prompt import build_prompt
from s2ft.errors import UserError
from s2ft.evaluation.generate import generate
from s2ft.models import build_model

JUDGE_KINDS = ("openai", "local")
# Keys of each kind's block in ``eval.mtbench.judge`` and their defaults (None: required).
OPENAI_KEYS = {"base_url": None, "model": None, "api_key_env": "OPENAI_API_KEY", "timeout_s": 120, "retries": 3}
LOCAL_KEYS = {"model": None, "dtype": "float32", "batch_size": 4}
DEFAULT_MAX_TOKENS = 2048  # FastChat's judge budget
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
# MT-Bench's rating formats: "[[N]]" as the judge prompt asks, "[N]" as FastChat's fallback; the first match counts.
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")
RATING_RANGE = (1.0, 10.0)
log = logging.getLogger(__name__)


class JudgeError(UserError):
    """A judge that cannot be built or reached: unknown kind, missing keys, an unset API key, an endpoint error."""


@dataclass(frozen=True)
class JudgeRequest:
    """One grading request: MT-Bench's judge system prompt and the filled-in judge template."""

    system: str
    user: str


class Judge(Protocol):
    """Anything that answers judge requests with the judge model's text, in order."""

    name: str

    def judge(self, requests: Sequence[JudgeRequest]) -> list[str]:
        """The judge's raw output for each request, in the requests' order."""
        ...


class OpenAIJudge:
    """A judge behind an OpenAI-compatible ``POST {base_url}/chat/completions`` (OpenAI, vLLM, TGI, llama.cpp, ...).

    Args:
        base_url: The API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: The model name the endpoint serves (MT-Bench: ``gpt-4``).
        api_key: Sent as ``Authorization: Bearer <key>``; None sends no header (local servers without auth).
        max_tokens: Judgment budget per request.
        timeout_s: Per-request timeout.
        retries: Further attempts after a timeout, a refused connection, 429 or 5xx (exponential back-off from
            ``retry_sleep_s``); other HTTP errors fail at once.
        retry_sleep_s: The first back-off.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        timeout_s: float = 120,
        retries: int = 3,
        retry_sleep_s: float = 2.0,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.max_tokens = model, api_key, max_tokens
        self.timeout_s, self.retries, self.retry_sleep_s = timeout_s, retries, retry_sleep_s
        self.name = f"openai:{model}"

    def judge(self, requests: Sequence[JudgeRequest]) -> list[str]:
        """One chat completion per request, sequentially."""
        return [self._complete(request) for request in requests]

    def _complete(self, request: JudgeRequest) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": request.system}, {"role": "user", "content": request.user}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(self.url, data=data, headers=headers, method="POST"), timeout=self.timeout_s
                ) as response:
                    payload = response.read()
                break
            except urllib.error.HTTPError as err:
                detail = err.read()[:300].decode(errors="replace")
                if err.code not in RETRY_STATUS or attempt == self.retries:
                    raise JudgeError(f"judge endpoint {self.url} answered HTTP {err.code}: {detail}") from None
                reason = f"HTTP {err.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                if attempt == self.retries:
                    raise JudgeError(
                        f"judge endpoint {self.url} unreachable after {self.retries + 1} attempts ({err}); check "
                        "eval.mtbench.judge.openai.base_url and that the server is up"
                    ) from None
                reason = str(err)
            delay = self.retry_sleep_s * 2**attempt
            log.warning("judge request failed (%s); retrying in %.1f s", reason, delay)
            time.sleep(delay)
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(
                f"judge endpoint {self.url} did not answer in the chat-completions format: {payload[:300]!r}"
            ) from None
        if not isinstance(content, str):
            raise JudgeError(f"judge endpoint {self.url} returned no text content: {content!r}")
        return content


class LocalJudge:
    """A causal LM in this process as the judge, decoding greedily.

    Requests are rendered by `render_request`. With ``stop=rating_complete`` generation ends right after the first
    "[[N]]", since MT-Bench judgments end with their rating.

    Args:
        model: The judge model (put in eval mode here).
        tokenizer: Its tokenizer (must have a pad token, as `s2ft.models.build_model` ensures).
        name: A label for the summary, e.g. the model name.
        max_tokens: Judgment budget per request.
        batch_size: Requests per generation batch.
        stop: Optional predicate on the judgment so far that ends it early.
    """

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        batch_size: int = 4,
        stop: Callable[[str], bool] | None = None,
    ):
        self.model, self.tokenizer, self.max_tokens, self.batch_size = model.eval(), tokenizer, max_tokens, batch_size
        self.stop = stop
        self.name = f"local:{name}"

    def judge(self, requests: Sequence[JudgeRequest]) -> list[str]:
        """Greedy judgments of every request, batched."""
        prompts = [render_request(self.tokenizer, request) for request in requests]
        outputs = generate(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=self.max_tokens,
            batch_size=self.batch_size,
            stop=self.stop,
        )
        return [output.text for output in outputs]


def render_request(tokenizer, request: JudgeRequest) -> str:
    """The prompt text a local judge model sees for ``request``: its chat template (system + user message and the
    generation prompt) when the tokenizer has one, else the Alpaca prompt with the system prompt before the user's."""
    if not tokenizer.chat_template:
        return build_prompt(f"{request.system}\n\n{request.user}")
    return chat_prompt(
        tokenizer, [{"role": "system", "content": request.system}, {"role": "user", "content": request.user}]
    )


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """``messages`` through the tokenizer's chat template (it must have one), with its generation prompt, as text for
    `generate`."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    # `generate` tokenizes with the default special tokens: a template that writes the BOS itself would get two.
    adds_bos = bos is not None and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
    return text.removeprefix(bos) if adds_bos else text


def parse_rating(judgment: str) -> tuple[float | None, str | None]:
    """The rating in a judgment, as FastChat reads it, or None and why there is none.

    Returns:
        ``(rating, None)`` for the first "[[N]]" (else the first "[N]") with 1 <= N <= 10; ``(None, reason)`` when
        there is no such number or it lies outside 1-10 (FastChat would keep it; a 1-10 scale cannot).
    """
    match = RATING.search(judgment) or RATING_FALLBACK.search(judgment)
    if match is None:
        return None, "no [[rating]] in the judgment"
    rating = float(match.group(1))
    if not RATING_RANGE[0] <= rating <= RATING_RANGE[1]:
        return None, f"rating {match.group(1)} outside 1-10"
    return rating, None


def rating_complete(judgment: str) -> bool:
    """Whether a judgment so far holds its "[[N]]" rating (a local judge stops there)."""
    return RATING.search(judgment) is not None


def judge_config_problems(judge_cfg) -> list[str]:
    """Everything wrong with an ``eval.mtbench.judge`` block, checked without loading a model or calling a server.

    The block is ``{kind: openai|local, max_tokens, openai: {...}, local: {...}}``; only the chosen kind's block is
    read, so ``eval.mtbench.judge.kind=local`` switches a config that also holds an endpoint.
    """
    if not isinstance(judge_cfg, dict):
        return [f"eval.mtbench.judge must be a mapping with a 'kind' ({' or '.join(JUDGE_KINDS)}), got {judge_cfg!r}"]
    kind = judge_cfg.get("kind")
    if kind not in JUDGE_KINDS:
        return [f"eval.mtbench.judge.kind must be one of {JUDGE_KINDS}, got {kind!r}"]
    problems = []
    unknown = set(judge_cfg) - {"kind", "max_tokens", *JUDGE_KINDS}
    if unknown:
        problems.append(f"eval.mtbench.judge: unknown keys {sorted(unknown)} (known: kind, max_tokens, openai, local)")
    max_tokens = judge_cfg.get("max_tokens", DEFAULT_MAX_TOKENS)
    if not is_positive_int(max_tokens):
        problems.append(f"eval.mtbench.judge.max_tokens must be an int >= 1, got {max_tokens!r}")
    block, known = judge_cfg.get(kind) or {}, OPENAI_KEYS if kind == "openai" else LOCAL_KEYS
    if not isinstance(block, dict):
        return [*problems, f"eval.mtbench.judge.{kind} must be a mapping, got {block!r}"]
    unknown = set(block) - set(known)
    if unknown:
        problems.append(f"eval.mtbench.judge.{kind}: unknown keys {sorted(unknown)} (known: {', '.join(known)})")
    for key, default in known.items():
        if default is None and not block.get(key):
            problems.append(f"eval.mtbench.judge.{kind}.{key} is required")
    env = block.get("api_key_env", OPENAI_KEYS["api_key_env"]) if kind == "openai" else None
    if env and not os.environ.get(env):
        problems.append(
            f"the judge's API key variable {env} is not set: export {env}=..., or set "
            "eval.mtbench.judge.openai.api_key_env=null for an endpoint without authentication"
        )
    return problems


def build_judge(judge_cfg: dict, cache_dir=None, device=None) -> Judge:
    """The judge an ``eval.mtbench.judge`` block describes (a local judge's model is loaded here, onto ``device``).

    Raises:
        JudgeError: The block is invalid (every problem named, see `judge_config_problems`).
    """
    problems = judge_config_problems(judge_cfg)
    if problems:
        raise JudgeError("; ".join(problems))
    kind, max_tokens = judge_cfg["kind"], judge_cfg.get("max_tokens", DEFAULT_MAX_TOKENS)
    block = {**(OPENAI_KEYS if kind == "openai" else LOCAL_KEYS), **(judge_cfg.get(kind) or {})}
    if kind == "openai":
        key = os.environ[block["api_key_env"]] if block["api_key_env"] else None
        return OpenAIJudge(
            block["base_url"], block["model"], key, max_tokens, timeout_s=block["timeout_s"], retries=block["retries"]
        )
    model, tokenizer = build_model(block["model"], dtype=block["dtype"], cache_dir=cache_dir)
    if device is not None:
        model = model.to(device)
    return LocalJudge(model, tokenizer, block["model"], max_tokens, block["batch_size"], stop=rating_complete)
