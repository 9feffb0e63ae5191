"""`python -m resnet_fused {demo,profile,report}`: the command-line tools (see README)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from .cli import demo, profile, report

    parser = argparse.ArgumentParser(prog="python -m resnet_fused",
                                     description="Fused conv+BN+ReLU kernels for ResNets: demo, profile, report.")
    subparsers = parser.add_subparsers(dest="command", metavar="{demo,profile,report}")
    subparsers.required = True
    for module in (demo, profile, report):
        module.add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
