"""The demo's outputs besides ``results.json``: the report, the plots and the record of the machine."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def uniform_t_loss(logged: dict[str, float]) -> float:
    """Target loss as uniform t would weight it: the mean of the four per-quarter losses.

    Comparable across methods, unlike ``loss/target``, whose t distribution depends on psi.
    """
    quarters = [logged[f"loss_by_t/target_q{q}"] for q in range(1, 5) if f"loss_by_t/target_q{q}" in logged]
    return sum(quarters) / len(quarters)


def plot_curves(results: dict[str, dict[str, Any]], out: Path) -> None:
    """``out/curves.png``: FID per checkpoint and the target loss (uniform-t view) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fid, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        if "fid_curve" not in r:
            continue
        ax_fid.plot(
            [p["step"] for p in r["fid_curve"]], [p["fid"] for p in r["fid_curve"]], marker="o", label=name
        )
        ax_loss.plot([p["step"] for p in r["loss_curve"]], [p["loss"] for p in r["loss_curve"]], label=name)
    ax_fid.set(xlabel="step", ylabel="FID (digit-classifier features)", title="FID on held-out target digits")
    ax_loss.set(
        xlabel="step", ylabel="target loss (mean over quarters of t)", title="training loss, target stream"
    )
    for ax in (ax_fid, ax_loss):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def environment() -> dict[str, Any]:
    """Package versions and machine of this run: float results of CPU training are only bit-identical
    for the same versions and processor."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "cpu": cpu or "unknown",
        "threads": torch.get_num_threads(),
    }
    for package in (
        "torch",
        "diffusers",
        "accelerate",
        "peft",
        "transformers",
        "opencv-python-headless",
        "numpy",
        "scikit-learn",
    ):
        env[package] = metadata.version(package)
    return env


# what the reproduction study found on each test bed (the demo's ``source_data`` and ``process``), so that
# one demo run is not read as the answer
STUDY_FINDINGS: dict[tuple[str, str], str] = {
    ("digits", "ddpm"): (
        "One run is not a verdict: over 5 seeds of this transfer the study finds Diff-Tuning's difference from "
        "plain fine-tuning not significant at this guidance scale (1.5: -2.5 FID, 95% CI [-8.0, +3.0]) and "
        "significantly worse without guidance (+16.5 [+10.8, +22.3]); with each method at its own best guidance, "
        "no variant beats plain fine-tuning; see docs/reproduction.md, sections 9 to 12."
    ),
    ("photo_patches", "ddpm"): (
        "One run is not a verdict: over 5 seeds of this transfer from the photo source the study finds, at "
        "this guidance scale (1.5), Diff-Tuning significantly worse than plain fine-tuning (+68.1 FID, 95% CI "
        "[+44.9, +91.3]) and data-driven schedules significantly better (-22.0 [-33.3, -10.6]); see "
        "docs/reproduction.md, sections 11 to 13."
    ),
    ("digits", "flow"): (
        "One run is not a verdict: over 5 seeds of this transfer on the rectified-flow source, every method is "
        "best unguided, and there no variant beats plain fine-tuning (Diff-Tuning +1.3 FID, 95% CI [-0.8, +3.3]; "
        "ψ/ξ ported by log-SNR significantly worse, +6.0 [+3.4, +8.6]), although handing the last 10% of the "
        "steps to the source costs nothing here (-2% [-6%, +3%]); see docs/reproduction.md, section 14."
    ),
    ("photo_patches", "flow"): (
        "One run is not a verdict: over 5 seeds of this transfer from the rectified-flow photo source, every "
        "method but the log-SNR port is best unguided, and there no variant beats plain fine-tuning "
        "(Diff-Tuning +2.1 FID, 95% CI [-3.4, +7.5]; retention only significantly worse, +4.5 [+1.3, +7.7]), "
        "although handing the last 10% of the steps to the source costs nothing here (-0% [-4%, +4%]); see "
        "docs/reproduction.md, section 14.4."
    ),
    ("photo_patches", "edm"): (
        "One run is not a verdict: over 5 seeds of this transfer from the EDM photo source, every method is "
        "best unguided, and there the offsets port (the EDM default) beats plain fine-tuning significantly "
        "(-8.2 FID, 95% CI [-14.0, -2.3]) and the paper's index port (-6.2 [-10.3, -2.0]), which is itself "
        "within noise of plain (-2.0 [-6.0, +2.0]); see docs/reproduction.md, section 14.6."
    ),
    ("digits", "edm"): (
        "One run is not a verdict: over 5 seeds of this transfer on the EDM source, every method is best "
        "unguided, and there no variant beats plain fine-tuning (the offsets port, the EDM default, -0.6 FID, "
        "95% CI [-5.4, +4.2]; the paper's index port +1.2 [-1.3, +3.7]; ψ/ξ ported by log-SNR significantly "
        "worse, +3.5 [+1.1, +5.8]), although handing the last 30% of the steps to the source costs nothing "
        "here (-1% [-11%, +9%]); see docs/reproduction.md, sections 14 and 14.6."
    ),
}


def study_finding(source_data: str, process: str) -> str:
    """The study's verdict on one test bed, in one sentence (or that it has not been studied)."""
    return STUDY_FINDINGS.get(
        (source_data, process),
        f"One run is not a verdict, and this test bed ({source_data} source, {process} process) has not been "
        "studied over seeds yet; see docs/reproduction.md for the test beds that have.",
    )


def report_markdown(
    results: dict[str, dict[str, Any]],
    description: str,
    seconds: float,
    source_data: str = "digits",
    process: str = "ddpm",
) -> str:
    """The demo's ``report.md``: a table of FIDs per method, the change vs plain fine-tuning, the study's
    finding on the test bed of ``source_data`` and ``process``, the plots."""
    lines = [
        "# difftune demo: plain fine-tuning vs Diff-Tuning on handwritten digits",
        "",
        description + ".",
        "",
        "| method | FID (final, EMA) | best FID over checkpoints |",
        "|---|---|---|",
    ]
    for name, r in results.items():
        best = min((p["fid"] for p in r.get("fid_curve", [])), default=r["fid"])
        lines.append(f"| {name} | {r['fid']:.2f} | {best:.2f} |")
    if "plain" in results and "diff-tuning" in results:
        change = 100.0 * (results["diff-tuning"]["fid"] - results["plain"]["fid"]) / results["plain"]["fid"]
        lines += [
            "",
            f"Diff-Tuning vs plain fine-tuning: {change:+.1f}% FID (negative = Diff-Tuning better).",
            "",
            study_finding(source_data, process),
        ]
    lines += ["", f"Total time: {seconds:.0f} s. Lower FID is better.", "", "![curves](curves.png)", ""]
    lines += [f"![{name}](samples_{name}.png)" for name, r in results.items() if "fid_curve" in r]
    return "\n".join(lines) + "\n"
