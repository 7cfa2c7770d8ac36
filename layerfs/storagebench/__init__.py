"""``layerfs bench``: storage benchmarks of one disk, layerfs beside its peers.

On the directory it is given (the disk to measure), one run compares the directory itself
(native), the kernel overlay filesystem, fuse-overlayfs, and layerfs with each FUSE core, on
the same generated image: import, mount to ready, cold walks and reads, a container-like
start, many small writes, copy-up, and fio's sequential and random I/O.  The modules:

* ``layers``: generated layers written as tar and as overlay layer directories (shared with
  the developer benchmarks in ``bench/``);
* ``image``: the bench image (the sample image or a given one, plus data layers sized by mode);
* ``machine``: what the report says about the machine, the disk and throttling;
* ``systems``: the five systems: their trees, mounts and why one is skipped;
* ``workloads``: what is timed, and fio;
* ``run``: the run: rounds, dropped caches, progress;
* ``report``: the JSON report, the text table, the HTML page and charts, and comparisons.
"""
