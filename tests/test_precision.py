"""Precision and memory format: quantizers under bf16 autocast and channels_last, and
``train.mixed_precision: auto`` (timed choice, cache, run record)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import cmtkd_graph as cg
from cmtkd_graph.quantizers import QUANTIZERS, Quantizer, build_quantizer_family
from cmtkd_graph.quantizers.layers import QuantConv2d
from cmtkd_graph.quantizers.lsq import LSQQuantizer
from cmtkd_graph.runtime import precision as prec

CHANNELS_LAST = torch.channels_last


# ---------------------------------------------------------------------------------------------
# Quantizers compute their levels in fp32 under autocast.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(QUANTIZERS.names()))
@pytest.mark.parametrize("bits", [2, 4, 7])
def test_bf16_autocast_gives_the_fp32_levels(family, bits):
    """Up to 7 bits, bf16 (8 significant bits) holds every level q * scale closely enough that the
    integer q is recovered; 8-bit levels are not all representable in bf16
    (docs/performance.md#precision-decided-per-machine-and-spec)."""
    torch.manual_seed(bits)
    fam = build_quantizer_family(family)
    layer = QuantConv2d.from_float(nn.Conv2d(8, 16, 3, padding=1), fam.weight(bits))
    act = fam.activation(bits, signed=True)
    if isinstance(act, LSQQuantizer):
        for q in (act, layer.weight_quantizer):
            q.eval()
            with torch.no_grad():
                q.step.fill_(0.05)
    seen: dict[str, list[torch.Tensor]] = {"weight": [], "act": []}
    layer.weight_quantizer.register_forward_hook(lambda m, a, out: seen["weight"].append(out))
    act.register_forward_hook(lambda m, a, out: seen["act"].append(out))
    x = torch.randn(2, 8, 6, 6).to(torch.bfloat16)  # what a bf16 layer hands the next one
    layer(act(x.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(act(x))
    assert out.dtype == torch.bfloat16  # the convolution itself runs in bf16
    w32, w16 = seen["weight"]
    assert w16.dtype == torch.float32 and torch.equal(w16, w32)  # weight levels identical to fp32
    a32, a16 = seen["act"]
    assert a16.dtype == torch.bfloat16
    # the same codes as the fp32 quantization
    scale = act.input_scale()
    assert torch.equal(torch.round(a16.float() / scale), act.to_integers(x.float()).q)
    assert torch.equal(torch.round(a32 / scale), act.to_integers(x.float()).q)


# ---------------------------------------------------------------------------------------------
# The composed system keeps channels_last through every layer, in fp32 and bf16.
# ---------------------------------------------------------------------------------------------
def _quickstart_system(*extra: str):
    spec = cg.load_spec("quickstart", ["surgery=[cifar_stem]", "data.image_size=16", *extra])
    torch.manual_seed(0)
    return cg.build_system(spec)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_channels_last_survives_every_layer_and_weight_levels_match_fp32(bf16):
    system = _quickstart_system().to(memory_format=CHANNELS_LAST)
    lost, weight_levels = [], {}

    def check(name):
        def hook(module, args, out):
            for i, t in enumerate([*args, out]):
                if (
                    isinstance(t, torch.Tensor)
                    and t.dim() == 4
                    and not t.is_contiguous(memory_format=CHANNELS_LAST)
                ):
                    lost.append(f"{name} ({type(module).__name__}) {'output' if i == len(args) else 'input'}")
            if name.endswith("weight_quantizer"):
                weight_levels[name] = out

        return hook

    leaves = [(n, m) for n, m in system.named_modules() if not list(m.children())]
    assert sum(isinstance(m, Quantizer) for _, m in leaves) > 40
    for name, module in leaves:
        module.register_forward_hook(check(name))
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=CHANNELS_LAST)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = system(x)
    system.losses(out, torch.tensor([0, 1, 2, 3]))["total"].backward()
    assert not lost, lost[:10]
    convs = [m for _, m in leaves if isinstance(m, nn.Conv2d) and m.weight.grad is not None]
    assert convs and all(m.weight.grad.is_contiguous(memory_format=CHANNELS_LAST) for m in convs)
    # the weight levels of this step are the fp32 step's, bit for bit
    reference = {}
    for name, module in leaves:
        if name.endswith("weight_quantizer"):
            weight = system.get_submodule(name.rsplit(".", 1)[0]).weight
            reference[name] = module(weight.detach())
    assert weight_levels.keys() == reference.keys()
    assert all(
        weight_levels[n].dtype == torch.float32 and torch.equal(weight_levels[n], reference[n])
        for n in reference
    )


# ---------------------------------------------------------------------------------------------
# mixed_precision: auto
# ---------------------------------------------------------------------------------------------
def test_pick_needs_a_clear_win():
    assert prec.pick({"fp32": 1.0, "bf16": 0.97, "fp32 channels_last": 0.99}) == "fp32"  # within 5 %
    assert prec.pick({"fp32": 1.0, "bf16": 0.80, "bf16 channels_last": 0.70}) == "bf16 channels_last"
    assert prec.pick({"fp32": 1.0, "bf16": 1.30}) == "fp32"


def _spec(*extra: str):
    return cg.load_spec(
        "quickstart", ["surgery=[cifar_stem]", "data.image_size=16", "data.batch_size=8", *extra]
    )


def test_candidates_follow_what_the_spec_fixes(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: True)
    assert prec.candidates(_spec(), cpu) == [("no", False), ("no", True), ("bf16", False), ("bf16", True)]
    assert prec.candidates(_spec("train.mixed_precision=no"), cpu) == [("no", False), ("no", True)]
    assert prec.candidates(_spec("train.channels_last=true"), cpu) == [("no", True), ("bf16", True)]
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: False)  # emulated bf16 is never timed
    assert prec.candidates(_spec("train.channels_last=false"), cpu) == [("no", False)]
    fixed = prec.choose_precision(_spec("train.mixed_precision=bf16", "train.channels_last=true"), cpu, 8)
    assert (fixed.mixed_precision, fixed.channels_last, fixed.source) == ("bf16", True, "spec")


def test_shape_key_ignores_what_does_not_change_a_step():
    options = [("no", False), ("bf16", False)]
    key = prec.shape_key(_spec(), 8, options)
    assert (
        prec.shape_key(_spec("optim.lr=0.5", "train.epochs=9", "train.seed=3", "name=other"), 8, options)
        == key
    )
    assert prec.shape_key(_spec(), 16, options) != key
    assert prec.shape_key(_spec("student.act_bits=4"), 8, options) != key
    assert prec.shape_key(_spec("data.image_size=32"), 8, options) != key


def test_auto_probes_once_then_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CMTKD_GRAPH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: True)
    # at 8x8 and batch 2: four real probes (bf16 is emulated on CPUs without bf16 units) stay short
    spec, cpu = _spec("data.image_size=8"), torch.device("cpu")
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = prec.choose_precision(spec, cpu, 2)
    assert torch.equal(torch.rand(3), expected_draw)  # the probe leaves the RNG as it found it
    assert first.source == "probe"
    assert set(first.seconds_per_step) == {"fp32", "fp32 channels_last", "bf16", "bf16 channels_last"}
    assert all(t > 0 for t in first.seconds_per_step.values())
    assert first.label == prec.pick(first.seconds_per_step)
    assert "steps/s vs fp32" in first.describe()
    cache = json.loads((tmp_path / "precision.json").read_text())
    (entry,) = cache.values()
    assert entry["machine"]["cpu"] and entry["mixed_precision"] == first.mixed_precision

    def no_probe(*args, **kwargs):
        raise AssertionError("probed although the choice is cached")

    monkeypatch.setattr(prec, "probe", no_probe)
    again = prec.choose_precision(_spec("data.image_size=8", "optim.lr=0.3"), cpu, 2)
    assert again.source == "cache" and again.label == first.label
    assert again.seconds_per_step == first.seconds_per_step
    # another machine (here: another torch) is another cache entry
    machine = prec.machine_key(cpu)
    monkeypatch.setattr(prec, "machine_key", lambda device: {**machine, "torch": "0.0"})
    with pytest.raises(AssertionError, match="probed"):
        prec.choose_precision(spec, cpu, 2)


def test_an_unwritable_cache_only_costs_a_probe(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("CMTKD_GRAPH_CACHE_DIR", str(blocker / "sub"))
    monkeypatch.setattr(prec, "probe", lambda *a: {"fp32": 1.0, "bf16": 0.5})
    chosen = prec.choose_precision(_spec("train.channels_last=false"), torch.device("cpu"), 8)
    assert chosen.mixed_precision == "bf16" or not prec.cpu_has_fast_bf16()
    assert prec.cached_choice(_spec("train.channels_last=false"), torch.device("cpu"), 8) is None
