"""
The policy: a Qwen2.5-VL (or Qwen2-VL) model, its processor, prompt encoding and per-token log-probs.

One code path for everything: the tests and the default CPU run build a tiny, randomly initialised
Qwen2.5-VL from a config and a tokenizer made in code; users point `load()` at a local folder holding
Qwen2.5-VL-3B-Instruct (or any Qwen2.5-VL / Qwen2-VL checkpoint). Both go through the same transformers
model classes, the same `encode()` and the same `completion_logprobs()`.

    from model import load, encode, completion_logprobs
    model, processor = load("tiny")                         # offline, seconds, deterministic for a seed
    model, processor = load("/ckpt/Qwen2.5-VL-3B-Instruct", device="cuda", dtype=torch.bfloat16)
    batch = encode(processor, [{"image": pil_image, "problem": "How many circles?"}])

    python model.py                  # builds the tiny model and prints its size and one encoded prompt

Prompt (the Qwen-VL chat format, one user turn, image first, then the text, then the generation prompt):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|><|image_pad|> x n<|vision_end|>{problem}<|im_end|>\\n<|im_start|>assistant\\n

where n = (grid_h * grid_w) / merge_size^2 is the number of image tokens after the vision tower merges
2x2 patches of 14 px: a 112x112 image gives an 8x8 patch grid and n = 16 image tokens.

Log-probs (the quantity GRPO needs): for completion tokens y_1..y_T of prompt x with image I,
    logp_t = log pi(y_t | x, I, y_<t)
computed in one teacher-forced forward pass. The image is always fed, so the frozen reference model is
scored by this same function (a reference without the image makes the KL meaningless). When the N = B*G
completions of B prompts share their prompt, the vision tower runs once per prompt and its output is
repeated G times (gradient flows back through the repeat into the vision tower).

Departures from the paper's release, and why:
- No torchvision: transformers' stock Qwen-VL processors need it (the video processor imports it), and its
  wheel does not import beside a CPU torch. `Processor` here is the tokenizer plus transformers' PIL image
  processor (`Qwen2VLImageProcessorPil`), which computes the same pixel values.
- The tiny tokenizer is a byte-level BPE of a few hundred tokens trained on the synthetic world's text
  (`curriculum.tokenizer_corpus()`), with Qwen's pre-tokenizer regex and its 14 special tokens. One token per byte
  makes sequences about 3x longer and, measured in a prototype, keeps a tiny model from ever using the image.
"""
import json
import os

import torch
import torch.nn.functional as F
from PIL import Image

import curriculum
import data

# Qwen2-VL / Qwen2.5-VL special tokens, in the order of the public tokenizer.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Tokens that only the processor may place: a sampled <|image_pad|> breaks every later forward with the image.
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
DEFAULT_SYSTEM = "You are a helpful assistant."

# The Qwen-VL chat format as a jinja template (used when a checkpoint ships none, and for the tiny model).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CHAT_TEMPLATE_EXAMPLE = (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                         "<|image_pad|><|vision_end|>?<|im_end|>\n<|im_start|>assistant\n")

# Qwen's pre-tokenizer split (letters, single digits, punctuation runs, newlines, spaces).
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Model sizes built in code. "tiny" is the CPU default (~0.35 M parameters, the size that learned to use
# the image in a prototype); "small" is a larger CPU/GPU preset for benchmarks.
PRESETS = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                 v_hidden=64, v_depth=2, v_heads=4, v_intermediate=128),
    "small": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024,
                  v_hidden=128, v_depth=4, v_heads=4, v_intermediate=512),
}


# -----------------------------------------------------------------------------
# Processor: tokenizer + PIL image processor, no torchvision

class Processor:
    """The tokenizer, the image processor and the chat template, saved and loaded as a checkpoint folder."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        if tokenizer.chat_template is None:
            tokenizer.chat_template = CHAT_TEMPLATE
        ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
        self.token_id = dict(zip(SPECIAL_TOKENS, ids))
        missing = [t for t, i in self.token_id.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"tokenizer lacks the Qwen-VL special tokens {missing}")
        self.image_token_id = self.token_id["<|image_pad|>"]
        self.eos_token_id = self.token_id[EOS_TOKEN]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.token_id[PAD_TOKEN]
        # A completion stops at <|im_end|>; <|endoftext|> also ends a document for Qwen models.
        self.stop_token_ids = [self.eos_token_id, self.token_id[PAD_TOKEN]]
        self.vision_token_ids = [self.token_id[t] for t in VISION_TOKENS]

    @property
    def merge_size(self):
        return self.image_processor.merge_size

    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        with open(os.path.join(path, "chat_template.json"), "w") as f:
            json.dump({"chat_template": self.tokenizer.chat_template}, f, indent=2)

    @classmethod
    def from_pretrained(cls, path, min_pixels=None, max_pixels=None):
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        for name in ("tokenizer.json", "preprocessor_config.json"):
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"{path} is not a Qwen-VL checkpoint folder: it has no {name}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        template_file = os.path.join(path, "chat_template.json")
        if os.path.isfile(template_file):  # the public release keeps the template beside the tokenizer
            with open(template_file) as f:
                tokenizer.chat_template = json.load(f)["chat_template"]
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            cfg = json.load(f)
        kwargs = {k: cfg[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                      "image_std") if k in cfg}
        size = cfg.get("size") or {}
        kwargs["min_pixels"] = min_pixels or cfg.get("min_pixels") or size.get("shortest_edge") or 56 * 56
        kwargs["max_pixels"] = max_pixels or cfg.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280
        return cls(tokenizer, Qwen2VLImageProcessorPil(**kwargs))


def make_image_processor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def build_tokenizer(corpus, vocab_size=512):
    """A byte-level BPE trained on `corpus` (a list of strings), wrapped as a transformers Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tokenizer = Qwen2Tokenizer(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                               unk_token=None, bos_token=None)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# -----------------------------------------------------------------------------
# Models

def tiny_config(processor, preset="tiny", model_type="qwen2_5_vl"):
    """A small Qwen2.5-VL (or Qwen2-VL) config whose special-token ids match `processor`'s tokenizer."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    head_dim = p["hidden"] // p["heads"]
    half = head_dim // 2                       # mrope splits head_dim/2 frequencies over (t, h, w)
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    tid = processor.token_id
    text = dict(vocab_size=len(processor.tokenizer), hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                intermediate_size=p["intermediate"], max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
                bos_token_id=tid[PAD_TOKEN], eos_token_id=tid[EOS_TOKEN], pad_token_id=processor.pad_token_id)
    ids = dict(image_token_id=tid["<|image_pad|>"], video_token_id=tid["<|video_pad|>"],
               vision_start_token_id=tid["<|vision_start|>"], vision_end_token_id=tid["<|vision_end|>"])
    if model_type == "qwen2_5_vl":
        vision = dict(hidden_size=p["v_hidden"], depth=p["v_depth"], num_heads=p["v_heads"],
                      intermediate_size=p["v_intermediate"], out_hidden_size=p["hidden"], window_size=112,
                      fullatt_block_indexes=[p["v_depth"] - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    if model_type == "qwen2_vl":
        vision = dict(embed_dim=p["v_hidden"], depth=p["v_depth"], num_heads=p["v_heads"], mlp_ratio=2,
                      hidden_size=p["hidden"])
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    raise ValueError(f"model_type must be qwen2_5_vl or qwen2_vl, got {model_type!r}")


def build_tiny(preset="tiny", seed=0, model_type="qwen2_5_vl", corpus=None, vocab_size=512,
               min_pixels=56 * 56, max_pixels=448 * 448):
    """A randomly initialised model and its processor, made in code: no file, no network."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
    if corpus is None:
        corpus = curriculum.tokenizer_corpus(seed=seed)  # the synthetic world's prompts and answers
    # The chat scaffolding is in every prompt: train on it too, so it costs a few tokens, not one per byte.
    corpus = list(corpus) + [CHAT_TEMPLATE_EXAMPLE] * max(1, len(corpus) // 10)
    processor = Processor(build_tokenizer(corpus, vocab_size), make_image_processor(min_pixels, max_pixels))
    config = tiny_config(processor, preset, model_type)
    cls = Qwen2_5_VLForConditionalGeneration if model_type == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = cls(config)
    return model, processor


def quiet_transformers():
    """No per-file progress bars or info lines from transformers when loading and saving small models."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


MODEL_CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}


def load(name_or_path="tiny", device="cpu", dtype=torch.float32, min_pixels=None, max_pixels=None, seed=0):
    """(model, processor) from "tiny" / "small" (built in code) or a local Qwen2.5-VL / Qwen2-VL folder."""
    import transformers
    quiet_transformers()
    if name_or_path in PRESETS:
        kw = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        model, processor = build_tiny(name_or_path, seed=seed, **kw)
        return model.to(device=device, dtype=dtype), processor
    path = str(name_or_path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model {path!r} is neither a preset ({', '.join(PRESETS)}) nor a folder")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path} is not a Qwen-VL checkpoint folder: it has no config.json")
    with open(config_file) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"{config_file} has model_type {model_type!r}; expected one of {sorted(MODEL_CLASSES)}")
    cls = getattr(transformers, MODEL_CLASSES[model_type])
    model = cls.from_pretrained(path, dtype=dtype).to(device)
    processor = Processor.from_pretrained(path, min_pixels=min_pixels, max_pixels=max_pixels)
    return model, processor


def save(model, processor, path):
    """A folder that `load(path)` and transformers' `from_pretrained` both open."""
    model.save_pretrained(path)
    processor.save_pretrained(path)


# -----------------------------------------------------------------------------
# Prompts

def _image(sample, i):
    """The sample's image as RGB PIL (data.open_image opens a path), or None; errors name the sample."""
    image = sample.get("image")
    if image is None:
        return None
    try:
        return data.open_image(image)
    except data.DataError as e:
        raise ValueError(f"sample {i}: cannot open image {image!r}: {e}") from e


def encode(processor, samples, max_length=None):
    """Tokenise B samples ({"image": PIL | path | None, "problem": str}) into one left-padded batch.

    Returns a dict of tensors ready for the model: input_ids (B, L), attention_mask (B, L),
    mm_token_type_ids (B, L) with 1 at image tokens (Qwen-VL's 3-D rotary positions need it), and, when any
    sample has an image, pixel_values (P, C*t*14*14) and image_grid_thw (n_images, 3). Prompts are never
    truncated: a prompt longer than max_length raises instead of cutting through its image tokens.
    """
    tok = processor.tokenizer
    texts, images = [], []
    for i, s in enumerate(samples):
        if not isinstance(s, dict) or not isinstance(s.get("problem"), str):
            raise ValueError(f"sample {i} needs a 'problem' string, got {s!r:.200}")
        image = _image(s, i)
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": s["problem"]}]
        texts.append(tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True))
        if image is not None:
            images.append(image)
    batch = {}
    n_tokens = []  # image tokens of each image, in order
    if images:
        vis = processor.image_processor(images=images, return_tensors="pt")
        batch["pixel_values"], batch["image_grid_thw"] = vis["pixel_values"], vis["image_grid_thw"]
        n_tokens = (vis["image_grid_thw"].prod(-1) // processor.merge_size ** 2).tolist()
    rows, k = [], 0
    pad = "<|image_pad|>"
    for i, text in enumerate(texts):
        if text.count(pad) > 1 or (pad in text) != (samples[i].get("image") is not None):
            raise ValueError(f"sample {i}: its problem text must not contain {pad}")
        if pad in text:  # one placeholder per image, expanded to the image's number of tokens
            text, k = text.replace(pad, pad * n_tokens[k]), k + 1
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"sample {i}: prompt is {len(ids)} tokens, over max_length={max_length}")
        rows.append(ids)
    L = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), L), processor.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, ids in enumerate(rows):  # left padding: every prompt ends at the same column
        input_ids[i, L - len(ids):] = torch.tensor(ids)
        attention_mask[i, L - len(ids):] = 1
    batch["input_ids"], batch["attention_mask"] = input_ids, attention_mask
    batch["mm_token_type_ids"] = (input_ids == processor.image_token_id).int() * attention_mask.int()
    return batch


def image_counts(batch):
    """Number of images of each prompt (0 or 1 here) as a list of length B."""
    starts = batch["mm_token_type_ids"].diff(dim=1, prepend=torch.zeros_like(batch["mm_token_type_ids"][:, :1]))
    return (starts == 1).sum(1).tolist()


def repeat_batch(batch, G):
    """Each prompt of an encoded batch repeated G times in place (rows b*G .. b*G+G-1 are prompt b).

    pixel_values is not batch-major (its rows are patches of all images, concatenated), so it is split per
    image by image_grid_thw before repeating."""
    out = {k: batch[k].repeat_interleave(G, dim=0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "pixel_values" in batch:
        per_image = batch["pixel_values"].split(batch["image_grid_thw"].prod(-1).tolist())
        grids, pixels, k = [], [], 0
        for n in image_counts(batch):
            for _ in range(G):
                pixels += per_image[k:k + n]
                grids.append(batch["image_grid_thw"][k:k + n])
            k += n
        out["pixel_values"], out["image_grid_thw"] = torch.cat(pixels), torch.cat(grids)
    return out


# -----------------------------------------------------------------------------
# Forward passes shared by the rollout and the loss

def rope_positions(model, batch):
    """3-D rotary positions of the prompts (3, B, L) and the next text position of each prompt (B,)."""
    pos, _ = model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                        image_grid_thw=batch.get("image_grid_thw"),
                                        attention_mask=batch["attention_mask"])
    return pos, pos.amax(dim=(0, 2)) + 1


def image_features(model, batch):
    """Vision-tower output for the batch's images, or None: a tuple with one (n_tokens, D) tensor per image."""
    if "pixel_values" not in batch:
        return None
    return model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output


def repeat_features(features, batch, G):
    """Image features of B prompts repeated to the N = B*G rows (no recomputation, gradient flows)."""
    if features is None:
        return None
    out, k = [], 0
    for n in image_counts(batch):
        out += list(features[k:k + n]) * G
        k += n
    return out


def forward_embeds(model, input_ids, features, **kwargs):
    """Model forward with precomputed image features scattered into the <|image_pad|> slots."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    mm = None if features is None else {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}
    return model(input_ids=input_ids, mm_encoder_outputs=mm, **kwargs)


def completion_logprobs(model, batch, completion_ids, completion_mask=None, features=None):
    """Teacher-forced log pi(y_t | prompt, image, y_<t) of each completion token: (N, T).

    batch holds B encoded prompts and completion_ids (N, T) their N = B*G completions (group-major). The
    vision tower runs once per prompt (or `features` from `image_features` are reused). Positions past a
    completion's end (completion_mask 0) are computed but meaningless; callers mask them.
    """
    B, L = batch["input_ids"].shape
    N, T = completion_ids.shape
    if N % B:
        raise ValueError(f"{N} completions do not split into groups of the {B} prompts")
    G = N // B
    if features is None:
        features = image_features(model, batch)
    prompt_pos, next_pos = rope_positions(model, batch)                       # (3, B, L), (B,)
    comp_pos = next_pos[:, None] + torch.arange(T, device=next_pos.device)    # (B, T)
    position_ids = torch.cat([prompt_pos, comp_pos[None].expand(3, -1, -1)], dim=2)  # (3, B, L+T)
    position_ids = position_ids.repeat_interleave(G, dim=1)                   # (3, N, L+T)
    if completion_mask is None:
        completion_mask = torch.ones_like(completion_ids)
    input_ids = torch.cat([batch["input_ids"].repeat_interleave(G, 0), completion_ids], dim=1)
    attention_mask = torch.cat([batch["attention_mask"].repeat_interleave(G, 0),
                                torch.ones_like(completion_mask, dtype=batch["attention_mask"].dtype)], dim=1)
    out = forward_embeds(model, input_ids, repeat_features(features, batch, G), attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=False, logits_to_keep=T + 1)
    logits = out.logits[:, :-1].float()                                       # (N, T, V): predicts y_1..y_T
    return torch.gather(F.log_softmax(logits, dim=-1), 2, completion_ids[..., None]).squeeze(-1)


def num_parameters(module):
    return sum(p.numel() for p in module.parameters())


if __name__ == "__main__":
    model, processor = load("tiny")
    print(f"tiny Qwen2.5-VL: {num_parameters(model) / 1e6:.3f} M parameters "
          f"(vision {num_parameters(model.model.visual) / 1e6:.3f} M), vocab {len(processor.tokenizer)}")
    batch = encode(processor, [{"image": Image.new("RGB", (112, 112), "white"), "problem": "How many shapes?"}])
    print(processor.tokenizer.decode(batch["input_ids"][0]))
    print({k: tuple(v.shape) for k, v in batch.items()})
