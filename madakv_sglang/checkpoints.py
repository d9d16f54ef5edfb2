"""Save the tiny random models of :mod:`madakv_sglang.tiny_models` as checkpoint dirs that SGLang can serve.

The HF-path tests build their models in memory; the engine path needs files on disk (config, safetensors,
tokenizer, processor). Writing the *same* builders' weights here keeps both paths on identical models, so the
engine's greedy output can be checked token by token against ``transformers.generate``.

Everything is made offline: the tokenizer is a byte-level BPE trained by the ``tokenizers`` library on a small
built-in English corpus, with ordinary ids 0..496 and Qwen's special tokens at the ids the configs use
(``<|endoftext|>`` 497, ``<|im_start|>`` 498, ``<|im_end|>`` 499, ``<|image_pad|>`` 500, ``<|video_pad|>`` 501,
``<|vision_start|>`` 502, ``<|vision_end|>`` 503), so 504 of the model's 512 embedding rows have a token.

CLI: ``python -m madakv_sglang.checkpoints --kind {qwen2_vl,qwen2_5_vl,qwen2} --out DIR [--seed N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from madakv_sglang import tiny_models
from madakv_sglang.tiny_models import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen2")
VL_KINDS = ("qwen2_vl", "qwen2_5_vl")
STAMP = ".madakv-checkpoint.json"
# The builders keep 512 (enough for their own prompts); served chats with several images need more. RoPE
# frequencies do not depend on it, so the weights and the outputs for short prompts are unchanged.
MAX_POSITIONS = 8192

ENDOFTEXT, IM_START, IM_END = 497, 498, 499
SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": ENDOFTEXT,
    "<|im_start|>": IM_START,
    "<|im_end|>": IM_END,
    "<|image_pad|>": IMAGE_TOKEN,
    "<|video_pad|>": VIDEO_TOKEN,
    "<|vision_start|>": VISION_START,
    "<|vision_end|>": VISION_END,
}
_BPE_VOCAB = min(SPECIAL_TOKENS.values())  # 256 byte symbols + 241 merges: ordinary ids are 0..496

# The vision tower sees 14-px patches and merges 2x2 of them into one token, so a side of 28 px is one token.
# min/max bound the resized area: a 224x224 image is kept as is (16x16 patches -> 64 tokens); larger images
# shrink to at most 448x448 (256 tokens), which keeps CPU prefill cheap.
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 448 * 448
VIDEO_MIN_PIXELS = 56 * 56
VIDEO_MAX_PIXELS = 224 * 224

# Qwen2-VL's chat template, as shipped with Qwen2-VL-*-Instruct (the default system prompt included).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split (digits one by one, contractions, runs of letters / punctuation / spaces).
_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

_CORPUS = """\
You are a helpful assistant. The user shows you a picture and asks a question about it.
Describe this image in one sentence. What is in the picture? How many people are there?
The image shows a small red house next to a green field, with a blue sky and white clouds above it.
A cat is sitting on the table near the window, and the sun is shining through the glass.
There are three dogs playing in the park, and a child is running after a yellow ball.
The quick brown fox jumps over the lazy dog. Please answer the question with a short sentence.
What color is the car? The car is black and it is parked in front of the building on the left.
Can you read the text on the sign? The sign says that the store is open from nine to five every day.
The photo was taken at night in a busy city street with many lights, shops and people walking.
A man and a woman are standing on a bridge over the river, looking at the boats below them.
The video shows a person cooking dinner in the kitchen: first they cut the onions, then they fry them.
Thank you for the question. I think the answer is yes, but I am not sure because the picture is dark.
The weather today is warm and sunny, with a light wind from the west and no rain in the forecast.
Tell me a story about a robot who wants to learn how to paint flowers in the garden of an old castle.
Once upon a time, there was a little girl who lived in a village by the sea with her grandmother.
Every morning she walked to the market to buy bread, milk, eggs and fresh fruit for breakfast.
Numbers and dates: 1, 2, 3, 10, 42, 100, 2024. Punctuation: commas, periods; colons: and (brackets)!
"""


def _build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (every byte is a symbol, so any text round-trips) with Qwen's special tokens appended."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    if tok.get_vocab_size() != _BPE_VOCAB:  # the corpus ran out of merges; special ids would shift
        raise RuntimeError(f"BPE trained {tok.get_vocab_size()} tokens, need {_BPE_VOCAB}: enlarge _CORPUS")
    append_special_tokens(tok, SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        # As in Qwen2-VL's own tokenizer: every control token is listed as special, so ``all_special_ids`` holds
        # them and clients that draw random prompt ids (SGLang's benchmark) leave them out.
        additional_special_tokens=[text for text in SPECIAL_TOKENS if text not in ("<|im_end|>", "<|endoftext|>")],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def append_special_tokens(tok: Tokenizer, tokens: Mapping[str, int]) -> None:
    """Add ``tokens`` (text -> id) to ``tok`` as special tokens in id order, each at the next free id; the ids
    must follow the vocabulary without a gap, and any that lands elsewhere is an error."""
    from tokenizers import AddedToken

    for text, token_id in sorted(tokens.items(), key=lambda item: item[1]):
        tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        if tok.token_to_id(text) != token_id:
            raise RuntimeError(f"{text} got id {tok.token_to_id(text)}, expected {token_id}")


def qwen_vl_processor(kind: str, tokenizer: PreTrainedTokenizerFast, chat_template: str = CHAT_TEMPLATE) -> Any:
    """The Qwen2-VL / Qwen2.5-VL processor (both use Qwen2-VL's image and video processors) over ``tokenizer``,
    with this module's image limits."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS})
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS}, cap_pixels_per_frame=True
    )
    processor_cls = Qwen2VLProcessor if kind == "qwen2_vl" else Qwen2_5_VLProcessor
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template,
    )


def _code_hash() -> str:
    """Hash of this module and of the builders: a stamp written by other code (or other weights) is stale."""
    digest = hashlib.sha256()
    for path in (Path(__file__), Path(tiny_models.__file__)):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _stamp(kind: str, seed: int) -> dict[str, Any]:
    return {"kind": kind, "seed": seed, "code": _code_hash()}


def is_current(out_dir: Path, kind: str, seed: int = 0) -> bool:
    """True when ``out_dir`` holds a complete checkpoint written for ``kind``/``seed`` by this code."""
    stamp = Path(out_dir) / STAMP
    try:
        return bool(json.loads(stamp.read_text()) == _stamp(kind, seed))
    except (OSError, ValueError):
        return False


def patch_config(out_dir: Path) -> None:
    """Raise the context length, spell the dtype both ways, and add the vision key SGLang reads.

    SGLang's Qwen2-VL reads ``vision_config.in_chans``, the pre-5.x name of ``in_channels`` that transformers
    5.19 no longer writes; older readers also look for ``torch_dtype`` rather than ``dtype``.
    """
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    vision = config.get("vision_config")
    if vision is not None and "in_channels" in vision:
        vision["in_chans"] = vision["in_channels"]
    for section in (config, config.get("text_config")):
        if section is None:
            continue
        section["dtype"] = section["torch_dtype"] = "float32"
        if "max_position_embeddings" in section:
            section["max_position_embeddings"] = MAX_POSITIONS
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_checkpoint(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """Write the ``kind`` builder's model (weights drawn from ``seed``) to ``out_dir`` as a servable checkpoint.

    Idempotent: returns at once when a stamp shows the dir already holds this kind/seed from this code. The
    stamp is written last, so an interrupted write is redone on the next call.

    Args:
        kind: one of :data:`KINDS` (the builder of the same name in :mod:`madakv_sglang.tiny_models`).
        out_dir: created if missing; existing checkpoint files in it are overwritten.
        seed: passed to the builder; the same seed gives the same weights as ``tiny_models.<kind>(seed)``.

    Returns:
        ``out_dir``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    out_dir = Path(out_dir)
    if is_current(out_dir, kind, seed):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STAMP).unlink(missing_ok=True)
    model, _ = tiny_models.BUILDERS[kind](seed)
    save_model(model, out_dir, kind)
    (out_dir / STAMP).write_text(json.dumps(_stamp(kind, seed)) + "\n")
    return out_dir


def save_model(model: Any, out_dir: Path, kind: str) -> None:
    """What SGLang needs to serve ``model`` (a ``kind`` architecture with this module's vocabulary): weights, the
    config with the patches of :func:`patch_config`, a chat generation config, the tokenizer and, for the VL
    kinds, the processor. Used for the random builders here and for trained models (the needle benchmark's)."""
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    # Chat replies end at <|im_end|>. The builders' configs keep eos unset (HF's reference generate must not
    # stop early), and random weights rarely pick it anyway.
    model.generation_config = GenerationConfig(eos_token_id=IM_END, pad_token_id=ENDOFTEXT)
    model.save_pretrained(out_dir)
    patch_config(out_dir)
    tokenizer = _build_tokenizer()
    tokenizer.save_pretrained(out_dir)
    if kind in VL_KINDS:
        qwen_vl_processor(kind, tokenizer).save_pretrained(out_dir)


def build_processor(kind: str) -> Any:
    """The processor a ``kind`` checkpoint of this module ships (tokenizer, image limits, chat template)."""
    if kind not in VL_KINDS:
        raise ValueError(f"{kind!r} has no processor; expected one of {VL_KINDS}")
    return qwen_vl_processor(kind, _build_tokenizer())


def write_test_image(path: Path, size: tuple[int, int] = (224, 224), seed: int = 0) -> Path:
    """Write a deterministic RGB PNG of ``size`` = (width, height): random colours in 14-px blocks.

    Blocks of one vision patch make every patch differ (so the vision tower's output depends on the image)
    while the PNG stays small.
    """
    import numpy as np
    from PIL import Image

    width, height = size
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(-(-height // 14), -(-width // 14), 3), dtype=np.uint8)
    pixels = blocks.repeat(14, axis=0).repeat(14, axis=1)[:height, :width]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="RGB").save(path, format="PNG")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint dir (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed, as for tiny_models.<kind>(seed)")
    args = parser.parse_args(argv)
    print(write_checkpoint(args.kind, args.out, args.seed))


if __name__ == "__main__":
    main()
