"""``benchmarks.build_smol_vl``: SmolLM2-135M-Instruct inside a Qwen2-VL checkpoint reads text exactly as SmolLM2
does, through transformers and through SGLang, and takes images through its (here random) vision side."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import build_smol_vl
from benchmarks.build_smol_vl import IMAGE_TOKEN, SMOLLM2_DIR, SMOLLM2_VOCAB, VISION_END, VISION_START
from madakv_sglang.checkpoints import write_test_image
from tests.sglang_server import Server

TEXT = (
    "The lighthouse on Gull Point was built in 1874 and painted red and white. Its keeper, Ada Moss, lit the lamp "
    "every evening for thirty years. Question: who kept the lighthouse on Gull Point?"
)
MAX_NEW = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (SMOLLM2_DIR / "model.safetensors").exists():
        pytest.skip(f"SmolLM2 weights not converted at {SMOLLM2_DIR}: run `make setup-smollm2`")
    # The dir name holds "qwen2-vl": SGLang's frontends pick the chat template by path.
    return build_smol_vl.assemble(tmp_path_factory.mktemp("ckpt") / "smol-qwen2-vl", seed=0)


@pytest.fixture(scope="module")
def smollm2() -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def assembled(checkpoint: Path) -> Any:
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt(checkpoint: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": TEXT}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_the_tokenizer_is_smollm2s_with_the_vision_tokens_appended(checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    ours, theirs = AutoTokenizer.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    assert ours(TEXT)["input_ids"] == theirs(TEXT)["input_ids"]
    ids = ours("<|vision_start|><|image_pad|><|vision_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [VISION_START, IMAGE_TOKEN, VISION_END]
    chat = [{"role": "user", "content": TEXT}]
    rendered = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered == theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    image_chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    rendered = ours.apply_chat_template(image_chat, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>" in rendered


def test_text_logits_are_smollm2s(smollm2: Any, assembled: Any, prompt: list[int]) -> None:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        expected = smollm2(input_ids=ids).logits[0]
        got = assembled(input_ids=ids).logits[0]
    assert got.shape[-1] == SMOLLM2_VOCAB + 4
    # Bit-equal on our CPU (M-RoPE with three equal position rows is 1-D RoPE, a zero bias adds nothing); the
    # tolerance, ~1e-6 of logits of magnitude ~30, leaves room for a CPU whose kernels fuse the bias add.
    torch.testing.assert_close(got[:, :SMOLLM2_VOCAB], expected, rtol=1e-5, atol=3e-5)
    # The vision tokens' zero head rows score 0, below the next word at every position.
    assert (got[:, SMOLLM2_VOCAB:] == 0).all()
    assert (got[:, :SMOLLM2_VOCAB].max(-1).values > 1).all()


def test_an_image_goes_through_the_vision_side(assembled: Any, checkpoint: Path, tmp_path: Path) -> None:
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    image = Image.open(write_test_image(tmp_path / "a.png", seed=1))
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == 64  # 224x224: 16x16 patches, merged 2x2
    with torch.no_grad():
        with_image = assembled(**inputs).logits[0, -1]
        other = processor(
            text=[text], images=[Image.open(write_test_image(tmp_path / "b.png", seed=2))], return_tensors="pt"
        )
        with_other = assembled(**other).logits[0, -1]
    assert torch.isfinite(with_image).all()
    assert not torch.allclose(with_image, with_other)  # the answer depends on the pixels


@pytest.fixture(scope="module")
def smol_server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("logs") / "smol-vl.log"
    with Server(checkpoint, ["--max-total-tokens", "4096", "--attention-backend", "torch_native"], log) as running:
        yield running


def test_sglang_reads_text_as_smollm2_does(smol_server: Server, smollm2: Any, prompt: list[int]) -> None:
    sampling = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
    got = smol_server.post("/generate", {"input_ids": prompt, "sampling_params": sampling, "return_logprob": True})
    ids = torch.tensor([prompt])
    with torch.no_grad():
        expected = smollm2.generate(ids, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False)[0]
        logits = smollm2(input_ids=expected[None]).logits[0, len(prompt) - 1 : -1]
    assert got["output_ids"] == expected[len(prompt) :].tolist()
    expected_logprobs = torch.log_softmax(logits, -1).gather(-1, expected[len(prompt) :, None])[:, 0]
    logprobs = [entry[0] for entry in got["meta_info"]["output_token_logprobs"]]
    # SGLang's CPU kernels against transformers' in fp32, and SGLang normalises over the 4 appended tokens too
    # (each about e^-20 of the mass): differences of ~1e-4.
    assert logprobs == pytest.approx(expected_logprobs.tolist(), abs=2e-3)
