"""Models held in memory, each with the caches that belong to it.

A `LoadedModel` owns its prefix (KV) cache and its exact response cache: unloading the
model drops both. Loads and unloads run on the engine thread; other threads only read
`describe_all()` snapshots and counters. MLX and mlx-lm are imported where they are used, on
the engine thread: this module is imported at start-up, and `initialize` does not wait for them.
"""

from __future__ import annotations

import datetime
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..embeddings.detect import embedding_kind
from ..errors import ModelLoadFailed, OutOfMemory, brief
from ..hub import ModelLocation, Progress
from ..length_bound import most_bytes_per_token
from ..model_config import context_length as _context_length
from ..model_config import quantization as _quantization
from ..model_config import vocab_size as _vocab_size
from ..settings import Settings
from ..vision.model import is_vision_model
from .constraints import prepare_grammars
from .memory import is_out_of_memory, release_memory
from .response_cache import ResponseCache
from .sharding import check_shardable, load_shard

if TYPE_CHECKING:  # imported on the engine thread when used (see above)
    from mlx_lm.generate import StopSequences
    from mlx_lm.models.cache import LRUPromptCache

    from ..embeddings.embedder import Embedder
    from ..vision.model import VisionParts

log = logging.getLogger("localmlx.registry")

def _warm_up(model: Any, tokenizer: Any) -> None:
    """Run two decode steps once, so kernel compilation is paid at load time and not in
    the first request's time to first token."""
    from mlx_lm import stream_generate

    for _ in stream_generate(model, tokenizer, [0], max_tokens=2):
        pass


# Architectures whose batched attention is wrong in mlx-lm 0.32: gemma2 lines the padding
# mask's batch axis up with its kv-head axis (wrong tokens, or a broadcast error). They run
# one request at a time until that is fixed upstream.
_UNBATCHABLE_TYPES = frozenset({"gemma2"})


def _caches_can_merge(model: Any) -> bool:
    """mlx-lm's BatchGenerator merges per-request caches into one batch cache."""
    from mlx_lm.models.cache import make_prompt_cache

    return all(hasattr(c, "merge") for c in make_prompt_cache(model))


def can_batch(model: Any, config: dict[str, Any]) -> bool:
    return config.get("model_type") not in _UNBATCHABLE_TYPES and _caches_can_merge(model)


def describe(name: str, path: Path, model: Any, config: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx
    from mlx.utils import tree_reduce
    from mlx_lm.utils import get_total_parameters

    nbytes = tree_reduce(lambda acc, x: acc + x.nbytes if isinstance(x, mx.array) else acc, model, 0)
    return {
        "model": name,
        "path": str(path),
        "type": str(config.get("model_type", "unknown")),
        "parameters": int(get_total_parameters(model)),
        "quantization": _quantization(config),
        "contextLength": _context_length(config),
        "bytes": int(nbytes),
    }


def capabilities(tokenizer: Any) -> list[str]:
    """What a text-generation model serves: tools when mlx-lm knows its tool-call format (from
    its template or vocabulary), thinking when it has think markers."""
    chat = getattr(tokenizer, "chat_template", None) is not None
    return ((["chat"] if chat else []) + ["generate"]
            + (["tools"] if chat and getattr(tokenizer, "tool_parser", None) is not None else [])
            + (["thinking"] if chat and getattr(tokenizer, "has_thinking", False) else []))


def iso_utc(wall: float) -> str:
    """A wall-clock time as the protocol shows it (ISO 8601, UTC, to the second)."""
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).isoformat(timespec="seconds")


@dataclass
class ModelOptions:
    """How a loaded model is kept and what its requests get by default."""

    keep_alive: float = -1.0  # seconds after its last use; -1: until unloaded; 0: after each reply
    kv_bits: int | None = None
    max_kv_size: int | None = None
    draft_model: str | None = None  # its requests draft with this model (speculative decoding)
    num_draft_tokens: int | None = None  # None: adaptive
    prompt_lookup: bool = False  # its requests draft from their own n-grams


@dataclass(eq=False)
class LoadedModel:
    name: str
    path: Path
    model: Any
    tokenizer: Any  # mlx_lm TokenizerWrapper
    config: dict[str, Any]
    description: dict[str, Any]
    location: ModelLocation  # where it was loaded from (its files may since be gone)
    batchable: bool
    prefix_cache: LRUPromptCache | None  # None when disabled
    response_cache: ResponseCache | None
    eos_stops: StopSequences | None  # of the end-of-sequence tokens; None for an embedding model
    options: ModelOptions
    embedder: Embedder | None = None  # for an embedding model (it then only embeds)
    sharded: bool = False  # this process holds one rank's shard of it (see sidecar.distributed)
    base: str | None = None  # <base>+<adapter>: the loaded model whose weights (and tokenizer) it shares
    vision: VisionParts | None = None  # a vision-language model's processor (served through mlx-vlm)
    last_used: float = field(default_factory=time.monotonic)
    last_used_at: float = field(default_factory=time.time)  # wall clock, for listings

    def touch(self) -> None:
        self.last_used, self.last_used_at = time.monotonic(), time.time()

    @property
    def bytes(self) -> int:
        return int(self.description["bytes"])

    @property
    def expires_in(self) -> float | None:
        """Seconds until its keep-alive runs out, counted from its last use; None: for ever."""
        if self.options.keep_alive < 0:
            return None
        return max(0.0, self.last_used + self.options.keep_alive - time.monotonic())

    def describe(self) -> dict[str, Any]:
        expires = self.expires_in
        options = self.options
        return dict(self.description, keepAlive=options.keep_alive, kvBits=options.kv_bits,
                    maxKvSize=options.max_kv_size, draftModel=options.draft_model,
                    numDraftTokens=options.num_draft_tokens, promptLookup=options.prompt_lookup,
                    expiresAt=None if expires is None else iso_utc(time.time() + expires))

    @property
    def context_length(self) -> int | None:
        return _context_length(self.config)

    @property
    def vocab_size(self) -> int | None:
        return _vocab_size(self.config)

    @functools.cached_property
    def bytes_per_token(self) -> tuple[int, int] | None:
        """The most bytes of text one of its tokens stands for (see length_bound); asked
        first when a request is tokenized, off the engine thread."""
        return most_bytes_per_token(self.tokenizer)

    @property
    def prefix_cache_bytes(self) -> int:
        return int(self.prefix_cache.nbytes) if self.prefix_cache is not None else 0


@dataclass
class Sharding:
    """How this process's text models are loaded when it is one rank of a group."""

    world: Any  # the mx.distributed group
    mode: str  # "tensor" or "pipeline"
    # On rank 0: tells the followers to load what this rank is about to (None on a follower).
    announce_load: Callable[[ModelLocation, Path, ModelOptions], None] | None = None
    # On rank 0: the ranks no longer run the same operations (a load or a step failed here
    # after the followers were told): the group must end. None on a follower, which exits.
    diverged: Callable[[str], None] | None = None
    # On rank 0: returns once every follower has finished the load this rank has (they may be
    # silent to heartbeats until then), so the load answers only when the group can serve it.
    followers_loaded: Callable[[], None] | None = None

    @property
    def size(self) -> int:
        return int(self.world.size())


class ModelRegistry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._models: dict[str, LoadedModel] = {}
        self.sharding: Sharding | None = None  # set once a group is formed

    def get(self, name: str) -> LoadedModel | None:
        loaded = self._models.get(name)
        if loaded is not None:
            loaded.touch()
            base = self._models.get(loaded.base) if loaded.base is not None else None
            if base is not None:
                base.touch()  # used through its adapter: not the least recently used
        return loaded

    def peek(self, name: str) -> LoadedModel | None:
        """Like get, without counting as a use."""
        return self._models.get(name)

    def is_loaded(self, name: str) -> bool:
        return name in self._models

    def names(self) -> list[str]:
        return list(self._models)

    def loaded_models(self) -> list[LoadedModel]:
        return list(self._models.values())

    def describe_all(self) -> list[dict[str, Any]]:
        return [m.describe() for m in list(self._models.values())]

    def load(self, location: ModelLocation, path: Path, options: ModelOptions, progress: Progress) -> LoadedModel:
        """On the engine thread, with the files in place and room made for it."""
        name = location.name
        started = time.perf_counter()
        try:
            progress("weights", 1, 3, "step")
            kind = embedding_kind(path, name)
            if location.adapter is not None:
                loaded = self._load_variant(location, options, progress)
            elif kind is not None:
                loaded = self._load_embedder(location, path, kind, options, progress)
            elif is_vision_model(path):
                loaded = self._load_vision(location, path, options)
            else:
                model, tokenizer, config = self._load_text(location, path, options)
                progress("warmup", 2, 3, "step")
                _warm_up(model, tokenizer)
                loaded = self._wrap(location, path, model, tokenizer, config, options)
                if self.sharding is not None:
                    prepare_grammars(tokenizer, loaded.vocab_size)
                    if self.sharding.followers_loaded is not None:
                        self.sharding.followers_loaded()
        except ModelLoadFailed:  # says why itself (a model that cannot be split for the group)
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise OutOfMemory(f"Out of memory loading {name}: {brief(exc)}", model=name) from exc
            log.exception("load of %s failed", name)
            raise ModelLoadFailed(f"Model load failed for {name}: {brief(exc)}",
                                  model=name, reason=type(exc).__name__) from exc
        loaded.description["loadTimeMs"] = round((time.perf_counter() - started) * 1000, 3)
        self._models[name] = loaded
        progress("ready", 3, 3, "step")
        log.info("loaded %s from %s in %.0f ms (%s)", name, path, loaded.description["loadTimeMs"],
                 "batched" if loaded.batchable else "one request at a time")
        return loaded

    def _load_variant(self, location: ModelLocation, options: ModelOptions, progress: Progress) -> LoadedModel:
        """`<base>+<adapter>`: a second module tree over the base's own weight arrays (no copy:
        only the adapter's arrays are new), with mlx-lm's adapter layers put in."""
        import mlx.core as mx
        from mlx.utils import tree_flatten
        from mlx_lm.tuner.utils import load_adapters
        from mlx_lm.utils import load_model

        assert location.adapter is not None and location.base is not None
        base = self.peek(location.base)
        if base is None or base.embedder is not None or base.vision is not None or self.sharding is not None:
            why = ("adapters are not served on a distributed group" if self.sharding is not None
                   else f"{location.base} is not loaded" if base is None
                   else f"{location.base} is an embedding model" if base.embedder is not None
                   else f"{location.base} is a vision model (adapters are served on text models)")
            raise ModelLoadFailed(f"Model load failed for {location.name}: {why}", model=location.name, reason=why)
        model, _ = load_model(base.path, lazy=True)  # its freshly read weights are replaced unread
        model.update(base.model.parameters())
        load_adapters(model, str(location.adapter))
        model.eval()
        parameters: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
        own = [v for k, v in parameters if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m")]
        mx.eval(own)
        progress("warmup", 2, 3, "step")
        _warm_up(model, base.tokenizer)
        loaded = self._wrap(location, base.path, model, base.tokenizer, base.config, options)
        loaded.base = base.name
        loaded.description.update(bytes=sum(int(v.nbytes) for v in own), base=base.name,
                                  adapter=location.name[len(base.name) + 1:])
        return loaded

    def _load_text(self, location: ModelLocation, path: Path, options: ModelOptions) -> tuple[Any, Any, dict[str, Any]]:
        sharding = self.sharding
        if sharding is None:
            from mlx_lm import load

            loaded_parts = load(str(path), return_config=True)
            assert len(loaded_parts) == 3  # return_config: mlx-lm types it "2 or 3 parts"
            return loaded_parts[0], loaded_parts[1], loaded_parts[2]
        if sharding.announce_load is not None:  # rank 0: check before any rank starts, then start them
            check_shardable(path, location.name, sharding.mode, sharding.world)
            sharding.announce_load(location, path, options)
        # A follower without the files at rank 0's path fetches its shard from the Hub.
        source = str(path) if path.exists() or location.repo_id is None else location.repo_id
        try:
            return load_shard(source, sharding.world, sharding.mode)
        except Exception as exc:
            if sharding.diverged is not None:
                sharding.diverged(f"loading {location.name} failed on rank 0: {brief(exc)}")
            raise

    def _wrap(self, location: ModelLocation, path: Path, model: Any, tokenizer: Any,
              config: dict[str, Any], options: ModelOptions) -> LoadedModel:
        from mlx_lm.generate import make_stop_sequences
        from mlx_lm.models.cache import LRUPromptCache

        settings = self.settings
        # A shard's KV bytes differ between ranks (pipeline stages hold different layers): a
        # group's prefix caches are bounded by count alone, so every rank keeps the same ones.
        cache_bytes = settings.prompt_cache_bytes if self.sharding is None else 1 << 62
        prefix_cache = LRUPromptCache(settings.prompt_cache_size, cache_bytes) if settings.prefix_cache else None
        response_cache = (ResponseCache(settings.response_cache_entries, settings.response_cache_bytes)
                          if settings.enable_cache else None)
        name = location.name
        description = dict(describe(name, path, model, config), capabilities=capabilities(tokenizer))
        return LoadedModel(name, path, model, tokenizer, config, description, location,
                           batchable=can_batch(model, config), prefix_cache=prefix_cache,
                           response_cache=response_cache, eos_stops=make_stop_sequences(tokenizer),
                           options=options, sharded=self.sharding is not None)

    def _load_vision(self, location: ModelLocation, path: Path, options: ModelOptions) -> LoadedModel:
        """A vision-language model through mlx-vlm: one request at a time (its own lane), no
        prefix cache (a cached prefix would have to stand for pixels too); the response cache
        keys on the images' bytes."""
        from ..vision.model import load_vision_model

        if self.sharding is not None:
            raise ModelLoadFailed(f"Model load failed for {location.name}: vision models are not served on a "
                                  "distributed group", model=location.name, reason="vision-on-group")
        model, tokenizer, config, parts = load_vision_model(path)
        loaded = self._wrap(location, path, model, tokenizer, config, options)
        loaded.vision, loaded.batchable, loaded.prefix_cache = parts, False, None
        loaded.description["capabilities"] = [*loaded.description["capabilities"], "vision"]
        return loaded

    def _load_embedder(self, location: ModelLocation, path: Path, kind: str, options: ModelOptions,
                       progress: Progress) -> LoadedModel:
        """An embedding model: no lane, no prefix or response cache; warmed up by one embedding."""
        # On use: it imports mlx-lm and transformers (about 1 s), which serving chat does not wait for.
        from ..embeddings.embedder import load_embedder, load_tokenizer

        embedder, config = load_embedder(path, kind)
        tokenizer = load_tokenizer(path)
        progress("warmup", 2, 3, "step")
        embedder.embed([[0]])
        description = describe(location.name, path, embedder.network, config)
        description["capabilities"] = ["embed"]
        return LoadedModel(location.name, path, embedder.network, tokenizer, config, description, location,
                           batchable=False, prefix_cache=None, response_cache=None, eos_stops=None,
                           options=options, embedder=embedder)

    def unload(self, name: str) -> bool:
        loaded = self._models.pop(name, None)
        if loaded is None:
            return False
        del loaded
        release_memory(mlx_cache=True)
        log.info("unloaded %s", name)
        return True

    def bytes_loaded(self) -> int:
        return sum(m.bytes for m in list(self._models.values()))
