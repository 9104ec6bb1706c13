"""Distil a teacher into a student with Ray Train: ``jobs.finetune`` with ``task.name=distill``
(the fine-tune loop, trained against the teacher's targets, validated and tested on hard
labels).

    python -m jobs.teacher_logits --config jobs/configs/distill_fashion_mnist.yaml  # once
    python -m jobs.distill --config jobs/configs/distill_fashion_mnist.yaml [key=value ...]
    python -m jobs.distill --config ... distill.mode=online    # teacher forward every step

Stored mode replays, per student epoch e, the teacher's augmentation of stored epoch
e % distill.aug_epochs, so the student sees exactly the pixels the teacher saw.
"""

from __future__ import annotations

from jobs.finetune import run

PROG = "python -m jobs.distill"


def main(argv: list[str] | None = None) -> dict:
    return run(argv, prog=PROG, description=__doc__, distill=True)


if __name__ == "__main__":
    main()
