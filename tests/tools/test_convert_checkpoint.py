"""tools/convert_checkpoint.py: release checkpoint file -> loadable rankdetr checkpoint."""

import sys
from pathlib import Path

import torch

from tests.checkpoint.test_release import fake_release_state_dict, r50_two_stage
from tests.conftest import load_tool
from tests.warm_python import run_python

TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"


def test_converted_file_loads_strictly(tmp_path):
    release = fake_release_state_dict()
    torch.save({"model": release, "iteration": 89999}, tmp_path / "release.pth")
    result = run_python(
        [sys.executable, str(TOOL), str(tmp_path / "release.pth"), str(tmp_path / "ours.pth")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    converted = torch.load(tmp_path / "ours.pth", weights_only=True)["model"]
    model = r50_two_stage()
    model.load_state_dict(converted, strict=True)
    torch.testing.assert_close(model.level_embeds, release["transformer.level_embeds"])


def convert(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the tool's main in this process (the command line itself
    runs in test_converted_file_loads_strictly)."""
    status = load_tool(TOOL, "convert_checkpoint").main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_bad_input_is_reported_and_nothing_is_written(tmp_path, capsys):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    status, _, err = convert([tmp_path / "junk.pth", tmp_path / "ours.pth"], capsys)
    assert status == 1 and "junk.pth" in err
    assert not (tmp_path / "ours.pth").exists()


def test_a_three_layer_checkpoint_converts_without_being_told_its_depth(tmp_path, capsys):
    from tests.checkpoint.test_release import three_layer_release

    torch.save({"model": three_layer_release()}, tmp_path / "release.pth")
    paths = [tmp_path / "release.pth", tmp_path / "o.pth"]
    status, out, err = convert(paths, capsys)
    assert status == 0, err
    assert "decoder_layers=3" in out and "encoder_layers=6" in out
    converted = torch.load(tmp_path / "o.pth", weights_only=True)["model"]
    assert "proposals.class_head.weight" in converted and "decoder.class_heads.3.weight" not in (
        converted
    )
    # Insisting on another depth fails, naming both, and writes nothing.
    (tmp_path / "o.pth").unlink()
    status, _, err = convert([*paths, "--num-decoder-layers", "6"], capsys)
    assert status == 1 and "has 3 decoder layers" in err
    assert not (tmp_path / "o.pth").exists()


def test_a_failed_save_names_the_file_and_keeps_the_previous_output(tmp_path, monkeypatch, capsys):
    """The output is written with the checkpointer's atomic save: a full disk leaves the earlier
    file as it was and no temporary file behind."""
    torch.save({"model": fake_release_state_dict()}, tmp_path / "release.pth")
    (tmp_path / "ours.pth").write_bytes(b"earlier output")
    tool = load_tool(TOOL, "convert_checkpoint")

    def disk_full(data, handle):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    assert tool.main([str(tmp_path / "release.pth"), str(tmp_path / "ours.pth")]) == 1
    assert "ours.pth: No space left on device" in capsys.readouterr().err
    assert (tmp_path / "ours.pth").read_bytes() == b"earlier output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.pth", "release.pth"]


def test_a_detrex_dino_checkpoint_is_recognised_and_loads_strictly(tmp_path, capsys):
    """The dino-tiny reference state dict (detrex's DINO names) -> our DINO, strictly."""
    from tests.checkpoint.test_dino_fixture import build_model
    from tests.shared_reference import load_shared_reference

    fixture = load_shared_reference("dino-tiny/dino_tiny_fixture.pth")
    torch.save({"model": fixture["state_dict"]}, tmp_path / "dino.pth")
    status, out, err = convert([tmp_path / "dino.pth", tmp_path / "ours.pth"], capsys)
    assert status == 0, err
    assert "DINO" in out and "num_queries=12" in out
    assert "decoder_layers=3" in out and "num_classes=5" in out
    converted = torch.load(tmp_path / "ours.pth", weights_only=True)["model"]
    build_model(fixture["config"]).load_state_dict(converted, strict=True)
