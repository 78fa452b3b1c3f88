"""
Rollouts: G sampled answers for each of B prompts, written by hand with a KV cache.

    r = generate(model, processor, samples, group_size=8, max_new_tokens=128)
    r.completion_ids, r.mask, r.logp  # (N, T), N = B*G: rows b*G .. b*G+G-1 answer prompt b (see Rollout)
    r.texts                           # the N decoded answers, EOS excluded

A group is sampled as in nanochat: (1) prefill the B prompts and their images once (left padded, 3-D rotary
positions), keeping every layer's keys and values; (2) repeat each prompt's cache and last logits G times, so
the vision tower and the prompt run once per prompt; (3) decode one token per step for all N rows at explicit
positions (a prompt's largest 3-D position + 1), each row until its first EOS (<|im_end|> or <|endoftext|>),
padded after it. The keys, values and attention mask live in buffers sized for prompt + max_new_tokens, written
in place (PreallocatedLayer): nothing in the loop grows by concatenation. On a CPU the decode step runs by hand
(decode_step: the model's own weights in few kernels, attention as two matmuls), elsewhere through transformers'
forward.
cuda_graphs=True runs that step by hand at fixed shapes (FixedStep: every row attends over its whole buffer, the
batch shrinks to powers of two only), which CUDA records once per batch size as a graph and replays. The
loop checks which rows have ended (a host sync) every step on a CPU, every 8 on a GPU; once at most SHRINK_AT of
the batch is still going, the ended rows leave it (their cache rows dropped by one copy), so later steps compute
only rows still going; rows that ended between two checks only pad. Sampling is one batched inverse-CDF search
per step, on uniforms drawn before the loop, (T, G) of them from each prompt's own generator (uniforms).

Temperature, top-k and top-p shape a copy of the logits; the vision tokens (<|image_pad|>, ...) are never
sampled (one in an answer breaks every later forward with the image). The recorded log-probs are the
unmodified model's (temperature 1, no filtering), which `model.completion_logprobs` recomputes for GRPO.
`use_cache=False` is the plain reference: it re-runs the whole sequence, images included, at every step.

Departure from the paper's release: TRL's `model.generate` on G copies of a prompt runs it G times; same distribution.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

import fsdp
from model import encode, prefill, repeat_batch

# Decode steps between two checks that every row has ended (a check is a host sync, cheap on a CPU only).
CHECK_EVERY = {"cpu": 1, "cuda": 8}
# At a check, the rows that ended leave the batch once at most this fraction of it is still going (0: never).
SHRINK_AT = 0.75
# Devices where a drawn token of probability 0 is replaced by the argmax: CUDA's scan of one row sums in another
# order and may give a zero-probability token a step of one rounding unit. (A CPU's cumsum is exact there; the
# check would cost 3-6% of a CPU rollout.)
CHECK_DRAWN_ON = ("cuda",)

@dataclass
class Rollout:
    batch: dict                  # the B encoded prompts (input of model.completion_logprobs)
    completion_ids: torch.Tensor  # (N, T) long, pad after each row's end
    mask: torch.Tensor           # (N, T) float, 1 on the completion's tokens up to and including its first EOS
    logp: torch.Tensor           # (N, T) float, log-prob of each sampled token under the model (0 past the end)
    texts: list                  # N decoded completions, without the EOS
    group: torch.Tensor          # (N,) long, index of the prompt each row answers
    finished: torch.Tensor       # (N,) bool, True if the row stopped at an EOS (False: cut at max_new_tokens)
    lengths: torch.Tensor        # (N,) long, the number of ones in each row of mask

def prompt_generators(seed, step, first_index, n, device):
    """One generator per prompt, seeded by (seed, step, global prompt index): rank-independent sampling."""
    return [torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 100_003 + first_index + i)
            for i in range(n)]

def uniforms(generator, B, G, T, device):
    """(T, N) uniforms in [0, 1), one per decode step and row; a list of generators has one per prompt, whose
    (T, G) draw serves its rows alone, so a prompt's answers depend on its own seed only (1 process == N)."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.rand(T, G, generator=g, device=device) for g in generator], dim=1)
    return torch.rand(T, B * G, generator=generator, device=device)

def sample_next(logits, u, temperature=1.0, top_k=0, top_p=1.0, greedy=False):
    """One token per row of logits (N, V), by inverse CDF: the first token whose cumulative probability exceeds the
    row's uniform u (N,), a single batched search for all rows (torch.multinomial takes one generator per call)."""
    if greedy:
        return logits.argmax(-1)
    logits = logits / temperature if temperature != 1.0 else logits
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p      # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    cdf = probs.cumsum(-1)                                                   # (N, V)
    total = cdf[:, -1:]
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))  # below the total:
    token = torch.searchsorted(cdf, target, right=True).squeeze(1)  # a token of nonzero probability, where zeros
    if probs.device.type in CHECK_DRAWN_ON:  # add exactly 0 to the sum, as a CPU's sequential cumsum does
        token = torch.where(probs.gather(1, token[:, None]).squeeze(1) > 0, token, probs.argmax(-1))
    return token

class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in buffers sized for the prompt and every new token, written in place: the
    cache grows by a write, never by a copy of what it holds (transformers' DynamicLayer concatenates)."""

    def __init__(self, keys, values, G, capacity):                       # keys, values (B, kv, L, hs)
        super().__init__()
        (B, H, self.n, D), self.is_initialized = keys.shape, True
        self.k_buf, self.v_buf = (x.new_empty(B * G, H, capacity, D) for x in (keys, values))  # (N, kv, L + T, hs)
        self.k_buf.view(B, G, H, capacity, D)[:, :, :, :self.n] = keys[:, None]  # each prompt's rows, G times
        self.v_buf.view(B, G, H, capacity, D)[:, :, :, :self.n] = values[:, None]
        self.keys, self.values = self.k_buf[:, :, :self.n], self.v_buf[:, :, :self.n]

    def select(self, rows):
        """Keep only these rows, as the batch shrinks when its rows end: they move to the front of the buffers,
        the part written so far copied, and the batch views those first rows from then on."""
        written = self.written()
        for buf in (self.k_buf, self.v_buf):
            buf[:len(rows), :, :written] = buf[rows, :, :written]
        self.k_buf, self.v_buf = self.k_buf[:len(rows)], self.v_buf[:len(rows)]
        self.keys, self.values = self.k_buf[:, :, :self.n], self.v_buf[:, :, :self.n]

    def written(self):
        """How many positions of the buffers hold keys and values so far."""
        return self.n

    def update(self, key_states, value_states, *args, **kwargs):
        t = key_states.shape[2]
        self.k_buf[:, :, self.n:self.n + t], self.v_buf[:, :, self.n:self.n + t] = key_states, value_states
        self.n += t
        self.keys, self.values = self.k_buf[:, :, :self.n], self.v_buf[:, :, :self.n]
        return self.keys, self.values

class FixedShapeLayer(PreallocatedLayer):
    """A PreallocatedLayer whose update writes at the buffer position held in the tensor `at` and returns the whole
    buffers, so that every step has the same shapes (FixedStep); the positions not written yet are zeros, which the
    mask gives probability 0 (uninitialised memory could hold a NaN, and 0 * NaN is NaN)."""

    def __init__(self, keys, values, G, capacity):
        super().__init__(keys, values, G, capacity)
        self.k_buf[:, :, self.n:], self.v_buf[:, :, self.n:], self.at = 0, 0, None   # at: set by FixedStep

    def written(self):
        return self.k_buf.shape[2]                 # every position: the steps write past n, the rest stays zeros

    def update(self, key_states, value_states, *args, **kwargs):            # (n, kv, 1, hs) each
        self.k_buf.index_copy_(2, self.at, key_states)
        self.v_buf.index_copy_(2, self.at, value_states)
        return self.k_buf, self.v_buf

def decodes_by_hand(model):
    """Whether the decode step runs by hand (decode_step): on a CPU, for a model that is not sharded (FSDP gathers a
    layer's weights in its forward call, which decode_step does not make)."""
    return next(model.parameters()).device.type == "cpu" and not fsdp.is_sharded(model)

def decode_weights(model):
    """Each decoder layer's projections as (transposed weight, bias) pairs for `linear`, made once per rollout: q, k
    and v concatenated into one (one matmul instead of three, the same values bit for bit), then o, gate, up, down."""
    out = []
    for layer in model.model.language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        bias = None if qkv[0].bias is None else torch.cat([p.bias for p in qkv])
        out.append([(torch.cat([p.weight for p in qkv]).t(), bias)] +
                   [(p.weight.t(), p.bias) for p in (attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)])
    return out

def linear(x, wt, b):
    """F.linear(x, wt.t(), b) of a 2-D x, by the matmul it makes (mm, or addmm with a bias), without its calls."""
    return torch.mm(x, wt) if b is None else torch.addmm(b, x, wt)

def rms_norm(norm, x):
    """What transformers' Qwen RMSNorm module computes, bit for bit, with fewer new tensors (in place where it may)."""
    h = x.float()
    scale = h.pow(2).mean(-1, keepdim=True).add_(norm.variance_epsilon).rsqrt_()
    return (h * scale).to(x.dtype).mul_(norm.weight)

def rotary_tables(model, positions):
    """cos, sin (N, T, hs) of the rotary embedding at positions (N, T) of text tokens, sin with its first half negated
    for `rotary`."""
    lm = model.model.language_model
    cos, sin = lm.rotary_emb(lm.embed_tokens.weight, positions.expand(3, -1, -1))  # the same position on all 3 axes
    half = sin.shape[-1] // 2
    return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)

def rotary(x, cos, sin):
    """x (n, heads, hs) rotated as transformers does it, x * cos + rotate_half(x) * sin, where rotate_half(x) * sin is
    x.roll(hs / 2) times sin with its first half negated (rotary_tables): the same values, for q and k at once, in
    4 kernels instead of 5 for each."""
    return x * cos[:, None] + x.roll(x.shape[-1] // 2, -1) * sin[:, None]

def decode_step(model, token, cache, mask, cos, sin, weights):
    """Logits (n, V) of one new token per row, through the text model by hand: its own weights (embedding, norms,
    projections, MLP) called as functions, then its head, and attention over the preallocated cache as two matmuls.
    mask (n, 1, 1, L + t) is 0 where a row attends and -inf elsewhere; cos, sin (n, hs) are the rotary tables at each
    row's position (rotary_tables); weights: decode_weights(model). On a CPU, with one query a row, the matmuls are
    faster than torch's SDPA kernel, and the step skips transformers' per-call work (module calls, mask building,
    output records); it decodes what transformers' forward does (the same answers in the tests, log-probs to
    rounding)."""
    lm = model.model.language_model
    x = F.embedding(token, lm.embed_tokens.weight)                          # (n, D)
    n, heads, kv_heads = x.shape[0], lm.config.num_attention_heads, lm.config.num_key_value_heads
    silu = lm.config.hidden_act == "silu"                                    # Qwen's: then in place
    for layer, kv, (qkv_w, o_w, gate_w, up_w, down_w) in zip(lm.layers, cache.layers, weights):
        attn, mlp = layer.self_attn, layer.mlp
        q_k_v = linear(rms_norm(layer.input_layernorm, x), *qkv_w).view(n, -1, attn.head_dim)
        q_k = rotary(q_k_v[:, :heads + kv_heads], cos, sin)                  # (n, heads + kv, hs)
        q, k = q_k[:, :heads], q_k[:, heads:]
        keys, values = kv.update(k[:, :, None], q_k_v[:, heads + kv_heads:, None])  # (n, kv, L + t, hs)
        q = q.view(n, kv_heads, -1, attn.head_dim)                           # (n, kv, heads per kv, hs)
        # (n, kv, heads per kv, L + t): mask + scaling * q.k, one kernel for the two, exact since the mask is 0 or -inf
        scores = torch.add(mask, q @ keys.transpose(2, 3), alpha=attn.scaling)
        out = scores.float().softmax(-1).to(values.dtype) @ values
        x += linear(out.reshape(n, -1), *o_w)
        h = rms_norm(layer.post_attention_layernorm, x)
        gate = linear(h, *gate_w)
        gate = F.silu(gate, inplace=True) if silu else mlp.act_fn(gate)
        x += linear(gate.mul_(linear(h, *up_w)), *down_w)
    return model.lm_head(rms_norm(lm.norm, x))                               # a module call: its hooks run

class FixedStep:
    """The decode step at fixed shapes, so that CUDA can record it once as a graph and replay it at every step: each
    row attends over its whole buffer (prompt + max_new_tokens), the positions not written yet masked out, and the
    step's keys and values are written at a position held in a tensor (FixedShapeLayer). It reads and writes only
    its own tensors (token, at, mask, cos, sin, the cache's buffers, logits), so a replay computes what a call does.
    select(rows) makes new tensors, so the next step records a new graph. On CUDA (and FixedStep.capture) the first
    step of each batch size is recorded and replayed; elsewhere, as in the CPU tests, the same step runs eagerly."""
    capture = True  # False: eager on CUDA too (gpu_check compares the two)

    def __init__(self, model, cache, mask, cos, sin, L, weights):  # mask (n, 1, 1, L + T), cos, sin (n, T, hs)
        self.model, self.cache, self.mask, self.cos, self.sin, self.L = model, cache, mask, cos, sin, L
        self.weights = weights
        self.at = torch.zeros(1, dtype=torch.long, device=mask.device)       # the buffer position this step writes
        for layer in cache.layers:
            layer.at = self.at
        self.graphs = mask.device.type == "cuda" and FixedStep.capture
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None  # one memory pool for all batch sizes
        self.token = self.logits = self.graph = None

    def _step(self):
        self.mask.index_fill_(-1, self.at, 0.0)                               # this step's position becomes visible
        i = self.at - self.L
        cos, sin = self.cos.index_select(1, i).squeeze(1), self.sin.index_select(1, i).squeeze(1)
        return decode_step(self.model, self.token, self.cache, self.mask, cos, sin, self.weights)

    def __call__(self, token, at):                                           # token (n,), at: an int -> logits (n, V)
        if self.token is None:
            self.token = token.clone()
        self.token.copy_(token)
        self.at.fill_(at)
        if not self.graphs:
            return self._step()
        if self.graph is None:
            self.graph, self.logits = self._record()
        self.graph.replay()
        return self.logits

    def _record(self):
        """(graph, its output): one step warmed up on a side stream, as torch's docs ask, then recorded. Both write
        what the replay writes again (this step's keys, values and mask position), so the step stays the same."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step()
        return graph, logits

    def select(self, rows):
        self.mask, self.cos, self.sin = self.mask[rows], self.cos[rows], self.sin[rows]
        for layer in self.cache.layers:
            layer.select(rows)
        self.token = self.logits = self.graph = None

def _cached_stepper(model, batch, G, max_new_tokens, fixed=False):
    """Prefill the B prompts once, copy the cache into preallocated buffers of N = B*G rows (each prompt's G times);
    return (first logits, step, select): select(rows) keeps only those rows of the batch for the later steps.
    fixed: every step through FixedStep (a CUDA graph on CUDA)."""
    out, next_pos = prefill(model, batch)
    cache, L = out.cache, batch["input_ids"].shape[1]
    mask = batch["attention_mask"].new_ones(batch["input_ids"].shape[0] * G, L + max_new_tokens)    # (N, L + T)
    mask[:, :L] = batch["attention_mask"].repeat_interleave(G, dim=0)
    pos = next_pos.repeat_interleave(G)                                      # (N,)
    by_hand, cos, sin, weights = fixed or decodes_by_hand(model), None, None, None
    if by_hand:  # the rotary embedding of every step's positions at once, and the mask as 0 / -inf
        weight = model.model.language_model.embed_tokens.weight
        cos, sin = rotary_tables(model, pos[:, None] + torch.arange(max_new_tokens, device=pos.device))  # (N, T, hs)
        if fixed:
            mask[:, L:] = 0                                                  # written step by step (FixedStep)
        mask = torch.zeros(mask.shape, dtype=weight.dtype, device=weight.device).masked_fill(mask == 0, -torch.inf)
        weights = decode_weights(model)
    if fixed:
        cache.layers = [FixedShapeLayer(layer.keys, layer.values, G, L + max_new_tokens) for layer in cache.layers]
        fixed_step, t = FixedStep(model, cache, mask[:, None, None], cos, sin, L, weights), 0

        def step(token):
            nonlocal t
            t += 1
            return fixed_step(token, L + t - 1)
        return out.logits[:, -1].repeat_interleave(G, dim=0), step, fixed_step.select
    cache.layers = [PreallocatedLayer(layer.keys, layer.values, G, L + max_new_tokens) for layer in cache.layers]
    t = 0

    def step(token):                                                         # token (n,) -> logits (n, V)
        nonlocal t
        t += 1
        if by_hand:
            return decode_step(model, token, cache, mask[:, None, None, :L + t], cos[:, t - 1], sin[:, t - 1],
                               weights)
        out = model(input_ids=token[:, None], cache=cache, attention_mask=mask[:, :L + t],
                    position_ids=(pos + t - 1).view(1, -1, 1).expand(3, -1, 1), use_cache=True)
        return out.logits[:, -1]

    def select(rows):                                                        # rows: indices into the current batch
        nonlocal mask, pos, cos, sin
        mask, pos = mask[rows], pos[rows]
        if by_hand:
            cos, sin = cos[rows], sin[rows]
        for layer in cache.layers:
            layer.select(rows)
    return out.logits[:, -1].repeat_interleave(G, dim=0), step, select

def _uncached_stepper(model, batch, G):
    """Reference: re-run the whole sequence with its images at every step; the model computes positions."""
    seq = repeat_batch(batch, G)   # each prompt and its pixel values repeated G times

    def step(token=None):                                                    # None: the prompts alone
        if token is not None:
            for k, v in (("input_ids", token[:, None]), ("attention_mask", torch.ones_like(token)[:, None]),
                         ("mm_token_type_ids", torch.zeros_like(token)[:, None])):
                seq[k] = torch.cat([seq[k], v.to(seq[k].dtype)], dim=1)
        return model(**seq, use_cache=False).logits[:, -1]
    return step(), step, None                                                # None: its batch never shrinks

@torch.no_grad()
def generate(model, processor, samples, group_size=1, max_new_tokens=128, temperature=1.0, top_p=1.0, top_k=0,
             greedy=False, generator=None, use_cache=True, cuda_graphs=False):
    """Sample group_size answers for each sample ({"image", "problem"}); see the module docstring. cuda_graphs: the
    decode step at fixed shapes (FixedStep), replayed as a CUDA graph on CUDA, for a model that is not sharded."""
    if group_size < 1 or max_new_tokens < 1:
        raise ValueError(f"group_size and max_new_tokens must be >= 1, got {group_size}, {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling (use greedy=True), got {temperature}")
    if not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need 0 < top_p <= 1 and top_k >= 0 (0: no top-k), got top_p {top_p}, top_k {top_k}")
    if isinstance(generator, (list, tuple)) and len(generator) != len(samples):
        raise ValueError(f"got {len(generator)} generators for {len(samples)} prompts; give one per prompt")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in encode(processor, samples).items()}
    B, G = batch["input_ids"].shape[0], group_size
    N = B * G
    fixed = use_cache and cuda_graphs and not fsdp.is_sharded(model)
    logits, step, select = (_cached_stepper(model, batch, G, max_new_tokens, fixed) if use_cache
                            else _uncached_stepper(model, batch, G))
    stop = torch.tensor(processor.stop_token_ids, device=device)
    banned = torch.tensor(processor.vision_token_ids, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)  # tokens up to and including the first EOS
    u = None if greedy else uniforms(generator, B, G, max_new_tokens, device)  # (T, N)
    tokens = torch.full((max_new_tokens, N), processor.pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros(max_new_tokens, N, device=device)
    live = slice(None)     # the rows still in the batch, in its order: all (views, no copies) until it first shrinks
    for t in range(max_new_tokens):
        logits = logits.float()                                    # (n, V), the live rows
        logp_all = F.log_softmax(logits, dim=-1)                   # the unmodified model distribution
        token = sample_next(logits.index_fill(1, banned, float("-inf")), None if greedy else u[t, live], temperature,
                            top_k, top_p, greedy)
        ended = done[live]
        token = torch.where(ended, processor.pad_token_id, token)  # rows that ended since the last shrink only pad
        tokens[t, live] = token
        logps[t, live] = torch.where(ended, 0.0, logp_all.gather(1, token[:, None]).squeeze(1))
        lengths[live] += ~ended
        done[live] = ended | torch.isin(token, stop)
        if t == max_new_tokens - 1:
            break
        if (t + 1) % CHECK_EVERY.get(device.type, 1) == 0:
            going = ~done[live]
            n = int(going.sum())                                   # a host sync
            if n == 0:
                break
            size = 1 << (n - 1).bit_length() if fixed else n      # fixed shapes: a power of two, so few graphs
            if select is not None and size <= SHRINK_AT * len(going):  # drop the ended rows from the batch
                keep = going.clone()                               # with ended ones, in order, up to the size
                keep[(~going).nonzero().squeeze(1)[:size - n]] = True
                select(keep.nonzero().squeeze(1))
                live, token = torch.arange(N, device=device)[live][keep], token[keep]
        logits = step(token)

    completion_ids = tokens[:t + 1].T.contiguous()                 # (N, T)
    mask = (torch.arange(t + 1, device=device)[None] < lengths[:, None]).float()
    texts = [processor.tokenizer.decode(ids[:n - int(f)].tolist(), skip_special_tokens=False)
             for ids, n, f in zip(completion_ids, lengths, done)]
    return Rollout(batch=batch, completion_ids=completion_ids, mask=mask, logp=logps[:t + 1].T * mask,
                   texts=texts, group=torch.arange(B, device=device).repeat_interleave(G), finished=done,
                   lengths=lengths)
