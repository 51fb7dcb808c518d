"""The routing sub-commands of ``extproc``: ``route --explain``, ``router train``, ``router eval``.

    extproc route --explain "Prove that sqrt(2) is irrational"      # the decision chain, nothing sent
    extproc route --explain "hi" --model large --header x-api-key:sk-... --json
    extproc router train LABELLED.jsonl --out router.json --strong-share 0.4 [--holdout 0.25]
    extproc router eval  LABELLED.jsonl --model router.json [--holdout 0.25]
"""

from __future__ import annotations

import argparse
import json
import sys

from extproc.framework.config import load_config


def cmd_route(args) -> int:
    """Explain the routing decision for a request (runs the gateway's plugin chain; sends nothing)."""
    import asyncio

    from extproc.commands.route_explain import build_body, explain

    if args.explain is None and args.body is None:
        print("extproc route: give --explain PROMPT (or --body JSON)", file=sys.stderr)
        return 2
    try:
        body = build_body(args.explain, model=args.model, body_json=args.body, system=args.system,
                          max_tokens=args.max_tokens, stream=args.stream)
    except ValueError as err:
        print(f"extproc route: bad request body: {err}", file=sys.stderr)
        return 2
    headers = {}
    for item in args.header or []:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            print(f"extproc route: --header wants NAME:VALUE, got {item!r}", file=sys.stderr)
            return 2
        headers[name.strip().lower()] = value.strip()
    config = load_config(args.config)
    (result,) = asyncio.run(explain(config, [body], headers=headers, shared_state=args.shared_state))
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.format())
    return 0


def _prices(config_path):
    config = load_config(config_path)
    return {name: tier.price for name, tier in config.tiers.items()}


def cmd_router_train(args) -> int:
    """Train the learned router on labelled prompts and calibrate it to a strong-tier share."""
    from extproc_plugins.routing import router_training
    from extproc_plugins.routing.router_model import RouterDataError

    try:
        result = router_training.train(args.data, prices=_prices(args.config), holdout=args.holdout,
                                       strong_share=args.strong_share, medium_share=args.medium_share,
                                       l2=args.l2, folds=args.folds, seed=args.seed,
                                       completion_tokens=args.completion_tokens,
                                       length_feature=args.length_feature)
    except (RouterDataError, ValueError) as err:
        print(f"extproc router train: {err}", file=sys.stderr)
        return 2
    result.model.save(args.out)
    meta = result.model.meta
    print(f"trained on {result.n_train} prompts ({', '.join(f'{k} {v}' for k, v in meta['per_tier'].items())}); "
          f"{result.n_held_out} held out; embedding {meta['embed_seconds']}s, fit {meta['fit_seconds']}s")
    print("thresholds: " + ", ".join(f"{k} {v:.3f}" for k, v in result.model.thresholds.items()))
    print("out-of-fold estimate (each prompt judged by a model that did not see it):")
    print("  " + result.oof_report.format().replace("\n", "\n  "))
    print(f"wrote {args.out}")
    return 0


def cmd_router_eval(args) -> int:
    """Judge a trained router on labelled prompts: accuracy, confusion matrix, cost vs all-large."""
    from extproc_plugins.routing import router_training
    from extproc_plugins.routing.router_model import RouterDataError, RouterModel, default_model_path

    try:
        model = RouterModel.load(args.model or default_model_path())
        report = router_training.evaluate(args.data, model, prices=_prices(args.config), holdout=args.holdout,
                                          completion_tokens=args.completion_tokens)
    except (RouterDataError, ValueError) as err:
        print(f"extproc router eval: {err}", file=sys.stderr)
        return 2
    print(f"model: {args.model or default_model_path()}  thresholds: "
          + ", ".join(f"{k} {v:.3f}" for k, v in model.thresholds.items()))
    if args.holdout > 0:
        print(f"held-out part only ({args.holdout:.0%} of the file by prompt hash)")
    print(report.format())
    return 0


def add_route_parsers(sub) -> None:
    """Add ``route`` and ``router`` to the ``extproc`` sub-command parser."""
    route = sub.add_parser("route", help=cmd_route.__doc__)
    route.add_argument("--explain", metavar="PROMPT", help="the user message to route")
    route.add_argument("--body", metavar="JSON", help="a whole chat completion request instead")
    route.add_argument("--model", default="auto", help="the request's model (default: auto)")
    route.add_argument("--system", help="a system message before the prompt")
    route.add_argument("--max-tokens", type=int)
    route.add_argument("--stream", action="store_true")
    route.add_argument("--header", action="append", metavar="NAME:VALUE",
                       help="a request header (authentication, tenant...); repeatable")
    route.add_argument("--config", help="gateway configuration (default: $EXTPROC_CONFIG or the embedded one)")
    route.add_argument("--shared-state", action="store_true",
                       help="use the configured Redis (default: an isolated in-memory store)")
    route.add_argument("--json", action="store_true", help="print the explanation as JSON")
    route.set_defaults(func=cmd_route)

    router = sub.add_parser("router", help="train and evaluate the learned router")
    rsub = router.add_subparsers(dest="router_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("data", metavar="LABELLED.jsonl", help='JSON Lines of {"prompt": ..., "tier": ...}')
    common.add_argument("--holdout", type=float, default=0.0, metavar="F",
                        help="fraction set aside by prompt hash: train skips it, eval judges only it")
    common.add_argument("--config", help="gateway configuration whose tier prices cost the routing")
    common.add_argument("--completion-tokens", type=int, default=256,
                        help="completion length assumed per request when costing (default 256)")
    train = rsub.add_parser("train", parents=[common], help=cmd_router_train.__doc__)
    train.add_argument("--out", default="router.json", help="where to write the model (default router.json)")
    train.add_argument("--strong-share", type=float, default=0.4,
                       help="share of traffic calibrated to reach the strongest tier (default 0.4)")
    train.add_argument("--medium-share", type=float, default=None,
                       help="share calibrated to reach the middle tier (default: threshold 0.5)")
    train.add_argument("--l2", type=float, default=1e-2, help="L2 penalty (default 0.01)")
    train.add_argument("--folds", type=int, default=5, help="cross-validation folds for calibration")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--length-feature", action="store_true",
                       help="also read the prompt's log token count (off: the tier follows the task, "
                            "not how much text is attached; context windows are route_rules' job)")
    train.set_defaults(func=cmd_router_train)
    ev = rsub.add_parser("eval", parents=[common], help=cmd_router_eval.__doc__)
    ev.add_argument("--model", help="trained model (default: the one shipped with the package)")
    ev.set_defaults(func=cmd_router_eval)
