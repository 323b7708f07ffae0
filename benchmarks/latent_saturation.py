"""Per-step internals of a training run, to see where a loss that rises comes from (issue 16).

  python benchmarks/latent_saturation.py --run runs/cifar48 --steps 48 --out /tmp/probe
  python benchmarks/latent_saturation.py --run runs/cifar48 --steps 48 --out /tmp/probe --set lr=0.75
  python benchmarks/latent_saturation.py --run runs/cifar48 --steps 135 --out /tmp/probe --fresh

Copies the run folder to --out and continues it from its last checkpoint (or, with --fresh, starts its recipe
from scratch) through `training.loop.run` itself, for --steps optimizer steps, printing one JSON line a step:
learning rate, loss, the share of latent pre-activations past |6| (`saturated`: the sigmoid's slope is then under
1% of its peak), their mean magnitude, the norm of the latent layer's input features, weight norms of the latent
layer and classifier, and gradient norms per kind of parameter. `--set NAME=VALUE` changes one setting of the
recorded recipe (TrainConfig), so a candidate fix is tried from the very same state.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import common  # noqa: F401  (puts the project on sys.path)
from common import machine


class _Done(Exception):
    """Raised from inside the loop once --steps steps are logged."""


def _setting(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    return name, json.loads(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training run's folder (train_config.json, checkpoint)")
    parser.add_argument("--out", required=True, help="where the probe's copy of the run goes (replaced)")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--fresh", action="store_true", help="start the recipe from scratch, not the checkpoint")
    parser.add_argument("--data", help="the training data (default: the path the run recorded)")
    parser.add_argument("--set", type=_setting, action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    import training.loop as loop
    from training.config import CHECKPOINT, CHECKPOINT_STATE, TRAIN_CONFIG, read_train_config, save_train_config

    source, out = Path(args.run), Path(args.out)
    started = read_train_config(source)
    if started is None:
        parser.error(f"--run: {source / TRAIN_CONFIG} is missing or unreadable")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out, ignore=shutil.ignore_patterns(CHECKPOINT, CHECKPOINT_STATE) if args.fresh else None)
    config = replace(started, out=str(out), resume=not args.fresh, tta=False, data=args.data or started.data,
                     **dict(args.set))
    save_train_config(config, out)  # the probe's copy changes settings on purpose: resuming must accept them
    print(f"machine: {machine()}; {args.run} {'from scratch' if args.fresh else 'from its checkpoint'}; "
          f"changed: {dict(args.set) or 'nothing'}", flush=True)

    seen: dict = {}
    hashing_net, hashing_loss, make_optimizer = loop.hashing_net, loop.hashing_loss, loop.make_optimizer

    def watched_model(*a, **k):
        model = hashing_net(*a, **k)

        def latent_hook(module, inputs, output):
            pre = output.detach().float()
            seen.update(saturated=loop.saturated_share(pre), pre=pre.abs().mean().item(),
                        features=inputs[0].detach().float().norm(dim=1).mean().item())
        model.latent.register_forward_hook(latent_hook)
        seen["model"] = model
        return model

    def watched_loss(*a, **k):
        loss = hashing_loss(*a, **k)
        seen["loss"] = loss.item()
        return loss

    def watched_optimizer(model, config, batch_size):
        optimizer = make_optimizer(model, config, batch_size)
        names = {id(p): n for n, p in model.named_parameters()}
        step = optimizer.step

        def kind(name: str) -> str:
            return name.split(".")[0] if name.startswith(("latent", "classifier", "auxiliary")) else \
                "norm_bias" if ".norm" in name else "backbone"

        def logged_step(*a, **k):
            squares: dict[str, float] = {}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        key = kind(names[id(p)])
                        squares[key] = squares.get(key, 0.0) + p.grad.float().pow(2).sum().item()
            result = step(*a, **k)
            seen["steps"] = seen.get("steps", 0) + 1
            model = seen["model"]
            print(json.dumps(dict(
                step=seen["steps"], lr=round(optimizer.param_groups[0]["lr"], 4), loss=round(seen["loss"], 4),
                saturated=round(seen["saturated"], 3), pre_activation=round(seen["pre"], 2),
                feature_norm=round(seen["features"], 1), latent_weight_norm=round(model.latent.weight.norm().item(), 2),
                classifier_weight_norm=round(model.classifier.weight.norm().item(), 2),
                **{f"grad_{k}": round(v ** 0.5, 3) for k, v in sorted(squares.items())})), flush=True)
            if seen["steps"] >= args.steps:
                raise _Done
            return result
        optimizer.step = logged_step
        return optimizer

    loop.hashing_net, loop.hashing_loss, loop.make_optimizer = watched_model, watched_loss, watched_optimizer
    begin = time.perf_counter()
    try:
        loop.run(config)
    except _Done:
        pass
    print(f"{seen.get('steps', 0)} steps in {time.perf_counter() - begin:.0f} s", flush=True)


if __name__ == "__main__":
    main()
