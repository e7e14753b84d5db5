"""The personality manifest (`MIRADOR_HOME/personalities.toml`) and keyword routing.

A personality is the shared base model plus one or more LoRA adapters with scales, and the keywords that
select it. Routing (documented in README):
- `model = "base"` (or "base:" with no adapter) → the base model, no routing;
- `model = "base:NAME"` → the base with adapter NAME at scale 1.0; `"base:NAME+OTHER"` → both at scale 1.0 (a
  federation's global adapter with this node's personal one: `base:fed-club+fed-club-me`);
- `model = "<personality>"` → that personality;
- `model = "auto"` or the served model id → keyword routing on the latest user message: its words (Unicode
  word characters, case-insensitive) are matched against each personality's `load_on` keywords (a keyword of
  several words must appear as consecutive words); the personality with the most distinct matching keywords
  answers, ties broken by manifest order; no match → the base, unless the node's memory is on: then the
  personality whose description and keywords are closest in meaning to the message answers, when its cosine
  similarity reaches `[memory] route_similarity` (node.memory.routing).
"""

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Name = Annotated[str, msgspec.Meta(pattern=NAME_RE)]
Scale = Annotated[float, msgspec.Meta(gt=0.0, le=4.0)]
AUTO = "auto"
BASE = "base"


class ManifestError(ValueError):
    """The manifest is invalid; the message names the personality and the key."""


class PersonalitySpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One personality as written in the manifest."""

    base: str
    adapter: Name | None = None
    adapters: dict[Name, Scale] | None = None
    load_on: list[Annotated[str, msgspec.Meta(min_length=1, max_length=64)]] = []
    description: str = ""
    tools: list[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]] = []  # node-side tools it may run


@dataclass(frozen=True)
class Personality:
    """A validated personality: adapters with scales, keywords as word tuples."""

    name: str
    base: str
    adapters: tuple[tuple[str, float], ...]
    keywords: tuple[tuple[str, ...], ...]
    description: str = ""
    tools: tuple[str, ...] = ()

    @property
    def profile_text(self) -> str:
        """What semantic routing compares messages with: the description and the keywords."""
        words_ = "; ".join(" ".join(k) for k in self.keywords)
        return f"{self.description}. {words_}".strip(". ") if self.description else words_


@dataclass(frozen=True)
class Route:
    """Who answers: a personality (None = the base) and the adapters to attach."""

    personality: str | None
    adapters: tuple[tuple[str, float], ...] = ()
    tools: tuple[str, ...] = ()  # the personality's node-side tools

    @property
    def label(self) -> str:
        """What responses report as the answering personality."""
        return self.personality or BASE


_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased words of `text`."""
    return [w.casefold() for w in _WORD.findall(text)]


def parse_manifest(text: str, source: str, base_ids: tuple[str, ...]) -> list[Personality]:
    """Validate a manifest against the served base model's ids; keeps manifest order."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{source}: not valid TOML: {exc}") from None
    extra = set(data) - {"personalities"}
    if extra:
        raise ManifestError(f"{source}: unknown top-level key(s) {sorted(extra)}; only [personalities] is allowed")
    table = data.get("personalities", {})
    if not isinstance(table, dict):
        raise ManifestError(f"{source}: 'personalities' must be a table")
    out: list[Personality] = []
    for name, raw_spec in table.items():
        where = f"{source}: personality {name!r}"
        if not re.match(NAME_RE, name):
            raise ManifestError(f"{where}: names use letters, digits, '_', '.', '-' (at most 64)")
        try:
            spec = msgspec.convert(raw_spec, PersonalitySpec)
        except msgspec.ValidationError as exc:
            raise ManifestError(f"{where}: {str(exc).replace('$.', '')}") from None
        if name in (AUTO, BASE) or name in base_ids:
            raise ManifestError(f"{where}: the name is reserved (auto, base and the model ids)")
        if spec.base not in base_ids:
            raise ManifestError(f"{where}: base = {spec.base!r} is not the served model ({', '.join(base_ids)})")
        if (spec.adapter is None) == (spec.adapters is None):
            raise ManifestError(f"{where}: give exactly one of 'adapter' (a name) or 'adapters' (name = scale)")
        adapters = ((spec.adapter, 1.0),) if spec.adapter else tuple((spec.adapters or {}).items())
        if not adapters:
            raise ManifestError(f"{where}: 'adapters' is empty")
        keywords = tuple(tuple(words(k)) for k in spec.load_on)
        if any(not k for k in keywords):
            raise ManifestError(f"{where}: load_on has a keyword without any word characters")
        out.append(Personality(name, spec.base, adapters, keywords, spec.description, tuple(spec.tools)))
    return out


def add_personality(path: Path, name: str, spec: PersonalitySpec, base_ids: tuple[str, ...]) -> None:
    """Append `[personalities.NAME]` to the manifest (its comments and order kept), checked whole, written
    atomically; ManifestError if NAME exists or the result is invalid."""
    from node.core.fsutil import atomic_write_text

    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if any(p.name == name for p in parse_manifest(text, str(path), base_ids)):
        raise ManifestError(f"{path}: a personality {name!r} exists already; choose another name")
    fields = {k: v for k, v in msgspec.structs.asdict(spec).items() if v not in (None, [], "")}
    body = "".join(f"{key} = {_toml_value(value)}\n" for key, value in fields.items())
    text = f"{text.rstrip()}\n\n[personalities.{name}]\n{body}".lstrip()
    parse_manifest(text, str(path), base_ids)
    atomic_write_text(path, text)


def _toml_value(value: object) -> str:
    """A TOML value: JSON's strings (ASCII, escaped) are TOML basic strings; lists of them are TOML arrays."""
    import json

    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def load_manifest(path: Path, base_ids: tuple[str, ...]) -> list[Personality]:
    """Load the manifest file; a missing file means no personalities."""
    if not path.exists():
        return []
    return parse_manifest(path.read_text(encoding="utf-8"), str(path), base_ids)


class UnknownModelError(LookupError):
    """`model` names nothing this node serves."""


def _count_matches(message_words: list[str], keywords: tuple[tuple[str, ...], ...]) -> int:
    hits = 0
    for kw in keywords:
        n = len(kw)
        if any(tuple(message_words[i : i + n]) == kw for i in range(len(message_words) - n + 1)):
            hits += 1
    return hits


def route(
    model: str, latest_user_message: str | None, personalities: list[Personality], base_ids: tuple[str, ...]
) -> Route:
    """Decide who answers a request (see the module docstring for the rules)."""
    if model == BASE or model == f"{BASE}:":
        return Route(None)
    if model.startswith(f"{BASE}:"):
        names = model[len(BASE) + 1 :].split("+")
        if len(set(names)) != len(names) or not all(re.match(NAME_RE, n) for n in names):
            raise UnknownModelError(model)
        return Route(model, tuple((n, 1.0) for n in names))
    for p in personalities:
        if p.name == model:
            return Route(p.name, p.adapters, p.tools)
    if model != AUTO and model not in base_ids:
        raise UnknownModelError(model)
    if not latest_user_message:
        return Route(None)
    message_words = words(latest_user_message)
    best: Personality | None = None
    best_hits = 0
    for p in personalities:  # manifest order: the first of equal scores wins
        hits = _count_matches(message_words, p.keywords)
        if hits > best_hits:
            best, best_hits = p, hits
    return Route(best.name, best.adapters, best.tools) if best else Route(None)


class ManifestFile:
    """The manifest on disk, re-read when it changes (mtime, size); an invalid edit keeps the last good one."""

    def __init__(self, path: Path, base_ids: tuple[str, ...]) -> None:
        self.path, self.base_ids = path, base_ids
        self._stamp: tuple[int, int] | None = None
        self._personalities: list[Personality] = []
        self.error: str | None = None
        self.reloads = 0

    def personalities(self) -> list[Personality]:
        """The current personalities (a stat per call; parsed again only after a change)."""
        try:
            st = self.path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return self._personalities
        self._stamp = stamp
        try:
            self._personalities = load_manifest(self.path, self.base_ids) if stamp else []
            self.error = None
            self.reloads += 1
        except (ManifestError, OSError, UnicodeDecodeError) as exc:
            self.error = str(exc)  # the last good manifest keeps serving
        return self._personalities
