"""``kimia-edge snapshot make`` writes one consistent snapshot: every component loads strictly through the
readers users use, and the components agree on the numbers they share."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kimia_edge.cli import main
from kimia_edge.export.snapshot.audio_encoders import GLM_TOKENIZER_SUBDIR, read_vq_encoder, read_whisper_encoder
from kimia_edge.export.snapshot.detokenizer import read_detokenizer
from kimia_edge.export.snapshot.llm import read_llm
from kimia_edge.export.snapshot.make import folder_bytes, make_snapshot
from kimia_edge.export.snapshot.presets import SIZES, preset
from kimia_edge.export.snapshot.vocoder import read_vocoder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("snap") / "tiny"
    assert main(["snapshot", "make", "--size", "tiny", "--out", str(out), "--seed", "3"]) == 0
    return out


def test_tiny_is_small_and_components_agree(tiny: Path) -> None:
    assert folder_bytes(tiny) < 20 * 2**20  # 19.2 MiB: mostly the LLM's three 152k-row matrices (official ids)
    llm_cfg, llm_sd = read_llm(tiny)
    whisper_cfg, _ = read_whisper_encoder(tiny)
    vq_cfg, _ = read_vq_encoder(tiny / GLM_TOKENIZER_SUBDIR)
    dit_cfg, _ = read_detokenizer(tiny)
    voc_cfg, _ = read_vocoder(tiny)
    codebook = llm_cfg.vocab_size - llm_cfg.kimia_token_offset
    assert vq_cfg.quantize_vocab_size == codebook == dit_cfg.semantic_vocab_size
    assert llm_sd.shape("model.vq_adaptor.layers.0.weight")[1] == 4 * whisper_cfg.d_model  # 4 frames per token
    assert voc_cfg.num_mels == dit_cfg.input_size and voc_cfg.hop_size == 480  # 50 Hz mel -> 24 kHz


@pytest.mark.parametrize("size", SIZES)
def test_every_size_is_consistent_across_components(size: str) -> None:
    """Checked on the configs each writer would write (no weights): a mismatch here breaks the whole chain."""
    from kimia_edge.export.snapshot.audio_encoders import vq_config_for_size, whisper_config_for_size
    from kimia_edge.export.snapshot.detokenizer import dit_config_for_size
    from kimia_edge.export.snapshot.llm import _SIZES, _config_dict
    from kimia_edge.runtime.llm_config import KimiaConfig

    llm = KimiaConfig.from_dict(_config_dict(_SIZES[size]))
    codebook = llm.vocab_size - llm.kimia_token_offset
    assert llm.kimia_adaptor_input_dim == 4 * whisper_config_for_size(size)["d_model"]
    assert vq_config_for_size(size)["quantize_vocab_size"] == codebook == dit_config_for_size(size).semantic_vocab_size


def test_same_seed_same_bytes_and_subsets_match(tiny: Path, tmp_path: Path) -> None:
    part = make_snapshot(tmp_path / "voc", "tiny", seed=3, components=["vocoder"])
    assert (part / "vocoder/model.pt").read_bytes() == (tiny / "vocoder/model.pt").read_bytes()
    assert not (part / "config.json").exists()


def test_refuses_existing_folder_and_unknown_component(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError):
        make_snapshot(tiny, "tiny", 0)
    with pytest.raises(ValueError, match="unknown components"):
        make_snapshot(tmp_path / "x", "tiny", 0, components=["llm", "mimo"])
    assert not (tmp_path / "x").exists()


def test_interrupted_make_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kimia_edge.export.snapshot.make as make

    real = make._writers()

    def failing_writers():
        w = dict(real)
        w["vocoder"] = lambda root, size, seed: (_ for _ in ()).throw(OSError("disk full"))
        return w

    monkeypatch.setattr(make, "_writers", failing_writers)
    with pytest.raises(OSError, match="disk full"):
        make_snapshot(tmp_path / "snap", "tiny", 0)
    assert list(tmp_path.iterdir()) == []


def test_every_writer_takes_its_sizes_from_the_one_preset_list() -> None:
    from kimia_edge.export.snapshot.audio_encoders import vq_config_for_size, whisper_config_for_size
    from kimia_edge.export.snapshot.detokenizer import dit_config_for_size
    from kimia_edge.export.snapshot.llm import _SIZES, write_llm
    from kimia_edge.export.snapshot.vocoder import vocoder_config_for_size

    assert SIZES == ("tiny", "small", "full") and set(_SIZES) == set(SIZES)
    for config_for_size in (whisper_config_for_size, vq_config_for_size, dit_config_for_size, vocoder_config_for_size):
        with pytest.raises(ValueError, match=r"size: expected one of \('tiny', 'small', 'full'\), got 'huge'"):
            config_for_size("huge")
    with pytest.raises(ValueError, match="size: expected one of"):
        write_llm(Path("never-written"), "huge", 0)
    with pytest.raises(ValueError, match="size: expected one of"):
        make_snapshot(Path("never-written"), "huge", 0)
    with pytest.raises(ValueError, match="expected keys"):
        preset("tiny", {"tiny": 1, "full": 3})  # a table that forgot a size


def test_cli_size_choices_come_from_the_presets_without_torch() -> None:
    """``kimia-edge snapshot make --size`` is registered on a runtime-only install: torch blocked."""
    script = textwrap.dedent(
        """
        import argparse, sys

        class Forbid:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("build time only: " + name)
                return None

        sys.meta_path.insert(0, Forbid())
        from kimia_edge.export import cli
        parser = argparse.ArgumentParser()
        cli.register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["snapshot", "make", "--out", "x", "--size", "small"])
        choices = [a.choices for a in parser._subparsers._group_actions[0].choices["snapshot"]
                   ._subparsers._group_actions[0].choices["make"]._actions if a.dest == "size"][0]
        print(args.size, *choices)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["small", *SIZES]


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_signal_during_make_leaves_no_partial_folder(tmp_path: Path, signame: str) -> None:
    import signal
    import time

    signum = getattr(signal, signame)
    proc = subprocess.Popen([sys.executable, "-m", "kimia_edge.cli", "snapshot", "make", "--size", "small",
                             "--out", str(tmp_path / "snap")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(tmp_path.glob(".snap.partial-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert any(tmp_path.glob(".snap.partial-*")), "the writer never started"
    time.sleep(1.0)  # well inside the ~10 s the small snapshot takes
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == 128 + signum
    assert list(tmp_path.iterdir()) == []  # neither a snapshot nor a staging folder
