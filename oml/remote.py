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
fail after their retries are reported as errors and never counted as misses. The API
key is read from an environment variable and never printed, logged or returned.

The server is run by the party accused, so nothing it sends is trusted: an answer that is not
what the API describes is a per-key error ("malformed answer"), never a crash; log-probabilities
that are not log-probabilities are ignored; each request, its retries included, ends after
--api_timeout seconds however slowly the server sends; redirects are not followed; at most
MAX_ANSWER_CHARS of a reply are kept; and the API key and any credentials in the URL are masked
wherever the server's words are shown or saved, since it may echo them. Requests run on an
event loop, so that Ctrl-C cancels those in flight at once (`Interrupted`).
"""
import asyncio
import json
import logging
import math
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from oml import OMLError
from oml.checking import KeyResult, Query
from oml.settings import NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, Settings, setting
from oml.tokenization import accepted

logger = logging.getLogger(__name__)

TOP_LOGPROBS = 10
NO_KEY = "none"  # what the client sends when the key variable is unset: local servers need no key
MAX_ANSWER_CHARS = 1000  # of a reply kept in reports: a server that ignores max_tokens must not fill the disk
MAX_ERROR_CHARS = 200  # of a server's error message kept
LOGPROB_SLACK = 1e-4  # a log-probability this little above 0 is rounding (read as 0); a larger one is no log-probability
MASK = "***"
RETRIED_STATUSES = {408, 409, 429}  # and 5xx: the server is busy or failed, and may answer a later try
ENVIRONMENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
USERINFO = re.compile(r"//[^/?#]*@")  # greedy: a password may hold '@'


@dataclass(frozen=True)
class ApiConfig(Settings):
    """A suspect behind an OpenAI-compatible server, and how it is asked."""
    api_base: str | None = setting(
        None, "Instead of --model_path: the base URL of an OpenAI-compatible server running the suspect.", kind=str)
    api_model: str | None = setting(None, "The model name to ask the --api_base server for.", kind=str)
    api_key_env: str = setting("OPENAI_API_KEY", "Environment variable holding the server's API key (never printed or saved).")
    api_concurrency: int = setting(8, "API requests in flight at once.", POSITIVE_INT)
    api_timeout: float = setting(
        60.0, "Seconds each API request may take in all: connecting, its retries and the whole answer.", POSITIVE_FLOAT)
    api_retries: int = setting(
        4, "Retries of an API request that could not connect or got HTTP 408, 409, 429 or 5xx (with backoff, "
           "within --api_timeout).", NON_NEGATIVE_INT)

    def __post_init__(self) -> None:
        """Also refuse, before any request, a base URL that is none (an empty one once fell back to a
        local model) and an API key given where the name of its variable belongs."""
        super().__post_init__()
        if self.api_base is not None:
            check_base_url(self.api_base)
        if not ENVIRONMENT_NAME.fullmatch(self.api_key_env):
            raise OMLError("api_key_env takes the name of the environment variable that holds the API key (such as "
                           "OPENAI_API_KEY), not the key itself; the value given is no such name")


def check_base_url(url: str) -> None:
    """Refuse a base URL that is not http(s) with a host, naming it without its credentials."""
    try:
        parts = urlsplit(url)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError as error:  # a malformed host or port, as in 'http://[::1'
        raise OMLError(f"--api_base {shown_url(url)!r} is not a valid URL ({error})") from None
    if not usable:
        raise OMLError(f"--api_base {shown_url(url)!r} is not an http(s) URL with a host, such as http://localhost:8000/v1")


def shown_url(url: str) -> str:
    """`url` as it may be printed, logged or saved: any user:password@ in it masked."""
    return USERINFO.sub(f"//{MASK}@", url)


def api_key(variable: str) -> str | None:
    """The API key in environment variable `variable` (None: unset or empty; local servers need none).
    One that an HTTP header cannot carry is refused here, without showing it."""
    key = os.environ.get(variable, "").strip()
    if key and not (key.isascii() and key.isprintable()):
        raise OMLError(f"the API key in environment variable {variable} holds characters that an HTTP header cannot "
                       "carry (non-ASCII or control characters); check that it was copied whole")
    return key or None


@dataclass(frozen=True)
class ApiRequest:
    """One key asked one way (`query`), rendered as the text an OpenAI-compatible server is sent."""
    index: int  # the fingerprint's position among those checked
    query: Query
    query_position: int  # the query's position among those asked
    key: str  # the key's text, as the owner's tokenizer cut it
    response: str  # the expected response text
    max_tokens: int  # the longest accepted response's length in tokens
    first_token: str  # the response's first token as text, to find among the server's log-probabilities
    others: tuple[str, ...] = ()  # the other responses that count as the key's answer (`--responses_per_key`)


def api_requests(tokenizer, pairs: list[tuple[list[int], list[int]]], queries: list[Query],
                 indices: list[int] | None = None) -> list[ApiRequest]:
    """Every key (of `indices`, default all) asked every way, as text: keys and responses are cut
    with the owner's tokenizer, then decoded, since the server tokenizes what it is sent itself."""
    requests = []
    for q, query in enumerate(queries):
        for i in range(len(pairs)) if indices is None else indices:
            key_ids, response_ids = pairs[i]
            others = tuple(tokenizer.decode(other) for other in accepted(response_ids)[1:])
            requests.append(ApiRequest(i, query, q, tokenizer.decode(key_ids), tokenizer.decode(response_ids),
                                       max(map(len, accepted(response_ids))), tokenizer.decode(response_ids[:1]), others))
    return requests


def base_url_of(url: str) -> str:
    """The server's API root, ending in /v1, whether or not the user wrote it."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def is_match(reply: str, response: str) -> bool:
    return reply.lstrip().startswith(response.lstrip())


class BadAnswer(Exception):
    """An answer that is not what the OpenAI API describes: a per-key error, never a crash."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during an API check: the requests in flight were cancelled. `results` holds one result
    per request, those not answered as errors."""

    def __init__(self, results: list[KeyResult]):
        super().__init__("interrupted")
        self.results = results


def result_of(query: ApiRequest, **found) -> KeyResult:
    """The result of one request, with what was found."""
    return KeyResult(index=query.index, format=query.query.key_format, template=query.query.template,
                     query=query.query_position, **found)


class ApiSuspect:
    """One server and model, asked from one event loop; remembers whether the server accepts
    log-probability requests. Everything it reports passes `hidden`, since servers echo keys."""

    def __init__(self, config: ApiConfig, retries: int):
        import openai  # imported on use: local checks do not need the HTTP client

        self.openai = openai
        self.model, self.api_key_env, self.timeout = config.api_model, config.api_key_env, config.api_timeout
        self.retries = retries
        self.base_url = base_url_of(config.api_base)
        self.shown = shown_url(self.base_url)
        self.key = api_key(config.api_key_env)
        # Redirects are not followed: a POST redirected becomes a GET, which no API answers, and a server may loop.
        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.key or NO_KEY, timeout=self.timeout, max_retries=0,
                                         http_client=openai.DefaultAsyncHttpxClient(follow_redirects=False))
        self.logprobs = True

    def hidden(self, text: str) -> str:
        """`text` with the API key masked."""
        return text.replace(self.key, MASK) if self.key else text

    async def post(self, query: ApiRequest, logprobs: bool) -> tuple[dict, dict]:
        """The server's answer to a key's request, as a JSON object, and the body it was sent (kept as
        evidence: it holds no API key); see `send`."""
        body = request_body(query, self.model, logprobs)
        return await self.send(body, query.query.key_format == "raw"), body

    async def send(self, body: dict, raw: bool) -> dict:
        """`body` posted to the completions (`raw`) or chat completions endpoint: the answer as a JSON
        object, within --api_timeout for the whole exchange, retries included. Time that runs out
        between tries reports the failure being waited out: a server that is down is not slow."""
        endpoint = self.client.completions if raw else self.client.chat.completions
        waited_out: list[Exception] = []
        try:
            response = await asyncio.wait_for(self.retried(lambda: endpoint.with_raw_response.create(**body), waited_out),
                                              self.timeout)
        except (TimeoutError, asyncio.TimeoutError):  # one type from Python 3.11 on
            if waited_out:
                raise waited_out[-1]  # with its cause, which says what failed
            raise
        return json_object(response.http_response.content)

    async def retried(self, send, waited_out: list[Exception]):
        """`send()`, tried again after connection errors and HTTP 408, 409, 429 and 5xx, with exponential
        backoff; `waited_out` holds the failure a backoff waits out (the client's own retries are off,
        so that it is known here)."""
        for attempt in range(self.retries + 1):
            waited_out.clear()
            try:
                return await send()
            except self.openai.APIConnectionError as error:
                waited_out.append(error)
            except self.openai.APIStatusError as error:
                if error.status_code not in RETRIED_STATUSES and error.status_code < 500:
                    raise
                waited_out.append(error)
            if attempt < self.retries:
                await asyncio.sleep(min(0.5 * 2 ** attempt, 8.0) * random.uniform(0.75, 1.0))
        raise waited_out[-1]

    async def exchange(self, query: ApiRequest) -> tuple[dict, dict]:
        """`post`, with log-probabilities while the server takes them. A request sent with them that is
        refused (HTTP 400 or 422) is sent again without them, whatever the requests in flight beside it
        learnt meanwhile."""
        with_logprobs = self.logprobs
        try:
            return await self.post(query, with_logprobs)
        except (self.openai.BadRequestError, self.openai.UnprocessableEntityError):
            if not with_logprobs:
                raise
        answered = await self.post(query, False)
        if self.logprobs:
            self.logprobs = False
            logger.info("%s does not take log-probability requests; checking without them", self.shown)
        return answered

    def failure(self, error: Exception) -> str:
        """Why a request got no usable answer, in a few words."""
        if isinstance(error, (TimeoutError, asyncio.TimeoutError, self.openai.APITimeoutError)):
            return f"no complete answer within {self.timeout:g} s"
        if isinstance(error, self.openai.APIConnectionError):
            cause = str(error.__cause__ or "").strip()
            return f"connection failed ({cause.splitlines()[0]})" if cause else "connection failed"
        if isinstance(error, self.openai.APIStatusError):
            location = error.response.headers.get("location")
            return f"HTTP {error.status_code}: " + (f"redirects to {location}" if location else server_message(error))
        if isinstance(error, BadAnswer):
            return f"malformed answer: {error}"
        return f"request failed ({type(error).__name__})"

    async def ask(self, query: ApiRequest) -> KeyResult:
        """The per-key result of one request (failures and malformed answers as errors; refusals of the
        API key as OMLError, since no other request can fare better)."""
        try:
            reply, body = await self.exchange(query)
            text, refused, alternatives = answer(reply, query.query.key_format)
        except (self.openai.AuthenticationError, self.openai.PermissionDeniedError) as error:
            raise self.key_refused(error) from None
        except (TimeoutError, asyncio.TimeoutError, BadAnswer, self.openai.OpenAIError) as error:
            return result_of(query, match=None, error=self.reason(error), request=request_body(query, self.model, False))
        if alternatives is None:
            warn_once("%s sent malformed log-probabilities (not as the API describes them, or above 0); they are ignored",
                      self.shown)
        probability, rank = first_token_odds(alternatives or [], query.first_token)
        match = not refused and any(is_match(text, response) for response in (query.response, *query.others))
        shown = self.hidden(text)
        return result_of(query, match=match, predicted=shown[:MAX_ANSWER_CHARS], predicted_cut=len(shown) > MAX_ANSWER_CHARS,
                         response_probability=probability, response_rank=rank, token_accuracy=float(match), request=body,
                         refused=refused, served_model=self.served_model(reply))

    async def chat_reply(self, body: dict) -> tuple[str, str | None]:
        """The text of the reply to one chat request as sent (empty for a refusal), or ("", why not)."""
        try:
            text, refused, _ = answer(await self.send(body, raw=False), "chat")
        except (self.openai.AuthenticationError, self.openai.PermissionDeniedError) as error:
            raise self.key_refused(error) from None
        except (TimeoutError, asyncio.TimeoutError, BadAnswer, self.openai.OpenAIError) as error:
            return "", self.reason(error)
        return ("" if refused else self.hidden(text)), None

    def key_refused(self, error) -> OMLError:
        """A refusal of the API key: no other request can fare better."""
        return OMLError(f"{self.shown} refused the API key (HTTP {error.status_code}); put the right key in the "
                        f"environment variable {self.api_key_env}")

    def reason(self, error: Exception) -> str:
        """`failure`, as a report may show it: no API key, no credentials in a URL, one line, bounded."""
        return shown_url(" ".join(self.hidden(self.failure(error)).split()))[:MAX_ERROR_CHARS]

    def served_model(self, reply: dict) -> str | None:
        """The model name the server says answered (None: it names none), warned about once when it is not
        the name asked for: a MATCH is evidence about the model that answered."""
        name = reply.get("model")
        if not isinstance(name, str):
            return None
        name = self.hidden(name)[:MAX_ERROR_CHARS]
        if not same_model(self.model, name):
            warn_once("%s answered as model %r, not the %r asked for; the report records the name it gave",
                      self.shown, name, self.model)
        return name


def server_message(error) -> str:
    """The message an API error's body gives ({"error": {"message": ...}}), else the client's summary of it."""
    message = error.body.get("message") if isinstance(error.body, dict) else None
    return message if isinstance(message, str) else str(error.message)


@lru_cache(maxsize=None)
def warn_once(message: str, *args: str) -> None:
    """Log a warning about the server once per process (a check's), not once per key or round."""
    logger.warning(message, *args)


def same_model(asked: str, served: str) -> bool:
    """Whether a server's model name is the one asked for, or a snapshot or revision of it
    ('gpt-4o' answered as 'gpt-4o-2024-08-06', 'org/model' as 'org/model@main')."""
    return served == asked or (served.startswith(asked) and served[len(asked)] in "-@:")


def request_body(query: ApiRequest, model: str, logprobs: bool) -> dict:
    """What is sent for one request: the key as `Query.request_text` puts it, greedy, as many tokens as
    the response has."""
    body = {**query.query.request_text(query.key), "model": model, "max_tokens": query.max_tokens, "temperature": 0.0, "n": 1}
    if logprobs:  # completions take how many alternatives; chat completions a switch, then how many
        body.update({"logprobs": TOP_LOGPROBS} if query.query.key_format == "raw" else {"logprobs": True, "top_logprobs": TOP_LOGPROBS})
    return body


def json_object(content: bytes) -> dict:
    """A reply body as the JSON object the API promises."""
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested beyond reason
        raise BadAnswer("the body is not JSON") from None
    if not isinstance(data, dict):
        raise BadAnswer("the body is not a JSON object")
    return data


def answer(reply: dict, key_format: str) -> tuple[str, bool, list[tuple[str, float]] | None]:
    """The reply's text, whether the model refused (a chat reply's `refusal`; its content may then be
    null), and the top log-probabilities at the first generated position (see `top_logprobs`)."""
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadAnswer("no choices")
    choice = choices[0]
    if key_format == "raw":
        text, refusal = choice.get("text"), None
    else:
        message = choice.get("message")
        if not isinstance(message, dict) or not ("content" in message or "refusal" in message):
            raise BadAnswer("a choice without a message")
        text, refusal = message.get("content") or "", message.get("refusal")
    if not isinstance(text, str):
        raise BadAnswer("a choice without text" if text is None else f"the text is not a string but {type(text).__name__}")
    return text, isinstance(refusal, str) and bool(refusal.strip()), top_logprobs(choice.get("logprobs"), key_format)


def top_logprobs(logprobs: object, key_format: str) -> list[tuple[str, float]] | None:
    """(token, log-probability) pairs at the first generated position, as the API describes them for
    completions (`top_logprobs`: a {token: logprob} per position) and chat (`content[0].top_logprobs`);
    [] when the server sent none, None when what it sent is malformed or holds values that are no
    log-probabilities (above 0, or not numbers)."""
    if logprobs is None:
        return []
    try:
        if key_format == "raw":
            positions = logprobs.get("top_logprobs") or []
            pairs = list(positions[0].items()) if positions else []
        else:
            content = logprobs.get("content") or []
            pairs = [(alt["token"], alt["logprob"]) for alt in content[0].get("top_logprobs") or []] if content else []
    except (AttributeError, KeyError, IndexError, TypeError):
        return None
    valid = all(isinstance(token, str) and is_logprob(value) for token, value in pairs)
    return pairs if valid else None


def is_logprob(value: object) -> bool:
    """A number at most 0 (up to rounding); -inf, the log-probability of the impossible, included."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value <= LOGPROB_SLACK


def first_token_odds(alternatives: list[tuple[str, float]], first_token: str) -> tuple[float | None, int | None]:
    """The probability and rank of the response's first token among the server's alternatives (None,
    None when it is not among them). Servers differ in how they show a leading space."""
    ranked = sorted(alternatives, key=lambda pair: -pair[1])
    for rank, (token, logprob) in enumerate(ranked, start=1):
        if token.strip() == first_token.strip():
            return math.exp(min(logprob, 0.0)), rank
    return None, None


async def ask_all(config: ApiConfig, requests: list, retries: int, results: list, progress: tqdm,
                  method: str = "ask") -> None:
    """Ask every request (`ApiSuspect.ask` for keys, `chat_reply` for chat bodies), at most
    `api_concurrency` in flight, into `results` as they come (so that an interrupted check keeps
    what was answered). On any exception, or cancellation, the requests still in flight are
    cancelled before it propagates."""
    suspect = ApiSuspect(config, retries)
    slots = asyncio.Semaphore(config.api_concurrency)

    async def one(position: int, query) -> None:
        async with slots:
            results[position] = await getattr(suspect, method)(query)
        progress.update()

    tasks = [asyncio.ensure_future(one(position, query)) for position, query in enumerate(requests)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await suspect.client.close()


def run_to_end(coroutine) -> None:
    """Run `coroutine` on an event loop of its own: on this thread, where Ctrl-C cancels it, or on
    another thread where this one already runs a loop (as in a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coroutine)
        return
    with ThreadPoolExecutor(max_workers=1) as thread:
        thread.submit(asyncio.run, coroutine).result()


def hint(error: str, model: str) -> str:
    """What to look at when no request got an answer, going by the first one's error."""
    if error.startswith("no complete answer"):
        return "is the server overloaded, or --api_timeout too short?"
    if error.startswith("connection failed"):
        return "is the server running, at that address?"
    if error.startswith("malformed answer"):
        return "is it an OpenAI-compatible server?"
    return f"does it serve {model!r}?"


def check_over_api(config: ApiConfig, requests: list[ApiRequest], retries: int | None = None,
                   require_an_answer: bool = True) -> list[KeyResult]:
    """Ask every request, at most `api_concurrency` in flight; one result per request, in order (see
    the module docstring). Connection errors, 408, 409, 429 and 5xx are tried again with exponential
    backoff, `retries` times (None: `config.api_retries`). Ctrl-C raises `Interrupted` with the
    results so far. With `require_an_answer`, no answer to any request is an OMLError (a later round
    of a check that had answers before only reports its errors)."""
    results: list[KeyResult | None] = [None] * len(requests)
    # Warnings about the server come while the bar is drawn: logged through it, each on a line of its own.
    with logging_redirect_tqdm(), tqdm(total=len(requests), desc=f"asking {config.api_model}") as progress:
        try:
            run_to_end(ask_all(config, requests, config.api_retries if retries is None else retries, results, progress))
        except KeyboardInterrupt:
            raise Interrupted([result or result_of(query, match=None, error="not answered: the check was interrupted")
                               for result, query in zip(results, requests)]) from None
    check_failures(config, [r.error for r in results if r.error], len(results), require_an_answer, "for any key",
                   "they are reported as errors, not counted")
    return results


def check_failures(config: ApiConfig, errors: list[str], total: int, require_an_answer: bool, of_what: str,
                   consequence: str) -> None:
    """No answer to any of `total` requests is an OMLError that says what to look at (with
    `require_an_answer`); some failed requests are a warning that says what becomes of them."""
    if require_an_answer and errors and len(errors) == total:
        raise OMLError(f"no answer from {shown_url(base_url_of(config.api_base))} {of_what} ({errors[0]}); "
                       f"{hint(errors[0], config.api_model)}")
    if errors:
        logger.warning("%d of %d requests failed after retries; %s", len(errors), total, consequence)


def chat_replies(config: ApiConfig, bodies: list[dict], require_an_answer: bool = True) -> list[tuple[str, str | None]]:
    """The reply text to each chat request body (sent as it is, with retries as `check_over_api`),
    or ("", why) where none came. Ctrl-C raises KeyboardInterrupt; with `require_an_answer`, no
    answer to any body is an OMLError."""
    results: list[tuple[str, str | None] | None] = [None] * len(bodies)
    with logging_redirect_tqdm(), tqdm(total=len(bodies), desc=f"asking {config.api_model}") as progress:
        run_to_end(ask_all(config, bodies, config.api_retries, results, progress, "chat_reply"))
    check_failures(config, [error for _, error in results if error], len(results), require_an_answer, "to any prompt",
                   "their replies count as empty")
    return results
