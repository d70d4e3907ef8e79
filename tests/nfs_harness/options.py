"""The knobs of one emulated NFS client mount, shared by the daemon, fixture and CLI,
and the profiles: named sets of knobs that model one kind of cluster filesystem."""
import argparse
from dataclasses import dataclass, field, fields
from typing import Dict, List, NamedTuple, Optional


def _knob(default, text: str):
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class NodeOptions:
    """How one node's mount behaves. Defaults model a typical NFS client on a LAN
    that writes through (every write() reaches the server at once)."""

    latency_ms: float = _knob(0.5, "added to every request sent to the server: one network round trip")
    attr_timeout: float = _knob(2.0, "seconds the kernel trusts cached sizes and mtimes")
    entry_timeout: float = _knob(2.0, "seconds the kernel trusts a cached name -> file")
    negative_timeout: float = _knob(2.0, "seconds a name looked up as missing stays missing")
    write_behind: bool = _knob(False, "hold writes in this mount until fsync, close, or a lock "
                                      "or unlock (see --lock-flush), as an NFS client does")
    lock_forwarding: bool = _knob(True, "locks exclude across the two mounts; off: node-local "
                                        "locks that exclude processes of one mount only (NFS nolock "
                                        "or local_lock=, Lustre localflock, BeeGFS by default)")
    lock_flush: bool = _knob(True, "a lock or unlock request first writes back this mount's "
                                   "held writes of the file (NFS); off: only fsync and close do")
    lock_invalidation: bool = _knob(True, "a granted lock drops this mount's cached attributes "
                                          "and pages of the file; off: stale caches stay")
    locks_available: bool = _knob(True, "off: every lock fails with ENOLCK (NFSv3 without lockd)")

    @staticmethod
    def preset(profile: Optional[str] = None, **knobs) -> "NodeOptions":
        """The options of a profile (None: the defaults), with `knobs` overriding it."""
        if profile is not None and profile not in PROFILES:
            raise ValueError(f"unknown nfs_harness profile {profile!r}; known: {', '.join(PROFILES)}")
        return NodeOptions(**{**(PROFILES[profile].knobs if profile else {}), **knobs})

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
        """Declare --profile and one flag per knob; a flag given overrides the profile."""
        parser.add_argument("--profile", choices=list(PROFILES), help="; ".join(
            f"{name}: {p.help}" for name, p in PROFILES.items()) + " (default: none, the knobs' defaults)")
        for f in fields(NodeOptions):
            flag = "--" + f.name.replace("_", "-")
            text = f"{f.metadata['help']} (default: {f.default})"
            if f.type in (bool, "bool"):
                parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=text,
                                    action=argparse.BooleanOptionalAction)
            else:
                parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=text,
                                    type=float if f.type in (float, "float") else int)

    @staticmethod
    def from_args(args: argparse.Namespace) -> "NodeOptions":
        """The options parsed by a parser prepared with `add_arguments`."""
        given = {f.name: getattr(args, f.name) for f in fields(NodeOptions) if hasattr(args, f.name)}
        return NodeOptions.preset(args.profile, **given)


class Profile(NamedTuple):
    """A kind of cluster filesystem, as the knobs that model it."""

    help: str
    knobs: Dict[str, bool]


PROFILES: Dict[str, Profile] = {
    "nfs": Profile("an NFS client with write-behind (flushed at fsync, close, lock and unlock)",
                   {"write_behind": True}),
    "nfs-local-locks": Profile("the same, mounted nolock or local_lock=posix: locks exclude "
                               "on one node only", {"write_behind": True, "lock_forwarding": False}),
    "beegfs": Profile("BeeGFS by default: node-local locks, writes flushed at fsync and close "
                      "only, a granted lock refreshes nothing",
                      {"write_behind": True, "lock_forwarding": False, "lock_flush": False,
                       "lock_invalidation": False}),
}
