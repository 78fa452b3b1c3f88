"""
The policy: a Qwen2.5-VL (or Qwen2-VL) model, its processor, prompt encoding and per-token log-probs. A tiny
random Qwen2.5-VL built in code (tests, CPU runs) and a local checkpoint folder share this one code path.

    model, processor = load("tiny")                         # offline, seconds, deterministic for a seed
    model, processor = load("/ckpt/Qwen2.5-VL-3B-Instruct", device="cuda", dtype=torch.bfloat16)
    batch = encode(processor, [{"image": pil_image, "problem": "How many circles?"}])
    python model.py                  # builds the tiny model and prints its size and one encoded prompt

Prompt (the Qwen-VL chat format, image first), with n = grid_h * grid_w / merge_size^2 image tokens (14 px
patches merged 2x2: a 112x112 image gives n = 16):
    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|><|image_pad|> x n<|vision_end|>{problem}<|im_end|>\\n<|im_start|>assistant\\n

Log-probs, teacher-forced: logp_t = log pi(y_t | x, I, y_<t) for the completion y of prompt x with image I,
always fed (to the frozen reference too: without it the KL is meaningless). The N = B*G completions of B prompts
run the prompt and its vision tower once per prompt; the completions then attend to its keys and values, sorted by
length into a few batches, each as long as its longest answer (under gradient checkpointing, each completion after
its own copy of the prompt).

Departures from the paper's release, and why:
- No torchvision (its wheel does not import beside a CPU torch): `Processor` is the tokenizer plus
  transformers' PIL image processor (`Qwen2VLImageProcessorPil`), which computes the same pixel values.
  `encode` computes that processor's pixel values in torch (`pixel_patches`), equal to them bit for bit.
- The tiny tokenizer is a byte-level BPE of a few hundred tokens trained on the synthetic world's text, with
  Qwen's pre-tokenizer regex and special tokens: one token per byte kept a tiny model from using the image.
"""
import contextlib
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.nn.utils.rnn import pad_sequence
from PIL import Image

import curriculum
import data

# Qwen2-VL / Qwen2.5-VL special tokens, in the order of the public tokenizer.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
DEFAULT_SYSTEM = "You are a helpful assistant."

# The Qwen-VL chat format as a jinja template (used when a checkpoint ships none, and for the tiny model).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CHAT_TEMPLATE_EXAMPLE = (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                         "<|image_pad|><|vision_end|>?<|im_end|>\n<|im_start|>assistant\n")

# Qwen's pre-tokenizer split (letters, single digits, punctuation runs, newlines, spaces).
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Model sizes built in code: "tiny" (~0.38 M parameters) is the CPU default, "small" a preset for benchmarks.
PRESETS = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                 v_hidden=64, v_depth=2, v_heads=4, v_intermediate=128),
    "small": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024,
                  v_hidden=128, v_depth=4, v_heads=4, v_intermediate=512),
}
# The answers of an update, sorted by length, run in at most this many batches, each trimmed to its longest answer:
# a shorter answer's padding costs its tokens' compute, a batch costs one more forward call.
LENGTH_BUCKETS = 4
MODEL_CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}

def check_transformers():
    """transformers before 5.24 names the KV cache `past_key_values` and drops `mm_encoder_outputs` without a word
    (the policy would then train blind to the image): refuse it with one clear line."""
    import inspect
    import transformers
    forward = inspect.signature(transformers.Qwen2_5_VLForConditionalGeneration.forward).parameters
    missing = [p for p in ("cache", "mm_encoder_outputs") if p not in forward]
    if missing:
        raise ValueError(f"transformers {transformers.__version__} is too old: its forward takes no "
                         f"{', '.join(missing)}; this code needs 5.24 (pip install -r requirements.txt)")

class Processor:
    """The tokenizer, the image processor and the chat template, saved and loaded as a checkpoint folder."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        if tokenizer.chat_template is None:
            tokenizer.chat_template = CHAT_TEMPLATE
        self.token_id = dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)))
        missing = [t for t, i in self.token_id.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"tokenizer lacks the Qwen-VL special tokens {missing}")
        self.image_token_id = self.token_id["<|image_pad|>"]
        self.eos_token_id = self.token_id[EOS_TOKEN]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.token_id[PAD_TOKEN]
        # A completion stops at <|im_end|>; <|endoftext|> also ends a document for Qwen models.
        self.stop_token_ids = [self.eos_token_id, self.token_id[PAD_TOKEN]]
        # Never sampled: a sampled <|image_pad|> breaks every later forward with the image.
        self.vision_token_ids = [self.token_id[t] for t in data.VISION_TOKENS]

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

def build_tokenizer(corpus, vocab_size=512):
    """A byte-level BPE trained on `corpus` (a list of strings), wrapped as a transformers Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return Qwen2Tokenizer(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=None,
                          bos_token=None)

def tiny_config(processor, preset="tiny", model_type="qwen2_5_vl"):
    """A small Qwen2.5-VL (or Qwen2-VL) config whose special-token ids match `processor`'s tokenizer."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig
    p = PRESETS[preset]
    half = p["hidden"] // p["heads"] // 2          # mrope splits head_dim/2 frequencies over (t, h, w)
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

def build_tiny(preset="tiny", seed=0, model_type="qwen2_5_vl", min_pixels=56 * 56, max_pixels=448 * 448):
    """A randomly initialised model and its processor, made in code: no file, no network."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    corpus = curriculum.tokenizer_corpus(seed=seed)  # the synthetic world's prompts and answers
    # The chat scaffolding is in every prompt: train on it too, so it costs a few tokens, not one per byte.
    corpus = corpus + [CHAT_TEMPLATE_EXAMPLE] * max(1, len(corpus) // 10)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    processor = Processor(build_tokenizer(corpus), image_processor)
    config = tiny_config(processor, preset, model_type)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = getattr(transformers, MODEL_CLASSES[model_type])(config)
    return model, processor

def load(name_or_path="tiny", device="cpu", dtype=torch.float32, min_pixels=None, max_pixels=None, seed=0):
    """(model, processor) from "tiny" / "small" (built in code) or a local Qwen2.5-VL / Qwen2-VL folder."""
    check_transformers()
    with quiet_transformers():
        return _load(name_or_path, device, dtype, min_pixels, max_pixels, seed)

@contextlib.contextmanager
def quiet_transformers():
    """transformers' per-file progress bars and info lines off while it loads or saves, and back as they were after."""
    from transformers.utils import logging as hf_logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()

def check_checkpoint(path):
    """The model_type of the Qwen-VL checkpoint folder `path`, read without loading it: a FileNotFoundError names
    what is missing (the folder, its config, processor or weights files), a ValueError what is wrong (another
    model_type, a safetensors file cut short)."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model {path!r} is neither a preset ({', '.join(PRESETS)}) nor a folder")
    files = os.listdir(path)
    if "config.json" not in files:
        raise FileNotFoundError(f"{path} is not a Qwen-VL checkpoint folder: it has no config.json")
    with open(os.path.join(path, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"{path}/config.json has model_type {model_type!r}; expected one of {sorted(MODEL_CLASSES)}")
    lacks = [f for f in ("tokenizer.json", "preprocessor_config.json") if f not in files]
    weights = [f for f in files if f.endswith((".safetensors", ".bin"))]
    if lacks or not weights:
        raise FileNotFoundError(f"{path} is not a Qwen-VL checkpoint folder: it has no "
                                f"{', '.join(lacks + ([] if weights else ['weights (*.safetensors)']))}")
    for f in sorted(w for w in weights if w.endswith(".safetensors")):
        try:
            with safe_open(os.path.join(path, f), "pt"):   # reads the header only, which covers the whole file
                pass
        except SafetensorError as e:
            raise ValueError(f"{path}/{f} cannot be read ({e}): a partial copy or download? copy it again") from None
    return model_type

def _load(name_or_path, device, dtype, min_pixels, max_pixels, seed):
    import transformers
    if name_or_path in PRESETS:
        kw = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        model, processor = build_tiny(name_or_path, seed=seed, **kw)
        model.to(device)
        for p in model.parameters():  # the parameters only: the rotary tables stay float32, as from a folder
            p.data = p.data.to(dtype)
        return model, processor
    path = str(name_or_path)
    model_type = check_checkpoint(path)
    model = load_weights(getattr(transformers, MODEL_CLASSES[model_type]), path, device, dtype)
    return model, Processor.from_pretrained(path, min_pixels=min_pixels, max_pixels=max_pixels)

# Checkpoint names -> this transformers' module names (checkpoints keep the original Qwen-VL layout).
RENAMES = [("", ""), ("model.", "model.language_model."), ("visual.", "model.visual.")]

def checkpoint_name(name):
    """A module's parameter name as the checkpoints spell it (what save_pretrained writes): RENAMES undone."""
    old, new = next(((o, n) for o, n in RENAMES[1:] if name.startswith(n)), ("", ""))
    return old + name[len(new):]

def load_weights(cls, path, device, dtype):
    """The model built on `device` and its safetensors read straight onto it: no host copy per rank (transformers'
    `device_map` would need accelerate). A checkpoint whose names do not map plainly goes through `from_pretrained`."""
    import transformers
    from safetensors import safe_open
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    config = transformers.AutoConfig.from_pretrained(path)
    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device)] if cuda else []), torch.device(device):
        model = cls._from_config(config, dtype=dtype)  # its random init is overwritten below
    params, loaded = dict(model.named_parameters(remove_duplicate=False)), set()
    with torch.no_grad():
        for file in files:
            with safe_open(os.path.join(path, file), "pt", device=str(device)) as f:
                for key in f.keys():  # one tensor at a time: the peak is the model plus its largest tensor
                    name = next((new + key[len(old):] for old, new in RENAMES
                                 if key.startswith(old) and new + key[len(old):] in params), None)
                    if name:
                        params[name].copy_(f.get_tensor(key))
                        loaded.add(id(params[name]))  # a tied lm_head comes with the embeddings
    if not files or any(id(p) not in loaded for p in params.values()):  # names that do not map
        del model
        model, info = cls.from_pretrained(path, dtype=dtype, output_loading_info=True)
        if info["missing_keys"]:  # left at their random init otherwise, with transformers' report silenced
            missing = sorted(info["missing_keys"])
            raise ValueError(f"{path}: its weights lack {len(missing)} of {cls.__name__}'s tensors (e.g. "
                             f"{', '.join(missing[:3])}): another model, a partial download or renamed weights")
        return model.to(device)
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    return model.eval()

def set_memory_options(model, attn="sdpa", checkpointing=False):
    """Attention kernels (sdpa | flash_attention_2 | eager) and gradient checkpointing: each decoder layer and
    vision block keeps only its input for backward and is recomputed there (about 4 KB a token instead of 130 KB
    for a 3B text layer, for about a third more compute)."""
    model.set_attn_implementation(attn)
    if checkpointing:
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    return model

def save(model, processor, path):
    """A folder that `load(path)` and transformers' `from_pretrained` both open."""
    with quiet_transformers():
        model.save_pretrained(path)
        processor.save_pretrained(path)

def num_parameters(module):
    return sum(p.numel() for p in module.parameters())

def pixel_patches(image_processor, images):
    """pixel_values (P, C*t*p*p) and image_grid_thw (n, 3) of n PIL images, equal bit for bit to transformers'
    `Qwen2VLImageProcessorPil` (the test checks it), whose per-image numpy steps cost most of an encoding. Each image
    is resized by PIL to its smart_resize size where it differs; each 0-255 value becomes the float32 that transformers
    makes of it (scaled in float64, cast, normalised in float32), looked up in a table of the 256 per channel; the
    image is then cut into patches of t frames (the one image repeated) in merge-block order, written in place.
    Any other image processor, processing turned off, or an image not in RGB goes through transformers."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
    ip = image_processor
    if (type(ip) is not Qwen2VLImageProcessorPil or not (ip.do_resize and ip.do_rescale and ip.do_normalize)
            or any(image.mode != "RGB" for image in images)):
        out = ip(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]
    p, m, t = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None] for v in (ip.image_mean, ip.image_std))    # (C, 1)
    table = ((torch.arange(256, dtype=torch.float64) * ip.rescale_factor).float() - mean) / std          # (C, 256)
    arrays, grids = [], []
    for image in images:
        h, w = smart_resize(image.height, image.width, factor=p * m, min_pixels=ip.size.shortest_edge,
                            max_pixels=ip.size.longest_edge)
        if image.size != (w, h):
            image = image.resize((w, h), resample=ip.resample)
        arrays.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))                    # (C, h, w) uint8
        grids.append([1, h // p, w // p])
    C = table.shape[0]
    out = torch.empty(sum(gh * gw for _, gh, gw in grids), C * t * p * p)
    k = 0
    for x, (_, gh, gw) in zip(arrays, grids):
        x = table.gather(1, x.reshape(C, -1).long()).view(C, gh // m, m, p, gw // m, m, p)
        x = x.permute(1, 4, 2, 5, 0, 3, 6)[:, :, :, :, :, None]                            # (gh/m, gw/m, m, m, C, 1, p, p)
        out[k:k + gh * gw].view(x.shape[:5] + (t, p, p)).copy_(x.expand(*x.shape[:5], t, p, p))
        k += gh * gw
    return out, torch.tensor(grids)

def encode(processor, samples, max_length=None):
    """B samples {"image": PIL | path | None, "problem": str} as one left-padded batch: input_ids, attention_mask,
    mm_token_type_ids (B, L) (1 at image tokens) and, with images, pixel_values (P, C*t*14*14) and image_grid_thw
    (n_images, 3). Never truncates: a prompt over max_length raises rather than cut through its image tokens."""
    tok = processor.tokenizer
    texts, images = [], []
    for i, s in enumerate(samples):
        if not isinstance(s, dict) or not isinstance(s.get("problem"), str):
            raise ValueError(f"sample {i} needs a 'problem' string, got {s!r:.200}")
        image = s.get("image")
        if image is not None:
            try:
                images.append(data.open_image(image))  # RGB PIL from a PIL image or a path
            except data.DataError as e:
                raise ValueError(f"sample {i}: cannot open image {image!r}: {e}") from e
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": s["problem"]}]
        texts.append(tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True))
    batch, n_tokens = {}, []  # n_tokens: the number of image tokens of each image, in order
    if images:
        batch["pixel_values"], batch["image_grid_thw"] = pixel_patches(processor.image_processor, images)
        n_tokens = (batch["image_grid_thw"].prod(-1) // processor.image_processor.merge_size ** 2).tolist()
    k, pad = 0, "<|image_pad|>"
    for i, text in enumerate(texts):
        if text.count(pad) > 1 or (pad in text) != (samples[i].get("image") is not None):
            raise ValueError(f"sample {i}: its problem text must not contain {pad}")
        if pad in text:  # one placeholder per image, expanded to the image's number of tokens
            texts[i], k = text.replace(pad, pad * n_tokens[k]), k + 1
    rows = [torch.tensor(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]  # one batched call
    for i, ids in enumerate(rows):
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"sample {i}: prompt is {len(ids)} tokens, over max_length={max_length}")
    input_ids = pad_sequence(rows, batch_first=True, padding_value=processor.pad_token_id, padding_side="left")
    attention_mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_side="left")
    batch["input_ids"], batch["attention_mask"] = input_ids, attention_mask
    batch["mm_token_type_ids"] = (input_ids == processor.image_token_id).int() * attention_mask.int()
    return batch

def image_counts(batch):
    """Number of images of each prompt (0 or 1 here) as a list of length B."""
    starts = batch["mm_token_type_ids"].diff(dim=1, prepend=torch.zeros_like(batch["mm_token_type_ids"][:, :1]))
    return (starts == 1).sum(1).tolist()

def repeat_batch(batch, G):
    """Each prompt of an encoded batch, its image patches included, repeated G times (rows b*G .. b*G+G-1)."""
    out = {k: batch[k].repeat_interleave(G, dim=0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "pixel_values" in batch:
        per_image = batch["pixel_values"].split(batch["image_grid_thw"].prod(-1).tolist())
        grids, pixels, k = [], [], 0
        for n in image_counts(batch):
            pixels += list(per_image[k:k + n]) * G
            grids += [batch["image_grid_thw"][k:k + n]] * G
            k += n
        out["pixel_values"], out["image_grid_thw"] = torch.cat(pixels), torch.cat(grids)
    return out

def rope_positions(model, batch):
    """3-D rotary positions of the prompts (3, B, L) and the next text position of each prompt (B,): what
    transformers' `get_rope_index` computes for prompts of text and at most one image, for the whole batch at once
    (it loops over the rows in Python). Text positions count on along all three axes; an image of h x w merged
    patches whose first token is at position s puts its tokens at (s, s + row, s + column), and the text after it
    goes on from s + max(h, w); padding is at 0."""
    if max(image_counts(batch), default=0) > 1:
        raise ValueError("rope_positions takes at most one image per prompt, as encode makes them")
    mask = batch["attention_mask"].bool()
    image = batch["mm_token_type_ids"].bool() & mask                          # (B, L)
    j = mask.long().cumsum(1) - 1                                             # index among the row's real tokens
    has = image.any(1)
    h, w = torch.zeros_like(j[:, :1]), torch.ones_like(j[:, :1])              # (B, 1): merged patches of its image
    if has.any():
        grid, merge = batch["image_grid_thw"].to(j.device), model.config.vision_config.spatial_merge_size
        h[has, 0], w[has, 0] = grid[:, 1] // merge, grid[:, 2] // merge
    s = torch.where(has[:, None], j.gather(1, image.int().argmax(1, keepdim=True)), 0)  # (B, 1): the image's start
    k = j - s                                                                 # index inside the image
    text = torch.where(has[:, None] & (k >= h * w), j - h * w + torch.maximum(h, w), j)
    pos = torch.stack([torch.where(image, s, text), torch.where(image, s + k // w, text),
                       torch.where(image, s + k % w, text)])
    pos = torch.where(mask, pos, 0)
    return pos, pos.amax(dim=(0, 2)) + 1

def prefill(model, batch):
    """The B prompts and their images once, keeping every layer's keys and values: (output with .cache and the last
    position's logits (B, 1, V), the next text position of each prompt (B,))."""
    prompt_pos, next_pos = rope_positions(model, batch)                       # (3, B, L), (B,)
    return model(**batch, position_ids=prompt_pos, use_cache=True, logits_to_keep=1), next_pos

def image_features(model, batch, G):
    """Vision-tower output of the B prompts, run once, repeated for their G answers (as `mm_encoder_outputs`)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    if "pixel_values" not in batch:
        return None
    features = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    out, k = [], 0
    for n in image_counts(batch):
        out += list(features[k:k + n]) * G
        k += n
    return {"image": BaseModelOutputWithPooling(pooler_output=tuple(out))}

def completion_logprobs(model, batch, completion_ids, completion_mask=None):
    """Teacher-forced log pi(y_t | prompt, image, y_<t) (N, T) of completion_ids (N, T), the N = B*G answers
    (group-major) of batch's B prompts; completion_mask (N, T), ones then zeros, gives each answer's length.
    Values past an answer's end are meaningless: callers mask them.

    The prompt and its image run once per group, as in the rollout: the prompt's keys and values, taken for each of
    its G answers, are the cache that the answers attend to, and gradients flow back through them. The answers run
    in up to LENGTH_BUCKETS batches of similar length, each trimmed to its longest answer. Gradient checkpointing
    drops a cache inside the layers, so under it (training, with gradients) each answer re-runs its prompt instead."""
    B = batch["input_ids"].shape[0]
    N, T = completion_ids.shape
    if N % B:
        raise ValueError(f"{N} completions do not split into groups of the {B} prompts")
    G = N // B
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    if checkpointing and model.training and torch.is_grad_enabled():
        return _logprobs_prompt_per_answer(model, batch, completion_ids, G)
    lengths = (completion_mask.sum(1).long().clamp(1, T) if completion_mask is not None
               else torch.full((N,), T, device=completion_ids.device))
    # Under FSDP every rank must run the same forwards (each gathers its units), whatever its answers' lengths.
    sharded = isinstance(model, FSDPModule)
    return _logprobs_prompt_per_group(model, batch, completion_ids, G, lengths, 1 if sharded else LENGTH_BUCKETS,
                                      every_forward=sharded)

def token_logprobs(logits, ids):
    """log softmax(logits) at ids: (..., V), (...) -> (...), in float32."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, ids[..., None]).squeeze(-1)

def length_buckets(lengths, n):
    """The row indices sorted by length, longest first, in at most n slices; slices with the same longest merged."""
    order = lengths.argsort(descending=True, stable=True)
    buckets = []
    for rows in order.tensor_split(min(n, len(order))):
        if buckets and lengths[buckets[-1][0]] == lengths[rows[0]]:
            buckets[-1] = torch.cat([buckets[-1], rows])
        else:
            buckets.append(rows)
    return order, buckets

def _logprobs_prompt_per_group(model, batch, completion_ids, G, lengths, buckets=1, every_forward=False):
    """(N, T) log-probs of y_1..y_T: the B prompts once, then the answers by length bucket on their prompts' cache.
    Each prompt's keys, values and last logits are repeated for its G answers first, so that a bucket takes its rows
    by distinct indices: the backward then only sums the G copies, always in one order (rows taken straight from the
    B prompts would scatter-add their gradients, in an order that varies from run to run on a CPU).
    every_forward: the answers' forward runs even when each is one token long (on y_1, its result weighted 0 in
    the graph), so that every FSDP rank makes the same forwards and backwards."""
    from transformers.cache_utils import DynamicCache
    out, next_pos = prefill(model, batch)
    first = out.logits[:, -1].repeat_interleave(G, dim=0)                     # (N, V): predicts y_1
    kv = [(layer.keys.repeat_interleave(G, dim=0), layer.values.repeat_interleave(G, dim=0))
          for layer in out.cache.layers]                                      # (N, kv, L, hs) per layer
    prompt_mask, next_pos = batch["attention_mask"].repeat_interleave(G, dim=0), next_pos.repeat_interleave(G)
    N, T = completion_ids.shape
    order, slices = length_buckets(lengths, buckets)
    parts = []
    for rows in slices:                                                       # n rows, their longest t tokens
        t = int(lengths[rows[0]])
        ids = completion_ids[rows, :t]
        logp = token_logprobs(first[rows], ids[:, 0])[:, None]                # (n, 1)
        if t > 1 or every_forward:
            width = max(t - 1, 1)                                             # inputs y_1..y_width
            cache = DynamicCache([(k[rows], v[rows]) for k, v in kv])
            mask = torch.cat([prompt_mask[rows], prompt_mask.new_ones(len(rows), width)], dim=1)
            pos = next_pos[rows, None] + torch.arange(width, device=next_pos.device)         # (n, width)
            rest = model(input_ids=completion_ids[rows, :width], cache=cache, attention_mask=mask,
                         position_ids=pos[None].expand(3, -1, -1), use_cache=True).logits    # predicts y_2..y_t
            if t == 1:                                                        # nothing to predict: weighted 0
                logp = logp + 0.0 * rest[:, :1, :1].float().sum()
            else:
                logp = torch.cat([logp, token_logprobs(rest, ids[:, 1:])], dim=1)
        parts.append(F.pad(logp, (0, T - t)))
    return torch.cat(parts)[order.argsort()]                                 # back in the rows' order

def _logprobs_prompt_per_answer(model, batch, completion_ids, G):
    """(N, T) log-probs of y_1..y_T: every answer after its own copy of the prompt (images once per prompt)."""
    T = completion_ids.shape[1]
    features = image_features(model, batch, G)
    prompt_pos, next_pos = rope_positions(model, batch)                       # (3, B, L), (B,)
    comp_pos = next_pos[:, None] + torch.arange(T, device=next_pos.device)    # (B, T)
    position_ids = torch.cat([prompt_pos, comp_pos[None].expand(3, -1, -1)], dim=2)  # (3, B, L+T)
    position_ids = position_ids.repeat_interleave(G, dim=1)                   # (3, N, L+T)
    input_ids = torch.cat([batch["input_ids"].repeat_interleave(G, 0), completion_ids], dim=1)
    attention_mask = torch.cat([batch["attention_mask"].repeat_interleave(G, 0),
                                torch.ones_like(completion_ids, dtype=batch["attention_mask"].dtype)], dim=1)
    out = model(input_ids=input_ids, mm_encoder_outputs=features, attention_mask=attention_mask,
                position_ids=position_ids, use_cache=False, logits_to_keep=T + 1)
    return token_logprobs(out.logits[:, :-1], completion_ids)

if __name__ == "__main__":
    model, processor = load("tiny")
    print(f"tiny Qwen2.5-VL: {num_parameters(model) / 1e6:.3f} M parameters "
          f"(vision {num_parameters(model.model.visual) / 1e6:.3f} M), vocab {len(processor.tokenizer)}")
    batch = encode(processor, [{"image": Image.new("RGB", (112, 112), "white"), "problem": "How many shapes?"}])
    print(processor.tokenizer.decode(batch["input_ids"][0]))
    print({k: tuple(v.shape) for k, v in batch.items()})
