"""Two-node NFS emulation for tests: one backing directory mounted twice through an
NFS-like FUSE passthrough (own caches, latency, close-to-open, forwarded POSIX locks),
node B's processes in their own network namespace. See fixtures.py and __main__.py."""
