"""fp32 master weights: trainable tensors and optimizer state in fp32 beside bf16 frozen weights, no update lost."""

import copy

import pytest
import torch
import yaml
from conftest import ROOT, adapter_tensors, smoke_config
from test_lightning_epochs import recording
from torch import nn

from s2ft.adapter import load_adapter, save_adapter, switch_adapter
from s2ft.adapter_format import load_adapter_file
from s2ft.layers import S2FTLinear
from s2ft.lightning import run_experiment
from s2ft.lightning.callbacks import RunInterrupted
from s2ft.lightning.optimizer import MasterWeightAdamW
from s2ft.methods import prepare_model
from s2ft.models import tiny_model
from s2ft.state import s2ft_modules

VOCAB = 64
# The smallest peak learning rate of any paper method config: where bf16 rounding loses the most.
SMALLEST_PAPER_LR = min(yaml.safe_load(f.read_text())["lr"] for f in (ROOT / "conf/method/paper").glob("*.yaml"))
OPTIONS = {
    "s2ft": {"ratios": {"o": 0.5, "down": 0.25}},
    "lora": {"r": 4, "lora_dropout": 0.0},
    "dora": {"r": 4, "lora_dropout": 0.0},
    "spft": {"p": 0.1, "seed": 3},
    "full": {},
}


def test_the_smallest_paper_lr_is_full_fine_tunings():
    assert SMALLEST_PAPER_LR == 1e-5


def tiny(dtype: torch.dtype) -> nn.Module:
    return tiny_model("llama", vocab_size=VOCAB, seed=0).to(dtype)


def step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 0) -> None:
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def trained_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """What training updates, in fp32: the fp32 trainable tensors or, for bf16 ones, their masters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [optimizer.state[p].get("master", p).detach().clone() for p in params]


def changed_fraction(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    changed = sum(int((a != b).sum()) for a, b in zip(before, after, strict=True))
    return changed / sum(t.numel() for t in before)


def test_on_fp32_parameters_it_is_torch_adamw_exactly():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 7)), nn.Parameter(torch.randn(3))]
    reference = [nn.Parameter(p.detach().clone()) for p in params]
    ours = MasterWeightAdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    theirs = torch.optim.AdamW(reference, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    for i in range(5):
        grads = [torch.randn_like(p, generator=torch.Generator().manual_seed(i * 10 + j)) for j, p in enumerate(params)]
        for p, q, g in zip(params, reference, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, reference, strict=True):
        assert torch.equal(p, q)
    assert set(ours.state[params[0]]) == set(theirs.state[reference[0]]) == {"step", "exp_avg", "exp_avg_sq"}


def test_bf16_parameters_train_through_fp32_masters_and_resume_exactly():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(64, 64).bfloat16())
    reference = nn.Parameter(weight.detach().float())  # fp32 training on the same bf16 gradients
    ours = MasterWeightAdamW([weight], lr=SMALLEST_PAPER_LR, betas=(0.9, 0.95))
    theirs = torch.optim.AdamW([reference], lr=SMALLEST_PAPER_LR, betas=(0.9, 0.95), foreach=False)

    def steps(optimizers, first, count):
        for i in range(first, first + count):
            grad = torch.randn(64, 64, generator=torch.Generator().manual_seed(i)).bfloat16()
            weight.grad, reference.grad = grad, grad.float()
            for optimizer in optimizers:
                optimizer.step()

    steps([ours, theirs], 0, 3)
    state = copy.deepcopy(ours.state_dict())
    assert all(state["state"][0][k].dtype == torch.float32 for k in ("master", "exp_avg", "exp_avg_sq"))
    resumed = MasterWeightAdamW([weight], lr=SMALLEST_PAPER_LR, betas=(0.9, 0.95))
    resumed.load_state_dict(state)  # torch's own load would cast the master and moments to bf16
    assert resumed.state[weight]["master"].dtype == torch.float32
    steps([resumed, theirs], 3, 3)
    master = resumed.state[weight]["master"]
    assert torch.equal(master, reference.detach())
    assert torch.equal(weight.detach(), master.bfloat16())
    assert weight.dtype == torch.bfloat16


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_one_step_at_the_smallest_paper_lr_updates_every_entry_fp32_would(method):
    model = prepare_model(tiny(torch.bfloat16), method, OPTIONS[method])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        want = torch.float32 if name in trainable and method != "full" else torch.bfloat16
        assert param.dtype == want, (name, param.dtype)
    optimizer = MasterWeightAdamW([p for p in model.parameters() if p.requires_grad], lr=SMALLEST_PAPER_LR)
    step(model, optimizer)  # the first step creates the masters; measure the second
    before = trained_state(model, optimizer)
    step(model, optimizer, seed=1)
    ours = changed_fraction(before, trained_state(model, optimizer))
    for state in optimizer.state.values():
        assert all(v.dtype == torch.float32 for k, v in state.items() if k != "step")

    fp32 = prepare_model(tiny(torch.bfloat16).float(), method, OPTIONS[method])  # the same weights, all in fp32
    reference = torch.optim.AdamW([p for p in fp32.parameters() if p.requires_grad], lr=SMALLEST_PAPER_LR)
    step(fp32, reference)
    before = trained_state(fp32, reference)
    step(fp32, reference, seed=1)
    expected = changed_fraction(before, trained_state(fp32, reference))
    assert expected > 0.9
    assert ours >= expected - 0.005, (ours, expected)


@pytest.mark.parametrize("method", ["full", "s2ft"])
def test_plain_adamw_on_bf16_trainables_loses_most_updates(method):
    """What the masters prevent (the check above is not vacuous): AdamW stepping bf16 tensors directly."""
    model = prepare_model(tiny(torch.bfloat16), method, OPTIONS[method])
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.bfloat16()
    optimizer = torch.optim.AdamW(params, lr=SMALLEST_PAPER_LR, foreach=False)
    step(model, optimizer)
    before = [p.detach().clone() for p in params]
    step(model, optimizer, seed=1)
    assert changed_fraction(before, [p.detach() for p in params]) < 0.3


def test_s2ft_linear_with_fp32_values_beside_a_bf16_weight(tmp_path):
    torch.manual_seed(0)
    linear = nn.Linear(32, 16, bias=True).bfloat16()
    for axis, index in ((0, torch.tensor([1, 4, 5])), (1, torch.tensor([0, 7, 9, 30]))):
        layer = S2FTLinear(copy.deepcopy(linear), axis, index)
        layer.values.data = layer.values.data.float() + 1e-4  # an fp32 update below bf16's resolution
        x = torch.randn(2, 5, 32).bfloat16().requires_grad_()
        merged = layer.weight.index_copy(axis, index, layer.values.bfloat16())
        expected = nn.functional.linear(x, merged, layer.bias)
        out = layer(x)
        assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
        out.float().square().sum().backward()
        assert layer.values.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, rtol=1e-2, atol=1e-2)  # inference: two bf16 matmuls
            exact = layer.values.detach().clone()
            layer.merge()
            assert torch.equal(layer(x), nn.functional.linear(x, merged, layer.bias))
            layer.unmerge()
            assert torch.equal(layer.values, exact) and layer.values.dtype == torch.float32


def saved_bf16_adapter(path):
    """A bf16 model's S2FT adapter with fp32 updates below bf16's resolution, saved to ``path``; the model and the
    values it saved."""
    model = prepare_model(tiny(torch.bfloat16), "s2ft", OPTIONS["s2ft"])
    with torch.no_grad():
        for module in s2ft_modules(model).values():
            module.values.add_(1e-4)  # below bf16's resolution at these magnitudes
    save_adapter(model, path)
    return model, {name: m.values.detach().clone() for name, m in s2ft_modules(model).items()}


def test_adapters_of_a_bf16_model_keep_fp32_values_through_save_and_switch(tmp_path):
    _, trained = saved_bf16_adapter(tmp_path / "a")
    saved = load_adapter_file(tmp_path / "a")
    for name, module in saved.modules.items():
        assert module.values.dtype == torch.float32
        assert torch.equal(module.values, trained[name])
    other = prepare_model(tiny(torch.bfloat16), "s2ft", {**OPTIONS["s2ft"], "seed": 1})
    switch_adapter(other, tmp_path / "a")
    for name, module in s2ft_modules(other).items():
        assert module.values.dtype == torch.float32 and torch.equal(module.values, trained[name])


@pytest.mark.parametrize("trainable", [False, True])
def test_loading_an_adapter_onto_a_bf16_base_keeps_its_fp32_values_exactly(tmp_path, trainable):
    model, trained = saved_bf16_adapter(tmp_path / "a")
    loaded = load_adapter(tiny(torch.bfloat16), tmp_path / "a", trainable=trainable)
    for name, module in s2ft_modules(loaded).items():
        assert module.weight.dtype == torch.bfloat16 and module.values.dtype == torch.float32
        assert torch.equal(module.values, trained[name]) and module.values.requires_grad == trainable
    ids = torch.randint(0, VOCAB, (2, 7))
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    ("method", "precision"),
    [("s2ft", "bf16-true"), pytest.param("full", "bf16-mixed", marks=pytest.mark.slow)],
)
def test_a_bf16_run_resumes_with_its_fp32_state_exactly(method, precision, tmp_path):
    """bf16-true casts the whole module (fp32 values included) after a checkpoint is loaded: the module restores
    the checkpoint's exact fp32 values; full FT's fp32 masters come back from the optimizer state."""
    overrides = ["model.dtype=bfloat16", f"trainer.precision={precision}", f"method={method}", "trainer.max_steps=6"]
    overrides += ["trainer.checkpoint_every_n_steps=100"]
    full = run_experiment(smoke_config(*overrides), tmp_path / "full")
    with recording([], stop_after=3), pytest.raises(RunInterrupted):
        run_experiment(smoke_config(*overrides), tmp_path / "resumed")
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    masters = [s["master"] for s in ckpt["optimizer_states"][0]["state"].values() if "master" in s]
    assert bool(masters) == (method == "full") and all(m.dtype == torch.float32 for m in masters)
    if method == "s2ft":
        assert {v.dtype for k, v in ckpt["state_dict"].items() if k.endswith(".values")} == {torch.float32}
    resumed = run_experiment(smoke_config(*overrides, "ckpt_path=last"), tmp_path / "resumed")
    assert resumed["train"]["loss_curve"] == full["train"]["loss_curve"]
    for key, tensor in adapter_tensors(tmp_path / "full").items():
        assert torch.equal(adapter_tensors(tmp_path / "resumed")[key], tensor), key
