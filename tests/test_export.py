"""`python -m raysal.export`'s merge: the merged folder loads with transformers alone and computes what base +
adapter computes (tiny LLaVA and LLaVA-NeXT, float32), with the processor, its chat template and the training image
ids beside it; an ALIGN connector is refused with the reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raysal import storage
from raysal.model.build import apply_lora, load_model, load_processor
from raysal.model.chat_template import accept_string_content
from raysal.orchestration.train.merged_export import RUN_CONFIG, TRAIN_IDS, ExportError, export_one, train_image_ids


def _run_folder(tmp_path, model_dir, shards, *, connector: str = "mlp", seed: int = 0):
    """A run folder as a run leaves it: run_config.json, and a checkpoint whose adapter has trained (non-zero) LoRA
    weights and a trained projector."""
    torch.manual_seed(seed)
    model = apply_lora(load_model(str(model_dir), dtype="float32"), rank=4, targets="qv", train_projector=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)  # B starts at zero: a merge of it would prove nothing
    run = tmp_path / "run"
    ckpt = run / "checkpoint_0000004"
    model.save_pretrained(ckpt / "adapter")
    config = {"name": "r", "model": {"name_or_path": str(model_dir), "connector": connector},
              "data": {"shards": str(shards), "train_split": "train2017", "val_split": "train2017",
                       "val_holdout": 0.25}}  # fmt: skip
    storage.write_json(str(run / RUN_CONFIG), config)
    return run, ckpt, model


def _inputs(processor):
    rng = np.random.default_rng(0)
    image = (rng.random((90, 160, 3)) * 255).astype(np.uint8)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a circle?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt", input_data_format="channels_last")


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_the_merged_folder_loads_alone_and_computes_base_plus_adapter(arch, request, tmp_path, small_shards):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = request.getfixturevalue("tiny_llava" if arch == "llava" else "tiny_next")
    run, ckpt, peft_model = _run_folder(tmp_path, model_dir, small_shards)
    out = str(tmp_path / "export")
    export_one(str(run), str(ckpt), {"val/amr": 1.5}, out, trial_id="t1")

    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert processor.chat_template == accept_string_content(load_processor(str(model_dir)).chat_template)
    batch = _inputs(processor)
    with torch.no_grad():
        want = peft_model.eval()(**batch, use_cache=False).logits
        got = merged(**batch, use_cache=False).logits
        base = load_model(str(model_dir), dtype="float32").eval()(**batch, use_cache=False).logits
    assert (want - base).abs().max() > 1e-3, "the adapter changes the model: the comparison can fail"
    assert (got - want).abs().max() < 1e-5
    assert not any("lora" in n for n, _ in merged.named_parameters())

    ids = [int(x) for x in (tmp_path / "export" / TRAIN_IDS).read_text().split()]
    assert ids == train_image_ids({"shards": str(small_shards), "train_split": "train2017", "val_split": "train2017",
                                   "val_holdout": 0.25})  # fmt: skip
    everything = train_image_ids({"shards": str(small_shards), "train_split": "train2017", "val_split": "val2017"})
    assert ids == sorted(ids) and 0 < len(ids) < len(everything) and set(ids) < set(everything)  # hold-out left out
    info = json.loads((tmp_path / "export" / "raysal_export.json").read_text())
    assert info["trial_id"] == "t1" and info["metrics"] == {"val/amr": 1.5} and info["base"] == str(model_dir)


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_the_exported_folder_answers_as_lmms_eval_llava_hf_asks(arch, request, tmp_path, small_shards):
    """lmms-eval's ``llava_hf`` classes (simple and chat; the chat class inherits ``loglikelihood``) load the folder
    with ``AutoProcessor`` and render the *tokenizer's* template on string content ``"<image>\n{question}"``; the
    chat class's ``generate_until`` renders the processor's on parts. Built here as they build them (transformers
    alone): the image and the question reach the model, the log-likelihood of a continuation and a generation
    work, and string and part contents give the prompt the model was trained with."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = request.getfixturevalue("tiny_llava" if arch == "llava" else "tiny_next")
    run, ckpt, _ = _run_folder(tmp_path, model_dir, small_shards)
    out = tmp_path / "export"
    _, lmms = export_one(str(run), str(ckpt), {}, str(out), trial_id="t1")
    assert lmms == f"--model llava_hf --model_args pretrained={out},dtype=bfloat16,device_map=cuda:0"
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    processor.tokenizer.padding_side = "left"  # as lmms-eval sets it
    tokenizer = processor.tokenizer
    assert tokenizer.chat_template, "lmms-eval would fall back to its Vicuna template, not the model's"
    image = (np.random.default_rng(0).random((90, 160, 3)) * 255).astype(np.uint8)
    question = "Is there a circle in the image?"

    # simple class: string content, the tokenizer's template; loglikelihood masks the prompt's tokens
    messages = [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": "Yes"}]
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    assert prompt == processor.apply_chat_template(parts, tokenize=False, add_generation_prompt=True)
    assert question in prompt and whole.startswith(prompt) and "Yes" in whole[len(prompt) :]
    inputs = processor(text=[whole], images=[image], return_tensors="pt")
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image > 0, "the image reached the model"
    labels = inputs["input_ids"].clone()
    # lmms-eval measures the context with the processor and no image: transformers 5 refuses that for every LLaVA
    # checkpoint (hub ones too: "<image> tokens in the text but no images"), older versions tokenize it unexpanded,
    # which is what the tokenizer does
    context = tokenizer(text=[prompt], return_tensors="pt")["input_ids"]
    labels[:, : context.shape[1]] = -100
    with torch.inference_mode():
        loss = model(**inputs, labels=labels).loss
    assert torch.isfinite(loss) and (labels != -100).sum() >= 1

    # generate_until (both classes): the rendered prompt with the image, greedy decoding
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert ids.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0], str)


def test_an_align_connector_is_refused_with_the_reason(tiny_llava, tmp_path, small_shards):
    run, ckpt, _ = _run_folder(tmp_path, tiny_llava, small_shards, connector="align")
    with pytest.raises(ExportError, match=r"model\.connector=align: the ALIGN connector is raysal's own module"):
        export_one(str(run), str(ckpt), {}, str(tmp_path / "export"), trial_id=None)
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_a_qwen_export_loads_with_transformers_and_answers_a_pope_question(arch, tiny_qwen, tmp_path, small_shards):
    """The merged Qwen folder (LoRA and the trained merger merged in) loads with ``AutoModelForImageTextToText``,
    computes what base + adapter computes, and answers a POPE question through its saved processor, whose config
    names transformers' own processor class and carries the run's pixel limits."""
    from transformers import AutoModelForImageTextToText

    from raysal.loop.pope_eval import answer_logits
    from raysal.metrics.pope import p_yes, yes_no_token_ids
    from raysal.model.qwen_processor import IMAGE_ONLY

    run, ckpt, peft_model = _run_folder(tmp_path, tiny_qwen[arch], small_shards)
    config = storage.read_json(str(run / RUN_CONFIG))
    config["model"] |= {"min_pixels": 3136, "max_pixels": 40000}  # the run's pins, not the checkpoint's
    storage.write_json(str(run / RUN_CONFIG), config)
    out = tmp_path / "export"
    export_one(str(run), str(ckpt), {}, str(out), trial_id="t1")
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    assert type(merged).__name__ == type(peft_model.base_model.model).__name__
    saved = json.loads((out / "processor_config.json").read_text())
    assert saved["processor_class"] == IMAGE_ONLY[arch].__name__  # transformers' name: AutoProcessor resolves it
    assert saved["image_processor"]["size"] == {"shortest_edge": 3136, "longest_edge": 40000}
    processor = IMAGE_ONLY[arch].from_pretrained(out)  # AutoProcessor needs torchvision (Qwen's video part)
    batch = _inputs(processor)
    with torch.no_grad():
        want = peft_model.eval()(**batch, use_cache=False).logits
        got = merged(**batch, use_cache=False).logits
    assert (got - want).abs().max() < 1e-5
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    image = (np.random.default_rng(0).random((90, 160, 3)) * 255).astype(np.uint8)
    logits = answer_logits(merged, processor, image, ["Is there a circle in the image?"], device="cpu")
    p, mass = p_yes(logits, *yes_no_token_ids(processor.tokenizer))
    assert 0 <= float(p[0]) <= 1 and float(mass[0]) > 0


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_a_qwen_export_answers_as_lmms_eval_qwen_classes_ask(arch, tiny_qwen, tmp_path, small_shards):
    """lmms-eval's ``qwen2_5_vl`` / ``qwen3_vl`` classes load the folder with ``AutoProcessor.from_pretrained(folder,
    min_pixels=…, max_pixels=…)`` (their defaults, 200,704 and 1,605,632, unless ``--model_args`` gives the run's
    pins), render the processor's template on a system turn ("You are a helpful assistant.") and the user's image
    part then the question, and have ``qwen_vl_utils.process_vision_info`` resize the image first (smart_resize by
    28 / 32 within those limits; Qwen3-VL's class then calls the processor with ``do_resize=False``). Built as they
    build them (transformers alone: qwen_vl_utils imports torchvision): given the pins, the image reaches the
    model on the grid raysal trained with; the prompt is raysal's (Qwen2.5-VL's template adds that system turn
    itself; Qwen3-VL's does not: lmms-eval's prompt has one more turn, the same for every arm); generation works."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from raysal.loop.pope_eval import _messages
    from raysal.model.qwen_processor import IMAGE_ONLY

    pins = {"min_pixels": 3136, "max_pixels": 40000}
    run, ckpt, _ = _run_folder(tmp_path, tiny_qwen[arch], small_shards)
    config = storage.read_json(str(run / RUN_CONFIG))
    config["model"] |= pins
    storage.write_json(str(run / RUN_CONFIG), config)
    out = tmp_path / "export"
    _, lmms = export_one(str(run), str(ckpt), {}, str(out), trial_id="t1")
    assert lmms == (f"--model {arch} --model_args pretrained={out},device_map=cuda:0,min_pixels=3136,max_pixels=40000")
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_processor(str(out), **pins)  # what raysal trains and evaluates with
    theirs = IMAGE_ONLY[arch].from_pretrained(out, **pins)  # AutoProcessor's class, less its video part
    image = (np.random.default_rng(0).random((90, 160, 3)) * 255).astype(np.uint8)
    question = "Is there a circle in the image?"

    system = {"role": "system", "content": "You are a helpful assistant."}
    part = {"type": "image", "image": Image.fromarray(image), **pins}
    messages = [system, {"role": "user", "content": [part, {"type": "text", "text": question}]}]
    text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    own = ours.apply_chat_template(_messages(question), tokenize=False, add_generation_prompt=True)
    turn = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert text == (own if arch == "qwen2_5_vl" else turn + own), (text, own)
    assert question in text and text.count("<|image_pad|>") == 1

    factor = 28 if arch == "qwen2_5_vl" else 32  # qwen_vl_utils: image_patch_size 14 / 16, times the 2x2 merge
    h, w = smart_resize(image.shape[0], image.shape[1], factor=factor, **pins)
    resized = Image.fromarray(image).resize((w, h))  # PIL's default filter, as qwen_vl_utils' fetch_image
    extra = {"do_resize": False} if arch == "qwen3_vl" else {"padding": True}
    inputs = theirs(text=[text], images=[resized], return_tensors="pt", **extra)
    trained = ours(text=[own], images=[image], return_tensors="pt", input_data_format="channels_last")
    assert inputs["image_grid_thw"].tolist() == trained["image_grid_thw"].tolist()
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image == int(trained["image_grid_thw"].prod()) // 4 > 0, "the image reached the model, every token"
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=theirs.tokenizer.pad_token_id)
    assert ids.shape[1] > inputs["input_ids"].shape[1]
    answer = theirs.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    assert isinstance(answer, str)
