"""train.amp.dtype="auto": bf16 autocast where the device computes bf16 natively, float32
elsewhere, and the log says which and why. The hardware is injected, so both branches run on
any machine; the detection itself is checked against this machine's /proc/cpuinfo."""

import logging

import pytest
import torch
from detectron2.utils.events import EventStorage

from rankdetr.engine import precision
from rankdetr.engine.precision import choose_amp_dtype, cpu_bf16_features
from rankdetr.engine.trainer import RankDETRTrainer
from tests.engine.test_engine import RecordingModel

AMX = ["CPU flag amx_bf16"]


@pytest.mark.parametrize(
    "features,capability,expected",
    [
        (AMX, "AVX512", "bf16"),
        (["CPU flag avx512_bf16"], "AVX512", "bf16"),
        ([], "AVX2", None),  # an AVX2-only CPU: emulated bf16
        ([], "AVX512", None),  # AVX-512 without its bf16 extension
        (AMX, "AVX2", None),  # ATEN_CPU_CAPABILITY=avx2: torch's kernels would not use AMX
    ],
)
def test_auto_on_the_cpu_takes_bf16_only_with_native_bf16(features, capability, expected):
    choice = choose_amp_dtype("auto", "cpu", cpu_features=features, cpu_capability=capability)
    assert choice.dtype == expected
    assert capability in choice.reason
    for feature in features:
        assert feature in choice.reason


@pytest.mark.parametrize("cuda_bf16,expected", [(True, "bf16"), (False, None)])
def test_auto_on_cuda_follows_is_bf16_supported(cuda_bf16, expected):
    assert choose_amp_dtype("auto", "cuda", cuda_bf16=cuda_bf16).dtype == expected


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_an_explicit_dtype_is_kept_whatever_the_hardware(dtype):
    choice = choose_amp_dtype(dtype, "cuda", cuda_bf16=False)
    assert choice.dtype == dtype and "as configured" in choice.reason


def test_bf16_forced_on_a_cpu_without_native_bf16_is_kept_and_warned_about():
    slow = choose_amp_dtype("bf16", "cpu", cpu_features=[])
    assert slow.dtype == "bf16" and slow.slow
    assert "no native bf16" in slow.reason and "auto" in slow.reason
    native = choose_amp_dtype("bf16", "cpu", cpu_features=AMX)
    assert native.dtype == "bf16" and not native.slow and "no native" not in native.reason


def test_cpu_flags_are_read_and_match_this_machine():
    assert cpu_bf16_features(flags={"sse2", "amx_bf16"})[-1:] == ["CPU flag amx_bf16"]
    assert "CPU flag avx512_bf16" in cpu_bf16_features(flags={"avx512_bf16", "avx512f"})
    flags = precision._proc_cpuinfo_flags()
    if flags:  # Linux: the default detection sees what the kernel reports
        native = bool({"amx_bf16", "avx512_bf16"} & flags)
        assert native == any(f.startswith("CPU flag") for f in cpu_bf16_features())


@pytest.mark.parametrize("native", [True, False])
def test_the_trainer_resolves_auto_logs_it_and_runs_that_autocast(native, monkeypatch, caplog):
    """A trainer given "auto" autocasts exactly when the CPU is (made to look) native bf16."""
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: AMX if native else [])
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    model = RecordingModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with caplog.at_level(logging.INFO, logger="rankdetr.engine.trainer"):
        trainer = RankDETRTrainer(model, [torch.ones(3)] * 4, optimizer, amp="auto")
    with EventStorage():
        trainer.train(0, 2)
    assert model.autocast == [native, native]
    assert trainer.amp_dtype == (torch.bfloat16 if native else None)
    (line,) = [r.getMessage() for r in caplog.records if "Training precision" in r.getMessage()]
    assert ("bf16 autocast" in line) == native and ("float32" in line) == (not native)
    assert ("amx_bf16" in line) == native


def test_an_unknown_dtype_names_the_allowed_ones():
    model = RecordingModel()
    with pytest.raises(ValueError, match="'auto'"):
        RankDETRTrainer(model, [], torch.optim.SGD(model.parameters(), lr=0.1), amp="bf32")
