"""`quire config`: the app's settings (settings.json, app/settings.py), which the
window, `quire ask` and `quire serve` all read.

    quire config                     every setting and its value
    quire config KEY                 one value
    quire config KEY VALUE           set it (checked as the Settings dialog checks it)
    quire config KEY --reset         back to the default
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, fields, replace

from app.settings import DEVICES, PRECISIONS, THEMES, AppSettings, load_settings, save_settings, settings_path

SECRET = ("reader_api_key",)  # shown as set/unset, never printed
CHOICES = {"device": DEVICES, "precision": PRECISIONS, "theme": THEMES}


def _shown(key: str, value: object) -> str:
    if key in SECRET:
        return "(set)" if value else "(not set)"
    return "" if value == "" else str(value).lower() if isinstance(value, bool) else str(value)


def _parse(key: str, text: str) -> object:
    if key in CHOICES and text not in CHOICES[key]:
        raise ValueError(f"one of {', '.join(CHOICES[key])}")
    kind = type(getattr(AppSettings(), key))
    if kind is bool:
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "on", "off", "yes", "no", "1", "0"):
            raise ValueError(f"{key} is on or off (true/false)")
        return lowered in ("true", "on", "yes", "1")
    return kind(text)


def cmd_config(args: argparse.Namespace) -> int:
    settings = load_settings()
    values = asdict(settings)
    if args.key is None:
        width = max(len(key) for key in values)
        for key, value in values.items():
            print(f"{key:<{width}}  {_shown(key, value)}")
        print(f"({settings_path()})", file=sys.stderr)
        return 0
    if args.key not in values:
        print(f"quire: error: no setting '{args.key}' (settings: {', '.join(values)})", file=sys.stderr)
        return 1
    if args.value is None and not args.reset:
        print(_shown(args.key, values[args.key]))
        return 0
    try:
        new = getattr(AppSettings(), args.key) if args.reset else _parse(args.key, args.value)
        changed = replace(settings, **{args.key: new})  # AppSettings checks its values
    except (TypeError, ValueError) as error:
        print(f"quire: error: {args.key}: {error}", file=sys.stderr)
        return 1
    save_settings(changed)
    print(f"{args.key} = {_shown(args.key, getattr(changed, args.key))}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    config = subparsers.add_parser("config", help="show or set the app's settings (settings.json)")
    config.add_argument("key", nargs="?", choices=[f.name for f in fields(AppSettings)], metavar="KEY")
    config.add_argument("value", nargs="?", metavar="VALUE")
    config.add_argument("--reset", action="store_true", help="set KEY back to its default")
    config.set_defaults(func=cmd_config)
