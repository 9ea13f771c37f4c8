"""An artifact that matches the manifest (size and sha256 re-stamped) but cannot be opened — written corrupt, then
hashed — ends a command with one line naming the file, exit 2, never a traceback from ONNX Runtime, the GGUF
reader, llama.cpp, numpy or the tokenizer."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from kimia_edge.cli import main


def _corrupt_copy(bundle: Path, tmp_path: Path, relative: str) -> Path:
    """A copy of ``bundle`` (hard links) whose file ``relative`` holds only its first half, with the manifest's size
    and sha256 of that file rewritten to match."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy, copy_function=os.link)
    target = copy / relative
    data = target.read_bytes()[: target.stat().st_size // 2]
    target.unlink()  # not through the hard link
    target.write_bytes(data)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        for f in artifact["files"]:
            if f["path"] == relative:
                f["bytes"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("relative", ["whisper_encoder.fp32.onnx", "vq_encoder.fp32.onnx", "vq_codebook.npy",
                                      "llm/Q8_0/llm_trunk.gguf", "tokenizer/tiktoken.model"])
def test_a_corrupt_artifact_with_matching_hashes_is_one_line_naming_it(tiny_bundle: Path, shared_audio: Path,
                                                                       tmp_path: Path, relative: str,
                                                                       capsys: pytest.CaptureFixture) -> None:
    bundle = _corrupt_copy(tiny_bundle, tmp_path, relative)
    # the hashes match: only opening finds it (verify reads a .npy header too: it is what np.load checks)
    assert main(["bundle", "verify", str(bundle)]) == (1 if relative.endswith(".npy") else 0)
    capsys.readouterr()
    code = main(["transcribe", "--bundle", str(bundle), str(shared_audio / "asr_example_zh.wav"), "--max-steps", "3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert relative in err and "export it again" in err, err
    # one line, except the .npy found at verification: that report lists each problem on a line of its own
    assert len(err.strip().splitlines()) == (2 if relative.endswith(".npy") else 1), err
