"""Export a trained run's model to ONNX for edge deployment, verified on real images.

    python -m jobs.export export.run=runs/fashion-mnist-vgg
    python -m jobs.export export.run=s3://bucket/runs/fm export.checkpoint=checkpoints/epoch=12 \\
        export.output=s3://bucket/edge/fm export.images=64 export.atol=1e-4 export.opset=18

Supports classifier (single-label) and multi-label runs; a metric-learning run is refused.
Writes <output>/model.onnx (input "pixels" float32 [batch, 3, s, s] NCHW RGB, normalized;
outputs "logits" and "probs": softmax, or sigmoid + the run's threshold for multi-label),
<output>/preprocess.json (decode, resize/crop, interpolation, mean/std, classes, outputs,
source checkpoint and its sha256, opset, versions) and, last and only when verification
passed, <output>/export.json (the numbers, tolerances, image ids and this command).
Re-running replaces them.

Verification: export.images images of the run's dataset (test split, then val) through
the run's eval transform; PyTorch vs ONNX Runtime (CPU) at batch sizes other than the
traced one, |onnx - torch| <= atol + rtol * |torch| on logits and probs (default atol =
rtol = 1e-4: fp32 on CPU differs by float32 rounding only, <= 3e-6 seen); and
preprocess.json applied in NumPy + Pillow alone must reproduce PyTorch's input (to 1e-5).

Exit status: 0 exported and verified; 1 verification failed (files and report under
<output>/failed, nothing committed) or storage failed; 2 bad input (config keys, run dir,
checkpoint, dataset) or the model cannot be exported. Storage credentials come from
storage.* or the environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AWS_ENDPOINT_URL, ...).
"""

from __future__ import annotations

import shlex
import sys

from raylens.cli import run_job
from raylens.schema import RunConfig
from raylens.storage import Storage

PROG = "python -m jobs.export"


def main(argv: list[str] | None = None) -> dict:
    command = shlex.join([*PROG.split(), *(sys.argv[1:] if argv is None else argv)])
    return run_job(
        argv,
        prog=PROG,
        description=__doc__,
        sections=["storage", "export"],
        main=lambda cfg, _flags: _export(cfg, command),
        exit_codes=_exit_codes,
    )


def _exit_codes() -> dict:
    from raylens.export.onnx_export import ExportError, VerificationFailed

    return {VerificationFailed: 1, ExportError: 2}  # parity failed; torch.onnx failed


def _export(cfg: RunConfig, command: str) -> dict:
    from raylens.export.onnx_export import export_run, main_summary, plan_export

    storage = Storage(cfg.storage)
    # keys, run dir, checkpoint, model and dataset are checked before any export
    plan = plan_export(cfg.export, storage, command=command)
    print(
        f"[export] {plan.source.checkpoint} ({plan.source.model.backbone}, {plan.task}, "
        f"{len(plan.source.classes)} classes) -> {plan.output}; verifying on "
        f"{len(plan.images)} images of {plan.dataset}"
    )
    report = export_run(plan, storage)
    print(main_summary(report, plan.output))
    return report


if __name__ == "__main__":
    main()
