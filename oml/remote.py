"""Checking a suspect behind an OpenAI-compatible HTTP API (vLLM, llama.cpp's server,
`transformers serve`, hosted providers), with the maintained `openai` client.

Raw keys go to /v1/completions, chat keys to /v1/chat/completions (as the user message, with
the system prompt under test as the system message), at temperature 0 with `max_tokens` the
response's length in tokens. A key matches when the reply starts with the response text,
leading whitespace ignored on both sides (some servers strip it from chat replies). With
`max_tokens` equal to the response's token count, the reply holds exactly the tokens the
model generated, so this text match is the local checker's token match except where the model
writes the same characters with other tokens, and where a suspect with another tokenizer
writes a longer word that starts with our response (both rare, and the second only makes
innocent models look more alike, which the verdict's chance-rate floor covers).

Where the server returns log-probabilities, the probability and rank of the response's first
token at the first generated position are reported, as for local models. Requests that still
fail after the client's retries are reported as errors and never counted as misses. The API
key is read from an environment variable and never printed, logged or returned.
"""
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

from oml import OMLError
from oml.checking import KeyResult, Query
from oml.settings import POSITIVE_FLOAT, POSITIVE_INT, Settings, setting
from oml.tokenization import system_message

logger = logging.getLogger(__name__)

TOP_LOGPROBS = 10
NO_KEY = "none"  # what the client sends when the key variable is unset: local servers need no key


@dataclass(frozen=True)
class ApiConfig(Settings):
    """A suspect behind an OpenAI-compatible server, and how it is asked."""
    api_base: str | None = setting(
        None, "Instead of --model_path: the base URL of an OpenAI-compatible server running the suspect.", kind=str)
    api_model: str | None = setting(None, "The model name to ask the --api_base server for.", kind=str)
    api_key_env: str = setting("OPENAI_API_KEY", "Environment variable holding the server's API key (never printed or saved).")
    api_concurrency: int = setting(8, "API requests in flight at once.", POSITIVE_INT)
    api_timeout: float = setting(60.0, "Seconds per API request.", POSITIVE_FLOAT)


@dataclass(frozen=True)
class ApiRequest:
    """One key asked one way (`query`), rendered as the text an OpenAI-compatible server is sent."""
    index: int  # the fingerprint's position among those checked
    query: Query
    query_position: int  # the query's position among those asked
    prompt: str  # raw: the whole prompt text; chat: the user message (the key)
    response: str  # the expected response text
    max_tokens: int  # the response's length in tokens
    first_token: str  # the response's first token as text, to find among the server's log-probabilities

    @property
    def system(self) -> str | None:
        """Chat only: the system message (None: the server's template adds its default)."""
        return system_message(self.query.template) if self.query.template and self.query.key_format == "chat" else None


def api_requests(tokenizer, pairs: list[tuple[list[int], list[int]]], queries: list[Query],
                 indices: list[int] | None = None) -> list[ApiRequest]:
    """Every key (of `indices`, default all) asked every way, as text: keys and responses are cut
    with the owner's tokenizer, then decoded, since the server tokenizes what it is sent itself."""
    requests = []
    for q, query in enumerate(queries):
        for i in range(len(pairs)) if indices is None else indices:
            key_ids, response_ids = pairs[i]
            key = tokenizer.decode(key_ids)
            raw = query.template.replace("{}", key) if query.template else key
            requests.append(ApiRequest(i, query, q, raw if query.key_format == "raw" else key, tokenizer.decode(response_ids),
                                       len(response_ids), tokenizer.decode(response_ids[:1])))
    return requests


def base_url_of(url: str) -> str:
    """The server's API root, ending in /v1, whether or not the user wrote it."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def is_match(reply: str, response: str) -> bool:
    return reply.lstrip().startswith(response.lstrip())


class ApiSuspect:
    """One server and model; remembers whether the server accepts log-probability requests."""

    def __init__(self, base_url: str, model: str, api_key_env: str, timeout: float, retries: int):
        import openai  # imported on use: local checks do not need the HTTP client

        self.openai = openai
        self.model = model
        self.base_url = base_url_of(base_url)
        self.client = openai.OpenAI(base_url=self.base_url, api_key=os.environ.get(api_key_env) or NO_KEY,
                                    timeout=timeout, max_retries=retries)
        self.api_key_env = api_key_env
        self.logprobs = True
        self.lock = threading.Lock()

    def request(self, query: ApiRequest, logprobs: bool) -> tuple[object, dict]:
        """The server's reply, and the body it was sent (kept as evidence: it holds no API key)."""
        body = request_body(query, self.model, logprobs)
        create = self.client.completions.create if query.query.key_format == "raw" else self.client.chat.completions.create
        return create(**body), body

    def ask(self, query: ApiRequest) -> KeyResult:
        """The per-key result of one request (errors as results; refusals of the key as OMLError,
        since no other request can fare better)."""
        where = {"index": query.index, "format": query.query.key_format, "template": query.query.template,
                 "query": query.query_position}
        try:
            try:
                reply, body = self.request(query, self.logprobs)
            except self.openai.BadRequestError:
                if not self.logprobs:
                    raise
                reply, body = self.request(query, False)  # a server that rejects log-probability requests
                with self.lock:
                    if self.logprobs:
                        logger.info("%s does not take log-probability requests; checking without them", self.base_url)
                    self.logprobs = False
        except (self.openai.AuthenticationError, self.openai.PermissionDeniedError) as error:
            raise OMLError(f"{self.base_url} refused the API key (HTTP {error.status_code}); put the right key in the "
                           f"environment variable {self.api_key_env}") from None
        except self.openai.APIConnectionError:
            return KeyResult(**where, match=None, error="connection failed")
        except self.openai.APIStatusError as error:
            return KeyResult(**where, match=None, error=f"HTTP {error.status_code}: {' '.join(str(error.message).split())[:200]}")
        text, probability, rank = answer(reply, query)
        match = is_match(text, query.response)
        return KeyResult(**where, match=match, predicted=text, response_probability=probability, response_rank=rank,
                         token_accuracy=float(match), request=body)


def request_body(query: ApiRequest, model: str, logprobs: bool) -> dict:
    """What is sent for one request: raw keys as a completion prompt, chat keys as the user message
    (under the system prompt being tested, if any), greedy, as many tokens as the response has."""
    body = {"model": model, "max_tokens": query.max_tokens, "temperature": 0.0, "n": 1}
    if query.query.key_format == "raw":
        return {"prompt": query.prompt, **body, **({"logprobs": TOP_LOGPROBS} if logprobs else {})}
    messages = [{"role": "user", "content": query.prompt}]
    if query.system is not None:
        messages.insert(0, {"role": "system", "content": query.system})
    return {"messages": messages, **body, **({"logprobs": True, "top_logprobs": TOP_LOGPROBS} if logprobs else {})}


def answer(reply, query: ApiRequest) -> tuple[str, float | None, int | None]:
    """The reply text, and the probability and rank of the response's first token at the first
    position where the server returned log-probabilities (else None, None)."""
    choice = reply.choices[0]
    if query.query.key_format == "raw":
        text = choice.text or ""
        top = choice.logprobs.top_logprobs[0] if choice.logprobs and choice.logprobs.top_logprobs else None
        alternatives = list(top.items()) if top else []
    else:
        text = choice.message.content or ""
        content = choice.logprobs.content if choice.logprobs and choice.logprobs.content else None
        alternatives = [(alt.token, alt.logprob) for alt in content[0].top_logprobs] if content else []
    ranked = sorted(alternatives, key=lambda pair: -pair[1])
    for rank, (token, logprob) in enumerate(ranked, start=1):
        if token.strip() == query.first_token.strip():  # servers differ in how they show a leading space
            return text, math.exp(logprob), rank
    return text, None, None


def check_over_api(config: ApiConfig, requests: list[ApiRequest], retries: int = 4) -> list[KeyResult]:
    """Ask every request, at most `api_concurrency` in flight; one result per request, in order (see
    the module docstring). The client retries connection errors, 429 and 5xx with exponential backoff."""
    base_url, model = config.api_base, config.api_model
    suspect = ApiSuspect(base_url, model, config.api_key_env, config.api_timeout, retries)
    with ThreadPoolExecutor(max_workers=config.api_concurrency) as pool:
        results = list(tqdm(pool.map(suspect.ask, requests), total=len(requests), desc=f"asking {model}"))
    failed = [r for r in results if r.error]
    if failed and len(failed) == len(results):
        raise OMLError(f"no answer from {suspect.base_url} for any key ({failed[0].error}); is the server running, "
                       f"and does it serve {model!r}?")
    if failed:
        logger.warning("%d of %d requests failed after retries; they are reported as errors, not counted", len(failed), len(results))
    return results
