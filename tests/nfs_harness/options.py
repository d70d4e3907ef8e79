"""The knobs of one emulated NFS client mount, shared by the daemon, fixture and CLI."""
import argparse
from dataclasses import dataclass, fields
from typing import List


@dataclass(frozen=True)
class NodeOptions:
    """How one node's mount behaves. Defaults model a typical NFS client on a LAN."""

    latency_ms: float = 0.5          # added to every FUSE request: one network round trip
    attr_timeout: float = 2.0        # seconds the kernel trusts cached sizes/mtimes
    entry_timeout: float = 2.0       # seconds the kernel trusts a cached name -> file
    negative_timeout: float = 2.0    # seconds a name looked up as missing stays missing
    lock_forwarding: bool = True     # off: locks stay local to each mount (no exclusion)
    lock_invalidation: bool = True   # off: a granted lock leaves stale caches in place
    locks_available: bool = True     # off: every lock fails with ENOLCK (NFSv3 without lockd/statd)

    def to_argv(self) -> List[str]:
        """Command-line flags that `add_arguments`/`from_args` turn back into these."""
        argv: List[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + flag[2:])
            else:
                argv += [flag, str(value)]
        return argv

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Declare one flag per knob, defaulting to the dataclass defaults."""
        for f in fields(NodeOptions):
            flag = "--" + f.name.replace("_", "-")
            if f.type in (bool, "bool"):
                parser.add_argument(flag, dest=f.name, default=f.default,
                                    action=argparse.BooleanOptionalAction)
            else:
                parser.add_argument(flag, dest=f.name, default=f.default,
                                    type=float if f.type in (float, "float") else int)

    @staticmethod
    def from_args(args: argparse.Namespace) -> "NodeOptions":
        """The options parsed by a parser prepared with `add_arguments`."""
        return NodeOptions(**{f.name: getattr(args, f.name) for f in fields(NodeOptions)})
