"""LMGen: streaming generation with the delay ring, teacher forcing and per-slot sampling.

Implements the PersonaPlex step of the reference's `LMGen` for a batch of independent slots:
  * the token ring `cache` [B, 17, 4] with its `provided` flags: what is given (user audio; the
    agent's audio and text during prompts) is written at `offset + delay` of its row, what is
    sampled fills the target column where nothing was given;
  * `step(user_codes)`: one live frame -> `StepOutput` (text, agent and user tokens of one
    complete undelayed frame); `step_forced(frame)`: one prompt frame, everything given;
  * `prefill_pieces(prepared, frames)`: a whole prompt (see `prepare_prompt`) as causal forwards
    of any number of frames each, which leave exactly the state stepping leaves;
  * what the runtime asks of the attention window: `pin_prompt`, `park`, `fill_windows`;
  * per-slot sampling settings and random streams (`set_sampling`).

Frame timing, as in the reference: the transformer at offset o reads ring column o-1 and
predicts column o. Agent codebooks 1..7 are delayed by one frame, so the frame returned at
offset o is text + codebook 0 from o-1 with codebooks 1..7 from o. The reference discards
everything given at offset 0 and runs no transformer there; `reset` therefore leaves a slot
exactly as offset 0 leaves it (offset 1, column 0 = initial tokens), and the prompt code skips
the first prompt frame. Offsets are per-slot tensors: slots join and leave independently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .config import CODES_PER_STREAM, MAX_TOP_K, UNGENERATED_ID, LMConfig, SamplingParams
from .lm import LMModel
from .sampling import race_noise, sample_tokens, stream_keys
from .streaming import StreamingModule, StreamingState
from .transformer import LayerRunner, OffsetState, run_layer

RING_SIZE = 4  # max delay (1) + 3, as in the reference: every slot is rewritten before it is read


@dataclass
class StepOutput:
    tokens: torch.Tensor  # [B, 17] text, agent codebooks 0..7, user codebooks 0..7
    valid: torch.Tensor  # [B] bool: False for the first step after a reset (nothing complete yet)

    @property
    def text(self) -> torch.Tensor:
        return self.tokens[:, 0]

    @property
    def agent_codes(self) -> torch.Tensor:
        return self.tokens[:, 1 : 1 + CODES_PER_STREAM]  # [B, 8]


@dataclass
class RingState(StreamingState):
    cache: torch.Tensor  # [B, 17, RING_SIZE] long
    provided: torch.Tensor  # [B, 17, RING_SIZE] bool
    offset: torch.Tensor  # [B] long, frames consumed since the reset
    initial: torch.Tensor  # [B, 17] long, the start-of-sequence tokens (text_card, card, ...)
    temperature: torch.Tensor  # [B, 2] float: text, audio (0 = greedy)
    top_k: torch.Tensor  # [B, 2] long: text, audio
    seed: torch.Tensor  # [B] long

    def reset(self, mask: torch.Tensor) -> None:
        m = mask[:, None]
        self.offset.masked_fill_(mask, 1)
        self.provided.masked_fill_(mask[:, None, None], False)
        self.provided[:, :, 0].masked_fill_(m, True)
        self.cache[:, :, 0] = torch.where(m, self.initial, self.cache[:, :, 0])


def new_ring_state(cfg: LMConfig, batch_size: int, device: torch.device) -> RingState:
    shape = (batch_size, cfg.num_streams, RING_SIZE)
    initial = torch.tensor([cfg.text_card] + [cfg.card] * cfg.n_q, device=device)
    defaults = SamplingParams()
    ring = RingState(
        cache=torch.full(shape, UNGENERATED_ID, dtype=torch.long, device=device),
        provided=torch.zeros(shape, dtype=torch.bool, device=device),
        offset=torch.ones(batch_size, dtype=torch.long, device=device),
        initial=initial.expand(batch_size, -1).clone(),
        temperature=torch.tensor([[defaults.temp_text, defaults.temp_audio]], device=device).repeat(batch_size, 1),
        top_k=torch.tensor([[defaults.topk_text, defaults.topk_audio]], device=device).repeat(batch_size, 1),
        seed=torch.zeros(batch_size, dtype=torch.long, device=device),
    )
    ring.reset(torch.ones(batch_size, dtype=torch.bool, device=device))
    return ring


def ring_prepare(ring: RingState, delays: torch.Tensor, given: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write the given tokens at `offset + delay` of their rows; return this offset's input,
    target and provided columns, each [B, 17].

    given: [B, 8] the user's codes (live), or [B, 17] every row (prompt frames).
    """
    B, R = given.shape
    o = ring.offset[:, None]  # [B, 1]
    slots = torch.arange(B, device=o.device)
    rows = torch.arange(delays.shape[0] - R, delays.shape[0], device=o.device)[None]  # [1, R]
    cols = (o + delays[-R:]) % RING_SIZE  # [B, R]
    ring.cache[slots[:, None], rows, cols] = given
    ring.provided[slots[:, None], rows, cols] = True
    # Rows whose delay reaches back before the first frame read the start-of-sequence token.
    now = ring.offset % RING_SIZE  # [B]
    at_start = o <= delays[None]  # [B, 17]
    ring.cache[slots, :, now] = torch.where(at_start, ring.initial, ring.cache[slots, :, now])
    ring.provided[slots, :, now] |= at_start
    inputs = ring.cache[slots, :, (now - 1) % RING_SIZE]
    return inputs, ring.cache[slots, :, now], ring.provided[slots, :, now]


def ring_commit(ring: RingState, delays: torch.Tensor, sampled: torch.Tensor | None) -> StepOutput:
    """Fill the target column where nothing was given, emit the completed frame, advance."""
    slots = torch.arange(ring.offset.shape[0], device=ring.offset.device)
    now = ring.offset % RING_SIZE
    ring.provided[slots, :, (now - 1) % RING_SIZE] = False
    if sampled is not None:
        target = ring.cache[slots, :, now]
        ring.cache[slots, :, now] = torch.where(ring.provided[slots, :, now], target, sampled)
    index = (ring.offset[:, None] - 1 + delays[None]) % RING_SIZE  # [B, 17]
    tokens = ring.cache.gather(2, index[:, :, None])[:, :, 0]  # [B, 17]
    valid = ring.offset > delays.max()
    ring.offset.add_(1)
    return StepOutput(tokens=tokens, valid=valid)


@dataclass(frozen=True)
class PromptFrames:
    """The system prompt as frames to force: voice, silence, role text, silence.

    tokens: [17, F] every row of every frame (text, agent audio, user audio), frame 0 first.
    For a voice given as saved embeddings (.pt), the N voice frames carry dummy tokens,
    `embeddings` [N - 1, dim] replace the transformer inputs of frames 1..N-1, and the
    token ring is restored from `voice_ring` [17, 4] after frame N - 1, as in the reference.
    """

    tokens: torch.Tensor
    embeddings: torch.Tensor | None = None
    voice_ring: torch.Tensor | None = None

    @property
    def num_frames(self) -> int:
        return self.tokens.shape[1]

    @property
    def voice_frames(self) -> int:
        return 0 if self.embeddings is None else self.embeddings.shape[0] + 1


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt prepared for `LMGen.prefill_pieces`: the transformer inputs and the ring afterwards."""

    inputs: torch.Tensor  # [17, F - 1] token columns the transformer reads, frames 1..F-1
    embeddings: torch.Tensor | None  # [N - 1, dim] replace the first N - 1 inputs (.pt voices)
    cache: torch.Tensor  # [17, RING_SIZE] ring after the prompt
    provided: torch.Tensor  # [17, RING_SIZE]
    offset: int


Heads = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class LMGen(StreamingModule):
    """The LM's streaming generation over a batch of slots; what the runtime asks of the LM.

    `pinning`: slots may keep their system prompt in the attention window for the whole
    conversation (`pin_prompt`; see `transformer`). `prefix_attention`: one-step calls read only
    each slot's filled ring entries (flex attention, fast when compiled) instead of the masked
    ring. Both only choose how the same attention is computed; the outputs are the same.
    `kv_cache`: the format of the temporal transformer's rings (`kv_cache.KV_FORMATS`)."""

    def __init__(self, lm: LMModel, depformer_steps: int = CODES_PER_STREAM, pinning: bool = False,
                 kv_cache: str = "bf16") -> None:
        super().__init__()
        assert 1 <= depformer_steps <= lm.cfg.dep_q
        assert max(lm.cfg.text_card, lm.cfg.card) <= 1 << 16, "the noise hash takes token ids below 2**16"
        self.lm = lm
        self.depformer_steps = depformer_steps
        self.register_buffer("delays", torch.tensor(lm.cfg.delays, device=lm.device), persistent=False)
        lm.transformer.pinning = pinning
        lm.transformer.prefix_attention = False
        lm.transformer.set_kv_cache(kv_cache)

    @property
    def pinning(self) -> bool:
        return self.lm.transformer.pinning

    @property
    def prefix_attention(self) -> bool:
        return self.lm.transformer.prefix_attention

    def use_prefix_attention(self, on: bool) -> None:
        self.lm.transformer.prefix_attention = on

    def make_state(self, batch_size: int) -> RingState:
        return new_ring_state(self.lm.cfg, batch_size, self.lm.device)

    @property
    def ring(self) -> RingState:
        assert isinstance(self.state, RingState), "use LMGen inside streaming(lm_gen, batch_size)"
        return self.state

    def set_sampling(self, mask: torch.Tensor, params: SamplingParams) -> None:
        """Give the slots where `mask` is True these decoding settings and random seed."""
        ring = self.ring
        m = mask[:, None]
        temps = torch.tensor([[params.text_temperature, params.audio_temperature]], device=m.device)
        ks = torch.tensor([[params.topk_text, params.topk_audio]], device=m.device)
        ring.temperature.copy_(torch.where(m, temps, ring.temperature))
        ring.top_k.copy_(torch.where(m, ks, ring.top_k))
        ring.seed.copy_(torch.where(mask, params.seed, ring.seed))

    # --- the attention window -----------------------------------------------------------
    def pin_prompt(self, keep: bool) -> None:
        """Right after a prompt, in the state of one slot: keep the steps so far in the window for
        the whole conversation (`keep`, an LMGen with `pinning`), or let them slide out."""
        assert not keep or self.pinning, "keeping the persona needs an LMGen made with pinning=True"
        state = self._offsets()
        state.pinned.copy_(state.offset if keep else torch.zeros_like(state.offset))

    def park(self, mask: torch.Tensor) -> None:
        """The slots of `mask` hold no conversation but may still step in a batch: their window
        stays empty (each step overwrites entry 0) until their next reset."""
        self._offsets().park(mask)

    def fill_windows(self) -> None:
        """Every slot's window full, as after four minutes of talk: the worst case of a step's
        attention, to measure (the slots must be reset afterwards)."""
        state = self._offsets()
        state.advance.fill_(1)
        state.offset.fill_(self.lm.transformer.context)

    def kv_bytes(self) -> int:
        """The bytes of every slot's KV cache in the temporal transformer, as held."""
        states = [layer.self_attn.state for layer in self.lm.transformer.layers]
        return sum(t.nbytes for state in states if state is not None for t in vars(state).values())

    def window_lengths(self) -> torch.Tensor:
        """[B] the ring entries each slot's next one-step call reads."""
        return self.lm.transformer.next_read()

    def _offsets(self) -> OffsetState:
        state = self.lm.transformer.state
        assert isinstance(state, OffsetState), "use LMGen inside streaming(lm_gen, batch_size)"
        return state

    # --- steps --------------------------------------------------------------------------
    def step(self, user_codes: torch.Tensor, layer: LayerRunner = run_layer, heads: Heads | None = None) -> StepOutput:
        """One live frame. user_codes [B, 8] -> the frame completed at this step. `layer` runs each
        temporal layer and `heads` (default `self.heads`) the text and depformer: the runtime may
        give compiled versions of them."""
        lm = self.lm
        B = user_codes.shape[0]
        assert user_codes.shape == (B, CODES_PER_STREAM), f"expected [B, 8] user codes, got {tuple(user_codes.shape)}"
        # 1. ring: write the user's codes, read this step's input and target columns
        inputs, target, provided = ring_prepare(self.ring, self.delays, user_codes)
        keys = stream_keys(self.ring.seed, self.ring.offset, 1 + self.depformer_steps)  # [B, streams]: the step's noise keys
        # 2. temporal transformer on one column
        h = lm.forward_embeddings(lm.embed(inputs[:, :, None]), layer)[:, 0]  # [B, dim]
        # 3, 4. the text token and the agent's codebooks
        text, audio = (heads or self.heads)(h, target, provided, keys)
        # 5. fill, emit, advance (rows past the depformer steps are the user's: always given)
        sampled = torch.cat([text[:, None], audio, target[:, 1 + audio.shape[1] :]], dim=1)
        return ring_commit(self.ring, self.delays, sampled)

    def step_forced(self, frame: torch.Tensor, embeddings: torch.Tensor | None = None) -> None:
        """One prompt frame: frame [B, 17] gives every row, so nothing is sampled. With
        `embeddings` [B, dim] the transformer reads them instead of the ring column."""
        inputs, _, _ = ring_prepare(self.ring, self.delays, frame)
        x = embeddings[:, None] if embeddings is not None else self.lm.embed(inputs[:, :, None])
        self.lm.forward_embeddings(x)
        ring_commit(self.ring, self.delays, None)

    def heads(self, h: torch.Tensor, target: torch.Tensor, provided: torch.Tensor,
              keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text token, then the depformer over the agent's codebooks, each teacher-forced
        where given: text [B], audio [B, steps]."""
        text = self._sample(self.lm.text_logits(h), keys[:, 0], kind=0)
        next_text = torch.where(provided[:, 0], target[:, 0], text)
        return text, self._depformer(h, next_text, target[:, 1:], provided[:, 1:], keys[:, 1:])

    def _sample(self, logits: torch.Tensor, key: torch.Tensor, kind: int) -> torch.Tensor:
        """Tokens of one stream (kind 0: text, 1: audio) with its noise keys `key` [B]."""
        ring = self.ring
        return sample_tokens(
            logits,
            ring.temperature[:, kind],
            ring.top_k[:, kind],
            lambda ids: race_noise(key, ids),
            MAX_TOP_K["text" if kind == 0 else "audio"],
        )

    def _depformer(self, h: torch.Tensor, text: torch.Tensor, target: torch.Tensor, provided: torch.Tensor,
                   keys: torch.Tensor) -> torch.Tensor:
        lm, steps = self.lm, self.depformer_steps
        cache = lm.new_depformer_cache(h.shape[0], steps)
        prev, tokens = text, []
        for step in range(steps):
            token = self._sample(lm.depformer_step(step, prev, h, cache), keys[:, step], kind=1)
            prev = torch.where(provided[:, step], target[:, step], token)
            tokens.append(token)
        return torch.stack(tokens, dim=1)  # [B, steps]

    # --- prompts ------------------------------------------------------------------------
    def run_prompt(self, frames: PromptFrames) -> None:
        """Step the prompt frame by frame, as the reference does. Use right after a reset."""
        device = self.ring.cache.device
        B = self.ring.offset.shape[0]
        tokens = frames.tokens.to(device)
        # Frame 0 is what the reference discards at offset 0: the reset already stands for it.
        for f in range(1, frames.num_frames):
            emb = None
            if f < frames.voice_frames:
                assert frames.embeddings is not None
                emb = frames.embeddings[f - 1].to(device=device, dtype=self.lm.dtype).expand(B, -1)
            self.step_forced(tokens[:, f].expand(B, -1), emb)
            if frames.voice_ring is not None and f == frames.voice_frames - 1:
                self.ring.cache.copy_(frames.voice_ring.to(device).expand(B, -1, -1))

    def prefill_pieces(self, prepared: PreparedPrompt, frames: int) -> Iterator[None]:
        """A whole prompt as causal forwards of `frames` frames each, yielding after each one but
        the last, leaving the ring as stepping would (the KV cache makes the pieces exact: each
        attends over the ones before it). Use on one slot right after its reset."""
        ring, lm = self.ring, self.lm
        x = lm.embed(prepared.inputs.to(ring.cache.device)[None])  # [1, F - 1, dim]
        if prepared.embeddings is not None:
            n = prepared.embeddings.shape[0]
            x = torch.cat([prepared.embeddings.to(x)[None], x[:, n:]], dim=1)
        pieces = x.split(frames, dim=1)
        for i, piece in enumerate(pieces):
            lm.forward_embeddings(piece.expand(ring.offset.shape[0], -1, -1))
            if i < len(pieces) - 1:
                yield
        ring.cache.copy_(prepared.cache)
        ring.provided.copy_(prepared.provided)
        ring.offset.fill_(prepared.offset)


def prepare_prompt(frames: PromptFrames, cfg: LMConfig) -> PreparedPrompt:
    """Replay the ring bookkeeping of `run_prompt` on the host (no model) for `LMGen.prefill_pieces`."""
    ring = new_ring_state(cfg, 1, torch.device("cpu"))
    delays = torch.tensor(cfg.delays)
    inputs = []
    for f in range(1, frames.num_frames):
        col, _, _ = ring_prepare(ring, delays, frames.tokens[:, f][None])
        inputs.append(col[0])
        ring_commit(ring, delays, None)
        if frames.voice_ring is not None and f == frames.voice_frames - 1:
            ring.cache.copy_(frames.voice_ring[None])
    return PreparedPrompt(
        inputs=torch.stack(inputs, dim=1),
        embeddings=frames.embeddings,
        cache=ring.cache[0].clone(),
        provided=ring.provided[0].clone(),
        offset=int(ring.offset[0]),
    )
