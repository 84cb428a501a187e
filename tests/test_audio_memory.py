"""Peak host memory of the audio path holds the track about once, however long it is (issue #10).

One fresh process: the tiny wav2vec2 warmed up on one second, then the peak resident memory (VmHWM, reset
through /proc/self/clear_refs) of `prepare_audio` and `audio_features` on five minutes of speech. The
whole-track code of before (pyloudnorm's float64 filtering, the feature extractor's copies, the CNN over
every sample at once) peaked about 12 tracks above the start; now it is the 16 kHz track itself, its
features and one slice at a time plus about 20 MiB: 2.2-2.4 tracks (40.7-44.5 MiB for the 18.3 MiB track, five
runs; 10 minutes: 60-66 MiB for 36.6 MiB).
"""

from __future__ import annotations

import subprocess
import sys
import wave
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SECONDS = 300
TRACK_MIB = SECONDS * 16000 * 4 / 2**20  # the float32 16 kHz track
PROBE = """
import sys
from pathlib import Path
import numpy as np, torch
from multitalk_worker.models.audio_encoder import audio_features, build_audio_encoder
from multitalk_worker.models.configs import TINY
from multitalk_worker.pipeline.audio import prepare_audio
from multitalk_worker.tiny import build_tiny_feature_extractor

def status(key):
    return int(Path("/proc/self/status").read_text().split(key + ":")[1].split()[0]) / 1024

torch.set_num_threads(1)
encoder, extractor = build_audio_encoder(TINY.audio_encoder), build_tiny_feature_extractor()
audio_features(encoder, extractor, np.zeros(16000, np.float32))  # warm up: kernels, allocator
start = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
prepared = prepare_audio([Path(sys.argv[1])], "parallel", 81)
features = audio_features(encoder, extractor, prepared.tracks[0])
print(status("VmHWM") - start, tuple(features.shape))
"""


def test_audio_path_peak_is_about_one_track(tmp_path: Path) -> None:
    with wave.open(str(EXAMPLES / "speech_a.wav")) as src:
        params, data = src.getparams(), src.readframes(src.getnframes())
    need = SECONDS * params.framerate * params.sampwidth
    speech = tmp_path / "long.wav"
    with wave.open(str(speech), "wb") as out:
        out.setparams(params)
        out.writeframes((data * (need // len(data) + 1))[:need])
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(speech)], capture_output=True, text=True, check=True, timeout=300
    )
    growth, shape = done.stdout.split(maxsplit=1)
    assert shape.strip() == f"({SECONDS * 25}, 2, 16)"
    assert float(growth) < 3.0 * TRACK_MIB, (
        f"peak {float(growth):.1f} MiB above the start ({TRACK_MIB:.1f} MiB track)"
    )
