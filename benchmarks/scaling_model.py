"""Scaling on paper: expected throughput and scaling efficiency of one fold on 1-64 GPUs.

Reads the measured model costs (parameters, multiply-accumulates per image, batch size)
and CPU numbers from `bench_horovod.json`, and the input side's images/s per CPU core from
`bench_feeding.json` (augmentation in the model, the default; the faster of the shard encodings
it measured, raw or JPEG, both named in the table) or else `bench_pipeline.json`
(augmentation in tf.data, 1 parallel call) when present, applies a stated GPU and network model, and prints a Markdown table per
configuration; writes `scaling_model.json`. It is a paper model for planning, not a
measurement: every assumption is a flag, printed with the result. See
benchmarks/README.md, "Scaling on paper".

    python benchmarks/scaling_model.py                           # from benchmarks/results/
    python benchmarks/scaling_model.py --gpu-efficiency 0.5 --batch 128
    python benchmarks/scaling_model.py --results-dir /tmp/r --out-dir /tmp/r

Model, per step of one Horovod rank (one GPU), N ranks, per-GPU batch B:

    t_compute = t_fixed + B * 6 * MACs / F_eff           (forward 2*MACs FLOPs, backward ~2x forward)
    t_allreduce(N) = 2(N-1)/N * S / BW + 2(N-1) * alpha + t_horovod        (ring; N > 1)
    t_step = t_compute + t_allreduce        (our path does not overlap: the allreduce runs in
                                             optimizer.apply(), after the whole backward pass)
    efficiency = t_compute / t_step,   throughput = N * B / t_step

S = trainable parameters x 4 bytes (float32 gradients, also under mixed precision). With 8
GPUs per node and M = N/8 nodes the allreduce is hierarchical: 2*7/8*S over NVLink inside the
node, then 2(M-1)/M*S over the node's NIC.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import DEFAULT_RESULTS, Report, base_parser, fmt, main_guard

GPUS = (1, 2, 4, 8, 16, 32, 64)
# Published reference: ResNet-50 v1.5 training on 1x A100 40GB, TensorFlow, batch 256,
# mixed precision + XLA: 2,375 img/s; TF32 + XLA: 909 img/s (NVIDIA DeepLearningExamples,
# TensorFlow/Classification/ConvNets/resnet50v1.5/README.md, "Training performance: NVIDIA DGX A100").
RESNET50_MACS = 4.1e9  # multiply-accumulates per 224x224 image, forward (ResNet-50 v1.5)
RESNET50_IMG_S = {"mixed": 2375.0, "tf32": 909.0}
# Training images per worker-group epoch (4 of 5 folds): quick-cpu (HAM10000), full (HAM10000 + ISIC 2017).
TRAIN_IMAGES = {"quick-cpu.yaml": 10015 * 4 // 5, "full.yaml": (10015 + 2150) * 4 // 5}


def parse_args(argv: list[str] | None = None) -> Any:
    p = base_parser(__doc__)
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS, help="where bench_horovod.json is read")
    p.add_argument("--precision", choices=sorted(RESNET50_IMG_S), default="mixed",
                   help="GPU precision of the reference figure. Defaults to mixed")
    p.add_argument("--gpu-efficiency", type=float, default=0.25,
                   help="our small CNN's achieved FLOP/s as a fraction of ResNet-50's (no XLA, few channels). "
                        "Defaults to 0.25")
    p.add_argument("--step-overhead-ms", type=float, default=2.0,
                   help="fixed framework/kernel-launch time per step on a GPU. Defaults to 2.0")
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch (default: the config's)")
    p.add_argument("--nvlink-gb-s", type=float, default=200.0,
                   help="achieved allreduce bus bandwidth on NVLink/NVSwitch, GB/s (A100: 300 GB/s per direction). "
                        "Defaults to 200")
    p.add_argument("--eth-efficiency", type=float, default=0.8, help="achieved fraction of Ethernet line rate. Defaults to 0.8")
    p.add_argument("--nvlink-latency-us", type=float, default=10.0, help="per ring step on NVLink. Defaults to 10")
    p.add_argument("--eth-latency-us", type=float, default=50.0, help="per ring step over TCP/Ethernet. Defaults to 50")
    p.add_argument("--horovod-ms", type=float, default=1.0,
                   help="Horovod coordination per step (HOROVOD_CYCLE_TIME, 1 ms by default since 0.21). Defaults to 1")
    return p.parse_args(argv)


def scenarios(a: Any) -> dict[str, dict[str, Any]]:
    eth = lambda gbit: gbit / 8 * a.eth_efficiency  # noqa: E731  GB/s
    nvl = {"bw": a.nvlink_gb_s, "alpha": a.nvlink_latency_us * 1e-6}
    return {
        "NVLink (all GPUs on one NVSwitch fabric; >8 is an idealised bound)": {"flat": nvl},
        "8 GPUs/node on NVLink, nodes on 100 GbE": {"node": nvl, "net": {"bw": eth(100), "alpha": a.eth_latency_us * 1e-6}},
        "8 GPUs/node on NVLink, nodes on 25 GbE": {"node": nvl, "net": {"bw": eth(25), "alpha": a.eth_latency_us * 1e-6}},
        "1 GPU/node, 100 GbE": {"flat": {"bw": eth(100), "alpha": a.eth_latency_us * 1e-6}},
        "1 GPU/node, 25 GbE": {"flat": {"bw": eth(25), "alpha": a.eth_latency_us * 1e-6}},
    }


def allreduce_s(n: int, nbytes: float, sc: dict[str, Any], horovod_s: float) -> float:
    """Ring (or 2-level hierarchical) allreduce time of `nbytes` over `n` ranks."""
    if n == 1:
        return 0.0
    if "flat" in sc:
        link = sc["flat"]
        return 2 * (n - 1) / n * nbytes / (link["bw"] * 1e9) + 2 * (n - 1) * link["alpha"] + horovod_s
    node, net = sc["node"], sc["net"]
    local = min(n, 8)
    m = math.ceil(n / 8)
    t = 2 * (local - 1) / local * nbytes / (node["bw"] * 1e9) + 2 * (local - 1) * node["alpha"]
    if m > 1:
        t += 2 * (m - 1) / m * nbytes / (net["bw"] * 1e9) + 2 * (m - 1) * net["alpha"]
    return t + horovod_s


def pipeline_rate(size: int, feeding: dict[str, Any] | None, pipeline: dict[str, Any] | None) -> tuple[float | None, str]:
    """Input-side images/s per CPU core at `size` px, and where it comes from."""
    if feeding and str(size) in feeding["results"]["sizes"]:
        # Augmentation in the model, from the faster shard encoding: a GPU node is set up with it (raw in the GPU
        # configs); the other is named beside it. Files from before raw shards hold JPEG alone, as "model".
        inputs = feeding["results"]["sizes"][str(size)]["input"]
        rates = {label: inputs[key]["per_core_images_per_s"] for key, label in
                 (("raw_model", "raw shards"), ("model", "JPEG shards")) if key in inputs}
        best = max(rates, key=rates.get)
        others = "; ".join(f"{label}: {rate:,.0f}" for label, rate in rates.items() if label != best)
        return rates[best], (f"bench_feeding.json: {best}, augmentation in the model, per core of CPU time"
                             + (f" ({others})" if others else ""))
    if pipeline and str(size) in pipeline["results"]["sizes"]:
        p1 = pipeline["results"]["sizes"][str(size)]["pipeline"].get("p1")
        if p1:
            return p1["ours"]["images_per_s"], "bench_pipeline.json: augmentation in tf.data, 1 parallel call"
    return None, ""


def model_one(name: str, h: dict[str, Any], pipeline_per_core: float | None, a: Any,
              pipeline_source: str = "") -> dict[str, Any]:
    costs = h["costs"]
    batch = a.batch or h["batch_per_rank"]
    macs = costs["forward_macs_per_image"]
    nbytes = costs["gradient_bytes"]
    f_ref = RESNET50_IMG_S[a.precision] * 6 * RESNET50_MACS  # achieved FLOP/s of the reference
    f_eff = a.gpu_efficiency * f_ref
    t_compute = a.step_overhead_ms / 1000 + batch * 6 * macs / f_eff
    gpu_img_s = batch / t_compute
    cpu_step_s = h["step_ms"]["ours_1x1"] / 1000
    cpu_img_s = h["batch_per_rank"] / cpu_step_s
    train_images = TRAIN_IMAGES.get(h["config"], 8000)
    out: dict[str, Any] = {
        "config": h["config"], "image_size": h.get("image_size"), "batch_per_gpu": batch, "forward_macs_per_image": macs,
        "gradient_bytes": nbytes, "gpu_effective_tflop_s": f_eff / 1e12, "t_compute_ms": 1000 * t_compute,
        "gpu_images_per_s": gpu_img_s, "cpu_1_thread_images_per_s": cpu_img_s,
        "gpu_over_cpu_thread": gpu_img_s / cpu_img_s,
        "pipeline_images_per_s_per_core": pipeline_per_core, "pipeline_source": pipeline_source,
        "pipeline_cores_per_gpu": gpu_img_s / pipeline_per_core if pipeline_per_core else None,
        "steps_per_epoch": {n: math.ceil(train_images / (n * batch)) for n in GPUS},
        "scenarios": {},
    }
    for sc_name, sc in scenarios(a).items():
        rows = {}
        for n in GPUS:
            t_ar = allreduce_s(n, nbytes, sc, a.horovod_ms / 1000)
            t_step = t_compute + t_ar
            rows[n] = {"allreduce_ms": 1000 * t_ar, "step_ms": 1000 * t_step, "efficiency": t_compute / t_step,
                       "images_per_s": n * batch / t_step,
                       "efficiency_if_overlapped": t_compute / max(t_compute, t_ar) if n > 1 else 1.0,
                       "epoch_s": out["steps_per_epoch"][n] * t_step}
        out["scenarios"][sc_name] = rows
    # Sanity row: CPU workers (1 core each, as measured here) over 25 GbE.
    cpu_sc = {"flat": {"bw": 25 / 8 * a.eth_efficiency, "alpha": a.eth_latency_us * 1e-6}}
    out["cpu_workers_25gbe"] = {n: cpu_step_s / (cpu_step_s + allreduce_s(n, nbytes, cpu_sc, a.horovod_ms / 1000))
                                for n in GPUS}
    return out


def markdown(m: dict[str, Any]) -> str:
    head = "| interconnect | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in GPUS) + " |"
    lines = [f"**{m['config']} ({m['image_size']} px), batch {m['batch_per_gpu']}/GPU, "
             f"{m['gradient_bytes'] / 1e6:.2f} MB of gradients, {m['forward_macs_per_image'] / 1e9:.2f} GMAC/image**: "
             f"one GPU step {m['t_compute_ms']:.1f} ms = {fmt(m['gpu_images_per_s'])} img/s "
             f"({m['gpu_over_cpu_thread']:.0f}x one CPU thread here)", "",
             "Scaling efficiency (throughput in img/s), no compute/communication overlap:", "", head,
             "|---|" + "---|" * len(GPUS)]
    for sc_name, rows in m["scenarios"].items():
        cells = [f"{100 * rows[n]['efficiency']:.0f}% ({fmt(rows[n]['images_per_s'])})" for n in GPUS]
        lines.append(f"| {sc_name} | " + " | ".join(cells) + " |")
    lines.append("| CPU workers as measured here (1 core each), 25 GbE | "
                 + " | ".join(f"{100 * m['cpu_workers_25gbe'][n]:.0f}%" for n in GPUS) + " |")
    lines.append("| training steps per epoch (one fold) | "
                 + " | ".join(str(m["steps_per_epoch"][n]) for n in GPUS) + " |")
    if m["pipeline_cores_per_gpu"]:
        lines.append("")
        lines.append(f"Input pipeline: {m['pipeline_images_per_s_per_core']:.0f} img/s per CPU core (measured: "
                     f"{m.get('pipeline_source') or 'bench_pipeline.json'}) -> about "
                     f"{m['pipeline_cores_per_gpu']:.1f} CPU cores per GPU to keep it fed.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    src = a.results_dir / "bench_horovod.json"
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found: run benchmarks/bench_horovod.py (or run_all.py) first")
    hjson = json.loads(src.read_text())
    pjson_path = a.results_dir / "bench_pipeline.json"
    pjson = json.loads(pjson_path.read_text()) if pjson_path.is_file() else None
    fjson_path = a.results_dir / "bench_feeding.json"
    fjson = json.loads(fjson_path.read_text()) if fjson_path.is_file() else None
    assumptions = {k: v for k, v in vars(a).items() if k not in ("out_dir", "work_dir", "results_dir", "smoke", "repeats")}
    report = Report("scaling_model", bool(hjson.get("smoke")), {"source": str(src), "assumptions": assumptions})
    models = {}
    for key, h in hjson["results"].items():
        size = int(key.rstrip("px"))
        h = {**h, "image_size": size}
        per_core, source = pipeline_rate(size, fjson, pjson)
        m = model_one(key, h, per_core, a, source)
        models[key] = m
        print(markdown(m) + "\n")
        for sc_name in ("8 GPUs/node on NVLink, nodes on 100 GbE", "1 GPU/node, 25 GbE"):
            for n in (8, 64):
                r = m["scenarios"][sc_name][n]
                report.row(f"{key}: {n} GPUs, {sc_name}", r["images_per_s"], n * m["gpu_images_per_s"], "img/s",
                           ratio_label="scaling efficiency")
        if m["pipeline_cores_per_gpu"]:
            report.row(f"{key}: CPU cores per GPU for the input pipeline", m["pipeline_cores_per_gpu"], None, "cores")
    report.results = {"models": models, "markdown": {k: markdown(m) for k, m in models.items()}}
    report.notes.append("paper model from measured model sizes and stated GPU/network assumptions (see params)")
    report.write(a.out_dir)


if __name__ == "__main__":
    sys.exit(main_guard(main))
