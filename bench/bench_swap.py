"""Adapter swap: the time to copy a resident adapter into the DiT in place, and the memory it costs.

    python bench/bench_swap.py                 # the 14B-shaped DiT (14b-480p preset), bf16, on CUDA
    python bench/bench_swap.py --tiny          # the tiny DiT on the CPU (a check that the script runs)

Builds the DiT of the preset with random (uninitialised) weights directly on the device, one tensor at a
time, in bf16; holds the three registry adapters (multitalk, single, multi: 8·L + 10 tensors each, 330 for
the 14B DiT) in page-locked host memory (plain memory on the CPU), as residency.py does; then swaps them in
turn with `apply_adapter_state` (the copy `TalkingVideoPipeline.use_adapter` makes) and times each copy to
completion (CUDA synchronised). Checks after each swap that the DiT holds the adapter's values. Prints one
JSON object: per adapter the swap times (min, median), bytes, and host and GPU memory with everything
loaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from multitalk_worker.models.configs import CONFIGS, TINY  # noqa: E402
from multitalk_worker.models.transformer import MultiTalkTransformer  # noqa: E402
from multitalk_worker.registry import MODELS  # noqa: E402
from multitalk_worker.residency import pin_state  # noqa: E402
from multitalk_worker.weights.adapters import apply_adapter_state, audio_shapes, is_audio_key  # noqa: E402
from multitalk_worker.weights.checkpoint import empty_model  # noqa: E402


def build_dit(preset: str, device: torch.device, dtype: torch.dtype) -> MultiTalkTransformer:
    """The preset's DiT with uninitialised weights on `device`, made tensor by tensor (no float32 copy)."""
    config = TINY if preset == "tiny" else CONFIGS[preset]
    with empty_model():
        dit = MultiTalkTransformer(config.dit)
    for module in dit.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            fresh = torch.empty(param.shape, dtype=dtype, device=device)
            module.register_parameter(name, torch.nn.Parameter(fresh, requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, buffer.to(device))
    return dit.eval()


def random_tensor(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)


def host_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny DiT on the CPU")
    parser.add_argument("--preset", default="14b-480p", choices=sorted(CONFIGS))
    parser.add_argument("--rounds", type=int, default=5, help="swaps per adapter")
    args = parser.parse_args()
    preset = "tiny" if args.tiny else args.preset
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.bfloat16
    pin = device.type == "cuda"

    start = time.perf_counter()
    dit = build_dit(preset, device, dtype)
    synchronize(device)
    build_s = time.perf_counter() - start
    config = TINY if preset == "tiny" else CONFIGS[preset]
    shapes = audio_shapes(config)
    host_before = host_rss_bytes()
    generator = torch.Generator().manual_seed(0)
    adapters, buffers = {}, []
    for spec in MODELS.values():
        for adapter in spec.adapters:
            state = {k: random_tensor(s, generator, dtype) for k, s in shapes.items()}
            adapters[adapter.name], buffer = pin_state(state, pin=pin)
            buffers.append(buffer)  # keeps the page-locked registration alive
            del state
    host_after = host_rss_bytes()

    times: dict[str, list[float]] = {name: [] for name in adapters}
    params = {k: v for k, v in dit.state_dict().items() if is_audio_key(k)}
    probe = sorted(params)[-1]
    for _ in range(args.rounds):
        for name, state in adapters.items():
            synchronize(device)
            tick = time.perf_counter()
            apply_adapter_state(dit, state)
            synchronize(device)
            times[name].append(time.perf_counter() - tick)
            assert torch.equal(params[probe].cpu(), state[probe]), (
                f"{name}: the DiT does not hold the adapter"
            )

    adapter_bytes = {n: sum(t.numel() * t.element_size() for t in s.values()) for n, s in adapters.items()}
    dit_bytes = sum(p.numel() * p.element_size() for p in dit.parameters())
    report = {
        "preset": preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "pinned": pin,
        "adapter_tensors": len(shapes),
        "dit_params": sum(p.numel() for p in dit.parameters()),
        "dit_bytes": dit_bytes,
        "dit_build_s": round(build_s, 2),
        "adapters": {
            name: {
                "bytes": adapter_bytes[name],
                "swap_s_min": round(min(t), 4),
                "swap_s_median": round(statistics.median(t), 4),
                "gb_per_s": round(adapter_bytes[name] / min(t) / 1e9, 1),
            }
            for name, t in times.items()
        },
        "host_rss_bytes": host_rss_bytes(),
        "host_adapters_bytes": host_after - host_before,
    }
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        report["gpu_allocated_bytes"] = torch.cuda.memory_allocated(device)
        report["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        report["gpu_used_bytes"] = total - free
    sys.stdout.write(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
