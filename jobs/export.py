"""Export a trained run's model to ONNX for edge deployment, verified on real images.

    python -m jobs.export --run runs/fashion-mnist-vgg
    python -m jobs.export --run s3://bucket/runs/fm --checkpoint checkpoints/epoch=12 \\
        --output s3://bucket/edge/fm --images 64 --atol 1e-4 --rtol 1e-4 --opset 18

Supports classifier (single-label) and multi-label runs; a metric-learning run is refused.
Writes <output>/model.onnx (input "pixels" float32 [batch, 3, s, s] NCHW RGB, normalized;
outputs "logits" and "probs": softmax, or sigmoid + the run's threshold for multi-label),
<output>/preprocess.json (decode, resize/crop, interpolation, mean/std, classes, outputs,
source checkpoint and its sha256, opset, versions) and, last and only when verification
passed, <output>/export.json (the numbers, tolerances, image ids and this command).
Re-running replaces them.

Verification: --images images of the run's dataset (test split, then val) through the
run's eval transform; PyTorch vs ONNX Runtime (CPU) at batch sizes other than the traced
one, |onnx - torch| <= atol + rtol * |torch| on logits and probs (default atol = rtol =
1e-4: fp32 on CPU differs by float32 rounding only, <= 3e-6 seen); and preprocess.json
applied in NumPy + Pillow alone must reproduce PyTorch's input (to 1e-5).

Exit status: 0 exported and verified; 1 verification failed (files and report under
<output>/failed, nothing committed) or storage failed; 2 bad input (flags, run dir,
checkpoint, dataset) or the model cannot be exported. Storage credentials come from the
environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AWS_ENDPOINT_URL, ...).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from raylens.export.onnx_export import (
    DEFAULT_ATOL,
    DEFAULT_OPSET,
    DEFAULT_RTOL,
    ExportError,
    ExportOptions,
    VerificationFailed,
    export_run,
    main_summary,
    plan_export,
)
from raylens.storage import Storage, StorageError

PROG = "python -m jobs.export"


def _fail(storage: Storage, err: BaseException, code: int) -> None:
    print(f"{PROG}: error: {storage.scrub(str(err))}", file=sys.stderr)
    raise SystemExit(code) from None


def parse_args(argv: list[str] | None) -> ExportOptions:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run", required=True, help="run dir written by jobs.finetune (path, s3://, gs://)"
    )
    parser.add_argument(
        "--checkpoint",
        help="checkpoint dir relative to the run dir (checkpoints/epoch=N); default: best.json's",
    )
    parser.add_argument("--output", help="output dir (path, s3://, gs://); default: <run>/export")
    parser.add_argument(
        "--images", type=int, default=32, help="real images to verify on (default: 32)"
    )
    parser.add_argument(
        "--atol", type=float, default=DEFAULT_ATOL, help=f"absolute tolerance ({DEFAULT_ATOL:g})"
    )
    parser.add_argument(
        "--rtol", type=float, default=DEFAULT_RTOL, help=f"relative tolerance ({DEFAULT_RTOL:g})"
    )
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})"
    )
    parser.add_argument(
        "--device", default="cpu", help="device of the PyTorch reference (cpu, cuda[:N])"
    )
    args = parser.parse_args(argv)
    command = shlex.join([*PROG.split(), *(sys.argv[1:] if argv is None else argv)])
    return ExportOptions(
        run=args.run,
        checkpoint=args.checkpoint,
        output=args.output,
        images=args.images,
        atol=args.atol,
        rtol=args.rtol,
        opset=args.opset,
        device=args.device,
        command=command,
    )


def main(argv: list[str] | None = None) -> dict:
    options = parse_args(argv)
    storage = Storage()
    try:  # flags, run dir, checkpoint, model and dataset are checked before any export
        plan = plan_export(options, storage)
    except StorageError as err:  # unreachable or refused storage: already scrubbed
        _fail(storage, err, 1)
    except (ValueError, FileNotFoundError) as err:  # ConfigError, UnknownBackbone included
        _fail(storage, err, 2)
    print(
        f"[export] {plan.source.checkpoint} ({plan.source.model.backbone}, {plan.task}, "
        f"{len(plan.source.classes)} classes) -> {plan.output}; verifying on "
        f"{len(plan.images)} images of {plan.dataset}"
    )
    try:
        report = export_run(plan, storage)
    except VerificationFailed as err:
        _fail(storage, err, 1)
    except ExportError as err:
        _fail(storage, err, 2)
    except StorageError as err:
        _fail(storage, err, 1)
    print(main_summary(report, plan.output))
    return report


if __name__ == "__main__":
    main()
