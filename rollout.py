"""
Rollouts: G sampled answers for each of B prompts, written by hand with a KV cache.

    from rollout import generate
    r = generate(model, processor, samples, group_size=8, max_new_tokens=128)
    r.completion_ids  # (N, T), N = B*G, rows b*G .. b*G+G-1 answer prompt b
    r.mask            # (N, T) 1 on each completion's tokens, its first EOS included
    r.logp            # (N, T) log pi(y_t) of the sampled tokens under the model (temperature 1)
    r.texts           # decoded answers, EOS excluded

How a group is sampled (nanochat's recipe, on a Qwen-VL model):
1. prefill: run the B prompts with their images once through the model (left padded, 3-D rotary positions
   from `model.get_rope_index`), keeping the keys and values of every layer;
2. replicate: repeat each prompt's cache entries and last logits G times, so the vision tower and the
   prompt run once per prompt, not G times (what `model.generate` on repeated prompts does);
3. decode: one token per step for all N rows, with explicit positions (a prompt's next text position is
   its largest 3-D position + 1, the same on all three axes) and a growing 2-D attention mask; a row stops at
   its first EOS (<|im_end|> or <|endoftext|>) and is padded after it; the loop stops when every row has
   stopped or at max_new_tokens.

Sampling applies temperature, top-k and top-p to a copy of the logits; the vision special tokens
(<|image_pad|>, <|vision_start|>, ...) are never sampled: an <|image_pad|> in an answer breaks every later
forward that feeds the image. The recorded log-probs are those of the unmodified model (temperature 1, no
filtering), the same quantity `model.completion_logprobs` recomputes for the GRPO ratio.

`generate(..., use_cache=False)` is the plain reference: it re-runs the whole sequence (prompt, image and
answer so far) at every step and lets the model compute its own positions. Tests check both agree, and
that greedy decoding matches transformers' `model.generate`.

Departure from the paper's release: it samples with TRL's call to `model.generate` on each prompt repeated
G times, which runs the vision tower and the prompt G times; the result is the same distribution.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import encode, repeat_batch, rope_positions


@dataclass
class Rollout:
    batch: dict                  # the B encoded prompts (input of model.completion_logprobs)
    completion_ids: torch.Tensor  # (N, T) long, pad after each row's end
    mask: torch.Tensor           # (N, T) float, 1 on the completion's tokens up to and including its first EOS
    logp: torch.Tensor           # (N, T) float, log-prob of each sampled token under the model (0 past the end)
    texts: list                  # N decoded completions, without the EOS
    group: torch.Tensor          # (N,) long, index of the prompt each row answers
    finished: torch.Tensor       # (N,) bool, True if the row stopped at an EOS (False: cut at max_new_tokens)
    group_size: int

    @property
    def lengths(self):
        return self.mask.sum(1).long()


def prompt_generators(seed, step, first_index, n, device):
    """One generator per prompt, seeded by (seed, step, global prompt index): rank-independent sampling."""
    return [torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 100_003 + first_index + i)
            for i in range(n)]


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, greedy=False, generator=None, group_size=1):
    """One token per row from logits (N, V). generator: None, one torch.Generator, or a list with one per
    prompt (rows of prompt b use generator[b], so a prompt's samples do not depend on its batch-mates)."""
    if greedy:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p       # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    if isinstance(generator, (list, tuple)):
        G = group_size
        return torch.cat([torch.multinomial(probs[b * G:(b + 1) * G], 1, generator=g).squeeze(1)
                          for b, g in enumerate(generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _cached_stepper(model, batch, G):
    """Prefill the B prompts once, replicate the cache to N = B*G rows; return (first logits, step)."""
    prompt_pos, next_pos = rope_positions(model, batch)                      # (3, B, L), (B,)
    out = model(**batch, position_ids=prompt_pos, use_cache=True, logits_to_keep=1)
    cache = out.cache
    for layer in cache.layers:                                               # (B, kv, L, hs) -> (N, kv, L, hs)
        layer.keys = layer.keys.repeat_interleave(G, dim=0)
        layer.values = layer.values.repeat_interleave(G, dim=0)
    attention_mask = batch["attention_mask"].repeat_interleave(G, dim=0)     # (N, L)
    pos = next_pos.repeat_interleave(G)                                      # (N,)

    def step(token):                                                         # token (N,) -> logits (N, V)
        nonlocal attention_mask, pos
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], dim=1)
        out = model(input_ids=token[:, None], cache=cache, attention_mask=attention_mask,
                    position_ids=pos.view(1, -1, 1).expand(3, -1, 1), use_cache=True)
        pos = pos + 1
        return out.logits[:, -1]

    return out.logits[:, -1].repeat_interleave(G, dim=0), step


def _uncached_stepper(model, batch, G):
    """Reference: re-run the whole sequence with its images at every step; the model computes positions."""
    seq = repeat_batch(batch, G)   # each prompt and its pixel values repeated G times

    def run():
        return model(**seq, use_cache=False).logits[:, -1]

    def step(token):
        for k, v in (("input_ids", token[:, None]), ("attention_mask", torch.ones_like(token)[:, None]),
                     ("mm_token_type_ids", torch.zeros_like(token)[:, None])):
            seq[k] = torch.cat([seq[k], v.to(seq[k].dtype)], dim=1)
        return run()

    return run(), step


@torch.no_grad()
def generate(model, processor, samples, group_size=1, max_new_tokens=128, temperature=1.0, top_p=1.0, top_k=0,
             greedy=False, generator=None, use_cache=True):
    """Sample group_size answers for each sample ({"image", "problem"}); see the module docstring."""
    if group_size < 1 or max_new_tokens < 1:
        raise ValueError(f"group_size and max_new_tokens must be >= 1, got {group_size}, {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling (use greedy=True), got {temperature}")
    if isinstance(generator, (list, tuple)) and len(generator) != len(samples):
        raise ValueError(f"got {len(generator)} generators for {len(samples)} prompts; give one per prompt")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in encode(processor, samples).items()}
    B, G = batch["input_ids"].shape[0], group_size
    N = B * G
    logits, step = (_cached_stepper if use_cache else _uncached_stepper)(model, batch, G)

    stop = torch.tensor(processor.stop_token_ids, device=device)
    banned = torch.tensor(processor.vision_token_ids, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    tokens, logps = [], []
    for t in range(max_new_tokens):
        logits = logits.float()
        logp_all = F.log_softmax(logits, dim=-1)                   # the unmodified model distribution
        token = sample_next(logits.index_fill(1, banned, float("-inf")), temperature, top_k, top_p, greedy,
                            generator, G)
        token = torch.where(done, processor.pad_token_id, token)  # finished rows only pad
        tokens.append(token)
        logps.append(torch.where(done, 0.0, logp_all.gather(1, token[:, None]).squeeze(1)))
        done = done | torch.isin(token, stop)
        if done.all() or t == max_new_tokens - 1:
            break
        logits = step(token)

    completion_ids = torch.stack(tokens, dim=1)                     # (N, T)
    is_stop = torch.isin(completion_ids, stop)
    T = completion_ids.shape[1]
    # Length of each row from the position of its first stop token (pad may equal a stop token, so the mask
    # comes from lengths, never from token ids): the first EOS is a real action and is inside the mask.
    first_stop = torch.where(is_stop.any(1), is_stop.int().argmax(1), T)
    lengths = torch.clamp(first_stop + 1, max=T)
    mask = (torch.arange(T, device=device)[None] < lengths[:, None]).float()
    finished = first_stop < T
    texts = [processor.tokenizer.decode(ids[:n - int(f)].tolist(), skip_special_tokens=False)
             for ids, n, f in zip(completion_ids, lengths, finished)]
    return Rollout(batch=batch, completion_ids=completion_ids, mask=mask, logp=torch.stack(logps, 1) * mask,
                   texts=texts, group=torch.arange(B, device=device).repeat_interleave(G), finished=finished,
                   group_size=G)
