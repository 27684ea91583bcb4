"""Quantization-aware training in the user's own loop (`qexport.prepare` / `optimizer` / `convert`)."""
import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import qexport
from qadmm import qat
from qadmm.errors import UserError
from qadmm.finetune import Projector
from qadmm.spec import QuantSpec

README = Path(__file__).resolve().parents[1] / "README.md"


def plain_loop(model, data, opt, epochs: int = 1, batch_size: int = 64) -> int:
    """A user's loop: nothing qexport-specific in it."""
    x, y = torch.tensor(data.x_train, dtype=torch.float32), torch.tensor(data.y_train)
    gen = torch.Generator().manual_seed(0)
    steps = 0
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            steps += 1
    return steps


@pytest.mark.parametrize("method", qat.trainers())
def test_every_trainer_runs_in_the_users_loop(method, digits, digits_mlp):
    model = copy.deepcopy(digits_mlp)
    keys = set(model.state_dict())
    steps = -(-len(digits.x_train) // 64) * 2
    model = qexport.prepare(model, method, 2, per_channel=True, steps=steps, input_shape=(1, 8, 8))
    opt = qexport.optimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    assert plain_loop(model, digits, opt, epochs=2) == steps
    art = qexport.convert(model, digits)
    assert set(model.state_dict()) == keys  # the user's model is a plain float model again
    assert set(art.layers) == {"body.1", "body.3", "body.5"}
    for lc in art.layers.values():
        assert lc.codes.bits == 2 and lc.codes.contains(lc.q) and lc.alpha.dim() == 1
    acc = art.meta["accuracy"]
    assert acc["quantized_test"] >= 85.0, acc  # ternary weights on digits, float about 96 %
    assert art.meta["method"]["params"]["loop"] == "yours" and "epochs" not in art.meta["method"]["params"]
    assert art.meta["history"][0] == {"steps": steps, "steps_planned": steps}
    if method == "md-tanh":  # β reached its end value at the last step
        assert art.meta["method"]["params"]["final_beta"] == pytest.approx(art.meta["method"]["params"]["beta_end"])


def test_the_hooked_step_is_the_method_step(digits, digits_mlp):
    """ADMM-Q's penalty enters through the optimiser hook: one step of the user's loop with CE alone
    moves the weights exactly as qexport's own loop does with CE + penalty."""
    from qadmm.methods import admmq

    x, y = torch.tensor(digits.x_train[:64], dtype=torch.float32), torch.tensor(digits.y_train[:64])
    spec = QuantSpec(bits=2, per_channel=True, progress=False)
    ours = qexport.prepare(copy.deepcopy(digits_mlp), "admm-q", 2, per_channel=True, steps=10, input_shape=(1, 8, 8),
                           params={"rho": 0.5})
    opt = qexport.optimizer(ours, torch.optim.SGD(ours.parameters(), lr=0.1))
    nn.functional.cross_entropy(ours(x), y).backward()
    opt.step()
    theirs = copy.deepcopy(digits_mlp)
    p = spec.resolve(admmq.Params)
    p.rho = 0.5
    hooks = admmq.hooks(theirs, spec, p, Projector(theirs, spec))
    sgd = torch.optim.SGD(theirs.parameters(), lr=0.1)
    (nn.functional.cross_entropy(theirs(x), y) + hooks.loss_extra()).backward()
    sgd.step()
    hooks.after_step(0.1)
    for (n, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


def test_refusals(digits_mlp):
    model = copy.deepcopy(digits_mlp)
    with pytest.raises(UserError, match="does not train in your loop"):
        qexport.prepare(model, "gptq", 4, steps=10, input_shape=(1, 8, 8))
    with pytest.raises(UserError, match="steps=0"):
        qexport.prepare(model, "ste", 4, steps=0, input_shape=(1, 8, 8))
    with pytest.raises(UserError, match="not prepared"):
        qexport.convert(model, None)
    qexport.prepare(model, "ste", 4, steps=10, input_shape=(1, 8, 8))
    with pytest.raises(UserError, match="already prepared"):
        qexport.prepare(model, "ste", 4, steps=10, input_shape=(1, 8, 8))


def test_readme_example(shared_data, tmp_path, monkeypatch):
    """The README's example, as written: a ResNet-style CNN on an MNIST subset, 2-bit Mirror Descent in
    the user's loop with their augmentations and cosine schedule, then to_onnx and verify."""
    if not (shared_data / "mnist").is_dir():
        pytest.skip(f"MNIST not found under {shared_data}")
    block = re.search(r"### Quantization-aware training in your own loop.*?```py\n(.*?)```", README.read_text(), flags=re.S)
    assert block, "the README shows the example"
    monkeypatch.setenv("QEXPORT_DATA", str(shared_data))
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "readme"}
    exec(compile(block.group(1), str(README), "exec"), scope)
    art = scope["art"]
    assert art.meta["accuracy"]["quantized_test"] >= 80.0 and (tmp_path / "qat.onnx").is_file()
    assert all(lc.codes.bits == 2 for lc in art.layers.values())


def test_a_model_only_torch_export_captures_trains_in_your_loop_and_verifies(digits, tmp_path):
    """Channel shuffle, chunk, permute, a parameter used in forward (tests/test_capture.py's Shuffle):
    prepared, trained by a plain loop, converted; the file's three forms verify."""
    from test_capture import Shuffle

    data = (digits.x_train / 16.0, digits.y_train, digits.x_test / 16.0, digits.y_test)
    x, y = torch.tensor(data[0], dtype=torch.float32), torch.tensor(data[1])

    def epochs(model, opt, n):
        for _ in range(n):
            model.train()
            for idx in torch.randperm(len(x)).split(64):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()

    torch.manual_seed(0)
    model = Shuffle()
    epochs(model, torch.optim.Adam(model.parameters(), lr=3e-3), 8)  # float
    model = qexport.prepare(model.eval(), "ste", 2, per_channel=True, steps=2 * 21, input_shape=(1, 8, 8))
    epochs(model, qexport.optimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3)), 2)
    art = qexport.convert(model, data)
    acc = art.meta["accuracy"]
    assert art.meta["architecture"]["capture"] == "torch.export" and acc["quantized_test"] > 80, acc
    art.save(tmp_path / "m.qx.safetensors")
    art = qexport.load(tmp_path / "m.qx.safetensors")
    for form in ("weights", "qdq", "qoperator"):
        qexport.to_onnx(art, tmp_path / f"{form}.onnx", form=form, calib_data=data)
        assert qexport.verify(tmp_path / f"{form}.onnx", art, data)["passed"], form
