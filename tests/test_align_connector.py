"""The AlignVLM connector (`raysal.model.align_connector`): image tokens in the convex hull of the LM's text
embeddings, trained with the projector's settings, on tiny LLaVA and LLaVA-NeXT."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from raysal.batch import PixelNorm, model_inputs
from raysal.criteria.lm import next_token_ce
from raysal.model.align_connector import AlignConnector
from raysal.model.build import apply_lora, load_model, load_processor, param_groups
from raysal.orchestration.train.compose import compose_cfg
from raysal.orchestration.train.spec import spec_from_cfg
from raysal.preprocess.batches import batch_factory, load_encoded


@pytest.fixture(params=["llava", "llava_next"])
def tiny(request, tiny_llava, tiny_next):
    return tiny_llava if request.param == "llava" else tiny_next


def _connector(model: torch.nn.Module) -> AlignConnector:
    found = [m for m in model.modules() if isinstance(m, AlignConnector)]
    assert found, "no ALIGN connector in the model"
    return found[-1]  # under peft: the trained copy (modules_to_save) comes last


def test_align_output_is_a_convex_mix_of_text_embeddings_and_only_it_learns(tiny, small_shards):
    torch.manual_seed(0)
    model = apply_lora(load_model(str(tiny), dtype="float32", connector="align"), rank=4, train_projector=True)
    conn = _connector(model)
    embed = model.get_input_embeddings().weight  # (V, d)
    feats = torch.randn(3, 7, conn.linear_1.in_features)
    p = conn.distribution(feats)  # (3, 7, V)
    assert p.shape[-1] == embed.shape[0] and bool((p >= 0).all())
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 7), rtol=0, atol=1e-5)
    out = conn(feats)  # (3, 7, d)
    torch.testing.assert_close(out, p @ embed, rtol=1e-5, atol=1e-6)
    lo, hi = embed.min(0).values, embed.max(0).values  # a convex mix stays inside the embeddings' bounding box
    assert bool((out >= lo - 1e-5).all() and (out <= hi + 1e-5).all())
    # one real step: the connector's weights get gradients, the embeddings and the vision tower do not
    proc = load_processor(str(tiny))
    samples = load_encoded(small_shards, "train2017", proc, limit=2)
    batch = next(batch_factory(samples, 2, proc.tokenizer.pad_token_id, PixelNorm.from_processor(proc))(0))
    out = model(**model_inputs(batch), use_cache=False)
    next_token_ce(out.logits, batch["labels"]).sum().backward()
    for name in ("linear_1", "linear_2", "norm_1", "norm_2"):
        grad = getattr(conn, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert embed.grad is None
    assert all(p.grad is None for n, p in model.named_parameters() if "vision_tower" in n)
    groups = {g["name"]: g for g in param_groups(model, lr=1e-4, projector_lr=1e-5)}
    assert {id(p) for p in conn.parameters()} == {id(p) for p in groups["projector"]["params"]}


def test_align_connector_saves_with_the_adapter_and_loads_back(tiny_llava, tmp_path):
    torch.manual_seed(0)
    model = apply_lora(load_model(str(tiny_llava), dtype="float32", connector="align"), rank=4, train_projector=True)
    with torch.no_grad():
        _connector(model).linear_2.weight.add_(0.5)  # trained away from any fresh initialisation
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(1)
    loaded = PeftModel.from_pretrained(load_model(str(tiny_llava), dtype="float32", connector="align"),
                                       tmp_path / "adapter")  # fmt: skip
    for (n, a), b in zip(_connector(model).state_dict().items(), _connector(loaded).state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert not any("embed_tokens" in k for k in _connector(model).state_dict())  # the LM's, never copied


def test_connector_config_is_checked():
    spec = spec_from_cfg(compose_cfg(["experiment=demo", "model.connector=align"]))
    assert spec.model["connector"] == "align"
    with pytest.raises(ValueError, match=r"model\.connector=.conv.: must be one of mlp, align"):
        spec_from_cfg(compose_cfg(["experiment=demo", "model.connector=conv"]))
    with pytest.raises(ValueError, match="a fresh ALIGN connector is random and would stay frozen"):
        spec_from_cfg(compose_cfg(["model.connector=align"]))  # lora=default: projector not trained
    with pytest.raises(ValueError, match=r"model\.connector=align with lora=none"):
        spec_from_cfg(compose_cfg(["experiment=demo", "model.connector=align", "lora=none"]))


def test_connector_stage_trains_only_the_connector_and_a_later_run_starts_from_it(tiny_llava, small_shards, tmp_path):
    from raysal.criteria.lm import LMCriterion
    from raysal.loop.checkpoint import CONNECTOR
    from raysal.loop.fit import FitConfig, fit
    from raysal.model.build import prepare_connector_stage

    proc = load_processor(str(tiny_llava))
    pad, px = proc.tokenizer.pad_token_id, PixelNorm.from_processor(proc)
    train = batch_factory(load_encoded(small_shards, "train2017", proc, limit=8), 4, pad, px, seed=1)
    torch.manual_seed(0)
    model = prepare_connector_stage(load_model(str(tiny_llava), dtype="float32", connector="align"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reports = []
    cfg = FitConfig(max_steps=6, lr=3e-3, eval_every=3, connector_stage="align")
    fit(model, [LMCriterion()], train, None, cfg, report=lambda m, p: reports.append((m, p)), checkpoint_dir=tmp_path)
    assert reports[-1][0]["train/loss"] < reports[0][0]["train/loss"]  # the connector alone lowers the LM loss
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("multi_modal_projector" in n for n in changed)  # LM and vision untouched
    folder = reports[-1][1] / CONNECTOR
    assert (folder / "connector.safetensors").exists() and not (reports[-1][1] / "model").exists()
    later = load_model(str(tiny_llava), dtype="float32", connector="align", connector_init=folder)
    for (n, a), b in zip(_connector(model).state_dict().items(), _connector(later).state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match=r"the saved connector is 'align', but model\.connector='mlp'"):
        load_model(str(tiny_llava), dtype="float32", connector="mlp", connector_init=folder)
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"  # a connector saved for a model of another width
    other.mkdir()
    (other / "connector.json").write_text((folder / "connector.json").read_text())
    state = load_file(str(folder / "connector.safetensors"))
    state = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k.endswith("linear_1.weight") else v
             for k, v in state.items()}  # fmt: skip
    save_file(state, str(other / "connector.safetensors"))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_model(str(tiny_llava), dtype="float32", connector="align", connector_init=other)
    with pytest.raises(FileNotFoundError, match=r"no connector\.json"):
        load_model(str(tiny_llava), dtype="float32", connector="align", connector_init=tmp_path)


def test_connector_stage_config():
    spec = spec_from_cfg(compose_cfg(["experiment=demo", "trainer.stage=connector", "model.connector=align",
                                      "~criterion@criteria.align"]))  # fmt: skip
    assert spec.fit.connector_stage == "align" and [c.name for c in spec.criteria] == ["lm"]
    with pytest.raises(ValueError, match="trains on captions only"):
        spec_from_cfg(compose_cfg(["experiment=demo", "trainer.stage=connector"]))
    with pytest.raises(ValueError, match="no such folder"):
        spec_from_cfg(compose_cfg(["experiment=demo", "model.connector_init=/no/such/connector"]))


def test_connector_init_may_be_a_storage_location(tiny_llava, tmp_path, storage_root):
    """A search exports ``best_connector/`` to its storage (a bucket on a cluster): a later run starts from it there,
    checked at the config and loaded by the workers without a local copy of the folder."""
    from raysal import storage
    from raysal.model.build import save_connector
    from raysal.search.override_text import format_override

    torch.manual_seed(0)
    model = load_model(str(tiny_llava), dtype="float32", connector="align")
    with torch.no_grad():
        _connector(model).linear_2.weight.add_(0.5)
    save_connector(model, tmp_path / "connector", "align")
    remote = storage.join(storage_root, "search", "best_connector")
    storage.upload(tmp_path / "connector", remote)
    spec = spec_from_cfg(compose_cfg(["experiment=demo", "model.connector=align",
                                      format_override("model.connector_init", remote)]))  # fmt: skip
    assert spec.model["connector_init"] == remote
    torch.manual_seed(1)
    later = load_model(str(tiny_llava), dtype="float32", connector="align", connector_init=remote)
    for (n, a), b in zip(_connector(model).state_dict().items(), _connector(later).state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    missing = storage.join(storage_root, "nothing")
    with pytest.raises(ValueError, match=r"model\.connector_init=.*: no such folder"):
        spec_from_cfg(compose_cfg(["experiment=demo", "model.connector=align",
                                   format_override("model.connector_init", missing)]))  # fmt: skip
