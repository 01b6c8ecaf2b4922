"""``python -m devices {list,show,trtexec}``: browse device profiles, print on-device TensorRT commands."""
from __future__ import annotations

import sys

from devices.match import auto_profile_name
from devices.profile_config import DeviceProfile, ProfileError, list_profiles, load_profile, required_extra
from devices.trtexec import BundleError, trtexec_script
from runtime.cli import ArgumentParser, exit_with


def _threads(p: DeviceProfile) -> str:
    return "all" if p.threads == 0 else str(p.threads)


def format_table(profiles: list[DeviceProfile]) -> str:
    """Aligned table: name, backend, provider, precision, threads, description."""
    rows = [("NAME", "BACKEND", "PROVIDER", "PRECISION", "THREADS", "DESCRIPTION")]
    rows += [(p.name, p.backend, p.execution_provider, p.precision, _threads(p), p.description) for p in profiles]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5] for r in rows)


def format_profile(p: DeviceProfile) -> str:
    """Every field of one profile, then its setup notes."""
    rows = [("name", p.name), ("description", p.description),
            ("backend", f"{p.backend} (pip install 'waveclip-edge[{required_extra(p.backend)}]')"),
            ("execution_provider", p.execution_provider), ("precision", p.precision),
            ("threads", _threads(p)), ("batch_sizes", ", ".join(map(str, p.batch_sizes))),
            ("iterations", str(p.iterations))]
    if p.tensorrt:
        t = p.tensorrt
        rows += [("tensorrt.version", t.version or "-"), ("tensorrt.workspace_mib", str(t.workspace_mib)),
                 ("tensorrt.opt_batch", str(t.opt_batch)),
                 ("tensorrt.dla_core", "-" if t.dla_core is None else str(t.dla_core))]
    if p.jetson:
        j = p.jetson
        rows += [("jetson.jetpack", j.jetpack), ("jetson.nvpmodel", f"{j.nvpmodel_id} ({j.nvpmodel_name})"),
                 ("jetson.jetson_clocks", str(j.jetson_clocks).lower())]
    rows.append(("file", str(p.path)))
    width = max(len(k) for k, _ in rows)
    text = "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
    if p.setup.strip():
        text += "\n\nsetup:\n" + "\n".join(f"  {line}".rstrip() for line in p.setup.strip().splitlines())
    return text


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m devices", description="WaveCLIP device profiles.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,show,trtexec}")
    sub.add_parser("list", help="table of the shipped profiles", description="Table of the shipped profiles.")
    show = sub.add_parser("show", help="print one profile", description="Print one profile and its setup notes.")
    show.add_argument("profile", help="profile name (devices/profiles/NAME.toml), path to a .toml, or auto (the one "
                                      "that fits this machine)")
    trt = sub.add_parser("trtexec", help="print trtexec build and timing commands for a bundle",
                         description="Print the trtexec commands that build one TensorRT engine per level of a "
                                     "bundle into BUNDLE/tensorrt/PROFILE/ and time them, for running on the device.")
    trt.add_argument("profile", help="a tensorrt profile: name or path to a .toml")
    trt.add_argument("--bundle", required=True, help="bundle directory (with manifest.json)")
    trt.add_argument("--trtexec", default=None,
                     help="trtexec executable (default: /usr/src/tensorrt/bin/trtexec on Jetson, else trtexec)")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print(format_table(list_profiles()))
            name, why = auto_profile_name()
            print(f"\nthis machine: {name} ({why}); --device auto picks it" if name else
                  f"\nthis machine: none of them ({why})")
        elif args.command == "show":
            print(format_profile(load_profile(args.profile)))
        else:
            sys.stdout.write(trtexec_script(load_profile(args.profile), args.bundle, args.trtexec))
    except (ProfileError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    exit_with(main)
