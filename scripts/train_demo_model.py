"""Train the demo FILA on the synthetic reading task, on CPU, from scratch.

    python scripts/train_demo_model.py --out build/demo-model --minutes 30

writes a checkpoint folder (``config.json``, ``model.safetensors``, tokenizer files) that every
``fila`` command loads, plus ``metrics.json``: held-out exact match overall and on the subset whose
text straddles a tile boundary (scored after saving, through the PyTorch reference pipeline on the
saved checkpoint), steps, wall time, seed and the command. ``--no-convnext`` trains the plain
LLaVA-NeXT ablation (no ConvNeXt branch, no CVFM) with everything else equal. The shipped demo
model (``fila_export/demo/checkpoint``, see its README.md) was made with

    python scripts/train_demo_model.py --out fila_export/demo/checkpoint --force --minutes 28 \
        --threads 1 --head-weight 2 --lr 2e-3 --eval-every 1000 --eval-samples 100 --no-progress
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--minutes", type=float, help="wall-time budget, evals and saving included")
    p.add_argument("--steps", type=int, help="optimizer steps (default: fit to --minutes)")
    p.add_argument("--no-convnext", action="store_true", help="ablation: plain LLaVA-NeXT")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out evals")
    p.add_argument(
        "--eval-samples", type=int, default=100, help="held-out samples per periodic eval"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument(
        "--aux-share", type=float, default=0.5, help="chats that also ask the box colour"
    )
    p.add_argument(
        "--head-weight",
        type=float,
        default=2.0,
        help="weight of the auxiliary per-token reading head (training only; 0: none)",
    )
    p.add_argument(
        "--plain-start",
        type=float,
        default=0.0,
        help="share of plain black-on-white training images at the start (curriculum)",
    )
    p.add_argument(
        "--plain-until", type=float, default=0.3, help="fraction of the steps the curriculum lasts"
    )
    p.add_argument("--heldout", type=int, default=200, help="held-out samples for the final eval")
    p.add_argument("--heldout-dir", help="also write the held-out set (PNGs + questions.jsonl)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    if args.steps is None and args.minutes is None:
        p.error("give --minutes (a time budget) and/or --steps")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)

    from fila_export.demo import data
    from fila_export.demo.model import demo_config, init_demo_weights
    from fila_export.demo.train import TrainSettings, demo_prompts, train
    from fila_export.model.checkpoint import save_checkpoint
    from fila_export.model.fila import FilaForConditionalGeneration
    from fila_export.model.reference import ReferencePipeline
    from fila_export.model.tokenizer import write_tokenizer

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"{out} is not empty; pass --force to overwrite", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    config = demo_config(convnext=not args.no_convnext)
    torch.manual_seed(args.seed)
    model = FilaForConditionalGeneration(config)
    init_demo_weights(model, args.seed)
    prompts = demo_prompts(config.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"demo {'FILA' if config.has_convnext else 'LLaVA-NeXT (no ConvNeXt)'}: "
        f"{n_params / 1e6:.2f} M parameters, {args.threads} thread(s), seed {args.seed}"
    )
    minutes = args.minutes
    if minutes is not None:
        # Start-up so far and ~15 s for saving; training reserves the final held-out pass.
        minutes = max(0.5, minutes - (time.perf_counter() - t_start) / 60 - 0.25)
    settings = TrainSettings(
        steps=args.steps,
        minutes=minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        aux_share=args.aux_share,
        head_weight=args.head_weight,
        plain_start=args.plain_start,
        plain_until=args.plain_until,
        seed=args.seed,
        eval_every=args.eval_every,
        eval_samples=args.eval_samples,
        heldout=args.heldout,
        progress=not args.no_progress,
        log=lambda msg: print(msg, flush=True),
    )
    result = train(model, prompts, settings)

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("tokenizer.json", "tokenizer_config.json"):
        (out / stale).unlink(missing_ok=True)
    # The tokenizer first, from the vocab the model was trained with; save_checkpoint keeps it.
    write_tokenizer(out, config.vocab_size, config.max_position_embeddings)
    save_checkpoint(model.eval(), out)

    heldout = data.heldout_set(args.heldout)
    if args.heldout_dir:
        data.write_question_set(heldout, args.heldout_dir)
    t_eval = time.perf_counter()
    pipe = ReferencePipeline.from_checkpoint(out)
    preds = [pipe.generate([s.image], s.question, max_new_tokens=10).text.strip() for s in heldout]
    from fila_export.demo.train import score

    final = score(heldout, preds)
    wall = time.perf_counter() - t_start
    weights = sorted(out.glob("*.safetensors"))
    metrics = {
        "model": "fila" if config.has_convnext else "llava-next (--no-convnext)",
        **final,
        "steps": result["steps"],
        "planned_steps": result["planned_steps"],
        "batch_size": args.batch_size,
        "lr": args.lr,
        "aux_share": args.aux_share,
        "head_weight": args.head_weight,
        "plain_start": args.plain_start,
        "final_train_loss": result["final_loss"],
        "wall_time_s": round(wall, 1),
        "train_wall_s": result["train_wall_s"],
        "final_eval_wall_s": round(time.perf_counter() - t_eval, 1),
        "seed": args.seed,
        "threads": args.threads,
        "parameters": n_params,
        "checkpoint_bytes": sum(p.stat().st_size for p in weights),
        "heldout": {
            "seed": data.HELDOUT_SEED,
            "size": len(heldout),
            "boundary_share_forced": data.HELDOUT_BOUNDARY_SHARE,
        },
        "command": shlex.join([sys.executable, *sys.argv]),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "history": result["history"],
        "errors": [
            {"answer": s.answer, "prediction": p, "boundary": s.boundary}
            for s, p in zip(heldout, preds, strict=True)
            if p != s.answer
        ][:50],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(
        f"held-out exact match {final['accuracy']:.1%} ({final['n']} samples), boundary subset "
        f"{final['boundary_accuracy']:.1%} ({final['n_boundary']}), {result['steps']} steps, "
        f"{wall / 60:.1f} min -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
