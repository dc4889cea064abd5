"""One generation on a vision model, a step at a time on the engine thread: the images
encoded (one step), the prompt in chunks (a step each), then a token a step, so that a
cancel is seen between any two of them and other models' generations go on in between.

The steps are mlx-vlm's `generate_step` cut at its seams: `get_input_embeddings` (the vision
tower and the merge of its features into the text embeddings), its chunked prefill of the
language model, and its decode step, with the engine's sampler, logits processors and stop
handling. Greedy output is token for token mlx-vlm's own.
"""

from __future__ import annotations

from typing import Any

from ..engine.generation import Generation
from ..engine.registry import LoadedModel
from ..engine.runs import KV_GROUP_SIZE, LaneRun


class VisionRun(LaneRun):
    def __init__(self, loaded: LoadedModel, generation: Generation, prefill_step: int) -> None:
        from mlx_vlm.models.cache import make_prompt_cache

        inputs = generation.prepared.vision_inputs
        assert inputs is not None  # prepared by the vision model's prepare
        self.loaded = loaded
        self.generation = generation
        self._inputs = inputs
        self._prefill_step = prefill_step
        self._kv_bits, max_kv_size = generation.kv_options
        self.cache = make_prompt_cache(loaded.model.language_model, max_kv_size=max_kv_size)
        self._ids: Any = None  # prompt tokens not yet in the cache, once encoded; None once all are
        self._embeds: Any = None  # their embeddings (image features merged in)
        self._kwargs: dict[str, Any] = {}  # what the language model is given with the prompt
        self._chunked = True
        self._encoded = False
        self._pending: Any = None  # the next token, computing (evaluated asynchronously)
        self._seen: Any = None  # every token so far, for logits processors

    def step(self) -> bool:
        """Encode, one prompt chunk, or one token; True when the generation is done."""
        generation = self.generation
        if generation.job.cancelled:
            generation.cancel_now()
            return True
        if not self._encoded:
            self._encode()
        elif self._ids is not None and self._chunked and self._ids.shape[1] > 1:
            self._prefill_chunk()
        else:
            return self._decode()
        return False

    def _encode(self) -> None:
        import mlx.core as mx
        from mlx_vlm.generate.common import _chunked_prefill_enabled, generation_stream

        inputs, model = self._inputs, self.loaded.model
        kwargs = dict(inputs.extra)
        with mx.stream(generation_stream):
            embedded = model.get_input_embeddings(inputs.input_ids, inputs.pixel_values, mask=inputs.mask, **kwargs)
            kwargs.update({k: v for k, v in embedded.to_dict().items() if k != "inputs_embeds" and v is not None})
            mx.eval(embedded.inputs_embeds)
        self._ids, self._embeds, self._kwargs = inputs.input_ids, embedded.inputs_embeds, kwargs
        self._encoded = True
        self._chunked = _chunked_prefill_enabled(model, input_ids=self._ids, inputs_embeds=self._embeds,
                                                 prompt_cache=self.cache, prefill_kwargs=kwargs)
        if self.generation.logits_processors:
            self._seen = inputs.input_ids.reshape(-1)
        self.generation.on_prefill(0, self._ids.shape[1])

    def _prefill_chunk(self) -> None:
        import mlx.core as mx
        from mlx_vlm.generate.common import generation_stream

        n = min(self._prefill_step, self._ids.shape[1] - 1)
        with mx.stream(generation_stream):
            self.loaded.model.language_model(inputs=self._ids[:, :n], inputs_embeds=self._embeds[:, :n],
                                             cache=self.cache, n_to_process=n, logits_to_keep=1, **self._kwargs)
            self._quantize_cache()
            mx.eval([c.state for c in self.cache])
        self._ids, self._embeds = self._ids[:, n:], self._embeds[:, n:]
        total = self._inputs.input_ids.shape[1]
        self.generation.on_prefill(total - self._ids.shape[1], total)

    def _forward(self, ids: Any, embeds: Any = None) -> Any:
        """The next token after `ids` (lazy): the language model, the processors, the sampler."""
        import mlx.core as mx
        from mlx_vlm.generate.common import generation_stream

        generation = self.generation
        with mx.stream(generation_stream):
            outputs = self.loaded.model.language_model(ids, inputs_embeds=embeds, cache=self.cache,
                                                       logits_to_keep=1, **self._kwargs)
            # After the prompt, only what the model hands on from step to step (cross-attention
            # states, encoder outputs) goes with each token, as in mlx-vlm's generate_step.
            carried = {k: getattr(outputs, k, None) for k in ("cross_attention_states", "encoder_outputs")}
            self._kwargs = {k: v for k, v in carried.items() if v is not None}
            logits = outputs.logits[:, -1, :]
            if generation.logits_processors:
                self._seen = mx.concatenate([self._seen, ids.reshape(-1)]) if embeds is None else self._seen
                for process in generation.logits_processors:
                    logits = process(self._seen, logits)
            self._quantize_cache()
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            return generation.sampler(logprobs)

    def _decode(self) -> bool:
        import mlx.core as mx

        generation = self.generation
        if self._pending is None:  # the prompt's last tokens, then its first token
            self._pending = self._forward(self._ids, self._embeds)
            self._ids = self._embeds = None
            mx.async_eval(self._pending)  # type: ignore[no-untyped-call]  # (untyped in MLX's stubs)
        current = self._pending
        last = generation.completion_tokens + 1 >= generation.max_tokens
        if not last:  # the next step is queued before this token is read, as mlx-lm does
            self._pending = self._forward(current.reshape(1, 1))
            mx.async_eval(self._pending)  # type: ignore[no-untyped-call]  # (untyped in MLX's stubs)
        token = int(current.item())
        eos = token in self.loaded.tokenizer.eos_token_ids
        generation.on_token(token, "stop" if eos else ("length" if last else None))
        return generation.done

    def _quantize_cache(self) -> None:
        if self._kv_bits is not None:
            from mlx_vlm.generate.common import maybe_quantize_kv_cache

            maybe_quantize_kv_cache(self.cache, quantized_kv_start=0, kv_group_size=KV_GROUP_SIZE,
                                    kv_bits=self._kv_bits)

    def close(self, keep: bool = True) -> None:
        """Nothing to keep: a vision model has no prefix cache (image tokens stand for pixels)."""
        self._pending = None
