"""Two-node NFS emulation for tests: one backing directory mounted twice through an
NFS-like FUSE passthrough (own caches, latency, close-to-open, forwarded or node-local
POSIX locks, optional write-behind; profiles for NFS, NFS nolock and BeeGFS), node B's
processes in their own network namespace. See fixtures.py, options.py and __main__.py."""
